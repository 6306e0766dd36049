"""Initializations shared by mixers (each mixer passes its own config fields)."""

from __future__ import annotations

import math

import torch


def normal_(t: torch.Tensor, std: float, gen: torch.Generator | None) -> torch.Tensor:
    """``t.normal_(0, std, generator=gen)`` in place, with the values a float32 ``t`` would get whatever its dtype.

    torch draws float64 otherwise than float32 (other values, and more of the generator's stream, so every later
    draw from it moves too): a float64 model initialized in place (built on meta, ``.double()`` then
    ``init_weights``, or under ``torch.set_default_dtype(torch.float64)``) got weights unrelated to those of
    ``HybridLM(seed=s, dtype=torch.float64)``, which initializes in float32 and then casts. (bf16 and fp16 draws
    are float32 draws rounded already, as measured on the CPU: left as they are.)
    """
    if t.dtype != torch.float64:
        return t.normal_(0.0, std, generator=gen)
    return t.copy_(torch.empty(t.shape, dtype=torch.float32, device=t.device).normal_(0.0, std, generator=gen))


def uniform_(t: torch.Tensor, low: float, high: float, gen: torch.Generator | None) -> torch.Tensor:
    """``t.uniform_(low, high, generator=gen)`` in place, drawn as for a float32 ``t`` (see :func:`normal_`)."""
    if t.dtype != torch.float64:
        return t.uniform_(low, high, generator=gen)
    return t.copy_(torch.empty(t.shape, dtype=torch.float32, device=t.device).uniform_(low, high, generator=gen))


def dt_bias_init(
    n: int, dt_min: float, dt_max: float, floor: float, gen: torch.Generator | None, device
) -> torch.Tensor:
    """softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max] (clamped below at ``floor``)."""
    u = torch.rand(n, generator=gen, device=device, dtype=torch.float32)  # whatever the default dtype
    # clamp(max=dt_max) first (the floor may exceed it): exp of a float32-rounded log overflows at the largest float32.
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(max=dt_max).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))
