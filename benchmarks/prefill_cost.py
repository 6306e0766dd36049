"""What one cached forward costs against how many positions it runs: the number behind
``hybridlm.infer.prefixes.FORWARD_POSITIONS``.

    python benchmarks/prefill_cost.py                                        # CPU, embedded default model
    python benchmarks/prefill_cost.py --device cuda --preset bench-1.3b      # the GPU estimate to check

Running prompts' shared prefixes once splits one forward into several (the prefixes, then the rests, a forward per
rest length). Whether that pays depends on what a forward costs beyond its positions: on a GPU a small forward is
mostly kernel launches. For each (rows, positions) given, this times a cached forward of that shape (random tokens,
the model's own prefill path with ``logits_to_keep=1``, median of ``--repeat`` runs after a warm-up), then fits
``time = fixed + positions_run / rate`` by least squares over all shapes and prints ``fixed * rate``: the positions
a forward costs even when it runs almost none. Results belong in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.infer.cache import InferenceCache
from hybridlm.train.config import DEFAULT_MODEL


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def time_forward(model, rows: int, positions: int, repeat: int) -> float:
    """Median seconds of one cached forward of ``rows`` x ``positions`` tokens into a fresh cache."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (rows, positions), device=device)
    times = []
    for i in range(repeat + 1):  # (the first is a warm-up: kernels compiled or autotuned for this shape)
        cache = InferenceCache.for_model(model, rows, positions)
        t0 = sync(device)
        model(ids, cache=cache, logits_to_keep=1)
        if i:
            times.append(sync(device) - t0)
    return statistics.median(times)


def fit(shapes: list[tuple[int, int]], seconds: list[float]) -> tuple[float, float]:
    """Least squares of ``seconds = fixed + tokens / rate`` over the shapes (tokens = rows x positions): (fixed
    seconds, tokens per second)."""
    x = torch.tensor([float(r * p) for r, p in shapes], dtype=torch.float64)
    y = torch.tensor(seconds, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    fixed, per_token = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
    return fixed, 1.0 / per_token if per_token > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu; bf16 on CUDA)")
    ap.add_argument("--preset", default=None, help="a model preset (random weights) in place of the default")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="batch rows to time (default: 1 8)")
    ap.add_argument(
        "--positions",
        type=int,
        nargs="+",
        default=[1, 8, 64, 256, 1024],
        help="positions per forward to time (default: 1 8 64 256 1024)",
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per shape; the median is used (default: 5)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig.preset(args.preset) if args.preset else ModelConfig(**{**DEFAULT_MODEL, "vocab_size": 257})
    model = HybridLM(config, seed=0, device=device).to(dtype).eval()
    shapes = [(r, p) for r in args.rows for p in args.positions]
    seconds = [time_forward(model, r, p, args.repeat) for r, p in shapes]
    name = args.preset or "embedded default model"
    print(f"cached forwards, {name} ({str(dtype).removeprefix('torch.')}, {device}), median of {args.repeat}\n")
    print("| rows | positions | ms | positions run per s |")
    print("|---:|---:|---:|---:|")
    for (r, p), s in zip(shapes, seconds):
        print(f"| {r} | {p} | {s * 1e3:.2f} | {r * p / s:,.0f} |")
    fixed, rate = fit(shapes, seconds)
    print(
        f"\nfit: {fixed * 1e3:.2f} ms per forward + {rate:,.0f} positions per s: a forward costs "
        f"{max(fixed, 0.0) * rate:,.0f} positions at least (FORWARD_POSITIONS)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
