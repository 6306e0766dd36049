"""Output head + cross entropy without the float32 logits of the whole batch.

With a 131k vocabulary, float32 logits of 4 × 4096 tokens take 8 GiB, their softmax gradient as
much again. :func:`linear_cross_entropy` runs the head over chunks of tokens instead: per chunk it
computes the logits (in the matmul dtype, e.g. bf16 under autocast), their float32 log-sum-exp and
the loss, and — when gradients are needed — the gradient of the logits, which it immediately
turns into the chunk's ``dh`` and its share of ``dW`` (accumulated in float32). The logits never
exist for more than one chunk, and the backward pass only scales the stored ``dh`` / ``dW``.
This is the "fused linear cross entropy" of liger-kernel and others, written with plain matmuls.

On CUDA (and outside ``torch.compile``) one Triton kernel per chunk
(:mod:`hybridlm.ops.cross_entropy_triton`) does the log-sum-exp, the loss and the gradient of the
logits in the logits' own dtype, writing the gradient over them; the torch code here is the
reference (and the CPU path): it upcasts each chunk's logits to float32 and makes one pass per op.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .dispatch import choose_eager, triton_available, wants_grad
from .grid import check_positive_int
from .precision import accumulation_dtype, matmul_dtype

if triton_available():
    from .cross_entropy_triton import cross_entropy_rows_triton

IGNORE_INDEX = -100

#: Tokens per chunk: 4096 × 131072 logits = 2 GiB at a time in float32 (the torch path), 1 GiB in bf16 (the kernel).
DEFAULT_CHUNK = 4096

#: torch has ``addmm(..., out_dtype=)`` (CUDA: bf16 / fp16 operands, a float32 result and addend).
_ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc = a @ b`` (``first``) or ``acc += a @ b``; ``acc`` (m, n) in the accumulation dtype, ``a``
    (m, k) and ``b`` (k, n) in the matmul dtype.

    On CUDA with a lower-precision matmul dtype, one GEMM accumulates into ``acc`` in float32
    (cuBLAS's epilogue adds the addend): at the head's shape (131072 × 2048) that spares writing
    the chunk's product in bf16 and a separate add over the float32 sum, about 1 ms of an H200 per
    chunk, and the product is no longer rounded to bf16 before it is summed. Elsewhere the
    product in the matmul dtype is added (``acc`` starts at zero)."""
    if _ADDMM_OUT_DTYPE and acc.is_cuda and acc.dtype != a.dtype:
        # beta = 0 on the first chunk: the uninitialized sum is not read (nor its NaNs propagated).
        torch.addmm(acc, a, b, beta=0 if first else 1, out_dtype=acc.dtype, out=acc)
    else:
        if first:
            acc.zero_()
        acc.add_(a @ b)


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss over valid labels, float32 softmax) of one chunk; ``logits`` float32 (n, V)."""
    valid = labels != IGNORE_INDEX
    target = labels.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    return loss, lse


def _chunk_loss_and_grad(
    logits: torch.Tensor, labels: torch.Tensor, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss in ``acc``, d(summed loss)/d logits in the logits' dtype) of one chunk.

    ``logits`` (n, V) in the matmul dtype; the Triton path overwrites them with the gradient.
    """
    if choose_eager("cross_entropy", logits) == "triton":
        rows = cross_entropy_rows_triton(logits, labels, IGNORE_INDEX, write_grad=True)
        return rows.sum().to(acc), logits
    dtype = logits.dtype
    logits = logits.to(acc)
    loss, lse = _chunk_loss(logits, labels)
    # d(sum loss)/d logits = softmax - onehot on valid rows, 0 on ignored ones.
    grad = logits.sub_(lse.unsqueeze(1)).exp_()  # in place: one chunk of float32 logits at a time
    valid = labels != IGNORE_INDEX
    grad[torch.arange(grad.shape[0], device=grad.device), labels.clamp(min=0)] -= 1.0
    grad *= valid.unsqueeze(1)
    return loss, grad.to(dtype)


def _chunk_loss_only(logits: torch.Tensor, labels: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Summed loss of one chunk (no gradient), in ``acc``."""
    if choose_eager("cross_entropy", logits) == "triton":
        return cross_entropy_rows_triton(logits, labels, IGNORE_INDEX, write_grad=False).sum().to(acc)
    return _chunk_loss(logits.to(acc), labels)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk, dtype):
        n = h.shape[0]
        acc = accumulation_dtype(dtype)
        w = weight.to(dtype)
        hc = h.to(dtype)
        # Only the gradients asked for: a frozen head (train.trainable) needs no (V, H) float32 dW, whose product
        # is a third of the loss's FLOPs; a head trained on frozen layers' output needs no dh.
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.empty_like(hc) if need_h else None
        dw = torch.empty(weight.shape, dtype=acc, device=weight.device) if need_w else None
        if n == 0 and need_w:
            dw.zero_()
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, n, chunk):
            x, y = hc[s : s + chunk], labels[s : s + chunk]
            loss, grad = _chunk_loss_and_grad(x @ w.T, y, acc)
            total += loss
            if need_h:
                torch.mm(grad, w, out=dh[s : s + chunk])
            if need_w:
                _accumulate_product(dw, grad.T, x, first=s == 0)
            # Freed before the next chunk's logits are made, not when they replace it: two chunks at once were
            # 1 GiB more at bench-1.3b's peak (4,096 × 131,072 bf16 logits each; docs/benchmarks.md).
            del grad
        ctx.save_for_backward(dh, dw)
        ctx.h_dtype, ctx.w_dtype, ctx.acc = h.dtype, weight.dtype, acc
        return total

    @staticmethod
    @once_differentiable  # the backward only scales what the forward stored: a second derivative would be wrong
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors  # (None where the forward was not asked for it)
        g = grad_total.to(ctx.acc)
        grad_h = None if dh is None else (dh.to(ctx.acc) * g).to(ctx.h_dtype)
        return grad_h, None if dw is None else (dw * g).to(ctx.w_dtype), None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Mean cross entropy of ``h @ weight.T`` against ``labels`` (-100 ignored; 0 when none are valid).

    Equals ``cross_entropy((h @ weight.T).float(), labels)`` up to the matmul's rounding, in
    O(chunk × V) memory instead of O(N × V).

    Args:
        h: (..., H) normed hidden states.
        weight: (V, H) output head (the embedding when tied).
        labels: (...) target ids.
        chunk: tokens per chunk, a positive integer (ValueError otherwise).
    """
    check_positive_int(chunk, "linear_cross_entropy: chunk", "tokens per chunk")  # (a negative one: an unset dW)
    h2 = h.reshape(-1, h.shape[-1])
    y = labels.reshape(-1)
    dtype = matmul_dtype(h2)
    count = (y != IGNORE_INDEX).sum().clamp(min=1)
    with torch.autocast(h.device.type, enabled=False):
        if wants_grad(h, weight):
            total = _LinearCrossEntropy.apply(h2, weight, y, chunk, dtype)
        else:
            w = weight.to(dtype)
            total = torch.zeros((), dtype=accumulation_dtype(dtype), device=h.device)
            for s in range(0, h2.shape[0], chunk):
                total += _chunk_loss_only(h2[s : s + chunk].to(dtype) @ w.T, y[s : s + chunk], total.dtype)
    return total / count
