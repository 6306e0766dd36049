"""Triton kernel for one chunk of the head's cross entropy: loss per row and, in place, d loss / d logits.

:func:`hybridlm.ops.cross_entropy.linear_cross_entropy` computes the logits of a chunk of tokens
with one GEMM; the torch reference then upcasts them to float32 and runs log-sum-exp, subtract,
exp, the one-hot subtraction, the mask and the cast back as separate passes (at 4 × 4096 tokens
and a 131k vocabulary, 4 chunks of 4096 × 131072: about 40 ms of an H200's step). This kernel
reads each row of logits twice in their own dtype (an online max / sum-exp, then the gradient)
and writes the gradient over the logits:

    lse      = log sum_v exp(l_v)                    (float32)
    loss     = lse - l_target                        (0 on ignored rows)
    grad_v   = exp(l_v - lse) - [v = target]         (0 on ignored rows), rounded to the logits' dtype

The same float32 math as the reference, so the two differ by the order of the sum-exp only.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .dispatch import record

#: Columns per step of the loop over the vocabulary, and warps per row. Not tuned: on the H200 the
#: 4 chunks of a 4 × 4096 step (two reads and one write of 1 GiB of bf16 logits each) take 3.3 ms,
#: 3.9 TB/s, against 4.25 TB/s for a plain device copy.
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _ce_rows_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    loss_ptr,
    V,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: loss of the row, and (WRITE_GRAD) its logits replaced by their gradient."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # A label outside [0, V) is not read: its row's loss is NaN (as a visible failure, with no host
    # sync to raise from), where the torch path's gather raises.
    in_range = (label >= 0) & (label < V)
    target = tl.where(valid & in_range, label, 0)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every logit so far is -inf (a masked block), subtract 0, not -inf: inf - inf is NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
    lse = m + tl.log(s)
    picked = tl.load(base + target).to(tl.float32)  # read before the loop below overwrites the row
    picked = tl.where(in_range | ~valid, picked, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(offs == target, g - 1.0, g)
            g = tl.where(valid, g, 0.0)
            tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=offs < V)


def cross_entropy_rows_triton(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool
) -> torch.Tensor:
    """Loss per row (n,) float32 of ``logits`` (n, V) against ``labels`` (n,); with ``write_grad`` the
    logits are overwritten by ``softmax - onehot`` (zero rows where the label is ``ignore_index``).
    A label outside [0, V) gives a NaN loss for its row."""
    n, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_rows_triton: the logits' last dim must be contiguous")
    record("cross_entropy", "triton")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        labels = labels.contiguous()
        with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
            _ce_rows_kernel[(n,)](
                logits, logits.stride(0), labels, loss, V, ignore_index,
                WRITE_GRAD=write_grad, BLOCK_V=min(BLOCK_V, triton.next_power_of_2(V)), num_warps=NUM_WARPS,
            )  # fmt: skip
    return loss
