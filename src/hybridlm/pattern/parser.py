"""Parse a layer pattern into a :class:`HybridPattern`.

Grammar (``main`` may hold ``|``; every MTP part is identical and holds no ``|``)::

    pattern := main ( "/" mtp )*
    main    := ( block | "|" )*
    mtp     := block*
    block   := layer | "[" sequence_mixer channel_mixer "]"
    layer   := "M" | "G" | "*" | "D" | "+" | "-" | "E"

Without brackets the accepted language and the results are Megatron-LM 0.19's
(``parse_hybrid_pattern``); the deliberate differences are listed in docs/pattern.md.
Every rule is checked here, at parse time, and every violation is a :class:`PatternError`
with a caret under the character at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import symbols as S
from .errors import PatternError
from .stage import PatternStage, select_stage

__all__ = ["HybridPattern", "PatternStage", "parse"]

_VALID_LAYERS = frozenset(S.LAYER_SYMBOLS)
_SYMBOL_LIST = " ".join(S.LAYER_SYMBOLS)


def _split_blocks(part: str) -> tuple[tuple[str, ...], ...]:
    """Split a syntactically valid part into segments (by ``|``) of block strings."""
    segments: list[list[str]] = [[]]
    group: str | None = None
    for c in part:
        if c == S.PIPE:
            segments.append([])
        elif c == S.FUSION_START:
            group = ""
        elif c == S.FUSION_END:
            assert group is not None
            segments[-1].append(group)
            group = None
        elif group is not None:
            group += c
        else:
            segments[-1].append(c)
    return tuple(tuple(seg) for seg in segments)


@dataclass(frozen=True)
class HybridPattern:
    """A parsed layer pattern. Build it with :func:`parse`.

    Equality and hashing use the normalized structure (``main``, ``mtp``, ``mtp_depths``),
    so ``parse("M*//") == parse("M*")``.

    Attributes:
        text: the string that was parsed.
        main: the main part, with ``|`` and brackets (``''`` when empty).
        mtp: the pattern of one MTP depth, or ``None``.
        mtp_depths: number of MTP depths.
        blocks: block strings of the main stack; a fused group is one string such as ``'*-'``.
        segments: the blocks of each ``|`` segment.
        layers: canonical layer symbols of the main stack (brackets and ``|`` removed).
        mtp_blocks: block strings of one MTP depth (``()`` without MTP).
        mtp_layers: canonical layer symbols of one MTP depth (``''`` without MTP).
    """

    main: str
    mtp: str | None
    mtp_depths: int
    text: str = field(default="", compare=False, repr=False)
    blocks: tuple[str, ...] = field(init=False, compare=False, repr=False)
    segments: tuple[tuple[str, ...], ...] = field(init=False, compare=False, repr=False)
    layers: str = field(init=False, compare=False, repr=False)
    mtp_blocks: tuple[str, ...] = field(init=False, compare=False, repr=False)
    mtp_layers: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        segments = _split_blocks(self.main)
        blocks = tuple(b for seg in segments for b in seg)
        mtp_blocks = _split_blocks(self.mtp)[0] if self.mtp else ()
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "layers", "".join(blocks))
        object.__setattr__(self, "mtp_blocks", mtp_blocks)
        object.__setattr__(self, "mtp_layers", "".join(mtp_blocks))

    def __str__(self) -> str:
        return self.main + (S.MTP_SEPARATOR + self.mtp) * self.mtp_depths if self.mtp else self.main

    # -- counting ---------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Canonical layers of the main stack (a fused group counts as two)."""
        return len(self.layers)

    @property
    def num_blocks(self) -> int:
        """Blocks of the main stack (a fused group counts as one)."""
        return len(self.blocks)

    @property
    def num_fused(self) -> int:
        """Fused groups in the main stack."""
        return sum(len(b) > 1 for b in self.blocks)

    @property
    def block_layer_offsets(self) -> tuple[int, ...]:
        """Canonical index of each main block's first layer."""
        return _offsets(self.blocks)

    @property
    def mtp_block_layer_offsets(self) -> tuple[int, ...]:
        """Canonical index (within one MTP depth) of each MTP block's first layer."""
        return _offsets(self.mtp_blocks)

    @property
    def canonical(self) -> str:
        """The canonical (unfused, unsplit) form: what a checkpoint of this model records."""
        return self.layers + (S.MTP_SEPARATOR + self.mtp_layers) * self.mtp_depths

    def differences(self, other: HybridPattern) -> list[str]:
        """Why ``other`` describes another model than this pattern, a line each (empty: the same model).

        Only brackets and ``|`` may differ (how the model runs); each canonical layer's symbol, the
        MTP depths and their layers are what it computes, and what a checkpoint records.
        """

        def layers(a: str, b: str, what: str, count: str) -> list[str]:
            diffs = [
                f"{what} {i}: checkpoint has '{x}', pattern has '{y}'" for i, (x, y) in enumerate(zip(a, b)) if x != y
            ]
            return diffs + ([f"checkpoint has {len(a)} {count}, pattern has {len(b)}"] if len(a) != len(b) else [])

        diffs = layers(self.layers, other.layers, "layer", "layers")
        if self.mtp_depths != other.mtp_depths:
            diffs.append(f"checkpoint has {self.mtp_depths} MTP depth(s), pattern has {other.mtp_depths}")
        if self.mtp_depths and other.mtp_depths:
            diffs += layers(self.mtp_layers, other.mtp_layers, "MTP layer", "layers per MTP depth")
        return diffs

    def layer_counts(self) -> dict[str, int]:
        """Canonical layers per symbol, main stack plus every MTP depth.

        Same result as Megatron-LM's ``get_hybrid_layer_counts``: all seven symbols, in its
        key order, zeros included.
        """
        counts = {s: self.layers.count(s) for s in S.COUNT_ORDER}
        for s in S.COUNT_ORDER:
            counts[s] += self.mtp_depths * self.mtp_layers.count(s)
        return counts

    # -- pipeline ---------------------------------------------------------------------------

    def stage(
        self,
        pp_rank: int,
        pp_size: int,
        vp_stage: int | None = None,
        first_stage_layers: int | None = None,
        last_stage_layers: int | None = None,
    ) -> PatternStage:
        """Select the blocks built by pipeline rank ``pp_rank`` of ``pp_size``.

        With ``|`` segments, segment ``(vp_stage or 0) * pp_size + pp_rank`` is selected
        (virtual stages interleave across ranks), except that one rank with no ``vp_stage``
        gets the whole model. Without ``|`` and with ``pp_size > 1`` the blocks are split into
        contiguous runs: evenly, or with ``first_stage_layers`` / ``last_stage_layers`` blocks
        on the first / last rank and the rest spread evenly over the middle ranks. Fused groups
        count as one block here, so they are never split.
        """
        return select_stage(self, pp_rank, pp_size, vp_stage, first_stage_layers, last_stage_layers)


