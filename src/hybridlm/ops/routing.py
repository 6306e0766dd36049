"""A mixture of experts' top-k routing: from router logits to each token's experts and their weights.

``route`` is the reference (the MoE layer's routing, group-limited selection included). On CUDA, when no gradient is
wanted (decoding, evaluation) and outside ``torch.compile``, one Triton kernel (:mod:`hybridlm.ops.routing_triton`,
op ``moe_route``) does a token's score function, bias, top-k, gather, normalization and scaling, where the torch ops
launch nine kernels per MoE layer (three of them ``topk``'s sort). Training keeps the reference: the weights'
gradient flows through ``scores``.
"""

from __future__ import annotations

import torch

from .dispatch import choose_eager, record, triton_available, wants_grad

if triton_available():
    from .routing_triton import route_triton


def route(
    logits: torch.Tensor,
    top_k: int,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    norm_topk_prob: bool = True,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route each token to ``top_k`` experts.

    ``scores = softmax(logits)`` or ``sigmoid(logits)``; the experts chosen are the top ``top_k`` of ``scores + bias``
    (the bias steers selection only), among the ``topk_groups`` groups whose best two such scores sum highest when
    ``num_groups`` > 1; their weights are ``scores`` there, divided by their sum where ``norm_topk_prob``, times
    ``scaling``.

    Args:
        logits: (T, E) router logits, in the dtype routing computes in (float32; float64 in a float64 model).
        bias: (E,) or None.

    Returns:
        ``(scores (T, E), weights (T, top_k), indices (T, top_k) int64)``, scores and weights in ``logits``' dtype.
    """
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"route: score must be 'softmax' or 'sigmoid', got {score!r}")
    T, E = logits.shape
    if not 1 <= top_k <= E or (bias is not None and bias.shape != (E,)):
        raise ValueError(
            f"route: top_k {top_k} of {E} experts, bias {None if bias is None else tuple(bias.shape)}: need "
            f"1 <= top_k <= E and a bias of ({E},)"
        )
    if num_groups == 1:
        if wants_grad(logits):
            record("moe_route", "torch")
        elif choose_eager("moe_route", logits, bias) == "triton":
            return route_triton(logits, top_k, score == "softmax", bias, norm_topk_prob, scaling)
    scores = logits.softmax(dim=-1) if score == "softmax" else logits.sigmoid()
    choice = scores.detach()
    if bias is not None:
        choice = choice + bias.to(choice.dtype)
    if num_groups > 1:
        G = num_groups
        per_group = choice.view(T, G, E // G)
        group_score = per_group.topk(min(2, E // G), dim=-1).values.sum(dim=-1)  # (T, G)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_groups, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    idx = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, weights * scaling, idx
