"""Edge cases of the Triton kernels and of the dispatch that chooses them, on the GPU.

Every case calls the public op under the default kernel setting (``auto``: CUDA inputs run the
Triton path, which the case asserts through ``paths_used``) and compares it with the float64
reference: float32 inputs within a relative tolerance, bf16 / fp16 inputs within 2x the error of
the float64 reference fed the same rounded inputs (``assert_bf16_within``).

Among them, what review found and the kernels now handle: 1-D parameters given as strided views
(SSD ``D``, the step's ``A`` / ``D``, the conv bias, the norm weights), batches past the 65,535
programs a grid's second and third dimensions hold (run in row groups, ``hybridlm.ops.grid``),
positions times row stride past 2^31 in the SSD kernels, add_rms_norm's backward on zero rows, a
conv-step state of the wrong length, value heads unlike the query heads, and a block of -inf logits
in the cross entropy.

Without CUDA the small cases run on CPU tensors in Triton's interpreter (``triton`` forced, bf16
cases skipped: the interpreter truncates bf16 stores) and the large ones skip; with CUDA every case
is a ``gpu`` test, so ``pytest -m gpu`` runs them compiled.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops import gated_delta_triton
from hybridlm.ops.conv import causal_conv1d, causal_conv1d_reference
from hybridlm.ops.cross_entropy_triton import cross_entropy_rows_triton
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.gated_delta import (
    gated_delta_rule_chunked,
    gated_delta_rule_reference,
    l2_normalize,
)
from hybridlm.ops.mamba2_core import Mamba2Dims, Mamba2Weights, mamba2_core, mamba2_core_torch
from hybridlm.ops.norm import (
    add_rms_norm,
    gated_rms_norm,
    gated_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from hybridlm.ops.ssd import ssd_chunked, ssd_reference
from hybridlm.ops.step import causal_conv1d_with_state, ssd_step
from tests.helpers import assert_bf16_within, assert_rel_close, rel_err, runs_triton_kernels, subprocess_env
from tests.ops.test_ssd import inputs as ssd_inputs

CUDA = torch.cuda.is_available()
pytestmark = [runs_triton_kernels, *([pytest.mark.gpu] if CUDA else [])]
DEV = "cuda" if CUDA else "cpu"
#: ``auto`` is what users get; on CPU (interpreter runs outside the repo's conftest) force the kernels.
MODE = "auto" if CUDA else "triton"
EPS = 1e-5


def needs_cuda(reason: str):
    """Cases too large for the interpreter (or about CUDA's own limits)."""
    return pytest.mark.skipif(not CUDA, reason=f"CUDA only: {reason}")


def assert_triton(op: str) -> None:
    assert paths_used().get(op) == "triton", f"{op}: the dispatch chose {paths_used().get(op)!r}, not Triton"


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in ts]


def grads(outs, ins, douts):
    present = [t for t in ins if t is not None and t.requires_grad]
    return list(torch.autograd.grad(outs, present, douts, allow_unused=True))


def cut_ids(b: int, L: int, cuts: list[int]) -> torch.Tensor:
    """(b, L) non-decreasing document ids, a new document at every position in ``cuts`` (every row)."""
    seq = torch.zeros(b, L, dtype=torch.long)
    for c in cuts:
        seq[:, c:] += 1
    return seq.to(DEV)


# ------------------------------------------------------------------------------------------------ SSD


def ssd_tensors(b, L, h, p, g, n, seed=0):
    """x, dt, A, B, C, D as tests/ops/test_ssd.py draws them, and an initial state, on DEV."""
    init = torch.randn(b, h, p, n, generator=torch.Generator().manual_seed(seed + 1000))
    return [t.to(DEV) for t in (*ssd_inputs(b, L, h, p, g, n, seed), init)]


def _as_wide(x, B, C):
    """x, B, C as column slices of one (b, l, h*p + 2*g*n) tensor, as the Mamba2 core passes them."""
    h, p = x.shape[2:]
    g, n = B.shape[2:]
    wide = torch.cat([x.flatten(2), B.flatten(2), C.flatten(2)], -1)
    xs, Bs, Cs = torch.split(wide, [h * p, g * n, g * n], -1)
    return xs.unflatten(-1, (h, p)), Bs.unflatten(-1, (g, n)), Cs.unflatten(-1, (g, n))


