"""Scoring a prompt: each token's logprob from a cached forward over the prompt, in chunks of positions."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.infer import logprobs
from hybridlm.infer.logprobs import prompt_logprobs
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
