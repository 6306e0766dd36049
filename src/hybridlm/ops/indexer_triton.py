"""Triton kernels of the lightning indexer (:mod:`hybridlm.ops.indexer`): its scores without the per-head products,
and the top-k selection without a sort.

``_scores_kernel``: one program per (query tile, key tile, row). It holds the key tile (d, BLOCK_S) and, for each
index head in turn, multiplies the head's query tile (BLOCK_T, d) into it, applies the ReLU and adds the product
times the head's weights into a (BLOCK_T, BLOCK_S) float32 accumulator: the products never leave registers. A key
tile entirely after the causal diagonal is written -inf and nothing else. The products run on tensor cores in
``INPUT_PRECISION`` ("tf32x3": three TF32 products, about float32's accuracy; "ieee" is float32 on the CUDA cores,
several times slower; "tf32" alone has a 10-bit mantissa, which would move the selection at near ties).

``_scores_bwd_q_kernel`` and ``_scores_bwd_k_kernel`` (the indexer loss's backward): each computes the products
again from q and k, the first per (query tile, head) (dq and dw, key tiles in turn), the second per (key tile, group
of heads) (dk, query tiles then the group's heads), both only up to the diagonal; the scores' gradient is read,
nothing per head is stored. The products computed again gate the ReLU and make dw: they run in the forward's
precision, so that each gate is the forward's (a gate flipped at a product near 0 moves a whole term of dq and dk:
in TF32 they put the gradients 11 % off, measured). The second products, of the gated gradient into k and q (dq,
dk), run in :data:`PRODUCTS_16BIT` (TF32) where the caller's gradients go on in a 16-bit dtype (``coarse_grads``),
else in the forward's precision too.

``_topk_kernel``: one program per query row. The k-th largest allowed score is found by bisection over the scores'
int32 keys (a float32's bits, the lower 31 flipped for negative numbers, order as the floats do), 32 counting passes
over the row; then every allowed key above it is kept, and of the keys equal to it the first ``k - above`` by
position (a running count of the ties), which is what a stable descending sort keeps.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .dispatch import record
from .top_p_triton import KEY_HI, KEY_LO, float_key  # (a float32's bits as an int32 in the floats' order)

#: Tile sizes and warps of the scores kernel, channels a product takes at once (``D_CHUNK`` below the head size: the
#: key tile is read again for each head, in slices), and the products' precision (see the module's docstring).
#: Measured on an H100 at 4 x 4096, 64 heads of 128 (``benchmarks/dsa_indexer.py --tune``, docs/benchmarks.md):
#: 8.4 ms, against 9.3 with slices of 32 channels, 10.9 for 64 x 32 tiles and 12.8 to 23.6 for 64 x 64 ones.
BLOCK_T, BLOCK_S, SCORE_WARPS, D_CHUNK = 128, 64, 8, 64
INPUT_PRECISION = "tf32x3"
#: 1: the programs of one query tile (every key tile) run next to each other, so its queries (all heads: 4 MiB at
#: 128 queries of 64 heads of 128) may come from L2 rather than once per key tile from memory; 0: those of one key
#: tile. Measured on an H100 at the sizes above: 8.02 against 8.09 ms (the products, not the reads, bound it).
KEYS_FASTEST = 1
#: The backward's tiles (queries x keys) and warps: dq and dw per (DQ_BLOCK_T queries, head, row), looping over tiles
#: of DQ_BLOCK_S keys; dk per (DK_BLOCK_S keys, group of heads, row), looping over tiles of DK_BLOCK_T queries then the
#: group's heads, DK_HEAD_GROUPS groups (partial sums added after: a chunk of the loss's queries alone would give the
#: dk kernel too few programs). Each holds a (tile, head size) float32 accumulator: smaller tiles than the forward's.
DQ_BLOCK_T, DQ_BLOCK_S, DK_BLOCK_T, DK_BLOCK_S, BWD_WARPS, DK_HEAD_GROUPS = 32, 64, 64, 32, 4, 8
#: The backward's second products (the gated gradient into k for dq, into q for dk) where the gradients of q and k go
#: on in a 16-bit dtype (``index_scores_triton``'s ``coarse_grads``: a bf16 model's projections make q and k, and
#: their backward rounds these gradients to bf16): TF32, whose 10-bit mantissa is fp16's and finer than bf16's.
#: Measured on an H100 at DeepSeek's sizes (docs/benchmarks.md): dq 7e-4 and dk 4e-4 off float64, against 2e-3 and
#: 3e-3 for the float32 reference's gradients rounded to bf16; the scores' backward 72 -> 54 ms at 4 x 4096.
#: Otherwise, or with None here, they run in :data:`INPUT_PRECISION`, as the products that gate the ReLU always do.
PRODUCTS_16BIT: str | None = "tf32"
#: Keys a step of the top-k kernel's loops over a row, and its warps.
TOPK_BLOCK, TOPK_WARPS = 1024, 4


@triton.jit
def output_tile(out_ptr, b, pid_t, pid_s, T, S, so_b, so_t, BT: tl.constexpr, BS: tl.constexpr):
    """A (BT queries, BS keys) tile of a (B, T, S) output with unit key stride: its queries, keys, pointers and which
    of them lie inside. (Whether the tile lies after the diagonal each kernel asks itself, of its CAUSAL constexpr:
    a constexpr ``and`` returned from a function is not what the GPU runs were measured with.)"""
    t = pid_t * BT + tl.arange(0, BT)
    s = pid_s * BS + tl.arange(0, BS)
    out = out_ptr + b * so_b + t[:, None].to(tl.int64) * so_t + s[None, :]
    inside = (t[:, None] < T) & (s[None, :] < S)
    return t, s, out, inside


@triton.jit
def _scores_kernel(
    q_ptr, w_ptr, k_ptr, out_ptr, T, S, N, D, diagonal,
    sq_b, sq_t, sq_n, sw_b, sw_t, sw_n, sk_b, sk_s, so_b, so_t,
    CAUSAL: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, DC: tl.constexpr,
    PRECISION: tl.constexpr, KEYS_FIRST: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(1) if KEYS_FIRST else tl.program_id(0)
    pid_s = tl.program_id(0) if KEYS_FIRST else tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t, s, out, inside = output_tile(out_ptr, b, pid_t, pid_s, T, S, so_b, so_t, BT, BS)
    if CAUSAL and pid_s * BS > pid_t * BT + BT - 1 + diagonal:  # (every key of the tile after every query's diagonal)
        tl.store(out, tl.full([BT, BS], float("-inf"), tl.float32), mask=inside)
        return
    k_cols = k_ptr + b * sk_b + s[None, :].to(tl.int64) * sk_s
    q_rows = q_ptr + b * sq_b + t[:, None].to(tl.int64) * sq_t
    w_rows = w_ptr + b * sw_b + t.to(tl.int64) * sw_t
    acc = tl.zeros([BT, BS], tl.float32)
    if DC >= BD:  # the key tile (d, BS) held across the heads
        dd = tl.arange(0, BD)
        kt = tl.load(k_cols + dd[:, None], mask=(dd[:, None] < D) & (s[None, :] < S), other=0.0)
        for j in range(N):
            qj = tl.load(q_rows + j * sq_n + dd[None, :], mask=(t[:, None] < T) & (dd[None, :] < D), other=0.0)
            wj = tl.load(w_rows + j * sw_n, mask=t < T, other=0.0)
            acc += tl.maximum(tl.dot(qj, kt, input_precision=PRECISION), 0.0) * wj[:, None]
    else:  # the head's product summed over slices of DC channels (fewer registers; the key slices read again)
        for j in range(N):
            prod = tl.zeros([BT, BS], tl.float32)
            for c in tl.static_range(0, BD, DC):
                dd = c + tl.arange(0, DC)
                kt = tl.load(k_cols + dd[:, None], mask=(dd[:, None] < D) & (s[None, :] < S), other=0.0)
                qj = tl.load(q_rows + j * sq_n + dd[None, :], mask=(t[:, None] < T) & (dd[None, :] < D), other=0.0)
                prod = tl.dot(qj, kt, prod, input_precision=PRECISION)
            wj = tl.load(w_rows + j * sw_n, mask=t < T, other=0.0)
            acc += tl.maximum(prod, 0.0) * wj[:, None]
    if CAUSAL:
        acc = tl.where(s[None, :] > t[:, None] + diagonal, float("-inf"), acc)
    tl.store(out, acc, mask=inside)


def index_scores_triton(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, diagonal: int | None = None, coarse_grads: bool = False
) -> torch.Tensor:
    """:func:`hybridlm.ops.indexer.index_scores` on the kernel: q (B, T, n, d), w (B, T, n), k (B, S, d) float32 ->
    (B, T, S) float32, differentiable in q, w and k (two backward kernels, which compute the products again).
    ``coarse_grads``: the gradients of q and k go on in a 16-bit dtype, so their products run in
    :data:`PRODUCTS_16BIT`."""
    return _scores_op(q, w, k, diagonal, coarse_grads)


def _precision(device: torch.device, precision: str | None = None) -> str:
    """``precision`` (default :data:`INPUT_PRECISION`), or "ieee" on a GPU older than Ampere (sm_80), which has no
    TF32 tensor cores."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return "ieee"
    return precision or INPUT_PRECISION


