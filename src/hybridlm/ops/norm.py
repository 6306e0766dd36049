"""RMSNorm variants: plain, residual-add + norm (the fused-block seam), and Mamba's gated, grouped norm.

The plain and fused norms take ``zero_centered``: the stored weight is then ``w`` and the scale applied
``1 + w`` (Megatron-LM's ``layernorm_zero_centered_gamma``, Qwen3-Next's and Gemma's norms), see :func:`norm_scale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import choose, choose_eager, record, triton_available, wants_grad
from .precision import accumulation_dtype

if triton_available():
    from .norm_triton import add_rms_norm_triton, gated_rms_norm_triton, rms_norm_then_gate_triton, rms_norm_triton


def norm_scale(weight: torch.Tensor, zero_centered: bool) -> torch.Tensor:
    """The factor an RMSNorm multiplies the normalized ``x`` by: ``weight`` itself, or ``1 + weight`` when
    ``zero_centered``.

    ``1 + weight`` is computed in float32 (float64 for a float64 weight), the dtype the norm computes in:
    in bf16, whose spacing just above 1 is 2^-7, a trained ``w`` of 1e-3 would round away entirely. The
    kernels are then simply given this float32 scale. (Transformer Engine's zero-centred norms add the 1 in
    float32 too.) Autograd flows through the addition to ``weight``.

    Args:
        weight: (D,) the stored norm weight.

    Returns:
        (D,): ``weight`` unchanged, or ``1 + weight`` in ``accumulation_dtype(weight)``.
    """
    if not zero_centered:
        return weight
    return weight.to(accumulation_dtype(weight)) + 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last dim, computed in float32 (float64 for
    float64 inputs); with ``zero_centered``, ``(1 + weight) * ...`` (:func:`norm_scale`).

    Args:
        x: (..., D) activations of any float dtype; the result has the same dtype.
        weight: (D,) scale (zero-centred: scale - 1).

    On CUDA, when no gradient is wanted (inference) and outside ``torch.compile``, one forward-only
    Triton kernel runs instead; training and compiled code keep this reference, which inductor
    fuses with its neighbours.
    """
    weight = norm_scale(weight, zero_centered)
    if wants_grad(x, weight):
        # The kernel is forward-only: training runs the reference, and says so (paths_used), as every op does.
        record("rms_norm", "torch")
    elif choose_eager("rms_norm", x, weight) == "triton":
        return rms_norm_triton(x, weight, eps)
    return _rms_norm_torch(x, weight, eps)


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in float32 (bf16 has too few mantissa bits for the mean of squares; float64 stays
    # float64), then scale and cast back, as Hugging Face's NemotronH does.
    acc = accumulation_dtype(x, weight)
    out = F.rms_norm(x.to(acc), (x.shape[-1],), weight.to(acc), eps)
    return out.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by the next layer's RMSNorm: returns ``(x + delta, rms_norm(x + delta))``.

    Inside a fused block the add ending the sequence mixer and the norm starting the channel
    mixer are adjacent; this is the seam where one fused kernel can do both. The torch path is
    exactly the two separate ops, so fused and unfused models agree bitwise; on CUDA one Triton
    kernel (:mod:`hybridlm.ops.norm_triton`) reads ``x`` and ``delta`` once and writes both outputs,
    with the same rounding (the sum is rounded to ``h``'s dtype before it is normalized).

    Under ``torch.compile`` the torch path runs: inductor fuses the add and the norm into one
    kernel of its own there (a fused block is one compile region), without the custom op's Python
    launch per call. On an H200 (``bench-1.3b``, 1 × 4096) inductor's seam took 1.4 ms of GPU time
    per step against the Triton kernel's 1.8 ms.

    Mixed dtypes follow PyTorch's type promotion, as ``x + delta`` does: a float32 residual stream
    ``x`` plus a bf16 ``delta`` (float32 parameters under bf16 autocast) gives float32 ``h`` and
    a float32 normed output.

    Args:
        x: (..., D) residual stream; delta: (..., D) the sequence mixer's output; weight: (D,) (with
        ``zero_centered``, the scale is ``1 + weight``, as in :func:`rms_norm`).

    Returns:
        ``(h, normed)``, each (..., D) in ``torch.promote_types(x.dtype, delta.dtype)``.
    """
    if delta.shape != x.shape or weight.shape != x.shape[-1:]:
        # As the kernel refuses them: the torch path would broadcast a delta of one row over every row.
        raise ValueError(
            f"add_rms_norm: x {tuple(x.shape)}, delta {tuple(delta.shape)}, weight {tuple(weight.shape)}: "
            "need x and delta of one shape (..., D) and weight (D,)"
        )
    weight = norm_scale(weight, zero_centered)
    if choose_eager("add_rms_norm", x, delta, weight) == "triton":
        return add_rms_norm_triton(x, delta, weight, eps)
    h = x + delta
    return h, _rms_norm_torch(h, weight, eps)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """Mamba2's output norm: gate first, then RMSNorm over each group of ``group_size`` channels.

    ``out = weight * groupnorm(y * silu(z))`` with ``norm_before_gate=False`` as in Megatron and
    NemotronH. The group size is ``d_inner / ngroups``, not ``d_inner`` (a known porting bug).

    Computed in float32 (float64 for float64 inputs). On CUDA one Triton kernel does gate, group
    norm and scale (and one more the backward), in float32, saving only the per-group ``rstd``
    (:mod:`hybridlm.ops.norm_triton`).

    Args:
        y: (..., D) scan output; z: (..., D) gate; weight: (D,).

    Returns:
        (..., D) in ``y``'s dtype.
    """
    if z.shape != y.shape or weight.shape != y.shape[-1:] or group_size < 1 or y.shape[-1] % group_size:
        # As the kernel refuses them: the torch path would broadcast a (D,) gate or a (1,) weight silently.
        raise ValueError(
            f"gated_rms_norm: y {tuple(y.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}, "
            f"group_size {group_size}: need y and z of one shape (..., D), weight (D,), D divisible by group_size"
        )
    if choose("gated_rms_norm", y, z, weight) == "triton":
        return gated_rms_norm_triton(y, z, weight, group_size, eps)
    dtype, acc = y.dtype, accumulation_dtype(y, z, weight)
    g = y.to(acc) * F.silu(z.to(acc))
    shape = g.shape
    g = g.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(acc) * g.reshape(shape)).to(dtype)


def rms_norm_then_gate(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3-Next's (and fla's ``norm_before_gate``) output norm: RMSNorm over the last dim, scale, then ``* silu(z)``,
    with Hugging Face's roundings: normalized in float32 (float64 for float64 ``x``), rounded to x's dtype before the
    scale, the gate in float32, the result in x's dtype.

    On CUDA, when no gradient is wanted (decoding, evaluation) and outside ``torch.compile``, one forward-only Triton
    kernel runs (op ``rms_norm_then_gate``); training keeps this reference, which inductor fuses.

    Args:
        x: (..., D) one head's output per row; z: (..., D) its gate; weight: (D,).

    Returns:
        (..., D) in x's dtype.
    """
    if z.shape != x.shape or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"rms_norm_then_gate: x {tuple(x.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}: need x and z "
            "of one shape (..., D) and weight (D,)"
        )
    if wants_grad(x, z, weight):
        record("rms_norm_then_gate", "torch")
    elif choose_eager("rms_norm_then_gate", x, z, weight) == "triton":
        return rms_norm_then_gate_triton(x, z, weight, eps)
    dtype, acc = x.dtype, accumulation_dtype(x, z)
    xf = x.to(acc)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf.to(dtype) * F.silu(z.to(acc))).to(dtype)


def gated_rms_norm_reference(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """Float64 reference of :func:`gated_rms_norm` (the result stays float64)."""
    g = y.double() * F.silu(z.double())
    shape = g.shape
    g = g.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * g.reshape(shape)


def rms_norm_then_gate_reference(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Float64 reference of :func:`rms_norm_then_gate` (the result stays float64)."""
    xd = x.double()
    return weight.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * F.silu(z.double())


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """Float64 reference of :func:`rms_norm` (the result in ``x``'s dtype)."""
    xd, wd = x.double(), weight.double()
    return ((wd + 1 if zero_centered else wd) * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