def _transposed_storage(t, d0, d1):
    return t.transpose(d0, d1).contiguous().transpose(d0, d1)


def _ssd_strided(x, dt, A, B, C, D, init):
    """x and C column slices of one tensor, B one group's values expanded over the groups (stride 0),
    dt and the initial state transposed in memory."""
    xs, _, Cs = _as_wide(x, B, C)
    Bs = B[:, :, :1].expand_as(B)
    assert Bs.stride(2) == 0
    return xs, _transposed_storage(dt, 1, 2), A, Bs, Cs, D, None if init is None else _transposed_storage(init, 2, 3)


def _ssd_strided_D(x, dt, A, B, C, D, init):
    """D a strided view of a wider parameter (every other element)."""
    return x, dt, A, B, C, torch.stack([D, torch.full_like(D, 100.0)], 1)[:, 0], init


SSD_LAYOUTS = {"plain": lambda *ts: ts, "strided": _ssd_strided, "strided_D": _ssd_strided_D}


def ssd_check(b, L, h, p, g, n, chunk, *, low=None, cuts=(), layout="plain", with_init=True, seed=0, tol=1e-4):
    """ssd_chunked (the dispatch's choice) against the float64 step recurrence: y, final state and
    the gradient of x, dt, A, B, C, D and the initial state."""
    ts = ssd_tensors(b, L, h, p, g, n, seed)
    if not with_init:
        ts[6] = None
    seq = cut_ids(b, L, list(cuts)) if cuts else None
    gen = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(b, L, h, p, generator=gen).to(DEV)
    gs = torch.randn(b, h, p, n, generator=gen).to(DEV)
    view = SSD_LAYOUTS[layout]

    def run(tensors, fn, dy):
        ls = leaves(*tensors)
        y, final = fn(*view(*ls))
        gr = grads([y, final], ls, [dy.to(y.dtype), gs.to(final.dtype)])
        return [y, final, *gr]

    def kernel(x, dt, A, B, C, D, init):
        return ssd_chunked(x, dt, A, B, C, chunk, D=D, seq_idx=seq, initial_state=init, return_final_state=True)

    def reference(x, dt, A, B, C, D, init):
        return ssd_reference(x, dt, A, B, C, D=D, seq_idx=seq, initial_state=init)

    inputs = [t if t is None or i not in (0, 3, 4) or low is None else t.to(low) for i, t in enumerate(ts)]
    reset_paths()
    with use_kernels(MODE):
        got = run(inputs, kernel, gy if low is None else gy.to(low))
    assert_triton("ssd")
    exact = run([None if t is None else t.double() for t in ts], reference, gy.double())
    names = ["y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dinit"]
    if low is None:
        for name, a, e in zip(names, got, exact):
            assert_rel_close(a, e, tol, name)
    else:
        rounded = run([None if t is None else t.double() for t in inputs], reference, gy.to(low).double())
        for name, a, e, r in zip(names, got, exact, rounded):
            assert_bf16_within(a, e, r.to(a.dtype), 2.0, name)


@pytest.mark.parametrize(
    ("case", "kw"),
    [
        # One position, and a sequence far shorter than the chunk (one padded chunk).
        ("L1", dict(b=2, L=1, h=4, p=8, g=2, n=16, chunk=256)),
        # Widths that are not powers of two (p = 24, n = 20), 2 heads per group; resets at 1 and at
        # the last position, a short sequence in one chunk.
        ("short_odd_widths", dict(b=1, L=200, h=6, p=24, g=3, n=20, chunk=256, cuts=(1, 77, 199))),
        # A chunk that is not a power of two; a reset on a chunk start, right after it, and at the end;
        # widths below tl.dot's 16; no initial state.
        ("chunk_100", dict(b=2, L=333, h=2, p=8, g=1, n=8, chunk=100, cuts=(100, 101, 332), with_init=False)),
        # bf16 x, B, C (dt, A, D, initial state float32, as the layer passes them), several tiles per
        # chunk, documents of length 1 (128) and a reset at the last position.
        (
            "bf16_packed",
            dict(b=2, L=700, h=8, p=64, g=2, n=128, chunk=128, low=torch.bfloat16, cuts=(1, 128, 129, 699)),
        ),
        ("fp16", dict(b=1, L=300, h=4, p=32, g=1, n=64, chunk=128, low=torch.float16, cuts=(150,))),
        # Strided views: x and C column slices of one tensor (as the Mamba2 core's xBC), B expanded
        # over groups (stride 0), dt and the initial state transposed in memory.
        ("strided_views", dict(b=2, L=150, h=4, p=16, g=2, n=16, chunk=64, layout="strided", cuts=(70,))),
        # D a strided view: the kernels read it as D_ptr + head, so the wrapper makes it contiguous.
        ("strided_D", dict(b=1, L=40, h=4, p=16, g=1, n=16, chunk=16, layout="strided_D")),
    ],
)
def test_ssd_edges(case, kw):
    if not CUDA and (kw.get("low") is not None and kw["L"] > 300):
        pytest.skip("bf16 at this length is slow in the interpreter")
    ssd_check(**kw)


