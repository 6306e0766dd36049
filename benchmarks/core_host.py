"""Host time of the Mamba2 core op on CUDA: what one call costs the CPU, and where that time goes.

    python benchmarks/core_host.py [--seq 256] [--calls 200] [--rounds 3] [--rows 30] [--packed]
    python benchmarks/core_host.py --trace     # torch.profiler: the backward op via torch.ops vs its body

At ``bench-1.3b``'s Mamba2 width (64 heads × 64, state 128, 8 groups; bf16) and a short row, the
kernels finish sooner than the host launches the next ones, so a loop of calls runs at the host's
pace. Printed, per call of the op (``mamba2_core_triton``, as the Mamba2 layer calls it):

* host: the loop's time on the host clock divided by the calls (no synchronization inside the
  loop), and wall: the same loop ended by a synchronization. wall ≈ host means host-bound;
* for the forward alone (no autograd), forward + backward through autograd, the two ops as a
  compiled block's graphs call them (``torch.ops.hybridlm.mamba2_core_fwd`` / ``_bwd``) and their
  bodies alone, and each launcher inside the op; medians of ``--rounds`` passes over the table;
* yardsticks measured in the same process: an empty Triton kernel launched with 1 and with 24
  arguments, ``torch.empty``, and a no-op ``torch.library`` custom op;
* then cProfile over ``--profile-calls`` calls of the two ops' bodies: the functions with the most
  own time, which say whether the time is Triton's launcher, argument binding, allocation or our code.

Complements ``train_step.py --profile`` (whose host times the profiler inflates) and
``host_overhead.py`` (the whole step on CPU).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
import triton
import triton.language as tl


def per_call_us(fn, calls: int) -> tuple[float, float]:
    """(host µs, wall µs) per call of ``fn`` over ``calls`` calls, after 5 untimed ones."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


@triton.jit
def _empty1(x_ptr):
    pass


@triton.jit
def _empty24(
    a0, a1, a2, a3, a4, a5, a6, a7, s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
):  # fmt: skip
    pass


