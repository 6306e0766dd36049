"""Causal conv, gated RMSNorm and add + RMSNorm: torch (eager, compiled) against the Triton kernels, bf16.

    python benchmarks/conv_norm_kernels.py            # timing table (bench-1.3b sizes)
    python benchmarks/conv_norm_kernels.py --check    # bf16 error ratios against float64 references (exit 1 above 2)
    python benchmarks/conv_norm_kernels.py --tune     # the conv kernels' tiles and warps, Triton only
    python benchmarks/conv_norm_kernels.py --tune --profile   # the same, each setting's kernels by GPU time

The table gives forward and forward+backward milliseconds and the effective bandwidth, counting
each tensor the op must read or write once (the minimum traffic; parameters and document ids
are left out). Needs a CUDA device; runs in well under a minute on an H200. Results belong in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from hybridlm.ops.conv import causal_conv1d, causal_conv1d_reference
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.norm import add_rms_norm, gated_rms_norm, gated_rms_norm_reference, rms_norm_reference

EPS = 1e-5
# bench-1.3b: hidden 2048, d_inner 4096, 8 groups of state 128 (conv dim 4096 + 2*8*128), 64 heads.
CONV = dict(B=4, L=4096, C=4096 + 2 * 8 * 128, K=4, width=4096 + 6144 + 64, offset=4096)
GATED = dict(M=16384, D=4096, group=512)
ADD = dict(M=16384, D=2048)


def bench(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events; warmed up first)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def documents(B: int, L: int) -> torch.Tensor:
    """(B, L) ids of 8 documents of random lengths per row."""
    gen = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randint(1, L, (B, 7), generator=gen), dim=1).values
    return (torch.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1).cuda()


def cases():
    """(name, fn(*inputs), make_inputs() -> list of leaves, bytes fwd, bytes fwd+bwd)."""
    c = CONV
    n = c["B"] * c["L"] * c["C"]
    seq = documents(c["B"], c["L"])

    def conv_inputs():
        # x is a column slice of the input projection's output, as in the Mamba2 mixer.
        wide = torch.randn(c["B"], c["L"], c["width"], device="cuda", dtype=torch.bfloat16)
        x = wide[..., c["offset"] : c["offset"] + c["C"]].requires_grad_()
        w = (torch.randn(c["C"], 1, c["K"], device="cuda") / 2).requires_grad_()  # float32 parameters
        b = torch.randn(c["C"], device="cuda").requires_grad_()
        return [x, w, b]

    def conv(seq_idx):
        return lambda x, w, b: causal_conv1d(x, w, b, seq_idx, "silu")

    yield "conv [4,4096,6144] K=4", conv(None), conv_inputs, 2 * n * 2, 5 * n * 2
    yield "conv + seq_idx (8 docs/row)", conv(seq), conv_inputs, 2 * n * 2, 5 * n * 2

    g = GATED
    n = g["M"] * g["D"]

    def gated_inputs():
        y = torch.randn(g["M"], g["D"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        z = torch.randn(g["M"], g["D"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return [y, z, torch.ones(g["D"], device="cuda", requires_grad=True)]

    yield (
        "gated norm [16384,4096] g=512",
        lambda y, z, w: gated_rms_norm(y, z, w, g["group"], EPS),
        gated_inputs,
        3 * n * 2,
        8 * n * 2,
    )

    a = ADD
    n = a["M"] * a["D"]

    def add_inputs(x_dtype):
        def make():
            x = torch.randn(a["M"], a["D"], device="cuda", dtype=x_dtype, requires_grad=True)
            d = torch.randn(a["M"], a["D"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
            return [x, d, torch.ones(a["D"], device="cuda", requires_grad=True)]

        return make

    def add(x, d, w):
        return add_rms_norm(x, d, w, EPS)

    yield "add_rms_norm [16384,2048] bf16", add, add_inputs(torch.bfloat16), 4 * n * 2, 8 * n * 2
    # float32 residual stream + bf16 mixer output (float32 parameters under autocast).
    yield "add_rms_norm fp32 x + bf16 delta", add, add_inputs(torch.float32), n * (4 + 2 + 8), n * (14 + 18)


def backward_step(fn, inputs: list[torch.Tensor], douts: list[torch.Tensor]):
    """One forward + backward of ``fn(*inputs)`` with output gradients ``douts``, the inputs' gradients
    cleared first (as a training step's ``zero_grad`` does): the timing holds the op's backward, not an
    accumulation of every call's gradients into ``.grad``."""

    def step() -> None:
        for t in inputs:
            t.grad = None
        o = fn(*inputs)
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), douts)

    return step


