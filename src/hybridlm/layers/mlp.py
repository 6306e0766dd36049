"""The channel MLP: relu² (NemotronH), GELU, or SwiGLU. Names are NemotronH's (+ gate_proj for SwiGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .context import SequenceContext
from .init import normal_


def activate(h: torch.Tensor, kind: str, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The MLP nonlinearity; SwiGLU multiplies ``silu(gate)`` into ``h``."""
    if kind == "relu2":
        return F.relu(h).square()
    if kind == "gelu":
        return F.gelu(h)
    if kind == "swiglu":
        return F.silu(gate) * h
    raise ValueError(f"unknown MLP activation {kind!r}")


class MLP(nn.Module):
    """The ``-`` mixer (also the MoE's shared expert). Input and output (B, L, hidden_size)."""

    keep_fp32 = ()

    def __init__(self, config: ModelConfig, ffn_hidden_size: int | None = None) -> None:
        super().__init__()
        self.activation = config.mlp_activation
        ffn = ffn_hidden_size or config.resolved_ffn_hidden_size
        self.up_proj = nn.Linear(config.hidden_size, ffn, bias=False)
        if self.activation == "swiglu":
            self.gate_proj = nn.Linear(config.hidden_size, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: SequenceContext | None = None) -> torch.Tensor:
        gate = self.gate_proj(x) if self.activation == "swiglu" else None
        return self.down_proj(activate(self.up_proj(x), self.activation, gate))

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator | None, std: float, out_std: float) -> None:
        normal_(self.up_proj.weight, std, gen)
        if self.activation == "swiglu":
            normal_(self.gate_proj.weight, std, gen)
        normal_(self.down_proj.weight, out_std, gen)

    @staticmethod
    def flops_per_token(c: ModelConfig, seq_len: int, ffn_hidden_size: int | None = None) -> float:
        ffn = ffn_hidden_size or c.resolved_ffn_hidden_size
        return 2 * c.hidden_size * ffn * (3 if c.mlp_activation == "swiglu" else 2)


def mlp_reference(layer: MLP, x: torch.Tensor) -> torch.Tensor:
    """The MLP with the activation written out, in the dtype of ``x``."""
    up = x @ layer.up_proj.weight.T
    if layer.activation == "relu2":
        h = up.clamp(min=0) ** 2
    elif layer.activation == "gelu":
        h = 0.5 * up * (1 + torch.erf(up / 2**0.5))
    else:
        gate = x @ layer.gate_proj.weight.T
        h = gate * torch.sigmoid(gate) * up
    return h @ layer.down_proj.weight.T
