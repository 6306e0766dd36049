"""Top-p filtering alone: the Triton kernel against the sorting reference, on one GPU.

    python benchmarks/top_p.py                       # rows 1, 8, 64 of a 131,072 vocabulary
    python benchmarks/top_p.py --rows 1 64 256 --vocab 152064 --reps 200
    python benchmarks/top_p.py --tune                # the kernel's cuts a pass, logits a step, programs per SM

For each row count: float32 logits rounded from bf16 (half the rows peaked, half flat), shifted as the sampler
shifts them; the two paths (``hybridlm.ops.top_p``) taking turns, each timed eagerly (a call's wall time, host
launches included: how ``generate`` samples, outside its decode graph; the kernel's eager calls of up to
``GRAPHED_LOGITS`` logits replay a graph of their launches, and "kernel, no graph" launches them one by one) and
replayed in a CUDA graph (the device's time alone), medians over ``--reps`` calls; and whether the paths kept the
same tokens. Results belong in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from hybridlm.ops.top_p import top_p_filter_reference
from hybridlm.ops.top_p_triton import _launch, top_p_filter_triton


def launched(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """The kernel's launches without the eager path's graph (what a caller's CUDA graph captures)."""
    out = torch.empty_like(x)
    _launch(x, torch.full((), top_p, device=x.device), out)
    return out


#: The paths timed: the first is the baseline of the ratios.
PATHS = {"sorting (reference)": top_p_filter_reference, "kernel": top_p_filter_triton, "kernel, no graph": launched}


def logits(rows: int, vocab: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(rows)
    base = torch.randn(rows, vocab, device="cuda", generator=g)
    x = torch.where(torch.arange(rows, device="cuda")[:, None] % 2 == 0, base * 4, base * 0.5).bfloat16().float()
    return x - x.amax(-1, keepdim=True)


def eager_ms(fn, x: torch.Tensor, top_p: float) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x, top_p)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def graph_ms(call, reps: int) -> float:
    """Median device ms of one ``call()`` replayed from a CUDA graph that holds ``reps`` calls (5 replays)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def tune(rows_list: list[int], vocab: int, top_p: float, reps: int) -> None:
    """The kernel's graphed ms for each (cuts a pass, logits a step, PROGRAMS_PER_SM) of a small grid, every row
    count."""
    from hybridlm.ops import top_p_triton as k

    inputs = {rows: logits(rows, vocab) for rows in rows_list}
    print("| cuts a pass | logits a step | programs per SM | " + " | ".join(f"{r} rows ms" for r in rows_list) + " |")
    print("|---:|---:|---:|" + "---:|" * len(rows_list))
    kept = (k._ways, k.PROGRAMS_PER_SM)
    for ways in (4, 8, 16):
        for tile in (4096, 8192):
            for per_sm in (2, 8):
                k._ways, k.PROGRAMS_PER_SM = (lambda rows, v, w=ways, b=tile // ways: (w, b)), per_sm
                ms = []
                for x in inputs.values():
                    launched(x, top_p)  # (compiles)
                    ms.append(graph_ms(lambda x=x: launched(x, top_p), reps))
                row = f"| {ways} | {tile // ways} | {per_sm} | " + " | ".join(f"{t:.3f}" for t in ms) + " |"
                print(row, flush=True)
    k._ways, k.PROGRAMS_PER_SM = kept


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument(
        "--tune", action="store_true", help="time the kernel's cuts a pass, logits a step and programs per SM instead"
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    if args.tune:
        tune(args.rows, args.vocab, args.top_p, 20)
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, vocabulary {args.vocab}, top_p {args.top_p}\n")
    print(
        "| rows | path | eager ms a call | against sorting | graphed ms a call | against sorting | same tokens kept |"
    )
    print("|---:|---|---:|---:|---:|---:|:---:|")
    for rows in args.rows:
        x = logits(rows, args.vocab)
        kept = {name: fn(x, args.top_p).isfinite() for name, fn in PATHS.items()}  # (compiles the kernels)
        eager: dict[str, list[float]] = {name: [] for name in PATHS}
        for _ in range(args.reps):
            for name, fn in PATHS.items():
                eager[name].append(eager_ms(fn, x, args.top_p))
        graphed = {name: graph_ms(lambda fn=fn, x=x: fn(x, args.top_p), args.reps) for name, fn in PATHS.items()}
        differ = int((kept["kernel"] != kept["sorting (reference)"]).sum())
        same = "yes" if differ == 0 and torch.equal(kept["kernel"], kept["kernel, no graph"]) else f"no ({differ})"
        base = "sorting (reference)"
        for name in PATHS:
            ratio = graphed[base] / graphed[name]
            eager_ratio = statistics.median(eager[base]) / statistics.median(eager[name])
            print(
                f"| {rows} | {name} | {statistics.median(eager[name]):.3f} | {eager_ratio:.2f}x | "
                f"{graphed[name]:.3f} | {ratio:.2f}x | {same} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
