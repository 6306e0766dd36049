"""Rotary position embedding (rotate-half layout, as Megatron-LM and Hugging Face Llama), optionally partial, with the
plain frequencies ``theta^(-2i/R)`` or YaRN's (context extension, arXiv 2309.00071).

YaRN with factor ``s`` over a pretrained length ``L0`` (Megatron-LM's ``YarnRotaryEmbedding``, transformers'
``_compute_yarn_parameters``): frequency ``i`` of ``R / 2`` turns ``L0 f_i / 2 pi`` times over ``L0``; those turning
more than ``beta_fast`` times are kept, those turning fewer than ``beta_slow`` times are divided by ``s``, and a
linear ramp over the channel index blends the two between. cos and sin are then scaled by
``m(s, mscale) / m(s, mscale_all_dim)``, ``m(s, a) = 0.1 a ln(s) + 1`` (1 for ``s <= 1``); MLA also scales its
softmax by ``m(s, mscale_all_dim)^2`` (:func:`softmax_factor`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import ModelConfig
from ..ops.precision import accumulation_dtype


@dataclasses.dataclass(frozen=True)
class Yarn:
    """YaRN's settings (the ``yarn_*`` fields of :class:`~hybridlm.config.ModelConfig`, which hold their defaults)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float
    round_to_int: bool

    @classmethod
    def of(cls, config: ModelConfig) -> Yarn | None:
        """The model's YaRN settings; None with ``rope_type = "rope"``."""
        c = config
        if c.rope_type != "yarn":
            return None
        return cls(
            c.yarn_rotary_scaling_factor, c.yarn_original_max_position_embeddings, c.yarn_beta_fast, c.yarn_beta_slow,
            c.yarn_mscale, c.yarn_mscale_all_dim, c.yarn_correction_range_round_to_int,
        )  # fmt: skip

    def amplitude(self) -> float:
        """The factor on cos and sin: ``m(s, mscale) / m(s, mscale_all_dim)``."""
        return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's attention temperature term ``0.1 mscale ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_factor(config: ModelConfig) -> float:
    """What MLA's softmax scale is multiplied by: ``m(s, yarn_mscale_all_dim)^2`` under YaRN (DeepSeek-V3), else 1."""
    yarn = Yarn.of(config)
    return 1.0 if yarn is None else yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2


def rope_frequencies(
    rotary_dim: int, theta: float, yarn: Yarn | None = None, dtype: torch.dtype = torch.float32, device=None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (rotary_dim / 2,) in ``dtype``, the factor on cos and sin).

    In float32 every step is transformers' (its order of operations included), so cos and sin are its bits.
    """
    pos_freqs = theta ** (torch.arange(0, rotary_dim, 2, dtype=dtype, device=device) / rotary_dim)
    if yarn is None:
        return 1.0 / pos_freqs, 1.0

    def turns_to_channel(turns: float) -> float:  # the (fractional) channel whose frequency turns so often over L0
        return (
            rotary_dim * math.log(yarn.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))
        )

    low, high = turns_to_channel(yarn.beta_fast), turns_to_channel(yarn.beta_slow)
    if yarn.round_to_int:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=dtype, device=device) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # 1: extrapolated (the frequency kept), 0: interpolated (divided by the factor)
    inv_freq = 1.0 / (yarn.factor * pos_freqs) * (1 - kept) + 1.0 / pos_freqs * kept
    return inv_freq, yarn.amplitude()


def rope_cos_sin(
    position_ids: torch.Tensor,
    rotary_dim: int,
    theta: float,
    dtype: torch.dtype = torch.float32,
    yarn: Yarn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles for ``position_ids`` (B, L): returns cos, sin of shape (B, L, rotary_dim) in ``dtype``
    (float32, as Hugging Face computes them; float64 for a float64 model, a reference), YaRN's with ``yarn``."""
    inv_freq, amplitude = rope_frequencies(rotary_dim, theta, yarn, dtype, position_ids.device)
    freqs = position_ids.to(dtype).unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    if amplitude == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * amplitude, emb.sin() * amplitude


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