@torch.library.custom_op("hybridlm::index_scores", mutates_args=())
def _scores_op(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, diagonal: int | None, coarse_grads: bool
) -> torch.Tensor:
    record("index_scores", "triton")  # also at run time inside compiled graphs (tracing records nothing)
    B, T, N, D = q.shape
    S = k.shape[1]
    if q.dtype != torch.float32 or w.dtype != torch.float32 or k.dtype != torch.float32:
        raise ValueError(f"index_scores_triton: float32 inputs only, got q {q.dtype}, w {w.dtype}, k {k.dtype}")
    out = torch.empty(B, T, S, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    q, w, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, w, k))
    tiles = (
        (triton.cdiv(S, BLOCK_S), triton.cdiv(T, BLOCK_T))
        if KEYS_FASTEST
        else (triton.cdiv(T, BLOCK_T), triton.cdiv(S, BLOCK_S))
    )
    grid = (*tiles, B)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _scores_kernel[grid](
            q, w, k, out, T, S, N, D, 0 if diagonal is None else diagonal,
            q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), w.stride(2), k.stride(0), k.stride(1),
            out.stride(0), out.stride(1),
            CAUSAL=diagonal is not None, BT=BLOCK_T, BS=BLOCK_S, BD=max(16, triton.next_power_of_2(D)),
            DC=max(16, D_CHUNK), PRECISION=_precision(q.device), KEYS_FIRST=bool(KEYS_FASTEST), num_warps=SCORE_WARPS,
        )  # fmt: skip
    return out