@needs_cuda("grid limit")
def test_ssd_batch_times_heads_over_65535():
    # Grid dimension 1 is b * h (b * g): 65,568 programs, past CUDA's 65,535, so the batch runs in
    # row groups. nemotron-h-8b (128 heads) reaches it at a batch of 512 prompts prefilling together.
    ssd_check(b=2049, L=16, h=32, p=16, g=1, n=16, chunk=16, with_init=False)


@needs_cuda("needs > 2**31 elements")
def test_ssd_row_offsets_past_int32():
    # Position times row stride past 2^31: x, B, C as column slices of a wide tensor (as the Mamba2
    # core's xBC, row stride conv_dim = 6144 in bench-1.3b; dt a slice of the projection, wider
    # still) wrapped in 32-bit offsets from 2^31 / stride positions (349,526 at 6144). Here stride
    # 65536 and L = 33,792: the strided run must equal the same run on contiguous copies.
    # Run in a child process: a wrapped address may be an illegal access, fatal to the CUDA context.
    script = textwrap.dedent(
        """
        import torch
        from hybridlm.ops.ssd_triton import ssd_chunked_triton
        from tests.helpers import rel_err
        torch.manual_seed(0)
        L, W, h, p, g, n = 33792, 65536, 1, 16, 1, 16
        wide = torch.empty(1, L, W, device="cuda", dtype=torch.bfloat16)
        wide[..., : h * p + 2 * g * n].normal_()
        x = wide[..., : h * p].unflatten(-1, (h, p))
        B = wide[..., h * p : h * p + g * n].unflatten(-1, (g, n))
        C = wide[..., h * p + g * n : h * p + 2 * g * n].unflatten(-1, (g, n))
        dt = torch.nn.functional.softplus(torch.randn(1, L, h, device="cuda") - 1)
        A, D = -torch.rand(h, device="cuda") - 0.5, torch.randn(h, device="cuda")
        gy = torch.randn(1, L, h, p, device="cuda").bfloat16()

        def run(x, B, C):
            x, B, C, d = (t.requires_grad_() for t in (x, B, C, dt.clone()))
            y, final = ssd_chunked_triton(x, d, A, B, C, 256, D=D, return_final_state=True)
            return [y, final, *torch.autograd.grad(y, [x, d, B, C], gy)]

        strided = run(x, B, C)
        contiguous = run(*(t.detach().contiguous() for t in (x, B, C)))
        torch.cuda.synchronize()
        bad = [f"{name} {rel_err(a, b):.3g}" for name, a, b in zip(["y", "final", "dx", "ddt", "dB", "dC"], strided, contiguous)
               if rel_err(a, b) > 1e-3]
        print("MISMATCH " + ", ".join(bad) if bad else "MATCH")
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0 and "MATCH" in r.stdout and "MISMATCH" not in r.stdout, (r.stdout + r.stderr)[-3000:]


# ----------------------------------------------------------------------------------------- gated delta


def gdn_tensors(b, L, h, dk, dv, seed=0, g_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(b, L, h, dk, generator=gen))
    k = l2_normalize(torch.randn(b, L, h, dk, generator=gen))
    v = torch.randn(b, L, h, dv, generator=gen)
    g = -F.softplus(torch.randn(b, L, h, generator=gen) - 1.0) * g_scale
    beta = torch.rand(b, L, h, generator=gen)
    init = torch.randn(b, h, dk, dv, generator=gen)
    return [t.to(DEV) for t in (q, k, v, g, beta, init)]


def gdn_check(monkeypatch, b, L, h, dk, dv, chunk, *, low=None, cuts=(), layout="plain", with_init=True, g_scale=1.0):
    """gated_delta_rule_chunked (the dispatch's choice) against the float64 recurrence: o, final
    state and the gradient of q, k, v, g, beta and the initial state. float32 inputs run the
    kernels' products at "ieee" precision (the default tf32 would blur a tight tolerance)."""
    if low is None:
        monkeypatch.setattr(gated_delta_triton, "DOT_PRECISION", "ieee")
    ts = gdn_tensors(b, L, h, dk, dv, g_scale=g_scale)
    if not with_init:
        ts[5] = None
    seq = cut_ids(b, L, list(cuts)) if cuts else None
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(b, L, h, dv, generator=gen).to(DEV)
    gs = torch.randn(b, h, dk, dv, generator=gen).to(DEV)

    def run(tensors, fn, do):
        ls = leaves(*tensors)
        q, k, v, g, beta, init = ls if layout == "plain" else _gdn_view(ls, h, dk, dv)
        o, final = fn(q, k, v, g, beta, init)
        return [o, final, *grads([o, final], ls, [do.to(o.dtype), gs.to(final.dtype)])]

    def kernel(q, k, v, g, beta, init):
        return gated_delta_rule_chunked(
            q, k, v, g, beta, chunk, seq_idx=seq, initial_state=init, return_final_state=True
        )

    def reference(q, k, v, g, beta, init):
        return gated_delta_rule_reference(q, k, v, g, beta, seq_idx=seq, initial_state=init)

    inputs = [t if t is None or i > 2 or low is None else t.to(low) for i, t in enumerate(ts)]
    reset_paths()
    with use_kernels(MODE):
        got = run(inputs, kernel, go if low is None else go.to(low))
    assert_triton("gated_delta")
    exact = run([None if t is None else t.double() for t in ts], reference, go.double())
    names = ["o", "final", "dq", "dk", "dv", "dg", "dbeta", "dinit"]
    if low is None:
        for name, a, e in zip(names, got, exact):
            assert_rel_close(a, e, 1e-4, name)
    else:
        rounded = run([None if t is None else t.double() for t in inputs], reference, go.to(low).double())
        for name, a, e, r in zip(names, got, exact, rounded):
            assert_bf16_within(a, e, r.to(a.dtype), 2.0, name)


def _gdn_view(ls, h, dk, dv):
    """q, k, v column slices of one tensor (as the layer's conv output), g and beta transposed in memory."""
    q, k, v, g, beta, init = ls
    wide = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)
    qs, ks, vs = wide.split([h * dk, h * dk, h * dv], -1)
    return (
        qs.unflatten(-1, (h, dk)),
        ks.unflatten(-1, (h, dk)),
        vs.unflatten(-1, (h, dv)),
        _transposed_storage(g, 1, 2),
        _transposed_storage(beta, 1, 2),
        init,
    )


# Triton's CPU interpreter computes exp(g_i - g_j) on the whole chunk, the masked-out upper triangle too, where
# large decays overflow to inf before tl.where drops them (a GPU does the same without a word).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(
    ("case", "kw"),
    [
        # One position; head dims below 16.
        ("L1_dims_8", dict(b=2, L=1, h=2, dk=8, dv=8, chunk=64)),
        # dk = 80, dv = 96: several key / value blocks, the last partial; chunk_size 48 -> 64; resets
        # at 1, on a chunk start and at the last position; a partial last chunk.
        ("wide_odd_packed", dict(b=1, L=100, h=2, dk=80, dv=96, chunk=48, cuts=(1, 64, 99))),
        # Decays so strong that the in-chunk exponents overflow above the diagonal (masked there).
        ("strong_decay", dict(b=1, L=70, h=2, dk=16, dv=16, chunk=64, g_scale=60.0, cuts=(33,))),
        ("strided_views", dict(b=2, L=40, h=2, dk=16, dv=32, chunk=16, layout="strided", with_init=False)),
        # bf16 q, k, v (g, beta, initial state float32) at the widest supported heads.
        ("bf16_packed", dict(b=1, L=1000, h=4, dk=128, dv=128, chunk=64, low=torch.bfloat16, cuts=(1, 64, 500, 999))),
    ],
)
def test_gated_delta_edges(monkeypatch, case, kw):
    if not CUDA and kw.get("low") is not None:
        pytest.skip("bf16 stores truncate in the interpreter")
    gdn_check(monkeypatch, **kw)


