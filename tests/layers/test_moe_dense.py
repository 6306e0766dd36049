"""The MoE experts' graph-capturable path (every expert on every row) equals the per-expert loop."""

import pytest
import torch

from hybridlm import ModelConfig
from hybridlm.layers.moe import Experts


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_dense_experts_equal_the_loop(activation):
    config = ModelConfig.preset("tiny").replace(mlp_activation=activation)
    experts = Experts(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    counts = torch.tensor([3, 0, 5, 2][: experts.down_proj.shape[0]])
    xs = torch.randn(int(counts.sum()), config.hidden_size, generator=gen)
    loop = experts(xs, counts)
    dense = experts.dense(xs, counts)
    torch.testing.assert_close(dense, loop, rtol=1e-6, atol=1e-6)
