"""Scoring a prompt: each token's logprob from a cached forward over the prompt, in chunks of positions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm import HybridLM
from hybridlm.errors import NonFiniteLogitsError
from hybridlm.infer import logprobs, prefixes
from hybridlm.infer.logprobs import prompt_logprobs, score_prompts
from tests.helpers import record_forwards, tiny_config
from tests.infer.test_cache import BF16_PATTERNS
from tests.infer.test_decode import PATTERNS, model64
from tests.infer.test_generate import reference_logprobs


@pytest.mark.parametrize("budget", [logprobs.LOGITS_BUDGET, 3 * 97])  # one chunk; chunks of 3 positions
def test_a_prompts_logprobs_are_the_full_forwards_in_any_chunks(monkeypatch, budget):
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET", budget)
    model = HybridLM(tiny_config("M[*-]G"), seed=0, dtype=torch.float64).eval()
    prompt = [5, 17, 3, 9, 9, 40, 2, 81]
    got = prompt_logprobs(model, prompt, 2)
    reference = reference_logprobs(model, prompt)
    assert len(got) == len(prompt) and got[0] is None
    for i, scores in enumerate(got[1:]):
        torch.testing.assert_close(scores.logprob, float(reference[i, prompt[i + 1]]), rtol=0, atol=1e-10)
        assert [t for t, _ in scores.top] == reference[i].topk(2).indices.tolist()
    assert prompt_logprobs(model, [7], 2) == [None]


def test_a_prompt_whose_logits_are_not_finite_is_refused_naming_the_position():
    model = HybridLM(tiny_config("M-"), seed=0).eval()
    with torch.no_grad():
        model.norm_f.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError, match=r"^prompt 0: the logits at prompt position 0 are not finite") as e:
        prompt_logprobs(model, [1, 2, 3], 1)
    assert e.value.row == 0


@pytest.mark.parametrize("budget", [logprobs.LOGITS_BUDGET, 4 * 97 * 2])  # one chunk; chunks of 2 positions
def test_prompts_scored_together_are_each_one_scored_alone(monkeypatch, budget):
    """One left-padded forward for prompts of several lengths (none, one token, more) gives each prompt's own
    scores: the float64 full forward of that prompt alone, its top k in order."""
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET", budget)
    model = HybridLM(tiny_config("M[*-]G"), seed=0, dtype=torch.float64).eval()
    prompts = [[5, 17, 3, 9, 9, 40, 2, 81], [], [7], [60, 1, 2], [33, 34]]
    got = score_prompts(model, prompts, 3)
    assert [len(g) for g in got] == [len(p) for p in prompts] and all(g[0] is None for g in got if g)
    for prompt, scores in zip(prompts, got):
        if len(prompt) < 2:
            continue
        reference = reference_logprobs(model, prompt)
        for i, s in enumerate(scores[1:]):
            torch.testing.assert_close(s.logprob, float(reference[i, prompt[i + 1]]), rtol=0, atol=1e-10)
            top = reference[i].topk(3)
            assert [t for t, _ in s.top] == top.indices.tolist()
            torch.testing.assert_close([v for _, v in s.top], top.values.tolist(), rtol=0, atol=1e-10)


def test_a_batched_prompt_whose_logits_are_not_finite_is_named_by_prompt_and_position(monkeypatch):
    """Non-finite logits in one row of the batch name that prompt and the position in it (not the padded one)."""
    model = HybridLM(tiny_config("M-"), seed=0).eval()
    forward = type(model).forward

    def poisoned(self, ids, *a, **k):  # the second row's logits at its own position 1 become NaN
        out = forward(self, ids, *a, **k)
        out.logits[1, 4] = float("nan")  # its inputs are [1, 2] after 3 pads: padded position 4 is its position 1
        return out

    monkeypatch.setattr(type(model), "forward", poisoned)
    with pytest.raises(NonFiniteLogitsError, match=r"^prompt 2: the logits at prompt position 1 are not finite"):
        score_prompts(model, [[1, 2, 3, 4, 5, 6], [9], [1, 2, 3]], 1)


def test_a_non_finite_position_in_a_later_chunk_is_named_from_the_prompts_start(monkeypatch):
    """Chunks of 2 positions; token 9's embedding NaN makes position 4 (where it is) and those after it NaN: position 4
    is named, not 0 (its place in its chunk)."""
    model = HybridLM(tiny_config("M-"), seed=0).eval()
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET", 2 * model.config.vocab_size)
    with torch.no_grad():
        model.embeddings.weight[9] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="prompt position 4 are not finite"):
        prompt_logprobs(model, [1, 2, 3, 4, 9, 5, 6], 1)


def test_a_training_model_scores_in_eval_mode_and_is_left_training():
    """In eval mode: a trainer's expert-load counters (which count training forwards only) count none of it."""
    from hybridlm.train.expert_load import ExpertLoad

    model = HybridLM(tiny_config("ME"), seed=0).train()
    ExpertLoad(model)
    assert len(prompt_logprobs(model, [1, 2, 3], 1)) == 3 and model.training
    assert all(int(m.tokens_per_expert.sum()) == 0 for m in model.modules() if hasattr(m, "tokens_per_expert"))


