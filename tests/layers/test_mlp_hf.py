"""``-`` with SwiGLU against transformers' LlamaMLP, weights loaded by name.

relu² and GELU are NemotronH's MLPs, compared with transformers' whole model in
tests/checkpoint/test_hf_nemotron.py; SwiGLU (``down(silu(gate(x)) * up(x))``) is Llama's, which
NemotronH cannot export, so it is compared here: float64, forward and backward.
"""

import pytest
import torch

ml = pytest.importorskip("transformers.models.llama.modeling_llama")
from transformers import LlamaConfig  # noqa: E402

from hybridlm.layers import MLP  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402
from tests.layers.test_mixers import make  # noqa: E402


def test_swiglu_matches_llama_mlp():
    cfg = tiny_config("-", mlp_activation="swiglu", ffn_hidden_size=40)
    ours = make(MLP, cfg, seed=1).double()
    hcfg = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=40, hidden_act="silu", mlp_bias=False)
    theirs = ml.LlamaMLP(hcfg).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # gate_proj, up_proj, down_proj: the same roles
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, cfg.hidden_size, dtype=torch.float64, generator=gen)
    w = torch.randn(2, 7, cfg.hidden_size, dtype=torch.float64, generator=gen)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    actual, expected = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    (actual * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-12, atol=1e-12)
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, their_params[name].grad, rtol=1e-12, atol=1e-12, msg=name)
