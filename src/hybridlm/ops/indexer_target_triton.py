"""Triton kernels of the indexer loss's target (:func:`hybridlm.ops.indexer.indexer_target`): the main attention's
probabilities summed over its heads, without the per-head logits.

The reference forms the logits of every head, query and key in float32 (B, H, T, S), masks them, takes a softmax and
sums over the heads: a DSA layer's step with the indexer loss spent about 65 of its 175 ms there on an H100 (16 heads,
4 x 4096; docs/benchmarks.md), twice, since the loss's chunks are checkpointed. Two passes instead, flash-attention
style, each computing the products again from q and k:

- ``_lse_kernel``: one program per (query tile, head, row) runs over the key tiles up to the causal diagonal with an
  online maximum and sum, and writes each query's log-sum-exp over its valid keys (B, H, T) float32 (+inf for a query without any).
- ``_probs_kernel``: one program per (query tile, key tile, row) adds ``exp(logit - lse)`` of every head in a
  (BLOCK_T, BLOCK_S) float32 accumulator and writes it divided by the heads (B, T, S); a key tile after every query's
  diagonal is written zero and nothing else.

Products are ``tl.dot`` of the inputs' dtype with float32 accumulation: for bf16 q and k, products of bf16 numbers
are exact in float32, as in the reference's float32 einsum of them; float32 inputs run as ``tf32x3`` (``ieee`` before
sm_80, as the indexer's scores do). The head size is taken ``D_CHUNK`` channels at a time (MLA's 192 = 3 x 64: a tile
is a power of two).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .dispatch import _interpreting, record
from .indexer_triton import _precision, output_tile

#: Tiles (queries x keys) and warps of the two passes, and the channels one product takes at once. Measured on an
#: H100 at 4 x 4096, 16 heads of 192 (``benchmarks/dsa_indexer.py --tune target``, docs/benchmarks.md): 3.28 ms for
#: both passes, against 3.62 with 64-query tiles in the second, 4.18 with slices of 32 channels, 5.78 with 128 keys.
LSE_BLOCK_T, LSE_BLOCK_S, LSE_WARPS = 64, 64, 4
PROBS_BLOCK_T, PROBS_BLOCK_S, PROBS_WARPS = 128, 64, 8
D_CHUNK = 64
#: Software-pipelining stages for float32 q and k (``tf32x3``: each operand split in two): Triton's default (3 on
#: sm_90) asks 224 KiB of shared memory in the first pass and 320 KiB in the second under Triton 3.9, more than
#: an H100's 227 KiB; one stage asks 128 / 32 KiB (``benchmarks/kernel_build.py --ops indexer_target``), which
#: an A100's 163 KiB holds too. bf16 and fp16 keep the default (40 / 32 KiB).
FP32_STAGES = 1


@triton.jit
def _logits(
    q_rows, k_cols, t, s, T, S, D, scale,
    BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, DC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One head's scaled logits (BT, BS) float32 of the query rows against the key columns, DC channels at a time."""
    x = tl.zeros([BT, BS], tl.float32)
    for c in tl.static_range(0, BD, DC):
        dd = c + tl.arange(0, DC)
        qc = tl.load(q_rows + dd[None, :], mask=(t[:, None] < T) & (dd[None, :] < D), other=0.0)
        kc = tl.load(k_cols + dd[:, None], mask=(dd[:, None] < D) & (s[None, :] < S), other=0.0)
        x = tl.dot(qc, kc, x, input_precision=PRECISION)
    return x * scale


@triton.jit
def _valid_tile(v_ptr, b, t, s, T, S, diagonal, sv_b, sv_t, CAUSAL: tl.constexpr):
    """The (BT, BS) tile of the valid keys: the mask's, inside the tensor and (CAUSAL) not after the diagonal."""
    inside = (t[:, None] < T) & (s[None, :] < S)
    ok = tl.load(v_ptr + b * sv_b + t[:, None].to(tl.int64) * sv_t + s[None, :], mask=inside, other=0) != 0
    if CAUSAL:
        ok = ok & (s[None, :] <= t[:, None] + diagonal)
    return ok & inside


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, v_ptr, lse_ptr, T, S, D, diagonal, scale,
    sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_t, sl_b, sl_h,
    CAUSAL: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, DC: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    q_rows = q_ptr + b * sq_b + t[:, None].to(tl.int64) * sq_t + h * sq_h
    s_stop = S
    if CAUSAL:  # (no key after the last query's diagonal is valid)
        s_stop = tl.minimum(S, pid_t * BT + BT + diagonal)
    m = tl.full([BT], float("-inf"), tl.float32)
    l = tl.zeros([BT], tl.float32)  # noqa: E741  (flash attention's name for the running sum)
    for s0 in range(0, s_stop, BS):
        s = s0 + tl.arange(0, BS)
        k_cols = k_ptr + b * sk_b + s[None, :].to(tl.int64) * sk_s + h * sk_h
        x = _logits(q_rows, k_cols, t, s, T, S, D, scale, BT, BS, BD, DC, PRECISION)
        x = tl.where(_valid_tile(v_ptr, b, t, s, T, S, diagonal, sv_b, sv_t, CAUSAL), x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # (no valid key yet: every term below is exp(-inf) = 0)
        l = l * tl.exp(m - base) + tl.sum(tl.exp(x - base[:, None]), 1)  # noqa: E741
        m = m_new
    # (a query without any valid key: +inf, so that every exp(logit - lse) of its row is 0, not inf masked after)
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("inf"))
    tl.store(lse_ptr + b * sl_b + h * sl_h + t, lse, mask=t < T)


