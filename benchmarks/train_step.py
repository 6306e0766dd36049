"""Training-step speed of hybridlm (unfused and fused) and, side by side, Hugging Face NemotronH.

    python benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096,1x4096,1x32768 --compare-hf
    python benchmarks/train_step.py --preset bench-moe-1b --shapes 4x4096,1x4096
    python benchmarks/train_step.py --preset bench-1.3b --shapes 1x4096 --curves 200
    python benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096 --profile
    python benchmarks/train_step.py --preset bench-1.3b --shapes 1x4096 --rounds 4 --steps 10   # A B B A A B B A
    python benchmarks/train_step.py --preset bench-1.3b --shapes 1x32768 --interleave --steps 20  # steps A B B A ...

One process, one GPU. Every variant gets the same weights (our seed; Hugging Face's model is our
export of them), the same batches and the same AdamW (fused, lr 1e-4). hybridlm runs as the
trainer runs it: float32 master weights, bf16 autocast, compiled blocks, packed rows with their
document ids, the chunked head + loss. Hugging Face runs as its users run it fast: bf16 parameters,
mamba_ssm's Triton kernels when importable (the table says which path it took), unpacked rows (its
fused Mamba path takes no document ids). Prints tokens/s, MFU against the H200's 989 TFLOP/s dense
bf16 peak and against a bf16 matmul rate measured in this run, peak memory beside ``hybridlm plan``'s
(``planned GiB``: the planner's memory model judged on every run) and the first step's time
(compilation included). ``--profile`` adds where one step's GPU time goes, by kernel kind, and
where the GPU waits in it (its idle gaps, by the host op running during each);
``--curves N`` trains unfused and fused N steps on text and compares their losses. ``--rounds N``
measures each variant N times in alternating order and reports medians (host-bound shapes such as
1 × 4096 move by several percent from run to run); ``--gc-every N`` collects Python's garbage
after every N-th step only, as ``train.gc_every`` does. Like the trainer, the process gives
CUDA's caching allocator expandable segments unless ``PYTORCH_CUDA_ALLOC_CONF`` says otherwise
(the header prints the setting), for every variant and Hugging Face alike. ``--interleave`` holds
our variants at once and times their steps taking turns (A B, then B A, ...), each step on its
own: the ratio of each pair of neighbouring steps is unaffected by a slow drift of the GPU clock
(the 1 × 32768 rows, where fused and unfused differ by less than that drift); it prints the median
and the mean of the pair ratios, each with a 95 % interval. ``--inductor-config KEY=N`` sets one of
``torch._inductor.config``'s settings before anything compiles (e.g. ``triton.multi_kernel=1``:
inductor times a one-pass and a looped version of each reduction and keeps the faster).
``--sync-check`` lists the host-device synchronizations inside one step of each variant and the
line that asked for each. ``--no-save-seams`` compiles our fused blocks with
``compile_blocks(save_seams=False)`` (they then recompute the residual sum between their mixers in
the backward instead of keeping it, as unfused blocks keep their input; the default until the
eleventh device session).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hybridlm import HybridLM, ModelConfig
from hybridlm.ops.float8 import FLOAT8_RECIPES
from hybridlm.train.collector import ManualGC
from hybridlm.train.trainer import configure_cuda_allocator, measure_matmul_flops

H200_PEAK = 989e12  # dense bf16 FLOP/s, datasheet


def fuse_all(pattern: str) -> str:
    """Bracket every sequence mixer that a channel mixer follows: 'M-M*-' -> '[M-]M[*-]'."""
    return re.sub(r"(?<!\[)([MG*D+])([-E])", r"[\1\2]", pattern)


def packed_batches(count: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random tokens in rows packed with documents of random lengths (mean ~seq/3), as the trainer packs them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        doc = torch.zeros(batch, seq, dtype=torch.long)
        for r in range(batch):
            cuts = torch.randint(1, seq, (2,), generator=g).sort().values
            doc[r, cuts[0] :] += 1
            doc[r, cuts[1] :] += 1
        labels = ids[:, 1:].clone()
        labels[:, :-1][doc[:, 1:] != doc[:, :-1]] = -100  # no label across a document boundary
        out.append({"input_ids": ids[:, :-1].cuda(), "labels": labels.cuda(), "doc_ids": doc.cuda()})
    return out


COMPILE_MODE: str | None = None  # --compile-mode: torch.compile's mode for our blocks
SAVE_SEAMS = True  # --no-save-seams: compiled fused blocks recompute their seam's residual sum
GC_EVERY = 0  # --gc-every: as train.gc_every (0: Python's automatic garbage collection)


def build_ours(
    config: ModelConfig, compile_: bool, ac: str | None, float8: tuple[str, bool] = ("none", False)
) -> torch.nn.Module:
    from hybridlm.ops.float8 import apply_float8
    from hybridlm.parallel.execution import apply_activation_checkpointing, compile_blocks

    model = HybridLM(config, seed=0, device="cuda")
    apply_float8(model, *float8)  # as the trainer: before checkpointing and compile
    if ac:
        apply_activation_checkpointing(model, ac)
    if compile_:
        compile_blocks(model, save_seams=SAVE_SEAMS, **({"mode": COMPILE_MODE} if COMPILE_MODE else {}))
    return model


def float8_of(variant: str, recipe: str) -> tuple[str, bool]:
    """(``train.float8``, ``train.float8_auto_filter``) of a variant: ``recipe`` for the ``-float8`` ones, and
    the small layers left out for the ``-float8-filtered`` ones."""
    if variant.endswith("-float8-filtered"):
        return recipe, True
    return (recipe if variant.endswith("-float8") else "none"), False


def planned_gib(config: ModelConfig, batch: int, seq: int, ac: str | None, float8: tuple[str, bool]) -> float | None:
    """``hybridlm plan``'s peak memory (GiB) of this variant's step on one GPU, to set beside the measured
    one: what the planner's memory model is judged by. A step here is one micro-batch whose gradients were set to
    None, so none exist at the peak. None under an activation checkpointing policy other than ``full`` (the planner
    models block-level checkpointing only)."""
    from hybridlm.plan import plan_pipeline

    if ac not in (None, "none", "full"):
        return None
    recompute = ac == "full"
    plan = plan_pipeline(config, 1, seq_len=seq, micro_batch_size=batch, recompute=recompute, float8=float8[0],
                         float8_auto_filter=float8[1])  # fmt: skip
    return plan.rank_memory(grads_at_peak=False)[0]["peak_bytes_ckpt" if recompute else "peak_bytes"] / 2**30


def memory_phases(config: ModelConfig, build, batch, warmup: int, float8: tuple[str, bool]) -> list[list[str]]:
    """Where one step's memory goes, measured beside the plan's pieces (GiB): after ``warmup`` steps, what is
    allocated at rest (weights and AdamW state; no gradients), what the forward leaves for the backward, the most
    the forward held beyond that for a moment (the plan: the loss's logits chunk), and the step's two peaks."""
    from hybridlm.plan import plan_pipeline
    from hybridlm.plan.cost import BF16, FP32

    gib = 2**30
    model = build()
    opt = adamw(model)
    for _ in range(warmup):
        optimizer_step(model, opt, ours_step, batch)
    torch.cuda.synchronize()
    rest = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"], return_logits=False)
    torch.cuda.synchronize()
    kept, forward_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.loss.backward()
    torch.cuda.synchronize()
    backward_peak = torch.cuda.max_memory_allocated()
    del out, model, opt
    gc.collect()
    torch.cuda.empty_cache()
    B, L = batch["input_ids"].shape
    plan = plan_pipeline(config, 1, seq_len=L, micro_batch_size=B, float8=float8[0], float8_auto_filter=float8[1])
    stage = plan.stages[0].memory
    copies = (stage["params"] * plan.costs.state_bytes_per_param - stage["state_bytes"]) / BF16  # float8 weights
    at_rest = stage["params"] * (plan.costs.state_bytes_per_param - BF16 - FP32)  # fp32 weights and AdamW's two
    saved = stage["act_bytes"] + BF16 * (stage["params"] - copies)  # and the bf16 weight copies autocast keeps
    peak = plan.rank_memory(grads_at_peak=False)[0]["peak_bytes"]
    return [
        ["at rest (weights, AdamW state)", f"{rest / gib:.2f}", f"{at_rest / gib:.2f}"],
        ["kept by the forward for the backward", f"{(kept - rest) / gib:.2f}", f"{saved / gib:.2f}"],
        ["held a moment in the forward, beyond that", f"{(forward_peak - kept) / gib:.2f}",
         f"{stage['work_bytes'] / gib:.2f}"],
        ["peak of the forward", f"{forward_peak / gib:.2f}", f"{peak / gib:.2f}"],
        ["peak of the backward", f"{backward_peak / gib:.2f}", ""],
    ]  # fmt: skip


def ours_step(model, batch) -> torch.Tensor:
    if COMPILE_MODE in ("reduce-overhead", "max-autotune"):  # CUDA graphs: as the trainer marks each step
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"], return_logits=False)
    out.loss.backward()
    return out.loss


def hf_step(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    out.loss.backward()
    return out.loss


def adamw(model) -> torch.optim.Optimizer:
    """The same optimizer for every variant."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def optimizer_step(model, opt, step, batch) -> torch.Tensor:
    """One training step: ``step`` (forward + backward, returns the loss), then the optimizer's."""
    loss = step(model, batch)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def measure(build, step, batches, steps: int, warmup: int) -> dict:
    """Build a model (peak memory counted from here), then time ``steps`` optimizer steps after ``warmup``."""
    gc.collect()
    torch.cuda.empty_cache()
    model = build()
    gc.collect()  # the peak counts the model, its optimizer and the steps, not what building it needed
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    opt = adamw(model)
    times, losses = [], []
    with ManualGC(GC_EVERY) as collector:
        for i in range(warmup + steps):
            batch = batches[i % len(batches)]
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss = optimizer_step(model, opt, step, batch)
            collector.after_step(i + 1)  # as the trainer: a collection's pause counts as step time
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
    timed = sorted(times[warmup:])
    result = {
        "step_ms": 1e3 * timed[len(timed) // 2],
        "first_step_s": times[0],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": losses[-1],
    }
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return result


def measure_interleaved(builds: dict, step, batches, steps: int, warmup: int) -> dict[str, dict]:
    """Build every variant at once, warm each up, then time single optimizer steps taking turns (A B, then
    B A, ...), each between two synchronizations, all on the same batches.

    A drift of the GPU clock (an H200 under a long GEMM-heavy step slows by a percent or two from one
    minute to the next) or of the host then moves every variant alike, and each pair of neighbouring
    steps is a ratio measured on its own. A variant's peak memory is its own: what it holds between
    steps plus the most one of its steps allocated on top (the others' weights left out).
    """
    gc.collect()
    torch.cuda.empty_cache()
    state: dict[str, dict] = {}
    for name, build in builds.items():
        before = torch.cuda.memory_allocated()
        model = build()
        opt = adamw(model)
        for i in range(max(warmup, 1)):
            t = time.perf_counter()
            optimizer_step(model, opt, step, batches[i % len(batches)])
            torch.cuda.synchronize()
            if i == 0:
                first = time.perf_counter() - t
        held = torch.cuda.memory_allocated() - before  # weights, gradients' absence, AdamW's moments
        state[name] = {"model": model, "opt": opt, "held": held, "first": first, "times": [], "extra": 0}
    names = list(builds)
    with ManualGC(GC_EVERY) as collector:
        for i in range(steps):
            for name in names if i % 2 == 0 else names[::-1]:
                s = state[name]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t = time.perf_counter()
                loss = optimizer_step(s["model"], s["opt"], step, batches[i % len(batches)])
                collector.after_step(i + 1)
                torch.cuda.synchronize()
                s["times"].append(time.perf_counter() - t)
                s["extra"] = max(s["extra"], torch.cuda.max_memory_allocated() - base)
                s["loss"] = loss.item()
    out = {
        name: {
            "step_ms": 1e3 * statistics.median(s["times"]),
            "first_step_s": s["first"],
            "peak_gib": (s["held"] + s["extra"]) / 2**30,
            "loss": s["loss"],
            "steps_ms": [1e3 * t for t in s["times"]],
        }
        for name, s in state.items()
    }
    del state
    gc.collect()
    torch.cuda.empty_cache()
    return out


def median_interval(xs: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free ``confidence`` interval of the median of ``xs``: the order statistics whose ranks
    a Binomial(n, 1/2) count of values below the median falls between (no assumption on the spread's shape)."""
    xs, n = sorted(xs), len(xs)
    cdf, k = 0.0, 0  # the largest k with P(count < k) <= (1 - confidence) / 2
    while k < n and cdf + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        cdf += math.comb(n, k) / 2**n
        k += 1
    return (xs[k - 1], xs[n - k]) if k > 0 else (xs[0], xs[-1])


def mean_interval(xs: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``xs`` and its normal-approximation ``confidence`` interval (mean ± z·s/√n).
    Tighter than :func:`median_interval` for the near-normal spread of step ratios; needs two values or more."""
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    mean, half = statistics.fmean(xs), z * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def merge_rounds(results: list[dict | None]) -> dict | None:
    """One variant's rounds as one result: the median of the rounds' median step times (None if any ran out of
    memory), the first round's first step (it compiled from scratch), the largest peak."""
    if not results or any(r is None for r in results):
        return None
    return results[0] | {
        "step_ms": statistics.median(r["step_ms"] for r in results),  # of an even count: the middle pair's mean
        "peak_gib": max(r["peak_gib"] for r in results),
        "rounds_ms": [r["step_ms"] for r in results],
    }


def our_kernels() -> dict[str, str]:
    """Kernel name -> kind for every Triton kernel of ``hybridlm.ops`` (by the module that defines it)."""
    import importlib
    import pkgutil

    import triton

    import hybridlm.ops

    kinds = {"ssd": "SSD / GDN scan (Triton)", "gated_delta": "SSD / GDN scan (Triton)", "conv": "causal conv"}
    kinds |= {"norm": "norm", "step": "decode step (Triton)"}
    out = {}
    for info in pkgutil.iter_modules(hybridlm.ops.__path__):
        if not info.name.endswith("_triton"):
            continue
        module = importlib.import_module(f"hybridlm.ops.{info.name}")
        kind = kinds.get(info.name.removesuffix("_triton"), "other")
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                out[name] = kind
    return out


Interval = tuple[float, float, str]  # (start µs, end µs, name) on the profiler's clock


def gpu_idle(kernels: list[Interval], host: list[Interval]) -> tuple[float, list[tuple[float, float, str, str, str]]]:
    """Where the GPU waited: (idle µs between the first kernel's start and the last one's end, the gaps as
    (µs, start µs, kernel before, kernel after, host op)). The host op is the shortest one running at the
    gap's midpoint ("(Python)" where none is): what the GPU was waiting for the host to finish. Gaps under
    5 µs (one launch after another) are counted as "(launch)" without a search of the host ops."""
    kernels = sorted(kernels)
    gaps, busy_until, before = [], kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > busy_until:
            mid, op = (busy_until + start) / 2, "(launch)"
            if start - busy_until >= 5:
                running = [h for h in host if h[0] <= mid <= h[1]]
                op = min(running, key=lambda h: h[1] - h[0])[2] if running else "(Python)"
            gaps.append((start - busy_until, busy_until, before, name, op))
        if end > busy_until:
            busy_until, before = end, name
    return sum(g[0] for g in gaps), gaps


def _is_kernel(evt) -> bool:
    """A GPU kernel of a profile (a user annotation, e.g. ``Optimizer.step#AdamW.step``, spans kernels)."""
    from torch.autograd import DeviceType

    return evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False) and "#" not in evt.name


def print_gpu_idle(prof, label: str, top: int = 12) -> None:
    """The GPU's idle time inside one profiled step, by the host op it waited on, and its longest gaps (the
    profiler slows the host, so host-bound gaps are larger here than in an unprofiled step)."""
    from torch.autograd import DeviceType

    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events() if _is_kernel(e)]
    host = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == DeviceType.CPU and "#" not in e.name and not e.name.startswith(("cu", "Activity"))
    ]
    if not kernels:
        return
    first = min(h[0] for h in host) if host else kernels[0][0]
    idle, gaps = gpu_idle(kernels, host)
    lead = min(k[0] for k in kernels) - first
    print(
        f"GPU idle ({label}): {lead / 1e3:.1f} ms before the first kernel, then {idle / 1e3:.1f} ms in "
        f"{len(gaps)} gaps ({sum(g[0] >= 50 for g in gaps)} of 50 µs or more)"
    )
    by_op: dict[str, list[float]] = {}
    for us, _, _, _, op in gaps:
        by_op.setdefault(op, [0, 0.0])
        by_op[op][0] += 1
        by_op[op][1] += us
    print("| host op running during the gaps | gaps | idle ms |")
    print("|---|---|---|")
    for op, (n, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {op[:70]} | {n} | {us / 1e3:.2f} |")
    print("| longest gaps: µs | at ms | kernel before | kernel after | host op |")
    print("|---|---|---|---|---|")
    for us, at, before, after, op in sorted(gaps, reverse=True)[:top]:
        print(f"| {us:.0f} | {(at - first) / 1e3:.1f} | {before[:40]} | {after[:40]} | {op[:40]} |")


def one_step_diagnostic(diagnose, build, step, batches, label: str) -> None:
    """Build a model, warm it up with three steps (compiled, autotuned, the allocator settled), run
    ``diagnose(model, opt, step, batch, label)`` (:func:`profile_step`, :func:`sync_check`) on one more
    step, then free the model."""
    model = build()
    opt = adamw(model)
    for i in range(3):
        optimizer_step(model, opt, step, batches[i % len(batches)])
    torch.cuda.synchronize()
    diagnose(model, opt, step, batches[0], label)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()


def profile_step(model, opt, step, batch, label: str) -> None:
    """Print one step's GPU time by kernel kind, the host ops that cost most and where the GPU idled."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        optimizer_step(model, opt, step, batch)
        torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - t0)
    kinds = [
        ("GEMM", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|_mm_|grouped"),
        ("attention", r"flash|fmha|cudnn|attention|flex"),
        ("SSD / GDN scan (Triton)", r"ssd|chunk|scan|state|delta|gdn"),
        ("causal conv", r"conv"),
        ("norm", r"norm|rms"),
        ("cross entropy / softmax", r"softmax|logsumexp|cross_entropy|nll"),
        ("optimizer", r"adam|multi_tensor|foreach"),
        ("elementwise / fused (inductor)", r"triton_|elementwise|vectorized|unrolled|fused"),
        ("copy / cast / fill", r"copy|cast|fill|memset|memcpy"),
    ]

    ours = our_kernels()
    totals: dict[str, float] = {}
    per_kernel: dict[str, list[float]] = {}
    count = 0
    for evt in prof.events():
        if not _is_kernel(evt):
            continue
        name = evt.name.lower()
        kind = ours.get(evt.name) or next((k for k, pat in kinds if re.search(pat, name)), "other")
        totals[kind] = totals.get(kind, 0.0) + evt.device_time_total / 1e3
        per_kernel.setdefault(evt.name, [0, 0.0])
        per_kernel[evt.name][0] += 1
        per_kernel[evt.name][1] += evt.device_time_total / 1e3
        count += 1
    total = sum(totals.values())
    print(f"\nwhere one step's GPU time goes: {label} ({count} kernel launches, {total:.1f} ms of kernel time)")
    print("| kernel kind | ms | share |")
    print("|---|---|---|")
    for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:.1f} | {100 * ms / total:.1f} % |")
    print(f"\nthe kernels that took most GPU time ({label})")
    print("| kernel | launches | ms |")
    print("|---|---|---|")
    for name, (n, ms) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:30]:
        print(f"| {name[:110]} | {n} | {ms:.2f} |")
    # When the wall time exceeds the kernel time, the GPU waited for the host: the host ops that
    # cost most (self time, under the profiler's own overhead) say what it was doing.
    host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    host_ms = sum(e.self_cpu_time_total for e in host) / 1e3
    print(f"host side ({label}): profiled step {wall_ms:.1f} ms wall, {host_ms:.1f} ms of host op self time")
    print("| host op | calls | self ms |")
    print("|---|---|---|")
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:14]:
        print(f"| {e.key[:70]} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} |")
    print_gpu_idle(prof, label)


@contextlib.contextmanager
def warnings_by_site(frames: int = 4) -> Iterator[dict[tuple[str, str], int]]:
    """Count the warnings raised inside the block by (message's first line, call site): the innermost
    ``frames`` Python frames outside the standard library and site-packages (ours, a benchmark's, or
    inductor's generated code), innermost first."""
    sites: dict[tuple[str, str], int] = {}

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stack = [
            f
            for f in traceback.extract_stack()[:-1]
            if not any(part in f.filename for part in ("site-packages", "/lib/python3", "<frozen"))
        ]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack[::-1][:frames])
        key = (str(message).strip().splitlines()[0][:90], where or f"{Path(filename).name}:{lineno}")
        sites[key] = sites.get(key, 0) + 1

    with warnings.catch_warnings():  # restores showwarning and the filters on the way out
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield sites


def sync_check(model, opt, step, batch, label: str) -> None:
    """Print every host-device synchronization inside one training step: with
    ``torch.cuda.set_sync_debug_mode("warn")`` each synchronizing call (``.item()``, a copy to the host,
    ``nonzero``...) warns, and its Python stack names the line that asked. A synchronization empties the
    GPU's queue: the GPU then idles while the host launches what follows. (Torch calls the mode a prototype
    that does not yet catch every synchronizing operation.)"""
    torch.cuda.set_sync_debug_mode("warn")  # warns once that it is a prototype: outside the count
    try:
        with warnings_by_site() as sites:
            optimizer_step(model, opt, step, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    print(f"\nhost-device synchronizations in one step ({label}): {sum(sites.values())}")
    if sites:
        print("| calls | warning | where (innermost first) |")
        print("|---|---|---|")
        for (message, where), n in sorted(sites.items(), key=lambda kv: -kv[1]):
            print(f"| {n} | {message} | {where} |")


def loss_curves(config: ModelConfig, batch: int, seq: int, steps: int, compile_: bool) -> None:
    """Train unfused and fused ``steps`` steps on the built-in text corpus; compare the losses."""
    from hybridlm.train.data import PackedRows, load_corpus
    from hybridlm.train.tokenizer import build_tokenizer

    tok = build_tokenizer("byte")
    rows = PackedRows(load_corpus("builtin:pydoc", tok, None, progress=False), seq)
    g = torch.Generator().manual_seed(0)
    curves = {}
    for name, pattern in (("unfused", config.pattern), ("fused", fuse_all(config.pattern))):
        model = build_ours(config.replace(pattern=pattern), compile_, None)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        g.manual_seed(0)
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, rows.num_rows, (batch,), generator=g).tolist()
            b = {k: v.cuda() for k, v in rows.rows(idx).items()}
            losses.append(ours_step(model, b).item())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        curves[name] = losses
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    a, b = torch.tensor(curves["unfused"]), torch.tensor(curves["fused"])
    diff = (a - b).abs()
    noise = (a[1:] - a[:-1]).abs().median().item()  # step-to-step variation of one run
    print(f"\nloss curves, {steps} steps of {batch}×{seq} on builtin:pydoc (bytes), unfused vs fused:")
    print(f"start {a[0]:.4f} / {b[0]:.4f} · end {a[-1]:.4f} / {b[-1]:.4f} · max |Δ| {diff.max():.4f} ")
    print(f"mean |Δ| {diff.mean():.4f} · median step-to-step change of one run {noise:.4f}")
    for s in sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1}):
        print(f"  step {s + 1}: {a[s]:.4f} {b[s]:.4f}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "loss_curves.json").write_text(json.dumps(curves))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-1.3b")
    ap.add_argument("--shapes", default="4x4096,1x4096", help="comma-separated BxL, e.g. 4x4096,1x4096,1x32768")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument(
        "--rounds", type=int, default=1, help="measure every variant this many times, alternating the order; medians"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="hold our variants at once and time their steps taking turns (A B B A ...): ratios per pair of steps",
    )
    ap.add_argument("--compare-hf", action="store_true", help="also run Hugging Face NemotronHForCausalLM")
    ap.add_argument("--no-compile", action="store_true", help="run our blocks eagerly")
    ap.add_argument("--ac", default=None, help="activation checkpointing policy (train.ac_policy), e.g. selective")
    ap.add_argument(
        "--variants",
        default="unfused,fused",
        help="which of ours to run: unfused, fused, and either with -float8 (float8 linear layers, --float8's recipe) "
        "or -float8-filtered (the same without the layers too small to gain: train.float8_auto_filter)",
    )
    ap.add_argument(
        "--float8", default="tensorwise", choices=FLOAT8_RECIPES[1:], help="the -float8 variants' train.float8 recipe"
    )
    ap.add_argument(
        "--save-seams",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compiled fused blocks keep the residual sum between their mixers for the backward "
        "(hybridlm.parallel.execution.compile_blocks(save_seams=...); default: on)",
    )
    ap.add_argument(
        "--compile-mode", default=None, help="torch.compile mode for our blocks, e.g. reduce-overhead (CUDA graphs)"
    )
    ap.add_argument(
        "--gc-every", type=int, default=0, metavar="N", help="as train.gc_every: 0 = automatic garbage collection"
    )
    ap.add_argument(
        "--inductor-config",
        action="append",
        default=[],
        metavar="KEY=N",
        help="set torch._inductor.config.KEY to the integer N first, e.g. triton.multi_kernel=1 (repeatable)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print one step's GPU time by kernel kind, host ops and the GPU's idle gaps (per variant, in --variants order)",
    )
    ap.add_argument(
        "--sync-check",
        action="store_true",
        help="print each host-device synchronization inside one step and the line that asked for it (per variant, "
        "and Hugging Face with --compare-hf)",
    )
    ap.add_argument("--curves", type=int, default=0, metavar="N", help="compare N-step loss curves, fused/unfused")
    ap.add_argument(
        "--memory-phases",
        action="store_true",
        help="instead of timing: where one step's memory goes (at rest, kept by the forward, its moment's extra, "
        "the peaks) beside hybridlm plan's pieces, per variant and shape",
    )
    args = ap.parse_args()
    if args.interleave and args.rounds > 1:
        ap.error("--interleave times every pair of steps on its own: use --steps for more pairs, not --rounds")
    if args.gc_every < 0:
        ap.error(f"--gc-every must be >= 0 (0: automatic garbage collection), got {args.gc_every}")

    alloc_conf = configure_cuda_allocator()  # as the trainer does, before any CUDA memory exists
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    torch.backends.cuda.matmul.allow_tf32 = True
    hf_path = None
    if args.compare_hf:
        from hf_anchor import install_kernels

        hf_path = install_kernels()
    import transformers

    from hybridlm.ops.dispatch import paths_used

    base = ModelConfig.preset(args.preset)
    compile_ = not args.no_compile
    import torch._inductor.config as inductor_config

    for item in args.inductor_config:  # e.g. triton.multi_kernel=1: inductor times both reduction kinds
        key, _, value = item.partition("=")
        *path, leaf = key.split(".")
        holder = inductor_config
        for part in path:
            holder = getattr(holder, part, None)
        if holder is None or not hasattr(holder, leaf) or not value.lstrip("-").isdigit():
            ap.error(f"--inductor-config {item}: expected KEY=N with KEY a setting of torch._inductor.config")
        setattr(holder, leaf, int(value))
    global COMPILE_MODE, GC_EVERY, SAVE_SEAMS
    COMPILE_MODE = args.compile_mode
    SAVE_SEAMS = args.save_seams
    GC_EVERY = args.gc_every
    rate = measure_matmul_flops(torch.device("cuda"), n=8192, iters=30)
    params = float(HybridLM(base, device="meta").num_params())
    expandable = {str(seg.get("is_expandable", "?")) for seg in torch.cuda.memory_snapshot()}
    print(
        f"{torch.cuda.get_device_name()} · torch {torch.__version__} · transformers {transformers.__version__} · "
        f"bf16 matmul {rate / 1e12:.0f} TFLOP/s measured (8192³; the trainer measures its MFU denominator so at 4096³) · peak {H200_PEAK / 1e12:.0f} (datasheet)"
        f" · PYTORCH_CUDA_ALLOC_CONF={alloc_conf} (segments expandable: {'/'.join(sorted(expandable))})"
    )
    print(
        f"model {args.preset}: {params / 1e9:.3f}B parameters · AdamW fused · ours: fp32 master weights, bf16 "
        f"autocast, {'compiled' if compile_ else 'eager'} blocks, packed rows"
        + (f" (mode {args.compile_mode})" if compile_ and args.compile_mode else "")
        + (f", AC {args.ac}" if args.ac else "")
        + (f", inductor {' '.join(args.inductor_config)}" if args.inductor_config else "")
        + ("" if args.save_seams else ", fused seams recomputed")
    )
    if hf_path:
        print(f"Hugging Face: bf16 parameters, unpacked rows; {hf_path}")

    variants = {"unfused": base.pattern, "fused": fuse_all(base.pattern)}
    for name, pattern in list(variants.items()):  # train.float8 = --float8 (and train.float8_auto_filter)
        variants |= {f"{name}-float8": pattern, f"{name}-float8-filtered": pattern}
    if args.memory_phases:
        for shape in args.shapes.split(","):
            B, L = (int(x) for x in shape.lower().split("x"))
            batch = packed_batches(1, B, L, base.vocab_size)[0]
            for name in args.variants.split(","):
                torch._dynamo.reset()
                cfg, f8 = base.replace(pattern=variants[name]), float8_of(name, args.float8)
                rows = memory_phases(cfg, lambda c=cfg, f=f8: build_ours(c, compile_, None, f), batch, args.warmup, f8)
                print(f"\n{shape} hybridlm {name}: GiB, measured (torch.cuda.memory_allocated) and planned\n")
                print("| | measured | planned |\n|---|---:|---:|")
                for row in rows:
                    print("| " + " | ".join(row) + " |")
        return
    rows = []
    for shape in args.shapes.split(","):
        B, L = (int(x) for x in shape.lower().split("x"))
        batches = packed_batches(2, B, L, base.vocab_size)
        flops_per_step = 3 * float(HybridLM(base, device="meta").flops_per_token(L)) * B * L
        todo = [(v, "ours") for v in args.variants.split(",")]
        if args.compare_hf:
            todo.append(("hf", "hf"))
        runs: dict[str, list[dict | None]] = {}  # label -> one result per round
        if args.interleave:  # ours in one process, steps taking turns; Hugging Face (if asked) after them
            torch._dynamo.reset()
            configs = {name: base.replace(pattern=variants[name]) for name in args.variants.split(",")}
            builds = {
                name: lambda cfg=cfg, name=name: build_ours(cfg, compile_, args.ac, float8_of(name, args.float8))
                for name, cfg in configs.items()
            }
            try:
                measured = measure_interleaved(builds, ours_step, batches, args.steps, args.warmup)
            except torch.cuda.OutOfMemoryError:
                measured = None
            if measured is None:
                # Every variant's weights and AdamW state stay on the GPU at once (four bench-1.3b variants
                # do not fit an H100's 80 GB): say so and go on, rather than end the run in a traceback.
                # (Freed here, after the except block: its traceback held the models.)
                gc.collect()
                torch.cuda.empty_cache()
                measured = dict.fromkeys(builds)
                print(
                    f"  {shape}: out of memory holding {len(builds)} variants at once (--interleave keeps each "
                    "one's weights and optimizer state on the GPU): interleave fewer variants per run",
                    flush=True,
                )
            for name, r in measured.items():
                runs[f"hybridlm {name}"] = [r]
                if r:
                    tps = B * L / (r["step_ms"] / 1e3)
                    print(
                        f"  {shape} hybridlm {name}: {r['step_ms']:.1f} ms, {tps:,.0f} tokens/s, {r['peak_gib']:.1f} GiB"
                    )
            todo = [job for job in todo if job[1] != "ours"]
        # Rounds alternate the order (A B, then B A, ...), so that a slow drift of the host or the
        # GPU clock does not favour whichever variant runs first; each round rebuilds and recompiles.
        for name, kind in [job for rnd in range(args.rounds) for job in (todo if rnd % 2 == 0 else todo[::-1])]:
            try:
                # Each variant compiles afresh, as in its own training process (and dynamo's
                # cache of graphs per code object does not fill up across variants).
                torch._dynamo.reset()
                if kind == "ours":
                    cfg = base.replace(pattern=variants[name])

                    def build(cfg=cfg, name=name):
                        return build_ours(cfg, compile_, args.ac, float8_of(name, args.float8))

                    r = measure(build, ours_step, batches, args.steps, args.warmup)
                    label = f"hybridlm {name}"
                else:
                    from hf_anchor import anchor_path, hf_model

                    def build():
                        return hf_model(HybridLM(base, seed=0, device="cuda"), torch.bfloat16).train()

                    r = measure(build, hf_step, batches, args.steps, args.warmup)
                    label = f"Hugging Face ({anchor_path()})"
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                r, label = None, (f"hybridlm {name}" if kind == "ours" else "Hugging Face")
            runs.setdefault(label, []).append(r)
            if r:
                tps = B * L / (r["step_ms"] / 1e3)
                print(
                    f"  {shape} {label}: {r['step_ms']:.1f} ms, {tps:,.0f} tokens/s, {r['peak_gib']:.1f} GiB",
                    flush=True,
                )
            else:
                print(f"  {shape} {label}: out of memory", flush=True)
        rows += [(shape, label, merge_rounds(results), flops_per_step) for label, results in runs.items()]

    def planned(shape: str, label: str) -> str:  # `hybridlm plan`'s peak for our variants
        if not label.startswith("hybridlm "):
            return ""
        name = label.removeprefix("hybridlm ")
        B, L = (int(x) for x in shape.split("x"))
        gib = planned_gib(base.replace(pattern=variants[name]), B, L, args.ac, float8_of(name, args.float8))
        return "" if gib is None else f"{gib:.1f}"

    print(
        "\n| B×L | variant | step ms | tokens/s | model TFLOP/s | MFU (989) | MFU (measured) | peak GiB | planned GiB "
        "| first step s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_shape: dict[str, dict[str, float]] = {}
    round_ms: dict[str, dict[str, list[float]]] = {}
    pair_ms: dict[str, dict[str, list[float]]] = {}  # --interleave: each timed step
    for shape, label, r, flops in rows:
        if r is None:
            print(f"| {shape} | {label} | out of memory | | | | | | {planned(shape, label)} | |")
            continue
        B, L = (int(x) for x in shape.split("x"))
        tps = B * L / (r["step_ms"] / 1e3)
        by_shape.setdefault(shape, {})[label] = tps
        round_ms.setdefault(shape, {})[label] = r.get("rounds_ms", [])
        pair_ms.setdefault(shape, {})[label] = r.get("steps_ms", [])
        tf = flops / (r["step_ms"] / 1e3)
        print(
            f"| {shape} | {label} | {r['step_ms']:.1f} | {tps:,.0f} | {tf / 1e12:.0f} | {100 * tf / H200_PEAK:.1f} % | "
            f"{100 * tf / rate:.1f} % | {r['peak_gib']:.1f} | {planned(shape, label)} | {r['first_step_s']:.1f} |"
        )
    print()
    for shape, d in by_shape.items():
        u, f = d.get("hybridlm unfused"), d.get("hybridlm fused")
        hf = next((v for k, v in d.items() if k.startswith("Hugging Face")), None)
        parts = []
        if u and f:
            parts.append(f"fused/unfused {f / u:.3f}")
            ru, rf = round_ms[shape]["hybridlm unfused"], round_ms[shape]["hybridlm fused"]
            if len(ru) > 1:
                parts.append("by round " + " ".join(f"{a / b:.3f}" for a, b in zip(ru, rf)))
            su, sf = pair_ms[shape].get("hybridlm unfused"), pair_ms[shape].get("hybridlm fused")
            if su and sf and len(su) > 1:  # --interleave: each pair of neighbouring steps is a ratio of its own
                ratios = [a / b for a, b in zip(su, sf)]
                q, (lo, hi) = statistics.quantiles(ratios, n=4), median_interval(ratios)
                mean, mlo, mhi = mean_interval(ratios)
                parts.append(
                    f"step pairs: median {statistics.median(ratios):.3f} (95 % interval {lo:.3f}-{hi:.3f}), "
                    f"mean {mean:.4f} ({mlo:.4f}-{mhi:.4f}), "
                    f"quartiles {q[0]:.3f}-{q[2]:.3f}, fused ahead in {sum(r > 1 for r in ratios)} of {len(ratios)}"
                )
        # float8 against the same variant in the model's precision, and the filtered float8 against every layer's
        for name, (base_kind, kind) in itertools.product(
            ("unfused", "fused"), (("", "-float8"), ("", "-float8-filtered"), ("-float8", "-float8-filtered"))
        ):
            hi, f8 = d.get(f"hybridlm {name}{base_kind}"), d.get(f"hybridlm {name}{kind}")
            if hi and f8:
                parts.append(f"{name}{kind}/{name}{base_kind} {f8 / hi:.3f}")
                sh, s8 = pair_ms[shape].get(f"hybridlm {name}{base_kind}"), pair_ms[shape].get(f"hybridlm {name}{kind}")
                if sh and s8 and len(sh) > 1:
                    parts.append(f"(step pairs: median {statistics.median(a / b for a, b in zip(sh, s8)):.3f})")
        if hf and u:
            parts.append(f"unfused/HF {u / hf:.3f}")
        if hf and f:
            parts.append(f"fused/HF {f / hf:.3f}")
        print(f"{shape}: " + ", ".join(parts))
    print(f"kernel paths: {paths_used()}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"train_step_{args.preset}_{args.shapes.replace(',', '_')}.json").write_text(
            json.dumps([{"shape": s, "variant": v, **(r or {})} for s, v, r, _ in rows], indent=1)
        )

    B, L = (int(x) for x in args.shapes.split(",")[0].split("x"))  # one-step diagnostics: the first shape
    for wanted, diagnose in ((args.profile, profile_step), (args.sync_check, sync_check)):
        if not wanted:
            continue
        batches = packed_batches(2, B, L, base.vocab_size)
        # In the order of --variants: the step profiled later may meet a warmer, slower-clocked GPU.
        for name in args.variants.split(","):
            cfg = base.replace(pattern=variants[name])
            one_step_diagnostic(
                diagnose,
                lambda cfg=cfg: build_ours(cfg, compile_, args.ac),
                ours_step,
                batches,
                f"hybridlm {name} {B}x{L}",
            )
        if args.compare_hf:
            from hf_anchor import hf_model

            one_step_diagnostic(
                diagnose,
                lambda: hf_model(HybridLM(base, seed=0, device="cuda"), torch.bfloat16).train(),
                hf_step,
                batches,
                f"Hugging Face {B}x{L}",
            )
    if args.curves:
        loss_curves(base, B, L, args.curves, compile_)


if __name__ == "__main__":
    main()
