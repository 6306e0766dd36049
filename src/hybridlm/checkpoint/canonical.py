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

import functools
import re
from collections.abc import Mapping
from typing import TypeVar

from ..pattern import HybridPattern, parse

T = TypeVar("T")

_MODEL = re.compile(r"^(mtp\.\d+\.)?blocks\.\d+\.layers\.\d+\.")
_CANONICAL = re.compile(r"^(mtp\.\d+\.)?layers\.\d+\.")
# Wrappers that torch adds to names (activation checkpointing, torch.compile, FSDP).
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@functools.lru_cache(maxsize=16)
def _prefixes(pattern: HybridPattern | str) -> tuple[dict[str, str], dict[str, str]]:
    """(model -> canonical, canonical -> model) name prefixes of every layer of ``pattern``, MTP depths included."""
    p = pattern if isinstance(pattern, HybridPattern) else parse(pattern)
    stacks = [("", p.blocks, p.block_layer_offsets)]
    stacks += [(f"mtp.{d}.", p.mtp_blocks, p.mtp_block_layer_offsets) for d in range(p.mtp_depths)]
    to_canonical = {
        f"{mtp}blocks.{b}.layers.{j}.": f"{mtp}layers.{offset + j}."
        for mtp, blocks, offsets in stacks
        for b, (block, offset) in enumerate(zip(blocks, offsets))
        for j in range(len(block))
    }
    return to_canonical, {v: k for k, v in to_canonical.items()}


def _swap_prefix(name: str, prefix: re.Pattern[str], table: dict[str, str], pattern: HybridPattern | str) -> str:
    """``name`` with its layer prefix (matched by ``prefix``) replaced from ``table``; other names unchanged."""
    m = prefix.match(name)
    if not m:
        return name
    if m[0] not in table:
        raise KeyError(f"{name}: pattern '{pattern}' has no such layer")
    return table[m[0]] + name[m.end() :]


def canonical_name(name: str, pattern: HybridPattern | str) -> str:
    """The canonical name of the model tensor ``name``."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return _swap_prefix(name, _MODEL, _prefixes(pattern)[0], pattern)


def model_name(name: str, pattern: HybridPattern | str) -> str:
    """The model name of the canonical tensor ``name`` (inverse of :func:`canonical_name`)."""
    return _swap_prefix(name, _CANONICAL, _prefixes(pattern)[1], pattern)


def to_canonical(state: Mapping[str, T], pattern: HybridPattern | str) -> dict[str, T]:
    """Rename a model state dict (or any name-keyed mapping) to canonical names."""
    return {canonical_name(k, pattern): v for k, v in state.items()}


def from_canonical(state: Mapping[str, T], pattern: HybridPattern | str) -> dict[str, T]:
    """Rename a canonical state dict to the names of a model built with ``pattern``."""
    return {model_name(k, pattern): v for k, v in state.items()}