def test_bfloat16_logits_are_scored_in_float32():
    """A bf16 model's logits: log_softmax in float32 (as generate's sampler computes), not in bf16, whose 8 bits of
    mantissa round a logprob of -3.01 to -3.0."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tokens = torch.tensor([4, 0, 49])
    chosen, values, ids = logprobs.pick_logprobs(logits, tokens, 2)
    expected = torch.log_softmax(logits.float(), -1)
    assert chosen.dtype == values.dtype == torch.float32
    torch.testing.assert_close(chosen, expected[torch.arange(3), tokens], rtol=0, atol=0)
    torch.testing.assert_close(values, expected.topk(2).values, rtol=0, atol=0)
    assert torch.equal(ids, expected.topk(2).indices)


def decodes_as_alone(model, prompts, cache, last, new_tokens: int) -> None:
    """``cache`` and ``last`` hold ``prompts`` prefilled (float64): the last logits are each prompt's full forward's,
    and a decode batch that takes them decodes each prompt as generate decodes it alone."""
    from hybridlm import generate
    from hybridlm.infer.decode import DecodeBatch
    from hybridlm.infer.generate import Sampler

    n = len(prompts)
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            torch.testing.assert_close(last[r], model(torch.tensor([prompt])).logits[0, -1], rtol=0, atol=1e-10)
        batch = DecodeBatch(model, n, 0, Sampler())
        rows = batch.admit(prompts, [new_tokens] * n, [None] * n, prefilled=(cache, last))
        while batch.live:
            batch.step()
    assert [row.out for row in rows] == [generate(model, p, new_tokens) for p in prompts]


@pytest.mark.parametrize("budget", [logprobs.LOGITS_BUDGET, 4 * 97 * 2])  # one chunk; chunks of 2 positions
def test_prefill_scored_scores_as_score_prompts_and_leaves_the_prompts_prefilled(monkeypatch, budget):
    """One forward over the whole prompts gives score_prompts' scores, the last positions' logits (the full
    forward's), and a cache that a decode batch takes them from: they decode as generate decodes them alone."""

    monkeypatch.setattr(logprobs, "LOGITS_BUDGET", budget)
    model = HybridLM(tiny_config("M[*-]G", position_embedding="rope"), seed=0, dtype=torch.float64).eval()
    prompts = [[5, 17, 3, 9, 9, 40, 2, 81], [7], [60, 1, 2]]
    scored, cache, last = logprobs.prefill_scored(model, prompts, 3)
    want = score_prompts(model, prompts, 3)
    for got_row, want_row in zip(scored, want, strict=True):
        assert len(got_row) == len(want_row) and got_row[0] is None
        for g, w in zip(got_row[1:], want_row[1:]):
            assert [t for t, _ in g.top] == [t for t, _ in w.top]
            torch.testing.assert_close(g.logprob, w.logprob, rtol=0, atol=1e-12)
    decodes_as_alone(model, prompts, cache, last, 5)


def _brute_force_groups(prompts, minimum):
    """Which prompts share at least ``minimum`` tokens and have one more: the pairs, by brute force."""
    pairs = set()
    for a in range(len(prompts)):
        for b in range(a + 1, len(prompts)):
            x, y = prompts[a], prompts[b]
            common = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            if common >= minimum and min(len(x), len(y)) > minimum:
                pairs.add((a, b))
    return pairs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), max_size=7), max_size=9), st.integers(1, 3))
