"""Sampling without a cache."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.infer.generate import generate
from tests.helpers import record_forwards, tiny_config


def test_greedy_is_the_argmax_of_the_full_forward():
    model = HybridLM(tiny_config("M-[*-]"), seed=0)
    prompt = [5, 17, 3]
    new = generate(model, prompt, max_new_tokens=6, temperature=0)
    ids = list(prompt)
    for token in new:
        assert token == int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)


def test_sampling_is_seeded_and_stops_at_eos():
    model = HybridLM(tiny_config("M-[*-]"), seed=0)
    a = generate(model, [1, 2], 10, temperature=1.0, top_k=5, seed=3)
    b = generate(model, [1, 2], 10, temperature=1.0, top_k=5, seed=3)
    assert a == b and len(a) == 10
    stopped = generate(model, [1, 2], 50, temperature=1.0, top_k=5, eos_id=a[0], seed=3)
    assert stopped == [a[0]]


@pytest.mark.parametrize(
    "path", [dict(), dict(use_cache=False), dict(speculative="mtp"), dict(temperature=1.0, top_k=5, seed=3)]
)
def test_a_list_of_eos_ids_stops_a_row_at_any_of_them(path):
    """As a Hugging Face generation_config's ``eos_token_id`` list (end of turn, end of text): a row stops after the
    first token it makes that is in the list, on every path; an empty prompt starts from the list's first id."""
    model = HybridLM(tiny_config("M*-/-"), seed=0)

    def upto(new, token):  # the tokens up to the first ``token``, inclusive
        return new[: new.index(token) + 1]

    for row in ([1, 2], [3]):
        new = generate(model, row, 12, **path)
        other = next(t for t in range(97) if t not in new)  # never made: must not change where the row stops
        for k in (0, 3):
            assert generate(model, row, 12, eos_id=[other, new[k]], **path) == upto(new, new[k])
    starts = [generate(model, [p, [7]], 4, eos_id=[9, 5], **path) for p in ([], [9])]
    assert starts[0] == starts[1]
    if "speculative" not in path:  # a batch decodes together there: each row stops at its own first listed token
        free = generate(model, [[1, 2], [3]], 12, **path)
        ids = [free[0][2], free[1][1]]
        expected = [min((upto(new, t) for t in ids if t in new), key=len) for new in free]
        assert generate(model, [[1, 2], [3]], 12, eos_id=ids, **path) == expected


def test_top_k_keeps_exactly_the_k_best_and_top_p_the_smallest_set():
    """Tests checked only that sampling is seeded: a top_k that kept k - 1 tokens passed (and top_k=1
    then raised "probability tensor contains inf")."""
    from hybridlm.infer.generate import Sampler

    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(400, 1)  # best 1, then 2, then 4
    greedy = Sampler(temperature=0)(logits)
    assert set(Sampler(temperature=5.0, top_k=1, seed=0)(logits).tolist()) == {1} == set(greedy.tolist())
    assert set(Sampler(temperature=5.0, top_k=2, seed=0)(logits).tolist()) == {1, 2}
    assert set(Sampler(temperature=5.0, top_k=3, seed=0)(logits).tolist()) == {1, 2, 4}
    p = torch.softmax(logits[0] / 5.0, -1)  # top_p just above the best two's mass: three tokens
    assert set(Sampler(temperature=5.0, top_p=float(p[1] + p[2]) + 1e-3, seed=0)(logits).tolist()) == {1, 2, 4}
    assert set(Sampler(temperature=5.0, top_p=float(p[1] + p[2]) - 1e-3, seed=0)(logits).tolist()) == {1, 2}


