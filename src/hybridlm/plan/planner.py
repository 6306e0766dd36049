"""``hybridlm plan``: place ``|`` so the slowest pipeline stage is as fast as it can be.

The ``pp * vpp`` segments are balanced against each other (not the per-rank sums): with Megatron's
interleaving, segment ``vp_stage * pp + pp_rank`` runs on rank ``pp_rank``, and every step of the
schedule is one segment's forward or backward, so the slowest segment sets the pace of the whole
pipeline (and bounds each rank's total by ``vpp`` times its cost). docs/pipeline.md explains more.
"""

from __future__ import annotations

import itertools
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import UsageError
from ..layers import mixer_class
from ..model import HybridLM
from ..ops.float8 import FLOAT8_RECIPES, require_float8_linears
from ..pattern import HybridPattern, parse
from ..pattern.symbols import FUSION_END, FUSION_START, MTP_SEPARATOR, PIPE
from .balance import balanced_cuts, even_cuts, segment_costs
from .cost import BF16, FP32, HARDWARE, Costs, estimate_costs, in_flight, recompute_bytes, stage_memory, with_times

GIB = 2**30


@dataclass(frozen=True)
class StageInfo:
    """One segment of a plan: where it runs, which blocks, its time and memory."""

    index: int
    pp_rank: int
    vp_stage: int
    start: int  # first block
    stop: int  # one past the last block
    layers: int  # canonical layers
    time_s: float
    memory: dict[str, float]


