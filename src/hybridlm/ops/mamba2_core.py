"""The Mamba2 mixer's core between its two projections, as one op.

``zxbcdt`` (the input projection's output) -> split into z | xBC | dt -> causal conv + SiLU over xBC
-> dt = softplus(dt + dt_bias) (clamped from below when asked) -> the SSD scan with A = -exp(A_log)
and the D skip -> gated RMSNorm of the scan output by z.

:func:`mamba2_core_torch` composes the ops of :mod:`.conv`, :mod:`.ssd` and :mod:`.norm` (each
with its own dispatch): the reference path and the CPU path. On CUDA, :func:`mamba2_core` runs one
custom op instead (:mod:`.mamba2_core_triton`), with the same kernels in the same order, so its
results equal the composition's bitwise; what it adds is its backward writing the gradients of z,
xBC and dt straight into one gradient of ``zxbcdt``, where autograd would concatenate three
tensors (a copy of the whole projection's gradient per layer). mamba_ssm's
``mamba_split_conv1d_scan_combined`` is the same idea.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .conv import causal_conv1d
from .dispatch import choose, kernels_mode, record
from .norm import gated_rms_norm
from .precision import accumulation_dtype
from .ssd import ssd_chunked

#: The ops whose kernels the one op runs: an override that sends any of them to torch
#: (the kernel setting ``auto,ssd=torch``) sends the whole core to the composition.
PARTS = ("causal_conv1d", "ssd", "gated_rms_norm")


def mamba2_dt(dt: torch.Tensor, dt_bias: torch.Tensor, clamp_min: float) -> torch.Tensor:
    """(B, L, H) step sizes in float32 (float64 for a float64 ``dt``): softplus(dt + dt_bias), clamped from
    below when ``clamp_min`` > 0."""
    acc = accumulation_dtype(dt, dt_bias)
    dt = F.softplus(dt.to(acc) + dt_bias.to(acc))
    return dt.clamp(min=clamp_min) if clamp_min > 0 else dt


class Mamba2Weights(NamedTuple):
    """The core's parameters: conv weight (conv_dim, 1, K) or (conv_dim, K) and bias (conv_dim,) or
    None; dt_bias, A_log and D (nheads,), D may be None; the gated norm's weight (d_inner,)."""

    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor | None
    norm_weight: torch.Tensor


@dataclass(frozen=True)
class Mamba2Dims:
    """The sizes and constants of one Mamba2 core: ``nheads`` heads of ``headdim``, ``ngroups``
    groups of B and C with state ``d_state``, the scan's ``chunk_size``, the gated norm's
    ``norm_group_size`` and ``eps``, and dt's lower clamp (0: none)."""

    nheads: int
    headdim: int
    ngroups: int
    d_state: int
    chunk_size: int
    norm_group_size: int
    eps: float
    dt_clamp_min: float = 0.0

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    def as_floats(self) -> list[float]:
        """The fields in order, as floats: how a custom op takes them (it takes no dataclass).
        Not ``dataclasses.astuple``: before Python 3.12 it deep-copies each number, which
        torch.compile in torch 2.11 cannot trace: five graph breaks in every compiled Mamba2 block
        (an error under ``fullgraph``)."""
        return [float(getattr(self, f.name)) for f in fields(self)]

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    def check(self, zxbcdt: torch.Tensor) -> None:
        """Raise ValueError when ``zxbcdt`` is not (B, L, d_inner + conv_dim + nheads), or the norm's
        groups do not divide d_inner."""
        width = self.d_inner + self.conv_dim + self.nheads
        if zxbcdt.dim() != 3 or zxbcdt.shape[-1] != width:
            raise ValueError(
                f"mamba2_core: zxbcdt {tuple(zxbcdt.shape)} must be (B, L, {width}) = z {self.d_inner} + "
                f"xBC {self.conv_dim} + dt {self.nheads} for {self.nheads} heads of {self.headdim}, "
                f"{self.ngroups} groups, state {self.d_state}"
            )
        if self.norm_group_size < 1 or self.d_inner % self.norm_group_size:
            raise ValueError(
                f"mamba2_core: norm group size {self.norm_group_size} does not divide d_inner {self.d_inner}"
            )

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, L, d_inner), xBC (B, L, conv_dim), dt (B, L, nheads): column slices of ``t`` (views)."""
        return tuple(torch.split(t, [self.d_inner, self.conv_dim, self.nheads], dim=-1))

    def split_scan(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, H, P), B and C (B, L, G, N): column slices of the conv output (views)."""
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        return (
            x.unflatten(-1, (self.nheads, self.headdim)),
            B.unflatten(-1, (self.ngroups, self.d_state)),
            C.unflatten(-1, (self.ngroups, self.d_state)),
        )


def mamba2_core(
    zxbcdt: torch.Tensor, weights: Mamba2Weights, seq_idx: torch.Tensor | None, dims: Mamba2Dims
) -> torch.Tensor:
    """The Mamba2 core on a whole sequence (no cache).

    Args:
        zxbcdt: (B, L, d_inner + conv_dim + nheads) input projection output (see :class:`Mamba2Dims`).
        weights: the core's parameters (:class:`Mamba2Weights`).
        seq_idx: (B, L) document ids (non-decreasing along L), or None.

    Returns:
        (B, L, d_inner): the gated, normalized scan output (the output projection's input), in the
        dtype the composition returns.
    """
    if choose("mamba2_core", zxbcdt, seq_idx) == "triton" and all(kernels_mode(op) != "torch" for op in PARTS):
        from .mamba2_core_triton import mamba2_core_triton

        return mamba2_core_triton(zxbcdt, weights, seq_idx, dims)
    record("mamba2_core", "torch")
    return mamba2_core_torch(zxbcdt, weights, seq_idx, dims)


def mamba2_core_torch(
    zxbcdt: torch.Tensor, weights: Mamba2Weights, seq_idx: torch.Tensor | None, dims: Mamba2Dims
) -> torch.Tensor:
    """:func:`mamba2_core` as the composition of the conv, SSD and gated-norm ops (the reference)."""
    dims.check(zxbcdt)
    w = weights
    z, xBC, dt = dims.split(zxbcdt)
    x, B, C = dims.split_scan(causal_conv1d(xBC, w.conv_weight, w.conv_bias, seq_idx, "silu"))
    dt = mamba2_dt(dt, w.dt_bias, dims.dt_clamp_min)
    # A_log stays float32 in a float64 model (``keep_fp32``): the activations decide the precision of exp.
    A = -torch.exp(w.A_log.to(accumulation_dtype(x, w.A_log)))
    y = ssd_chunked(x, dt, A, B, C, dims.chunk_size, D=w.D, seq_idx=seq_idx)
    return gated_rms_norm(y.flatten(-2), z, w.norm_weight, dims.norm_group_size, dims.eps)