def test_bad_arguments_are_refused_by_name():
    model = HybridLM(tiny_config("M*-"), seed=0)
    for kwargs, says in (
        (dict(temperature=float("nan")), "temperature must be >= 0 and finite"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be > 0 and finite"),
        (dict(eos_id=10_000), "eos_id 10000 is outside the vocabulary"),
        (dict(max_new_tokens=10**15), r"cannot allocate the cache .*\(max_new_tokens\)"),
        (dict(seed=2**64), "seed must be None or an integer"),
        (dict(seed=1.5), "seed must be None or an integer"),
    ):
        with pytest.raises(ValueError, match=says):
            generate(model, [1, 2, 3], **kwargs)
    for prompt in ("hello", [1.7, 2.2], [True, False], torch.tensor([1, 0]).bool(), [torch.tensor(True)]):
        with pytest.raises(ValueError, match="prompts are token ids"):
            generate(model, prompt, max_new_tokens=2)


@pytest.mark.parametrize("speculative", [None, "mtp"])
@pytest.mark.parametrize("max_new_tokens", [10**15, 2**64])
def test_a_cache_too_large_to_allocate_is_refused_naming_max_new_tokens(speculative, max_new_tokens):
    """Out of memory, or past int64, on the plain and the speculative path alike."""
    model = HybridLM(tiny_config("M*/-"), seed=0)
    with pytest.raises(ValueError, match=r"cannot allocate the cache .*\(max_new_tokens\)"):
        generate(model, [1, 2, 3], max_new_tokens, speculative=speculative)


def test_wrongly_typed_arguments_are_refused_by_name():
    """Arguments of the wrong type are refused by name, not by an error from deep inside a layer."""
    model = HybridLM(tiny_config("M*-"), seed=0)
    for kwargs, says in (
        (dict(max_new_tokens=3.0), "max_new_tokens must be an integer, got 3.0"),
        (dict(max_new_tokens=None), "max_new_tokens must be an integer, got None"),
        (dict(max_new_tokens=3.0, use_cache=False), "max_new_tokens must be an integer"),
        (dict(top_k=2.5), "top_k must be an integer >= 0, got 2.5"),
        (dict(temperature=None), "temperature must be >= 0 and finite, got None"),
        (dict(top_p="0.9"), "top_p must be in"),
        (dict(temperature="0.5"), r"^temperature must be >= 0 and finite, got '0.5'$"),
        (dict(prefill_chunk_size=1.5), "prefill_chunk_size must be an integer"),
        (dict(eos_id=2.0), r"eos_id must be a token id or a non-empty list of token ids, got 2.0"),
        (dict(eos_id=[]), r"eos_id must be a token id or a non-empty list of token ids, got \[\]"),
        (dict(eos_id=[2, 3.0]), r"eos_id must be a token id or a non-empty list of token ids, got \[2, 3.0\]"),
        (dict(eos_id=[2, 500]), r"eos_id 500 is outside the vocabulary \[0, 97\)"),
        (dict(draft_tokens=1.0, speculative="mtp"), "draft_tokens must be an integer"),
    ):
        with pytest.raises(ValueError, match=says):
            generate(model, [1, 2, 3], **kwargs)
    for prompts, says in (
        ([[1, 2], 3], "prompt 1: a batch is a list of token-id lists, got 3"),
        (torch.tensor(5), "got 5"),
    ):
        with pytest.raises(ValueError, match=says):
            generate(model, prompts, 2)


def test_speculative_settings_are_refused_even_for_no_new_tokens():
    plain, with_mtp = HybridLM(tiny_config("M*-"), seed=0), HybridLM(tiny_config("M*/-"), seed=0)
    for model, kwargs, says in (
        (plain, {}, "needs a model with MTP depths"),
        (plain, dict(temperature=1.0), "needs a model with MTP depths"),
        (with_mtp, dict(use_cache=False), "decode with the cache"),
    ):
        for n in (0, 1):
            with pytest.raises(ValueError, match=says):
                generate(model, [1, 2], n, speculative="mtp", **kwargs)


def test_numpy_and_tensor_settings_are_their_values():
    np = pytest.importorskip("numpy")
    model = HybridLM(tiny_config("M*-"), seed=0)
    want = generate(model, [1, 2], 4, temperature=1.0, seed=5)
    for seed in (np.int64(5), np.int32(5), torch.tensor(5)):
        assert generate(model, [1, 2], 4, temperature=1.0, seed=seed) == want
    settings = dict(temperature=0.7, top_p=0.9, top_k=3, repetition_penalty=1.2)
    want = generate(model, [1, 2], 4, seed=5, **settings)
    assert generate(model, [1, 2], 4, seed=5, **{k: torch.tensor(v) for k, v in settings.items()}) == want
    assert generate(model, [1, 2], 4, seed=5, **{k: np.float32(v) for k, v in settings.items() if k != "top_k"}) == (
        generate(model, [1, 2], 4, seed=5, **{k: float(np.float32(v)) for k, v in settings.items() if k != "top_k"})
    )


def test_batches_as_numpy_arrays_are_batches():
    np = pytest.importorskip("numpy")
    model = HybridLM(tiny_config("M*-"), seed=0)
    want = generate(model, [[1, 2], [3, 4]], 3)
    assert generate(model, torch.tensor([[1, 2], [3, 4]]), 3) == want
    assert generate(model, np.array([[1, 2], [3, 4]]), 3) == want
    assert generate(model, [np.array([1, 2]), np.array([3, 4])], 3) == want
    assert generate(model, np.array([1, 2]), 3) == want[0]
    assert generate(model, [np.int64(1), torch.tensor(2)], 3) == want[0]
    with pytest.raises(ValueError, match=r"got \[1, 2\]"):
        generate(model, [[[1, 2]]], 3)


def test_a_tiny_temperature_samples_the_argmax():
    """Dividing the logits by 1e-45 overflows to inf (and inf - inf is NaN): the best logit is made 0 first."""
    model = HybridLM(tiny_config("M*-"), seed=0)
    greedy = generate(model, [[1, 2], [3, 4]], 5)
    assert generate(model, [[1, 2], [3, 4]], 5, temperature=1e-45, seed=7) == greedy


def test_out_of_range_settings_are_refused_and_the_edges_accepted():
    """Each bound of check_sampling (and of the integer arguments) is its own rule: a bool is not a number,
    top_p may not pass 1, a penalty of 0 or an infinite temperature is refused; the seed range's ends are taken."""
    model = HybridLM(tiny_config("M*-"), seed=0)
    for kwargs, says in (
        (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
        (dict(temperature=True), "temperature must be >= 0 and finite"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0 and finite"),
        (dict(frequency_penalty=2.01), r"frequency_penalty must be in \[-2.0, 2.0\], got 2.01"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\], got 1.5"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\], got -0.1"),
        (dict(presence_penalty=-2.5), r"presence_penalty must be in \[-2.0, 2.0\], got -2.5"),
        (dict(presence_penalty=float("nan")), r"presence_penalty must be in \[-2.0, 2.0\], got nan"),
        (dict(frequency_penalty=True), r"frequency_penalty must be in \[-2.0, 2.0\], got True"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer, got True"),
        (dict(top_k=True), "top_k must be an integer >= 0"),
        (dict(speculative="MTP"), "speculative must be None or 'mtp'"),
    ):
        with pytest.raises(ValueError, match=says):
            generate(model, [1, 2, 3], **kwargs)
    for prompt in ([1, -1], [[1], [2, -3]]):
        with pytest.raises(ValueError, match=r"token ids \[-\d\] are outside the vocabulary"):
            generate(model, prompt, 2)
    for seed in (-(2**63), 2**63 - 1):
        assert len(generate(model, [1, 2], 2, temperature=1.0, seed=seed)) == 2


def test_cuda_graph_with_speculative_is_refused_as_unsupported():
    """The speculative refusal comes first, whatever the device (not 'needs a CUDA device')."""
    model = HybridLM(tiny_config("M*/-"), seed=0)
    with pytest.raises(ValueError, match="cuda_graph is not supported with speculative decoding"):
        generate(model, [1, 2], 3, speculative="mtp", cuda_graph=True)


def test_repetition_penalty_covers_generated_tokens_as_a_step_by_step_reference_does():
    """The penalty applies to every token already in the row, prompt and output: a reference loop over the
    full forward, penalizing each seen token's logit, picks the same tokens (cached and uncached)."""
    model = HybridLM(tiny_config("M*-"), seed=0).eval()
    prompt, penalty = [5, 17, 3], 3.0
    ids = list(prompt)
    for _ in range(12):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(ids)] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        ids.append(int(logits.argmax()))
    want = ids[len(prompt) :]
    for use_cache in (True, False):
        assert generate(model, prompt, 12, repetition_penalty=penalty, use_cache=use_cache) == want
    # The tiny model's best logits are positive, so the loop above passes whatever is done to negative ones:
    # CTRL's rule on both signs, a positive logit divided by the penalty, a negative one multiplied by it.
    from hybridlm.infer.generate import Sampler

    sampler = Sampler(temperature=0, repetition_penalty=3.0)
    sampler.observe([[0], [0]], 3, "cpu")
    logits = torch.tensor([[2.0, 1.0, -5.0], [-1.0, -2.0, -5.0]])  # token 0 seen in both rows, the best
    assert sampler(logits).tolist() == [1, 1]  # 2 / 3 < 1, and -1 * 3 < -2


@pytest.mark.parametrize(("frequency", "presence"), [(1.5, 0.0), (0.0, 2.0), (0.7, -0.4), (-2.0, 0.0)])
def test_frequency_and_presence_penalties_follow_openais_formula_as_a_step_by_step_reference_does(frequency, presence):
    """OpenAI's penalties: each token's logit loses ``frequency`` times its count in the output so far, and ``presence``
    once if the output holds it (the prompt's tokens are not counted). A float64 reference loop over the full forward
    applies the formula; greedy ``generate``, cached and uncached, picks its tokens, on one prompt and in a batch of two
    (each row counting its own output)."""
    model = HybridLM(tiny_config("M*-"), seed=0).eval().cast(torch.float64)
    batch = [[5, 17, 3, 5], [9, 2]]

    def reference(prompt: list[int], n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
            counts = torch.zeros_like(logits)
            for token in out:
                counts[token] += 1
            out.append(int((logits - frequency * counts - presence * (counts > 0).double()).argmax()))
        return out

    want = [reference(prompt, 12) for prompt in batch]
    assert want[0] != generate(model, batch[0], 12)  # (the penalties change what greedy picks here)
    settings = dict(frequency_penalty=frequency, presence_penalty=presence)
    for use_cache in (True, False):
        assert generate(model, batch[0], 12, use_cache=use_cache, **settings) == want[0]
        assert generate(model, batch, 12, use_cache=use_cache, **settings) == want
    # Sampled, the cached batch draws what the uncached reference draws with the same seed.
    sampled = dict(temperature=1.0, top_k=20, seed=5, **settings)
    assert generate(model, batch, 10, **sampled) == generate(model, batch, 10, use_cache=False, **sampled)


def test_the_output_counts_leave_the_prompt_out_and_count_each_picked_token():
    """``Sampler.observe``: a prompt (lists) is seen by the repetition penalty only; picked tokens (a tensor) are
    counted. A token the prompt holds is not penalized by the presence penalty; one picked twice loses twice the
    frequency penalty."""
    from hybridlm.infer.generate import Sampler

    sampler = Sampler(temperature=0, frequency_penalty=1.0, presence_penalty=0.5)
    sampler.observe([[0, 1]], 4, "cpu")
    assert sampler.counts is None and sampler.seen is None
    logits = torch.tensor([[3.0, 2.9, 2.5, 0.0]])
    assert sampler(logits).tolist() == [0]  # the prompt's 0 and 1 are not penalized
    for _ in range(2):
        sampler.observe(torch.tensor([0]), 4, "cpu")
    assert sampler.counts.tolist() == [[2, 0, 0, 0]]
    assert sampler(logits).tolist() == [1]  # 3 - 2 * 1 - 0.5 = 0.5 < 2.9
    sampler.observe(torch.tensor([1]), 4, "cpu")
    assert sampler(logits).tolist() == [2]  # 2.9 - 1.5 = 1.4 < 2.5


def test_logit_bias_is_added_to_the_logits_before_the_pick_and_not_to_the_logprobs():
    """OpenAI's logit_bias: a float64 reference loop adds each bias to the full forward's logits and takes the
    argmax; greedy ``generate`` (cached, uncached, a batch) picks its tokens: -100 bans the token greedy took first,
    +100 forces another. The logprobs stay the model's own (the bias is no part of them, as OpenAI reports them)."""
    model = HybridLM(tiny_config("M*-"), seed=0).eval().cast(torch.float64)
    batch = [[5, 17, 3], [9, 2]]
    plain = generate(model, batch, 8)
    bias = {plain[0][0]: -100.0, 7: 3.5}

    def reference(prompt: list[int]) -> list[int]:
        out: list[int] = []
        for _ in range(8):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].clone()
            for token, b in bias.items():
                logits[token] += b
            out.append(int(logits.argmax()))
        return out

    want = [reference(prompt) for prompt in batch]
    assert plain[0][0] not in want[0] and want != plain
    for use_cache in (True, False):
        assert generate(model, batch, 8, use_cache=use_cache, logit_bias=bias) == want
    got = []
    forced = generate(model, batch[0], 4, logit_bias={11: 100}, logprobs=0, callback=lambda r, t, lp: got.append(lp))
    assert forced == [11] * 4
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([batch[0]])).logits[0, -1], -1)
    assert got[0].logprob == pytest.approx(float(full[11]), abs=1e-12) and got[0].logprob < -1
    for bad, says in (
        ({97: 1.0}, r"logit_bias: 97 is not a token id \(an integer in \[0, 97\)\)"),
        ({1: float("inf")}, "finite"),
    ):
        with pytest.raises(ValueError, match=says):
            generate(model, batch, 2, logit_bias=bad)