def yardsticks() -> dict[str, object]:
    """Callables whose host cost anchors the op's: empty Triton launches, an allocation, a custom op."""

    @torch.library.custom_op("core_host::noop", mutates_args=())
    def noop(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(0)

    x = torch.empty(1 << 20, device="cuda", dtype=torch.bfloat16)
    ptrs = [x] * 8
    return {
        "empty Triton kernel, 1 argument": lambda: _empty1[(1,)](x),
        "empty Triton kernel, 24 arguments": lambda: _empty24[(1,)](
            *ptrs, *range(8), 4096, 64, 64, 128, C0=64, C1=64, C2=32, C3=True
        ),
        "torch.empty (1 MiB)": lambda: torch.empty(1 << 19, device="cuda", dtype=torch.bfloat16),
        "no-op torch.library custom op": lambda: noop(x),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-1.3b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256, help="tokens per row (short: the host sets the pace)")
    ap.add_argument("--packed", action="store_true", help="two documents per row (seq_idx given)")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per row of the table")
    ap.add_argument("--rounds", type=int, default=3, help="times through the table (a noisy host: medians)")
    ap.add_argument("--profile-calls", type=int, default=100, help="calls of the two ops' bodies under cProfile")
    ap.add_argument("--rows", type=int, default=30, help="cProfile rows to print")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="instead: torch.profiler's host ops of the backward op through torch.ops and of its body alone",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("core_host.py measures CUDA launches: no CUDA device here")

    from hybridlm import ModelConfig
    from hybridlm.layers import Mamba2Mixer
    from hybridlm.layers.context import segment_ids
    from hybridlm.ops import conv_triton, norm_triton, ssd_triton
    from hybridlm.ops.mamba2_core import Mamba2Weights, mamba2_dt
    from hybridlm.ops.mamba2_core_triton import _core_bwd, _core_fwd, mamba2_core_triton

    torch.manual_seed(0)
    dev, bf = torch.device("cuda"), torch.bfloat16
    mixer = Mamba2Mixer(ModelConfig.preset(args.preset)).to(dev)
    mixer.init_weights(torch.Generator(device=dev).manual_seed(0), 0.02, 0.02 / 5)
    for name, p in mixer.named_parameters():
        if name not in Mamba2Mixer.keep_fp32:
            p.data = p.data.to(bf)
    d, B, L = mixer.dims, args.batch, args.seq
    w = Mamba2Weights(mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight)
    width = d.d_inner + d.conv_dim + d.nheads
    zxbcdt = (torch.randn(B, L, width, device=dev) * 0.5).to(bf).requires_grad_()
    doc = (torch.arange(L, device=dev) >= L // 2).long()[None].expand(B, L)
    seq_idx = segment_ids(B, L, dev, doc_ids=doc) if args.packed else None
    dout = torch.randn(B, L, d.d_inner, device=dev).to(bf)

    def fwd():
        with torch.no_grad():
            mamba2_core_triton(zxbcdt, w, seq_idx, d)

    def fwd_grad():
        return mamba2_core_triton(zxbcdt, w, seq_idx, d)

    def fwd_bwd():
        zxbcdt.grad = None
        for p in mixer.parameters():
            p.grad = None
        mamba2_core_triton(zxbcdt, w, seq_idx, d).backward(dout)

    # The two ops as a compiled block's graphs call them (the dispatcher, no autograd: nothing they
    # see there requires grad), their bodies alone, and the launchers inside them, on the forward's
    # own intermediate tensors (the op returns them for its backward).
    wd = Mamba2Weights(*(t.detach() for t in w))
    cw = wd.conv_weight.reshape(wd.conv_weight.shape[0], -1).contiguous()
    dims = d.as_floats()
    op_in = (zxbcdt.detach(), cw, *wd[1:], seq_idx)
    saved = _core_fwd(*op_in, dims)[1:]
    xBC, dt, y, states, rstd = saved
    z, xBC_in, dt_raw = d.split(zxbcdt.detach())
    x, Bm, Cm = d.split_scan(xBC)
    A = -torch.exp(wd.A_log.float())
    yf, zf = y.view(-1, d.d_inner), z.flatten(0, 1)
    dy = torch.randn_like(y)

    def body(op, *args):
        with torch.no_grad():  # as the dispatcher runs it: below autograd
            op._init_fn(*args)

    rows = {
        "core op forward (no grad)": fwd,
        "core op forward (autograd records)": fwd_grad,
        "core op forward + backward": fwd_bwd,
        "torch.ops.hybridlm.mamba2_core_fwd": lambda: torch.ops.hybridlm.mamba2_core_fwd(*op_in, dims),
        "  mamba2_core_fwd body (no dispatcher)": lambda: body(_core_fwd, *op_in, dims),
        "torch.ops.hybridlm.mamba2_core_bwd": lambda: torch.ops.hybridlm.mamba2_core_bwd(dout, *op_in, *saved, dims),
        "  mamba2_core_bwd body (no dispatcher)": lambda: body(_core_bwd, dout, *op_in, *saved, dims),
        "  conv_forward": lambda: conv_triton.conv_forward(xBC_in, cw, wd.conv_bias, seq_idx, True),
        "  dt (softplus of dt + bias)": lambda: mamba2_dt(dt_raw, wd.dt_bias, d.dt_clamp_min),
        "  ssd_forward": lambda: ssd_triton.ssd_forward(x, dt, A, Bm, Cm, wd.D, seq_idx, None, d.chunk_size),
        "  gated_norm_forward": lambda: norm_triton.gated_norm_forward(
            yf, zf, wd.norm_weight, d.norm_group_size, d.eps
        ),
        "  gated_norm_backward": lambda: norm_triton.gated_norm_backward(
            yf, zf, wd.norm_weight, rstd, dout.reshape(-1, d.d_inner), d.norm_group_size
        ),
        "  ssd_backward": lambda: ssd_triton.ssd_backward(
            dy, None, states, x, dt, A, Bm, Cm, wd.D, seq_idx, None, d.chunk_size
        ),
        "  conv_backward": lambda: conv_triton.conv_backward(xBC_in, cw, wd.conv_bias, seq_idx, xBC, True),
    } | yardsticks()

    if args.trace:  # what the dispatcher adds to the backward op: its host ops, side by side
        from torch.profiler import ProfilerActivity, profile

        for name in ("torch.ops.hybridlm.mamba2_core_bwd", "  mamba2_core_bwd body (no dispatcher)"):
            per_call_us(rows[name], 20)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    rows[name]()
                torch.cuda.synchronize()
            print(f"\n{name.strip()}: 20 calls, host ops by self time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        return

    print(f"{args.preset} Mamba2 core, {B} × {L} tokens{' (packed)' if args.packed else ''}, bf16, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")  # fmt: skip
    print(f"{'call':42s} {'host µs':>9s} {'wall µs':>9s}   (medians of {args.rounds} rounds over the table)")
    rounds = [{name: per_call_us(fn, args.calls) for name, fn in rows.items()} for _ in range(args.rounds)]
    for name in rows:
        host, wall = (statistics.median(r[name][i] for r in rounds) for i in (0, 1))
        print(f"{name:42s} {host:9.1f} {wall:9.1f}", flush=True)

    # The bodies, not the autograd path: a compiled block's graphs call the two ops directly, and
    # cProfile misattributes time across the dispatcher's re-entry into Python.
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(args.profile_calls):
        body(_core_fwd, *op_in, dims)
        body(_core_bwd, dout, *op_in, *saved, dims)
    prof.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        print(f"\ncProfile, {args.profile_calls} calls of both bodies, by {key} (times in s over all calls):")
        pstats.Stats(prof).strip_dirs().sort_stats(key).print_stats(args.rows)


if __name__ == "__main__":
    main()
