"""Triton top-p filter: the reference's kept set (:mod:`hybridlm.ops.top_p`) without sorting the vocabulary.

Let ``e_v = exp(l_v - max l)`` and ``Z = sum e_v``. In the order of decreasing logits (lower id first among equal
ones) the reference keeps a token while the mass before it is below ``top_p``. So every kept logit is at least some
boundary logit ``b``, the tokens above ``b`` hold less than ``T = top_p · Z``, and of the tokens equal to ``b`` the
first ``ceil((T - mass above b) / e_b)`` by id are kept (at least one, at most all). The kernels find ``b`` by its
bits: a float32's bits, read as an int32 with the lower 31 bits flipped for negative numbers, order as the floats
do, so ``b``'s key is the least key whose mass above is below ``T``. It lies in an integer interval (lo, hi] with
``mass(key > lo) >= T > mass(key > hi)``, first the keys between -inf's and +inf's.

``_sweep``, :func:`passes` launches: each program sums, over its segment of a row, the mass above ``WAYS`` cuts that
part the interval into ``WAYS + 1`` pieces; the next launch's programs (every one alike, from the same sums in the
same order) keep the piece between the last cut whose mass above reaches ``T`` and the first that does not. The
first launch also finds each segment's max and sum (its masses relative to that max, rescaled by the next); the last
also counts the tokens equal to each of its cuts, which by then are every key of the interval. ``_write`` narrows
once more to ``b``'s key, and writes the kept logits and -inf for the others, numbering the tokens equal to ``b``
across the segments before its own.

Each row is cut into segments so that a batch of one row still spreads over the GPU; every launch has one program
per (row, segment). 9 launches of passes over the logits for up to 7 rows of a 131k vocabulary (16 cuts a pass), 15
for more (4 cuts), no host synchronization, so the op can be captured in a CUDA graph. The float32 sums differ from
the reference's cumulative sum in their order only.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .dispatch import record

#: Cuts per pass (the interval in WAYS + 1 pieces): many for a row or a few, whose passes cost their launch (8 passes
#: of 16 cuts), fewer from ``MANY_LOGITS`` logits on (8 rows of a 131k vocabulary), whose passes cost their
#: comparisons (14 passes of 4 cuts, 56 comparisons a logit against 128). Measured on an H100 with the blocks below
#: (``benchmarks/top_p.py --tune``, docs/benchmarks.md).
WAYS_FEW_ROWS, WAYS_MANY_ROWS = 16, 4
MANY_LOGITS = 1 << 20
#: The interval the search starts from: one below -inf's key, one above +inf's (no token holds a key outside).
KEY_LO, KEY_HI = -2139095042, 2139095041
#: Logits a step of a program's loop, for 16 and for 4 cuts (a (BLOCK, WAYS) tile of sums kept in registers:
#: 8,192 and 4,096), and warps per program.
BLOCK_FEW_ROWS, BLOCK_MANY_ROWS = 512, 1024
NUM_WARPS = 8
#: A row is cut into at most this many segments, each a whole number of blocks.
MAX_SEGMENTS = 64


@triton.jit
def float_key(x):
    """float32 -> int32 in the same order (-0.0 as +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _row_target(stat_ptr, row, S, top_p_ptr, SP: tl.constexpr):
    """The row's max logit and ``T = top_p · Z``, from its segments' (max, sum of exp(l - that max))."""
    top_p = tl.load(top_p_ptr)
    s = tl.arange(0, SP)
    m = tl.load(stat_ptr + (row * S + s) * 2, mask=s < S, other=float("-inf"))
    z = tl.load(stat_ptr + (row * S + s) * 2 + 1, mask=s < S, other=0.0)
    top = tl.max(m, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # (a row of -inf: nothing to keep, and no NaN)
    total = tl.sum(z * tl.exp(m - top), 0)
    return top, tl.maximum(top_p * total, 1.1754943508222875e-38)  # (above 0 where top_p rounds to 0)


@triton.jit
def _cuts(lo, hi, WAYS: tl.constexpr):
    """(WAYS,) int64 cuts parting (lo, hi] into WAYS + 1 pieces of ceil((hi - lo) / (WAYS + 1)), none past hi."""
    j = tl.arange(0, WAYS).to(tl.int64)
    step = (hi - lo + WAYS) // (WAYS + 1)
    return tl.minimum(lo + (j + 1) * step, hi)


@triton.jit
def _segment_masses(mass_ptr, stat_ptr, row, S, top, LOCAL: tl.constexpr, WAYS: tl.constexpr, SP: tl.constexpr):
    """(SP, WAYS): each segment's mass above each cut of a pass, relative to the row's max (LOCAL: the first pass's,
    relative to the segment's own max)."""
    j = tl.arange(0, WAYS)
    s = tl.arange(0, SP)
    part = tl.load(mass_ptr + (row * S + s[:, None]) * WAYS + j[None, :], mask=s[:, None] < S, other=0.0)
    if LOCAL:
        m = tl.load(stat_ptr + (row * S + s) * 2, mask=s < S, other=float("-inf"))
        part = part * tl.exp(m - top)[:, None]
    return part


@triton.jit
def _narrow(bounds_ptr, part, row, target, WAYS: tl.constexpr):
    """A pass's cuts and the interval they narrow (lo, hi] to, from its segments' masses ``part`` (SP, WAYS)."""
    lo = tl.load(bounds_ptr + row * 2)
    hi = tl.load(bounds_ptr + row * 2 + 1)
    cuts = _cuts(lo, hi, WAYS)
    reach = tl.sum(part, 0) >= target  # (the segments in one order in every program: one result)
    return cuts, tl.max(tl.where(reach, cuts, lo), 0), tl.min(tl.where(reach, hi, cuts), 0)


@triton.jit
def _sweep_kernel(
    x_ptr, stride_x, V, SEG, S, top_p_ptr, stat_ptr,
    prev_bounds_ptr, prev_mass_ptr, bounds_ptr, mass_ptr, count_ptr,
    FIRST: tl.constexpr, SECOND: tl.constexpr, LAST: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
    BLOCK: tl.constexpr, WAYS: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seg = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_x
    if FIRST:
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(seg * SEG, seg * SEG + SEG, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = tl.maximum(m, tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32))
        seg_max = tl.max(m, 0)
        shift = tl.where(seg_max == float("-inf"), 0.0, seg_max)  # (a segment of -inf sums 0, not NaN)
        lo = tl.full([], LO, tl.int64)
        hi = tl.full([], HI, tl.int64)
    else:
        shift, target = _row_target(stat_ptr, row, S, top_p_ptr, SP)
        part = _segment_masses(prev_mass_ptr, stat_ptr, row, S, shift, SECOND, WAYS, SP)
        _, lo, hi = _narrow(prev_bounds_ptr, part, row, target, WAYS)
    cuts = _cuts(lo, hi, WAYS).to(tl.int32)
    acc = tl.zeros([BLOCK, WAYS], tl.float32)  # (reduced once at the end: a reduction a step cost more)
    z = tl.zeros([BLOCK], tl.float32)
    ties = tl.zeros([BLOCK, WAYS], tl.int32)
    for start in range(seg * SEG, seg * SEG + SEG, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - shift)
        k = float_key(x)[:, None]
        acc += tl.where(k > cuts[None, :], e[:, None], 0.0)
        if FIRST:
            z += e
        if LAST:
            ties += ((k == cuts[None, :]) & (offs < V)[:, None]).to(tl.int32)
    at = (row * S + seg) * WAYS + tl.arange(0, WAYS)
    tl.store(mass_ptr + at, tl.sum(acc, 0))
    if FIRST:
        tl.store(stat_ptr + (row * S + seg) * 2, seg_max)
        tl.store(stat_ptr + (row * S + seg) * 2 + 1, tl.sum(z, 0))
    if LAST:
        tl.store(count_ptr + at, tl.sum(ties, 0))
    if seg == 0:
        tl.store(bounds_ptr + row * 2, lo)
        tl.store(bounds_ptr + row * 2 + 1, hi)


@triton.jit
def _write_kernel(
    x_ptr, stride_x, out_ptr, stride_out, V, SEG, S, top_p_ptr, stat_ptr, bounds_ptr, mass_ptr, count_ptr,
    BLOCK: tl.constexpr, WAYS: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seg = tl.program_id(1)
    top, target = _row_target(stat_ptr, row, S, top_p_ptr, SP)
    part = _segment_masses(mass_ptr, stat_ptr, row, S, top, False, WAYS, SP)
    cuts, _, kstar = _narrow(bounds_ptr, part, row, target, WAYS)  # (the last pass's cuts hold every key left)
    j = tl.arange(0, WAYS)
    col = j[None, :] == tl.min(tl.where(cuts == kstar, j, WAYS), 0)  # the boundary's cut
    above = tl.sum(tl.sum(tl.where(col, part, 0.0), 1), 0)
    s = tl.arange(0, SP)
    tied = tl.load(count_ptr + (row * S + s[:, None]) * WAYS + j[None, :], mask=s[:, None] < S, other=0)
    tied = tl.sum(tl.where(col, tied, 0), 1)  # (SP,) tokens equal to the boundary, per segment
    seen = tl.sum(tl.where(s < seg, tied, 0), 0)  # in the segments before this one
    kstar = kstar.to(tl.int32)
    b = (kstar ^ ((kstar >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)  # the boundary logit
    # Tied token i (0, 1, ... by id) is kept while above + i · e_b < T; an e_b of 0 keeps them all.
    e_b = tl.exp(b - top)
    all_tied = tl.sum(tied, 0).to(tl.float32)
    keep_ties = tl.where(e_b > 0, tl.ceil((target - above) / tl.where(e_b > 0, e_b, 1.0)), all_tied)
    keep_ties = tl.maximum(tl.minimum(keep_ties, all_tied), 1.0).to(tl.int32)
    base = x_ptr + row.to(tl.int64) * stride_x
    obase = out_ptr + row.to(tl.int64) * stride_out
    for start in range(seg * SEG, seg * SEG + SEG, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < V
        x = tl.load(base + offs, mask=inside, other=float("-inf"))
        k = float_key(x.to(tl.float32))
        tie = (k == kstar) & inside
        rank = seen + tl.cumsum(tie.to(tl.int32), 0)
        keep = (k > kstar) | (tie & (rank <= keep_ties))
        tl.store(obase + offs, tl.where(keep, x, float("-inf")), mask=inside)
        seen += tl.sum(tie.to(tl.int32), 0)


#: Programs a launch aims at per SM (a row's segments fill the device however few the rows).
PROGRAMS_PER_SM = 8


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    """``PROGRAMS_PER_SM`` per SM on CUDA; 4 under Triton's interpreter on the CPU (a row of a few blocks in several
    segments, as the tests want)."""
    return PROGRAMS_PER_SM * _sm_count(device) if device.type == "cuda" else 4


def _segments(rows: int, vocab: int, block: int, device: torch.device) -> tuple[int, int]:
    """(segments per row, logits per segment): enough programs for the device, each a whole number of blocks."""
    blocks = triton.cdiv(vocab, block)
    segments = max(1, min(blocks, MAX_SEGMENTS, triton.cdiv(_programs_wanted(device), rows)))
    seg = triton.cdiv(blocks, segments) * block
    return triton.cdiv(vocab, seg), seg


def _ways(rows: int, vocab: int) -> tuple[int, int]:
    """(cuts a pass, logits a step) for ``rows`` rows of ``vocab`` logits."""
    return (WAYS_MANY_ROWS, BLOCK_MANY_ROWS) if rows * vocab >= MANY_LOGITS else (WAYS_FEW_ROWS, BLOCK_FEW_ROWS)


def passes(ways: int) -> int:
    """Passes of ``ways`` cuts that narrow the keys from (KEY_LO, KEY_HI] to one."""
    width, n = KEY_HI - KEY_LO, 0
    while width > 1:
        width, n = -(-width // (ways + 1)), n + 1
    return n


def top_p_filter_triton(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits (B, V) float32 / bf16 / fp16 -> (B, V) in their dtype, the dropped tokens -inf (see
    :func:`hybridlm.ops.top_p.top_p_filter`). No host synchronization, so a caller's CUDA graph can capture it; an
    eager call on CUDA of at most ``GRAPHED_LOGITS`` logits replays its launches from a graph of its own."""
    record("top_p", "triton")
    rows, vocab = logits.shape
    graphed = rows > 0 and 0 < triton.next_power_of_2(rows) * vocab <= GRAPHED_LOGITS
    if logits.is_cuda and graphed and not torch.cuda.is_current_stream_capturing():
        return _replay(logits, top_p)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch(logits, torch.full((), top_p, dtype=torch.float32, device=logits.device), out)
    return out


def _launch(logits: torch.Tensor, top_p: torch.Tensor, out: torch.Tensor) -> None:
    """The launches: ``out`` (B, V), contiguous, gets ``logits`` (B, V) filtered at ``top_p`` (a float32 scalar on
    their device)."""
    B, V = logits.shape
    if B == 0 or V == 0:
        return
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    ways, block = _ways(B, V)
    S, SEG = _segments(B, V, block, x.device)
    SP = triton.next_power_of_2(S)
    stat = torch.empty(B, S, 2, dtype=torch.float32, device=x.device)  # each segment's (max, sum of exp)
    bounds = torch.empty(2, B, 2, dtype=torch.int64, device=x.device)  # two buffers: a pass reads one, writes one
    mass = torch.empty(2, B, S, ways, dtype=torch.float32, device=x.device)
    count = torch.empty(B, S, ways, dtype=torch.int32, device=x.device)
    grid = (B, S)
    consts = dict(BLOCK=block, WAYS=ways, SP=SP, num_warps=NUM_WARPS)
    n = passes(ways)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        for i in range(n):
            _sweep_kernel[grid](
                x, x.stride(0), V, SEG, S, top_p, stat, bounds[(i - 1) % 2], mass[(i - 1) % 2], bounds[i % 2],
                mass[i % 2], count, FIRST=i == 0, SECOND=i == 1, LAST=i == n - 1, LO=KEY_LO, HI=KEY_HI, **consts,
            )  # fmt: skip
        last = (n - 1) % 2
        _write_kernel[grid](
            x, x.stride(0), out, out.stride(0), V, SEG, S, top_p, stat, bounds[last], mass[last], count, **consts
        )


#: Eager calls on CUDA with at most this many logits (8 rows of a 131k vocabulary) replay their launches from a
#: CUDA graph kept per (shape, dtype, device): a decode step of a few rows is bound by the host, where the launches
#: took 0.32 ms a call against 0.07 for a replay with its copies (one row on an H100, docs/benchmarks.md). A graph's
#: rows are the call's rounded up to a power of two (the rows beyond them are computed and dropped), so that a
#: continuous batch's groups of changing sizes meet a few shapes and do not capture again and again; the graphs'
#: buffers (two of that size each) are kept for the ``KEPT_GRAPHS`` latest shapes.
GRAPHED_LOGITS = 1 << 20
KEPT_GRAPHS = 4


class _Graphed:
    """The launches for one shape, captured over buffers of its own."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self.x = torch.zeros(shape, dtype=dtype, device=device)
        self.top_p = torch.ones((), dtype=torch.float32, device=device)
        self.out = torch.empty_like(self.x)
        _launch(self.x, self.top_p, self.out)  # (compiled outside the capture)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            _launch(self.x, self.top_p, self.out)

    def __call__(self, logits: torch.Tensor, top_p: float) -> torch.Tensor:
        """logits (B, V), B at most the graph's rows -> (B, V); the buffer's other rows hold an earlier call's."""
        self.x[: len(logits)].copy_(logits)
        self.top_p.fill_(top_p)
        self.graph.replay()
        return self.out[: len(logits)].clone()  # (the next call writes over the buffer)


_graphs: dict[tuple, _Graphed] = {}


def _replay(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    key = (torch.Size([triton.next_power_of_2(len(logits)), logits.shape[1]]), logits.dtype, logits.device)
    graphed = _graphs.pop(key, None)
    if graphed is None:
        with torch.cuda.device(logits.device):
            graphed = _Graphed(*key)
    _graphs[key] = graphed  # (the latest last)
    while len(_graphs) > KEPT_GRAPHS:
        del _graphs[next(iter(_graphs))]
    return graphed(logits, top_p)