@needs_cuda("grid limit")
def test_gated_delta_batch_times_heads_over_65535(monkeypatch):
    # b * h = 65,568 programs on grid dimension 1 or 2: run in row groups.
    gdn_check(monkeypatch, b=2049, L=16, h=32, dk=16, dv=16, chunk=16, with_init=False)


@needs_cuda("grid limit")
def test_gated_delta_refuses_more_chunks_than_a_grid_holds():
    # Two kernels put the chunk index on grid dimension 1: 65,537 chunks of 16 are refused by name
    # (tests/ops/test_grid.py checks the same under a lowered limit, on the CPU too).
    q, k, v, g, beta, _ = gdn_tensors(1, 65537 * 16, 1, 16, 16)
    with use_kernels(MODE), pytest.raises(ValueError, match="65537 chunks of 16, more than a launch grid holds"):
        gated_delta_rule_chunked(q, k, v, g, beta, 16)


def test_gated_delta_refuses_value_heads_unlike_the_query_heads():
    # v with 4 heads, q and k with 2: the kernels take the head count from q alone and would index v
    # with it, so the op checks every shape against q's first.
    q, k = (l2_normalize(torch.randn(1, 20, 2, 8, device=DEV)) for _ in range(2))
    v, g, beta = (
        torch.randn(1, 20, 4, 8, device=DEV),
        -torch.rand(1, 20, 2, device=DEV),
        torch.rand(1, 20, 2, device=DEV),
    )
    with use_kernels(MODE), pytest.raises(ValueError, match=r"v has shape \(1, 20, 4, 8\), expected \(1, 20, 2, 8\)"):
        gated_delta_rule_chunked(q, k, v, g, beta, 16)


