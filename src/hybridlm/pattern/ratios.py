"""Megatron-LM's deprecated ratio path: spread attention and MLP layers evenly among Mamba layers."""

from __future__ import annotations

from . import symbols as S
from .errors import RatioError


def pattern_from_ratios(num_layers: int, attention_ratio: float = 0.0, mlp_ratio: float = 0.0) -> str:
    """Build a pattern of ``num_layers`` layers with the given fractions of ``*`` and ``-``.

    Produces exactly Megatron-LM's strings (``round`` is Python's banker's rounding, as there).
    Attention layers go where the running Mamba quota drops below one half; MLP layers then
    replace Mamba layers the same way.

    Raises:
        RatioError: (a ``ValueError`` and an ``AssertionError``) for ``num_layers <= 0`` or a
            ratio outside [0, 1] or ratios summing above 1.
    """
    text = f"pattern_from_ratios({num_layers!r}, {attention_ratio!r}, {mlp_ratio!r})"
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        raise RatioError(f"num_layers must be a positive integer, got {num_layers!r}", text, None)
    for name, r in (("attention_ratio", attention_ratio), ("mlp_ratio", mlp_ratio)):
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 <= r <= 1.0:
            raise RatioError(f"{name} must be a number in [0, 1], got {r!r}", text, None)
    if attention_ratio + mlp_ratio > 1.0:
        raise RatioError(
            f"attention_ratio + mlp_ratio must be at most 1, got {attention_ratio} + {mlp_ratio}", text, None
        )

    layers = [S.MAMBA] * num_layers
    n_attention = round(num_layers * attention_ratio)
    n_mamba = num_layers - n_attention
    # Spread the attention layers so the Mamba runs between them are as even as possible.
    section = n_mamba / (n_attention + 1)
    quota = section
    for i in range(num_layers):
        if quota < 0.5:
            layers[i] = S.ATTENTION
            quota += section
        else:
            quota -= 1

    n_mlp = round(num_layers * mlp_ratio)
    if n_mlp > 0:
        n_mamba -= n_mlp
        ratio = n_mamba / n_mlp
        quota = ratio
        for i in range(num_layers):
            if layers[i] != S.MAMBA:
                continue
            if quota < 0.5:
                layers[i] = S.MLP
                quota += ratio
            else:
                quota -= 1
    return "".join(layers)
