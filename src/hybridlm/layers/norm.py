"""RMSNorm module (a weight and an epsilon; the math is in ``hybridlm.ops.norm``)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., size) -> same shape and dtype."""
        return rms_norm(x, self.weight, self.eps)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