def test_min_p_keeps_the_tokens_at_least_that_fraction_as_likely_as_the_best():
    """min_p: tokens of probability at least ``min_p`` times the most likely one's are kept (equal kept, as in
    transformers and vLLM), the rest never drawn; whatever the temperature's scale of the logits (it is read after
    the temperature, as theirs is); the cached batch draws what the uncached reference does with the same seed."""
    from hybridlm.infer.generate import Sampler

    logits = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]], dtype=torch.float64).log().expand(4000, 5)
    for min_p, kept in ((0.0, {0, 1, 2, 3, 4}), (0.125, {0, 1, 2, 3, 4}), (0.25, {0, 1, 2}), (0.5, {0, 1}), (1.0, {0})):
        assert set(Sampler(temperature=1.0, min_p=min_p, seed=0)(logits).tolist()) == kept, min_p
    hot = Sampler(temperature=2.0, min_p=0.5, seed=0)(logits)  # (at T = 2 token 2 is half as likely as the best)
    assert set(hot.tolist()) == {0, 1, 2}
    model = HybridLM(tiny_config("M*-"), seed=0)
    batch, settings = [[1, 2], [3, 4, 5]], dict(temperature=1.5, seed=4, min_p=0.8)
    drawn = generate(model, batch, 10, **settings)
    assert drawn == generate(model, batch, 10, use_cache=False, **settings)
    assert drawn != generate(model, batch, 10, temperature=1.5, seed=4)