@_scores_op.register_fake
def _(q, w, k, diagonal, coarse_grads):
    return q.new_empty(q.shape[0], q.shape[1], k.shape[1])


@triton.jit
def _scores_bwd_q_kernel(
    q_ptr, w_ptr, k_ptr, g_ptr, dq_ptr, dw_ptr, T, S, D, diagonal,
    sq_b, sq_t, sq_n, sw_b, sw_t, sw_n, sk_b, sk_s, sg_b, sg_t, sdq_b, sdq_t, sdq_n, sdw_b, sdw_t, sdw_n,
    CAUSAL: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, GATE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """dq_j(t) = sum_s g(t, s) w_j(t) [P_j > 0] k(s) and dw_j(t) = sum_s g(t, s) ReLU(P_j(t, s)), P_j = q_j(t) · k(s)
    recomputed (in ``GATE``; dq's product in ``PRECISION``): one program per (query tile, head, row), the key tiles up
    to the diagonal in turn."""
    pid_t = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    dd = tl.arange(0, BD)
    q_mask = (t[:, None] < T) & (dd[None, :] < D)
    s_stop = S
    if CAUSAL:  # (no key after the last query's diagonal: their scores were -inf, constants)
        s_stop = tl.minimum(S, pid_t * BT + BT + diagonal)
    qj = tl.load(q_ptr + b * sq_b + t[:, None].to(tl.int64) * sq_t + j * sq_n + dd[None, :], mask=q_mask, other=0.0)
    wj = tl.load(w_ptr + b * sw_b + t.to(tl.int64) * sw_t + j * sw_n, mask=t < T, other=0.0)
    dq = tl.zeros([BT, BD], tl.float32)
    dw = tl.zeros([BT], tl.float32)
    for s0 in range(0, s_stop, BS):
        s = s0 + tl.arange(0, BS)
        kt = tl.load(k_ptr + b * sk_b + s[None, :].to(tl.int64) * sk_s + dd[:, None],
                     mask=(dd[:, None] < D) & (s[None, :] < S), other=0.0)  # fmt: skip
        g = tl.load(g_ptr + b * sg_b + t[:, None].to(tl.int64) * sg_t + s[None, :],
                    mask=(t[:, None] < T) & (s[None, :] < S), other=0.0)  # fmt: skip
        if CAUSAL:
            g = tl.where(s[None, :] > t[:, None] + diagonal, 0.0, g)
        p = tl.dot(qj, kt, input_precision=GATE)
        gp = tl.where(p > 0, g, 0.0)
        dw += tl.sum(gp * p, 1)
        dq = tl.dot(gp * wj[:, None], tl.trans(kt), dq, input_precision=PRECISION)
    tl.store(dq_ptr + b * sdq_b + t[:, None].to(tl.int64) * sdq_t + j * sdq_n + dd[None, :], dq, mask=q_mask)
    tl.store(dw_ptr + b * sdw_b + t.to(tl.int64) * sdw_t + j * sdw_n, dw, mask=t < T)


@triton.jit
def _scores_bwd_k_kernel(
    q_ptr, w_ptr, k_ptr, g_ptr, dk_ptr, T, S, N, D, diagonal, HEADS,
    sq_b, sq_t, sq_n, sw_b, sw_t, sw_n, sk_b, sk_s, sg_b, sg_t, sdk_g, sdk_b, sdk_s,
    CAUSAL: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, GATE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """dk(s) = sum_t sum_j g(t, s) w_j(t) [P_j > 0] q_j(t) (P_j in ``GATE``, dk's product in ``PRECISION``): one program
    per (key tile, group of HEADS heads, row), the query tiles from the diagonal on in turn, the group's heads in turn;
    each group writes its own partial sum."""
    pid_s = tl.program_id(0)
    grp = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    s = pid_s * BS + tl.arange(0, BS)
    dd = tl.arange(0, BD)
    kt = tl.load(k_ptr + b * sk_b + s[None, :].to(tl.int64) * sk_s + dd[:, None],
                 mask=(dd[:, None] < D) & (s[None, :] < S), other=0.0)  # fmt: skip
    dk = tl.zeros([BS, BD], tl.float32)
    t_start = 0
    if CAUSAL:  # (no query before the first key's diagonal sees it)
        t_start = tl.maximum(0, pid_s * BS - diagonal) // BT * BT
    j_stop = tl.minimum(N, grp * HEADS + HEADS)
    for t0 in range(t_start, T, BT):
        t = t0 + tl.arange(0, BT)
        g = tl.load(g_ptr + b * sg_b + t[:, None].to(tl.int64) * sg_t + s[None, :],
                    mask=(t[:, None] < T) & (s[None, :] < S), other=0.0)  # fmt: skip
        if CAUSAL:
            g = tl.where(s[None, :] > t[:, None] + diagonal, 0.0, g)
        for j in range(grp * HEADS, j_stop):
            qj = tl.load(q_ptr + b * sq_b + t[:, None].to(tl.int64) * sq_t + j * sq_n + dd[None, :],
                         mask=(t[:, None] < T) & (dd[None, :] < D), other=0.0)  # fmt: skip
            wj = tl.load(w_ptr + b * sw_b + t.to(tl.int64) * sw_t + j * sw_n, mask=t < T, other=0.0)
            p = tl.dot(qj, kt, input_precision=GATE)
            gp = tl.where(p > 0, g, 0.0) * wj[:, None]
            dk = tl.dot(tl.trans(gp), qj, dk, input_precision=PRECISION)
    out = dk_ptr + grp * sdk_g + b * sdk_b + s[:, None].to(tl.int64) * sdk_s + dd[None, :]
    tl.store(out, dk, mask=(s[:, None] < S) & (dd[None, :] < D))


@torch.library.custom_op("hybridlm::index_scores_bwd", mutates_args=())
def _scores_bwd_op(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, g: torch.Tensor, diagonal: int | None, coarse_grads: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq (B, T, n, d), dw (B, T, n), dk (B, S, d)) float32 of the scores' gradient ``g`` (B, T, S); dq's and dk's
    products in :data:`PRODUCTS_16BIT` where ``coarse_grads``."""
    B, T, N, D = q.shape
    S = k.shape[1]
    dq, dw = torch.empty(B, T, N, D, **_f32(q)), torch.empty(B, T, N, **_f32(q))
    if B * T * S == 0 or N * D == 0:
        return dq.zero_(), dw.zero_(), torch.zeros(B, S, D, **_f32(q))
    q, w, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, w, k))
    g = g.float() if g.stride(-1) == 1 else g.float().contiguous()
    common = dict(CAUSAL=diagonal is not None, BD=max(16, triton.next_power_of_2(D)), GATE=_precision(q.device),
                  PRECISION=_precision(q.device, PRODUCTS_16BIT if coarse_grads else None), num_warps=BWD_WARPS)  # fmt: skip
    strides = (*q.stride()[:3], *w.stride(), *k.stride()[:2], *g.stride()[:2])
    heads = triton.cdiv(N, min(N, DK_HEAD_GROUPS))  # heads a dk program sums
    groups = triton.cdiv(N, heads)
    dk_parts = torch.empty(groups, B, S, D, **_f32(q))
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _scores_bwd_q_kernel[(triton.cdiv(T, DQ_BLOCK_T), N, B)](
            q, w, k, g, dq, dw, T, S, D, 0 if diagonal is None else diagonal, *strides,
            *dq.stride()[:3], *dw.stride(), BT=DQ_BLOCK_T, BS=DQ_BLOCK_S, **common,
        )  # fmt: skip
        _scores_bwd_k_kernel[(triton.cdiv(S, DK_BLOCK_S), groups, B)](
            q, w, k, g, dk_parts, T, S, N, D, 0 if diagonal is None else diagonal, heads, *strides,
            *dk_parts.stride()[:3], BT=DK_BLOCK_T, BS=DK_BLOCK_S, **common,
        )  # fmt: skip
    return dq, dw, dk_parts.sum(0) if groups > 1 else dk_parts[0]


@_scores_bwd_op.register_fake
def _(q, w, k, g, diagonal, coarse_grads):
    return q.new_empty(q.shape), w.new_empty(w.shape), k.new_empty(k.shape)


def _f32(t: torch.Tensor) -> dict:
    return {"dtype": torch.float32, "device": t.device}


def _scores_setup(ctx, inputs, output):
    q, w, k, diagonal, coarse_grads = inputs
    ctx.save_for_backward(q, w, k)
    ctx.diagonal, ctx.coarse_grads = diagonal, coarse_grads


def _scores_backward(ctx, g):
    q, w, k = ctx.saved_tensors
    dq, dw, dk = _scores_bwd_op(q, w, k, g, ctx.diagonal, ctx.coarse_grads)
    return dq, dw, dk, None, None


_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)


@triton.jit
def _count_at_least(x_row, a_row, S, cut, BLOCK: tl.constexpr):
    """Allowed keys of the row whose score's key is at least ``cut``."""
    n = 0
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < S, other=0.0)
        ok = tl.load(a_row + offs, mask=offs < S, other=0) != 0
        n += tl.sum((ok & (float_key(x) >= cut)).to(tl.int32), 0)
    return n


@triton.jit
def _topk_kernel(
    x_ptr, a_ptr, out_ptr, T, S, K, sx_b, sx_t, sa_b, sa_t, so_b, so_t,
    LO: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    x_row = x_ptr + b * sx_b + t * sx_t
    a_row = a_ptr + b * sa_b + t * sa_t
    o_row = out_ptr + b * so_b + t * so_t
    # The largest key whose count of allowed keys at or above it reaches K: invariant count(lo) >= K > count(hi)
    # (lo stays LO, below every score, when fewer than K are allowed: then all of them are kept).
    lo = tl.full([], LO, tl.int64)
    hi = tl.full([], HI, tl.int64)
    for _ in range(32):  # (the interval's width is below 2^32: 32 halvings leave hi = lo + 1)
        mid = lo + (hi - lo) // 2
        reach = _count_at_least(x_row, a_row, S, mid.to(tl.int32), BLOCK) >= K
        lo = tl.where(reach, mid, lo)
        hi = tl.where(reach, hi, mid)
    cut = lo.to(tl.int32)
    need = K - _count_at_least(x_row, a_row, S, cut + 1, BLOCK)  # ties at the cut to keep, first by position
    seen = 0
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < S, other=0.0)
        ok = tl.load(a_row + offs, mask=offs < S, other=0) != 0
        key = float_key(x)
        tie = ok & (key == cut)
        rank = seen + tl.cumsum(tie.to(tl.int32), 0)
        keep = ok & ((key > cut) | (tie & (rank <= need)))
        tl.store(o_row + offs, keep.to(tl.int8), mask=offs < S)
        seen += tl.sum(tie.to(tl.int32), 0)


def select_topk_triton(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`hybridlm.ops.indexer.select_topk` on the kernel: scores (B, T, S) float32 (or bf16 / fp16, read as
    float32), allowed (B|1, T, S) bool -> (B, T, S) bool."""
    return _topk_op(scores, allowed, k)


@torch.library.custom_op("hybridlm::index_topk", mutates_args=())
def _topk_op(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    record("index_topk", "triton")  # also at run time inside compiled graphs (tracing records nothing)
    if k <= 0:
        raise ValueError(f"select_topk_triton: k must be positive, got {k}")
    B, T, S = scores.shape
    out = torch.empty(B, T, S, dtype=torch.bool, device=scores.device)
    if out.numel() == 0:
        return out
    x = scores.float()
    x = x if x.stride(-1) == 1 else x.contiguous()
    a = allowed.expand(B, T, S)
    a = (a if a.stride(-1) == 1 else a.contiguous()).view(torch.uint8)
    o = out.view(torch.uint8)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _topk_kernel[(B * T,)](
            x, a, o, T, S, min(k, S), x.stride(0), x.stride(1), a.stride(0), a.stride(1), o.stride(0), o.stride(1),
            LO=KEY_LO, HI=KEY_HI, BLOCK=min(TOPK_BLOCK, triton.next_power_of_2(S)), num_warps=TOPK_WARPS,
        )  # fmt: skip
    return out


@_topk_op.register_fake
def _(scores, allowed, k):
    return scores.new_empty(scores.shape, dtype=torch.bool)
