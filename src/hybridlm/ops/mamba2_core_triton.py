"""The Triton path of :func:`hybridlm.ops.mamba2_core.mamba2_core`: one custom op, forward and backward.

The forward runs the conv, SSD and gated-norm launchers (:mod:`.conv_triton`, :mod:`.ssd_triton`,
:mod:`.norm_triton`) in the composition's order; the backward runs their backward launchers with
outputs given: the gated norm writes dz, and the conv writes dx, into their columns of one
(B, L, d_inner + conv_dim + H) gradient, and the SSD writes dx, dB and dC into the columns of the
conv output's gradient, so nothing is concatenated. Every value equals the composition's bitwise:
the same kernels on the same inputs, and the few torch ops (dt's softplus and clamp, A = -exp(A_log))
differentiated by the formulas autograd uses.
"""

from __future__ import annotations

import torch

from .conv_triton import conv_backward, conv_forward
from .dispatch import record
from .grid import in_row_groups, rows_per_launch
from .mamba2_core import PARTS, Mamba2Dims, Mamba2Weights, mamba2_dt
from .norm_triton import gated_norm_backward, gated_norm_forward
from .ssd_triton import launch_context, ssd_backward, ssd_forward


@torch.library.custom_op("hybridlm::mamba2_core_fwd", mutates_args=())
def _core_fwd(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor | None,
    norm_weight: torch.Tensor,
    seq_idx: torch.Tensor | None,
    dims: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, L, d_inner), and for the backward: the conv output (B, L, conv_dim), dt (B, L, H)
    float32, the scan output (B, L, H, P), the SSD's chunk states, the norm's rstd).
    ``dims``: the fields of :class:`Mamba2Dims` in order (a custom op takes no dataclass)."""
    for op in (*PARTS, "mamba2_core"):  # at run time too, inside compiled graphs
        record(op, "triton")
    d = _dims(dims)
    with launch_context(zxbcdt):
        z, xBC_in, dt_raw = d.split(zxbcdt)
        xBC = conv_forward(xBC_in, conv_weight, conv_bias, seq_idx, True)
        dt = mamba2_dt(dt_raw, dt_bias, d.dt_clamp_min)
        x, B, C = d.split_scan(xBC)
        y, states = ssd_forward(x, dt, -torch.exp(A_log.float()), B, C, D, seq_idx, None, d.chunk_size)
        out, rstd = gated_norm_forward(y.view(-1, d.d_inner), z.flatten(0, 1), norm_weight, d.norm_group_size, d.eps)
    return out.view(z.shape), xBC, dt, y, states, rstd


@_core_fwd.register_fake
def _(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, seq_idx, dims):
    d = _dims(dims)
    b, seqlen, _ = zxbcdt.shape
    f32 = torch.float32
    return (
        zxbcdt.new_empty(b, seqlen, d.d_inner),
        zxbcdt.new_empty(b, seqlen, d.conv_dim),
        zxbcdt.new_empty(b, seqlen, d.nheads, dtype=f32),
        zxbcdt.new_empty(b, seqlen, d.nheads, d.headdim),
        zxbcdt.new_empty(b, -(-seqlen // d.chunk_size) + 1, d.nheads, d.headdim, d.d_state, dtype=f32),
        zxbcdt.new_empty(b * seqlen, d.d_inner // d.norm_group_size, dtype=f32),
    )


@torch.library.custom_op("hybridlm::mamba2_core_bwd", mutates_args=())
def _core_bwd(
    dout: torch.Tensor,
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor | None,
    norm_weight: torch.Tensor,
    seq_idx: torch.Tensor | None,
    xBC: torch.Tensor,
    dt: torch.Tensor,
    y: torch.Tensor,
    states: torch.Tensor,
    rstd: torch.Tensor,
    dims: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d zxbcdt, d conv_weight (conv_dim, K), d conv_bias (or empty), d dt_bias, d A_log, d D (or empty), d norm_weight)."""
    d = _dims(dims)
    with launch_context(zxbcdt):
        grad = torch.empty_like(zxbcdt, memory_format=torch.contiguous_format)
        z, xBC_in, dt_raw = d.split(zxbcdt)
        dz, dxBC_in, ddt_raw = d.split(grad)
        # Gated norm: dz into its columns of the gradient, dy (the scan output's gradient) apart.
        dy, _, dnorm = gated_norm_backward(
            y.view(-1, d.d_inner), z.flatten(0, 1), norm_weight, rstd, dout.reshape(-1, d.d_inner), d.norm_group_size,
            dz=dz.flatten(0, 1),
        )  # fmt: skip
        # SSD: dx, dB and dC into the columns of the conv output's gradient.
        dxBC = torch.empty_like(xBC)
        x, B, C = d.split_scan(xBC)
        outs = d.split_scan(dxBC)
        exp_A_log = torch.exp(A_log.float())  # A = -exp(A_log), as in the forward
        A = -exp_A_log
        dx, ddt, dA, dB, dC, dD, _ = ssd_backward(
            dy.view(y.shape), None, states, x, dt, A, B, C, D, seq_idx, None, d.chunk_size, out=outs
        )
        for got, view in zip((dx, dB, dC), outs):
            if got.data_ptr() != view.data_ptr():  # the kernels stored another dtype (the interpreter's float32)
                view.copy_(got)
        # Conv: dx into its columns of the gradient.
        _, dconv_w, dconv_b = conv_backward(xBC_in, conv_weight, conv_bias, seq_idx, dxBC, True, dx=dxBC_in)
        # dt = clamp(softplus(dt_raw + dt_bias)) and A = -exp(A_log), as autograd differentiates them.
        u = dt_raw.float() + dt_bias.float()
        if d.dt_clamp_min > 0:
            ddt = torch.where(torch.nn.functional.softplus(u) >= d.dt_clamp_min, ddt, 0.0)
        du = torch.ops.aten.softplus_backward(ddt, u, 1.0, 20.0)
        ddt_raw.copy_(du)
        d_dt_bias = du.sum((0, 1)).to(dt_bias.dtype)
        dA_log = ((-dA) * exp_A_log).to(A_log.dtype)
        dD = dD.to(D.dtype) if D is not None else dD.new_empty(0)
    return grad, dconv_w, dconv_b, d_dt_bias, dA_log, dD, dnorm


