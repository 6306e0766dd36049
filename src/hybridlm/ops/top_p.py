"""Top-p (nucleus) filtering of a batch of logits: the reference, and the dispatch to the Triton kernel.

Top-p keeps the smallest set of the most likely tokens whose probabilities reach ``top_p``: in the order of
decreasing logits, a token is kept while the tokens before it hold less than ``top_p`` of the mass (the first one
always). Among equal logits the lower id comes first, so the kept set is one set, the same on every device: bf16
logits tie often (8 bits of mantissa), and a sort that is not stable keeps whichever of the tied tokens it met first.

The reference sorts each row (a stable sort), which on a GPU is the expensive part of a sampled decode step: 1.17 ms
of device time at 64 rows of a 131k vocabulary on an H100, against a 3.7 ms greedy step of bench-1.3b
(docs/benchmarks.md). The Triton kernel (:mod:`hybridlm.ops.top_p_triton`) finds the same set without sorting: it
searches for the boundary logit by its bits, summing the mass above a few candidate boundaries per pass over the row,
then keeps the boundary's tied tokens by id. The two differ only where the mass before a token is within float32
rounding of ``top_p``.
"""

from __future__ import annotations

import torch

from .dispatch import choose, triton_available

if triton_available():
    from .top_p_triton import top_p_filter_triton


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits: (B, V) -> (B, V), the same dtype: the logits of the tokens top-p drops replaced by -inf.

    ``top_p`` is a float in (0, 1]; the logits may hold -inf (tokens already dropped), not NaN nor +inf. The Triton
    kernel runs on CUDA (the op ``top_p`` of :mod:`~hybridlm.ops.dispatch`), the reference elsewhere and for float64
    logits."""
    if logits.dim() != 2:
        raise ValueError(f"top_p_filter: logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if choose("top_p", logits) == "triton":
        return top_p_filter_triton(logits, float(top_p))
    return top_p_filter_reference(logits, top_p)


def top_p_filter_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """:func:`top_p_filter` by a stable sort of each row, in the logits' dtype (float32 or float64 as the sampler
    gives them): logits (B, V) -> (B, V)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the tokens before it already reach top_p (the first is always kept).
    drop_sorted = probs.cumsum(-1) - probs >= top_p
    drop_sorted[:, :1] = False  # (a top_p of 1e-300 is 0 in float32, which the first token's 0 reaches)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