# ----------------------------------------------------------------------------------------------- conv


@pytest.mark.parametrize(
    ("case", "B", "L", "C", "K", "cuts", "layout", "low"),
    [
        ("K1", 2, 5, 3, 1, (), "plain", None),  # one tap: no halo at all
        ("K5_L_below_K", 2, 3, 20, 5, (1,), "slice", None),  # taps padded to 8; L < K; reset at 1
        ("L1_C1_batch_expanded", 3, 1, 1, 4, (), "expand", None),  # x with batch stride 0
        ("bf16_packed", 2, 777, 200, 4, (1, 33, 776), "slice", torch.bfloat16),
        # The bias a strided view (read as b_ptr + channel: made contiguous).
        ("strided_bias", 1, 9, 5, 4, (), "strided_bias", None),
    ],
)
def test_conv_edges(case, B, L, C, K, cuts, layout, low):
    if not CUDA and low is not None:
        pytest.skip("bf16 stores truncate in the interpreter")
    gen = torch.Generator().manual_seed(K)
    x = torch.randn(B, L, C, generator=gen).to(DEV)
    w = (torch.randn(C, 1, K, generator=gen) / K).to(DEV)
    bias = torch.randn(C, generator=gen).to(DEV)
    dy = torch.randn(B, L, C, generator=gen).to(DEV)
    seq = cut_ids(B, L, list(cuts)) if cuts else None

    def view(x, w, bias):
        if layout == "slice":
            x = torch.cat([x, x], -1)[..., C:]  # row stride 2C
        elif layout == "expand":
            x = x[:1].expand(B, L, C)
        elif layout == "strided_bias":
            bias = torch.stack([bias, torch.full_like(bias, 50.0)], 1)[:, 0]
        return x, w, bias

    def run(ts, fn, dy):
        ls = leaves(*ts)
        y = fn(*view(*ls))
        return [y, *grads(y, ls, dy.to(y.dtype))]

    inputs = [x.to(low) if low is not None else x, w, bias]
    reset_paths()
    with use_kernels(MODE):
        got = run(inputs, lambda x, w, b: causal_conv1d(x, w, b, seq, "silu"), dy if low is None else dy.to(low))
    assert_triton("causal_conv1d")

    def ref(x, w, b):
        return causal_conv1d_reference(x, w, b, seq, "silu")

    exact = run([t.double() for t in (x, w, bias)], ref, dy.double())
    names = ["y", "dx", "dw", "dbias"]
    if low is None:
        for name, a, e in zip(names, got, exact):
            assert_rel_close(a, e, 1e-5, name)
    else:
        rounded = run([t.double() for t in inputs], ref, dy.to(low).double())
        for name, a, e, r in zip(names, got, exact, rounded):
            assert_bf16_within(a, e, r.to(a.dtype), 2.0, name)


