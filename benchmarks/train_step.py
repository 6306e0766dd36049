"""Training-step throughput and MFU of a preset model, fused and unfused, measured side by side.

    python benchmarks/train_step.py --preset bench-1.3b --batch 1 --seq 4096

Prints a table: step time, tokens/s, model TFLOP/s and MFU against a bf16 matmul rate measured in
the same process, and peak memory, for the preset's pattern and for its fully fused twin (every
sequence mixer bracketed with the channel mixer after it). Results belong in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from hybridlm import HybridLM, ModelConfig


def fuse_all(pattern: str) -> str:
    """Bracket every sequence mixer that a channel mixer follows: 'M-M*-' -> '[M-]M[*-]'."""
    return re.sub(r"(?<!\[)([MG*D+])([-E])", r"[\1\2]", pattern)


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def measure(config: ModelConfig, batch: int, seq: int, steps: int, warmup: int, ac: bool, compile_: bool) -> dict:
    from hybridlm.parallel.execution import apply_activation_checkpointing, compile_blocks

    torch.cuda.reset_peak_memory_stats()
    model = HybridLM(config, device="cuda")
    if ac:
        apply_activation_checkpointing(model)
    if compile_:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    step = times[len(times) // 2]
    flops = 3 * float(model.flops_per_token(seq)) * batch * seq
    out = {
        "step_ms": 1000 * step,
        "tokens_per_s": batch * seq / step,
        "tflops": flops / step / 1e12,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": loss.item(),
    }
    del model, opt
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-1.3b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--compile", action="store_true", help="torch.compile per block")
    args = ap.parse_args()

    base = ModelConfig.preset(args.preset)
    peak = matmul_tflops()
    print(
        f"device {torch.cuda.get_device_name()} · torch {torch.__version__} · bf16 matmul {peak:.0f} TFLOP/s (measured)"
    )
    print(
        f"model {args.preset}: {float(HybridLM(base, device='meta').num_params()) / 1e9:.3f}B parameters · "
        f"B×L = {args.batch}×{args.seq} · bf16 autocast · AdamW fused"
        + (" · AC" if args.ac else "")
        + (" · compiled blocks" if args.compile else "")
    )
    rows = []
    for name, pattern in (("unfused", base.pattern), ("fused", fuse_all(base.pattern))):
        r = measure(base.replace(pattern=pattern), args.batch, args.seq, args.steps, args.warmup, args.ac, args.compile)
        rows.append((name, pattern, r))
    print()
    print("| variant | pattern | step ms | tokens/s | model TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, pattern, r in rows:
        print(
            f"| {name} | `{pattern}` | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | "
            f"{100 * r['tflops'] / peak:.1f}% | {r['peak_gib']:.1f} |"
        )
    print(f"\nfused / unfused throughput: {rows[1][2]['tokens_per_s'] / rows[0][2]['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
