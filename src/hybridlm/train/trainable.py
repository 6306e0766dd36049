"""``train.trainable``: the parameters a run trains, chosen by glob patterns over their canonical names; the others are
frozen: no gradient, no optimizer state, saved and loaded as they are. DeepSeek-V3.2's dense warm-up trains the
sparse attention's indexer alone this way (``train.trainable = "*.indexer.*"``).

Canonical names (``checkpoint.canonical``: ``layers.{i}.mixer.…``, ``embeddings.weight``, ``mtp.{d}.…``) are the same
for every fusion choice, so one pattern means the same parameters whatever the pattern's brackets.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from ..checkpoint.canonical import canonical_name
from ..errors import ConfigError
from ..pattern import HybridPattern

#: Name shapes an error lists (layer and depth numbers written N) when a pattern matches no parameter.
LISTED_SHAPES = 12


def trainable_patterns(value: str | list[str]) -> list[str]:
    """``train.trainable``'s glob patterns (one string: one pattern); ConfigError for an empty list or pattern."""
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ConfigError("train.trainable", "an empty list trains nothing; leave it out (or 'none') to train all")
    for i, item in enumerate(items, 1):
        if not item.strip():
            raise ConfigError("train.trainable", f"pattern {i} is empty")
    return [item.strip() for item in items]


def trainable_names(model: nn.Module, pattern: HybridPattern, value: str | list[str] | None) -> set[str] | None:
    """The canonical names of ``model``'s parameters (the whole model: a meta-device one will do) that ``value``'s
    patterns match, or None (``value`` None: every parameter trains).

    Raises:
        ConfigError: a pattern that matches no parameter, with the shapes of the model's names.
    """
    if value is None:
        return None
    names = [canonical_name(n, pattern) for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for item in trainable_patterns(value):
        hits = fnmatch.filter(names, item)
        if not hits:
            shapes = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.)", "N", n) for n in names))
            more = f", ... ({len(shapes)} shapes)" if len(shapes) > LISTED_SHAPES else ""
            layers = sorted({int(m) for n in names for m in re.findall(r"(?:^|\.)layers\.(\d+)\.", n)})
            span = f" (layers.N: {layers[0]} to {layers[-1]})" if layers else ""
            raise ConfigError(
                "train.trainable",
                f"{item!r} matches no parameter of the model (canonical names; '*' is any text, dots included); "
                f"its names: {', '.join(shapes[:LISTED_SHAPES])}{more}{span}",
            )
        chosen.update(hits)
    return chosen


def trained_elements(model: nn.Module, pattern: HybridPattern, names: set[str]) -> int:
    """Elements of ``model``'s parameters (a meta-device model will do) whose canonical names are in ``names``."""
    return sum(p.numel() for n, p in model.named_parameters() if canonical_name(n, pattern) in names)


def freeze_others(model: nn.Module, pattern: HybridPattern, names: set[str] | None) -> None:
    """Freeze (``requires_grad = False``) every parameter of ``model`` (a model, or a process's part of one, wrapped
    or not) whose canonical name is not in ``names``; None freezes none."""
    if names is None:
        return
    for name, p in model.named_parameters():
        if canonical_name(name, pattern) not in names:
            p.requires_grad_(False)
