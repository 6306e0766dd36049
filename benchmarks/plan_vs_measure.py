"""How good is `hybridlm plan`'s roofline estimate as a planner? Its per-block times beside the measured ones, and the
layout it picks judged by measured times.

    python benchmarks/plan_vs_measure.py --preset nemotron-h-8b --pp 4            # on a GPU: measured on cuda
    python benchmarks/plan_vs_measure.py --preset tiny --pp 2 --seq-len 64 --device cpu

Prints two tables. (1) Each block kind's forward+backward ms, estimated (the roofline of ``--hardware``, by default
the one whose name the GPU's contains) and measured (``hybridlm plan --measure``'s timing), with their ratio; the
embedding, head and one MTP depth too. (2) Three layouts, each costed with the *measured* times: the one planned from
the estimate, the one planned from the measurement (the best this planner can do), and Megatron's even split by
block count: slowest stage, imbalance, and the estimate's layout's slowest stage over the measured plan's. A ratio
of 1.000 means the estimate is as good a planner as a measurement.
"""

from __future__ import annotations

import argparse

import torch

from hybridlm import ModelConfig
from hybridlm.plan.cost import HARDWARE
from hybridlm.plan.planner import Plan, imbalance, plan_pipeline


def hardware_of(device: str) -> str:
    """The roofline whose name the device's contains (``NVIDIA H200`` -> ``h200``), else ``h100``."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device)).lower()
        for key in HARDWARE:
            if key in name:
                return key
    return "h100"


def item_rows(estimated: Plan, measured: Plan) -> list[tuple[str, float, float]]:
    """(item, estimated ms, measured ms) of each block kind (first occurrence), the embedding, head and an MTP depth."""
    e, m = estimated.costs, measured.costs
    rows, seen = [], set()
    for be, bm in zip(e.blocks, m.blocks):
        if be.name not in seen:
            seen.add(be.name)
            rows.append((be.name, be.time_s * 1e3, bm.time_s * 1e3))
    rows.append(("embedding", e.embedding.time_s * 1e3, m.embedding.time_s * 1e3))
    rows.append(("head", e.head.time_s * 1e3, m.head.time_s * 1e3))
    if e.mtp:
        rows.append(("mtp depth", e.mtp[0].time_s * 1e3, m.mtp[0].time_s * 1e3))
    return rows


def layout_rows(estimated: Plan, measured: Plan) -> list[tuple[str, str, float, float]]:
    """(layout, its pattern's cuts, slowest stage ms, imbalance) of each layout, all costed with measured times."""
    out = []
    for name, cuts in (
        ("planned from the estimate", estimated.cuts),
        ("planned from the measurement", measured.cuts),
        ("even split by blocks", measured.even_cuts),
    ):
        ranks = measured.rank_costs(cuts)
        out.append((name, ",".join(map(str, cuts)), max(ranks) * 1e3, imbalance(ranks)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="nemotron-h-8b")
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--vpp", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hardware", choices=list(HARDWARE), help="the estimate's roofline (default: the device's)")
    args = ap.parse_args(argv)
    config = ModelConfig.preset(args.preset)
    hw = args.hardware or hardware_of(args.device)
    common = dict(seq_len=args.seq_len, micro_batch_size=args.micro_batch_size, recompute=args.recompute)
    estimated = plan_pipeline(config, args.pp, args.vpp, hardware=hw, **common)
    measured = plan_pipeline(config, args.pp, args.vpp, measure=args.device, **common)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"{args.preset}, pp {args.pp} x vpp {args.vpp}, {args.micro_batch_size} x {args.seq_len} tokens a micro-batch"
        f"{', recompute' if args.recompute else ''}; estimate: {estimated.costs.source}; measured on {where}"
    )
    print(f"\n{'item':<14} {'estimated ms':>13} {'measured ms':>12} {'measured/estimated':>19}")
    for name, e, m in item_rows(estimated, measured):
        print(f"{name:<14} {e:>13.4g} {m:>12.4g} {m / e if e else float('nan'):>19.2f}")
    rows = layout_rows(estimated, measured)
    best = rows[1][2]
    print(
        f"\n{'layout (measured times)':<30} {'cuts':<24} {'slowest rank ms':>16} {'imbalance':>10} {'vs measured plan':>17}"
    )
    for name, cuts, slowest, imb in rows:
        print(f"{name:<30} {cuts:<24} {slowest:>16.3f} {imb:>10.3f} {slowest / best:>17.3f}")
    print(f"\nestimated plan: {estimated.pattern}\nmeasured plan:  {measured.pattern}")


if __name__ == "__main__":
    main()