def test_a_top_k_past_the_vocabulary_keeps_every_token():
    """top_k >= vocabulary size filters nothing: the same samples as top_k=0 (a top_k past it crashed topk)."""
    model = HybridLM(tiny_config("M*-"), seed=0)
    want = generate(model, [[1, 2], [3, 4]], 5, temperature=1.0, seed=3)
    for top_k in (97, 1000):
        assert generate(model, [[1, 2], [3, 4]], 5, temperature=1.0, top_k=top_k, seed=3) == want


def test_top_p_reached_exactly_keeps_the_smallest_set():
    """Four equally likely tokens (each exactly 0.25): top_p=0.5 is reached by two of them, so the third is dropped."""
    from hybridlm.infer.generate import Sampler

    logits = torch.zeros(400, 4)
    assert len(set(Sampler(temperature=1.0, top_p=0.5, seed=0)(logits).tolist())) == 2
    assert len(set(Sampler(temperature=1.0, top_p=0.75, seed=0)(logits).tolist())) == 3


def test_an_empty_prompt_starts_from_the_end_of_text_token():
    model = HybridLM(tiny_config("M*-"), seed=0)
    for use_cache in (True, False):
        assert generate(model, [], 4, eos_id=5, use_cache=use_cache) == generate(model, [5], 4, eos_id=5)
        assert generate(model, [[], [1, 2]], 4, use_cache=use_cache) == generate(model, [[0], [1, 2]], 4)


def test_stats_count_real_tokens_alike_with_and_without_the_cache():
    """prefill_tokens are the prompts' tokens (not the left padding), decode_tokens the tokens after each row's
    first: the same numbers from the cached batch and from the uncached loop over its rows."""
    model = HybridLM(tiny_config("M*-"), seed=0)
    prompts = [[5, 17, 3, 9], [1], [2, 2, 7]]
    got = {}
    for use_cache in (True, False):
        stats = got[use_cache] = {}
        out = generate(model, prompts, 5, use_cache=use_cache, stats=stats)
        assert [len(o) for o in out] == [5, 5, 5]
    for stats in got.values():
        assert stats["prefill_tokens"] == 8 and stats["decode_tokens"] == 3 * 4, stats


def test_generate_leaves_the_model_in_the_mode_it_found():
    model = HybridLM(tiny_config("M*-"), seed=0)
    for training in (True, False):
        model.train(training)
        for use_cache in (True, False):
            generate(model, [1, 2], 3, use_cache=use_cache)
            assert model.training == training


def test_the_uncached_loop_over_a_batch_treats_each_row_as_the_cached_batch_does():
    """use_cache=False runs the rows one at a time: each keeps its own repetition penalty, stops at eos_id,
    and reports its own row to the callback, as the cached batch does."""
    model = HybridLM(tiny_config("M*-"), seed=0)
    prompts, settings = [[5, 17, 3], [1, 2]], dict(repetition_penalty=5.0)
    eos = generate(model, prompts, 1, **settings)[0][0]  # row 0 stops at its first token
    seen, out = {}, {}
    for use_cache in (True, False):
        calls = seen[use_cache] = []
        out[use_cache] = generate(
            model,
            prompts,
            10,
            eos_id=eos,
            use_cache=use_cache,
            callback=lambda r, t, c=calls: c.append((r, t)),
            **settings,
        )
    assert out[True] == out[False] and out[True][0] == [eos] and len(out[True][1]) > 1
    assert sorted(seen[True]) == sorted(seen[False])
    assert [t for r, t in seen[False] if r == 1] == out[False][1]


def test_a_stats_dict_given_twice_holds_the_last_calls_numbers():
    model = HybridLM(tiny_config("M*-"), seed=0)
    stats = {}
    generate(model, [[1, 2, 3], [4]], 5, stats=stats)
    generate(model, [7, 8], 3, stats=stats)
    assert stats["prefill_tokens"] == 2 and stats["decode_tokens"] == 2


