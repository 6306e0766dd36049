"""Precision contracts that hold under autocast (checked with CPU bf16 autocast here, on CUDA in test_gpu)."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.layers.moe import Router
from hybridlm.ops.precision import LOG_DECAY_FLOOR, accumulation_dtype, matmul_dtype
from tests.helpers import MLA_TINY, tiny_config


def test_router_logits_stay_float32_under_autocast():
    config = tiny_config("E", hidden_size=64, moe_num_experts=16, moe_top_k=4)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(257, 64)
    exact_scores, _, exact_idx = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, w, idx = router(x)
    assert scores.dtype == torch.float32 and w.dtype == torch.float32
    # Computed in float32 inside autocast: the same routing as without autocast.
    assert torch.equal(idx, exact_idx)
    torch.testing.assert_close(scores, exact_scores, rtol=0, atol=0)


def test_matmul_dtype_follows_cpu_autocast():
    """Guards against matmul_dtype ignoring autocast (fp32 head/expert matmuls under bf16 autocast)."""
    x = torch.randn(4, 8)
    assert matmul_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_dtype(x) == torch.bfloat16
    assert matmul_dtype(x.to(torch.float64)) == torch.float64


def test_the_log_decay_floor_clamps_only_decays_float32_already_makes_zero():
    """The Triton scans clamp a step's log-decay at -LOG_DECAY_FLOOR, which changes no result only because the
    decay across such a step is 0 in float32 either way: at a floor of 20 the clamp let 2e-9 of every earlier
    position through a step that resets the state (g = -inf), and no kernel test can see that."""
    assert torch.exp(torch.tensor(-LOG_DECAY_FLOOR, dtype=torch.float32)) == 0


def test_accumulation_dtype_is_float64_only_for_float64():
    """The plain-torch ops' rule: float32 for every lower precision, float64 once any input is float64."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert accumulation_dtype(torch.zeros(1, dtype=dtype)) == accumulation_dtype(dtype) == torch.float32
    assert accumulation_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    assert accumulation_dtype(torch.zeros(1, dtype=torch.bfloat16), None, torch.float64) == torch.float64
    assert accumulation_dtype() == accumulation_dtype(None) == torch.float32


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("M", {"A_log", "D", "dt_bias"}),  # Mamba2's decay, skip and step bias, as Megatron keeps them
        ("G", {"A_log", "dt_bias"}),
        ("D", {"indexer.weights_proj.weight", "indexer.k_norm.weight", "indexer.k_norm.bias"}),
    ],
)
def test_a_bf16_model_keeps_exactly_these_mixer_parameters_in_float32(pattern, names):
    """Listed by hand (not read back from ``keep_fp32``), so dropping a name from a mixer's list shows."""
    model = HybridLM(tiny_config(pattern, **(MLA_TINY if pattern == "D" else {})), dtype=torch.bfloat16)
    mixer = model.blocks["0"].layers[0].mixer
    dtypes = {n: p.dtype for n, p in mixer.named_parameters()}
    assert {n for n, d in dtypes.items() if d == torch.float32} == names
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n not in names)


def test_an_mtp_depth_keeps_a_float32_residual_stream_under_autocast():
    """The depth's blocks get a float32 residual stream, as the main model's blocks do (eh_proj's bf16 output made
    every block of the depth add in bf16): its logits are then about as far from float64 as the main head's."""
    model = HybridLM(tiny_config("M-*-G-/M-*-G-", vocab_size=257, hidden_size=64), seed=1)
    ids = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(1))
    seen = []
    hook = model.mtp[0].blocks["0"].register_forward_pre_hook(lambda block, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    hook.remove()
    with torch.no_grad():
        exact = model.double()(ids)
    assert seen == [torch.float32]

    def err(a, b):
        return float((a.double() - b).norm() / b.norm())

    # Measured: 1.05x with a float32 stream, 1.34x with the bf16 one.
    assert err(out.mtp_logits[0], exact.mtp_logits[0]) < 1.2 * err(out.logits, exact.logits)
