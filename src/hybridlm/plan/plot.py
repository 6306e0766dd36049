"""One picture of a pattern: blocks coloured by kind, fused groups boxed, stages with cost bars, MTP.

matplotlib is imported here only (it is an optional dependency); the figure is drawn without
pyplot, so no global backend is touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import UsageError
from ..pattern import HybridPattern
from ..pattern.symbols import KIND, LAYER_SYMBOLS

#: One colour per layer kind (matplotlib's tab10 palette).
COLORS = {
    "M": "#1f77b4",
    "G": "#17becf",
    "*": "#d62728",
    "D": "#e377c2",
    "+": "#9467bd",
    "-": "#2ca02c",
    "E": "#ff7f0e",
}
#: tab10's colours that no kind above has, for layer kinds added without a colour of their own.
_SPARE_COLORS = ("#8c564b", "#7f7f7f", "#bcbd22")


def color(symbol: str) -> str:
    """The colour of layer kind ``symbol``: its :data:`COLORS` entry, else a spare one of its own (a kind added
    without a colour still gets a picture, in a colour no other kind has while the spares last)."""
    if symbol in COLORS:
        return COLORS[symbol]
    missing = [s for s in LAYER_SYMBOLS if s not in COLORS]
    index = missing.index(symbol) if symbol in missing else len(missing)
    return _SPARE_COLORS[index % len(_SPARE_COLORS)]


FORMATS = (".png", ".svg")


def check_plot_path(path: str | Path) -> Path:
    """``path`` as a Path; UsageError unless it names a ``.png`` or ``.svg`` file that can be written (checked
    before a plan's work, which ``--measure`` makes minutes long)."""
    given, path = str(path), Path(path)
    if path.suffix.lower() not in FORMATS:
        # ".png" alone is a hidden file's name with no extension (pathlib's reading, and the shell's)
        why = f"not {path.suffix!r}" if path.suffix else "with a name before it" if path.name.startswith(".") else ""
        raise UsageError(f"--plot {given!r}: the file name must end in .png or .svg" + (f", {why}" if why else ""))
    folder = path.parent
    if not folder.is_dir():
        what = "is a file, not a folder," if folder.exists() else "is no folder"
        raise UsageError(f"--plot {given!r}: {str(folder)!r} {what} to write it in")
    if path.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--plot {given!r}: cannot write {'a folder' if path.is_dir() else 'there'}")
    return path


def plot_pattern(
    p: HybridPattern,
    path: str | Path,
    stages: Sequence[tuple[int, int]] | None = None,
    stage_costs: Sequence[float] | None = None,
    stage_extras: Sequence[float] | None = None,
    unit: str = "layers",
    stage_labels: Sequence[str] | None = None,
    title: str | None = None,
    block_costs: Sequence[float] | None = None,
) -> Path:
    """Draw ``p`` to ``path`` (``.png`` or ``.svg``).

    Args:
        p: the pattern.
        stages: ``(start, stop)`` block ranges, one per stage (default: the ``|`` segments).
        stage_costs: height of each stage's bar (default: canonical layers per stage).
        stage_extras: the part of each stage's cost outside its blocks (embedding, head, MTP),
            drawn hatched on top of the blocks' part.
        unit: the unit of ``stage_costs``, for the axis label.
        stage_labels: one label per stage (default ``'stage i'``).
        title: figure title (default: the pattern).
        block_costs: one cost per main block (same unit): each stage's bar is then stacked from
            its blocks' costs, coloured by kind (a fused group by its sequence mixer).
    """
    path = check_plot_path(path)
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (or 'hybridlm[logging]')") from None

    n = p.num_blocks
    if stages is None:
        stages, start = [], 0
        for seg in p.segments:
            stages.append((start, start + len(seg)))
            start += len(seg)
    if stage_costs is None:
        stage_costs = [float(sum(len(b) for b in p.blocks[a:z])) for a, z in stages]
        unit = "canonical layers"
    extras = list(stage_extras) if stage_extras is not None else [0.0] * len(stages)
    labels = list(stage_labels) if stage_labels is not None else [f"stage {i}" for i in range(len(stages))]

    # x positions: main blocks at 0..n-1, then each MTP depth after a gap.
    mtp_x = []
    x = n + 0.8
    for _ in range(p.mtp_depths):
        mtp_x.append(x)
        x += len(p.mtp_blocks) + 0.5
    width = max(x, n + 1)

    fig = Figure(figsize=(min(24.0, max(7.0, 0.2 * width + 2.5)), 4.6), layout="constrained")
    ax_cost, ax_blk = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1.0])

    # -- per-stage cost bars -------------------------------------------------------------------
    for (a, z), cost, extra in zip(stages, stage_costs, extras):
        if block_costs is None:
            ax_cost.bar(a, cost - extra, width=z - a, align="edge", color="#9aa9bf", edgecolor="white")
        else:
            bottom = 0.0
            for b in range(a, z):
                ax_cost.bar(a, block_costs[b], bottom=bottom, width=z - a, align="edge",
                            color=color(p.blocks[b][0]), edgecolor="white", linewidth=0.4)  # fmt: skip
                bottom += block_costs[b]
        if extra:
            ax_cost.bar(a, extra, bottom=cost - extra, width=z - a, align="edge", color="#d9dde5",
                        edgecolor="#6b7280", hatch="///")  # fmt: skip
        ax_cost.text(
            (a + z) / 2, cost, f"{cost:,.3g}" if cost < 1000 else f"{cost:,.0f}", ha="center", va="bottom", fontsize=8
        )
    if stage_costs:
        mean = sum(stage_costs) / len(stage_costs)
        ax_cost.axhline(mean, color="#374151", linestyle=":", linewidth=1)
        ax_cost.text(0, mean, " mean", va="bottom", fontsize=7, color="#374151")
        ax_cost.set_ylim(0, max(max(stage_costs) * 1.18, 1e-9))  # an empty pattern: no zero-height axis
        imb = max(stage_costs) / mean if mean else 1.0
        ax_cost.set_title(f"per-stage cost (slowest / mean = {imb:.3f})", fontsize=9, loc="left")
    ax_cost.set_ylabel(unit, fontsize=8)
    ax_cost.tick_params(labelsize=7)
    ax_cost.spines[["top", "right"]].set_visible(False)

    # -- the blocks ----------------------------------------------------------------------------
    def draw_block(x0: float, block: str, mtp: bool) -> None:
        h = 1.0 / len(block)
        for j, s in enumerate(block):  # a fused group: sequence mixer on top, channel mixer below
            y = 1.0 - (j + 1) * h
            ax_blk.add_patch(Rectangle((x0 + 0.04, y), 0.92, h, facecolor=color(s), edgecolor="none",
                                       alpha=0.6 if mtp else 1.0))  # fmt: skip
            ax_blk.text(x0 + 0.5, y + h / 2, s, ha="center", va="center", fontsize=7, color="white",
                        fontweight="bold")  # fmt: skip
        if len(block) > 1:
            ax_blk.add_patch(Rectangle((x0 + 0.02, 0.0), 0.96, 1.0, fill=False, edgecolor="black", linewidth=1.6))

    for i, b in enumerate(p.blocks):
        draw_block(i, b, False)
    for d, x0 in enumerate(mtp_x, start=1):
        for j, b in enumerate(p.mtp_blocks):
            draw_block(x0 + j, b, True)
        ax_blk.text(x0 + len(p.mtp_blocks) / 2, 1.08, f"MTP {d}", ha="center", va="bottom", fontsize=7)

    for (a, z), label in zip(stages, labels):
        ax_blk.text((a + z) / 2, -0.12, label, ha="center", va="top", fontsize=7 if z - a >= 2 else 6)
    for a, _ in stages[1:]:
        for ax in (ax_cost, ax_blk):
            ax.axvline(a, color="black", linestyle="--", linewidth=1)
    ax_blk.set_xlim(-0.2, width)
    ax_blk.set_ylim(-0.45, 1.35)
    ax_blk.set_yticks([])
    ax_blk.set_xlabel("block", fontsize=8)
    ax_blk.tick_params(labelsize=7)
    for side in ("top", "right", "left"):
        ax_blk.spines[side].set_visible(False)

    used = [s for s in LAYER_SYMBOLS if s in p.layers or s in p.mtp_layers]
    handles = [Patch(facecolor=color(s), label=f"{s}  {KIND[s]}") for s in used]
    if p.num_fused or any(len(b) > 1 for b in p.mtp_blocks):
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.6, label="[..] fused group"))
    if p.mtp_depths:
        handles.append(Patch(facecolor="#9ca3af", alpha=0.6, label="MTP depth (pale; on the last stage)"))
    if any(extras):
        handles.append(Patch(facecolor="#d9dde5", edgecolor="#6b7280", hatch="///", label="embedding / head + MTP"))
    fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)
    fig.suptitle(title or str(p), fontsize=9, family="monospace")
    try:
        from matplotlib import rc_context

        with rc_context({"svg.fonttype": "none"}):  # text stays text in SVG (smaller, searchable)
            fig.savefig(path, dpi=110)
    except OSError as e:
        raise UsageError(f"--plot {path}: cannot write: {e.strerror}") from None
    return path


def plot_pattern_cli(
    p: HybridPattern,
    path: str | Path,
    pp: int | None = None,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> Path:
    """``hybridlm pattern --plot``: stages from ``pp`` (as the table shows them) or from the ``|`` segments.

    Without a model config the bars count canonical layers; ``hybridlm plan --plot`` draws times.
    """
    if pp is None:
        return plot_pattern(p, path)
    from ..pattern.table import pipeline_plan

    # The table laid these ranks out already and said any automatic-split warning: not twice.
    plan = pipeline_plan(p, pp, first_stage_layers, last_stage_layers, warn=False)
    labels = [f"rank {r}" + ("" if vp is None else f" vp {vp}") for r, vp, _, _ in plan]
    order = sorted(range(len(plan)), key=lambda i: plan[i][2])  # by first block
    return plot_pattern(p, path, [plan[i][2:] for i in order], stage_labels=[labels[i] for i in order])
