"""The canonical (unfused, unsplit) name space of a model's tensors, and the map to and from it.

A model names block ``b``'s ``j``-th layer ``blocks.{b}.layers.{j}.…``; the canonical layout names
it ``layers.{i}.…`` with ``i`` its canonical layer index (as if nothing were fused), so every
fusion choice and pipeline split of one model shares one checkpoint layout::

    model                                      canonical
    embeddings.weight                          embeddings.weight
    blocks.{b}.layers.{j}.norm.weight          layers.{i}.norm.weight
    blocks.{b}.layers.{j}.mixer.…              layers.{i}.mixer.…
    norm_f.weight / lm_head.weight             norm_f.weight / lm_head.weight
    mtp.{d}.blocks.{b}.layers.{j}.…            mtp.{d}.layers.{i}.…
    mtp.{d}.{enorm,hnorm,eh_proj,final_norm}.… mtp.{d}.{enorm,hnorm,eh_proj,final_norm}.…

The map is a pure function of the parsed pattern (no model is needed) and is applied only when
saving and loading.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from ..pattern import HybridPattern, parse

T = TypeVar("T")

_BLOCK = re.compile(r"^(mtp\.(\d+)\.)?blocks\.(\d+)\.layers\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^(mtp\.(\d+)\.)?layers\.(\d+)\.(.+)$")
# Wrappers that torch adds to names (activation checkpointing, torch.compile, FSDP).
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _pattern(pattern: HybridPattern | str) -> HybridPattern:
    return pattern if isinstance(pattern, HybridPattern) else parse(pattern)


def _unwrap(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def canonical_name(name: str, pattern: HybridPattern | str) -> str:
    """The canonical name of the model tensor ``name``."""
    p = _pattern(pattern)
    name = _unwrap(name)
    m = _BLOCK.match(name)
    if not m:
        return name
    mtp, depth, b, j, rest = m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), m.group(5)
    blocks, offsets = (p.mtp_blocks, p.mtp_block_layer_offsets) if mtp else (p.blocks, p.block_layer_offsets)
    if b >= len(blocks) or j >= len(blocks[b]):
        raise KeyError(f"{name}: pattern '{p}' has no layer {j} in {'MTP ' if mtp else ''}block {b}")
    i = offsets[b] + j
    return f"mtp.{depth}.layers.{i}.{rest}" if mtp else f"layers.{i}.{rest}"


def model_name(name: str, pattern: HybridPattern | str) -> str:
    """The model name of the canonical tensor ``name`` (inverse of :func:`canonical_name`)."""
    p = _pattern(pattern)
    m = _LAYER.match(name)
    if not m:
        return name
    mtp, depth, i, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    blocks, offsets = (p.mtp_blocks, p.mtp_block_layer_offsets) if mtp else (p.blocks, p.block_layer_offsets)
    for b, (sym, off) in enumerate(zip(blocks, offsets)):
        if off <= i < off + len(sym):
            prefix = f"mtp.{depth}." if mtp else ""
            return f"{prefix}blocks.{b}.layers.{i - off}.{rest}"
    raise KeyError(f"{name}: pattern '{p}' has no canonical {'MTP ' if mtp else ''}layer {i}")


def to_canonical(state: Mapping[str, T], pattern: HybridPattern | str) -> dict[str, T]:
    """Rename a model state dict (or any name-keyed mapping) to canonical names."""
    p = _pattern(pattern)
    return {canonical_name(k, p): v for k, v in state.items()}


def from_canonical(state: Mapping[str, T], pattern: HybridPattern | str) -> dict[str, T]:
    """Rename a canonical state dict to the names of a model built with ``pattern``."""
    p = _pattern(pattern)
    return {model_name(k, p): v for k, v in state.items()}
