"""Triton kernel of :func:`hybridlm.ops.routing.route` for inference: one program per token does the score
function, the bias, the top-k, the gather, the normalization and the scaling (forward only).

Top-k by repeated maxima: k passes over the token's E choice scores held in registers, each taking the largest (the
lowest id among equal ones) and masking it out, so that k (at most a few dozen) costs k reductions over E (at most a
few thousand), not a sort. Precision: float32 throughout (the router's own dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: The most experts a row may hold in registers (one program per token).
MAX_EXPERTS = 4096


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    scores_ptr,
    weights_ptr,
    idx_ptr,
    E,
    s_row,
    scaling,
    K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    x = tl.load(logits_ptr + t * s_row + e, mask=ok, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        p = tl.exp(x - tl.max(x, axis=0))
        scores = p / tl.sum(p, axis=0)
    else:
        scores = tl.sigmoid(x)
    tl.store(scores_ptr + t * E + e, scores, mask=ok)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e, mask=ok, other=0.0).to(tl.float32)
    # NaN would never equal the maximum: taken as -inf here, so that a damaged row still names K experts in range
    # (its weights are NaN, and the model's logits show it).
    choice = tl.where(ok & (choice == choice), choice, float("-inf"))
    kk = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(choice, axis=0)
        pick = tl.min(tl.where(choice == best, e, BLOCK_E), axis=0)  # the lowest id among equal maxima
        pick = tl.minimum(pick, E - 1)  # (every choice -inf: a NaN row; still an expert that exists)
        w = tl.sum(tl.where(e == pick, scores, 0.0), axis=0)
        ids = tl.where(kk == j, pick.to(tl.int64), ids)
        weights = tl.where(kk == j, w, weights)
        choice = tl.where(e == pick, float("-inf"), choice)
    if NORM:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    tl.store(weights_ptr + t * K + kk, weights * scaling, mask=kk < K)
    tl.store(idx_ptr + t * K + kk, ids, mask=kk < K)


def route_triton(
    logits: torch.Tensor, top_k: int, softmax: bool, bias: torch.Tensor | None, norm_topk_prob: bool, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`hybridlm.ops.routing.route` without expert groups.

    Args:
        logits: (T, E) float32, last dim contiguous; bias: (E,) or None.

    Returns:
        ``(scores (T, E), weights (T, top_k), indices (T, top_k) int64)``, scores and weights float32.
    """
    T, E = logits.shape
    if logits.dtype != torch.float32 or E > MAX_EXPERTS:
        raise ValueError(f"moe_route: the kernel routes float32 logits of at most {MAX_EXPERTS} experts, got {E} "
                         f"{logits.dtype}")  # fmt: skip
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    scores = torch.empty(T, E, dtype=torch.float32, device=logits.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        block_e = triton.next_power_of_2(E)
        _route_kernel[(T,)](
            logits, logits if bias is None else bias.to(torch.float32).contiguous(), scores, weights, idx,
            E, logits.stride(0), float(scaling),
            K=top_k, SOFTMAX=softmax, HAS_BIAS=bias is not None, NORM=norm_topk_prob,
            BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), num_warps=4 if block_e <= 1024 else 8,
        )  # fmt: skip
    return scores, weights, idx
