"""Causal depthwise 1-D convolution over time, with optional resets at document boundaries."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import choose, triton_available

if triton_available():
    from .conv_triton import causal_conv1d_triton


def check_conv_shapes(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None
) -> None:
    """Raise ValueError naming the argument whose shape does not fit ``x: (B, L, C)``: the shifted sums
    of the torch path would broadcast a (1, K) weight, a (1,) bias or a (1, L) ``seq_idx`` over every
    channel or row (the Triton kernels refuse or misread them), a silent wrong result on the CPU."""
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (B, L, C), got shape {tuple(x.shape)}")
    C = x.shape[2]
    if weight.dim() not in (2, 3) or weight.shape[0] != C or (weight.dim() == 3 and weight.shape[1] != 1):
        raise ValueError(
            f"causal_conv1d: weight must be ({C}, K) or ({C}, 1, K) for x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"causal_conv1d: bias must be ({C},) for x {tuple(x.shape)}, got {tuple(bias.shape)}")
    if seq_idx is not None and tuple(seq_idx.shape) != tuple(x.shape[:2]):
        raise ValueError(f"causal_conv1d: seq_idx must be (B, L) = {tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``out[t] = bias + sum_s weight[:, K-1-s] * x[t-s]`` for ``s < K``, never reaching across documents.

    Same taps as ``nn.Conv1d(C, C, K, groups=C, padding=K-1)`` truncated to the input length.
    The sum is written as K shifted multiply-adds so that a document mask can zero the taps
    that would read the previous document (packed sequences).

    On CUDA (see :mod:`hybridlm.ops.dispatch`) one Triton kernel does the taps, bias, SiLU and
    document resets in float32 and a second one the backward (:mod:`hybridlm.ops.conv_triton`);
    ``x`` may then be any strided view (a column slice of the input projection is read in place).

    Args:
        x: (B, L, C) input.
        weight: (C, K) or (C, 1, K) per-channel taps.
        bias: (C,) or None.
        seq_idx: (B, L) document index per position (non-decreasing along L), or None.
        activation: None or "silu".

    Returns:
        (B, L, C). The Triton path returns ``x``'s dtype; the torch path follows PyTorch's type
        promotion (float32 when bf16 ``x`` meets float32 weights).
    """
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: unknown activation {activation!r} (expected None or 'silu')")
    check_conv_shapes(x, weight, bias, seq_idx)
    w = weight.reshape(weight.shape[0], -1)
    if choose("causal_conv1d", x, weight, bias, seq_idx) == "triton":
        return causal_conv1d_triton(x, w, bias, seq_idx, silu=activation == "silu")
    K = w.shape[1]
    L = x.shape[1]
    xp = F.pad(x, (0, 0, K - 1, 0))  # zeros before the first position
    out = x * w[:, K - 1]
    for s in range(1, K):
        term = xp[:, K - 1 - s : K - 1 - s + L] * w[:, K - 1 - s]
        if seq_idx is not None:
            same = torch.zeros_like(seq_idx, dtype=torch.bool)
            same[:, s:] = seq_idx[:, s:] == seq_idx[:, :-s]
            term = term * same.unsqueeze(-1).to(term.dtype)
        out = out + term
    if bias is not None:
        out = out + bias
    if activation == "silu":
        out = F.silu(out)
    return out


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference: ``F.conv1d`` run on each document separately, in ``dtype`` (float64 by default)."""
    w = weight.reshape(weight.shape[0], 1, -1).to(dtype)
    K = w.shape[-1]
    B, L, C = x.shape
    out = torch.empty(B, L, C, dtype=dtype, device=x.device)
    for b in range(B):
        ids = seq_idx[b] if seq_idx is not None else torch.zeros(L, dtype=torch.long, device=x.device)
        for doc in torch.unique(ids):
            pos = (ids == doc).nonzero().flatten()
            seg = x[b, pos].to(dtype).T.unsqueeze(0)  # (1, C, n)
            y = F.conv1d(seg, w, None if bias is None else bias.to(dtype), padding=K - 1, groups=C)[..., : len(pos)]
            out[b, pos] = y[0].T
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)
