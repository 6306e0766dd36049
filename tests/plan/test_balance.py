"""The dynamic program over block boundaries against brute force, and the even split against Megatron's."""

import math
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hybridlm.pattern import parse
from hybridlm.plan.balance import balanced_cuts, brute_force_cuts, even_cuts, segment_costs


def _key(costs, cuts, first, last):
    segs = segment_costs(costs, cuts, first, last)
    return max(segs), sum(c * c for c in segs)


def _check_cuts(cuts, n, k):
    assert len(cuts) == k - 1
    assert list(cuts) == sorted(set(cuts))
    assert all(0 < c < n for c in cuts)  # every segment non-empty


@settings(max_examples=300, deadline=None)
# A tiny cost beside a large one: a rounding tolerance once let a slowest stage 1e-8 costlier through.
@example([1e-08, 9.0, 1.0, 0.0], 3, 0.0, 1.0)
@example([1e-08, 11.0, 1.0, 0.0], 3, 0.0, 1.0)
@given(
    st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=9),
    st.integers(1, 6),
    st.floats(0.0, 200.0),
    st.floats(0.0, 200.0),
)
def test_dp_equals_brute_force(costs, k, first, last):
    k = min(k, len(costs))
    dp, bf = balanced_cuts(costs, k, first, last), brute_force_cuts(costs, k, first, last)
    _check_cuts(dp, len(costs), k)
    (dp_max, dp_sq), (bf_max, bf_sq) = _key(costs, dp, first, last), _key(costs, bf, first, last)
    assert math.isclose(dp_max, bf_max, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(dp_sq, bf_sq, rel_tol=1e-6, abs_tol=1e-9)


def test_dp_equals_brute_force_with_ties():
    # Small integer costs make many layouts tie on the slowest stage: the second pass must still
    # find the least sum of squares among them.
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 10)
        costs = [rng.randint(0, 4) for _ in range(n)]
        k = rng.randint(1, n)
        first, last = rng.choice([0, 1, 3]), rng.choice([0, 2, 5])
        dp = balanced_cuts(costs, k, first, last)
        _check_cuts(dp, n, k)
        assert _key(costs, dp, first, last) == _key(costs, brute_force_cuts(costs, k, first, last), first, last)


def test_heavy_ends_get_fewer_blocks():
    # Ten equal blocks, a head worth four blocks on the last stage: 5 + 5 would be 5 vs 9.
    assert balanced_cuts([1.0] * 10, 2, 0.0, 4.0) == (7,)
    assert balanced_cuts([1.0] * 10, 2, 4.0, 0.0) == (3,)


@pytest.mark.parametrize(
    "pattern, k",
    [("M-M-M*-M-M-M*-", 2), ("M-M-M*-M-M-M*-", 7), ("MEMEM*EMEM*E", 4), ("[*-]M[ME]M-G*E", 4)],
)
def test_even_cuts_are_megatrons_legacy_split(pattern, k):
    p = parse(pattern)
    starts = [p.stage(r, k).block_offset for r in range(1, k)]
    assert list(even_cuts(p.num_blocks, k)) == starts


def test_even_cuts_when_not_divisible():
    assert even_cuts(10, 4) == (3, 5, 8)  # round(i * 10 / 4)
    assert even_cuts(52, 8) == (7, 13, 20, 26, 33, 39, 46)


def test_too_many_segments():
    with pytest.raises(ValueError, match="cannot cut 3 blocks into 4"):
        balanced_cuts([1, 2, 3], 4)
    with pytest.raises(ValueError, match="at least 1"):
        even_cuts(3, 0)
