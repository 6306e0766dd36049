"""The one engine of the foreign-format adapters (Megatron-core, Hugging Face NemotronH).

A format is a list of :class:`Rule` s over our canonical names (``hybridlm.checkpoint.canonical``):
each maps a few canonical tensors to a few foreign ones and back. Most rules are renames; the
others only regroup rows (QKV grouping, GLU concatenation, GDN packing, one matrix per expert), so
export followed by import is bitwise the identity. The layouts are tabled in docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError
from .io import check_fit, listed, not_floating

Pack = Callable[[list[Tensor]], list[Tensor]]
#: (pattern, replacement) pairs that rewrite a foreign name given in an older or alternative spelling.
Aliases = Sequence[tuple[re.Pattern[str], str]]


def _same(ts: list[Tensor]) -> list[Tensor]:
    return ts


@dataclasses.dataclass(frozen=True)
class Rule:
    """``canonical`` tensors <-> ``foreign`` tensors; ``export`` packs the first into the second, ``back`` undoes it."""

    canonical: tuple[str, ...]
    foreign: tuple[str, ...]
    export: Pack = _same
    back: Pack = _same


def rename(canonical: str, foreign: str | None = None) -> Rule:
    """One tensor passed through untouched under another name (the same name by default)."""
    return Rule((canonical,), (canonical if foreign is None else foreign,))


def under(canonical: str, foreign: str, rules: Iterable[Rule]) -> list[Rule]:
    """``rules`` (e.g. one layer's, by suffix) with ``canonical`` / ``foreign`` prefixed to their names."""
    return [
        dataclasses.replace(
            r, canonical=tuple(canonical + n for n in r.canonical), foreign=tuple(foreign + n for n in r.foreign)
        )
        for r in rules
    ]


def concat(canonical: tuple[str, ...], foreign: str) -> Rule:
    """k canonical (R, C) <-> one foreign (k*R, C), rows in the given order (e.g. Megatron's GLU fc1 = [gate; up])."""
    k = len(canonical)
    if k == 1:
        return rename(canonical[0], foreign)
    return Rule(canonical, (foreign,), lambda ts: [torch.cat(ts)], lambda ts: list(ts[0].chunk(k)))


def per_expert(canonical: tuple[str, ...], foreign: str, num_experts: int) -> Rule:
    """k stacked canonical (E, R, C) <-> E foreign (k*R, C), each expert's k matrices concatenated by rows as
    :func:`concat` does for one MLP (``foreign`` names expert e as ``{e}``)."""
    k = len(canonical)

    def pack(ts: list[Tensor]) -> list[Tensor]:
        return [torch.cat([t[e] for t in ts]) if k > 1 else ts[0][e] for e in range(num_experts)]

    def unpack(ts: list[Tensor]) -> list[Tensor]:
        return [torch.stack(parts) for parts in zip(*(t.chunk(k) for t in ts))]

    return Rule(canonical, tuple(foreign.format(e=e) for e in range(num_experts)), pack, unpack)


def interleave(ts: list[Tensor], groups: int) -> Tensor:
    """Tensors (groups * r_i, C) -> (groups * sum(r_i), C), group by group: ``[t0 of group 0 | t1 of group 0 | …]``."""
    return torch.cat([t.reshape(groups, -1, t.shape[-1]) for t in ts], dim=1).reshape(-1, ts[0].shape[-1])


def deinterleave(t: Tensor, groups: int, sizes: list[int]) -> list[Tensor]:
    """Inverse of :func:`interleave`: (groups * sum(sizes), C) -> tensors (groups * sizes[i], C)."""
    return [part.reshape(-1, t.shape[-1]) for part in t.reshape(groups, sum(sizes), -1).split(sizes, dim=1)]


def interleaved(canonical: tuple[str, ...], foreign: str, groups: int, sizes: list[int]) -> Rule:
    """k canonical (groups * sizes[i], C) <-> one foreign (groups * sum(sizes), C), group by group (:func:`interleave`):
    e.g. Megatron's linear_qkv, ``[q heads | k | v]`` per query group."""
    return Rule(
        canonical, (foreign,), lambda ts: [interleave(ts, groups)], lambda ts: deinterleave(ts[0], groups, sizes)
    )


def zeros(foreign: str, shape: tuple[int, ...], dtype: torch.dtype) -> Rule:
    """A foreign tensor we have no counterpart for, exported as exact zeros (the caller says why that is a no-op)."""
    return Rule((), (foreign,), lambda ts: [torch.zeros(shape, dtype=dtype)], lambda ts: [])


def apply(rules: Iterable[Rule], tensors: Mapping[str, Tensor], export: bool) -> dict[str, Tensor]:
    """Run every rule in one direction (``export``: canonical -> foreign) over a complete, checked state dict.

    A view of part of a tensor (a row block, one expert of a stack) is cloned: it would keep its whole
    source alive (and safetensors refuses tensors that overlap in memory); clone is exact. A view of
    all of its memory is not: safetensors reads every tensor of a file as one, and cloning those
    copied the whole checkpoint into RAM beside the file's memory map.
    """
    out: dict[str, Tensor] = {}
    for r in rules:
        src, dst, fn = (r.canonical, r.foreign, r.export) if export else (r.foreign, r.canonical, r.back)
        for name, t in zip(dst, fn([tensors[k] for k in src]), strict=True):
            part = t._base is not None and t.untyped_storage().nbytes() > t.nbytes
            out[name] = t.clone() if part else t
    return out


def to_foreign(
    rules: Iterable[Rule], canonical: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    """:func:`apply` canonical -> foreign, after refusing a ``canonical`` that is not exactly ``shapes`` (listed by name)."""
    check_fit(canonical, shapes, "canonical state dict")
    return apply(rules, canonical, export=True)


def foreign_shapes(
    rules: Iterable[Rule], canonical_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Foreign name -> shape of every exported tensor, in rule order, from the rules run on meta tensors."""
    meta = {k: torch.empty(s, device="meta") for k, s in canonical_shapes.items()}
    return {k: tuple(v.shape) for k, v in apply(rules, meta, export=True).items()}


def normalize(state: Mapping[str, Tensor], aliases: Aliases, source: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rewrite aliased names to the rules' names; returns (state, {rule name: name given}).

    Raises:
        CheckpointError: two given names are one tensor (``source`` says where they were read), or tensors
            that are not floating point (:func:`~hybridlm.checkpoint.io.not_floating`), or hold no
            dense data (a meta or sparse tensor, which a torch.save file may hold, failed deep inside torch).
    """
    if odd := not_floating(state):
        raise CheckpointError(f"{source}: {odd[0]}")
    odd = [
        f"{k} ({'a meta tensor' if t.is_meta else t.layout})"
        for k, t in state.items()
        if isinstance(t, Tensor) and (t.is_meta or t.layout != torch.strided)
    ]
    if odd:
        raise CheckpointError(f"{source}: weights must be dense tensors with data, not: " + listed(odd))
    out: dict[str, Tensor] = {}
    given: dict[str, str] = {}
    for name, t in state.items():
        target = name
        for pattern, repl in aliases:
            target = pattern.sub(repl, target)
        if target in out:
            raise CheckpointError(f"{source} has both {given[target]} and {name} (the same tensor)")
        out[target], given[target] = t, name
    return out, given