def test_tuple_batches_are_batches_and_a_negative_eos_id_is_refused():
    model = HybridLM(tiny_config("M*-"), seed=0)
    assert generate(model, ((1, 2), (3, 4, 5)), 3) == generate(model, [[1, 2], [3, 4, 5]], 3)
    with pytest.raises(ValueError, match=r"eos_id -1 is outside the vocabulary \[0, 97\)"):
        generate(model, [1, 2], 3, eos_id=-1)


def test_no_new_tokens_give_an_empty_list_per_prompt_and_cacheless_speculation_is_refused():
    model = HybridLM(tiny_config("M*/-"), seed=0)
    assert generate(model, [[1], [2, 3], [4]], 0) == [[], [], []] and generate(model, [1, 2], 0) == []
    with pytest.raises(ValueError, match="prefill_chunk_size must be >= 1, got 0"):
        generate(model, [1, 2], 3, prefill_chunk_size=0)
    with pytest.raises(ValueError, match="leave use_cache=True"):
        generate(model, [1, 2], 3, speculative="mtp", use_cache=False)


def test_settings_beyond_float32s_range_sample_without_nan():
    """A temperature, top_p or repetition penalty that float32 rounds to 0 or inf (1e-300, 1e300) gave NaN
    probabilities ("probability tensor contains either inf, nan"): the sampler keeps every logit a number."""
    from hybridlm.infer.generate import Sampler

    logits = torch.tensor([[0.0, 3.0, -1.0, 2.0], [1.0, 0.0, 5.0, -2.0]])
    best = logits.argmax(-1).tolist()
    assert Sampler(temperature=1e-300, seed=0)(logits).tolist() == best
    assert Sampler(temperature=1.0, top_p=1e-300, seed=0)(logits).tolist() == best
    for penalty in (1e-300, 1e300):
        sampler = Sampler(temperature=1.0, repetition_penalty=penalty, seed=0)
        sampler.observe([[0, 1, 2, 3], [0, 1, 2, 3]], 4, "cpu")
        assert all(0 <= t < 4 for t in sampler(logits).tolist())


def test_a_float64_models_greedy_pick_is_its_float64_argmax():
    """Two logits closer than float32 can tell apart: a float64 model's greedy token is the argmax of its float64
    logits (as its full forward, and the speculative path, pick), not of the logits rounded to float32 (a tie,
    which went to the lower id)."""
    model = HybridLM(tiny_config("M*/[*-]"), seed=0, dtype=torch.float64).eval()
    prompt = [5, 17, 3]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
        best = int(logits.argmax())
        other = next(j for j in range(best) if j not in prompt)  # a lower id (the best is not id 0 here)
        # The other token's logit just below the best's: (1 - 1e-12) times it, the same number in float32.
        model.lm_head.weight[other] = model.lm_head.weight[best] * (1 - 1e-12 * logits[best].sign())
        logits = model(torch.tensor([prompt])).logits[0, -1]
    assert int(logits.argmax()) == best and logits[other] < logits[best]
    assert logits.float()[other] == logits.float()[best]  # tied in float32
    for use_cache in (True, False):
        assert generate(model, prompt, 1, use_cache=use_cache) == [best]
    assert generate(model, prompt, 1, speculative="mtp") == [best]


def test_the_uncached_reference_samples_a_batch_as_the_cached_loop_does():
    """use_cache=False ran the rows one after the other, each drawing from the shared generator in turn: a sampled
    batch got other tokens than the cached batch with the same seed. It steps the rows together now (each row's
    own full forward), so the reference reproduces the cached samples, rows stopping at eos_id among them."""
    model = HybridLM(tiny_config("M*-"), seed=0, dtype=torch.float64).eval()
    prompts = [[5, 17, 3], [1, 2], [9]]
    settings = dict(temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=3)
    first = generate(model, prompts, 1, **settings)
    calls, out = {}, {}
    for use_cache in (True, False):
        calls[use_cache] = []
        out[use_cache] = generate(
            model,
            prompts,
            8,
            eos_id=first[1][0],  # row 1 stops at its first token
            use_cache=use_cache,
            callback=lambda r, t, c=calls[use_cache]: c.append((r, t)),
            **settings,
        )
    assert out[False] == out[True] and out[True][1] == first[1] and len(out[True][0]) > 1
    assert calls[False] == calls[True]  # in the same order too


def test_a_batch_array_of_no_rows_gives_no_outputs():
    """A (0, L) tensor or array is an empty batch: its tolist() is [], which read as one empty prompt, so
    generate returned one prompt's tokens (from the end-of-text id) instead of an empty list of outputs."""
    import numpy as np

    model = HybridLM(tiny_config("M*/-"), seed=0)
    for batch in (torch.empty(0, 4, dtype=torch.long), np.zeros((0, 4), dtype=np.int64)):
        for kw in ({}, {"use_cache": False}, {"speculative": "mtp"}):
            assert generate(model, batch, 3, **kw) == []
    assert generate(model, torch.tensor([[1, 2]]), 2) == [generate(model, [1, 2], 2)]  # a batch of one stays one


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"use_cache": False}, {"temperature": 1.0, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.2}],
    ids=["greedy", "uncached", "sampled"],
)
def test_nan_logits_stop_generation_naming_the_prompt_and_the_token(kwargs):
    """A NaN in the weights gave garbage silently: greedy took the argmax of NaN logits (token 0, every step), and
    sampling died in multinomial ("probability tensor contains either inf, nan") naming no step. Here the
    embedding of the row's first new token is NaN, so the logits of its second one are: the error names both."""
    from hybridlm.errors import NonFiniteLogitsError

    model = HybridLM(tiny_config("M*-"), seed=0)
    prompts = [[4, 5], [1, 2, 3]]
    first = generate(model, prompts, 1, **kwargs)
    with torch.no_grad():
        model.embeddings.weight[first[1][0]] = float("nan")
    assert first[1][0] not in (4, 5) and generate(model, [4, 5], 1, **kwargs) == first[0]  # row 0 is fine at first
    with pytest.raises(NonFiniteLogitsError, match=r"^prompt 1: the logits for new token 2 \(position 4 of the seq"):
        generate(model, prompts, 5, **kwargs)


