"""``CausalConv1d``: the depthwise causal convolution module of the Mamba2 and Gated DeltaNet mixers."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.conv import causal_conv1d
from .init import uniform_


class CausalConv1d(nn.Module):
    """Depthwise causal conv parameters, stored as ``nn.Conv1d`` stores them: weight (C, 1, K), bias (C,)."""

    def __init__(self, channels: int, kernel: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None, activation: str | None = "silu") -> torch.Tensor:
        """x: (B, L, C) -> (B, L, C)."""
        return causal_conv1d(x, self.weight, self.bias, seq_idx, activation)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator | None) -> None:
        # nn.Conv1d's default (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(K), 1/sqrt(K)).
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        uniform_(self.weight, -bound, bound, gen)
        if self.bias is not None:
            uniform_(self.bias, -bound, bound, gen)