def time_op(name: str, fn, inputs: list, bytes_fwd: int, bytes_all: int, reps: int, compile_: bool) -> None:
    variants = [("torch eager", "torch", fn)]
    if compile_:
        variants.append(("torch compiled", "torch", torch.compile(fn)))
    variants.append(("triton", "triton", fn))
    for label, mode, f in variants:
        with use_kernels(mode):
            outs = f(*inputs)
            douts = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
            del outs

            def fwd(f=f):
                with torch.no_grad():
                    f(*inputs)

            t_fwd, t_all = bench(fwd, reps), bench(backward_step(f, inputs, douts), reps)
        print(
            f"{name:34s} {label:15s} {t_fwd:8.3f} {bytes_fwd / t_fwd / 1e6:7.0f} "
            f"{t_all:11.3f} {bytes_all / t_all / 1e6:7.0f}"
        )


def timing(reps: int, compile_: bool) -> None:
    print(f"{'op':34s} {'path':15s} {'fwd ms':>8s} {'GB/s':>7s} {'fwd+bwd ms':>11s} {'GB/s':>7s}")
    for name, fn, make, bytes_fwd, bytes_all in cases():
        time_op(name, fn, make(), bytes_fwd, bytes_all, reps, compile_)
        torch.cuda.empty_cache()


#: Settings tried per conv kernel, each with the others at their defaults (the first setting of
#: each list is the default): (BLOCK_L, BLOCK_C, warps). Compiled for sm_90 on CPU
#: (benchmarks/kernel_build.py), tiles of 32 × 128 hold 216–255 registers a thread (two blocks of
#: 4 warps an SM) and spill little or nothing; 16 × 128 hold 110-150.
TUNE = {
    "FWD": [(32, 128, 4), (16, 128, 4), (16, 256, 4)],
    "BWD": [(16, 256, 4), (16, 128, 4), (32, 128, 4), (16, 512, 8)],
    "DX": [(32, 128, 4), (16, 128, 4), (32, 64, 4), (64, 128, 8), (32, 256, 8)],
}
KNOBS = ("BLOCK_L", "BLOCK_C", "WARPS")
#: Settings of ``ops.conv_triton`` that are not tiles, each timed on (the tiles at their defaults).
FLAGS = ("G_IN_DY_DTYPE",)


def tune(reps: int, profile: bool = False) -> None:
    """Time the Triton conv (forward, forward + backward) for each kernel's settings in TUNE:
    FWD the forward, BWD the backward's first pass (g), DX its second (dx, dw, db), then each of
    FLAGS switched. ``profile``: each conv kernel's GPU time instead (wall-clock times of one
    setting repeated vary by about 10 % on the H200; kernel times do not), and the other kernels'
    (the partial sums' reduction)."""
    from kernel_profile import kernel_times

    from hybridlm.ops import conv_triton

    names = [f"{d}_{k}" for d in TUNE for k in KNOBS] + list(FLAGS)
    default = {k: getattr(conv_triton, k) for k in names if hasattr(conv_triton, k)}
    settings = [(d, str(s), dict(zip((f"{d}_{k}" for k in KNOBS), s))) for d in TUNE for s in TUNE[d]]
    settings += [("flag", f"{f}={not default[f]}", {f: not default[f]}) for f in FLAGS]
    kernels = {"fwd": "_conv_fwd_kernel", "g": "_conv_bwd_g_kernel", "dx": "_conv_bwd_dx_kernel"}
    cols = [f"{k} ms" for k in kernels] + ["other ms", "total ms"] if profile else ["fwd ms", "fwd+bwd ms"]
    print(f"{'op':30s} {'kernel':>6s} {'setting':>20s} " + " ".join(f"{c:>10s}" for c in cols))
    for name, fn, make, *_ in list(cases())[:2]:  # the conv rows, without and with documents
        inputs = make()
        for kernel, label, values in settings:
            for k, v in (default | values).items():
                setattr(conv_triton, k, v)
            with use_kernels("triton"):
                douts = [torch.randn_like(fn(*inputs))]

                def fwd(fn=fn, inputs=inputs):
                    with torch.no_grad():
                        fn(*inputs)

                fwd_bwd = backward_step(fn, inputs, douts)
                if profile:
                    per = kernel_times(fwd_bwd, calls=5)
                    ms = [sum(t for n, (t, _) in per.items() if n == k) for k in kernels.values()]
                    total = sum(t for t, _ in per.values())
                    times = [*ms, total - sum(ms), total]
                else:
                    times = [bench(fwd, reps), bench(fwd_bwd, reps)]
                print(
                    f"{name[:30]:30s} {kernel:>6s} {label:>20s} " + " ".join(f"{v:10.3f}" for v in times),
                    flush=True,
                )
    for k, v in default.items():
        setattr(conv_triton, k, v)


def rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    return ((a.double() - e).abs().max() / e.abs().max()).item()


BAR = 2.0  # the tests' bar (tests/ops/test_conv_norm_triton.py) on each error ratio


def case_ratios(fn, ref, exact: list[torch.Tensor], labels: list[str]) -> list[tuple[str, float, float, float]]:
    """(label, error, reference error, ratio) of each output and gradient of ``fn`` on the bf16-rounded
    ``exact`` inputs: its error against ``ref`` in float64 on ``exact``, and the error of ``ref`` in
    float64 fed the same rounded inputs (rounded to ``fn``'s dtype), on whatever device ``exact`` is."""
    rounded = [t.bfloat16() for t in exact]
    leaves = [t.clone().requires_grad_() for t in rounded]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    douts = [torch.randn_like(o) for o in outs]
    got = list(outs) + list(torch.autograd.grad(outs, leaves, douts))
    refs = []
    for inputs in (exact, rounded):
        ins = [t.double().requires_grad_() for t in inputs]
        r = ref(*ins)
        r = r if isinstance(r, tuple) else (r,)
        refs.append(list(r) + list(torch.autograd.grad(r, ins, [d.double() for d in douts])))
    rows = []
    for label, a, e, rr in zip(labels, got, *refs):
        err, base = rel_err(a, e), rel_err(rr.to(a.dtype), e)
        rows.append((label, err, base, err / base if base > 0 else float("inf")))
    return rows


def passes(ratio: float) -> bool:
    """Within :data:`BAR` and finite (a NaN error is a failure, not a pass)."""
    return math.isfinite(ratio) and ratio <= BAR


def check() -> bool:
    """Error of each output and gradient against float64 on the exact inputs, divided by the
    error of float64 fed the same bf16-rounded inputs (its result rounded to the kernel's dtype).
    Prints PASS, or FAIL and returns False when a ratio exceeds :data:`BAR` (as the tests require)."""
    B, L, C = 2, 4096, 6144
    seq = documents(B, L)
    checks = [
        (
            "conv (B=2, L=4096, C=6144, packed)",
            lambda x, w, b: causal_conv1d(x, w, b, seq, "silu"),
            lambda x, w, b: causal_conv1d_reference(x, w, b, seq, "silu"),
            [torch.randn(B, L, C), torch.randn(C, 1, 4) / 2, torch.randn(C) / 4],
            ["out", "dx", "dw", "db"],
        ),
        (
            "gated norm (16384 x 4096, g=512)",
            lambda y, z, w: gated_rms_norm(y, z, w, 512, EPS),
            lambda y, z, w: gated_rms_norm_reference(y, z, w, 512, EPS),
            [torch.randn(16384, 4096), torch.randn(16384, 4096), 1 + 0.2 * torch.randn(4096)],
            ["out", "dy", "dz", "dw"],
        ),
        (
            "add_rms_norm (16384 x 2048)",
            lambda x, d, w: add_rms_norm(x, d, w, EPS),
            lambda x, d, w: (x + d, rms_norm_reference(x + d, w, EPS)),
            [torch.randn(16384, 2048), torch.randn(16384, 2048), 1 + 0.2 * torch.randn(2048)],
            ["h", "normed", "dx", "ddelta", "dw"],
        ),
    ]
    print(f"{'op':36s} {'tensor':8s} {'error':>9s} {'ref error':>9s} {'ratio':>6s}")
    reset_paths()
    ok = True
    for name, fn, ref, exact, labels in checks:

        def triton(*inputs, fn=fn):  # the forward on the kernels (their backward follows it)
            with use_kernels("triton"):
                return fn(*inputs)

        rows = case_ratios(triton, ref, [t.cuda() for t in exact], labels)
        for label, err, base, ratio in rows:
            ok &= passes(ratio)
            print(f"{name:36s} {label:8s} {err:9.2e} {base:9.2e} {ratio:6.2f}{'' if passes(ratio) else '  FAIL'}")
    print(f"paths: {paths_used()}")
    print("PASS" if ok else f"FAIL: some error exceeds {BAR:g}x the rounded reference's")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="print bf16 error ratios instead of timings")
    parser.add_argument("--tune", action="store_true", help="time the conv kernels' tile settings instead")
    parser.add_argument("--profile", action="store_true", help="with --tune: each setting's kernels by GPU time")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd torch rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA device")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.check:
        sys.exit(0 if check() else 1)
    elif args.tune:
        tune(args.reps, args.profile)
    else:
        timing(args.reps, not args.no_compile)


if __name__ == "__main__":
    main()
