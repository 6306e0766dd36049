"""A readable table of a pattern's blocks (used by ``hybridlm pattern``)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PatternError
from .parser import HybridPattern
from .stage import select_stage
from .symbols import COUNT_ORDER, KIND, describe_block


@dataclass(frozen=True)
class BlockRow:
    """One block: where it sits, which canonical layers it holds, where it runs."""

    block: int  # index within its stack (main stack, or one MTP depth)
    layers: tuple[int, ...]  # canonical layer indices (within the MTP depth for MTP blocks)
    symbols: str
    segment: int  # '|' segment (for MTP blocks the last one, whose rank runs them; the table shows '-')
    stage: str  # "rank r" / "rank r, vp v" with a pipeline size, "" otherwise
    mtp_depth: int  # 0 for the main stack, 1.. for MTP depths

    @property
    def fused(self) -> bool:
        return len(self.symbols) > 1

    @property
    def kind(self) -> str:
        return describe_block(self.symbols)


def pipeline_plan(
    p: HybridPattern,
    pp_size: int,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    warn: bool = True,
) -> list[tuple[int, int | None, int, int]]:
    """Every (rank, vp_stage, block_start, block_stop) of a pipeline of ``pp_size`` ranks.

    Virtual stages come from the ``|`` segments: ``len(segments) // pp_size`` per rank. ``warn=False``
    silences the automatic-split warnings (for a second layout of a split already reported).
    """
    n_seg = len(p.segments)
    vps: list[int | None] = [None]
    if n_seg > 1 and pp_size > 1:
        if n_seg % pp_size:
            p.stage(0, pp_size, 0)  # raises the "evenly divisible" error
        if n_seg > pp_size:
            vps = list(range(n_seg // pp_size))
    plan = []
    for vp in vps:
        for rank in range(pp_size):
            # Warn (about an automatic split) once, not once per rank.
            st = select_stage(p, rank, pp_size, vp, first_stage_layers, last_stage_layers, warn=warn and not plan)
            plan.append((rank, vp, st.block_offset, st.block_offset + st.num_blocks))
    return plan


def block_rows(
    p: HybridPattern,
    plan: list[tuple[int, int | None, int, int]] | None = None,
) -> list[BlockRow]:
    """One row per block; ``plan`` (from :func:`pipeline_plan`) fills the stage column."""
    stage_of: dict[int, str] = {}
    last_stage = ""
    if plan is not None:
        pp_size = max(rank for rank, *_ in plan) + 1
        for rank, vp, start, stop in plan:
            label = f"rank {rank}" if vp is None else f"rank {rank}, vp {vp}"
            for b in range(start, stop):
                stage_of[b] = label
            if stop == p.num_blocks:
                last_stage = label
        if not p.num_blocks:
            last_stage = f"rank {pp_size - 1}"
    rows = []
    offsets = p.block_layer_offsets
    b = 0
    for s, seg in enumerate(p.segments):
        for sym in seg:
            layers = tuple(range(offsets[b], offsets[b] + len(sym)))
            rows.append(BlockRow(b, layers, sym, s, stage_of.get(b, ""), 0))
            b += 1
    mtp_offsets = p.mtp_block_layer_offsets
    for d in range(1, p.mtp_depths + 1):
        for j, sym in enumerate(p.mtp_blocks):
            layers = tuple(range(mtp_offsets[j], mtp_offsets[j] + len(sym)))
            rows.append(BlockRow(j, layers, sym, len(p.segments) - 1, last_stage, d))
    return rows


def _span(layers: tuple[int, ...]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def render(
    p: HybridPattern,
    pp_size: int | None = None,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> str:
    """The block table and totals of ``p`` as text."""
    plan = None if pp_size is None else pipeline_plan(p, pp_size, first_stage_layers, last_stage_layers)
    rows = block_rows(p, plan)
    header = ["block", "layers", "symbols", "kind", "fused", "segment", "stage", "mtp"]
    table = [
        [
            str(r.block),
            _span(r.layers),
            r.symbols,
            r.kind,
            "yes" if r.fused else "no",
            str(r.segment) if r.mtp_depth == 0 else "-",
            r.stage or "-",
            str(r.mtp_depth) if r.mtp_depth else "-",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    if not table:
        lines.append("(no blocks)")

    counts = p.layer_counts()
    per_kind = ", ".join(f"{KIND[s]} {counts[s]}" for s in COUNT_ORDER if counts[s])
    mtp_layers = p.mtp_depths * len(p.mtp_layers)
    lines += [
        "",
        f"pattern        {p}",
        f"canonical      {p.canonical or '(empty)'}",
        f"main stack     {p.num_blocks} blocks ({p.num_fused} fused), {p.num_layers} canonical layers, "
        f"{len(p.segments)} segment(s)",
        f"MTP            {p.mtp_depths} depth(s)"
        + (f" of '{p.mtp}' ({len(p.mtp_layers)} layers each)" if p.mtp else ""),
        f"total layers   {p.num_layers + mtp_layers} ({per_kind or 'none'})",
    ]
    if plan is not None:
        lines.append(f"pipeline       {pp_size} rank(s)")
        for rank, vp, start, stop in plan:
            where = f"rank {rank}" + ("" if vp is None else f", vp {vp}")
            span = f"blocks {start}-{stop - 1}" if stop > start else "no blocks"
            lines.append(f"  {where:<14} {span}")
        # The first and last ranks hold the embedding and the head; a rank between them may hold nothing.
        empty = sorted({r for r, *_ in plan} - {r for r, _, a, b in plan if b > a} - {0, pp_size - 1})
        if empty:
            # Without '|' only the stage sizes of the automatic split can leave a middle rank empty.
            if len(p.segments) > 1:
                cause = "an empty segment between '|'s"
            elif not p.num_blocks:
                cause = "the main stack has no blocks"
            else:
                cause = "--first-stage-layers / --last-stage-layers leave them none"
            lines.append(
                f"  {'ranks' if len(empty) > 1 else 'rank'} {', '.join(map(str, empty))} "
                f"{'hold' if len(empty) > 1 else 'holds'} no layers ({cause}): hybridlm train refuses this split"
            )
    return "\n".join(lines)


__all__ = ["BlockRow", "PatternError", "block_rows", "pipeline_plan", "render"]
