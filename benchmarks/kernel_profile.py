"""Where a GPU function's time goes, kernel by kernel (shared by the benchmark scripts' ``--profile``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def kernel_times(fn: Callable[[], object], calls: int = 3) -> dict[str, tuple[float, int]]:
    """Run ``fn`` once to warm up, then ``calls`` times under the profiler: {kernel: (GPU ms per call, launches per call)}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            entry = per.setdefault(evt.name, [0.0, 0])
            entry[0] += evt.device_time_total / 1e3 / calls
            entry[1] += 1
    return {name: (ms, n // calls) for name, (ms, n) in per.items()}


def top_kernels(fn: Callable[[], object], label: str, rows: int = 12, calls: int = 3) -> None:
    """Print ``fn``'s kernels by GPU time per call (see :func:`kernel_times`)."""
    per = kernel_times(fn, calls)
    total = sum(ms for ms, _ in per.values())
    launches = sum(n for _, n in per.values())
    print(f"\n{label}: {total:.2f} ms of kernel time per call, {launches} launches")
    print("| kernel | ms/call | launches/call | share |")
    print("|---|---|---|---|")
    for name, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"| {name[:90]} | {ms:.3f} | {n} | {ms / total:.1%} |")
