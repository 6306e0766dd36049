"""Where to cut a sequence of blocks into contiguous segments.

Blocks are atomic (a fused group is one block), so the only cut points are block boundaries.
The first segment also pays ``first_extra`` (the embedding) and the last ``last_extra`` (head and
MTP depths). Cuts are given as the block index each segment after the first starts at.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def segment_costs(
    costs: Sequence[float], cuts: Sequence[int], first_extra: float = 0.0, last_extra: float = 0.0
) -> list[float]:
    """Cost of each segment: the sum of its blocks, plus the extras on the first and last."""
    bounds = [0, *cuts, len(costs)]
    out = [float(sum(costs[a:b])) for a, b in itertools.pairwise(bounds)]
    out[0] += first_extra
    out[-1] += last_extra
    return out


def _check(n: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"the number of segments must be at least 1, got {k}")
    if n < k:
        raise ValueError(f"cannot cut {n} blocks into {k} non-empty segments: use at most {n} stages")


def balanced_cuts(costs: Sequence[float], k: int, first_extra: float = 0.0, last_extra: float = 0.0) -> tuple[int, ...]:
    """The ``k - 1`` cuts into ``k`` non-empty segments that minimize the largest segment cost.

    Exact dynamic programming, O(k n^2). Among the optimal cuts it returns the ones with the
    smallest sum of squared segment costs (a second exact pass restricted to segments no
    costlier than the optimum), so the stages that do not set the pace are balanced as well.

    Args:
        costs: one non-negative number per block, in block order.
        k: number of segments (pipeline stages times virtual stages).
        first_extra, last_extra: cost only the first / last segment pays.
    """
    n = len(costs)
    _check(n, k)
    # Every segment's cost computed once, with the additions in the order segment_costs makes them
    # (a running sum from the segment's first block: numpy's accumulate adds in order), so both
    # passes and any caller comparing layouts see the same floats. (Prefix-sum differences round
    # differently; the tolerance that papered over it let a costlier slowest stage through.)
    # table[i, j]: the cost of blocks [i, j). Each pass is vectorized over i: n = 4,000 blocks
    # took 102 s in pure Python.
    values = np.asarray(costs, dtype=np.float64)
    table = np.zeros((n + 1, n + 1))
    for i in range(n):
        table[i, i + 1 :] = np.add.accumulate(values[i:])
        if i == 0:
            table[i, 1:] += first_extra
    table[:n, n] += last_extra

    inf = float("inf")
    # worst[s, j]: smallest possible largest cost when blocks [0, j) form s segments.
    worst = np.full((k + 1, n + 1), inf)
    worst[0, 0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            worst[s, j] = np.maximum(worst[s - 1, s - 1 : j], table[s - 1 : j, j]).min()
    limit = worst[k, n]

    # Second pass: least sum of squares among segmentations whose segments all stay within `limit`;
    # among equal sums the earliest cut (argmin's first minimum), as a loop keeping strict improvements.
    square = np.full((k + 1, n + 1), inf)
    came = np.full((k + 1, n + 1), -1, dtype=np.int64)
    square[0, 0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            c = table[s - 1 : j, j]
            total = np.where(c <= limit, square[s - 1, s - 1 : j] + c * c, inf)
            best = int(total.argmin())
            if total[best] < inf:
                square[s, j], came[s, j] = total[best], s - 1 + best
    cuts, j = [], n
    for s in range(k, 0, -1):
        j = int(came[s, j])
        cuts.append(j)
    return tuple(reversed(cuts[:-1]))


def brute_force_cuts(
    costs: Sequence[float], k: int, first_extra: float = 0.0, last_extra: float = 0.0
) -> tuple[int, ...]:
    """Every way to cut, tried one by one: the reference :func:`balanced_cuts` is tested against."""
    n = len(costs)
    _check(n, k)
    best, best_cuts = None, ()
    for cuts in itertools.combinations(range(1, n), k - 1):
        segs = segment_costs(costs, cuts, first_extra, last_extra)
        key = (max(segs), sum(c * c for c in segs))
        if best is None or key < best:
            best, best_cuts = key, cuts
    return best_cuts


def even_cuts(n: int, k: int) -> tuple[int, ...]:
    """Megatron's legacy split by block count: ``n / k`` blocks per segment.

    When ``k`` does not divide ``n`` (Megatron refuses), segment ``i`` starts at ``round(i n / k)``.
    """
    _check(n, k)
    return tuple((i * n + k // 2) // k for i in range(1, k))