def test_inf_logits_are_refused_from_the_first_token_and_a_finished_row_is_not_checked():
    from hybridlm.errors import NonFiniteLogitsError

    model = HybridLM(tiny_config("M*-"), seed=0)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("inf"))  # inf * h: inf and -inf, and NaN where they meet
    for temperature in (0.0, 1.0):
        with pytest.raises(NonFiniteLogitsError, match=r"^prompt 0: the logits for new token 1 \(position 3 "):
            generate(model, [1, 2, 3], 4, temperature=temperature)
    # A row that has ended at eos_id keeps decoding in the batch (its tokens dropped): its logits do not matter.
    model = HybridLM(tiny_config("M*-"), seed=0)
    first = generate(model, [[4, 5], [1, 2, 3]], 1)
    with torch.no_grad():
        model.embeddings.weight[first[1][0]] = float("nan")
    assert generate(model, [[4, 5], [1, 2, 3]], 3, eos_id=first[1][0])[1] == first[1]


def test_the_sampler_flags_rows_without_a_pickable_token_and_still_samples_the_others():
    """A NaN, a +inf or no finite logit flags a row (its token means nothing); -inf beside finite logits is a token
    that cannot be picked, not an error. The flagged rows sample without multinomial failing on them."""
    from hybridlm.infer.generate import Sampler

    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[0.0, nan, 1.0], [0.0, inf, 1.0], [-inf, -inf, -inf], [-inf, 0.0, 2.0], [0.0, 5.0, 1.0]])
    for temperature in (0.0, 1.0):
        tokens, bad = Sampler(temperature=temperature, top_p=0.9, seed=0).pick(logits)
        assert bad.tolist() == [True, True, True, False, False] and tokens[3:].tolist() == [2, 1]