@dataclass
class Plan:
    """A balanced pipeline layout and the layouts it is compared with.

    Attributes:
        pattern: the planned pattern (``|`` placed, MTP kept).
        pp, vpp: pipeline ranks and virtual stages per rank.
        costs: the per-item costs the plan balanced.
        cuts, even_cuts, user_cuts: first block of every segment after the first, for the plan,
            Megatron's even split by block count, and the input pattern's own ``|`` (or None).
        grads_at_peak: :meth:`rank_memory`'s default: False where each rank runs one micro-batch a step.
    """

    pattern: HybridPattern
    pp: int
    vpp: int
    costs: Costs
    cuts: tuple[int, ...]
    even_cuts: tuple[int, ...]
    user_cuts: tuple[int, ...] | None
    stages: list[StageInfo] = field(default_factory=list)
    grads_at_peak: bool = True

    def stage_costs(self, cuts: tuple[int, ...]) -> list[float]:
        """Seconds per segment (stage order) for ``cuts``."""
        c = self.costs
        return segment_costs(c.block_times, cuts, c.first_extra_s, c.last_extra_s)

    def rank_costs(self, cuts: tuple[int, ...]) -> list[float]:
        """Seconds per rank: the sum of its ``vpp`` segments."""
        seg = self.stage_costs(cuts)
        return [sum(seg[v * self.pp + r] for v in range(self.vpp)) for r in range(self.pp)]

    def rank_memory(self, grads_at_peak: bool | None = None) -> list[dict[str, float]]:
        """Per rank: state bytes and peak bytes under 1F1B, without and with checkpointing.

        ``grads_at_peak`` (default: the plan's): the gradients exist at the peak, as they do once a rank has run
        the backward of a step's first micro-batch (its later ones accumulate into them). False for a step of one
        micro-batch whose gradients were set to None: they are made in the backward as the activations are freed,
        so the peak, at the end of the forward, holds none (fp32, 4 bytes a parameter, fewer)."""
        grads_at_peak = self.grads_at_peak if grads_at_peak is None else grads_at_peak
        out = []
        for r in range(self.pp):
            mine = [s for s in self.stages if s.pp_rank == r]
            state = sum(s.memory["state_bytes"] for s in mine)
            params = sum(s.memory["params"] for s in mine)
            gradless = sum(s.memory["gradless"] for s in mine)
            indices = {s.index for s in mine}
            if len(mine) > 1 and {0, len(self.stages) - 1} <= indices:
                # One rank (pp 1) holds the first and the last segment: the embedding the last stage
                # shares (tied head, MTP) is the one the first stage holds, counted there already (without a
                # bf16 copy, as stage_memory counts it; a frozen one without gradient and optimizer state either).
                shared, frozen = self.costs.shared_embedding_params, bool(self.costs.embedding.gradless_params)
                per = (
                    self.costs.state_bytes_per_param - BF16 - (self.costs.state_bytes_per_param - BF16 - FP32) * frozen
                )
                state -= shared * per
                params -= shared
                gradless -= shared if frozen else 0
            held = state - (0 if grads_at_peak else (params - gradless) * FP32)  # (frozen parameters have none)
            # The loss's logits chunk (the last stage's) is live at the end of a forward, a block's recomputation
            # in a backward: never both at once.
            work = max(s.memory["work_bytes"] for s in mine)
            n = in_flight(r, self.pp, self.vpp)
            act = sum(s.memory["act_bytes"] for s in mine) / len(mine)
            # With checkpointing every micro-batch in flight keeps its stage's inputs (and head), but only the
            # one in its backward recomputes a block: that block's activations count once, not n times.
            again = [recompute_bytes(self.costs, s.start, s.stop) for s in mine]
            ckpt = sum(s.memory["act_bytes_ckpt"] - a for s, a in zip(mine, again)) / len(mine)
            out.append(
                {
                    "state_bytes": state,
                    "peak_bytes": held + n * act + work,
                    "peak_bytes_ckpt": held + n * ckpt + max(*again, work),
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        ms = 1e3
        planned, even = self.stage_costs(self.cuts), self.stage_costs(self.even_cuts)
        out: dict[str, Any] = {
            "pattern": str(self.pattern),
            "pp": self.pp,
            "vpp": self.vpp,
            "seq_len": self.costs.seq_len,
            "micro_batch_size": self.costs.micro_batch_size,
            "recompute": self.costs.recompute,
            "grads_at_peak": self.grads_at_peak,
            "float8": self.costs.float8,
            "float8_auto_filter": self.costs.float8_auto_filter,
            "unit": "ms (forward+backward of one micro-batch)",
            "source": self.costs.source,
            "block_costs": [t * ms for t in self.costs.block_times],
            "first_stage_extra_cost": self.costs.first_extra_s * ms,
            "last_stage_extra_cost": self.costs.last_extra_s * ms,
            "stage_costs": [t * ms for t in planned],
            "even_split_stage_costs": [t * ms for t in even],
            "imbalance": imbalance(planned),
            "even_split_imbalance": imbalance(even),
            "rank_costs": [t * ms for t in self.rank_costs(self.cuts)],
            "stages": [
                {"pp_rank": s.pp_rank, "vp_stage": s.vp_stage, "blocks": [s.start, s.stop], "layers": s.layers}
                | s.memory
                for s in self.stages
            ],
            "ranks": self.rank_memory(),
        }
        if self.user_cuts is not None:
            user = self.stage_costs(self.user_cuts)
            out["user_stage_costs"] = [t * ms for t in user]
            out["user_imbalance"] = imbalance(user)
        return out

    def plot(self, path: str) -> Path:
        """Draw the planned pattern with its per-stage costs (see :func:`hybridlm.plan.plot.plot_pattern`)."""
        from .plot import plot_pattern

        k = len(self.stages)
        extras = [0.0] * k
        extras[0] += self.costs.first_extra_s * 1e3
        extras[-1] += self.costs.last_extra_s * 1e3
        labels = [f"rank {s.pp_rank}" + (f"\nvp {s.vp_stage}" if self.vpp > 1 else "") for s in self.stages]
        return plot_pattern(
            self.pattern,
            path,
            [(s.start, s.stop) for s in self.stages],
            [s.time_s * 1e3 for s in self.stages],
            extras,
            "ms per micro-batch (fwd+bwd)",
            labels,
            block_costs=[t * 1e3 for t in self.costs.block_times],
        )

    def render(self) -> str:
        """The plan as text: pattern, a table per stage and per rank, and the comparison."""
        c = self.costs
        lines = [
            f"pipeline plan: pp {self.pp} x vpp {self.vpp} = {self.pp * self.vpp} stage{'s' * (self.pp * self.vpp != 1)}, seq_len {c.seq_len}, "
            f"micro-batch {c.micro_batch_size}, activation checkpointing {'on' if c.recompute else 'off'}"
            + (f", float8 {c.float8}" if c.float8 != "none" else "")
            + (" (small layers left out)" if c.float8_auto_filter else ""),
            f"costs: {c.source}; ms = forward+backward of one micro-batch",
            "",
            f"pattern  {self.pattern}",
            "",
        ]
        rows = [["stage", "rank", "vp", "blocks", "layers", "ms", "params", "state GiB", "act GiB", "act GiB (AC)"]]
        for s in self.stages:
            m = s.memory
            rows.append(
                [str(s.index), str(s.pp_rank), str(s.vp_stage), f"{s.start}-{s.stop - 1}", str(s.layers),
                 _ms(s.time_s), _count(m["params"]), _gib(m['state_bytes']),
                 _gib(m['act_bytes']), _gib(m['act_bytes_ckpt'])]
            )  # fmt: skip
        lines += _table(rows)
        peak = "state + in-flight micro-batches' activations + the loss's logits chunk"
        if not self.grads_at_peak:
            peak += "; one micro-batch a step: no gradients at the peak"
        lines += ["", f"per rank (peak memory under 1F1B: {peak})"]
        rows = [["rank", "ms", "state GiB", "peak GiB", "peak GiB (AC)"]]
        for r, (t, m) in enumerate(zip(self.rank_costs(self.cuts), self.rank_memory())):
            rows.append([str(r), _ms(t), _gib(m['state_bytes']), _gib(m['peak_bytes']),
                         _gib(m['peak_bytes_ckpt'])])  # fmt: skip
        lines += _table(rows)
        # Megatron's split by block count (no '|', one stage per rank) refuses blocks that do not divide evenly.
        blocks, k = self.pattern.num_blocks, len(self.stages)
        refused = self.vpp == 1 and blocks % k != 0
        layouts = [("planned", self.cuts), ("even split" + (" (rounded)" if refused else ""), self.even_cuts)]
        if self.user_cuts is not None:
            n = len(self.user_cuts) + 1
            layouts.append(("your '|'" + ("" if n == len(self.stages) else f" ({n} stages)"), self.user_cuts))
        rows = [["layout", "slowest stage ms", "imbalance (max/mean)", "stage ms"]]
        for name, cuts in layouts:
            seg = self.stage_costs(cuts)
            rows.append([name, _ms(max(seg)), f"{imbalance(seg):.3f}", " ".join(_ms(t) for t in seg)])
        lines += ["", *_table(rows)]
        if refused:
            lines.append(
                f"(even split rounded: {blocks} blocks do not divide into {k} stages, which Megatron's split by block "
                "count refuses; the row cuts as evenly as the blocks allow)"
            )
        speedup = max(self.stage_costs(self.even_cuts)) / max(self.stage_costs(self.cuts))
        # Rounded as printed: "1.000x faster" would claim a gain where the plan is the even split's equal.
        gain = f"{speedup:.3f}x faster" if round(speedup, 3) > 1 else "as fast (the even split is already balanced)"
        lines.append(f"\nslowest stage vs the even split: {gain}")
        return "\n".join(lines)


def imbalance(stage_costs: list[float]) -> float:
    """Slowest stage over the mean stage (1.0 = perfectly balanced)."""
    mean = sum(stage_costs) / len(stage_costs)
    return max(stage_costs) / mean if mean > 0 else 1.0


def _ms(t: float) -> str:
    """Seconds as milliseconds with at least three significant digits."""
    ms = t * 1e3
    return f"{ms:.2f}" if ms >= 10 else f"{ms:.3g}"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.3g}"


def _count(n: float) -> str:
    # Thousands below a million: a tiny model's stages would all read "0.0M". The unit is chosen on the
    # value as shown: 999,999 reads "1.0M", not "1000.0K".
    if round(n / 1e6, 1) >= 1000:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if round(n / 1e3, 1) >= 1000 else f"{n / 1e3:.1f}K"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def block_text(block: str) -> str:
    """A block string as pattern text: ``'*-'`` -> ``'[*-]'``, ``'M'`` -> ``'M'``."""
    return block if len(block) == 1 else FUSION_START + block + FUSION_END


def with_cuts(p: HybridPattern, cuts: tuple[int, ...]) -> HybridPattern:
    """``p`` with its ``|`` replaced by ``cuts`` (the first block of every segment after the first)."""
    bounds = [0, *cuts, p.num_blocks]
    main = PIPE.join("".join(block_text(b) for b in p.blocks[a:z]) for a, z in itertools.pairwise(bounds))
    return parse(main + (MTP_SEPARATOR + p.mtp) * p.mtp_depths if p.mtp else main)


def plan_pipeline(
    config: ModelConfig,
    pp: int,
    vpp: int = 1,
    *,
    seq_len: int = 4096,
    micro_batch_size: int = 1,
    recompute: bool = False,
    hardware: str = "h100",
    measure: str | None = None,
    float8: str = "none",
    float8_auto_filter: bool = False,
    grads_at_peak: bool = True,
    trainable: Set[str] | None = None,
) -> Plan:
    """Balance ``config.pattern`` over ``pp`` ranks with ``vpp`` virtual stages each.

    Args:
        config: the model; its pattern's own ``|`` (if any) are reported for comparison.
        pp, vpp: pipeline ranks and virtual stages per rank.
        seq_len, micro_batch_size: the micro-batch the costs are computed for.
        recompute: block-level activation checkpointing.
        hardware: roofline of the estimate (a key of ``hybridlm.plan.cost.HARDWARE``).
        measure: a device (``'cuda'``, ``'cpu'``) to time each block kind on instead of estimating.
        float8: a ``train.float8`` recipe: the blocks' convertible linear layers (``ops.float8``) estimated
            at the float8 peak, or measured as torchao's float8 layers.
        float8_auto_filter: with ``float8``, the layers too small to gain stay in bf16 (``train.float8_auto_filter``).
        grads_at_peak: whether the ranks' peaks hold the gradients (:meth:`Plan.rank_memory`): False where each
            rank runs one micro-batch a step.
        trainable: canonical names of the parameters ``train.trainable`` trains (None: all); the others hold no
            gradient and no optimizer state (:func:`~hybridlm.plan.cost.estimate_costs`).
    """
    for name, value in (("pp", pp), ("vpp", vpp), ("seq_len", seq_len), ("micro_batch_size", micro_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if hardware not in HARDWARE:
        raise UsageError(f"--hardware {hardware!r} is not known; choose one of {', '.join(HARDWARE)}")
    if float8 not in FLOAT8_RECIPES:
        raise UsageError(f"--float8 {float8!r} is not one of {', '.join(FLOAT8_RECIPES)}")
    if float8 != "none" and measure is None and HARDWARE[hardware].float8_flops_per_s is None:
        raise UsageError(
            f"--float8 {float8}: the {HARDWARE[hardware].name} has no float8 matmuls; estimate for "
            f"{' or '.join(k for k, hw in HARDWARE.items() if hw.float8_flops_per_s)} or set --float8 none"
        )
    for symbol in sorted(config.symbols):
        try:
            mixer_class(symbol)
        except NotImplementedError as e:
            raise UsageError(f"cannot plan this pattern: {e}") from None
    p = config.parsed
    k = pp * vpp
    if p.num_blocks < k:
        raise UsageError(
            f"cannot place {k} pipeline stages (pp {pp} x vpp {vpp}) on {p.num_blocks} blocks: every stage needs a "
            "block (a fused group is one block)"
        )
    float8_auto_filter = float8_auto_filter and float8 != "none"  # no float8, nothing to leave out
    if float8 != "none":
        try:
            require_float8_linears(HybridLM(config, device="meta"), float8, float8_auto_filter)
        except ValueError as e:
            raise UsageError(f"--float8 {float8}: {e}") from None
    # Measured, every item's time is replaced: the estimate gives only FLOPs, bytes and memory, which no roofline
    # changes, so one without float8 matmuls (the A100's) is swapped for one with them rather than refused.
    roofline = hardware if measure is None or HARDWARE[hardware].float8_flops_per_s else "h100"
    costs = estimate_costs(
        config, seq_len, micro_batch_size, recompute, roofline, float8, float8_auto_filter, trainable
    )
    if measure is not None:
        from .measure import measure_times

        if micro_batch_size * seq_len * config.hidden_size > 2**63 - 1:  # (torch: "Overflow when unpacking long long")
            raise UsageError(
                f"--measure: micro-batches of {micro_batch_size} x {seq_len} tokens of hidden size {config.hidden_size} "
                "do not fit in a tensor; measure at a smaller --seq-len or --micro-batch-size (the estimate takes any)"
            )

        try:
            times = measure_times(
                config,
                seq_len,
                micro_batch_size,
                measure,
                recompute,
                float8=float8,
                float8_auto_filter=float8_auto_filter,
            )
        except ImportError as e:  # torchao missing: how to install it
            raise UsageError(f"--float8 {float8}: {e}") from None
        # (measured training every parameter: with train.trainable each item's share of that, as estimated)
        everything = None if trainable is None else estimate_costs(
            config, seq_len, micro_batch_size, recompute, roofline, float8, float8_auto_filter
        )  # fmt: skip
        costs = with_times(costs, times, f"measured on {measure}", everything)
    times = costs.block_times
    cuts = balanced_cuts(times, k, costs.first_extra_s, costs.last_extra_s)
    user = None
    if len(p.segments) > 1:
        user = tuple(sum(len(s) for s in p.segments[:i]) for i in range(1, len(p.segments)))
    plan = Plan(with_cuts(p, cuts), pp, vpp, costs, cuts, even_cuts(p.num_blocks, k), user, grads_at_peak=grads_at_peak)
    bounds = [0, *cuts, p.num_blocks]
    seg = plan.stage_costs(cuts)
    for i in range(k):
        a, z = bounds[i], bounds[i + 1]
        memory = stage_memory(costs, a, z, i == 0, i == k - 1)
        layers = sum(len(b) for b in p.blocks[a:z])
        plan.stages.append(StageInfo(i, i % pp, i // pp, a, z, layers, seg[i], memory))
    return plan
