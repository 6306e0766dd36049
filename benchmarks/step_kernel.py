"""The Mamba2 decode step's SSD kernel alone under tile settings (head channels per program, warps), on one GPU.

Which setting is fastest at 1, 8 and 64 rows of bench-1.3b's widths::

    python benchmarks/step_kernel.py                          # the default against 64x8, 32x4, 32x8, 16x4
    python benchmarks/step_kernel.py --settings 64x4 32x4 --rows 1 --reps 400

Each setting (``ops.step_triton.SSD_STEP_BLOCK_P`` x ``SSD_STEP_WARPS``) runs the kernel as ``mamba2_step`` launches
it (bf16 x, B, C and the in-projection's raw dt; float32 state updated in place) replayed from a CUDA graph of
``--reps`` calls, the settings taking turns for ``--rounds`` rounds; the table gives each one's median device µs a
call, its effective bandwidth over the state's read and write (the bytes that bound it at 64 rows), and its speed
against the first setting. Every setting's y and state are compared with the first's (the same computation in
another tiling: equal, or within float32 reassociation). Results belong in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from top_p import graph_ms

from hybridlm.ops import step_triton

#: bench-1.3b's Mamba2 decode widths: heads, head channels, B/C groups, state size.
H, P, G, N = 64, 64, 8, 128


def setting(text: str) -> tuple[int, int]:
    """``"64x4"`` -> (64, 4) (argparse type)."""
    block_p, _, warps = text.partition("x")
    if not (block_p.isdigit() and warps.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected BLOCK_PxWARPS, such as 64x4")
    return int(block_p), int(warps)


def inputs(rows: int, device: str = "cuda") -> tuple:
    """The step's arguments at ``rows`` rows: x, raw dt, A_log, B, C, state, D, dt_bias (as mamba2_step passes them)."""
    g = torch.Generator(device=device).manual_seed(rows)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    x, B, C = (randn(*s).bfloat16() for s in ((rows, H, P), (rows, G, N), (rows, G, N)))
    dt, A_log, D, dt_bias = randn(rows, H).bfloat16(), randn(H).clamp(-3, 1.5), randn(H), randn(H) * 0.1
    return x, dt, A_log, B, C, randn(rows, H, P, N), D, dt_bias


def run(args: tuple, block_p: int, warps: int) -> torch.Tensor:
    step_triton.SSD_STEP_BLOCK_P, step_triton.SSD_STEP_WARPS = block_p, warps
    x, dt, A_log, B, C, state, D, dt_bias = args
    return step_triton.ssd_step_triton(x, dt, A_log, B, C, state, D, dt_bias=dt_bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--settings",
        type=setting,
        nargs="+",
        default=[(64, 4), (64, 8), (32, 4), (32, 8), (16, 4)],
        metavar="BLOCK_PxWARPS",
        help="the settings timed, the first the baseline (default: 64x4 64x8 32x4 32x8 16x4; 64x4 is the kernel's)",
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=200, help="calls in each timed CUDA graph")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the settings taking turns")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: needs a CUDA device")
    kept = step_triton.SSD_STEP_BLOCK_P, step_triton.SSD_STEP_WARPS
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; SSD step at {H} heads x {P}, state {N}")
    print("| rows | BLOCK_P x warps | programs | µs a call | state GB/s | speed vs first | same y, state |")
    print("|---:|---|---:|---:|---:|---:|---|")
    try:
        for rows in args.rows:
            base = inputs(rows)
            first, same = None, {}
            for s in args.settings:  # compiles each setting; its y and state from the same state as the first's
                own = (*base[:5], base[5].clone(), *base[6:])
                got = (run(own, *s).float(), own[5])
                first = first or got
                same[s] = all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(got, first, strict=True))
            times: dict[tuple[int, int], list[float]] = {s: [] for s in args.settings}
            for _ in range(args.rounds):
                for s in args.settings:
                    times[s].append(graph_ms(lambda s=s, base=base: run(base, *s), args.reps) * 1e3)
            state_bytes = 2 * rows * H * P * N * 4  # read and written once
            baseline = statistics.median(times[args.settings[0]])
            for block_p, warps in args.settings:
                us = statistics.median(times[(block_p, warps)])
                programs = rows * H * -(-P // min(block_p, P))
                print(
                    f"| {rows} | {block_p} x {warps} | {programs} | {us:.2f} | {state_bytes / us / 1e3:,.0f} | "
                    f"{baseline / us:.3f}× | {'yes' if same[(block_p, warps)] else '**no**'} |",
                    flush=True,
                )
    finally:
        step_triton.SSD_STEP_BLOCK_P, step_triton.SSD_STEP_WARPS = kept


if __name__ == "__main__":
    main()
