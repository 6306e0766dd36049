"""Triton causal depthwise conv (SiLU and document resets fused), forward and backward.

Registered as the custom op ``hybridlm::causal_conv1d`` (with a fake implementation and an
autograd formula) so ``torch.compile`` treats it as one opaque node. :func:`hybridlm.ops.conv.causal_conv1d`
dispatches here; the torch code there is the reference.

Precision: products and sums in float32 whatever the input dtype; the output is stored in
``x``'s dtype; weight and bias gradients are reduced in float32 (per-tile partial sums, then one
deterministic sum) and cast to the parameters' dtype.

Backward, two passes: the first recomputes the pre-activation from ``x`` (not saved, so the op
keeps only its inputs) and forms g = dy * silu'(pre) into a buffer (in dy's dtype; float32 with
``G_IN_DY_DTYPE`` off), elementwise; the second forms dx from K shifted reads of g, and the
weight and bias gradients per tile from those reads and one read of x (fla's order: shifted g
against unshifted x). On an H200, [4, 4096, 6144], the passes take 0.19 + 0.42 ms (0.24 + 0.44
with g in float32); with the weight and bias sums in the first pass instead they took 0.91 + 0.20
(that pass spilled 1.9 kB a thread at its fastest tile). One pass that recomputes g at the K
shifted rows (K² tile loads, no buffer) took 2.20 ms fwd + bwd against 1.54 for those two passes
(docs/benchmarks.md, seventh, eighth and twelfth device sessions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import grid as launch_grid
from .dispatch import record
from .grid import in_row_groups

# Tile sizes (time × channels). Channels are the contiguous dim of x, so BLOCK_C sets the width
# of each coalesced load; BLOCK_L trades the K-1 halo rows re-read per tile against registers.
# Measured on an H200 (``conv_norm_kernels.py --tune --profile``, [4, 4096, 6144], K = 4, kernel
# times): forward 0.17 ms at 32 × 128 (16 × 128 alike); first backward pass 0.24 at 16 × 256
# (16 × 128: 0.25, 32 × 256 × 8 warps: 0.29); second 0.44 at 32 × 128 (16 × 128: 0.56).
FWD_BLOCK_L, FWD_BLOCK_C, FWD_WARPS = 32, 128, 4
BWD_BLOCK_L, BWD_BLOCK_C, BWD_WARPS = 16, 256, 4  # the backward's first pass (g)
DX_BLOCK_L, DX_BLOCK_C, DX_WARPS = 32, 128, 4  # its second pass (dx, dw, db from g and x)
#: g's buffer in dy's dtype (bf16 activations: half the bytes the two passes write and read)
#: instead of float32. Simulated in float64 on CPU (B=2, L=4096, 384 channels), the errors against
#: the rounded reference's: dx 1.00-1.15×, dw 0.90-1.20×, db 1.29-1.38× (the GPU test checks
#: ≤ 2× at L = 4096). sm_90 build: the dx pass spills 48 bytes a thread against 16. Timed on an
#: H200: the conv alone (``conv_norm_kernels.py --tune``) 1.39 ms fwd + bwd against 1.35-1.71 for
#: the float32 buffer, inside its spread; in the whole Mamba2 mixer (``mixers.py --try``, 4 pairs
#: taking turns) 0.978 of the mixer's time with it against without.
G_IN_DY_DTYPE = True


@triton.jit
def _same_doc(seq_ptr, pos, ref_doc, valid):
    """True where position ``pos`` is valid and belongs to document ``ref_doc``."""
    doc = tl.load(seq_ptr + pos, mask=valid, other=-1)
    return valid & (doc == ref_doc)


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    seq_ptr,
    out_ptr,
    L,
    C,
    sx_b,
    sx_l,
    sx_c,
    s_seq_b,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < L
    c_ok = c < C
    x_row = x_ptr + b * sx_b + c[None, :] * sx_c
    seq_row = seq_ptr + b * s_seq_b
    if HAS_SEQ:
        doc_t = tl.load(seq_row + t, mask=t_ok, other=-1)
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        # Tap k multiplies x[t - (K-1-k)]; taps before 0 or in the previous document read zero.
        src = t - (K - 1 - k)
        ok = t_ok & (src >= 0)
        if HAS_SEQ:  # noqa: SIM102 (nested constexpr ifs compile on every Triton 3.x)
            if k < K - 1:
                ok = _same_doc(seq_row, src, doc_t, ok)
        xv = tl.load(x_row + src.to(tl.int64)[:, None] * sx_l, mask=ok[:, None] & c_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + c * K + k, mask=c_ok, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out = out_ptr + b * L * C + t.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv_bwd_g_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    seq_ptr,
    dy_ptr,
    g_ptr,
    L,
    C,
    sx_b,
    sx_l,
    sx_c,
    sdy_b,
    sdy_l,
    sdy_c,
    s_seq_b,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward, first pass (SiLU only), elementwise over a tile of positions p:
    g[p] = dy[p] * silu'(pre[p]), the gradient at the pre-activation, stored in dy's dtype (float32
    with ``G_IN_DY_DTYPE`` off); pre is recomputed from K shifted reads of x as in the forward."""
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < L
    c_ok = c < C
    x_row = x_ptr + b * sx_b + c[None, :] * sx_c
    seq_row = seq_ptr + b * s_seq_b
    if HAS_SEQ:
        doc_p = tl.load(seq_row + p, mask=p_ok, other=-1)
    pre = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        pre += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        src = p - j
        ok = p_ok & (src >= 0)
        if HAS_SEQ:  # noqa: SIM102 (nested constexpr ifs compile on every Triton 3.x)
            if j > 0:
                ok = _same_doc(seq_row, src, doc_p, ok)
        xv = tl.load(x_row + src.to(tl.int64)[:, None] * sx_l, mask=ok[:, None] & c_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + c * K + (K - 1 - j), mask=c_ok, other=0.0).to(tl.float32)
        pre += xv.to(tl.float32) * wv[None, :]
    mask = p_ok[:, None] & c_ok[None, :]
    g = tl.load(dy_ptr + b * sdy_b + p.to(tl.int64)[:, None] * sdy_l + c[None, :] * sdy_c, mask=mask, other=0.0)
    sig = tl.sigmoid(pre)
    g = g.to(tl.float32) * sig * (1.0 + pre * (1.0 - sig))
    g_out = g_ptr + b * L * C + p.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(g_out, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_dx_kernel(
    g_ptr,
    x_ptr,
    w_ptr,
    seq_ptr,
    dx_ptr,
    dw_part_ptr,
    db_part_ptr,
    L,
    C,
    n_tiles_l,
    sg_b,
    sg_l,
    sg_c,
    sx_b,
    sx_l,
    sx_c,
    sdx_b,
    sdx_l,
    sdx_c,
    s_seq_b,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward, second pass, over a tile of positions t, from K shifted reads of g (the gradient at
    the pre-activation) and one read of x: dx[t] = sum_s w[K-1-s] * g[t+s], and the tile's partial
    sums dw[K-1-s] = sum_t g[t+s] * x[t] and db = sum_t g[t], over pairs (t, t+s) inside one document.

    The K products for dw go into one (KP, BLOCK_L, BLOCK_C) tensor (KP: K rounded up to a power of
    two) summed over rows once: on an H200 0.44 ms for [4, 4096, 6144] against 0.73 with one row
    sum per tap, and against 0.53 with a program walking 256 rows and summing once at the end.
    """
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    taps = tl.arange(0, KP)[:, None, None]
    g_row = g_ptr + b * sg_b + c[None, :] * sg_c
    x_row = x_ptr + b * sx_b + c[None, :] * sx_c
    dx_row = dx_ptr + b * sdx_b + c[None, :] * sdx_c
    seq_row = seq_ptr + b * s_seq_b
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    t_ok = t < L
    if HAS_SEQ:
        doc_t = tl.load(seq_row + t, mask=t_ok, other=-1)
    mask = t_ok[:, None] & c_ok[None, :]
    xv = tl.load(x_row + t.to(tl.int64)[:, None] * sx_l, mask=mask, other=0.0).to(tl.float32)
    dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    dw_prod = tl.zeros((KP, BLOCK_L, BLOCK_C), dtype=tl.float32)
    for s in tl.static_range(K):
        pos = t + s
        ok = t_ok & (pos < L)
        if HAS_SEQ:  # noqa: SIM102 (nested constexpr ifs compile on every Triton 3.x)
            if s > 0:
                ok = _same_doc(seq_row, pos, doc_t, ok)
        gv = tl.load(g_row + pos.to(tl.int64)[:, None] * sg_l, mask=ok[:, None] & c_ok[None, :], other=0.0)
        gv = gv.to(tl.float32)
        w_s = tl.load(w_ptr + c * K + (K - 1 - s), mask=c_ok, other=0.0).to(tl.float32)
        dx += gv * w_s[None, :]
        dw_prod += tl.where(taps == K - 1 - s, (gv * xv)[None, :, :], 0.0)
        if HAS_BIAS:  # noqa: SIM102 (nested constexpr ifs compile on every Triton 3.x)
            if s == 0:
                tl.store(db_part_ptr + (b * n_tiles_l + pid_l) * C + c, tl.sum(gv, axis=0), mask=c_ok)
    tl.store(dx_row + t.to(tl.int64)[:, None] * sdx_l, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    k2 = tl.arange(0, KP)[:, None]
    part = (b * n_tiles_l + pid_l) * K * C
    tl.store(dw_part_ptr + part + k2 * C + c[None, :], tl.sum(dw_prod, axis=1), mask=(k2 < K) & c_ok[None, :])


def _check(x: torch.Tensor, weight: torch.Tensor, seq_idx: torch.Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (B, L, C), got shape {tuple(x.shape)}")
    if weight.shape[0] != x.shape[2]:
        raise ValueError(f"causal_conv1d: weight has {weight.shape[0]} channels, x has {x.shape[2]}")
    if seq_idx is not None and tuple(seq_idx.shape) != tuple(x.shape[:2]):
        raise ValueError(f"causal_conv1d: seq_idx must be (B, L) = {tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}")


def _seq(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    # The kernels index seq_idx as (B, L) with unit stride along L.
    return None if seq_idx is None else seq_idx.contiguous()


def conv_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """(B, L, C) contiguous in x's dtype; ``weight`` (C, K) contiguous."""
    B, L, C = x.shape
    K = weight.shape[1]
    out = torch.empty(B, L, C, dtype=x.dtype, device=x.device)
    seq = _seq(seq_idx)
    grid = (triton.cdiv(L, FWD_BLOCK_L), triton.cdiv(C, FWD_BLOCK_C), B)
    if out.numel() == 0:
        return out
    _conv_fwd_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        seq if seq is not None else weight,
        out,
        L,
        C,
        *x.stride(),
        seq.stride(0) if seq is not None else 0,
        K=K,
        HAS_BIAS=bias is not None,
        HAS_SEQ=seq is not None,
        SILU=silu,
        BLOCK_L=FWD_BLOCK_L,
        BLOCK_C=FWD_BLOCK_C,
        num_warps=FWD_WARPS,
    )
    return out


@torch.library.custom_op("hybridlm::causal_conv1d_fwd", mutates_args=())
def _conv_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    record("causal_conv1d", "triton")  # also at run time inside compiled graphs (tracing records nothing)
    return conv_forward(x, weight, bias, seq_idx, silu)


@_conv_fwd.register_fake
def _(x, weight, bias, seq_idx, silu):
    return x.new_empty(x.shape)


def conv_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    dy: torch.Tensor,
    silu: bool,
    dx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw (C, K), db (C,) or empty) from dy (B, L, C); ``dx``: a (B, L, C) tensor (any strides,
    e.g. a column slice of a wider gradient) to write dx into instead of a new one."""
    B, L, C = x.shape
    K = weight.shape[1]
    n_tiles = max(1, triton.cdiv(L, DX_BLOCK_L))
    if dx is None:
        dx = torch.empty(B, L, C, dtype=x.dtype, device=x.device)
    # Every tile writes its rows of the partial sums (zeros only for an empty input).
    part = torch.empty if dx.numel() else torch.zeros
    dw_part = part(B * n_tiles, K, C, dtype=torch.float32, device=x.device)
    db_part = part(B * n_tiles, C, dtype=torch.float32, device=x.device) if bias is not None else dw_part
    seq = _seq(seq_idx)
    if dx.numel():
        seq_arg = seq if seq is not None else weight
        s_seq = seq.stride(0) if seq is not None else 0
        g = dy  # without SiLU the gradient at the pre-activation is dy itself
        if silu:
            # g goes through a buffer: dx at t needs g at t..t+K-1, which the next tile
            # computes; recomputing it there costs K× the loads.
            g = torch.empty(B, L, C, dtype=dy.dtype if G_IN_DY_DTYPE else torch.float32, device=x.device)
            _conv_bwd_g_kernel[(triton.cdiv(L, BWD_BLOCK_L), triton.cdiv(C, BWD_BLOCK_C), B)](
                x,
                weight,
                bias if bias is not None else weight,
                seq_arg,
                dy,
                g,
                L,
                C,
                *x.stride(),
                *dy.stride(),
                s_seq,
                K=K,
                HAS_BIAS=bias is not None,
                HAS_SEQ=seq is not None,
                BLOCK_L=BWD_BLOCK_L,
                BLOCK_C=BWD_BLOCK_C,
                num_warps=BWD_WARPS,
            )
        _conv_bwd_dx_kernel[(n_tiles, triton.cdiv(C, DX_BLOCK_C), B)](
            g,
            x,
            weight,
            seq_arg,
            dx,
            dw_part,
            db_part,
            L,
            C,
            n_tiles,
            *g.stride(),
            *x.stride(),
            *dx.stride(),
            s_seq,
            K=K,
            KP=triton.next_power_of_2(K),
            HAS_BIAS=bias is not None,
            HAS_SEQ=seq is not None,
            BLOCK_L=DX_BLOCK_L,
            BLOCK_C=DX_BLOCK_C,
            num_warps=DX_WARPS,
        )
    dw = dw_part.sum(0).t().contiguous().to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else weight.new_zeros(0)
    return dx, dw, db


@torch.library.custom_op("hybridlm::causal_conv1d_bwd", mutates_args=())
def _conv_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    dy: torch.Tensor,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return conv_backward(x, weight, bias, seq_idx, dy, silu)


@_conv_bwd.register_fake
def _(x, weight, bias, seq_idx, dy, silu):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


def _conv_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx)
    ctx.silu = silu


def _conv_backward(ctx, dy):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dw, db = _conv_bwd(x, weight, bias, seq_idx, dy, ctx.silu)
    return dx, dw, db if bias is not None else None, None, None


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """The Triton path of :func:`hybridlm.ops.conv.causal_conv1d`.

    Args:
        x: (B, L, C), any strides (e.g. a column slice of a wider projection output; no copy is made).
        weight: (C, K) taps (any float dtype; made contiguous, it is small).
        bias: (C,) or None.
        seq_idx: (B, L) integer document ids, non-decreasing along L, or None.
        silu: apply SiLU after the bias.

    Returns:
        (B, L, C) contiguous, dtype of ``x``.
    """
    _check(x, weight, seq_idx)
    if x.shape[0] > launch_grid.MAX_GRID_YZ:  # the batch is the grids' third dimension

        def part(x, seq_idx):
            return causal_conv1d_triton(x, weight, bias, seq_idx, silu)

        return in_row_groups(part, launch_grid.MAX_GRID_YZ, x, seq_idx)
    # The (C,) bias is read as b_ptr + channel: contiguous, like the taps (a no-op for parameters).
    return _conv_fwd(x, weight.contiguous(), None if bias is None else bias.contiguous(), seq_idx, silu)
