"""Sampling without a cache."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.infer.generate import generate
from tests.helpers import tiny_config


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
    for prompt in ("hello", [1.7, 2.2]):
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
        (dict(prefill_chunk_size=1.5), "prefill_chunk_size must be an integer"),
        (dict(eos_id=[2, 3]), r"eos_id must be an integer, got \[2, 3\]"),
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
        (with_mtp, dict(temperature=1.0), "greedy only"),
        (with_mtp, dict(repetition_penalty=1.5), "greedy only"),
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