@needs_cuda("grid limit")
def test_conv_batch_over_65535():
    # The batch is grid dimension 2 of the conv kernels: 65,537 rows run in two groups.
    B, L, C, K = 65537, 4, 8, 4
    x, w, bias = torch.randn(B, L, C, device=DEV), torch.randn(C, 1, K, device=DEV) / K, torch.randn(C, device=DEV)
    reset_paths()
    with use_kernels(MODE):
        y = causal_conv1d(x, w, bias, None, "silu")
    assert_triton("causal_conv1d")
    with use_kernels("torch"):
        y_ref = causal_conv1d(x.double(), w.double(), bias.double(), None, "silu")
    assert_rel_close(y, y_ref, 1e-5, "y")


# ---------------------------------------------------------------------------------------------- norms


def test_gated_norm_odd_group_and_sliced_gate():
    # group 24 (not a power of two), z a column slice with row stride 2D; bf16 activations.
    M, D, group = 21, 72, 24
    gen = torch.Generator().manual_seed(0)
    y, z2, w, dout = (torch.randn(*s, generator=gen).to(DEV) for s in ((M, D), (M, 2 * D), (D,), (M, D)))
    low = torch.bfloat16 if CUDA else torch.float32
    yl, zl = y.to(low), z2.to(low)
    reset_paths()
    ls = leaves(yl, zl, w)
    with use_kernels(MODE):
        out = gated_rms_norm(ls[0], ls[1][:, D:], ls[2], group, EPS)
    assert_triton("gated_rms_norm")
    got = [out, *grads(out, ls, dout.to(out.dtype))]

    def ref(ts):
        r = leaves(*ts)
        o = gated_rms_norm_reference(r[0], r[1][:, D:], r[2], group, EPS)
        return [o, *grads(o, r, dout.double())]

    exact, rounded = ref([y.double(), z2.double(), w.double()]), ref([yl.double(), zl.double(), w.double()])
    for name, a, e, r in zip(["out", "dy", "dz", "dw"], got, exact, rounded):
        if low == torch.float32:
            assert_rel_close(a, e, 1e-5, name)
        else:
            assert_bf16_within(a, e, r.to(a.dtype), 2.0, name)


def test_add_rms_norm_mixed_dtypes_odd_width():
    # float32 residual + bf16 delta (h in float32, as x + delta), D = 48.
    gen = torch.Generator().manual_seed(1)
    x, d, w = (torch.randn(*s, generator=gen).to(DEV) for s in ((3, 5, 48), (3, 5, 48), (48,)))
    d = d.to(torch.bfloat16 if CUDA else torch.float32)
    ls = leaves(x, d, w)
    reset_paths()
    with use_kernels(MODE):
        h, out = add_rms_norm(*ls, EPS)
    assert_triton("add_rms_norm")
    assert h.dtype == torch.float32 and torch.equal(h, x + d)
    got = grads([h, out], ls, [torch.ones_like(h), torch.ones_like(out)])
    r = leaves(x.double(), d.double(), w.double())
    hr = r[0] + r[1]
    outr = rms_norm_reference(hr, r[2], EPS)
    assert_rel_close(out, outr, 1e-5, "out")
    want = grads([hr, outr], r, [torch.ones_like(hr), torch.ones_like(outr)])
    for name, a, e in zip(["dx", "ddelta", "dw"], got, want):
        if a.dtype == torch.float32:
            assert_rel_close(a, e, 1e-5, name)
        else:  # d delta in delta's bf16: within 2x of the exact gradient's own rounding
            assert_bf16_within(a, e, e, 2.0, name)


def test_add_rms_norm_backward_on_zero_rows():
    # No rows: delta's gradient is dx's (one dtype), not the custom op's (0,) placeholder.
    x, d, w = leaves(torch.randn(0, 5, 48, device=DEV), torch.randn(0, 5, 48, device=DEV), torch.randn(48, device=DEV))
    with use_kernels(MODE):
        h, out = add_rms_norm(x, d, w, EPS)
    (h.sum() + out.sum()).backward()
    assert d.grad.shape == d.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "gated_rms_norm"])
