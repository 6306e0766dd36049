"""Triton top-p filter: the reference's kept set (:mod:`hybridlm.ops.top_p`) without sorting the vocabulary.

Let ``e_v = exp(l_v - max l)`` and ``Z = sum e_v``. In the order of decreasing logits (lower id first among equal
ones) the reference keeps a token while the mass before it is below ``top_p``. So every kept logit is at least some
boundary logit ``b``, the tokens above ``b`` hold less than ``top_p · Z``, and of the tokens equal to ``b`` the first
``ceil((top_p · Z - mass above b) / e_b)`` by id are kept (at least one, at most all). The kernels find ``b``:

1. ``_stats``: per segment of a row, its max and its sum of ``exp(l - max)`` (the row's max and Z follow).
2. ``_sweep``, ``SWEEPS`` times: ``b`` is searched by its bits. A float32's bits, read as an int32 with the
   lower 31 bits flipped for negative numbers, order as the floats do, so ``b``'s key lies in an integer interval
   [lo, hi] with ``mass(key > lo) >= top_p · Z > mass(key > hi)``. Each pass sums, per segment, the mass above
   ``WAYS`` cuts spread over the interval, and the next pass (its every program, the same way) keeps the piece
   between the last cut that still reaches ``top_p · Z`` and the first that does not: 16 ways, 8 passes cover the
   2^32 keys. The search ends on a key that some token holds.
3. ``_ties``: per segment, the mass above ``b`` and the number of tokens equal to it.
4. ``_write``: the kept logits, the others -inf; the tokens equal to ``b`` counted by id across segments.

Each row is cut into segments so that a batch of one row still spreads over the GPU; every launch has one program
per (row, segment), and what a pass needs from the other segments it reads from the previous launch's buffers.
About 11 launches of small passes over the logits in L2, against a sort of them (docs/benchmarks.md). The
float32 sums differ from the reference's cumulative sum in their order only.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .dispatch import record

#: Candidate cuts per pass, and passes: ``WAYS ** SWEEPS`` covers the 2^32 int32 keys.
WAYS = 16
SWEEPS = 8
#: Logits per step of a program's loop (a (BLOCK, WAYS) comparison tile), and warps per program.
BLOCK = 256
NUM_WARPS = 4
#: A row is cut into at most this many segments, each a whole number of blocks.
MAX_SEGMENTS = 64


@triton.jit
def _key(x):
    """float32 -> int32 in the same order (-0.0 as +0.0, -inf lowest)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _row_target(max_ptr, sum_ptr, row, S, top_p, SP: tl.constexpr):
    """The row's max logit and ``top_p · Z`` (Z: the sum of ``exp(l - max)``), from the segments' statistics."""
    s = tl.arange(0, SP)
    m = tl.load(max_ptr + row * S + s, mask=s < S, other=float("-inf"))
    z = tl.load(sum_ptr + row * S + s, mask=s < S, other=0.0)
    top = tl.max(m, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # (a row of -inf: nothing to keep, and no NaN)
    total = tl.sum(z * tl.exp(m - top), 0)
    return top, tl.maximum(top_p * total, 1.1754943508222875e-38)


@triton.jit
def _cuts(lo, hi, WAYS: tl.constexpr):
    """(WAYS,) int64 cuts over [lo, hi]: lo first, then every ceil((hi - lo) / WAYS), none past hi."""
    j = tl.arange(0, WAYS).to(tl.int64)
    step = (hi - lo + WAYS - 1) // WAYS
    return tl.minimum(lo + j * step, hi)


@triton.jit
def _narrow(bounds_ptr, mass_ptr, row, S, target, WAYS: tl.constexpr, SP: tl.constexpr):
    """The previous pass's interval [lo, hi] narrowed by the masses its programs summed above its cuts."""
    lo = tl.load(bounds_ptr + row * 2)
    hi = tl.load(bounds_ptr + row * 2 + 1)
    j = tl.arange(0, WAYS)
    s = tl.arange(0, SP)
    part = tl.load(mass_ptr + (row * S + s[:, None]) * WAYS + j[None, :], mask=s[:, None] < S, other=0.0)
    above = tl.sum(part, 0)  # (the segments in one order in every program: one result)
    cuts = _cuts(lo, hi, WAYS)
    reach = (above >= target) | (j == 0)  # (mass above lo reaches the target by construction)
    return tl.max(tl.where(reach, cuts, lo), 0), tl.min(tl.where(reach, hi, cuts), 0)


@triton.jit
def _stats_kernel(x_ptr, stride_x, V, SEG, max_ptr, sum_ptr, S, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    seg = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_x
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(seg * SEG, seg * SEG + SEG, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32))
    top = tl.max(m, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)  # (a segment of -inf sums 0, not exp(-inf + inf) = NaN)
    z = tl.zeros([BLOCK], tl.float32)
    for start in range(seg * SEG, seg * SEG + SEG, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z += tl.exp(tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) - shift)
    tl.store(max_ptr + row * S + seg, top)
    tl.store(sum_ptr + row * S + seg, tl.sum(z, 0))


@triton.jit
def _sweep_kernel(
    x_ptr, stride_x, V, SEG, max_ptr, sum_ptr, S, top_p,
    prev_bounds_ptr, prev_mass_ptr, bounds_ptr, mass_ptr,
    FIRST: tl.constexpr, BLOCK: tl.constexpr, WAYS: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seg = tl.program_id(1)
    top, target = _row_target(max_ptr, sum_ptr, row, S, top_p, SP)
    if FIRST:
        lo = tl.full([], -2147483648, tl.int64)  # int32's lowest key: a NaN's, which no token holds
        hi = tl.full([], 2147483647, tl.int64)  # int32's highest: a NaN's too, so nothing lies above it
    else:
        lo, hi = _narrow(prev_bounds_ptr, prev_mass_ptr, row, S, target, WAYS, SP)
    cuts = _cuts(lo, hi, WAYS).to(tl.int32)
    acc = tl.zeros([WAYS], tl.float32)
    base = x_ptr + row.to(tl.int64) * stride_x
    for start in range(seg * SEG, seg * SEG + SEG, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - top)
        acc += tl.sum(tl.where(_key(x)[:, None] > cuts[None, :], e[:, None], 0.0), 0)
    tl.store(mass_ptr + (row * S + seg) * WAYS + tl.arange(0, WAYS), acc)
    if seg == 0:
        tl.store(bounds_ptr + row * 2, lo)
        tl.store(bounds_ptr + row * 2 + 1, hi)


@triton.jit
def _ties_kernel(
    x_ptr, stride_x, V, SEG, max_ptr, sum_ptr, S, top_p,
    prev_bounds_ptr, prev_mass_ptr, kstar_ptr, tie_mass_ptr, tie_count_ptr,
    BLOCK: tl.constexpr, WAYS: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seg = tl.program_id(1)
    top, target = _row_target(max_ptr, sum_ptr, row, S, top_p, SP)
    _, hi = _narrow(prev_bounds_ptr, prev_mass_ptr, row, S, target, WAYS, SP)
    kstar = hi.to(tl.int32)  # (the interval is one step wide now: hi is the boundary's key)
    above = tl.zeros([], tl.float32)
    count = tl.zeros([], tl.int32)
    base = x_ptr + row.to(tl.int64) * stride_x
    for start in range(seg * SEG, seg * SEG + SEG, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        k = _key(x)
        above += tl.sum(tl.where(k > kstar, tl.exp(x - top), 0.0), 0)
        count += tl.sum(((k == kstar) & (offs < V)).to(tl.int32), 0)
    tl.store(tie_mass_ptr + row * S + seg, above)
    tl.store(tie_count_ptr + row * S + seg, count)
    if seg == 0:
        tl.store(kstar_ptr + row, kstar)


@triton.jit
def _write_kernel(
    x_ptr, stride_x, out_ptr, stride_out, V, SEG, max_ptr, sum_ptr, S, top_p,
    kstar_ptr, tie_mass_ptr, tie_count_ptr,
    BLOCK: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seg = tl.program_id(1)
    top, target = _row_target(max_ptr, sum_ptr, row, S, top_p, SP)
    kstar = tl.load(kstar_ptr + row)
    s = tl.arange(0, SP)
    above = tl.sum(tl.load(tie_mass_ptr + row * S + s, mask=s < S, other=0.0), 0)
    counts = tl.load(tie_count_ptr + row * S + s, mask=s < S, other=0)
    ties = tl.sum(counts, 0)
    seen = tl.sum(tl.where(s < seg, counts, 0), 0)  # tied tokens in the segments before this one
    b = (kstar ^ ((kstar >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)  # the boundary logit
    # Tied token j (0, 1, ... by id) is kept while above + j · e_b < target; an e_b of 0 keeps them all.
    keep_ties = tl.ceil((target - above) / tl.exp(b - top))
    keep_ties = tl.maximum(tl.minimum(keep_ties, ties.to(tl.float32)), 1.0).to(tl.int32)
    base = x_ptr + row.to(tl.int64) * stride_x
    obase = out_ptr + row.to(tl.int64) * stride_out
    for start in range(seg * SEG, seg * SEG + SEG, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < V
        x = tl.load(base + offs, mask=inside, other=float("-inf"))
        k = _key(x.to(tl.float32))
        tie = (k == kstar) & inside
        rank = seen + tl.cumsum(tie.to(tl.int32), 0)
        keep = (k > kstar) | (tie & (rank <= keep_ties))
        tl.store(obase + offs, tl.where(keep, x, float("-inf")), mask=inside)
        seen += tl.sum(tie.to(tl.int32), 0)


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """Programs that fill the device about twice (CUDA); a few under Triton's interpreter on the CPU."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _segments(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(segments per row, logits per segment): enough programs for the device, each a whole number of blocks."""
    blocks = triton.cdiv(vocab, BLOCK)
    segments = max(1, min(blocks, MAX_SEGMENTS, triton.cdiv(_programs_wanted(device), rows)))
    seg = triton.cdiv(blocks, segments) * BLOCK
    return triton.cdiv(vocab, seg), seg


def top_p_filter_triton(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits (B, V) float32 / bf16 / fp16 -> (B, V) in their dtype, the dropped tokens -inf (see
    :func:`hybridlm.ops.top_p.top_p_filter`). No host synchronization: it can be captured in a CUDA graph."""
    B, V = logits.shape
    record("top_p", "triton")
    out = torch.empty((B, V), dtype=logits.dtype, device=logits.device)
    if B == 0 or V == 0:
        return out
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    S, SEG = _segments(B, V, x.device)
    SP = triton.next_power_of_2(S)
    f32 = dict(dtype=torch.float32, device=x.device)
    maxs, sums = torch.empty(B, S, **f32), torch.empty(B, S, **f32)
    bounds = torch.empty(2, B, 2, dtype=torch.int64, device=x.device)  # two buffers: a pass reads one, writes one
    mass = torch.empty(2, B, S, WAYS, **f32)
    kstar = torch.empty(B, dtype=torch.int32, device=x.device)
    tie_mass, tie_count = torch.empty(B, S, **f32), torch.empty(B, S, dtype=torch.int32, device=x.device)
    grid = (B, S)
    head = (x, x.stride(0), V, SEG)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _stats_kernel[grid](*head, maxs, sums, S, BLOCK=BLOCK, num_warps=NUM_WARPS)
        row_stats = (*head, maxs, sums, S, top_p)
        for i in range(SWEEPS):
            _sweep_kernel[grid](
                *row_stats, bounds[(i - 1) % 2], mass[(i - 1) % 2], bounds[i % 2], mass[i % 2],
                FIRST=i == 0, BLOCK=BLOCK, WAYS=WAYS, SP=SP, num_warps=NUM_WARPS,
            )  # fmt: skip
        last = (SWEEPS - 1) % 2
        _ties_kernel[grid](
            *row_stats, bounds[last], mass[last], kstar, tie_mass, tie_count,
            BLOCK=BLOCK, WAYS=WAYS, SP=SP, num_warps=NUM_WARPS,
        )  # fmt: skip
        _write_kernel[grid](
            x, x.stride(0), out, out.stride(0), V, SEG, maxs, sums, S, top_p, kstar, tie_mass, tie_count,
            BLOCK=BLOCK, SP=SP, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out
