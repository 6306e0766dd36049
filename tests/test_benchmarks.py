"""The statistics and profile arithmetic of benchmarks/train_step.py (pure functions; the GPU runs are not tested here)."""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def ts():
    spec = importlib.util.spec_from_file_location("train_step_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_median_interval_ranks(ts):
    # Binomial(24, 1/2): P(X <= 6) = 0.011 <= 0.025 < P(X <= 7) = 0.032, so the 7th and 18th values.
    assert ts.median_interval(list(range(24))) == (6, 17)
    assert ts.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few values: the whole range


def test_intervals_cover_the_true_centre(ts):
    rng = random.Random(0)
    trials, n = 2000, 24
    hits_median = hits_mean = 0
    for _ in range(trials):
        xs = [rng.gauss(1.0, 0.01) for _ in range(n)]
        lo, hi = ts.median_interval(xs)
        hits_median += lo <= 1.0 <= hi
        _, mlo, mhi = ts.mean_interval(xs)
        hits_mean += mlo <= 1.0 <= mhi
    assert hits_median / trials >= 0.95  # exact order statistics: at least the nominal coverage
    assert 0.92 <= hits_mean / trials <= 0.97  # normal approximation with n = 24: close to 95 %


def test_mean_interval_values(ts):
    xs = [1.0, 2.0, 3.0, 4.0]
    mean, lo, hi = ts.mean_interval(xs)
    half = 1.959964 * statistics.stdev(xs) / 2
    assert mean == 2.5 and math.isclose(lo, 2.5 - half, rel_tol=1e-6) and math.isclose(hi, 2.5 + half, rel_tol=1e-6)


def test_gpu_idle_attributes_gaps_to_the_host_op(ts):
    kernels = [(0.0, 10.0, "a"), (12.0, 20.0, "b"), (15.0, 30.0, "c"), (100.0, 110.0, "d")]
    host = [(25.0, 120.0, "aten::item"), (40.0, 90.0, "aten::copy_")]
    idle, gaps = ts.gpu_idle(kernels, host)
    # a->b: 2 µs, a launch gap; c covers b, so the next gap runs from 30 to 100 (midpoint 65: both host ops
    # run, the shorter one is named).
    assert idle == 72.0
    assert gaps == [(2.0, 10.0, "a", "b", "(launch)"), (70.0, 30.0, "c", "d", "aten::copy_")]
    assert ts.gpu_idle([(0.0, 1.0, "a"), (50.0, 51.0, "b")], [])[1][0][4] == "(Python)"


def test_warnings_by_site_counts_each_call_site(ts):
    import warnings

    def sync_like():
        warnings.warn("called a synchronizing CUDA operation\nsecond line", UserWarning, stacklevel=1)

    with ts.warnings_by_site() as sites:
        for _ in range(3):
            sync_like()
        warnings.warn("another", stacklevel=1)
    assert sum(sites.values()) == 4
    (first, n), (second, m) = sorted(sites.items(), key=lambda kv: -kv[1])
    assert n == 3 and first[0] == "called a synchronizing CUDA operation"
    assert first[1].startswith("test_benchmarks.py:") and "sync_like" in first[1]
    assert m == 1 and second[0] == "another"
    with warnings.catch_warnings(record=True) as after:  # the handler is gone again
        warnings.simplefilter("always")
        warnings.warn("outside", stacklevel=1)
    assert len(after) == 1 and sum(sites.values()) == 4
