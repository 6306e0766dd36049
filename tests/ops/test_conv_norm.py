"""Causal conv and the norms against float64 references."""

import pytest
import torch

from hybridlm.ops.conv import causal_conv1d, causal_conv1d_reference
from hybridlm.ops.norm import add_rms_norm, gated_rms_norm, gated_rms_norm_reference, rms_norm, rms_norm_reference
from tests.helpers import assert_rel_close
from tests.ops.test_ssd import docs


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kernel", [2, 4])
def test_causal_conv(packed, kernel):
    x = torch.randn(2, 23, 6, requires_grad=True)
    w = torch.randn(6, 1, kernel, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    seq_idx = docs(2, 23, seed=kernel) if packed else None
    y = causal_conv1d(x, w, b, seq_idx, "silu")
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y_ref = causal_conv1d_reference(*leaves, seq_idx, "silu")
    assert_rel_close(y, y_ref, 1e-6, "conv")
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    for name, t, r in zip("xwb", (x, w, b), leaves):
        assert_rel_close(t.grad, r.grad, 1e-6, f"grad {name}")


def test_conv_matches_nn_conv1d():
    x = torch.randn(3, 17, 5)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3)
    expected = conv(x.transpose(1, 2))[..., :17].transpose(1, 2)
    assert_rel_close(causal_conv1d(x, conv.weight, conv.bias), expected, 1e-6, "vs nn.Conv1d")


def test_rms_norms():
    x = torch.randn(4, 7, 16)
    w = torch.randn(16)
    assert_rel_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), 1e-6, "rms_norm")
    d = torch.randn_like(x)
    h, n = add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(h, x + d) and torch.equal(n, rms_norm(x + d, w, 1e-5))
    z = torch.randn_like(x)
    got = gated_rms_norm(x, z, w, group_size=4, eps=1e-5)
    g = (x * torch.nn.functional.silu(z)).double().view(4, 7, 4, 4)
    ref = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).view(4, 7, 16) * w.double()
    assert_rel_close(got, ref, 1e-6, "gated_rms_norm")
    # The group size matters: a norm over all channels differs.
    assert (gated_rms_norm(x, z, w, 16, 1e-5) - got).abs().max() > 1e-3


def test_rms_norms_of_float64_inputs_compute_in_float64():
    """A float64 model is a reference: its norms were computed in float32 (1e-7 off), whatever the input.
    The weight stays float32 as a float64 model keeps Mamba's parameters (it holds exact float32 values)."""
    x, z, d = (torch.randn(4, 7, 16, dtype=torch.float64) for _ in range(3))
    w = 1 + 0.3 * torch.randn(16)
    got = rms_norm(x, w, 1e-5)
    assert got.dtype == torch.float64
    assert_rel_close(got, rms_norm_reference(x, w.double(), 1e-5), 1e-14, "rms_norm")
    _, n = add_rms_norm(x, d, w.double(), 1e-5)
    assert_rel_close(n, rms_norm_reference(x + d, w.double(), 1e-5), 1e-14, "add_rms_norm")
    got = gated_rms_norm(x, z, w, group_size=4, eps=1e-5)
    assert got.dtype == torch.float64
    assert_rel_close(got, gated_rms_norm_reference(x, z, w, 4, 1e-5), 1e-14, "gated_rms_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_centered_rms_norms_scale_by_one_plus_the_weight(dtype):
    """Zero-centred (Megatron's layernorm_zero_centered_gamma): ``(1 + w) * x / rms(x)``, against float64, with
    gradients; the plain and fused norms alike."""
    x, d = (torch.randn(4, 7, 16, dtype=dtype) for _ in range(2))
    w = (0.3 * torch.randn(16)).to(dtype).requires_grad_()
    got = rms_norm(x, w, 1e-5, zero_centered=True)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-14}[dtype]
    assert got.dtype == dtype
    assert_rel_close(got, rms_norm_reference(x.double(), w.detach(), 1e-5, zero_centered=True), tol, "rms_norm")
    h, n = add_rms_norm(x, d, w, 1e-5, zero_centered=True)
    assert torch.equal(n, rms_norm(h, w, 1e-5, zero_centered=True))
    wd = w.detach().double().requires_grad_()
    (rms_norm(x, w, 1e-5, zero_centered=True).double() * x.double()).sum().backward()
    (rms_norm_reference(x.double(), wd, 1e-5, zero_centered=True) * x.double()).sum().backward()
    assert w.grad.dtype == dtype
    assert_rel_close(w.grad, wd.grad, tol, "grad w")


def test_zero_centered_scale_of_a_bf16_weight_is_added_in_float32():
    """In bf16, 1 + 2^-10 rounds to 1 (its spacing above 1 is 2^-7): the scale is formed in float32, the dtype
    the norm computes in, so a small trained w still counts (Transformer Engine adds in float32 too)."""
    x = torch.randn(3, 8)
    w = torch.full((8,), 2.0**-10, dtype=torch.bfloat16)
    expected = rms_norm(x, torch.full((8,), 1 + 2.0**-10), 1e-5)  # the plain norm of that float32 scale
    assert torch.equal(rms_norm(x, w, 1e-5, zero_centered=True), expected)
    assert torch.equal(add_rms_norm(x, torch.zeros_like(x), w, 1e-5, zero_centered=True)[1], expected)
    assert not torch.equal(expected, rms_norm(x, torch.ones(8), 1e-5))  # (the case shows a rounded 1 + w)


def test_misshaped_conv_and_norm_inputs_are_refused_by_name_on_the_torch_path():
    """The torch paths broadcast what the Triton kernels refuse: a (1, L) seq_idx applied row 0's documents to
    every row, a (1,) bias or (1, K) weight served every channel, a (D,) gate or one-row delta every row, and a
    group size that does not divide D failed inside a reshape; each is now refused by name on every path."""
    x, w = torch.randn(2, 6, 3), torch.randn(3, 4)
    for kwargs, says in (
        (dict(seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1]])), r"seq_idx must be \(B, L\) = \(2, 6\)"),
        (dict(bias=torch.randn(1)), r"bias must be \(3,\)"),
        (dict(weight=torch.randn(1, 4)), "weight must be"),
        (dict(x=x[0]), r"x must be \(B, L, C\)"),
    ):
        args = {"x": x, "weight": w, **kwargs}
        with pytest.raises(ValueError, match=says):
            causal_conv1d(**args)
    y = torch.randn(2, 3, 8)
    for z, weight, group, says in (
        (torch.randn(8), torch.ones(8), 4, "gated_rms_norm"),
        (y, torch.ones(1), 4, "gated_rms_norm"),
        (y, torch.ones(8), 3, "D divisible by group_size"),
    ):
        with pytest.raises(ValueError, match=says):
            gated_rms_norm(y, z, weight, group, 1e-5)
    with pytest.raises(ValueError, match="add_rms_norm"):
        add_rms_norm(y, torch.randn(1, 3, 8), torch.ones(8), 1e-5)