def test_nan_logits_in_the_speculative_verify_window_are_named_by_their_token():
    """With drafts that are all right, the NaN logits sit inside a verify window (not at its first position): the
    error names the token they were to pick, as plain greedy decoding does. (MLP blocks only: a NaN input reaches
    the earlier positions of a window through attention and the chunked scans, as 0 * NaN.)"""
    from hybridlm.errors import NonFiniteLogitsError
    from hybridlm.infer.speculative import _Depths

    model = HybridLM(tiny_config("-/-/-"), seed=0)
    prompt = [1, 2, 3]
    truth = prompt + generate(model, prompt, 8)
    with torch.no_grad():
        model.embeddings.weight[truth[5]] = float("nan")  # the logits of new token 4 (position 6)
    assert truth[5] not in truth[:5]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Depths, "draft", lambda self, tokens, num: truth[len(tokens) : len(tokens) + num])
        for kwargs in ({"speculative": "mtp"}, {}):
            with pytest.raises(NonFiniteLogitsError, match=r"^prompt 0: the logits for new token 4 \(position 6 "):
                generate(model, prompt, 8, **kwargs)
    # In a batch, prompts run one at a time: the error names the prompt's index in the batch, not 0.
    with pytest.raises(NonFiniteLogitsError, match=r"^prompt 1: the logits for new token 1 \(position 1 ") as info:
        generate(model, [[1], [truth[5]]], 3, speculative="mtp")
    assert info.value.row == 1


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_nan_logits_are_named_on_cuda_through_the_pinned_readback(cuda_graph):
    """On CUDA the flags come back through the token reader's pinned copy, behind the same event as the tokens; a
    sampled row with NaN logits must not reach multinomial (a device-side assert ends the process's use of the GPU),
    so the GPU still works after the error."""
    from hybridlm.errors import NonFiniteLogitsError

    model = HybridLM(tiny_config("M*-"), seed=0, device="cuda").eval()
    prompts = [[4, 5], [1, 2, 3]]
    for temperature in (0.0, 1.0):  # (the sampled first token is another one: the same seed picks it again)
        with torch.no_grad():
            model.embeddings.weight.nan_to_num_(nan=0.0)
        first = generate(model, prompts, 1, temperature=temperature, cuda_graph=cuda_graph)
        assert first[1][0] not in (1, 2, 3, 4, 5), first
        with torch.no_grad():
            model.embeddings.weight[first[1][0]] = float("nan")
        with pytest.raises(
            NonFiniteLogitsError, match=r"^prompt 1: the logits for new token 2 \(position 4 of the seq"
        ):
            generate(model, prompts, 5, temperature=temperature, cuda_graph=cuda_graph)
    assert torch.ones(2, device="cuda").sum().item() == 2


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_logprobs_come_back_through_the_pinned_readback_on_cuda(cuda_graph):
    """On CUDA the logprobs are copied with the tokens behind one event (eager, or replayed as a CUDA graph): the
    same as the CPU's, which equal the full forward's (test_logprobs_are_the_raw_log_softmax_of_the_full_forward)."""
    model = HybridLM(tiny_config("M*-"), seed=0).eval()
    prompts = [[4, 5], [1, 2, 3]]
    on_cpu, on_gpu = [], []
    generate(model, prompts, 5, logprobs=4, callback=lambda r, t, lp: on_cpu.append((r, t, lp)))
    generate(
        model.cuda(), prompts, 5, logprobs=4, cuda_graph=cuda_graph, callback=lambda r, t, lp: on_gpu.append((r, t, lp))
    )
    assert [(r, t) for r, t, _ in on_gpu] == [(r, t) for r, t, _ in on_cpu]
    for (_, _, gpu), (_, _, cpu) in zip(on_gpu, on_cpu):
        torch.testing.assert_close(gpu.logprob, cpu.logprob, rtol=0, atol=1e-4)
        torch.testing.assert_close([v for _, v in gpu.top], [v for _, v in cpu.top], rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_frequency_and_presence_penalties_count_on_cuda_as_on_the_cpu(cuda_graph):
    """The output counts live on the device (a scatter-add per step, beside the decode step or its replayed graph),
    and so does the logit bias: greedy tokens with them are the CPU's (float32; the CPU's equal the float64 reference loop,
    test_frequency_and_presence_penalties_follow_openais_formula_as_a_step_by_step_reference_does)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = HybridLM(tiny_config("M*-"), seed=0).eval()
    prompts, settings = [[4, 5, 4], [1, 2, 3]], dict(frequency_penalty=-1.5, presence_penalty=0.5)
    settings["logit_bias"] = {generate(model, prompts[0], 1)[0]: -100.0, 7: 2.0}  # (the bias on the device too)
    on_cpu = generate(model, prompts, 12, **settings)
    assert on_cpu != generate(model, prompts, 12)
    assert generate(model.cuda(), prompts, 12, cuda_graph=cuda_graph, **settings) == on_cpu


def test_an_eos_id_outside_the_vocabulary_is_named_not_the_empty_prompt_that_starts_from_it():
    """An empty prompt starts from eos_id: one outside the vocabulary was reported as the prompt's own token."""
    model = HybridLM(tiny_config("M-"), seed=0)
    for prompts in ([], [[1], []]):
        with pytest.raises(ValueError, match=r"^eos_id 500 is outside the vocabulary \[0, 97\)$"):
            generate(model, prompts, 3, eos_id=500)


@pytest.mark.parametrize("meta", ["all", "one"])
def test_a_model_without_values_on_the_meta_device_is_refused_naming_its_tensors(meta):
    """A model built on meta (or one holding a meta tensor) failed inside torch, naming nothing: "META device type
    not an accelerator" from the sampler's generator, or a matmul's shape error for one meta layer."""
    config = tiny_config("M*-")
    model = HybridLM(config, device="meta") if meta == "all" else HybridLM(config, seed=0)
    if meta == "one":
        model.norm_f.weight = torch.nn.Parameter(torch.empty(config.hidden_size, device="meta"))
    says = r"\(all \d+ of them: embeddings.weight, \.\.\.\)" if meta == "all" else r"\(norm_f.weight\)"
    with pytest.raises(
        ValueError, match=rf"^cannot generate: tensors on the meta device, without values {says}.*to_empty"
    ):
        generate(model, [1, 2], 3)


def test_the_uncached_reference_computes_the_last_positions_logits_only():
    """The reference reruns the whole sequence per token; it computed the logits of every position as well, (1, L, V)
    float32 per row and step, and as many per MTP depth, to read the last row: 2 GB a forward at a 4,096-token prompt
    and a 131,072-token vocabulary."""
    model = HybridLM(tiny_config("M*-/*-"), seed=0)
    shapes = []
    hook = model.register_forward_hook(
        lambda m, args, out: shapes.append([tuple(x.shape) for x in (out.logits, *out.mtp_logits)])
    )
    new = generate(model, [[5, 17, 3], [1]], 4, use_cache=False)
    hook.remove()
    assert new == generate(model, [[5, 17, 3], [1]], 4) and len(shapes) == 8
    assert all(s == [(1, 1, 97), (1, 1, 97)] for s in shapes), shapes


def test_a_callback_that_is_not_callable_is_refused_before_the_prefill():
    model = HybridLM(tiny_config("M-"), seed=0)
    with pytest.raises(ValueError, match=r"^callback must be a function callback\(row, token\), got 3$"):
        generate(model, [1, 2], 3, callback=3)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_pipeline_stage_is_refused_as_not_the_whole_model(rank):
    """A stage failed inside the forward, naming nothing: "'NoneType' object is not subscriptable" (no final norm on
    the first stage), "'NoneType' object has no attribute 'weight'" (no embedding on the last)."""
    from hybridlm.parallel.pipeline import prune_to_stage

    config = tiny_config("M*-|G-")
    stage = prune_to_stage(HybridLM(config, seed=0), config.parsed.stage(rank, 2))
    with pytest.raises(ValueError, match=r"^generate needs the whole model, but this one is a pipeline stage"):
        generate(stage, [1, 2], 3)


@torch.no_grad()
def reference_logprobs(model, seq: list[int]) -> torch.Tensor:
    """(L, V) float64 log_softmax of the full forward over ``seq`` alone: row i scores token i + 1."""
    return torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)


@pytest.mark.parametrize("path", [dict(), dict(use_cache=False), dict(temperature=1.5, top_k=3, seed=1)])
@pytest.mark.parametrize("rows", [[[5, 6, 7, 8, 9], [3, 4]], [[3, 4]]])
def test_logprobs_are_the_raw_log_softmax_of_the_full_forward(path, rows):
    """Each picked token's logprob and the k most likely at its position, in a batch of rows of other lengths (left
    padded) and a row alone, cached or not: those of a float64 full forward over the row alone, whatever the
    sampler did to the logits (a temperature of 1.5 and top_k 3 change nothing here)."""
    model = HybridLM(tiny_config("M[*-]"), seed=0, dtype=torch.float64).eval()
    got: dict[int, list] = {}
    new = generate(model, rows, 4, **path, logprobs=3, callback=lambda r, t, lp: got.setdefault(r, []).append((t, lp)))
    assert new == generate(model, rows, 4, **path)  # (asking for them changes no token)
    for r, row in enumerate(rows):
        assert [t for t, _ in got[r]] == new[r]
        reference = reference_logprobs(model, row + new[r])
        for j, (token, scores) in enumerate(got[r]):
            expected = reference[len(row) - 1 + j]
            torch.testing.assert_close(scores.logprob, float(expected[token]), rtol=0, atol=1e-10)
            top = expected.topk(3)
            assert [i for i, _ in scores.top] == top.indices.tolist()
            torch.testing.assert_close([v for _, v in scores.top], top.values.tolist(), rtol=0, atol=1e-10)