def test_shared_prefixes_group_exactly_the_prompts_that_share_one(prompts, minimum):
    """Each group's members begin with its p >= minimum tokens and hold one more; two prompts are in one group
    exactly when they share at least minimum tokens and each has more."""
    groups = prefixes.shared_prefixes(prompts, minimum)
    grouped = set()
    for p, members in groups:
        assert p >= minimum and len(members) >= 2 and members == sorted(members)
        assert all(prompts[r][:p] == prompts[members[0]][:p] and len(prompts[r]) > p for r in members)
        grouped |= {(a, b) for a in members for b in members if a < b}
    assert sum(len(m) for _, m in groups) == len({r for _, m in groups for r in m})  # in one group at most
    assert grouped == _brute_force_groups(prompts, minimum)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prompts_that_share_a_prefix_run_it_once_and_score_and_decode_as_each_alone(monkeypatch, pattern):
    """A shared prefix runs once (the prefixes as one batch, then each rest from a copy of its prefix's states):
    each prompt's scores are still its float64 full forward's, and prefill_scored's cache decodes each prompt as
    generate decodes it alone, for every cached state kind (Mamba2, GDN, attention KV, MLA, DSA): two groups of
    rests of several lengths (one prompt a prefix of another, two equal), and prompts that share nothing."""

    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 5)
    model = model64(pattern)
    head, other = [5, 17, 3, 9, 9, 40, 2], [60, 1, 2, 3, 4]
    prompts = [
        [*head, 81, 7],
        [11, 12],
        [*head, 81, 7, 30, 31],
        [*other, 9],
        [*head, 8],
        [*other, 9],
        head,
        [5, 17, 3, 9, 9, 40, 2, 81, 7, 30],
    ]
    assert prefixes.shared_prefixes(prompts, 5) == [(6, [0, 2, 4, 6, 7]), (5, [3, 5])]  # (6: prompt 6 needs a rest)
    forwards = record_forwards(monkeypatch, model)
    scored, cache, last = logprobs.prefill_scored(model, prompts, 3)
    # the prompt alone, the two prefixes (one batch), then the rests by length (5, 3, 2, 1: both groups', 4)
    assert sorted(forwards) == sorted([(1, 2), (2, 6), (1, 5), (1, 3), (1, 2), (3, 1), (1, 4)]), forwards
    assert cache.offset == 11 and tuple(last.shape) == (8, model.config.vocab_size)
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            reference = reference_logprobs(model, prompt)
            assert len(scored[r]) == len(prompt) and scored[r][0] is None
            for i, s in enumerate(scored[r][1:]):
                torch.testing.assert_close(s.logprob, float(reference[i, prompt[i + 1]]), rtol=0, atol=1e-10)
                assert [t for t, _ in s.top] == reference[i].topk(3).indices.tolist()
    decodes_as_alone(model, prompts, cache, last, 4)
    # prefill_shared: the same without scoring (the head on each forward's last position only)
    forwards.clear()
    cache, last = prefixes.prefill_shared(model, prompts)
    assert sorted(forwards) == sorted([(1, 2), (2, 6), (1, 5), (1, 3), (1, 2), (3, 1), (1, 4)]), forwards
    decodes_as_alone(model, prompts, cache, last, 4)
    assert prefixes.prefill_shared(model, [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8], [9]]) is None  # 4 shared: < 5
    # score_prompts shares them too (its inputs are the prompts but their last tokens): the same scores
    for got, want in zip(score_prompts(model, prompts, 3), scored, strict=True):
        assert got[0] is None and [s.top[0][0] for s in got[1:]] == [s.top[0][0] for s in want[1:]]
        torch.testing.assert_close([s.logprob for s in got[1:]], [s.logprob for s in want[1:]], rtol=0, atol=1e-10)


