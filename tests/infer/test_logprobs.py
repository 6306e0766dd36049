"""Scoring a prompt: each token's logprob from a cached forward over the prompt, in chunks of positions."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.infer import logprobs
from hybridlm.infer.logprobs import prompt_logprobs, score_prompts
from tests.helpers import tiny_config
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
    with pytest.raises(ValueError, match="prompt position 0 are not finite"):
        prompt_logprobs(model, [1, 2, 3], 1)


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
    with pytest.raises(ValueError, match="prompt position 1 of prompt 2 are not finite"):
        score_prompts(model, [[1, 2, 3, 4, 5, 6], [9], [1, 2, 3]], 1)