def test_logprobs_zero_gives_the_picked_tokens_alone_and_needs_a_callback():
    model = HybridLM(tiny_config("M*-/-"), seed=0)
    for kwargs in (dict(use_cache=True), dict(use_cache=False), dict(speculative="mtp")):
        got = []
        generate(model, [1, 2], 2, logprobs=0, callback=lambda r, t, lp, got=got: got.append(lp), **kwargs)
        assert len(got) == 2 and all(lp.top == () and lp.logprob < 0 for lp in got), kwargs
    for kwargs, words in (
        (dict(), "logprobs are given to the callback"),
        (dict(callback=lambda r, t, lp: None, logprobs=-1), "logprobs must be >= 0"),
    ):
        with pytest.raises(ValueError, match=words):
            generate(model, [1, 2], 2, **{"logprobs": 1, **kwargs})


def test_prompts_prefilled_by_their_scoring_forward_decode_as_generate_prefills_them():
    """generate(prefilled=...) starts from prefill_scored's cache and last logits: greedy and seeded sampled tokens,
    and each token's logprobs, are those of generate's own prefill (float64: equal up to rounding far below any
    gap between candidates)."""
    from hybridlm.infer.logprobs import prefill_scored

    model = HybridLM(tiny_config("M[*-]G", position_embedding="rope"), seed=0, dtype=torch.float64).eval()
    prompts = [[5, 17, 3, 9, 9, 40, 2, 81], [7], [60, 1, 2]]
    for settings in ({}, {"temperature": 0.9, "top_k": 20, "seed": 3, "repetition_penalty": 1.3}):
        got, want = [], []
        for out, prefilled in ((got, prefill_scored(model, prompts, 2)[1:]), (want, None)):
            tokens = generate(
                model,
                prompts,
                6,
                callback=lambda r, t, s, out=out: out.append((r, t, s.top, round(s.logprob, 9))),
                logprobs=2,
                prefilled=prefilled,
                **settings,
            )
            out.append(tokens)
        assert got[-1] == want[-1] and all(len(row) == 6 for row in got[-1])
        assert [(r, t, [i for i, _ in top], lp) for r, t, top, lp in got[:-1]] == [
            (r, t, [i for i, _ in top], lp) for r, t, top, lp in want[:-1]
        ]


def test_a_prefilled_that_does_not_hold_the_prompts_is_refused_saying_what_differs():
    from hybridlm.infer.logprobs import prefill_scored

    model = HybridLM(tiny_config("M*"), seed=0).eval()
    prompts = [[5, 17, 3], [7, 8]]
    cache, last = prefill_scored(model, prompts, 1)[1:]
    with pytest.raises(ValueError, match=r"holds 2 row\(s\) of 3 position\(s\), but the prompts are 1 of at most 3"):
        generate(model, [prompts[0]], 2, prefilled=(cache, last))
    with pytest.raises(ValueError, match=r"holds 2 row\(s\) of 3 position\(s\), but the prompts are 2 of at most 4"):
        generate(model, [[5, 17, 3, 4], [7]], 2, prefilled=(cache, last))
    with pytest.raises(ValueError, match=r"logits must be a \(2, \d+\) tensor, got \(1, \d+\)"):
        generate(model, prompts, 2, prefilled=(cache, last[:1]))
    with pytest.raises(ValueError, match=r"prefilled must be \(cache, logits\)"):
        generate(model, prompts, 2, prefilled=[cache, last])
    for kwargs in ({"use_cache": False}, {"speculative": "mtp"}):
        with pytest.raises(ValueError, match="leave use_cache=True and speculative=None"):
            generate(HybridLM(tiny_config("M*/*"), seed=0).eval(), prompts, 2, prefilled=(cache, last), **kwargs)


def test_a_batch_of_prompts_that_begin_alike_runs_what_they_share_once_and_each_decodes_as_alone(monkeypatch):
    """generate's batch of prompts sharing 10 tokens (SHARED_PREFIX 5 here): the shared tokens run once, the rests
    after them; each row's greedy tokens are those it takes alone (float64), the stats count every
    prompt token, and prefill_chunk_size still bounds each forward."""
    from hybridlm.infer import prefixes

    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 5)
    model = HybridLM(tiny_config("M[*-]G", position_embedding="rope"), seed=0, dtype=torch.float64).eval()
    head = [5, 17, 3, 9, 9, 40, 2, 81, 7, 30]
    prompts = [[*head, 1, 2], [*head, 3], [4, 4]]
    shapes = record_forwards(monkeypatch, model)
    stats = {}
    got = generate(model, prompts, 4, stats=stats)
    assert sorted(s for s in shapes if s[1] > 1) == [(1, 2), (1, 2), (1, 10)], shapes  # [4, 4] alone; head; [1, 2]
    assert stats["prefill_tokens"] == 12 + 11 + 2
    shapes.clear()
    assert generate(model, prompts, 4, prefill_chunk_size=4) == got
    assert max(s[1] for s in shapes) == 4
    assert got == [generate(model, p, 4) for p in prompts]
