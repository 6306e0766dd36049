"""Batches too large for one launch grid run in row groups (``hybridlm.ops.grid``) with the results of one
launch: checked by lowering the limit, so that small batches split (Triton's interpreter on CPU, compiled
on GPU). The real limit is checked on the GPU in tests/ops/test_kernel_edges.py."""

import pytest
import torch

from hybridlm.ops import grid
from hybridlm.ops.conv import causal_conv1d
from hybridlm.ops.dispatch import use_kernels
from hybridlm.ops.gated_delta import gated_delta_rule_chunked
from hybridlm.ops.mamba2_core import Mamba2Weights, mamba2_core
from hybridlm.ops.ssd import ssd_chunked
from tests.helpers import assert_rel_close, runs_triton_kernels
from tests.ops.test_gated_delta import inputs as gdn_inputs
from tests.ops.test_mamba2_core import DEV, core_inputs, dims, documents
from tests.ops.test_ssd import inputs as ssd_inputs


def test_in_row_groups_concatenates_tensors_and_tuples_and_passes_none():
    x = torch.arange(10.0).reshape(5, 2)
    calls = []

    def fn(a, none):
        calls.append(a.shape[0])
        assert none is None
        return a * 2, a.sum(1)

    twice, sums = grid.in_row_groups(fn, 2, x, None)
    assert calls == [2, 2, 1] and torch.equal(twice, x * 2) and torch.equal(sums, x.sum(1))
    assert torch.equal(grid.in_row_groups(lambda a: a + 1, 5, x), x + 1)
    assert grid.rows_per_launch(64) == 65535 // 64 and grid.rows_per_launch(10**6) == 1


def split_and_whole(monkeypatch, limit, fn, leaves):
    """(outputs, gradients) of ``fn`` on copies of ``leaves``, with the grid limit at ``limit`` and as it is.

    The first run must split its batch into row groups and the second must not: a wrapper that never split
    compared one whole launch with another (the real limit is only reached on a GPU)."""
    from hybridlm.ops import conv_triton, gated_delta_triton, mamba2_core_triton, ssd_triton

    splits = []

    def spy(part, rows, *batched):
        splits.append(next(t for t in batched if t is not None).shape[0] > rows)
        return grid.in_row_groups(part, rows, *batched)

    for module in (conv_triton, gated_delta_triton, mamba2_core_triton, ssd_triton):
        monkeypatch.setattr(module, "in_row_groups", spy)
    results = []
    for patch in (limit, grid.MAX_GRID_YZ):
        monkeypatch.setattr(grid, "MAX_GRID_YZ", patch)
        splits.clear()
        copies = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        with use_kernels("triton"):
            out = fn(*copies)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        assert any(splits) == (patch == limit), f"grid limit {patch}: split into row groups {splits}"
        results.append(([o.detach() for o in outs], [t.grad for t in copies if t.requires_grad]))
    return results


def assert_same(results, what):
    (outs, grads), (outs_ref, grads_ref) = results
    for i, (a, b) in enumerate(zip(outs + grads, outs_ref + grads_ref, strict=True)):
        # Rows are computed alike; gradients of shared weights are summed over groups in another order.
        assert_rel_close(a, b, 1e-6, f"{what}: tensor {i}")


@runs_triton_kernels
def test_ssd_runs_a_large_batch_in_groups_of_rows(monkeypatch):
    x, dt, A, B, C, D = (t.to(DEV) for t in ssd_inputs(5, 19, 2, 4, 1, 3, seed=0))
    init = torch.randn(5, 2, 4, 3, device=DEV)
    seq = documents(5, 19)
    leaves = [x.requires_grad_(), dt.requires_grad_(), A.requires_grad_(), B.requires_grad_(), C, D, init]

    def fn(x, dt, A, B, C, D, init):
        return ssd_chunked(x, dt, A, B, C, 8, D=D, seq_idx=seq, initial_state=init, return_final_state=True)

    assert_same(split_and_whole(monkeypatch, 5, fn, leaves), "ssd")  # 2 rows of 2 heads per launch


@runs_triton_kernels
def test_gated_delta_runs_a_large_batch_in_groups_of_rows(monkeypatch):
    q, k, v, g, beta = (t.to(DEV).requires_grad_() for t in gdn_inputs(3, 21, 2, 4, 5, seed=0))
    init = torch.randn(3, 2, 4, 5, device=DEV, requires_grad=True)

    def fn(q, k, v, g, beta, init):
        return gated_delta_rule_chunked(
            q, k, v, g, beta, 16, seq_idx=documents(3, 21), initial_state=init, return_final_state=True
        )

    assert_same(split_and_whole(monkeypatch, 2, fn, [q, k, v, g, beta, init]), "gated delta")


@runs_triton_kernels
def test_gated_delta_refuses_more_chunks_than_a_grid_holds(monkeypatch):
    q, k, v, g, beta = (t.to(DEV) for t in gdn_inputs(1, 40, 2, 4, 5, seed=0))
    monkeypatch.setattr(grid, "MAX_GRID_YZ", 2)
    with use_kernels("triton"), pytest.raises(ValueError, match="3 chunks of 16, more than a launch grid holds"):
        gated_delta_rule_chunked(q, k, v, g, beta, 16)


@runs_triton_kernels
def test_conv_runs_a_large_batch_in_groups_of_rows(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 6, generator=gen).to(DEV).requires_grad_()
    w = torch.randn(6, 4, generator=gen).to(DEV).requires_grad_()
    b = torch.randn(6, generator=gen).to(DEV).requires_grad_()
    seq = documents(3, 11)

    def fn(x, w, b):
        return causal_conv1d(x, w, b, seq, "silu")

    assert_same(split_and_whole(monkeypatch, 2, fn, [x, w, b]), "conv")


@runs_triton_kernels
def test_mamba2_core_runs_a_large_batch_in_groups_of_rows(monkeypatch):
    leaves = core_inputs(3, 13, 2, 4, 1, 3)
    seq = documents(3, 13)

    def fn(zxbcdt, *weights):
        return mamba2_core(zxbcdt, Mamba2Weights(*weights), seq, dims(2, 4, 1, 3, 8))

    assert_same(split_and_whole(monkeypatch, 3, fn, leaves), "mamba2 core")  # 1 row of 2 heads per launch
