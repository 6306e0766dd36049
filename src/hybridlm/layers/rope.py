"""Rotary position embedding (rotate-half layout, as Megatron-LM and Hugging Face Llama), optionally partial."""

from __future__ import annotations

import torch

from ..ops.precision import accumulation_dtype


def rope_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles for ``position_ids`` (B, L): returns cos, sin of shape (B, L, rotary_dim) in ``dtype``
    (float32, as Hugging Face computes them; float64 for a float64 model, a reference)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=dtype, device=position_ids.device) / rotary_dim)
    freqs = position_ids.to(dtype).unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of each head; the rest pass through.

    Args:
        x: (B, L, H, D) queries or keys.
        cos, sin: (B, L, R) with R <= D even.
    """
    R = cos.shape[-1]
    rot, rest = x[..., :R].to(accumulation_dtype(x, cos)), x[..., R:]  # float32, or float64 in a float64 model
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    half = R // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = (rot * c + rotated * s).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent channel pairs ``(2i, 2i+1)``, the layout of DeepSeek's MLA weights.

    As Megatron-LM's ``mla_rotary_interleaved``: the rotated channels are regrouped as
    ``[even | odd]`` and then rotated by :func:`apply_rope`. The output keeps the regrouped order;
    queries and keys are treated alike, so no dot product between them changes.

    Args:
        x: (B, L, H, D) with D >= R.
        cos, sin: (B, L, R) from :func:`rope_cos_sin`.
    """
    R = cos.shape[-1]
    rot = x[..., :R]
    regrouped = torch.cat([rot[..., 0::2], rot[..., 1::2], x[..., R:]], dim=-1)
    return apply_rope(regrouped, cos, sin)
