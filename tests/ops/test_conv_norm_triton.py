"""Triton causal conv and norms against float64 references (Triton's interpreter on CPU, compiled on GPU).

The small tests run on CUDA when there is a device, else in the interpreter on CPU. They use float32 inputs: the interpreter rounds float32 -> bf16 by truncation (the GPU rounds
to nearest), so bf16 behaviour is tested on the GPU only (``gpu`` marker), at realistic sizes.
"""

import pytest
import torch

from hybridlm.ops.conv import causal_conv1d, causal_conv1d_reference
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.norm import (
    add_rms_norm,
    gated_rms_norm,
    gated_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    rms_norm_then_gate,
    rms_norm_then_gate_reference,
)
from tests.helpers import assert_bf16_within, assert_rel_close, runs_triton_kernels

pytestmark = runs_triton_kernels
EPS = 1e-5
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def packed_ids(b: int, seqlen: int, device=None) -> torch.Tensor:
    """(b, seqlen) document ids: row 0 resets at position 1 and at the last position, the others
    hold several documents of random lengths (seeded)."""
    gen = torch.Generator().manual_seed(seqlen)
    rows = [torch.zeros(seqlen, dtype=torch.long)]
    rows[0][1:] += 1
    rows[0][seqlen // 2 :] += 1
    rows[0][-1] += 1
    for _ in range(b - 1):
        row = torch.zeros(seqlen, dtype=torch.long)
        for cut in torch.randint(1, seqlen, (4,), generator=gen).tolist():
            row[cut:] += 1
        rows.append(row)
    return torch.stack(rows).to(device)


def grads(out, inputs, dout):
    """Gradients of ``(out * dout).sum()`` for the inputs that are not None."""
    outs = out if isinstance(out, tuple) else (out,)
    douts = dout if isinstance(dout, tuple) else (dout,)
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(outs, leaves, douts)


def leaves64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


# --------------------------------------------------------------------------------------------- conv


def conv_inputs(B, L, C, K, bias, dtype=torch.float32, device=DEV):
    wide = torch.randn(B, L, 3 * C, device=device)  # x is a column slice: row stride 3C, not C
    x = wide[:, :, C : 2 * C].to(dtype)
    w = torch.randn(C, 1, K, device=device) / K
    b = torch.randn(C, device=device) if bias else None
    return x, w, b


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("kernel", [3, 4])  # 3: taps not a power of two (KP pads them)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_triton_conv_matches_float64(packed, bias, activation, kernel, tiles, monkeypatch):
    B, L, C = 3, 37, 20  # a partial tile along L (and along C: BLOCK_C is 128, or 16 for "small")
    if tiles == "small":  # several tiles both ways: the halo rows read across tile edges
        from hybridlm.ops import conv_triton

        for d, rows in (("FWD", 16), ("BWD", 16), ("DX", 8)):  # the two backward passes tile differently
            monkeypatch.setattr(conv_triton, f"{d}_BLOCK_L", rows)
            monkeypatch.setattr(conv_triton, f"{d}_BLOCK_C", 16)
    x, w, b = conv_inputs(B, L, C, kernel, bias)
    assert x.stride(1) == 3 * C
    seq_idx = packed_ids(B, L, DEV) if packed else None
    x, w, b = (t if t is None else t.requires_grad_() for t in (x, w, b))
    reset_paths()
    with use_kernels("triton"):
        y = causal_conv1d(x, w, b, seq_idx, activation)
    assert paths_used()["causal_conv1d"] == "triton"
    assert y.dtype == x.dtype and y.shape == x.shape
    ref_in = leaves64(x, w, b)
    y_ref = causal_conv1d_reference(*ref_in, seq_idx, activation)
    assert_rel_close(y, y_ref, 1e-6, "conv out")
    dy = torch.randn_like(y)
    for name, got, want in zip("xwb", grads(y, (x, w, b), dy), grads(y_ref, ref_in, dy.double())):
        assert_rel_close(got, want, 2e-6, f"conv d{name}")


def test_triton_conv_documents_do_not_leak():
    """Changing one document's inputs leaves every other document's outputs and gradients untouched."""
    B, L, C, K = 1, 16, 4, 4
    seq_idx = torch.tensor([[0] * 6 + [1] * 10], device=DEV)
    x, w, b = conv_inputs(B, L, C, K, bias=True)
    x2 = x.clone()
    x2[:, :6] += 1.0
    with use_kernels("triton"):
        y, y2 = causal_conv1d(x, w, b, seq_idx, "silu"), causal_conv1d(x2, w, b, seq_idx, "silu")
    assert torch.equal(y[:, 6:], y2[:, 6:]) and not torch.equal(y[:, :6], y2[:, :6])


def test_triton_conv_bf16_input_fp32_weight_keeps_x_dtype():
    x, w, b = conv_inputs(2, 9, 8, 4, bias=True, dtype=torch.bfloat16)
    with use_kernels("triton"):
        y = causal_conv1d(x, w, b, None, "silu")
    assert y.dtype == torch.bfloat16
    assert_rel_close(y, causal_conv1d_reference(x.double(), w.double(), b.double(), None, "silu"), 1e-2, "bf16")


def test_triton_conv_g_in_dy_dtype(monkeypatch):
    # g's buffer in bf16: the gradients stay close to float64 on the same rounded inputs (the
    # interpreter truncates to bf16, so the bf16 error criterion is the GPU test's), and differ
    # from the float32 buffer's, so the setting reached the kernel.
    from hybridlm.ops import conv_triton

    x, w, b = conv_inputs(2, 37, 24, 4, bias=True, dtype=torch.bfloat16)
    seq_idx = packed_ids(2, 37, device=DEV)
    dy = torch.randn(2, 37, 24, device=DEV).bfloat16()
    ins = leaves64(x, w, b)
    ref = grads(causal_conv1d_reference(*ins, seq_idx, "silu"), ins, dy.double())
    got = {}
    for setting in (False, True):
        monkeypatch.setattr(conv_triton, "G_IN_DY_DTYPE", setting)
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        with use_kernels("triton"):
            got[setting] = grads(causal_conv1d(*leaves, seq_idx, "silu"), leaves, dy)
    for name, a, e in zip(("dx", "dw", "db"), got[True], ref):
        assert_rel_close(a, e, 2e-2, f"{name}, g in bf16")
    assert any(not torch.equal(a, c) for a, c in zip(got[True], got[False]))


# --------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("group_size", [4, 24, 6])  # several groups, one group, a non-power-of-two group
def test_triton_gated_norm_matches_float64(group_size):
    M, D = 37, 24
    y = torch.randn(2, M, D, device=DEV, requires_grad=True)
    z = torch.randn(2, M, 3 * D, device=DEV)[..., D : 2 * D].requires_grad_()  # a column slice, like Mamba2's z
    w = (1 + 0.3 * torch.randn(D, device=DEV)).requires_grad_()
    reset_paths()
    with use_kernels("triton"):
        out = gated_rms_norm(y, z, w, group_size, EPS)
    assert paths_used()["gated_rms_norm"] == "triton"
    ref_in = leaves64(y, z, w)
    ref = gated_rms_norm_reference(*ref_in, group_size, EPS)
    assert out.dtype == y.dtype
    assert_rel_close(out, ref, 1e-6, "gated norm out")
    dout = torch.randn_like(out)
    for name, got, want in zip(("y", "z", "w"), grads(out, (y, z, w), dout), grads(ref, ref_in, dout.double())):
        assert_rel_close(got, want, 2e-6, f"gated norm d{name}")


def add_norm_reference(x, delta, w):
    h = x + delta
    return h, rms_norm_reference(h, w, EPS)


@pytest.mark.parametrize("use_h", [True, False])
def test_triton_add_rms_norm_matches_float64(use_h):
    x = torch.randn(3, 11, 40, device=DEV, requires_grad=True)
    delta = torch.randn(3, 11, 40, device=DEV, requires_grad=True)
    w = (1 + 0.3 * torch.randn(40, device=DEV)).requires_grad_()
    reset_paths()
    with use_kernels("triton"):
        h, n = add_rms_norm(x, delta, w, EPS)
    assert paths_used()["add_rms_norm"] == "triton"
    ref_in = leaves64(x, delta, w)
    h_ref, n_ref = add_norm_reference(*ref_in)
    assert torch.equal(h, x + delta)  # the same float32 add
    assert_rel_close(n, n_ref, 1e-6, "add_rms_norm normed")
    dh, dn = torch.randn_like(h), torch.randn_like(n)
    outs, refs = ((h, n), (h_ref, n_ref)) if use_h else (n, n_ref)
    douts, drefs = ((dh, dn), (dh.double(), dn.double())) if use_h else (dn, dn.double())
    for name, got, want in zip(("x", "delta", "w"), grads(outs, (x, delta, w), douts), grads(refs, ref_in, drefs)):
        assert_rel_close(got, want, 2e-6, f"add_rms_norm d{name}")


def test_triton_add_rms_norm_mixed_dtypes_follow_type_promotion():
    """float32 residual + bf16 mixer output (float32 parameters under autocast): h and normed are float32."""
    x = torch.randn(5, 32, device=DEV, requires_grad=True)
    delta = torch.randn(5, 32, device=DEV).bfloat16().requires_grad_()
    w = torch.randn(32, device=DEV)
    with use_kernels("triton"):
        h, n = add_rms_norm(x, delta, w, EPS)
    with use_kernels("torch"):
        h_t, n_t = add_rms_norm(x, delta, w, EPS)
    assert h.dtype == n.dtype == h_t.dtype == torch.float32
    assert torch.equal(h, h_t)
    assert_rel_close(n, n_t, 1e-6, "normed")
    (n.sum() + h.sum()).backward()
    assert x.grad.dtype == torch.float32 and delta.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_rms_norm_forward_matches_float64(dtype):
    """The inference norm: a strided (column-slice) input, rows of a width that is not a power of two."""
    wide = torch.randn(3, 7, 3 * 40, device=DEV, dtype=dtype)
    x, w = wide[..., 40:80], 1 + 0.3 * torch.randn(40, device=DEV)
    reset_paths()
    with torch.no_grad(), use_kernels("triton"):
        got = rms_norm(x, w, EPS)
    assert paths_used() == {"rms_norm": "triton"}
    assert got.dtype == dtype and got.shape == x.shape
    assert_rel_close(got, rms_norm_reference(x.double(), w, EPS), 1e-6, "rms_norm")


# (float16, not bf16, on the CPU: Triton's interpreter truncates float32 to bf16 where the GPU rounds to nearest.)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16 if DEV == "cuda" else torch.float16])
def test_triton_rms_norm_then_gate_forward_matches_float64(dtype):
    """Gated DeltaNet's output norm (RMSNorm, scale, then silu(z)): strided rows of a width that is not a power of two;
    float32 within float32's rounding of float64, 16-bit within twice the error of float64 fed the same rounded
    inputs (the kernel rounds where torch's 16-bit ops do: the normalized rows, the 16-bit scale's product)."""
    wide = torch.randn(3, 7, 3 * 40, device=DEV)
    x, z, w = wide[..., 40:80], torch.randn(3, 7, 40, device=DEV) * 2, 1 + 0.3 * torch.randn(40, device=DEV)
    xr, zr, wr = x.to(dtype), z.to(dtype), w.to(dtype)
    reset_paths()
    with torch.no_grad(), use_kernels("triton"):
        got = rms_norm_then_gate(xr, zr, wr, EPS)
    assert paths_used() == {"rms_norm_then_gate": "triton"}
    assert got.dtype == dtype and got.shape == x.shape
    exact = rms_norm_then_gate_reference(x, z, w, EPS)
    if dtype == torch.float32:
        assert_rel_close(got, exact, 1e-6, "rms_norm_then_gate")
    else:
        assert_bf16_within(got, exact, rms_norm_then_gate_reference(xr, zr, wr, EPS), 2.0, "rms_norm_then_gate")
        with use_kernels("torch"):  # and torch's ops' own result, element by element, nearly everywhere
            want = rms_norm_then_gate(xr, zr, wr, EPS)
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
        # (The kernel rounds where torch's 16-bit ops do; without either rounding a quarter of the values differ.)
        assert (got == want).float().mean() >= 0.9, (got == want).float().mean()


def test_rms_norm_then_gate_keeps_the_torch_path_when_a_gradient_is_wanted():
    x, z = torch.randn(4, 16, device=DEV, requires_grad=True), torch.randn(4, 16, device=DEV)
    reset_paths()
    with use_kernels("triton"):
        rms_norm_then_gate(x, z, torch.ones(16, device=DEV), EPS).sum().backward()
    assert paths_used() == {"rms_norm_then_gate": "torch"} and x.grad is not None


def test_triton_norms_of_zero_centered_weights_take_one_plus_w_in_float32():
    """Zero-centred (norm_zero_centered): the kernels are given the float32 scale 1 + w of a bf16 w (where a bf16
    1 + w would round 2^-10 away); forward and the gradients, through the addition to w, against float64."""
    x = torch.randn(3, 11, 40, device=DEV, requires_grad=True)
    delta = torch.randn(3, 11, 40, device=DEV, requires_grad=True)
    w = (2.0**-10 + 0.3 * torch.randn(40, device=DEV)).bfloat16().requires_grad_()
    reset_paths()
    with use_kernels("triton"):
        h, n = add_rms_norm(x, delta, w, EPS, zero_centered=True)
        with torch.no_grad():
            plain = rms_norm(x.detach(), w.detach(), EPS, zero_centered=True)
    assert paths_used() == {"add_rms_norm": "triton", "rms_norm": "triton"}
    x64, d64, w64 = leaves64(x, delta, w)
    n_ref = rms_norm_reference(x64 + d64, w64, EPS, zero_centered=True)
    assert torch.equal(h, x + delta)  # the residual sum is the plain one
    assert_rel_close(n, n_ref, 1e-6, "add_rms_norm normed")
    assert_rel_close(plain, rms_norm_reference(x64, w64, EPS, zero_centered=True), 1e-6, "rms_norm")
    dn = torch.randn_like(n)
    got = grads(n, (x, delta, w), dn)
    want = grads(n_ref, (x64, d64, w64), dn.double())
    assert got[2].dtype == torch.bfloat16
    for name, g, r, tol in zip(("x", "delta", "w"), got, want, (2e-6, 2e-6, 1e-2)):  # dw: rounded to bf16
        assert_rel_close(g, r, tol, f"zero-centred add_rms_norm d{name}")


def test_rms_norm_keeps_the_torch_path_when_a_gradient_is_wanted():
    """The Triton norm is forward-only: a call that needs a gradient runs the reference, and records that."""
    x = torch.randn(4, 16, device=DEV, requires_grad=True)
    w = torch.ones(16, device=DEV)
    reset_paths()
    with use_kernels("triton"):
        rms_norm(x, w, EPS).sum().backward()
    assert paths_used() == {"rms_norm": "torch"}
    assert_rel_close(x.grad, torch.autograd.grad(rms_norm_reference(x.double(), w, EPS).sum(), x)[0], 1e-5, "dx")


# --------------------------------------------------------------------------------------------- dispatch, compile


def test_torch_mode_runs_the_reference():
    x, w, b = conv_inputs(2, 9, 8, 4, bias=True, device="cpu")
    y, z = torch.randn(4, 16), torch.randn(4, 16)
    reset_paths()
    with use_kernels("torch"):
        conv = causal_conv1d(x, w, b, None, "silu")
        gated = gated_rms_norm(y, z, torch.ones(16), 8, EPS)
        h, n = add_rms_norm(y, z, torch.ones(16), EPS)
    assert paths_used() == {"causal_conv1d": "torch", "gated_rms_norm": "torch", "add_rms_norm": "torch"}
    # The torch path is the plain code: the same bits as the auto mode's choice on CPU tensors.
    assert torch.equal(conv, causal_conv1d(x, w, b, None, "silu"))
    assert torch.equal(gated, gated_rms_norm(y, z, torch.ones(16), 8, EPS))
    assert torch.equal(h, y + z) and torch.equal(n, add_rms_norm(y, z, torch.ones(16), EPS)[1])
    assert paths_used()["causal_conv1d"] == "torch"


def test_custom_ops_pass_opcheck():
    """Fake (meta) implementations, schemas and autograd registrations agree with the kernels."""
    from hybridlm.ops import conv_triton, norm_triton

    x, w, b = conv_inputs(2, 9, 8, 4, bias=True)
    seq_idx = packed_ids(2, 9, DEV)
    y = torch.randn(6, 16, device=DEV, requires_grad=True)
    z = torch.randn(6, 16, device=DEV, requires_grad=True)
    wn = torch.randn(16, device=DEV, requires_grad=True)
    cases = [
        (conv_triton._conv_fwd, (x.requires_grad_(), w.reshape(8, 4).requires_grad_(), b, seq_idx, True)),
        (norm_triton._gated_fwd, (y, z, wn, 8, EPS)),
        (norm_triton._add_norm_fwd, (y, z, wn, EPS)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiled_equals_eager():
    """torch.compile keeps each op as one custom-op node (graph of the interpreter's kernels on CPU)."""

    def fn(x, w, b, seq_idx, z, wn, r):
        u = causal_conv1d(x, w, b, seq_idx, "silu")
        g = gated_rms_norm(u, z, wn, 4, EPS)
        h, n = add_rms_norm(r, g, wn, EPS)
        return h * n

    x, w, b = conv_inputs(2, 12, 8, 4, bias=True)
    args = [x, w, b, packed_ids(2, 12, DEV), *(torch.randn(s, device=DEV) for s in ((2, 12, 8), (8,), (2, 12, 8)))]
    args = [a if a.dtype == torch.long else a.detach().requires_grad_() for a in args]
    torch._dynamo.reset()
    with use_kernels("triton"):
        eager = fn(*args)
        compiled = torch.compile(fn, fullgraph=True)(*args)
    assert_rel_close(compiled, eager, 1e-6, "compiled vs eager")
    dout = torch.randn_like(eager)
    leaves = [a for a in args if a.requires_grad]
    for i, (got, want) in enumerate(zip(grads(compiled, leaves, dout), grads(eager, leaves, dout))):
        assert_rel_close(got, want, 1e-6, f"grad {i}")


# --------------------------------------------------------------------------------------------- GPU, bf16


def bf16_check(fn, ref_fn, exact_inputs, douts, what):
    """Outputs and gradients of ``fn`` on bf16-rounded inputs vs the float64 references (see helpers)."""
    rounded = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in exact_inputs]
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in rounded]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    got = list(outs) + list(torch.autograd.grad(outs, [t for t in leaves if t.requires_grad], douts))
    refs = []
    for inputs in (exact_inputs, rounded):
        ins = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
        r = ref_fn(*ins)
        r = r if isinstance(r, tuple) else (r,)
        refs.append(
            list(r) + list(torch.autograd.grad(r, [t for t in ins if t.requires_grad], [d.double() for d in douts]))
        )
    for i, (a, e, rr) in enumerate(zip(got, *refs)):
        assert_bf16_within(a, e, rr, 2.0, f"{what} output/grad {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("g_in_dy_dtype", [False, True])
def test_gpu_conv_bf16_within_twice_the_rounded_reference(monkeypatch, g_in_dy_dtype):
    from hybridlm.ops import conv_triton

    monkeypatch.setattr(conv_triton, "G_IN_DY_DTYPE", g_in_dy_dtype)
    B, L, C, K = 2, 4096, 6144, 4
    wide = torch.randn(B, L, C + 128, device="cuda")  # x is read as a strided column slice of it
    w, b = torch.randn(C, 1, K, device="cuda") / 2, torch.randn(C, device="cuda") / 4
    seq_idx = packed_ids(B, L, device="cuda")
    dy = torch.randn(B, L, C, device="cuda").bfloat16()
    reset_paths()
    bf16_check(
        lambda xw, w, b: causal_conv1d(xw[..., 64 : 64 + C], w, b, seq_idx, "silu"),
        lambda xw, w, b: causal_conv1d_reference(xw[..., 64 : 64 + C], w, b, seq_idx, "silu"),
        [wide, w, b],
        [dy],
        "conv",
    )
    assert paths_used()["causal_conv1d"] == "triton"


@pytest.mark.gpu
def test_gpu_gated_norm_bf16_within_twice_the_rounded_reference():
    M, D, group = 16384, 4096, 512
    y, z = torch.randn(M, D, device="cuda"), torch.randn(M, D, device="cuda")
    w = 1 + 0.2 * torch.randn(D, device="cuda")
    reset_paths()
    bf16_check(
        lambda y, z, w: gated_rms_norm(y, z, w, group, EPS),
        lambda y, z, w: gated_rms_norm_reference(y, z, w, group, EPS),
        [y, z, w],
        [torch.randn(M, D, device="cuda").bfloat16()],
        "gated norm",
    )
    assert paths_used()["gated_rms_norm"] == "triton"


def norm_weight(D: int, zero_centered: bool) -> torch.Tensor:
    """(D,) a trained-looking norm weight: scales near 1, or, zero-centred, the ``w`` of the scale ``1 + w``."""
    return (0.0 if zero_centered else 1.0) + 0.2 * torch.randn(D, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("zero_centered", [False, True])
def test_gpu_add_rms_norm_bf16_within_twice_the_rounded_reference(zero_centered):
    M, D = 16384, 2048
    x, delta = torch.randn(M, D, device="cuda"), torch.randn(M, D, device="cuda")
    w = norm_weight(D, zero_centered)
    douts = [torch.randn(M, D, device="cuda").bfloat16() for _ in range(2)]
    reset_paths()
    bf16_check(
        lambda x, d, w: add_rms_norm(x, d, w, EPS, zero_centered),
        lambda x, d, w: (x + d, rms_norm_reference(x + d, w, EPS, zero_centered)),
        [x, delta, w],
        douts,
        "add_rms_norm",
    )
    assert paths_used()["add_rms_norm"] == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("zero_centered", [False, True])
def test_gpu_rms_norm_bf16_within_twice_the_rounded_reference(zero_centered):
    M, D = 16384, 2048
    x, w = torch.randn(M, D, device="cuda"), norm_weight(D, zero_centered)
    xb, wb = x.bfloat16(), w.bfloat16()
    reset_paths()
    with torch.no_grad():
        got = rms_norm(xb, wb, EPS, zero_centered)
    assert paths_used()["rms_norm"] == "triton" and got.dtype == torch.bfloat16
    assert_bf16_within(
        got,
        rms_norm_reference(x.double(), w, EPS, zero_centered),
        rms_norm_reference(xb.double(), wb, EPS, zero_centered),
        2.0,
        "rms_norm",
    )


@pytest.mark.gpu
def test_gpu_rms_norm_then_gate_bf16_within_twice_the_rounded_reference():
    """Qwen3-Next's decode shape: 64 rows x 32 value heads of 128."""
    x, z, w = torch.randn(64, 32, 128, device="cuda"), torch.randn(64, 32, 128, device="cuda"), norm_weight(128, False)
    xb, zb, wb = x.bfloat16(), z.bfloat16(), w.bfloat16()
    reset_paths()
    with torch.no_grad():
        got = rms_norm_then_gate(xb, zb, wb, EPS)
    assert paths_used()["rms_norm_then_gate"] == "triton" and got.dtype == torch.bfloat16
    exact = rms_norm_then_gate_reference(x, z, w, EPS)
    assert_bf16_within(got, exact, rms_norm_then_gate_reference(xb, zb, wb, EPS), 2.0, "rms_norm_then_gate")


def test_model_with_triton_kernels_matches_torch_path(monkeypatch):
    """End to end through the layers' real call sites: Mamba2's strided xBC/z slices, GDN's conv
    without bias, the fused block's add_rms_norm; packed documents. On a GPU the scan kernels'
    products are float32-exact (not tf32x3), so float32 tolerances hold there too."""
    from hybridlm import HybridLM
    from hybridlm.ops import gated_delta_triton, ssd_triton
    from tests.helpers import tiny_config

    if DEV == "cuda":
        monkeypatch.setattr(ssd_triton, "DOT_PRECISION", "ieee")
        monkeypatch.setattr(gated_delta_triton, "DOT_PRECISION", "ieee")

    config = tiny_config("[M-]G-")
    ids = torch.randint(0, 97, (2, 19), device=DEV)
    doc_ids = torch.tensor([[0] * 7 + [1] * 12, [0] * 18 + [1]], device=DEV)
    results = {}
    for mode in ("torch", "triton"):
        model = HybridLM(config, seed=0, device=DEV)
        reset_paths()
        with use_kernels(mode):
            out = model(ids, torch.roll(ids, -1, 1), doc_ids=doc_ids)
            out.loss.backward()
        used = paths_used()
        assert {used[op] for op in ("causal_conv1d", "gated_rms_norm", "add_rms_norm")} == {mode}
        results[mode] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert_rel_close(results["triton"][0], results["torch"][0], 1e-6, "loss")
    for name, g in results["torch"][1].items():
        assert_rel_close(results["triton"][1][name], g, 1e-5, name)


def test_a_compiled_caller_still_records_the_kernel_path():
    """Tracing skips the record (it would be a side effect of tracing only); the custom op records
    when the compiled graph runs it, so a compiled training run still reports its kernels."""
    x, w, b = conv_inputs(1, 9, 8, 4, bias=True)
    fn = torch.compile(lambda x: causal_conv1d(x, w, b, None, "silu"), backend="eager", fullgraph=True)
    with use_kernels("triton"):
        fn(x)  # traces and runs once
        reset_paths()
        fn(x)  # runs the compiled graph only
    assert paths_used() == {"causal_conv1d": "triton"}
    torch._dynamo.reset()


def test_add_rms_norm_under_torch_compile_takes_the_reference():
    # Inside a compiled region inductor fuses the add and the norm itself; the Triton custom op would
    # only add a Python launch per call. Eager calls still take the kernel (tests above).
    x, delta, w = torch.randn(3, 5, 64, device=DEV), torch.randn(3, 5, 64, device=DEV), torch.randn(64, device=DEV)
    reset_paths()
    with use_kernels("triton"):
        h, n = torch.compile(add_rms_norm, backend="eager", fullgraph=True)(x, delta, w, EPS)
    assert "add_rms_norm" not in paths_used()
    assert torch.equal(h, x + delta)
    with use_kernels("torch"):
        assert torch.equal(n, rms_norm(x + delta, w, EPS))
