"""The Mamba2 core as one op (Triton: the interpreter on CPU, compiled on GPU) against the composition
of the conv, SSD and gated-norm ops it replaces: the same kernels in the same order, so equal bitwise,
outputs and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops.conv import causal_conv1d_reference
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.mamba2_core import Mamba2Dims, Mamba2Weights, mamba2_core, mamba2_core_torch
from hybridlm.ops.norm import gated_rms_norm_reference
from hybridlm.ops.ssd import ssd_reference
from tests.helpers import assert_rel_close, runs_triton_kernels

pytestmark = runs_triton_kernels
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def core_inputs(b, seqlen, h, p, g, n, K=4, dtype=torch.float32, device=DEV, seed=0):
    """zxbcdt (B, L, d_inner + conv_dim + h) and the parameters, as leaves that need gradients."""
    gen = torch.Generator().manual_seed(seed)
    d_inner = h * p
    conv_dim = d_inner + 2 * g * n
    zxbcdt = torch.randn(b, seqlen, d_inner + conv_dim + h, generator=gen).to(dtype)
    params = [
        torch.randn(conv_dim, 1, K, generator=gen) / 2,  # conv weight
        torch.randn(conv_dim, generator=gen) / 4,  # conv bias
        torch.randn(h, generator=gen) / 2,  # dt_bias
        torch.log(1 + 4 * torch.rand(h, generator=gen)),  # A_log
        torch.randn(h, generator=gen),  # D
        1 + 0.1 * torch.randn(d_inner, generator=gen),  # norm weight
    ]
    return [t.to(device).requires_grad_() for t in (zxbcdt, *params)]


def dims(h, p, g, n, chunk, clamp=0.0):
    return Mamba2Dims(h, p, g, n, chunk, norm_group_size=h * p // g, eps=1e-5, dt_clamp_min=clamp)


def documents(b, seqlen, device=DEV):
    seq = torch.zeros(b, seqlen, dtype=torch.long)
    seq[0, seqlen // 3 :] += 1
    seq[-1, seqlen - 2 :] += 1
    return seq.to(device)


def assert_equal_bitwise(b, seqlen, h, p, g, n, chunk, packed, clamp, dtype):
    leaves = core_inputs(b, seqlen, h, p, g, n, dtype=dtype)
    twins = [t.detach().clone().requires_grad_() for t in leaves]
    seq = documents(b, seqlen) if packed else None
    kw = dims(h, p, g, n, chunk, clamp)
    with use_kernels("triton"):
        reset_paths()
        fused = mamba2_core(leaves[0], Mamba2Weights(*leaves[1:]), seq, kw)
        assert paths_used()["mamba2_core"] == "triton"
        composed = mamba2_core_torch(
            twins[0], Mamba2Weights(*twins[1:]), seq, kw
        )  # the conv, SSD and norm ops, each on Triton
    assert fused.dtype == composed.dtype and torch.equal(fused, composed)
    dout = torch.randn_like(fused)
    names = ["zxbcdt", "conv weight", "conv bias", "dt_bias", "A_log", "D", "norm weight"]
    for name, got, want in zip(
        names, torch.autograd.grad(fused, leaves, dout), torch.autograd.grad(composed, twins, dout)
    ):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), f"d {name}: max |diff| {(got.float() - want.float()).abs().max().item():.3e}"


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("clamp", [0.0, 0.3])
def test_one_op_equals_the_composition_bitwise(packed, clamp):
    # L = 37: a partial chunk (16) and partial conv tiles; clamp 0.3 cuts part of the softplus.
    assert_equal_bitwise(2, 37, h=4, p=8, g=2, n=16, chunk=16, packed=packed, clamp=clamp, dtype=torch.float32)


def test_one_op_equals_the_composition_with_bf16_activations():
    # The interpreter stores the SSD's gradients in float32; the op then copies them into its buffer.
    assert_equal_bitwise(1, 20, h=2, p=8, g=1, n=16, chunk=8, packed=True, clamp=0.0, dtype=torch.bfloat16)


def test_an_override_of_one_part_sends_the_core_to_the_composition():
    leaves = core_inputs(1, 9, 2, 4, 1, 8)
    with use_kernels("triton,ssd=torch"):
        reset_paths()
        mamba2_core(leaves[0], Mamba2Weights(*leaves[1:]), None, dims(2, 4, 1, 8, 4))
    used = paths_used()
    assert used["mamba2_core"] == "torch" and used["ssd"] == "torch" and used["causal_conv1d"] == "triton"


def test_a_float64_core_computes_in_float64():
    """float64 activations beside the float32 A_log, D and dt_bias a float64 model keeps: the core equals the
    references (per-document conv, softplus, the step recurrence, the gated norm) in float64; dt = softplus(...)
    and A = -exp(A_log) were float32, and the scan and norm with them (1e-7 off)."""
    leaves = core_inputs(2, 21, 4, 8, 2, 16, dtype=torch.float64, device="cpu", seed=6)
    zxbcdt, conv_w, conv_b, dt_bias, A_log, D, norm_w = (t.detach() for t in leaves)
    conv_w, conv_b, norm_w = conv_w.double(), conv_b.double(), norm_w.double()
    kw, seq = dims(4, 8, 2, 16, chunk=8, clamp=0.3), documents(2, 21, "cpu")
    got = mamba2_core(zxbcdt, Mamba2Weights(conv_w, conv_b, dt_bias, A_log, D, norm_w), seq, kw)
    z, xBC, dt = kw.split(zxbcdt)
    x, B, C = kw.split_scan(causal_conv1d_reference(xBC, conv_w, conv_b, seq, "silu"))
    dt = F.softplus(dt + dt_bias.double()).clamp(min=0.3)
    y, _ = ssd_reference(x, dt, -torch.exp(A_log.double()), B, C, D=D.double(), seq_idx=seq)
    assert got.dtype == torch.float64
    assert_rel_close(got, gated_rms_norm_reference(y.flatten(-2), z, norm_w, kw.norm_group_size, kw.eps), 1e-12)


def test_widths_that_do_not_add_up_are_refused():
    leaves = core_inputs(1, 5, 2, 4, 1, 8)
    with pytest.raises(ValueError, match=r"z 8 \+ xBC 24 \+ dt 2"):
        mamba2_core(leaves[0][..., :-1], Mamba2Weights(*leaves[1:]), None, dims(2, 4, 1, 8, 4))


def test_custom_ops_pass_opcheck():
    from hybridlm.ops import mamba2_core_triton as core

    zxbcdt, w, cb, dtb, A_log, D, nw = core_inputs(1, 11, 2, 4, 1, 8, seed=3)
    seq = torch.tensor([[0] * 5 + [1] * 6], device=DEV)
    flat = dims(2, 4, 1, 8, 4).as_floats()
    args = [zxbcdt, w.detach().reshape(w.shape[0], -1).requires_grad_(), cb, dtb, A_log, D, nw, seq, flat]
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(core._core_fwd, args, test_utils=checks)
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    out, *saved = core._core_fwd(*plain)
    bwd_args = [torch.randn_like(out), *plain[:8], *saved, flat]
    torch.library.opcheck(core._core_bwd, bwd_args, test_utils=checks)


def test_compiled_equals_eager():
    leaves = core_inputs(1, 12, 2, 4, 1, 8, seed=4)
    seq = documents(1, 12)
    kw = dims(2, 4, 1, 8, 4)

    def fn(*ts):
        return mamba2_core(ts[0], Mamba2Weights(*ts[1:]), seq, kw)

    torch._dynamo.reset()
    with use_kernels("triton"):
        eager = fn(*leaves)
        compiled = torch.compile(fn, fullgraph=True)(*leaves)
    assert torch.equal(compiled, eager)
    dout = torch.randn_like(eager)
    for got, want in zip(torch.autograd.grad(compiled, leaves, dout), torch.autograd.grad(eager, leaves, dout)):
        assert torch.equal(got, want)


def test_backward_under_activation_checkpointing():
    """Non-reentrant checkpointing (the trainer's) lets a backward unpack its saved tensors once: the
    op's backward had read them three times, a CheckpointError in every eager GPU run with
    ``train.activation_checkpointing``. Recomputed, the gradients are the plain ones, bitwise."""
    from torch.utils.checkpoint import checkpoint

    leaves = core_inputs(1, 12, 2, 4, 1, 8, seed=5)
    seq, kw = documents(1, 12), dims(2, 4, 1, 8, 4)

    def fn(*ts):
        return mamba2_core(ts[0], Mamba2Weights(*ts[1:]), seq, kw)

    with use_kernels("triton"):
        plain = fn(*leaves)
        recomputed = checkpoint(fn, *leaves, use_reentrant=False)
        dout = torch.randn_like(plain)
        want = torch.autograd.grad(plain, leaves, dout)
        got = torch.autograd.grad(recomputed, leaves, dout)
    assert torch.equal(recomputed, plain)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_one_op_equals_the_composition_at_bench_width():
    # bench-1.3b's mixer (64 heads of 64, 8 groups, state 128, chunk 128) at L = 4096, bf16, packed.
    assert_equal_bitwise(2, 4096, h=64, p=64, g=8, n=128, chunk=128, packed=True, clamp=0.0, dtype=torch.bfloat16)