@_core_bwd.register_fake
def _(dout, zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, seq_idx, xBC, dt, y, states, rstd, dims):
    return (
        zxbcdt.new_empty(zxbcdt.shape),
        conv_weight.new_empty(conv_weight.shape),
        conv_bias.new_empty(conv_bias.shape) if conv_bias is not None else conv_weight.new_empty(0),
        dt_bias.new_empty(dt_bias.shape),
        A_log.new_empty(A_log.shape),
        D.new_empty(D.shape) if D is not None else dt_bias.new_empty(0),
        norm_weight.new_empty(norm_weight.shape),
    )


def _dims(values: list[float]) -> Mamba2Dims:
    """The op's ``dims`` list back as :class:`Mamba2Dims` (its integer fields as ints)."""
    *ints, eps, clamp = values
    return Mamba2Dims(*(int(v) for v in ints), eps=float(eps), dt_clamp_min=float(clamp))


def _setup(ctx, inputs, output):
    *tensors, dims = inputs
    _, *saved = output
    ctx.save_for_backward(*tensors, *saved)
    ctx.dims = dims
    # The outputs kept for the backward get no gradient; materialized they would be zero-filled
    # tensors as large as the conv output, the scan output and the chunk states.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, *_unused):
    # Unpacked once: under activation checkpointing each unpack recomputes or hands over the
    # tensors, and a second ``ctx.saved_tensors`` raises CheckpointError.
    saved = ctx.saved_tensors
    if dout is None:  # the output took no part in the loss
        y = saved[10]
        dout = y.new_zeros(*y.shape[:2], y.shape[2] * y.shape[3])
    grad, dw, db, d_dt_bias, dA_log, dD, dnorm = _core_bwd(dout, *saved, ctx.dims)
    conv_bias, D = saved[2], saved[5]
    return (
        grad, dw, db if conv_bias is not None else None, d_dt_bias, dA_log, dD if D is not None else None, dnorm,
        None, None,
    )  # fmt: skip


_core_fwd.register_autograd(_backward, setup_context=_setup)


def mamba2_core_triton(
    zxbcdt: torch.Tensor, weights: Mamba2Weights, seq_idx: torch.Tensor | None, dims: Mamba2Dims
) -> torch.Tensor:
    """The Triton path of :func:`hybridlm.ops.mamba2_core.mamba2_core` (same arguments, same result)."""
    dims.check(zxbcdt)
    # The kernels read the small weights as pointer + index: contiguous (a no-op for parameters).
    w = Mamba2Weights(*(None if t is None else t.contiguous() for t in weights))
    w = w._replace(conv_weight=w.conv_weight.reshape(w.conv_weight.shape[0], -1))
    seq = seq_idx.contiguous() if seq_idx is not None else None

    def core(rows: torch.Tensor, seq_rows: torch.Tensor | None) -> torch.Tensor:
        return _core_fwd(rows, *w, seq_rows, dims.as_floats())[0]

    # The scan's grid holds batch x heads programs along one dimension (hybridlm.ops.grid).
    return in_row_groups(core, rows_per_launch(dims.nheads), zxbcdt, seq)