@triton.jit
def _probs_kernel(
    q_ptr, k_ptr, v_ptr, lse_ptr, out_ptr, T, S, H, D, diagonal, scale,
    sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_t, sl_b, sl_h, so_b, so_t,
    CAUSAL: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, DC: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(2).to(tl.int64)
    pid_t, pid_s = tl.program_id(1), tl.program_id(0)
    t, s, out, inside = output_tile(out_ptr, b, pid_t, pid_s, T, S, so_b, so_t, BT, BS)
    if CAUSAL and pid_s * BS > pid_t * BT + BT - 1 + diagonal:  # (every key of the tile after every query's diagonal)
        tl.store(out, tl.zeros([BT, BS], tl.float32), mask=inside)
        return
    ok = _valid_tile(v_ptr, b, t, s, T, S, diagonal, sv_b, sv_t, CAUSAL)
    acc = tl.zeros([BT, BS], tl.float32)
    for h in range(H):
        q_rows = q_ptr + b * sq_b + t[:, None].to(tl.int64) * sq_t + h * sq_h
        k_cols = k_ptr + b * sk_b + s[None, :].to(tl.int64) * sk_s + h * sk_h
        x = _logits(q_rows, k_cols, t, s, T, S, D, scale, BT, BS, BD, DC, PRECISION)
        lse = tl.load(lse_ptr + b * sl_b + h * sl_h + t, mask=t < T, other=0.0)
        acc += tl.where(ok, tl.exp(x - lse[:, None]), 0.0)
    tl.store(out, acc / H, mask=inside)


def indexer_target_triton(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float, diagonal: int | None = None
) -> torch.Tensor:
    """:func:`hybridlm.ops.indexer.indexer_target` on the kernels: q (B, T, H, D), k (B, S, H, D) (bf16, fp16 or
    float32, one dtype), valid (B|1, T, S) bool -> (B, T, S) float32, no gradient."""
    return _target_op(q, k, valid, float(scale), diagonal)


@torch.library.custom_op("hybridlm::indexer_target", mutates_args=())
def _target_op(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float, diagonal: int | None
) -> torch.Tensor:
    record("index_target", "triton")  # also at run time inside compiled graphs (tracing records nothing)
    B, T, H, D = q.shape
    S = k.shape[1]
    if q.dtype != k.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(
            f"indexer_target_triton: q and k of one dtype, bf16, fp16 or float32; got {q.dtype}, {k.dtype}"
        )
    if k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"indexer_target_triton: q {tuple(q.shape)} and k {tuple(k.shape)} differ in rows or heads")
    out = torch.empty(B, T, S, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if H * D == 0:
        return out.zero_()
    if _interpreting() and q.dtype != torch.float32:  # Triton's interpreter (3.9) multiplies bf16 tiles wrongly;
        q, k = q.float(), k.float()  # the same products, exact in float32 either way
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    v = valid.expand(B, T, S)
    v = (v if v.stride(-1) == 1 else v.contiguous()).view(torch.uint8)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    dc = min(max(16, D_CHUNK), max(16, triton.next_power_of_2(D)))
    common = dict(
        CAUSAL=diagonal is not None, BD=triton.cdiv(D, dc) * dc, DC=dc,
        PRECISION=_precision(q.device) if q.dtype == torch.float32 else "tf32",  # (bf16 / fp16: no choice to make)
    )  # fmt: skip
    if q.dtype == torch.float32:
        common["num_stages"] = FP32_STAGES
    strides = (*q.stride()[:3], *k.stride()[:3], v.stride(0), v.stride(1), lse.stride(0), lse.stride(1))
    diag = 0 if diagonal is None else diagonal
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _lse_kernel[(triton.cdiv(T, LSE_BLOCK_T), H, B)](
            q, k, v, lse, T, S, D, diag, scale, *strides,
            BT=LSE_BLOCK_T, BS=LSE_BLOCK_S, num_warps=LSE_WARPS, **common,
        )  # fmt: skip
        _probs_kernel[(triton.cdiv(S, PROBS_BLOCK_S), triton.cdiv(T, PROBS_BLOCK_T), B)](
            q, k, v, lse, out, T, S, H, D, diag, scale, *strides, out.stride(0), out.stride(1),
            BT=PROBS_BLOCK_T, BS=PROBS_BLOCK_S, num_warps=PROBS_WARPS, **common,
        )  # fmt: skip
    return out


@_target_op.register_fake
def _(q, k, valid, scale, diagonal):
    return q.new_empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32)