def test_non_finite_logits_in_the_rest_after_a_shared_prefix_are_named_by_prompt_and_its_own_position(monkeypatch):
    """A position in a member's rest (run after the shared prefix) is named counted from its prompt's start."""
    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 3)
    model = HybridLM(tiny_config("M-"), seed=0).eval()
    forward = type(model).forward

    def poisoned(self, ids, *a, **k):  # the rests of length 3 (prompt 2's): their second position
        out = forward(self, ids, *a, **k)
        if ids.shape == (1, 3):
            out.logits[0, 1] = float("nan")
        return out

    monkeypatch.setattr(type(model), "forward", poisoned)
    with pytest.raises(NonFiniteLogitsError, match=r"^prompt 2: the logits at prompt position 5 are not finite"):
        logprobs.prefill_scored(model, [[1, 2, 3, 4, 5], [9, 9], [1, 2, 3, 4, 7, 8, 6]], 1)


def shared_errors(pattern: str, device: str, length: int, rest: int) -> tuple[float, float, float]:
    """A bf16 model (realistic head sizes) scores and prefills 3 prompts of ``length`` tokens that share all but
    their last ``rest`` with their prefix run once. Returns the relative errors against the float64 forward of the
    same rounded weights: of the shared path's scored log-probabilities (every position of every prompt), of its
    prefill's last logits, and of the full bf16 forward's log-probabilities."""
    import copy

    from hybridlm import ModelConfig
    from tests.helpers import rel_err
    from tests.infer.test_cache import REALISTIC

    cfg = ModelConfig(pattern=pattern, **REALISTIC)
    model = HybridLM(cfg, seed=3, device=device).cast(torch.bfloat16).eval()
    reference = copy.deepcopy(model).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(0, cfg.vocab_size, (length - rest,), generator=gen).tolist()
    prompts = [head + torch.randint(0, cfg.vocab_size, (rest,), generator=gen).tolist() for _ in range(3)]
    assert prefixes.shared_prefixes(prompts, prefixes.SHARED_PREFIX) == [(length - rest, [0, 1, 2])]
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        want = torch.log_softmax(reference(ids).logits.double(), -1)  # (3, L, V)
        full = torch.log_softmax(model(ids).logits.double(), -1)
    targets = ids[:, 1:, None]
    want_picked, full_picked = want[:, :-1].gather(-1, targets)[..., 0], full[:, :-1].gather(-1, targets)[..., 0]
    scored, _, _ = logprobs.prefill_scored(model, prompts, 1)
    got = torch.tensor([[s.logprob for s in row[1:]] for row in scored], dtype=torch.float64, device=device)
    _, last = prefixes.prefill_shared(model, prompts)
    err_last = rel_err(torch.log_softmax(last.double(), -1), want[:, -1])
    return rel_err(got, want_picked), err_last, rel_err(full_picked, want_picked)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", BF16_PATTERNS)
def test_bf16_prompts_sharing_a_4096_token_prefix_are_as_close_to_float64_as_the_full_forward_on_gpu(pattern):
    """Three 4,096-token prompts that share 4,000 tokens (the prefix once, the rests from its copied states; the GPU
    kernels): their scores and last logits within 1.5x the full bf16 forward's error against float64, plus half a
    bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    err_scored, err_last, err_full = shared_errors(pattern, "cuda", 4096, 96)
    print(f"{pattern} bf16, shared 4000 of 4096: scored {err_scored:.3g}, last {err_last:.3g}, full {err_full:.3g}")
    assert err_scored <= 1.5 * err_full + 2e-3 and err_last <= 1.5 * err_full + 2e-3, (err_scored, err_last, err_full)


@pytest.mark.parametrize("pattern", BF16_PATTERNS)
def test_bf16_prompts_sharing_a_prefix_are_as_close_to_float64_as_the_full_forward_on_cpu(pattern):
    """The same check as the GPU one at a short length on the CPU's torch paths."""
    err_scored, err_last, err_full = shared_errors(pattern, "cpu", 80, 8)
    assert err_scored <= 1.5 * err_full + 2e-3 and err_last <= 1.5 * err_full + 2e-3, (err_scored, err_last, err_full)