def _offsets(blocks: tuple[str, ...]) -> tuple[int, ...]:
    offsets, n = [], 0
    for b in blocks:
        offsets.append(n)
        n += len(b)
    return tuple(offsets)


# -- validation ------------------------------------------------------------------------------


def _check_brackets(text: str) -> None:
    """Bracket syntax over the whole text (before it is split at ``/``), as Megatron's PR."""
    open_at: int | None = None
    for i, c in enumerate(text):
        if c == S.FUSION_START:
            if open_at is not None:
                raise PatternError(f"nested '[' at position {i} is not allowed: fused groups cannot nest", text, i)
            open_at = i
        elif c == S.FUSION_END:
            if open_at is None:
                raise PatternError(f"unmatched ']' at position {i}: no '[' opens this fused group", text, i)
            size = i - open_at - 1
            if size == 0:
                raise PatternError(f"empty fusion group '[]' at position {i}: a fused group holds two layers", text, i)
            if size == 1:
                raise PatternError(
                    f"fusion group ending at position {i} contains only 1 layer – need at least 2: a fused "
                    "group must be a sequence mixer followed by a channel mixer",
                    text,
                    i,
                )
            open_at = None
        elif open_at is not None and c == S.PIPE:
            raise PatternError(
                f"pipe '|' at position {i} appears inside a fusion group '[...|...]': fused groups may not "
                "cross pipeline boundaries",
                text,
                i,
            )
        elif open_at is not None and c == S.MTP_SEPARATOR:
            raise PatternError(
                f"MTP separator '/' at position {i} appears inside a fusion group '[.../...]': fused groups "
                "may not cross multi-token prediction boundaries",
                text,
                i,
            )
    if open_at is not None:
        raise PatternError(
            f"unmatched '[' with no closing ']': the fused group opened at position {open_at} never closes",
            text,
            open_at,
        )


