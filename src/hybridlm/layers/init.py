"""Initializations shared by mixers (each mixer passes its own config fields)."""

from __future__ import annotations

import math

import torch


def dt_bias_init(
    n: int, dt_min: float, dt_max: float, floor: float, gen: torch.Generator | None, device
) -> torch.Tensor:
    """softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max] (clamped below at ``floor``)."""
    u = torch.rand(n, generator=gen, device=device)
    # clamp(max=dt_max) first (the floor may exceed it): exp of a float32-rounded log overflows at the largest float32.
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(max=dt_max).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))