def test_norm_strided_weight(op):
    # The weight a view with stride 2 (read as w_ptr + column: made contiguous).
    gen = torch.Generator().manual_seed(2)
    x, d, w = (torch.randn(*s, generator=gen).to(DEV) for s in ((4, 48), (4, 48), (48,)))
    ws = torch.stack([w, torch.full_like(w, 9.0)], 1)[:, 0]
    with torch.no_grad(), use_kernels(MODE):
        if op == "rms_norm":
            got, want = rms_norm(x, ws, EPS), rms_norm_reference(x.double(), w.double(), EPS)
        elif op == "add_rms_norm":
            got, want = add_rms_norm(x, d, ws, EPS)[1], rms_norm_reference((x + d).double(), w.double(), EPS)
        else:
            got, want = gated_rms_norm(x, d, ws, 24, EPS), gated_rms_norm_reference(x, d, w, 24, EPS)
    assert_rel_close(got, want, 1e-5, op)


# ---------------------------------------------------------------------------------------- decode steps


@pytest.mark.parametrize("case", ["odd_no_D", "odd_with_D", "strided_A_D"])
def test_ssd_step_edges(case):
    # p = 3, n = 5, 2 heads per group, B and C strided; "strided_A_D": A and D strided views.
    b, h, p, g, n = 3, 4, 3, 2, 5
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b, h, p, generator=gen).to(DEV)
    dt = torch.rand(b, h, generator=gen).to(DEV)
    A = (-torch.rand(h, generator=gen) * 3).to(DEV)
    BC = torch.randn(b, 2 * g, n, generator=gen).to(DEV)
    D = torch.randn(h, generator=gen).to(DEV) if case != "odd_no_D" else None
    S0 = torch.randn(b, h, p, n, generator=gen).to(DEV)
    A_arg, D_arg = A, D
    if case == "strided_A_D":
        A_arg = torch.stack([A, torch.full_like(A, 5.0)], 1)[:, 0]
        D_arg = torch.stack([D, torch.full_like(D, 50.0)], 1)[:, 0]
    S = S0.clone()
    reset_paths()
    with use_kernels(MODE):
        y, S = ssd_step(x, dt, A_arg, BC[:, :g], BC[:, g:], S, D=D_arg, inplace=True)
    assert_triton("ssd_step")
    y_ref, S_ref = ssd_reference(
        x[:, None].double(), dt[:, None].double(), A.double(), BC[:, None, :g].double(), BC[:, None, g:].double(),
        D=None if D is None else D.double(), initial_state=S0.double(),
    )  # fmt: skip
    assert_rel_close(y, y_ref[:, 0], 1e-5, "y")
    assert_rel_close(S, S_ref, 1e-5, "state")


@pytest.mark.parametrize("K", [2, 5])
def test_conv_step_state_slice_of_a_cache(K):
    # The state a strided slice of a larger cache (rows of another layer beside it), K = 2 and 5.
    B, C, L = 2, 40, 6
    gen = torch.Generator().manual_seed(K)
    cache = torch.randn(B, 2 * (K - 1), C, generator=gen).to(DEV)
    state = cache[:, K - 1 :]
    other = cache[:, : K - 1].clone()
    x, w, bias = (
        torch.randn(B, L, C, generator=gen).to(DEV),
        torch.randn(C, K, generator=gen).to(DEV),
        torch.randn(C, generator=gen).to(DEV),
    )
    full = torch.cat([state, x], 1).double()
    want = causal_conv1d_reference(full, w.double()[:, None], bias.double(), None, "silu")[:, K - 1 :]
    outs = []
    reset_paths()
    with use_kernels(MODE):
        for t in range(L):
            outs.append(causal_conv1d_with_state(x[:, t : t + 1], state, w, bias, "silu", inplace=True)[0])
    assert_triton("conv_step")
    assert_rel_close(torch.cat(outs, 1), want, 1e-5, "out")
    assert torch.equal(cache[:, : K - 1], other), "rows outside the state changed"
    assert torch.equal(state, x[:, L - (K - 1) :])