def _check_symbols(text: str, start: int, part: str, name: str, allow_pipe: bool) -> None:
    """Every character of ``part`` (at ``start`` in ``text``) is a layer symbol or allowed structure."""
    allowed = {S.FUSION_START, S.FUSION_END} | ({S.PIPE} if allow_pipe else set())
    for j, c in enumerate(part):
        if c in _VALID_LAYERS or c in allowed:
            continue
        if c == S.PIPE:
            rule = (
                f"In {name} pattern, '|' is not a valid layer symbol: pipeline separators are allowed only in "
                f"the main pattern. Valid symbols are: {_SYMBOL_LIST}"
            )
        else:
            extra = " [ ]" + (" |" if allow_pipe else "")
            rule = f"In {name} pattern, {c!r} is not a valid layer symbol. Valid symbols are: {_SYMBOL_LIST}{extra}"
        raise PatternError(rule, text, start + j)


def _check_groups(text: str, start: int, part: str) -> None:
    """Each fused group is exactly one sequence mixer followed by one channel mixer."""
    i = 0
    while i < len(part):
        if part[i] != S.FUSION_START:
            i += 1
            continue
        end = part.index(S.FUSION_END, i)
        group = part[i + 1 : end]
        base = start + i + 1
        what = f"'[{group}]'"
        if len(group) != 2:
            raise PatternError(
                f"a fused group must be a sequence mixer followed by a channel mixer: {what} holds "
                f"{len(group)} layers, a fused group holds exactly 2",
                text,
                base + 2,
            )
        if group[0] not in S.SEQUENCE_MIXERS:
            raise PatternError(
                f"a fused group must be a sequence mixer followed by a channel mixer: {what} starts with "
                f"{group[0]!r}, which is not a sequence mixer ({' '.join(S.SEQUENCE_MIXERS)})",
                text,
                base,
            )
        if group[1] not in S.CHANNEL_MIXERS:
            raise PatternError(
                f"a fused group must be a sequence mixer followed by a channel mixer: {what} ends with "
                f"{group[1]!r}, which is not a channel mixer ({' '.join(S.CHANNEL_MIXERS)})",
                text,
                base + 1,
            )
        i = end + 1


def _check_attention_family(text: str, start: int, part: str) -> None:
    """``*`` cannot appear together with ``D`` or ``+`` in ``part``."""
    seen_attention = part.find(S.ATTENTION)
    seen_mla = min((p for p in (part.find(s) for s in S.MLA_FAMILY) if p >= 0), default=-1)
    if seen_attention >= 0 and seen_mla >= 0:
        later = max(seen_attention, seen_mla)
        raise PatternError(
            "Not supported to have both Attention and MLA/DSA in one model: '*' cannot appear together with "
            f"'D' or '+' (main and MTP patterns together); found {part[later]!r} here",
            text,
            start + later,
        )


def parse(text: str | None) -> HybridPattern:
    """Parse a layer pattern such as ``'M-M-[*-]M-|M-[*E]M-/*-/*-'``.

    Args:
        text: the pattern. ``None`` is read as the empty pattern, as Megatron-LM does.

    Returns:
        The parsed :class:`HybridPattern`.

    Raises:
        PatternError: for any string that is not a valid pattern, with a caret under the
            character at fault and the rule it broke.
    """
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise PatternError(f"a layer pattern must be a str, got {type(text).__name__}", repr(text), None)

    _check_brackets(text)

    parts = text.split(S.MTP_SEPARATOR)
    main = parts[0]
    _check_symbols(text, 0, main, "main", allow_pipe=True)
    _check_groups(text, 0, main)
    _check_attention_family(text, 0, main)

    mtp_parts = parts[1:]
    if not any(mtp_parts):  # no '/', or only empty MTP parts ("M*/", "M*//")
        return HybridPattern(main, None, 0, text=text)

    starts = []
    pos = len(main) + 1
    for p in mtp_parts:
        starts.append(pos)
        pos += len(p) + 1
    first = mtp_parts[0]
    for k, p in enumerate(mtp_parts[1:], start=1):
        if p != first:
            # Point at the first character where this depth departs from depth 1.
            # Point at the first differing character; where this depth is a prefix of depth 1, at
            # its last character (an empty depth: at the '/' that opens it).
            diff = next((j for j, (a, b) in enumerate(zip(p, first)) if a != b), min(len(p), len(first)))
            raise PatternError(
                f"All MTP patterns must be identical. Pattern 1 is '{first}', but pattern {k + 1} is '{p}'",
                text,
                starts[k] + min(diff, len(p) - 1),
            )
    _check_symbols(text, starts[0], first, "MTP", allow_pipe=False)
    _check_groups(text, starts[0], first)
    _check_attention_family(text, starts[0], first)
    # The exclusivity rule spans main and MTP together (Megatron 0.19 checks each alone).
    combined = main + S.MTP_SEPARATOR + first
    _check_attention_family(text, 0, combined)
    return HybridPattern(main, first, len(mtp_parts), text=text)
