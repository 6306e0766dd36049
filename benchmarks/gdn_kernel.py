"""The chunked gated delta rule: torch path against the Triton kernels, and one Gated DeltaNet mixer.

    python benchmarks/gdn_kernel.py                 # op and mixer table (bf16, b=4, l=4096, 16 x 128)
    python benchmarks/gdn_kernel.py --compile       # add torch.compile rows (slower to start)
    python benchmarks/gdn_kernel.py --check         # also bf16 error ratios at L=4096 (issue 8's bar: <= 2)

Prints one table: forward ms, forward + backward ms and peak GiB (above the inputs), for the op
and for one mixer (projections, conv, the rule, gated norm; bf16 autocast, float32 parameters),
each with one document per row and packed (several documents per row). ``--check`` prints, for
the output and every gradient, the Triton path's error against a float64 run on the exact
inputs divided by the error of that float64 run fed the same bf16-rounded inputs (output rounded
to bf16), and exits 1 when a ratio exceeds 2 or is not finite. Needs a CUDA device; results belong
in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

from hybridlm import ModelConfig
from hybridlm.layers.context import SequenceContext
from hybridlm.layers.gdn import GatedDeltaNet
from hybridlm.ops import gated_delta_triton
from hybridlm.ops.dispatch import paths_used, use_kernels
from hybridlm.ops.gated_delta import gated_delta_rule_chunked, gated_delta_rule_chunked_torch, l2_normalize


def packed_seq_idx(b: int, seqlen: int, docs: int, device, seed: int = 0) -> torch.Tensor:
    """(b, l) document index with ``docs`` documents of random lengths per row."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        cuts = torch.randperm(seqlen - 1, generator=gen)[: docs - 1].sort().values + 1
        idx = torch.zeros(seqlen, dtype=torch.long)
        idx[cuts] = 1
        rows.append(idx.cumsum(0))
    return torch.stack(rows).to(device)


def op_inputs(b, seqlen, h, dk, dv, device, seed=0):
    """float32 inputs as the mixer makes them: unit-norm q, k; g <= 0; beta in (0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = l2_normalize(torch.randn(b, seqlen, h, dk, device=device, generator=gen))
    k = l2_normalize(torch.randn(b, seqlen, h, dk, device=device, generator=gen))
    v = torch.randn(b, seqlen, h, dv, device=device, generator=gen)
    g = -torch.exp(torch.rand(h, device=device) * 2.7) * torch.nn.functional.softplus(
        torch.randn(b, seqlen, h, device=device, generator=gen) - 4.0
    )
    beta = torch.rand(b, seqlen, h, device=device, generator=gen)
    return q, k, v, g, beta


def timed(fn, warmup: int = 3, iters: int = 10) -> tuple[float, float]:
    """(median ms, peak GiB above what was allocated before)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_op(path: str, compiled: bool, seq_idx, args) -> tuple[float, float, float]:
    q, k, v, g, beta = op_inputs(args.batch, args.seq, args.heads, args.dim, args.dim, "cuda")
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    g, beta = g.requires_grad_(), beta.requires_grad_()
    fn = gated_delta_rule_chunked_torch if path == "torch" else gated_delta_rule_chunked
    if compiled:
        fn = torch.compile(fn)
    grad = torch.randn_like(v)

    def fwd():
        with torch.no_grad():
            fn(q, k, v, g, beta, args.chunk, seq_idx=seq_idx)

    def fwd_bwd():
        for t in (q, k, v, g, beta):  # written, not accumulated: as after a training step's zero_grad
            t.grad = None
        fn(q, k, v, g, beta, args.chunk, seq_idx=seq_idx).backward(grad)

    with use_kernels(path):
        f_ms, _ = timed(fwd)
        fb_ms, peak = timed(fwd_bwd)
    return f_ms, fb_ms, peak


def bench_mixer(path: str, compiled: bool, seq_idx, args) -> tuple[float, float, float]:
    config = ModelConfig(pattern="G", vocab_size=256, hidden_size=2048, gdn_num_heads=args.heads, gdn_head_dim=args.dim)
    layer = GatedDeltaNet(config).cuda()
    layer.init_weights(None, 0.02, 0.02)
    x = torch.randn(args.batch, args.seq, config.hidden_size, device="cuda", requires_grad=True)
    positions = torch.arange(args.seq, device="cuda").expand(args.batch, -1)
    ctx = SequenceContext(position_ids=positions, seq_idx=seq_idx)
    run = torch.compile(layer) if compiled else layer

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            run(x, ctx)

    def fwd_bwd():
        for t in (x, *layer.parameters()):  # written, not accumulated: as after a training step's zero_grad
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = run(x, ctx)
        y.float().square().mean().backward()

    with use_kernels(path):
        f_ms, _ = timed(fwd)
        fb_ms, peak = timed(fwd_bwd)
    return f_ms, fb_ms, peak


