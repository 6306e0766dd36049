"""Host cost of a training step, fused against unfused blocks, measured on CPU at tiny widths.

A preset's pattern (``bench-1.3b`` by default) with every width shrunk until the arithmetic is
negligible, so a forward + backward of a short row is almost all framework work: Python, autograd,
dynamo guards, launches. Compiled blocks by default (as the trainer runs them); each variant is run
in both orders, and the medians are printed. No GPU needed::

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --eager --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from train_step import fuse_all  # this folder is on the path when run as a script

from hybridlm import HybridLM
from hybridlm.config import ModelConfig
from hybridlm.parallel.execution import compile_blocks
from hybridlm.presets import PRESETS

#: The tiny preset's widths (the arithmetic of a 64-token row costs next to nothing), with the
#: head width derived from them.
TINY = {k: v for k, v in PRESETS["tiny"].items() if k != "pattern"} | {"head_dim": None}


def step_ms(config: ModelConfig, compiled: bool, steps: int, seq: int) -> float:
    """Median milliseconds of a forward + backward of one packed row (two documents)."""
    torch._dynamo.reset()
    model = HybridLM(config, seed=0)
    if compiled:
        compile_blocks(model)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    doc = (torch.arange(seq) >= seq // 2).long()[None]
    times = []
    for _ in range(steps + 10):  # the first ones compile
        t = time.perf_counter()
        model(ids, ids, doc_ids=doc, return_logits=False).loss.backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times[10:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-1.3b", help="whose pattern to run (widths are shrunk)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run (after 10 untimed)")
    ap.add_argument("--seq", type=int, default=64, help="tokens in the row")
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = ModelConfig.preset(args.preset)
    variants = {"unfused": base.pattern, "fused": fuse_all(base.pattern)}
    results: dict[str, list[float]] = {name: [] for name in variants}
    for order in (list(variants), list(reversed(variants))):
        for name in order:
            config = base.replace(pattern=variants[name], **TINY)
            results[name].append(step_ms(config, not args.eager, args.steps, args.seq))
            print(f"{name:8s} {results[name][-1]:8.2f} ms", flush=True)
    mode = "eager" if args.eager else "compiled blocks"
    print(f"{args.preset} at tiny widths, 1 × {args.seq} tokens, {mode}, CPU, medians of {args.steps} steps:")
    for name, ms in results.items():
        print(f"  {name:8s} {' / '.join(f'{m:.2f}' for m in ms)} ms (two run orders)")
    print(f"  fused / unfused host time: {statistics.mean(results['fused']) / statistics.mean(results['unfused']):.3f}")


if __name__ == "__main__":
    main()
