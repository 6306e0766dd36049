"""Triton kernels for Mamba2's gated group RMSNorm and the residual-add + RMSNorm seam, forward and backward.

Each is a custom op (``hybridlm::gated_rms_norm_fwd``, ``hybridlm::add_rms_norm_fwd``) with a fake
implementation and an autograd formula, so ``torch.compile`` keeps it as one node.
:mod:`hybridlm.ops.norm` dispatches here; the torch code there is the reference.

Precision: all math in float32; outputs stored in the reference's dtypes; weight gradients
reduced in float32 (per-program partial sums, then one deterministic sum). The forward saves
only the per-row (per-group) ``rstd`` in float32; the backward recomputes the normalized values
(and, for the gated norm, the gate ``y * silu(z)``) from the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import record

# Largest row (add_rms_norm) or group (gated norm) one program holds in registers.
MAX_BLOCK_N = 65536
# Programs that accumulate weight-gradient partials: each loops over a share of the row tiles.
BWD_PROGRAMS = 512


def _tile(n: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N columns, num_warps) for rows of ``n`` elements: ~4k elements per tile."""
    block_n = triton.next_power_of_2(n)
    if block_n > MAX_BLOCK_N:
        raise ValueError(f"norm kernels: a row/group of {n} elements exceeds the Triton kernel's limit {MAX_BLOCK_N}")
    block_m = max(1, min(16, 4096 // block_n))
    warps = min(16, max(4, block_m * block_n // 1024))
    return block_m, block_n, warps


# ----------------------------------------------------------------------------- gated RMSNorm


@triton.jit
def _gated_fwd_kernel(
    y_ptr,
    z_ptr,
    w_ptr,
    out_ptr,
    rstd_ptr,
    M,
    D,
    n_groups,
    group_size,
    sy,
    sz,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    grp = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    cols = grp * group_size + offs
    mask = (rows < M)[:, None] & (offs < group_size)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    y = tl.load(y_ptr + r64 * sy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r64 * sz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = y * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=1) / group_size + eps)
    w = tl.load(w_ptr + cols, mask=offs < group_size, other=0.0).to(tl.float32)
    out = g * rstd[:, None] * w[None, :]
    tl.store(out_ptr + r64 * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * n_groups + grp, rstd, mask=rows < M)


@triton.jit
def _gated_bwd_kernel(
    y_ptr,
    z_ptr,
    w_ptr,
    rstd_ptr,
    dout_ptr,
    dy_ptr,
    dz_ptr,
    dw_part_ptr,
    M,
    D,
    n_groups,
    group_size,
    sy,
    sz,
    sdo,
    sdz,
    tiles_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    grp = tl.program_id(1)
    offs = tl.arange(0, BLOCK_N)
    cols = grp * group_size + offs
    col_ok = offs < group_size
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(tiles_per_program):
        rows = (pid_m * tiles_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        y = tl.load(y_ptr + r64 * sy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + r64 * sz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + r64 * sdo + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows * n_groups + grp, mask=rows < M, other=0.0)
        sig = tl.sigmoid(z)
        n = y * z * sig * rstd[:, None]  # normalized gate, recomputed
        dn = do * w[None, :]
        dw += tl.sum(do * n, axis=0)
        # d/dg of g * rstd(g): rstd * (dn - n * mean(dn * n)) over the group.
        dg = (dn - n * (tl.sum(dn * n, axis=1) / group_size)[:, None]) * rstd[:, None]
        dy = dg * z * sig
        dz = dg * y * sig * (1.0 + z * (1.0 - sig))
        tl.store(dy_ptr + r64 * D + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + r64 * sdz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid_m * D + cols, dw, mask=col_ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(M, D) with unit column stride (a view when possible; the kernels take the row stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def gated_norm_forward(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (M, D) in y's dtype, rstd (M, D / group_size) float32) for (M, D) rows."""
    y, z = _rows(y), _rows(z)
    M, D = y.shape
    G = D // group_size
    block_m, block_n, warps = _tile(group_size)
    out = torch.empty(M, D, dtype=y.dtype, device=y.device)
    rstd = torch.empty(M, G, dtype=torch.float32, device=y.device)
    grid = (triton.cdiv(M, block_m), G)
    if M == 0:
        return out, rstd
    _gated_fwd_kernel[grid](
        y, z, weight, out, rstd, M, D, G, group_size, y.stride(0), z.stride(0), eps,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return out, rstd


@torch.library.custom_op("hybridlm::gated_rms_norm_fwd", mutates_args=())
def _gated_fwd(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    record("gated_rms_norm", "triton")  # also at run time inside compiled graphs (tracing records nothing)
    return gated_norm_forward(y, z, weight, group_size, eps)


@_gated_fwd.register_fake
def _(y, z, weight, group_size, eps):
    M, D = y.shape
    return y.new_empty(M, D), y.new_empty(M, D // group_size, dtype=torch.float32)


def gated_norm_backward(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dout: torch.Tensor,
    group_size: int,
    dz: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dz, dweight) for (M, D) rows; ``dz``: an (M, D) tensor with unit column stride (e.g. a
    column slice of a wider gradient) to write dz into instead of a new one."""
    y, z, dout = _rows(y), _rows(z), _rows(dout)
    M, D = y.shape
    G = D // group_size
    block_m, block_n, warps = _tile(group_size)
    n_tiles = max(1, triton.cdiv(M, block_m))
    programs = min(n_tiles, max(1, BWD_PROGRAMS // G))
    per_program = triton.cdiv(n_tiles, programs)
    programs = triton.cdiv(n_tiles, per_program)
    dy = torch.empty(M, D, dtype=y.dtype, device=y.device)
    if dz is None:
        dz = torch.empty(M, D, dtype=z.dtype, device=z.device)
    dw_part = torch.empty(programs, D, dtype=torch.float32, device=y.device)
    _gated_bwd_kernel[(programs, G)](
        y, z, weight, rstd, dout, dy, dz, dw_part, M, D, G, group_size,
        y.stride(0), z.stride(0), dout.stride(0), dz.stride(0), per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return dy, dz, dw_part.sum(0).to(weight.dtype)


@torch.library.custom_op("hybridlm::gated_rms_norm_bwd", mutates_args=())
def _gated_bwd(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dout: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_norm_backward(y, z, weight, rstd, dout, group_size)


@_gated_bwd.register_fake
def _(y, z, weight, rstd, dout, group_size):
    return y.new_empty(y.shape), z.new_empty(z.shape), weight.new_empty(weight.shape)


def _gated_setup(ctx, inputs, output):
    y, z, weight, group_size, _ = inputs
    ctx.save_for_backward(y, z, weight, output[1])
    ctx.group_size = group_size


def _gated_backward(ctx, dout, _drstd):
    y, z, weight, rstd = ctx.saved_tensors
    dy, dz, dw = _gated_bwd(y, z, weight, rstd, dout, ctx.group_size)
    return dy, dz, dw, None, None


_gated_fwd.register_autograd(_gated_backward, setup_context=_gated_setup)


def gated_rms_norm_triton(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """The Triton path of :func:`hybridlm.ops.norm.gated_rms_norm`.

    Args:
        y: (..., D) scan output; z: (..., D) gate (may be a column slice of a wider tensor);
        weight: (D,); ``D`` a multiple of ``group_size``.

    Returns:
        (..., D) in ``y``'s dtype.
    """
    D = y.shape[-1]
    if z.shape != y.shape or weight.shape != (D,) or D % group_size:
        raise ValueError(
            f"gated_rms_norm: y {tuple(y.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}, "
            f"group_size {group_size}: need y and z of one shape (..., D), weight (D,), D divisible by group_size"
        )
    out, _ = _gated_fwd(y.reshape(-1, D), z.reshape(-1, D), weight.contiguous(), group_size, eps)
    return out.view(y.shape)


# ----------------------------------------------------------------------------- add + RMSNorm


@triton.jit
def _add_norm_fwd_kernel(
    x_ptr,
    d_ptr,
    w_ptr,
    h_ptr,
    out_ptr,
    rstd_ptr,
    M,
    D,
    sx,
    sd,
    eps,
    HAS_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h = tl.load(x_ptr + r64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(d_ptr + r64 * sd + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Round the sum to h's dtype first, then normalize the rounded h: exactly what
        # ``h = x + delta; rms_norm(h)`` computes.
        h = (h + d).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + r64 * D + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    out = h * rstd[:, None] * w[None, :]
    tl.store(out_ptr + r64 * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_DELTA:  # the backward's saved statistic (the forward-only plain norm needs none)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _add_norm_bwd_kernel(
    h_ptr,
    w_ptr,
    rstd_ptr,
    dh_ptr,
    dout_ptr,
    dx_ptr,
    dd_ptr,
    dw_part_ptr,
    M,
    D,
    sdh,
    sdo,
    tiles_per_program,
    HAS_DH: tl.constexpr,
    TWO_GRADS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(tiles_per_program):
        rows = (pid * tiles_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        h = tl.load(h_ptr + r64 * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + r64 * sdo + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        n = h * rstd[:, None]
        dn = do * w[None, :]
        dw += tl.sum(do * n, axis=0)
        # The residual stream's gradient plus the norm's: dh + rstd * (dn - n * mean(dn * n)).
        g = (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None]) * rstd[:, None]
        if HAS_DH:
            g += tl.load(dh_ptr + r64 * sdh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + r64 * D + cols[None, :], g.to(dx_ptr.dtype.element_ty), mask=mask)
        if TWO_GRADS:
            tl.store(dd_ptr + r64 * D + cols[None, :], g.to(dd_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * D + cols, dw, mask=col_ok)


@torch.library.custom_op("hybridlm::add_rms_norm_fwd", mutates_args=())
def _add_norm_fwd(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    record("add_rms_norm", "triton")  # also at run time inside compiled graphs (tracing records nothing)
    x, delta = _rows(x), _rows(delta)
    M, D = x.shape
    dtype = torch.promote_types(x.dtype, delta.dtype)
    block_m, block_n, warps = _tile(D)
    h = torch.empty(M, D, dtype=dtype, device=x.device)
    out = torch.empty(M, D, dtype=dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return h, out, rstd
    _add_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, delta, weight, h, out, rstd, M, D, x.stride(0), delta.stride(0), eps,
        HAS_DELTA=True, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return h, out, rstd


@_add_norm_fwd.register_fake
def _(x, delta, weight, eps):
    M, D = x.shape
    dtype = torch.promote_types(x.dtype, delta.dtype)
    return x.new_empty(M, D, dtype=dtype), x.new_empty(M, D, dtype=dtype), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("hybridlm::add_rms_norm_bwd", mutates_args=())
def _add_norm_bwd(
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dh: torch.Tensor | None,
    dout: torch.Tensor,
    x_dtype: torch.dtype,
    delta_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dout = _rows(dout)
    dh = None if dh is None else _rows(dh)
    M, D = h.shape
    block_m, block_n, warps = _tile(D)
    n_tiles = max(1, triton.cdiv(M, block_m))
    per_program = triton.cdiv(n_tiles, min(n_tiles, BWD_PROGRAMS))
    programs = triton.cdiv(n_tiles, per_program)
    dx = torch.empty(M, D, dtype=x_dtype, device=h.device)
    two = x_dtype != delta_dtype
    dd = torch.empty(M, D, dtype=delta_dtype, device=h.device) if two else dx
    dw_part = torch.empty(programs, D, dtype=torch.float32, device=h.device)
    _add_norm_bwd_kernel[(programs,)](
        h, weight, rstd, dh if dh is not None else dout, dout, dx, dd, dw_part, M, D,
        dh.stride(0) if dh is not None else 0, dout.stride(0), per_program,
        HAS_DH=dh is not None, TWO_GRADS=two, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    # Outputs of a custom op may not alias each other: with one dtype the (equal) delta gradient
    # is returned as a view by the autograd formula instead.
    return dx, dd if two else dx.new_empty(0), dw_part.sum(0).to(weight.dtype)


@_add_norm_bwd.register_fake
def _(h, weight, rstd, dh, dout, x_dtype, delta_dtype):
    dd = h.new_empty(h.shape, dtype=delta_dtype) if x_dtype != delta_dtype else h.new_empty(0, dtype=delta_dtype)
    return h.new_empty(h.shape, dtype=x_dtype), dd, weight.new_empty(weight.shape)


def _add_norm_setup(ctx, inputs, output):
    x, delta, weight, _ = inputs
    h, _, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.dtypes = (x.dtype, delta.dtype)


def _add_norm_backward(ctx, dh, dout, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dout is None:  # only h was used downstream
        dout = torch.zeros_like(h)
    dx, dd, dw = _add_norm_bwd(h, weight, rstd, dh, dout, *ctx.dtypes)
    if ctx.dtypes[0] == ctx.dtypes[1]:
        dd = dx  # one dtype: the add's two gradients are one tensor, as in autograd's own AddBackward
    return dx, dd, dw, None


_add_norm_fwd.register_autograd(_add_norm_backward, setup_context=_add_norm_setup)


def add_rms_norm_triton(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`hybridlm.ops.norm.add_rms_norm`: one kernel writes ``h`` and ``rms_norm(h)``.

    Args:
        x: (..., D) residual stream; delta: (..., D) the mixer's output (dtypes may differ);
        weight: (D,).

    Returns:
        ``(h, normed)``, both (..., D) in ``torch.promote_types(x.dtype, delta.dtype)``, as
        ``x + delta`` gives in PyTorch (a float32 residual stays float32 under bf16 autocast).
    """
    D = x.shape[-1]
    if delta.shape != x.shape or weight.shape != (D,):
        raise ValueError(
            f"add_rms_norm: x {tuple(x.shape)}, delta {tuple(delta.shape)}, weight {tuple(weight.shape)}: "
            "need x and delta of one shape (..., D) and weight (D,)"
        )
    # .contiguous() on the (D,) weight: the kernels read it as w_ptr + column (a no-op for a parameter).
    h, out, _ = _add_norm_fwd(x.reshape(-1, D), delta.reshape(-1, D), weight.contiguous(), eps)
    return h.view(x.shape), out.view(x.shape)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Forward-only Triton path of :func:`hybridlm.ops.norm.rms_norm`, for inference.

    One launch in place of the reference's casts, norm and cast back: a decode step runs a norm
    per layer on a single token, where launches, not bytes, are the cost. Training keeps the
    torch path (inductor fuses it with its neighbours inside compiled blocks), so this has no
    autograd formula; the dispatcher calls it only when no gradient is wanted.

    Args:
        x: (..., D) activations of any float dtype; weight: (D,).

    Returns:
        (..., D) in ``x``'s dtype, normalized in float32.
    """
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}: need weight (D,) = ({D},)")
    rows = _rows(x.reshape(-1, D))
    M = rows.shape[0]
    out = torch.empty(M, D, dtype=x.dtype, device=x.device)
    if M:
        block_m, block_n, warps = _tile(D)
        _add_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
            rows, rows, weight.contiguous(), out, out, out, M, D, rows.stride(0), 0, eps,
            HAS_DELTA=False, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
    return out.view(x.shape)


# ----------------------------------------------------------------------------- RMSNorm, then the gate


@triton.jit
def _norm_gate_fwd_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    out_ptr,
    M,
    D,
    sx,
    sz,
    eps,
    ROUND_PRODUCT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rows of x normalized in float32, rounded to x's dtype, scaled by w (the product rounded to x's dtype too where
    ROUND_PRODUCT: torch's product of two bf16 tensors), times silu(z) in float32, stored in x's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * sx + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps)
    n = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    t = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :] * n
    if ROUND_PRODUCT:
        t = t.to(x.dtype).to(tl.float32)
    z = tl.load(z_ptr + r64 * sz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r64 * D + cols[None, :], (t * z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_then_gate_triton(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Forward-only Triton path of :func:`hybridlm.ops.norm.rms_norm_then_gate`, for inference: one launch in place of
    the reference's ops (casts, the norm's four, the scale, silu, the product, the cast back: about ten).

    Args:
        x: (..., D); z: (..., D) the gate; weight: (D,) in x's dtype or float32.

    Returns:
        (..., D) in x's dtype.
    """
    D = x.shape[-1]
    if z.shape != x.shape or weight.shape != (D,):
        raise ValueError(
            f"rms_norm_then_gate: x {tuple(x.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}: need x and z "
            "of one shape (..., D) and weight (D,)"
        )
    rows, gates = _rows(x.reshape(-1, D)), _rows(z.reshape(-1, D))
    M = rows.shape[0]
    out = torch.empty(M, D, dtype=x.dtype, device=x.device)
    if M:
        block_m, block_n, warps = _tile(D)
        _norm_gate_fwd_kernel[(triton.cdiv(M, block_m),)](
            rows, gates, weight.contiguous(), out, M, D, rows.stride(0), gates.stride(0), eps,
            ROUND_PRODUCT=torch.promote_types(weight.dtype, x.dtype) == x.dtype and x.dtype != torch.float32,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
    return out.view(x.shape)
