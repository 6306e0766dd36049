"""A mixture of experts' token permutation: token rows to (token, expert) pairs grouped by expert, and back.

With ``T`` tokens, ``k`` experts each and ``N = T * k`` pairs, pair ``p = t * k + j`` is token ``t``'s ``j``-th choice.
``order`` (N,) lists the pairs grouped by expert (a stable argsort of the chosen experts): grouped row ``i`` is pair
``order[i]``.

- :func:`permute_tokens`: ``rows[i] = x[order[i] // k]``, each token copied once per choice.
- :func:`unpermute_tokens`: ``y[t] = sum_j weights[t, j] * rows[i(t, j)]`` with ``order[i(t, j)] = t * k + j``, summed
  over ``j`` in order.

``x[order // k]`` and ``index_add_`` would scatter-add instead (the combine, and autograd's backward of the gather),
with atomic adds on CUDA, where torch lists ``index_add_`` among its nondeterministic ops: a token's ``k``
contributions then sum in whatever order the atomics land, and the same step can give other bits from run to run (a
resume, a recomputation under activation checkpointing, an A/B comparison). Here the grouped rows are put back in
pair order first, by ``index_copy_`` (``order`` is a permutation: each row is written once, no atomics), and each
token's sum then runs over its own ``k`` rows in the order ``j`` = 0..k-1, on every device and at every batch size.
The backward of each is the other's move: rows put in pair order and summed for the gather, a gather for the sum. ``unpermute_tokens`` saves ``rows`` for the weights'
gradient, as the former product did; ``permute_tokens`` saves only ``order``. Sums and products run in float32
(float64 for a float64 model) whatever the rows' dtype.
"""

from __future__ import annotations

import torch

from .precision import accumulation_dtype


def in_pair_order(rows: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """(N, H) rows grouped by expert -> (T, top_k, H), token t's j-th choice at [t, j]: each row written once."""
    # new_empty, not empty_like: contiguous whatever the strides of rows (a gradient may come strided).
    return rows.new_empty(rows.shape).index_copy_(0, order, rows).view(-1, top_k, rows.shape[-1])


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, top_k: int, dtype: torch.dtype):
        ctx.save_for_backward(order)
        ctx.top_k, ctx.x_dtype = top_k, x.dtype
        # Cast before the gather: T rows converted, not T * k.
        return x.to(dtype)[order // top_k]

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        acc = accumulation_dtype(grad, ctx.x_dtype)
        grad_x = in_pair_order(grad, order, ctx.top_k).sum(1, dtype=acc)
        return grad_x.to(ctx.x_dtype), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weights, order, out_dtype: torch.dtype):
        ctx.save_for_backward(rows, weights, order)
        acc = accumulation_dtype(rows, weights)
        pairs = in_pair_order(rows, order, weights.shape[1]).to(acc)
        return (pairs * weights.to(acc).unsqueeze(-1)).sum(1).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        rows, weights, order = ctx.saved_tensors
        k = weights.shape[1]
        acc = accumulation_dtype(rows, weights)
        grad = grad.to(acc)
        grad_rows = grad_weights = None
        if ctx.needs_input_grad[0]:  # grouped row i is pair order[i]: token order[i] // k, weight order[i]
            w = weights.reshape(-1)[order].to(acc)
            grad_rows = (grad[order // k] * w.unsqueeze(-1)).to(rows.dtype)
        if ctx.needs_input_grad[1]:
            pairs = in_pair_order(rows, order, k).to(acc)
            grad_weights = (pairs * grad.unsqueeze(1)).sum(-1).to(weights.dtype)
        return grad_rows, grad_weights, None, None


def permute_tokens(x: torch.Tensor, order: torch.Tensor, top_k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Copy each token's row once per chosen expert, grouped by expert.

    Args:
        x: (T, H) token rows.
        order: (N,) = (T * top_k,) pairs grouped by expert.
        dtype: the rows' dtype (the experts' matmul dtype; default ``x``'s). The gradient returns in ``x``'s dtype,
            each token's ``top_k`` parts summed in float32 (float64).

    Returns:
        (N, H): row ``i`` is token ``order[i] // top_k``.
    """
    return _Permute.apply(x, order, top_k, x.dtype if dtype is None else dtype)


def unpermute_tokens(
    rows: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Sum each token's expert outputs, weighted: the inverse of :func:`permute_tokens`.

    Args:
        rows: (N, H) expert outputs, grouped as :func:`permute_tokens` returned them.
        weights: (T, k) each token's expert weights, in its choice order.
        order: as for :func:`permute_tokens`.
        dtype: the output's dtype (default ``rows``'); products and sums run in float32 (float64).

    Returns:
        (T, H): ``y[t] = sum_j weights[t, j] * rows[i]`` where ``order[i] = t * k + j``.
    """
    return _Unpermute.apply(rows, weights, order, rows.dtype if dtype is None else dtype)