def test_conv_step_state_shorter_than_the_taps():
    # A state of K-2 rows for K = 4 taps: the Triton step reads and shifts K-1 rows whatever the state
    # holds, so it would write past the state (into the cache's next rows); refused by name.
    B, C, K = 2, 8, 4
    cache = torch.zeros(B, K - 1, C, device=DEV)
    cache[:, K - 2 :] = 7.0
    before = cache.clone()
    state = cache[:, : K - 2]
    x, w = torch.randn(B, 1, C, device=DEV), torch.randn(C, K, device=DEV)
    with use_kernels(MODE), pytest.raises(ValueError, match="conv_state has shape"):
        causal_conv1d_with_state(x, state, w, None, None, inplace=True)
    assert torch.equal(cache[:, K - 2 :], before[:, K - 2 :]), "the step wrote outside its state"


# -------------------------------------------------------------------------------------- cross entropy


@pytest.mark.parametrize("V", [1, 5, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_rows_edges(V, dtype):
    if not CUDA and dtype == torch.bfloat16:
        pytest.skip("bf16 stores truncate in the interpreter")
    gen = torch.Generator().manual_seed(V)
    wide = (torch.randn(6, V + 3, generator=gen) * 3).to(DEV, dtype)
    logits = wide[:, 1 : V + 1]  # row stride V + 3
    labels = torch.tensor([0, V - 1, -100, min(2, V - 1), -100, V // 2], device=DEV)
    work = logits.clone()
    loss = cross_entropy_rows_triton(work, labels, -100, write_grad=True)
    ref_in = logits.double().requires_grad_()
    ref = F.cross_entropy(ref_in, labels, reduction="none", ignore_index=-100)
    ref.sum().backward()
    rounded_grad = ref_in.grad.to(dtype)
    assert_rel_close(loss, ref, 1e-5, "loss")
    tol = 1e-6 if dtype == torch.float32 else 2 * rel_err(rounded_grad, ref_in.grad) + 1e-7
    assert_rel_close(work, ref_in.grad, tol, "grad")


def test_cross_entropy_row_starting_with_a_block_of_minus_inf():
    # A whole first block of BLOCK_V logits at -inf: the running maximum stays -inf there, and
    # exp(x - m) must not become exp(-inf + inf) = NaN.
    logits = torch.full((1, 8192), float("-inf"), device=DEV)
    logits[0, 5000] = 1.0
    logits[0, 6000] = 0.0
    labels = torch.tensor([5000], device=DEV)
    loss = cross_entropy_rows_triton(logits.clone(), labels, -100, write_grad=False)
    assert_rel_close(loss, F.cross_entropy(logits.double(), labels, reduction="none"), 1e-6, "loss")


# ------------------------------------------------------------------------------------------ mamba2 core


@pytest.mark.parametrize(
    ("case", "L", "chunk", "bias", "with_D", "cuts", "clamp"),
    [
        ("L1", 1, 64, True, True, (), 0.0),
        ("no_bias_no_D_groups_eq_heads", 70, 64, False, False, (1, 64, 69), 0.3),
    ],
)
def test_mamba2_core_edges(case, L, chunk, bias, with_D, cuts, clamp):
    from tests.ops.test_mamba2_core import core_inputs

    h, p, n = 4, 16, 16
    g = 4 if case.startswith("no_bias") else 2
    ls = core_inputs(2, L, h, p, g, n, device=DEV)
    if not bias:
        ls[2] = None
    if not with_D:
        ls[5] = None
    dims = Mamba2Dims(h, p, g, n, chunk, norm_group_size=h * p // g, eps=EPS, dt_clamp_min=clamp)
    seq = cut_ids(2, L, list(cuts)) if cuts else None
    reset_paths()
    with use_kernels(MODE):
        out = mamba2_core(ls[0], Mamba2Weights(*ls[1:]), seq, dims)
    assert_triton("mamba2_core")
    dout = torch.randn_like(out)
    got = [out, *grads(out, ls, dout)]
    r = [None if t is None else t.detach().double().requires_grad_() for t in ls]
    with use_kernels("torch"):
        ref = mamba2_core_torch(r[0], Mamba2Weights(*r[1:]), seq, dims)
    want = [ref, *grads(ref, r, dout.double())]
    names = ["out", "dzxbcdt", "dconv_w", "dconv_b", "ddt_bias", "dA_log", "dD", "dnorm_w"]
    present = [n_ for n_, t in zip(names[1:], ls) if t is not None]
    for name, a, e in zip(["out", *present], got, want):
        assert_rel_close(a, e, 1e-4, name)