def error_ratios(packed: bool, seqlen: int = 4096, h: int = 4, dim: int = 128) -> dict[str, float]:
    """Triton bf16 error / error of float64 on bf16-rounded inputs (rounded to bf16), per output and gradient.

    Errors are max |x - exact| / max |exact|; ``exact`` is the float64 chunked torch path on the
    exact inputs (tests show it equals the float64 step recurrence).
    """
    q, k, v, g, beta = op_inputs(1, seqlen, h, dim, dim, "cuda", seed=1)
    seq_idx = packed_seq_idx(1, seqlen, 6, "cuda", seed=1) if packed else None
    do = torch.randn(1, seqlen, h, dim, device="cuda")
    names = ["o", "q", "k", "v", "g", "beta"]

    def run(inputs, grad, path):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with use_kernels(path):
            o = gated_delta_rule_chunked(*leaves, 64, seq_idx=seq_idx)
        o.backward(grad)
        return [o.detach()] + [t.grad for t in leaves]

    bf16 = [t.bfloat16() for t in (q, k, v)] + [g, beta]
    exact = run([t.double() for t in (q, k, v, g, beta)], do.double(), "torch")
    rounded = run([t.double() for t in bf16], do.bfloat16().double(), "torch")
    rounded = [r.to(a.dtype) for r, a in zip(rounded, [v.bfloat16(), *bf16])]  # store as the kernel does
    actual = run(bf16, do.bfloat16(), "triton")
    assert paths_used()["gated_delta"] == "triton"

    def err(a, e):
        return ((a.double() - e).abs().max() / e.abs().max()).item()

    return {n: err(a, e) / err(r, e) for n, a, r, e in zip(names, actual, rounded, exact)}


BAR = 2.0  # issue 8's bar on each error ratio


def failing(ratios: dict[str, float]) -> list[str]:
    """The names in ``ratios`` above :data:`BAR` or not finite (a NaN gradient is a failure, not a pass)."""
    return [n for n, r in ratios.items() if not (math.isfinite(r) and r <= BAR)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128, help="dk = dv")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--docs", type=int, default=8, help="documents per row in the packed rows")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument("--check", action="store_true", help="print bf16 error ratios (L=4096, b=1, h=4)")
    p.add_argument("--no-bench", action="store_true", help="skip the timing table")
    p.add_argument("--precision", default=gated_delta_triton.DOT_PRECISION, choices=["tf32", "tf32x3", "ieee"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gdn_kernel.py needs a CUDA device")
    gated_delta_triton.DOT_PRECISION = args.precision
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, dot precision {args.precision}")
    if not args.no_bench:
        print(f"b={args.batch} l={args.seq} h={args.heads} dk=dv={args.dim} chunk={args.chunk} bf16")
        print("| what | path | packed | fwd ms | fwd+bwd ms | peak GiB |\n|---|---|---|---|---|---|")
        packed = packed_seq_idx(args.batch, args.seq, args.docs, "cuda")
        rows = [("op", bench_op), ("mixer", bench_mixer)]
        paths = [("torch", False), ("triton", False)] + ([("torch", True), ("triton", True)] if args.compile else [])
        for what, fn in rows:
            for path, compiled in paths:
                for seq_idx in (None, packed):
                    f_ms, fb_ms, peak = fn(path, compiled, seq_idx, args)
                    name = f"{path} (compiled)" if compiled else path
                    yes = "yes" if seq_idx is not None else "no"
                    print(f"| {what} | {name} | {yes} | {f_ms:.2f} | {fb_ms:.2f} | {peak:.2f} |", flush=True)
    if args.check:
        print("\nbf16 error / error of float64 on bf16-rounded inputs (L=4096, b=1, h=4; bar: <= 2)")
        bad = []
        for packed in (False, True):
            ratios = error_ratios(packed)
            print(f"packed={packed}: " + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items()), flush=True)
            bad += [f"{n} (packed={packed})" for n in failing(ratios)]
        print(f"FAIL: over the bar of {BAR:g}: {', '.join(bad)}" if bad else "PASS")
        if bad:
            sys.exit(1)


if __name__ == "__main__":
    main()
