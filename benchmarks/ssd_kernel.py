"""The chunked SSD scan alone: plain-torch path vs the Triton kernels (vs mamba_ssm when importable).

    python benchmarks/ssd_kernel.py            # bench-1.3b shape: b=4, l=4096, h=64, p=64, n=128, g=8, chunk 128
    python benchmarks/ssd_kernel.py --check    # bf16 error vs the float64 reference at L = 4096
    python benchmarks/ssd_kernel.py --tune     # Triton only, a few tile sizes / warp counts (compiles each)
    python benchmarks/ssd_kernel.py --tune --tune-rows 0,4    # the default and row 4 of TUNE only

Timing prints one row per (path, packed): forward ms, forward + backward ms (``triton.testing.do_bench``,
median) and the peak memory one forward + backward allocates beyond its inputs. x, B, C are bf16 and
dt, A, D float32, as the Mamba2 layer passes them. ``--check`` prints, for the output, the final state
and every gradient, the Triton path's error against the float64 step reference on the exact inputs
and the error of that reference fed the same bf16-rounded inputs (rounded back to the output's dtype);
it exits 1 when a ratio exceeds 2. Needs a CUDA GPU; nothing is interactive.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from hybridlm.ops.ssd import ssd_chunked_torch, ssd_reference

GRAD_NAMES = ["x", "dt", "A", "B", "C", "D", "init"]


def make_inputs(b, seqlen, h, p, g, n, packed, seed=0, device="cuda"):
    """x, dt, A, B, C, D, init in float32, seq_idx (or None); documents of a few hundred to ~2k positions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seqlen, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, seqlen, h, generator=gen) - 1.0)
    A = -torch.exp(torch.rand(h, generator=gen) * 2.0)
    B = torch.randn(b, seqlen, g, n, generator=gen)
    C = torch.randn(b, seqlen, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    init = torch.randn(b, h, p, n, generator=gen)
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(b, seqlen, dtype=torch.long)
        for row in range(b):
            cuts = torch.randint(1, seqlen, (max(1, seqlen // 700),), generator=gen).tolist()
            cuts.append(seqlen // 4 // 128 * 128 or 1)  # one document starting exactly at a chunk start
            for cut in cuts:
                seq_idx[row, cut:] += 1
        seq_idx = seq_idx.to(device)
    return [t.to(device) for t in (x, dt, A, B, C, D, init)], seq_idx


def paths(wanted: str = "torch,triton,mamba_ssm"):
    from hybridlm.ops.ssd_triton import ssd_chunked_triton

    out = {"torch": ssd_chunked_torch, "triton": ssd_chunked_triton}
    out = {k: v for k, v in out.items() if k in wanted.split(",")}
    if "mamba_ssm" not in wanted.split(","):
        return out
    try:
        from hf_anchor import install_kernels  # the Python-only mamba_ssm wheel needs its stand-ins

        install_kernels()
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        def mamba(x, dt, A, B, C, chunk, D=None, seq_idx=None, initial_state=None, return_final_state=False):
            si = seq_idx.to(torch.int32) if seq_idx is not None else None
            return mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D=D, seq_idx=si)

        out["mamba_ssm"] = mamba
    except Exception as e:  # not installed, or its CUDA extension does not load
        print(f"(mamba_ssm not importable: {type(e).__name__}; skipping it)")
    return out


def measure(fn, leaves, chunk, seq_idx, gy) -> tuple[float, float, float]:
    """(forward ms, forward + backward ms, peak GiB beyond the inputs) of one path."""
    from triton.testing import do_bench

    x, dt, A, B, C, D = leaves

    def fwd():
        return fn(x, dt, A, B, C, chunk, D=D, seq_idx=seq_idx)

    def fwd_bwd():
        torch.autograd.backward(fwd(), gy)

    fwd_bwd()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return do_bench(fwd, grad_to_none=leaves), do_bench(fwd_bwd, grad_to_none=leaves), peak


def bench(args) -> None:
    shape = (args.batch, args.seqlen, args.heads, args.headdim, args.groups, args.state)
    print(f"SSD  b={args.batch} l={args.seqlen} h={args.heads} p={args.headdim} g={args.groups} "
          f"n={args.state} chunk={args.chunk}  x/B/C bf16, dt/A/D fp32  ({torch.cuda.get_device_name()})")  # fmt: skip
    print(f"{'path':<10} {'packed':<7} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak GiB':>9}")
    for packed in (False, True):
        (x, dt, A, B, C, D, _), seq_idx = make_inputs(*shape, packed)
        leaves = [t.requires_grad_() for t in (x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D)]
        gy = torch.randn_like(leaves[0])
        for name, fn in paths(args.paths).items():
            try:
                t_fwd, t_all, peak = measure(fn, leaves, args.chunk, seq_idx, gy)
                print(f"{name:<10} {packed!s:<7} {t_fwd:8.2f} {t_all:11.2f} {peak:9.2f}")
            except torch.OutOfMemoryError:
                print(f"{name:<10} {packed!s:<7} {'out of memory':>30}")
            for t in leaves:
                t.grad = None
            torch.cuda.empty_cache()


TUNE = [  # a value per _KNOBS entry; the first row is the default
    (64, 64, 4, 4, 3, 64, True, 32, 32, True, True, True),
    # The tenth device session's alternatives (H200, bench shape, fwd + bwd against 3.13 ms for
    # the then-default 64 x 64 dx tiles and split products): dx's tiles 16 x 32 3.04, 32 x 64
    # 3.22; backward tiles of 32 (3.46) or 16 (4.02) and state blocks of 32 (3.15) were slower.
    (64, 64, 4, 4, 3, 64, True, 16, 32, True, True, True),
    (64, 64, 4, 4, 3, 64, True, None, None, True, True, True),  # dx on the other kernels' tiles
    (64, 64, 4, 4, 3, 64, True, 32, 32, False, False, False),  # every float32 factor split in two
    (64, 32, 4, 4, 3, 32, True, 32, 32, True, True, True),
    # Forward tiles of 32 (sm_90 build: _scan_fwd_kernel 220 registers against 244, _state_kernel
    # 128 against 219, so four state programs per SM instead of two): eleventh device session
    # 2.93 ms against the default's 2.92, packed 3.17 against 3.02.
    (32, 64, 4, 4, 3, 64, True, 32, 32, True, True, True),
    # Tried in the eleventh device session and not kept (fwd + bwd against the default's 2.92 ms,
    # packed 3.02): the forward reading the group's C·B from _cb_kernel instead of recomputing it
    # per head (half its tensor-core work at 8 heads per group), 3.15 at tiles of 64 (its sm_90
    # build spilled 416 bytes) and 2.91 at 32 (packed 3.04); dx on 64-row tiles with eight warps
    # (half the reloads of the chunk's float32 state gradient), 3.43 at 64 x 32 and 3.30 at 64 x 64.
    # Tried in the sixteenth device session and not kept: dx split over the head dimension as
    # mamba_ssm's dx kernel is (each program a block of p, its partial sums over p added in a fixed
    # order by _dacum_kernel), fwd + bwd unpacked / packed against the default's 2.87 / 2.81 ms:
    # blocks of 32 with dx tiles 32 x 32 3.11 / 3.30, 64 x 32 2.78 / 2.93, 64 x 64 2.76 / 3.04,
    # 128 x 32 3.28 / 5.99; blocks of 16 with 64 x 32 3.42 / 3.30.
]
_KNOBS = (
    "BLOCK_Q", "BLOCK_Q_BWD", "NUM_WARPS_FWD", "NUM_WARPS_BWD", "PASS_STAGES", "BLOCK_N_BWD", "DX_SINGLE_PRODUCT",
    "DX_BLOCK_Q", "DX_BLOCK_N", "FWD_STATE_SINGLE_PRODUCT", "DB_STATE_SINGLE_PRODUCT",
    "DBC_W_SINGLE_PRODUCT",
)  # fmt: skip


def tune(args) -> None:
    """Time the Triton path for each setting in TUNE (unpacked, then packed) at the benchmark shape."""
    from hybridlm.ops import ssd_triton

    shape = (args.batch, args.seqlen, args.heads, args.headdim, args.groups, args.state)
    default = tuple(getattr(ssd_triton, k) for k in _KNOBS)
    print(" ".join(f"{k:>13}" for k in _KNOBS) + f" {'packed':<7} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    for packed in (False, True):
        (x, dt, A, B, C, D, _), seq_idx = make_inputs(*shape, packed)
        leaves = [t.requires_grad_() for t in (x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D)]
        gy = torch.randn_like(leaves[0])
        for setting in [TUNE[i] for i in args.tune_rows] if args.tune_rows else TUNE:
            for k, v in zip(_KNOBS, setting):
                setattr(ssd_triton, k, v)
            row = " ".join(f"{v!s:>13}" for v in setting) + f" {packed!s:<7}"
            try:
                t_fwd, t_all, _ = measure(ssd_triton.ssd_chunked_triton, leaves, args.chunk, seq_idx, gy)
                print(f"{row} {t_fwd:8.2f} {t_all:11.2f}", flush=True)
            except Exception as e:  # a setting the compiler rejects (e.g. out of shared memory)
                print(f"{row} failed: {type(e).__name__}", flush=True)
            for t in leaves:
                t.grad = None
    for k, v in zip(_KNOBS, default):
        setattr(ssd_triton, k, v)


def profile(args) -> None:
    """Each path's kernels by GPU time, forward + backward, unpacked, at the benchmark shape."""
    from kernel_profile import top_kernels

    shape = (args.batch, args.seqlen, args.heads, args.headdim, args.groups, args.state)
    (x, dt, A, B, C, D, _), _ = make_inputs(*shape, False)
    leaves = [t.requires_grad_() for t in (x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D)]
    gy = torch.randn_like(leaves[0])
    for name, fn in paths(args.paths).items():
        if name == "torch":
            continue

        def fwd_bwd(fn=fn):
            torch.autograd.backward(fn(leaves[0], *leaves[1:5], args.chunk, D=leaves[5]), gy)
            for t in leaves:
                t.grad = None

        top_kernels(fwd_bwd, f"SSD {name}, fwd + bwd, b={args.batch} l={args.seqlen}")


def run(fn, tensors, chunk, seq_idx, gy, gs):
    """Forward + backward on fresh leaves: y, final state, [grads of x, dt, A, B, C, D, init]."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    x, dt, A, B, C, D, init = leaves
    y, final = fn(x, dt, A, B, C, chunk, D=D, seq_idx=seq_idx, initial_state=init, return_final_state=True)
    torch.autograd.backward([y, final], [gy.to(y.dtype), gs.to(final.dtype)])
    return [y.detach(), final.detach()] + [t.grad for t in leaves]


def reference(x, dt, A, B, C, chunk, D=None, seq_idx=None, initial_state=None, return_final_state=True):
    return ssd_reference(x, dt, A, B, C, D=D, seq_idx=seq_idx, initial_state=initial_state)


def rel_err(actual, expected) -> float:
    scale = expected.abs().max().item()
    return (actual.double() - expected).abs().max().item() / max(scale, 1e-300)


def check(args) -> bool:
    from hybridlm.ops.ssd_triton import ssd_chunked_triton

    b, seqlen, h, p, g, n, chunk = 2, args.check_len, 8, 64, 2, 128, 128
    print(f"bf16 check  b={b} l={seqlen} h={h} p={p} g={g} n={n} chunk={chunk}: x/B/C/dy bf16, dt/A/D fp32")
    print("error = max|out - float64 reference on exact inputs| / max|reference|;")
    print("budget = the same for the float64 reference fed the bf16-rounded inputs, rounded to the out dtype")
    print(f"{'packed':<7} {'quantity':<12} {'error':>10} {'budget':>10} {'ratio':>7}")
    ok = True
    for packed in (False, True):
        tensors, seq_idx = make_inputs(b, seqlen, h, p, g, n, packed, seed=1, device=args.device)
        gen = torch.Generator().manual_seed(2)
        gy = torch.randn(b, seqlen, h, p, generator=gen).bfloat16().to(args.device)
        gs = torch.randn(b, h, p, n, generator=gen).to(args.device)
        low = [t.bfloat16() if i in (0, 3, 4) else t for i, t in enumerate(tensors)]
        got = run(ssd_chunked_triton, low, chunk, seq_idx, gy, gs)
        exact = run(reference, [t.double() for t in tensors], chunk, seq_idx, gy.double(), gs.double())
        rounded = run(reference, [t.double() for t in low], chunk, seq_idx, gy.double(), gs.double())
        for name, a, e, r in zip(["y", "final"] + [f"d{k}" for k in GRAD_NAMES], got, exact, rounded):
            err, budget = rel_err(a, e), rel_err(r.to(a.dtype), e)
            ratio = err / budget if budget > 0 else float("inf")
            bad = not (torch.isfinite(a).all() and ratio <= 2.0)
            ok &= not bad
            print(f"{packed!s:<7} {name:<12} {err:10.3e} {budget:10.3e} {ratio:7.2f}{'  FAIL' if bad else ''}")
        del exact, rounded, got
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print("PASS" if ok else "FAIL: some error exceeds 2x the rounded reference's")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--state", type=int, default=128)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument(
        "--paths", default="torch,triton,mamba_ssm", help="comma-separated paths to time (bench, --profile)"
    )
    ap.add_argument("--check", action="store_true", help="run the bf16 correctness comparison instead")
    ap.add_argument("--tune", action="store_true", help="time a few Triton tile settings instead")
    ap.add_argument("--tune-rows", type=lambda v: [int(i) for i in v.split(",")], default=None, metavar="I,J,...",
                    help="with --tune: only these rows of TUNE (0 is the default setting)")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="print each path's kernels by GPU time (fwd + bwd)")
    ap.add_argument("--check-len", type=int, default=4096, help="sequence length of --check")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test under TRITON_INTERPRET=1
    ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                    help=f"set one of ops.ssd_triton's settings first ({', '.join(_KNOBS)}), e.g. DX_SINGLE_PRODUCT=0")  # fmt: skip
    args = ap.parse_args()
    settings = [item.partition("=") for item in args.set]
    for knob, _, value in settings:
        if knob not in _KNOBS or not value.lstrip("-").isdigit():
            ap.error(f"--set {knob}={value}: expected KNOB=INTEGER with KNOB one of {', '.join(_KNOBS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("ssd_kernel.py needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    from hybridlm.ops import ssd_triton

    for knob, _, value in settings:
        setattr(ssd_triton, knob, int(value))
    if args.check:
        sys.exit(0 if check(args) else 1)
    if args.tune:
        tune(args)
        return
    if args.profile:
        profile(args)
        return
    bench(args)


if __name__ == "__main__":
    main()
