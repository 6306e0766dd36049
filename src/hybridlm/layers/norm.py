"""RMSNorm module (a weight, an epsilon and whether the weight is zero-centred; the math is in ``hybridlm.ops.norm``)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import norm_scale, rms_norm


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x**2) + eps)``; the scale is ``weight``, or ``1 + weight`` with ``zero_centered``.

    Zero-centred (``ModelConfig.norm_zero_centered``; Megatron-LM's ``layernorm_zero_centered_gamma``), the
    weight starts at 0 and stores ``scale - 1``, as Megatron and Qwen3-Next store it, so that weight decay, where
    a recipe applies it to norms, pulls the scale towards 1 rather than 0.
    """

    def __init__(self, size: int, eps: float, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.empty(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., size) -> same shape and dtype."""
        return rms_norm(x, self.weight, self.eps, self.zero_centered)

    def scale(self) -> torch.Tensor:
        """(size,) the factor applied (:func:`~hybridlm.ops.norm.norm_scale`), for references that spell the math out."""
        return norm_scale(self.weight, self.zero_centered)

    def init_weights(self) -> None:
        (nn.init.zeros_ if self.zero_centered else nn.init.ones_)(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", zero_centered=True" if self.zero_centered else "")
