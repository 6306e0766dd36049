"""The MoE layer's load-balancing loss against its formula, computed here from the router weight alone."""

import pytest
import torch

from hybridlm import ModelConfig
from hybridlm.layers.moe import MoE


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_is_the_switch_formula(score):
    """coeff * E * sum_e f_e * P_e, with f_e the share of the T * k routed pairs that go to expert e and P_e
    the mean over tokens of e's probability (sigmoid scores normalised over experts first). Tests compared
    the loss only with itself: a loss k times too large, or unnormalised sigmoid scores, passed."""
    config = ModelConfig.preset("tiny").replace(
        moe_num_experts=6, moe_top_k=2, moe_router_score=score, moe_aux_loss_coeff=0.01, moe_router_expert_bias=False
    )
    layer = MoE(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 9, config.hidden_size, generator=gen)
    aux_losses = []
    layer(x, None, aux_losses)
    (aux,) = aux_losses

    logits = x.reshape(-1, config.hidden_size) @ layer.gate.weight.T
    probs = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    chosen = probs.topk(2, dim=-1).indices  # no bias, no groups: the two best scores
    probs = probs / probs.sum(-1, keepdim=True)
    share = torch.bincount(chosen.reshape(-1), minlength=6).double() / (18 * 2)
    expected = 0.01 * 6 * (share * probs.double().mean(0)).sum()
    torch.testing.assert_close(aux.double(), expected, rtol=1e-6, atol=0)
