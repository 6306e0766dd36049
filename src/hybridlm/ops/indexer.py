"""The lightning indexer's two heavy steps (DeepSeek sparse attention, :mod:`hybridlm.layers.dsa`): its scores and
the top-k selection over them. The references, and the dispatch to the Triton kernels.

``index_scores``: ``I(t, s) = sum_j w_j(t) ReLU(q_j(t) · k(s))``. The reference forms the per-head products
(B, T, n, S) in float32 (a GiB per 64 heads, 4 rows and 256 queries of 4,096 keys, written and read twice), which
dominated a ``D`` layer's step on a GPU (docs/benchmarks.md). The kernel (:mod:`hybridlm.ops.indexer_triton`) sums
the heads in registers, tile by tile, and skips the key tiles after a causal diagonal; its backward (the indexer's
loss: the selection itself takes no gradient) computes the products again, tile by tile, rather than keep them.

``indexer_target``: the indexer loss's target, the main attention's probabilities over the valid keys summed over
its heads. The reference forms every head's logits (B, H, T, S) in float32; the kernels
(:mod:`hybridlm.ops.indexer_target_triton`) run two flash-attention-like passes (each head's log-sum-exp, then the
probabilities summed in registers) and keep nothing per head.

``select_topk``: the ``k`` allowed keys with the highest scores per query, ties to the earlier key. The reference
sorts each row (a stable sort); the kernel finds the k-th score by bisection on its bits and keeps the ties at it
by position, without sorting. Both give the same set exactly.
"""

from __future__ import annotations

import torch

from .dispatch import choose, triton_available
from .precision import accumulation_dtype

if triton_available():
    from .indexer_target_triton import indexer_target_triton
    from .indexer_triton import index_scores_triton, select_topk_triton


def index_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    diagonal: int | None = None,
    grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The indexer's scores of every query against every key.

    Args:
        q: (B, T, n, d) the index heads' queries, float32 (float64 in a float64 model).
        w: (B, T, n) the heads' weights, in ``q``'s dtype.
        k: (B, S, d) the keys (cast to ``q``'s dtype: a cache may keep them in another).
        diagonal: None, or the causal diagonal: query ``t`` sees no key ``s > t + diagonal``, and those scores are
            -inf (not computed by the kernel). The caller's mask must exclude them anyway.
        grad_dtype: the dtype the gradients of ``q`` and ``k`` go on in (that of the projections that made them;
            None: ``q``'s). Narrower than float32 (bf16, fp16), it lets the kernel's backward run its products into
            q and k in TF32 (``indexer_triton.PRODUCTS_16BIT``), which that dtype rounds more coarsely anyway. The
            reference ignores it.

    Returns:
        (B, T, S) in ``q``'s dtype, differentiable in q, w and k. The Triton kernels run on CUDA (op
        ``index_scores``), the reference elsewhere and for float64.
    """
    if choose("index_scores", q, w, k) == "triton":
        coarse = grad_dtype is not None and grad_dtype.itemsize < 4
        return index_scores_triton(q, w, k.to(q.dtype), diagonal, coarse)
    return index_scores_reference(q, w, k, diagonal)


def index_scores_reference(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, diagonal: int | None = None
) -> torch.Tensor:
    """:func:`index_scores` in plain torch, autocast off, in ``q``'s dtype: q (B, T, n, d), w (B, T, n), k (B, S, d)
    -> (B, T, S)."""
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.einsum("bths,bth->bts", torch.einsum("bthd,bsd->bths", q, k.to(q.dtype)).relu(), w)
    if diagonal is not None:
        T, S = scores.shape[1:]
        after = torch.ones(T, S, dtype=torch.bool, device=scores.device).triu(diagonal + 1)
        scores = scores.masked_fill(after, float("-inf"))
    return scores


def indexer_target(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float, diagonal: int | None = None
) -> torch.Tensor:
    """The indexer loss's target: ``p(t, s) = 1/H sum_h softmax_s(scale q_h(t) · k_h(s))`` over the ``valid`` keys.

    Args:
        q: (B, T, H, D) the main attention's queries.
        k: (B, S, H, D) its keys (in another dtype than ``q``'s, both are read as float32).
        valid: (B|1, T, S) bool, the keys each query's distribution ranges over (at least one a query: a row without
            any is NaN in the reference, zero in the kernel).
        scale: the logits' scale (the attention's softmax scale).
        diagonal: None, or a causal diagonal ``valid`` keeps to (no key ``s > t + diagonal``), which the kernels then
            skip.

    Returns:
        (B, T, S) float32 (float64 for float64 inputs), zero at keys not valid; a constant (no gradient). The Triton
        kernels run on CUDA (op ``index_target``), the reference elsewhere and for float64.
    """
    with torch.no_grad():
        if choose("index_target", q, k, valid) == "triton":
            if q.dtype != k.dtype:  # (the kernels take one dtype: both in float32, as the reference computes them)
                q, k = q.float(), k.float()
            return indexer_target_triton(q, k, valid, scale, diagonal)
        return indexer_target_reference(q, k, valid, scale)


def indexer_target_reference(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`indexer_target` in plain torch, autocast off: every head's logits (B, H, T, S) in float32 (float64 for
    float64 inputs), softmax over the valid keys, summed over the heads and normalized."""
    acc = accumulation_dtype(q, k)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        logits = torch.einsum("bthd,bshd->bhts", q.to(acc), k.to(acc)) * scale
        probs = logits.masked_fill(~valid.unsqueeze(1), float("-inf")).softmax(dim=-1).sum(1)
        return probs / probs.sum(dim=-1, keepdim=True)


def select_topk(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` allowed keys with the highest scores per query (all of them when fewer are allowed).

    Args:
        scores: (B, T, S) float, no NaN.
        allowed: (B|1, T, S) bool.
        k: keys to keep per query (> 0).

    Returns:
        (B, T, S) bool. Ties go to the earlier key, so training and decoding (which see different key ranges)
        choose alike. The Triton kernel runs on CUDA (op ``index_topk``), the reference elsewhere.
    """
    if choose("index_topk", scores, allowed) == "triton":
        return select_topk_triton(scores, allowed, k)
    return select_topk_reference(scores, allowed, k)


def select_topk_reference(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`select_topk` by a stable sort of each row: scores (B, T, S), allowed (B|1, T, S) -> (B, T, S) bool."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : min(k, scores.shape[-1])]
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, True) & allowed
