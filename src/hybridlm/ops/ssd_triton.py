"""Mamba2's chunked SSD scan as Triton kernels, forward and backward (the fast path of ``ops.ssd``).

Notation (per batch row ``b``, head ``h`` of group ``g``, chunk ``c`` of ``Q`` positions)::

    a_t    = max(dt_t * A_h, -FLOOR)         log-decay of step t (<= 0; FLOOR = precision.LOG_DECAY_FLOOR)
    acum_t = a_{cQ} + ... + a_t              cumulative log-decay inside the chunk
    L[t,s] = exp(acum_t - acum_s)            for s <= t in the same chunk *and* the same document
    st_c   = sum_s exp(acum_last - acum_s) dt_s x_s ⊗ B_s    (s in the chunk's last document)
    S_{c+1} = decay_c * S_c + st_c,  decay_c = exp(acum_last) if the chunk has no reset else 0
    y_t    = sum_s (C_t·B_s) L[t,s] dt_s x_s + exp(acum_t) [doc_t = doc before chunk] C_t·S_c + D x_t

Document resets (``seq_idx``) never enter the log-decays as ``-inf`` here: they are masks on
document equality (``seq_idx`` is non-decreasing, so equal ids at both ends means no reset between),
which keeps every exponent finite and every cumulative sum free of ``inf - inf``.

Kernels (all accumulate in float32; products of two raw inputs use the input dtype on tensor cores,
which is exact for bf16; a float32 intermediate multiplied with bf16 inputs is split into two bf16
tiles, see ``_dot_fr``; with float32 inputs such products use ``tf32x3``):

1. ``_state_kernel``   per (b, c, h): ``st_c`` (forward), or ``sum_t exp(acum_t) dy_t ⊗ C_t`` (backward).
2. ``_pass_fwd_kernel`` per (b, h): the sequential scan over chunks, in place: the state entering
   each chunk and the final state.
3. ``_scan_fwd_kernel`` per (b, c, h, block of Q): ``y``.
4. ``_pass_bwd_kernel`` the reverse scan: gradient of each chunk's entering state, of the initial
   state, and of each chunk's total log-decay.
5. ``_cb_kernel``      per (b, c, g, tile of Q × Q): ``C_t·B_s`` inside the chunk, for the group.
6. ``_bwd_w_kernel``   per (b, c, g, tile of Q × Q), heads in a loop: ``W[s, t]``, the sum over the
   group's heads of ``dt_s L[t, s] x_s·dy_t`` (what multiplies ``B_s`` and ``C_t`` in y), and both
   halves of d acum through y inside the chunk.
7. ``_bwd_dx_kernel``  per (b, c, h, block of Q): dx, dt's direct gradient, d acum through the
   chunk state, and partial sums for dD.
8. ``_bwd_dbc_kernel`` per (b, c, g, block of Q, block of n), twice: dB (through the chunk state,
   then ``W @ C``) and dC (through the entering state, then ``Wᵀ @ B``, and d acum through that
   state). Summing over heads in ``W`` first makes dB and dC one product per group, not per head,
   and leaves each kernel's tiles small enough for few register spills (mamba_ssm's backward is
   split the same way).

The forward returns the float32 states entering every chunk (and the final state in the last
slot), and the backward takes them back instead of recomputing them: at ``bench-1.3b``'s shape
(b=4, L=4096, 64 heads × 64, n=128) that is 277 MB per layer kept until the backward, against
one ``_state_kernel`` and one ``_pass_fwd_kernel`` (about 0.37 ms on an H200) saved per call; the
kernels being deterministic, the saved states are bitwise the recomputed ones. The cumulative sums
over dt (``_prep_kernel``) and the sum of d acum's parts with its reverse cumulative sum
(``_dacum_kernel``) are one small launch each; the two remaining reductions (dA, dD) are torch.

The op is registered with ``torch.library.custom_op`` (``hybridlm::ssd_chunk_scan`` and its
backward), so ``torch.compile`` treats it as one opaque node with a fake (meta) implementation.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

from .dispatch import record
from .grid import in_row_groups, rows_per_launch
from .precision import LOG_DECAY_FLOOR

#: Precision of float32 tensor-core products (float32 inputs, or fp16 inputs times a float32
#: intermediate): ``tf32x3`` is close to float32 at a fraction of the cost of ``ieee``.
DOT_PRECISION = "tf32x3"
#: Positions per tile inside a chunk (chunk_size need not be a multiple of it), in the forward
#: kernels and in the backward kernels 5-8, and warps per program. Measured on an H200
#: (``benchmarks/ssd_kernel.py --tune``, b=4, L=4096, 64 heads × 64, state 128, bf16): 4 warps
#: everywhere took fwd + bwd from 7.28 ms (8 warps) to 4.86 ms; with the split backward, tiles of
#: 64 in the backward 3.69 ms against 4.07 at 32; 8 warps were slower in every kernel.
BLOCK_Q = 64
BLOCK_Q_BWD = 64
NUM_WARPS_FWD = 4
NUM_WARPS_BWD = 4
#: Software-pipelining stages of the chunk kernels' loops (None: Triton's default, 3 on sm_90):
#: ``_state_kernel``, ``_scan_fwd_kernel``, and the backward's ``_cb_kernel`` and
#: ``_bwd_dbc_kernel`` (``BWD_STAGES``), ``_bwd_dx_kernel`` (``DX_STAGES``) and ``_bwd_w_kernel``
#: (``W_STAGES``; these two None: as ``BWD_STAGES``). Their loops run 1 to 4 times per program,
#: so the stages' prologue and buffers cost more than the prefetch gains. Timed in the whole
#: Mamba2 mixer on an H200 (``mixers.py --try``, 4 × 4096, fwd + bwd, median ratio of pairs
#: taking turns; twelfth device session): against Triton's default, ``SCAN_STAGES`` 2 0.970,
#: 1 0.974, ``STATE_STAGES`` 2 0.983, 1 0.986; against one stage everywhere, ``SCAN_STAGES`` 2
#: 1.006, ``STATE_STAGES`` 2 1.015, ``BWD_STAGES`` 3 1.002, ``DX_STAGES`` 2 1.003 (a setting
#: against itself: 0.997, 0.998). Kernel times against Triton's default: ``_scan_fwd_kernel``
#: 0.51 → 0.30 ms, ``_state_kernel`` 0.46 → 0.42 (two launches), ``_bwd_dx_kernel`` 0.72 → 0.67,
#: ``_bwd_w_kernel`` 0.30 → 0.35. ``W_STAGES`` = 2 takes that kernel back to 0.33 ms (sixteenth
#: session); in the whole mixer the change is below what pairs resolve (4 pairs: 3 stages 0.996,
#: 2 stages 0.989; then 8 pairs, one stage against two: 1.001). Stages only prefetch loads: the
#: outputs are bitwise the same at 1, 2 and 3 stages (a GPU test checks it).
STATE_STAGES = 1
SCAN_STAGES = 1
DX_STAGES = None
W_STAGES = 2
BWD_STAGES = 1
#: Width of the blocks of the state dimension n in the backward kernels (state products, dB, dC).
BLOCK_N_BWD = 64
#: dx's in-chunk term (sum over t of C_t·B_s L[t, s] dy_t) with its float32 factor rounded once to
#: bf16: one tensor-core product instead of :func:`_dot_fr`'s two. Only dx and dt's direct gradient
#: see that rounding; dA, whose error criterion single products broke on the paths through the
#: chunk states (fifth and sixth device sessions), does not. The same change in the forward's
#: in-chunk term failed y's criterion on CPU (2.02× at L = 512: one bf16 step at the largest
#: outputs), so the forward keeps the split.
DX_SINGLE_PRODUCT = True
#: y's term through the entering state (C_t · S_c) with the float32 state rounded once to bf16:
#: one tensor-core product instead of two. Only y sees it (the backward reads the saved states
#: and dy, never y). H200, bench shape: forward 0.92 → 0.88 ms; y's error 1.00× the rounded
#: reference's at L = 4096 (``ssd_kernel.py --check``), as before.
FWD_STATE_SINGLE_PRODUCT = True
#: Products of ``_bwd_dbc_kernel`` whose float32 factor no other output reads, with that factor
#: rounded once to bf16: dB's state term x · dS (``DB_STATE_SINGLE_PRODUCT``), and the in-chunk
#: products W @ C and Wᵀ @ B (``DBC_W_SINGLE_PRODUCT``). dC's state term, which also gives d acum
#: (and so dA), keeps the split. H200, bench shape, L = 4096: dB 0.95× and dC 1.01× the rounded
#: reference's error with both; the three single products together took fwd + bwd from 3.13 to
#: 3.06 ms.
DB_STATE_SINGLE_PRODUCT = True
DBC_W_SINGLE_PRODUCT = True
#: Positions per tile and width of the state blocks of ``_bwd_dx_kernel`` alone (None:
#: ``BLOCK_Q_BWD``, ``BLOCK_N_BWD``). Built for sm_90 on CPU (``benchmarks/kernel_build.py``):
#: 64 × 64 holds 255 registers per thread and spills 128 bytes (two 4-warp programs per SM);
#: 32 × 32 244 registers, 16 × 32 134 (three programs per SM), neither spilling. Timed on an
#: H200 (bench shape, fwd + bwd): 64 × 64 3.13 ms, 32 × 32 **3.01**, 16 × 32 3.04, 32 × 64 3.22.
DX_BLOCK_Q = 32
DX_BLOCK_N = 32
#: Heads per program of the two small kernels that prepare the per-step quantities and sum the
#: gradient of the cumulative log-decays (each program holds one chunk of them).
PREP_BLOCK_H = 16
#: Chunks whose loads the sequential state passes prefetch: the reverse pass went from 0.58 to
#: 0.20 ms (H200, same shape), its chain of chunks having waited on each load.
PASS_STAGES = 3


#: Triton's interpreter (CPU tests; triton 3.9) multiplies bf16 tiles wrongly and truncates float32
#: to bf16 instead of rounding. There the raw bf16 products run on float32 copies (the same exact
#: products the GPU's bf16 tensor cores give) and outputs are stored in float32 and rounded by torch
#: (as the GPU's conversion rounds to nearest even).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if _INTERPRET else dtype


def _stages(n: int | None) -> dict:
    """A launch's ``num_stages`` option, or none (Triton's default) for None."""
    return {} if n is None else {"num_stages": n}


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


@triton.jit
def _dot_raw(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b for tiles of raw inputs (same dtype): exact products for bf16, float32 accumulation."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision=PREC)
    else:  # bf16 / fp16: the precision setting is for float32 operands only
        out = tl.dot(a, b)
    return out


@triton.jit
def _split_bf16(v):
    """float32 v = hi + lo (+ ~2^-17 |v|) with hi, lo bf16: two bf16 products carry v almost exactly."""
    hi = v.to(tl.bfloat16)
    lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def _dot_fr(f, r, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """f @ r for a float32 intermediate f and a tile r of raw inputs.

    bf16 inputs: f is split into two bf16 tiles and multiplied on bf16 tensor cores (exact products,
    float32 accumulation): f keeps ~16 significant bits, more than tf32's 10, at the cost of one tf32
    product. Other dtypes: float32 products at ``PREC``.
    """
    if r.dtype == tl.bfloat16:
        hi, lo = _split_bf16(f)
        if UPCAST:
            rf = r.to(tl.float32)
            out = tl.dot(hi.to(tl.float32), rf, input_precision=PREC)
            out = tl.dot(lo.to(tl.float32), rf, out, input_precision=PREC)
        else:
            out = tl.dot(lo, r, tl.dot(hi, r))
    else:
        out = tl.dot(f, r.to(tl.float32), input_precision=PREC)
    return out


@triton.jit
def _round_bf16(v):
    """Finite float32 v rounded to the nearest bf16 (ties to even), kept in float32: the GPU's
    conversion, written out because Triton's interpreter truncates instead."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_f1r(f, r, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """f @ r with the float32 intermediate f rounded once to bf16 (one product, not :func:`_dot_fr`'s
    two) for bf16 inputs; float32 products at ``PREC`` otherwise."""
    if r.dtype == tl.bfloat16:
        if UPCAST:
            out = tl.dot(_round_bf16(f), r.to(tl.float32), input_precision=PREC)
        else:
            out = tl.dot(f.to(tl.bfloat16), r)
    else:
        out = tl.dot(f, r.to(tl.float32), input_precision=PREC)
    return out


@triton.jit
def _dot_r1f(r, f, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """r @ f with the float32 intermediate f rounded once to bf16 (one product) for bf16 inputs."""
    if r.dtype == tl.bfloat16:
        if UPCAST:
            out = tl.dot(r.to(tl.float32), _round_bf16(f), input_precision=PREC)
        else:
            out = tl.dot(r, f.to(tl.bfloat16))
    else:
        out = tl.dot(r.to(tl.float32), f, input_precision=PREC)
    return out


@triton.jit
def _dot_rf(r, f, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """r @ f for a tile r of raw inputs and a float32 intermediate f (as :func:`_dot_fr`)."""
    if r.dtype == tl.bfloat16:
        hi, lo = _split_bf16(f)
        if UPCAST:
            rf = r.to(tl.float32)
            out = tl.dot(rf, hi.to(tl.float32), input_precision=PREC)
            out = tl.dot(rf, lo.to(tl.float32), out, input_precision=PREC)
        else:
            out = tl.dot(r, lo, tl.dot(r, hi))
    else:
        out = tl.dot(r.to(tl.float32), f, input_precision=PREC)
    return out


# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _state_kernel(
    X, sx_b, sx_l, sx_h, sx_p,  # (b, l, h, p): x (forward) or dy (backward)
    Y, sy_b, sy_l, sy_g, sy_n,  # (b, l, g, n): B (forward) or C (backward)
    ACUM, DT, SEQ,  # (b, h, Lp) float32, (b, h, Lp) float32, (b, Lp) int32
    OUT,  # (b, NSLOTS, h, p, n) float32
    L, Lp, H, P, N, Q, R, NSLOTS, SLOT_OFF,
    MODE: tl.constexpr,  # 0: chunk state st_c; 1: sum_t exp(acum_t) [same doc as before chunk] dy_t ⊗ C_t
    HAS_SEQ: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_pn = tl.program_id(2)
    bb = (pid_bh // H).to(tl.int64)
    hh = pid_bh % H
    gg = hh // R
    nnb = tl.cdiv(N, BLOCK_N)
    offs_p = (pid_pn // nnb) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % nnb) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = (bb * H + hh) * Lp + c * Q
    if MODE == 0:
        a_ref = tl.load(ACUM + row + Q - 1)
        ref_pos = c * Q + Q - 1
    else:
        ref_pos = tl.maximum(c * Q - 1, 0)
    if HAS_SEQ:
        seq_ref = tl.load(SEQ + bb * Lp + ref_pos)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    # A scalar 64-bit base at the chunk's first row, 32-bit offsets inside: t * stride overflows int32
    # past 2^31 elements (a column slice of xBC has row stride conv_dim: ~350k positions at 6144).
    c0 = (c * Q).to(tl.int64)
    for q0 in range(0, Q, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        t = c * Q + offs_q
        valid = (offs_q < Q) & (t < L)
        acum = tl.load(ACUM + row + offs_q, mask=offs_q < Q, other=0.0)
        if MODE == 0:
            dt = tl.load(DT + row + offs_q, mask=offs_q < Q, other=0.0)
            scale = tl.exp(a_ref - acum) * dt
        else:
            scale = tl.exp(acum)
        if HAS_SEQ:
            sq = tl.load(SEQ + bb * Lp + c * Q + offs_q, mask=offs_q < Q, other=-1)
            valid = valid & (sq == seq_ref)
        scale = tl.where(valid, scale, 0.0)
        xs = tl.load(
            X + bb * sx_b + c0 * sx_l + offs_q[:, None] * sx_l + hh * sx_h + offs_p[None, :] * sx_p,
            mask=valid[:, None] & (offs_p < P)[None, :],
            other=0.0,
        ).to(tl.float32)
        ys = tl.load(
            Y + bb * sy_b + c0 * sy_l + offs_q[:, None] * sy_l + gg * sy_g + offs_n[None, :] * sy_n,
            mask=valid[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        acc += _dot_fr(tl.trans(xs * scale[:, None]), ys, PREC, UPCAST)
    out = OUT + (((bb * NSLOTS + c + SLOT_OFF) * H + hh) * P + offs_p[:, None]) * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_p < P)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _pass_fwd_kernel(
    S,  # (b, nc + 1, h, p*n) float32: slot c+1 holds st_c on entry, S_{c+1} on exit; slot 0 gets S_0
    INIT,  # (b, h, p*n) float32 (read when HAS_INIT)
    DECAY,  # (b, h, nc) float32
    H, PN, NC,
    HAS_INIT: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    bb = pid_bh // H
    hh = pid_bh % H
    if HAS_INIT:
        s = tl.load(INIT + pid_bh * PN + offs, mask=mask, other=0.0)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    tl.store(S + ((bb * (NC + 1)) * H + hh) * PN + offs, s, mask=mask)
    for c in tl.range(NC, num_stages=STAGES):  # loads prefetched: the chain waits on memory
        ptr = S + ((bb * (NC + 1) + c + 1) * H + hh) * PN + offs
        st = tl.load(ptr, mask=mask, other=0.0)
        s = s * tl.load(DECAY + pid_bh * NC + c) + st
        tl.store(ptr, s, mask=mask)


@triton.jit
def _pass_bwd_kernel(
    DS,  # (b, nc, h, p*n) float32: slot c holds the gradient of S_c from y on entry, dL/dS_{c+1} on exit
    S,  # (b, nc + 1, h, p*n) float32: the states S_0 .. S_nc
    DFINAL,  # (b, h, p*n) (read when HAS_DFINAL)
    DECAY,  # (b, h, nc)
    DINIT,  # (b, h, p*n) float32 out: dL/dS_0
    DLAST,  # (b, h, nc, nblocks) float32 out: partial <dL/dS_{c+1}, S_{c+1}> = dL/d acum_last
    H, PN, NC, NBLK,
    HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_blk = tl.program_id(1)
    offs = pid_blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    bb = pid_bh // H
    hh = pid_bh % H
    if HAS_DFINAL:
        ds = tl.load(DFINAL + pid_bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.range(NC, num_stages=STAGES):  # loads prefetched: the chain waits on memory
        c = NC - 1 - i
        ptr = DS + ((bb * NC + c) * H + hh) * PN + offs
        from_y = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, ds, mask=mask)
        s_next = tl.load(S + ((bb * (NC + 1) + c + 1) * H + hh) * PN + offs, mask=mask, other=0.0)
        tl.store(DLAST + (pid_bh * NC + c) * NBLK + pid_blk, tl.sum(ds * s_next, axis=0))
        ds = ds * tl.load(DECAY + pid_bh * NC + c) + from_y
    tl.store(DINIT + pid_bh * PN + offs, ds, mask=mask)


@triton.jit
def _scan_fwd_kernel(
    X, sx_b, sx_l, sx_h, sx_p,
    B, sb_b, sb_l, sb_g, sb_n,
    C, sc_b, sc_l, sc_g, sc_n,
    ACUM, DT, SEQ, S, Dp,
    Y,  # (b, l, h, p) contiguous, dtype of x
    L, Lp, H, P, N, Q, R, NC,
    HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, SINGLE_STATE: tl.constexpr,
):  # fmt: skip
    nqb = tl.cdiv(Q, BLOCK_Q)
    c = tl.program_id(0) // nqb
    qb = tl.program_id(0) % nqb
    pid_bh = tl.program_id(1)
    bb = (pid_bh // H).to(tl.int64)
    hh = pid_bh % H
    gg = hh // R
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    row = (bb * H + hh) * Lp + c * Q
    c0 = (c * Q).to(tl.int64)  # scalar 64-bit bases at the chunk's first row, 32-bit offsets inside
    x_base = X + bb * sx_b + c0 * sx_l + hh * sx_h
    b_base = B + bb * sb_b + c0 * sb_l + gg * sb_g

    offs_t = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    t = c * Q + offs_t
    vt = (offs_t < Q) & (t < L)
    acum_t = tl.load(ACUM + row + offs_t, mask=offs_t < Q, other=0.0)
    if HAS_SEQ:
        seq_t = tl.load(SEQ + bb * Lp + c * Q + offs_t, mask=offs_t < Q, other=-1)
        seq_prev = tl.load(SEQ + bb * Lp + tl.maximum(c * Q - 1, 0))
        from_state = vt & (seq_t == seq_prev)
    else:
        from_state = vt
    c_t = tl.load(
        C + bb * sc_b + c0 * sc_l + gg * sc_g + offs_t[:, None] * sc_l + offs_n[None, :] * sc_n,
        mask=vt[:, None] & (offs_n < N)[None, :],
        other=0.0,
    )
    s_in = tl.load(
        S + ((bb * (NC + 1) + c) * H + hh) * P * N + offs_p[None, :] * N + offs_n[:, None],
        mask=(offs_p < P)[None, :] & (offs_n < N)[:, None],
        other=0.0,
    )  # (n, p): S_c transposed
    if SINGLE_STATE:
        acc = _dot_r1f(c_t, s_in, PREC, UPCAST)
    else:
        acc = _dot_rf(c_t, s_in, PREC, UPCAST)
    acc = acc * tl.where(from_state, tl.exp(acum_t), 0.0)[:, None]

    for sb in range(0, qb + 1):
        offs_s = sb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        s = c * Q + offs_s
        vs = (offs_s < Q) & (s < L)
        acum_s = tl.load(ACUM + row + offs_s, mask=offs_s < Q, other=0.0)
        dt_s = tl.load(DT + row + offs_s, mask=offs_s < Q, other=0.0)
        b_s = tl.load(
            b_base + offs_s[:, None] * sb_l + offs_n[None, :] * sb_n,
            mask=vs[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        x_s = tl.load(
            x_base + offs_s[:, None] * sx_l + offs_p[None, :] * sx_p,
            mask=vs[:, None] & (offs_p < P)[None, :],
            other=0.0,
        )
        mask = (offs_t[:, None] >= offs_s[None, :]) & vt[:, None] & vs[None, :]
        if HAS_SEQ:
            seq_s = tl.load(SEQ + bb * Lp + c * Q + offs_s, mask=offs_s < Q, other=-2)
            mask = mask & (seq_t[:, None] == seq_s[None, :])
        decay = tl.exp(tl.where(mask, acum_t[:, None] - acum_s[None, :], float("-inf")))
        cb = _dot_raw(c_t, tl.trans(b_s), PREC, UPCAST)  # raw inputs: exact products for bf16
        acc += _dot_fr(cb * decay * dt_s[None, :], x_s, PREC, UPCAST)

    x_t = tl.load(
        x_base + offs_t[:, None] * sx_l + offs_p[None, :] * sx_p,
        mask=vt[:, None] & (offs_p < P)[None, :],
        other=0.0,
    )
    if HAS_D:
        acc += tl.load(Dp + hh).to(tl.float32) * x_t.to(tl.float32)
    y_ptr = Y + ((bb * L + c0) * H + hh) * P + offs_t[:, None] * (H * P) + offs_p[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=vt[:, None] & (offs_p < P)[None, :])


@triton.jit
def _cb_kernel(
    B, sb_b, sb_l, sb_g, sb_n,
    C, sc_b, sc_l, sc_g, sc_n,
    CB,  # (b, nc, g, Q, Q) float32 out: CB[t, s] = C_t·B_s inside each chunk, tiles on or below the diagonal
    L, G, N, Q, NC,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    nqb = tl.cdiv(Q, BLOCK_Q)
    c = tl.program_id(0) // (nqb * nqb)
    tb = (tl.program_id(0) // nqb) % nqb
    sb = tl.program_id(0) % nqb
    if sb > tb:  # above the diagonal: never read (t >= s only)
        return
    bb = (tl.program_id(1) // G).to(tl.int64)
    gg = tl.program_id(1) % G
    offs_t = tb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_s = sb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    t = c * Q + offs_t
    s = c * Q + offs_s
    vt = (offs_t < Q) & (t < L)
    vs = (offs_s < Q) & (s < L)
    acc = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    c0 = (c * Q).to(tl.int64)  # 64-bit chunk base, 32-bit offsets inside (see _state_kernel)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c_t = tl.load(
            C + bb * sc_b + c0 * sc_l + offs_t[:, None] * sc_l + gg * sc_g + offs_n[None, :] * sc_n,
            mask=vt[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        b_s = tl.load(
            B + bb * sb_b + c0 * sb_l + offs_s[:, None] * sb_l + gg * sb_g + offs_n[None, :] * sb_n,
            mask=vs[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        acc += _dot_raw(c_t, tl.trans(b_s), PREC, UPCAST)  # raw inputs: exact products for bf16
    out = CB + ((bb * NC + c) * G + gg) * Q * Q + offs_t[:, None] * Q + offs_s[None, :]
    tl.store(out, acc, mask=(offs_t < Q)[:, None] & (offs_s < Q)[None, :])


@triton.jit
def _bwd_w_kernel(
    X, sx_b, sx_l, sx_h, sx_p,
    DY, sd_b, sd_l, sd_h, sd_p,
    CB,  # (b, nc, g, Q, Q) float32: C_t·B_s, from _cb_kernel
    W,  # (b, nc, g, Q, Q) float32 out: W[s, t] = sum over the group's heads of dt_s L[t, s] x_s·dy_t
    ACUM, DT, SEQ,
    DACUM_PART,  # (b, h, 2, nqb, Lp) float32 out: d acum through y inside the chunk, [0] the source half
    # (at s, one partial per target tile), [1] the target half (at t, per source tile); tiles above the
    # diagonal are left unwritten (``_dacum_kernel`` reads only the others)
    L, Lp, H, P, Q, R, NC,
    HAS_SEQ: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    nqb = tl.cdiv(Q, BLOCK_Q)
    c = tl.program_id(0) // (nqb * nqb)
    tb = (tl.program_id(0) // nqb) % nqb
    sb = tl.program_id(0) % nqb
    if sb > tb:  # above the diagonal: L[t, s] = 0
        return
    G = H // R
    bb = (tl.program_id(1) // G).to(tl.int64)
    gg = tl.program_id(1) % G
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < P
    offs_s = sb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_t = tb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    s = c * Q + offs_s
    t = c * Q + offs_t
    vs = (offs_s < Q) & (s < L)
    vt = (offs_t < Q) & (t < L)
    mask = (offs_t[None, :] >= offs_s[:, None]) & vt[None, :] & vs[:, None]
    if HAS_SEQ:
        seq_s = tl.load(SEQ + bb * Lp + c * Q + offs_s, mask=offs_s < Q, other=-2)
        seq_t = tl.load(SEQ + bb * Lp + c * Q + offs_t, mask=offs_t < Q, other=-1)
        mask = mask & (seq_s[:, None] == seq_t[None, :])
    tile = ((bb * NC + c) * G + gg) * Q * Q
    bc = tl.load(CB + tile + offs_t[None, :] * Q + offs_s[:, None], mask=mask, other=0.0)  # (s, t)
    acc_w = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    c0 = (c * Q).to(tl.int64)  # 64-bit chunk base, 32-bit offsets inside (see _state_kernel)
    for i in range(R):
        hh = gg * R + i
        row = (bb * H + hh) * Lp + c * Q
        acum_s = tl.load(ACUM + row + offs_s, mask=offs_s < Q, other=0.0)
        acum_t = tl.load(ACUM + row + offs_t, mask=offs_t < Q, other=0.0)
        dt_s = tl.load(DT + row + offs_s, mask=offs_s < Q, other=0.0)
        x_s = tl.load(
            X + bb * sx_b + c0 * sx_l + offs_s[:, None] * sx_l + hh * sx_h + offs_p[None, :] * sx_p,
            mask=vs[:, None] & mp[None, :],
            other=0.0,
        )
        dy_t = tl.load(
            DY + bb * sd_b + c0 * sd_l + offs_t[:, None] * sd_l + hh * sd_h + offs_p[None, :] * sd_p,
            mask=vt[:, None] & mp[None, :],
            other=0.0,
        )
        decay = tl.exp(tl.where(mask, acum_t[None, :] - acum_s[:, None], float("-inf")))  # (s, t)
        w = decay * _dot_raw(x_s, tl.trans(dy_t), PREC, UPCAST) * dt_s[:, None]  # raw x_s·dy_t: exact
        acc_w += w
        bw = bc * w
        part = DACUM_PART + (bb * H + hh) * 2 * nqb * Lp + c * Q
        tl.store(part + tb * Lp + offs_s, -tl.sum(bw, axis=1), mask=offs_s < Q)
        tl.store(part + (nqb + sb) * Lp + offs_t, tl.sum(bw, axis=0), mask=offs_t < Q)
    tl.store(
        W + tile + offs_s[:, None] * Q + offs_t[None, :], acc_w, mask=(offs_s < Q)[:, None] & (offs_t < Q)[None, :]
    )


@triton.jit
def _bwd_dx_kernel(
    X, sx_b, sx_l, sx_h, sx_p,
    B, sb_b, sb_l, sb_g, sb_n,
    DY, sd_b, sd_l, sd_h, sd_p,
    CB,  # (b, nc, g, Q, Q) float32: C_t·B_s, from _cb_kernel
    ACUM, DT, SEQ, DST, Dp,  # DST: (b, nc, h, p, n) float32, dL/dS_{c+1} (= dL/d st_c)
    DX, sdx_b, sdx_l, sdx_h, sdx_p,  # (b, l, h, p) out
    DDT, DACUM,  # (b, h, Lp) float32 out: dt's direct gradient, d acum through the chunk state
    DD_PART,  # (b, nc * nqb, h) float32 out: partial sums of dy·x
    L, Lp, H, P, N, Q, R, NC,
    HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, SINGLE_Y: tl.constexpr,
):  # fmt: skip
    nqb = tl.cdiv(Q, BLOCK_Q)
    c = tl.program_id(0) // nqb
    sb = tl.program_id(0) % nqb
    bb = (tl.program_id(1) // H).to(tl.int64)
    hh = tl.program_id(1) % H
    gg = hh // R
    G = H // R
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < P
    row = (bb * H + hh) * Lp + c * Q
    tile = ((bb * NC + c) * G + gg) * Q * Q
    # Scalar 64-bit bases at the chunk's first row; the per-element offsets inside stay 32-bit
    # (fewer registers: this kernel spilled twice as much with 64-bit offsets per element).
    c0 = (c * Q).to(tl.int64)
    x_base = X + bb * sx_b + c0 * sx_l + hh * sx_h
    dy_base = DY + bb * sd_b + c0 * sd_l + hh * sd_h
    b_base = B + bb * sb_b + c0 * sb_l + gg * sb_g
    dst_base = DST + ((bb * NC + c) * H + hh) * P * N

    offs_s = sb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    s = c * Q + offs_s
    vs = (offs_s < Q) & (s < L)
    acum_s = tl.load(ACUM + row + offs_s, mask=offs_s < Q, other=0.0)
    dt_s = tl.load(DT + row + offs_s, mask=offs_s < Q, other=0.0)
    if HAS_SEQ:
        seq_s = tl.load(SEQ + bb * Lp + c * Q + offs_s, mask=offs_s < Q, other=-2)
        seq_last = tl.load(SEQ + bb * Lp + c * Q + Q - 1)
        to_state = vs & (seq_s == seq_last)
    else:
        to_state = vs
    # Through the chunk state: st_c = sum_s scale_s dt_s x_s ⊗ B_s (n in blocks, to bound registers).
    acc_x = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        b_s = tl.load(
            b_base + offs_s[:, None] * sb_l + offs_n[None, :] * sb_n,
            mask=vs[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        dst = tl.load(
            dst_base + offs_p[None, :] * N + offs_n[:, None],
            mask=mp[None, :] & (offs_n < N)[:, None],
            other=0.0,
        )  # (n, p)
        acc_x += _dot_rf(b_s, dst, PREC, UPCAST)
    acc_x = acc_x * tl.where(to_state, tl.exp(tl.load(ACUM + row + Q - 1) - acum_s), 0.0)[:, None]
    xf = tl.load(
        x_base + offs_s[:, None] * sx_l + offs_p[None, :] * sx_p,
        mask=vs[:, None] & mp[None, :],
        other=0.0,
    ).to(tl.float32)
    tl.store(DACUM + row + offs_s, -tl.sum(acc_x * xf, axis=1) * dt_s, mask=offs_s < Q)
    # Through y inside the chunk: y_t += sum_s (C_t·B_s) L[t, s] dt_s x_s, for t >= s.
    for tb in range(sb, nqb):
        offs_t = tb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        t = c * Q + offs_t
        vt = (offs_t < Q) & (t < L)
        acum_t = tl.load(ACUM + row + offs_t, mask=offs_t < Q, other=0.0)
        dy_t = tl.load(
            dy_base + offs_t[:, None] * sd_l + offs_p[None, :] * sd_p,
            mask=vt[:, None] & mp[None, :],
            other=0.0,
        )
        mask = (offs_t[None, :] >= offs_s[:, None]) & vt[None, :] & vs[:, None]
        if HAS_SEQ:
            seq_t = tl.load(SEQ + bb * Lp + c * Q + offs_t, mask=offs_t < Q, other=-1)
            mask = mask & (seq_s[:, None] == seq_t[None, :])
        decay = tl.exp(tl.where(mask, acum_t[None, :] - acum_s[:, None], float("-inf")))  # (s, t)
        bc = tl.load(CB + tile + offs_t[None, :] * Q + offs_s[:, None], mask=mask, other=0.0)  # (s, t)
        if SINGLE_Y:
            acc_x += _dot_f1r(bc * decay, dy_t, PREC, UPCAST)
        else:
            acc_x += _dot_fr(bc * decay, dy_t, PREC, UPCAST)
    dyf = tl.load(
        dy_base + offs_s[:, None] * sd_l + offs_p[None, :] * sd_p,
        mask=vs[:, None] & mp[None, :],
        other=0.0,
    ).to(tl.float32)
    dx = acc_x * dt_s[:, None]
    if HAS_D:
        dx += tl.load(Dp + hh).to(tl.float32) * dyf
    tl.store(
        DX + bb * sdx_b + c0 * sdx_l + hh * sdx_h + offs_s[:, None] * sdx_l + offs_p[None, :] * sdx_p,
        dx.to(DX.dtype.element_ty),
        mask=vs[:, None] & mp[None, :],
    )
    tl.store(DDT + row + offs_s, tl.sum(acc_x * xf, axis=1), mask=offs_s < Q)
    tl.store(DD_PART + (bb * NC * nqb + tl.program_id(0)) * H + hh, tl.sum(tl.sum(dyf * xf, axis=1), axis=0))


@triton.jit
def _bwd_dbc_kernel(
    X, sx_b, sx_l, sx_h, sx_p,  # x (dB) or dy (dC)
    Y, sy_b, sy_l, sy_g, sy_n,  # C (dB) or B (dC): the other side of W
    Z, sz_b, sz_l, sz_g, sz_n,  # C (dC): dacum's partner; unused for dB
    W,  # (b, nc, g, Q, Q) float32, from _bwd_w_kernel
    ACUM, DT, SEQ,
    ST,  # (b, NSLOTS, h, p, n) float32: dL/dS_{c+1} (dB) or the state S_c entering chunk c (dC)
    OUT, so_b, so_l, so_g, so_n,  # (b, l, g, n) out: dB or dC
    DACUM_PART,  # (b, h, nnb, Lp) float32 out (dC): d acum through the entering state, per n block
    L, Lp, H, P, N, Q, R, NC, NSLOTS,
    MODE: tl.constexpr,  # 0: dB at source rows s; 1: dC at target rows t
    HAS_SEQ: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, SINGLE_STATE: tl.constexpr, SINGLE_W: tl.constexpr,  # see DB_STATE_SINGLE_PRODUCT
):  # fmt: skip
    nqb = tl.cdiv(Q, BLOCK_Q)
    nnb = tl.cdiv(N, BLOCK_N)
    c = tl.program_id(0) // (nqb * nnb)
    qb = (tl.program_id(0) // nnb) % nqb
    nb = tl.program_id(0) % nnb
    G = H // R
    bb = (tl.program_id(1) // G).to(tl.int64)
    gg = tl.program_id(1) % G
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < P
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q = c * Q + offs_q
    vq = (offs_q < Q) & (q < L)
    c0 = (c * Q).to(tl.int64)  # scalar 64-bit bases at the chunk's first row, 32-bit offsets inside
    if MODE == 0:  # positions feeding the chunk state: those in the chunk's last document
        ref_pos = c * Q + Q - 1
    else:  # positions reading the entering state: those in the document before the chunk
        ref_pos = tl.maximum(c * Q - 1, 0)
        z_q = tl.load(
            Z + bb * sz_b + c0 * sz_l + gg * sz_g + offs_q[:, None] * sz_l + offs_n[None, :] * sz_n,
            mask=vq[:, None] & mn[None, :],
            other=0.0,
        ).to(tl.float32)
    if HAS_SEQ:
        seq_q = tl.load(SEQ + bb * Lp + c * Q + offs_q, mask=offs_q < Q, other=-1)
        linked = vq & (seq_q == tl.load(SEQ + bb * Lp + ref_pos))
    else:
        linked = vq
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    # Through the state, head by head.
    for i in range(R):
        hh = gg * R + i
        row = (bb * H + hh) * Lp + c * Q
        acum_q = tl.load(ACUM + row + offs_q, mask=offs_q < Q, other=0.0)
        if MODE == 0:
            scale = tl.exp(tl.load(ACUM + row + Q - 1) - acum_q) * tl.load(
                DT + row + offs_q, mask=offs_q < Q, other=0.0
            )
        else:
            scale = tl.exp(acum_q)
        x_q = tl.load(
            X + bb * sx_b + c0 * sx_l + hh * sx_h + offs_q[:, None] * sx_l + offs_p[None, :] * sx_p,
            mask=vq[:, None] & mp[None, :],
            other=0.0,
        )
        st = tl.load(
            ST + ((bb * NSLOTS + c) * H + hh) * P * N + offs_p[:, None] * N + offs_n[None, :],
            mask=mp[:, None] & mn[None, :],
            other=0.0,
        )  # (p, n)
        if SINGLE_STATE and MODE == 0:  # dB's state term: nothing else reads it (dC's also feeds d acum)
            part = _dot_r1f(x_q, st, PREC, UPCAST)
        else:
            part = _dot_rf(x_q, st, PREC, UPCAST)
        part = part * tl.where(linked, scale, 0.0)[:, None]
        acc += part
        if MODE == 1:
            tl.store(
                DACUM_PART + ((bb * H + hh) * nnb + nb) * Lp + c * Q + offs_q,
                tl.sum(part * z_q, axis=1),
                mask=offs_q < Q,
            )
    # Inside the chunk, for the whole group at once: dB_s += sum_t W[s, t] C_t, dC_t += sum_s W[s, t] B_s.
    tile = W + ((bb * NC + c) * G + gg) * Q * Q
    if MODE == 0:
        lo = qb
        hi = nqb
    else:
        lo = 0
        hi = qb + 1
    for kb in range(lo, hi):
        offs_k = kb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        k = c * Q + offs_k
        y_k = tl.load(
            Y + bb * sy_b + c0 * sy_l + gg * sy_g + offs_k[:, None] * sy_l + offs_n[None, :] * sy_n,
            mask=((offs_k < Q) & (k < L))[:, None] & mn[None, :],
            other=0.0,
        )
        w_mask = (offs_q < Q)[:, None] & (offs_k < Q)[None, :]
        if MODE == 0:
            w = tl.load(tile + offs_q[:, None] * Q + offs_k[None, :], mask=w_mask, other=0.0)  # W[s=q, t=k]
        else:
            w = tl.load(tile + offs_k[None, :] * Q + offs_q[:, None], mask=w_mask, other=0.0)  # W[s=k, t=q]
        if SINGLE_W:
            acc += _dot_f1r(w, y_k, PREC, UPCAST)
        else:
            acc += _dot_fr(w, y_k, PREC, UPCAST)
    tl.store(
        OUT + bb * so_b + c0 * so_l + gg * so_g + offs_q[:, None] * so_l + offs_n[None, :] * so_n,
        acc.to(OUT.dtype.element_ty),
        mask=vq[:, None] & mn[None, :],
    )


@triton.jit
def _chunk_of_heads(H, Q, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """A program's chunk c, batch row, heads (offsets, mask) and rows in the chunk (offsets, mask),
    for a grid (chunks, batch, blocks of heads)."""
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, BLOCK_T)
    return tl.program_id(0), tl.program_id(1).to(tl.int64), offs_h, offs_h < H, offs_q, offs_q < Q


@triton.jit
def _prep_kernel(
    DT, sdt_b, sdt_l, sdt_h,  # (b, l, h) step sizes
    A,  # (h,) float32
    SEQ_IN, ss_b, ss_l,  # (b, l) document ids (read when HAS_SEQ)
    DT_P, ACUM,  # (b, h, Lp) float32 out: dt per head, padded with 0; cumulative log-decay in each chunk
    SEQ_P,  # (b, Lp) int32 out (HAS_SEQ): the ids, the last one repeated over the padding
    DECAY,  # (b, h, nc) float32 out: exp(acum_last), or 0 where a document starts inside the chunk
    L, Lp, H, Q, NC,
    HAS_SEQ: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, FLOOR: tl.constexpr,
):  # fmt: skip
    c, bb, offs_h, mh, offs_q, mq = _chunk_of_heads(H, Q, BLOCK_T, BLOCK_H)
    t = c * Q + offs_q
    c0 = (c * Q).to(tl.int64)  # 64-bit chunk base (dt may be a column slice of the projection: wide rows)
    dt = tl.load(
        DT + bb * sdt_b + c0 * sdt_l + offs_q[:, None] * sdt_l + offs_h[None, :] * sdt_h,
        mask=(mq & (t < L))[:, None] & mh[None, :],
        other=0.0,
    ).to(tl.float32)
    # A step's log-decay clamped at -FLOOR (precision.LOG_DECAY_FLOOR): its decay is 0 either way, and the later
    # cumulative sums of the chunk stay small enough to difference finely.
    a = tl.load(A + offs_h, mask=mh, other=0.0)
    acum = tl.cumsum(tl.maximum(dt * a[None, :], -FLOOR, propagate_nan=tl.PropagateNan.ALL), axis=0)
    rows = (bb * H + offs_h[None, :]) * Lp + c * Q + offs_q[:, None]
    tl.store(DT_P + rows, dt, mask=mq[:, None] & mh[None, :])
    tl.store(ACUM + rows, acum, mask=mq[:, None] & mh[None, :])
    decay = tl.exp(tl.sum(tl.where((offs_q == Q - 1)[:, None], acum, 0.0), axis=0))
    if HAS_SEQ:
        seq = SEQ_IN + bb * ss_b
        last = tl.load(seq + tl.minimum(c * Q + Q - 1, L - 1) * ss_l)
        before = tl.load(seq + tl.maximum(c * Q - 1, 0) * ss_l)
        decay = tl.where(last == before, decay, 0.0)  # no document starts inside the chunk (or at its start)
        if tl.program_id(2) == 0:
            ids = tl.load(seq + tl.minimum(t, L - 1) * ss_l, mask=mq, other=0)
            tl.store(SEQ_P + bb * Lp + t, ids.to(tl.int32), mask=mq)
    tl.store(DECAY + (bb * H + offs_h) * NC + c, decay, mask=mh)


@triton.jit
def _dacum_kernel(
    DACUM_ST,  # (b, h, Lp) float32: d acum through the chunk state
    DACUM_IN,  # (b, h, NNB, Lp) float32: through the entering state, per n block
    DACUM_Y,  # (b, h, 2 * NQB, Lp) float32: through y inside the chunk, per tile (only tiles on or below the diagonal written)
    DLAST,  # (b, h, nc, NBLK) float32: partial d acum_last through the next chunk's state
    DDT_DIRECT, DT_P, A,  # (b, h, Lp), (b, h, Lp), (h,) float32
    DDT, sdd_b, sdd_l, sdd_h,  # (b, l, h) out: dt's gradient
    DA_PART,  # (b, nc, h) float32 out: sum over the chunk of d a_t * dt_t (dA's partial sums)
    L, Lp, H, Q, NC, NNB, NQB, NBLK, BQ,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_BLK: tl.constexpr, FLOOR: tl.constexpr,
):  # fmt: skip
    c, bb, offs_h, mh, offs_q, mq = _chunk_of_heads(H, Q, BLOCK_T, BLOCK_H)
    m = mq[:, None] & mh[None, :]
    head = bb * H + offs_h[None, :]
    pos = c * Q + offs_q[:, None]
    d = tl.load(DACUM_ST + head * Lp + pos, mask=m, other=0.0)
    for k in range(NNB):
        d += tl.load(DACUM_IN + (head * NNB + k) * Lp + pos, mask=m, other=0.0)
    tile = offs_q // BQ
    for j in range(NQB):  # source halves from target tiles j >= the row's tile, target halves from source tiles j <= it
        d += tl.load(DACUM_Y + (head * 2 * NQB + j) * Lp + pos, mask=m & (tile <= j)[:, None], other=0.0)
        d += tl.load(DACUM_Y + (head * 2 * NQB + NQB + j) * Lp + pos, mask=m & (tile >= j)[:, None], other=0.0)
    offs_k = tl.arange(0, BLOCK_BLK)
    dlast = tl.load(
        DLAST + (head * NC + c) * NBLK + offs_k[:, None], mask=(offs_k < NBLK)[:, None] & mh[None, :], other=0.0
    )
    d += tl.where((offs_q == Q - 1)[:, None], tl.sum(dlast, axis=0)[None, :], 0.0)
    da = tl.cumsum(d, axis=0, reverse=True)  # d a_t = sum over u >= t in the chunk of d acum_u
    a = tl.load(A + offs_h, mask=mh, other=0.0)
    dt = tl.load(DT_P + head * Lp + pos, mask=m, other=0.0)
    da = tl.where(dt * a[None, :] < -FLOOR, 0.0, da)  # the clamp of _prep_kernel passes no gradient
    ddt = tl.load(DDT_DIRECT + head * Lp + pos, mask=m, other=0.0) + da * a[None, :]
    t = c * Q + offs_q
    tl.store(
        DDT + bb * sdd_b + (c * Q).to(tl.int64) * sdd_l + offs_q[:, None] * sdd_l + offs_h[None, :] * sdd_h,
        ddt.to(DDT.dtype.element_ty),
        mask=m & (t < L)[:, None],
    )
    tl.store(DA_PART + (bb * NC + c) * H + offs_h, tl.sum(da * dt, axis=0), mask=mh)


# --------------------------------------------------------------------------------------------------
# launchers


def _prepare(dt: torch.Tensor, A: torch.Tensor, seq_idx: torch.Tensor | None, Q: int):
    """Per-chunk float32 quantities, padded to whole chunks (padding steps: dt = 0, same document), in one
    launch (:func:`_prep_kernel`).

    Returns dt_p (b, h, Lp), acum (b, h, Lp), seq_p (b, Lp) int32 or None, decay (b, h, nc).
    """
    b, L, h = dt.shape
    nc = triton.cdiv(L, Q)
    Lp = nc * Q
    f32 = dict(device=dt.device, dtype=torch.float32)
    dt_p, acum, decay = torch.empty(b, h, Lp, **f32), torch.empty(b, h, Lp, **f32), torch.empty(b, h, nc, **f32)
    seq_p = torch.empty(b, Lp, device=dt.device, dtype=torch.int32) if seq_idx is not None else None
    seq = seq_idx if seq_idx is not None else dt
    bh = min(_pow2(h, 1), PREP_BLOCK_H)
    _prep_kernel[(nc, b, triton.cdiv(h, bh))](
        dt, *dt.stride(), A.float().contiguous(), seq, seq.stride(0), seq.stride(1),
        dt_p, acum, seq_p if seq_p is not None else dt_p, decay,
        L, Lp, h, Q, nc,
        HAS_SEQ=seq_idx is not None, BLOCK_T=_pow2(Q), BLOCK_H=bh, FLOOR=LOG_DECAY_FLOOR, num_warps=4,
    )  # fmt: skip
    return dt_p, acum, seq_p, decay


def _states(x, B, acum, dt_p, seq_p, decay, init, Q):
    """(b, nc + 1, h, p, n) float32: the state entering each chunk, and the final state in the last slot."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = decay.shape[-1]
    Lp = nc * Q
    S = torch.empty(b, nc + 1, h, p, n, device=x.device, dtype=torch.float32)
    bp, bn = min(_pow2(p), 64), min(_pow2(n), 64)
    dummy = acum
    _state_kernel[(nc, b * h, triton.cdiv(p, bp) * triton.cdiv(n, bn))](
        x, *x.stride(), B, *B.stride(), acum, dt_p, seq_p if seq_p is not None else dummy, S,
        L, Lp, h, p, n, Q, h // g, nc + 1, 1,
        MODE=0, HAS_SEQ=seq_p is not None,
        BLOCK_Q=min(BLOCK_Q, _pow2(Q)), BLOCK_P=bp, BLOCK_N=bn, PREC=DOT_PRECISION, UPCAST=_INTERPRET, num_warps=NUM_WARPS_FWD,
        **_stages(STATE_STAGES),
    )  # fmt: skip
    block = 1024
    _pass_fwd_kernel[(b * h, triton.cdiv(p * n, block))](
        S, init.float().contiguous() if init is not None else dummy, decay, h, p * n, nc,
        HAS_INIT=init is not None, BLOCK=block, STAGES=PASS_STAGES, num_warps=4,
    )  # fmt: skip
    return S


def ssd_forward(x, dt, A, B, C, D, seq_idx, init, Q):
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dt_p, acum, seq_p, decay = _prepare(dt, A, seq_idx, Q)
    nc = decay.shape[-1]
    S = _states(x, B, acum, dt_p, seq_p, decay, init, Q)
    y = torch.empty(b, L, h, p, device=x.device, dtype=_out_dtype(x.dtype))
    bq = min(BLOCK_Q, _pow2(Q))
    bp = min(_pow2(p), 64)
    _scan_fwd_kernel[(nc * triton.cdiv(Q, bq), b * h, triton.cdiv(p, bp))](
        x, *x.stride(), B, *B.stride(), C, *C.stride(),
        acum, dt_p, seq_p if seq_p is not None else acum, S, D if D is not None else acum, y,
        L, nc * Q, h, p, n, Q, h // g, nc,
        HAS_SEQ=seq_p is not None, HAS_D=D is not None,
        BLOCK_Q=bq, BLOCK_P=bp, BLOCK_N=_pow2(n), PREC=DOT_PRECISION, UPCAST=_INTERPRET,
        SINGLE_STATE=FWD_STATE_SINGLE_PRODUCT, num_warps=NUM_WARPS_FWD, **_stages(SCAN_STAGES),
    )  # fmt: skip
    return y.to(x.dtype), S


def ssd_backward(dy, dfinal, S, x, dt, A, B, C, D, seq_idx, init, Q, out=None):
    """Gradients; ``S`` (b, nc + 1, h, p, n) float32 is the forward's states (only read). ``out``:
    (dx, dB, dC) tensors (any strides, e.g. views of one wider gradient) to write those into
    instead of new ones; each used only where its dtype is what the kernels store."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    dt_p, acum, seq_p, decay = _prepare(dt, A, seq_idx, Q)
    nc = decay.shape[-1]
    Lp = nc * Q
    dy = dy.to(x.dtype)
    seq_arg = seq_p if seq_p is not None else acum

    # Gradient of each entering state from y, then the reverse scan over chunks (in place).
    dS = torch.empty(b, nc, h, p, n, device=x.device, dtype=torch.float32)
    bp, bn = min(_pow2(p), 64), min(_pow2(n), 64)
    _state_kernel[(nc, b * h, triton.cdiv(p, bp) * triton.cdiv(n, bn))](
        dy, *dy.stride(), C, *C.stride(), acum, dt_p, seq_arg, dS,
        L, Lp, h, p, n, Q, r, nc, 0,
        MODE=1, HAS_SEQ=seq_p is not None,
        BLOCK_Q=min(BLOCK_Q, _pow2(Q)), BLOCK_P=bp, BLOCK_N=bn, PREC=DOT_PRECISION, UPCAST=_INTERPRET, num_warps=NUM_WARPS_FWD,
        **_stages(STATE_STAGES),
    )  # fmt: skip
    block = 1024
    nblk = triton.cdiv(p * n, block)
    dinit = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    dlast = torch.empty(b, h, nc, nblk, device=x.device, dtype=torch.float32)
    _pass_bwd_kernel[(b * h, nblk)](
        dS, S, dfinal.contiguous() if dfinal is not None else acum, decay, dinit, dlast,
        h, p * n, nc, nblk,
        HAS_DFINAL=dfinal is not None, BLOCK=block, STAGES=PASS_STAGES, num_warps=4,
    )  # fmt: skip

    bq = min(BLOCK_Q_BWD, _pow2(Q))
    nqb = triton.cdiv(Q, bq)
    dx, dB, dC = (
        given
        if given is not None and given.dtype == _out_dtype(t.dtype)
        else t.new_empty(t.shape, dtype=_out_dtype(t.dtype))
        for given, t in zip(out or (None, None, None), (x, B, C))
    )
    ddt_direct = torch.empty(b, h, Lp, device=x.device, dtype=torch.float32)
    bq_dx = min(DX_BLOCK_Q or BLOCK_Q_BWD, _pow2(Q))  # dx's own tiles: C·B is read only where t >= s
    dD_part = torch.empty(b, nc * triton.cdiv(Q, bq_dx), h, device=x.device, dtype=torch.float32)
    # d acum in parts: through the chunk state (at s), through the entering state (at t, per n
    # block), and through y inside the chunk (both halves, per tile; tiles above the diagonal are
    # never written, and `_dacum_kernel` never reads them).
    dacum_st = torch.empty(b, h, Lp, device=x.device, dtype=torch.float32)
    bn = min(_pow2(n), BLOCK_N_BWD)
    nnb = triton.cdiv(n, bn)
    dacum_in = torch.empty(b, h, nnb, Lp, device=x.device, dtype=torch.float32)
    dacum_y = torch.empty(b, h, 2 * nqb, Lp, device=x.device, dtype=torch.float32)
    cb = torch.empty(b, nc, g, Q, Q, device=x.device, dtype=torch.float32)
    w = torch.empty(b, nc, g, Q, Q, device=x.device, dtype=torch.float32)
    has_seq = seq_p is not None
    kw = dict(BLOCK_Q=bq, PREC=DOT_PRECISION, UPCAST=_INTERPRET, num_warps=NUM_WARPS_BWD) | _stages(BWD_STAGES)
    _cb_kernel[(nc * nqb * nqb, b * g)](B, *B.stride(), C, *C.stride(), cb, L, g, n, Q, nc, BLOCK_N=bn, **kw)
    _bwd_w_kernel[(nc * nqb * nqb, b * g)](
        x, *x.stride(), dy, *dy.stride(), cb, w, acum, dt_p, seq_arg, dacum_y,
        L, Lp, h, p, Q, r, nc,
        HAS_SEQ=has_seq, BLOCK_P=_pow2(p), **(kw | _stages(W_STAGES)),
    )  # fmt: skip
    _bwd_dx_kernel[(nc * triton.cdiv(Q, bq_dx), b * h)](
        x, *x.stride(), B, *B.stride(), dy, *dy.stride(), cb,
        acum, dt_p, seq_arg, dS, D if D is not None else acum, dx, *dx.stride(), ddt_direct, dacum_st, dD_part,
        L, Lp, h, p, n, Q, r, nc,
        HAS_SEQ=has_seq, HAS_D=D is not None, BLOCK_P=_pow2(p), SINGLE_Y=DX_SINGLE_PRODUCT,
        **(kw | {"BLOCK_Q": bq_dx, "BLOCK_N": min(_pow2(n), DX_BLOCK_N or BLOCK_N_BWD)} | _stages(DX_STAGES)),
    )  # fmt: skip
    for mode, (xx, yy, zz, st, out, slots) in enumerate([(x, C, C, dS, dB, nc), (dy, B, C, S, dC, nc + 1)]):
        _bwd_dbc_kernel[(nc * nqb * nnb, b * g)](
            xx, *xx.stride(), yy, *yy.stride(), zz, *zz.stride(), w, acum, dt_p, seq_arg, st, out, *out.stride(), dacum_in,
            L, Lp, h, p, n, Q, r, nc, slots,
            MODE=mode, HAS_SEQ=has_seq, BLOCK_P=_pow2(p), BLOCK_N=bn, SINGLE_STATE=DB_STATE_SINGLE_PRODUCT, SINGLE_W=DBC_W_SINGLE_PRODUCT, **kw,
        )  # fmt: skip

    # d acum (its parts summed) -> d a (a reverse cumulative sum inside each chunk) -> dt and A, in one launch.
    ddt = torch.empty(b, L, h, device=x.device, dtype=_out_dtype(dt.dtype))
    da_part = torch.empty(b, nc, h, device=x.device, dtype=torch.float32)
    bh = min(_pow2(h, 1), PREP_BLOCK_H)
    _dacum_kernel[(nc, b, triton.cdiv(h, bh))](
        dacum_st, dacum_in, dacum_y, dlast, ddt_direct, dt_p, A.float().contiguous(), ddt, *ddt.stride(), da_part,
        L, Lp, h, Q, nc, nnb, nqb, nblk, bq,
        BLOCK_T=_pow2(Q), BLOCK_H=bh, BLOCK_BLK=_pow2(nblk, 1), FLOOR=LOG_DECAY_FLOOR, num_warps=4,
    )  # fmt: skip
    dA = da_part.sum((0, 1))
    dD = dD_part.sum((0, 1))
    return dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dinit


@contextlib.contextmanager
def launch_context(t: torch.Tensor):
    """Kernels launch on ``t``'s device; the few torch ops around them stay float32 under autocast."""
    with torch.autocast(device_type=t.device.type, enabled=False):
        if t.is_cuda:
            with torch.cuda.device(t.device):
                yield
        else:
            yield


# --------------------------------------------------------------------------------------------------
# the op, as torch.compile sees it


@torch.library.custom_op("hybridlm::ssd_chunk_scan", mutates_args=())
def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton SSD forward: ``(y (b, l, h, p) in x's dtype, states (b, nc + 1, h, p, n) float32)``.

    ``states[:, c]`` enters chunk ``c`` (``nc = ceil(l / chunk_size)``); ``states[:, nc]`` is the
    final state. The backward reads them back (saved, not recomputed).
    """
    record("ssd", "triton")  # also at run time inside compiled graphs (tracing records nothing)
    with launch_context(x):
        return ssd_forward(x, dt, A, B, C, D, seq_idx, initial_state, chunk_size)


@ssd_chunk_scan.register_fake
def _(x, dt, A, B, C, D, seq_idx, initial_state, chunk_size):
    # Shapes, dtypes and (contiguous) strides exactly as the real op returns them.
    b, seqlen, h, p = x.shape
    nc = -(-seqlen // chunk_size)
    return x.new_empty(x.shape), x.new_empty((b, nc + 1, h, p, B.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("hybridlm::ssd_chunk_scan_bwd", mutates_args=())
def ssd_chunk_scan_bwd(
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    states: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton SSD backward: ``(dx, ddt, dA, dB, dC, dD (h,) float32, d initial_state (b, h, p, n) float32)``."""
    with launch_context(x):
        return ssd_backward(dy, dfinal, states, x, dt, A, B, C, D, seq_idx, initial_state, chunk_size)


@ssd_chunk_scan_bwd.register_fake
def _(dy, dfinal, states, x, dt, A, B, C, D, seq_idx, initial_state, chunk_size):
    b, _, h, p = x.shape
    f32 = torch.float32
    return (
        x.new_empty(x.shape),
        dt.new_empty(dt.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        x.new_empty((h,), dtype=f32),
        x.new_empty((b, h, p, B.shape[-1]), dtype=f32),
    )


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, seq_idx, initial_state, chunk_size = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, seq_idx, initial_state, output[1])
    ctx.chunk_size = chunk_size
    # An unused states output gets no zero-filled gradient (277 MB per layer at bench-1.3b's shape).
    ctx.set_materialize_grads(False)


def _backward_rule(ctx, dy, dstates):
    x, dt, A, B, C, D, seq_idx, initial_state, states = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    # Only the final state leaves the op (``ssd_chunked_triton``); the entering states are internal.
    dfinal = dstates[:, -1] if dstates is not None else None
    dx, ddt, dA, dB, dC, dD, dinit = ssd_chunk_scan_bwd(
        dy, dfinal, states, x, dt, A, B, C, D, seq_idx, initial_state, ctx.chunk_size
    )
    dD = dD.to(D.dtype) if D is not None else None
    dinit = dinit.to(initial_state.dtype) if initial_state is not None else None
    return dx, ddt, dA, dB, dC, dD, None, dinit, None


ssd_chunk_scan.register_autograd(_backward_rule, setup_context=_setup_context)


def ssd_chunked_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`hybridlm.ops.ssd.ssd_chunked` (same arguments, same results)."""
    rows = rows_per_launch(x.shape[2])  # grids hold batch x heads programs along one dimension
    if x.shape[0] > rows:

        def part(x, dt, B, C, seq_idx, initial_state):
            return ssd_chunked_triton(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state, return_final_state)

        return in_row_groups(part, rows, x, dt, B, C, seq_idx, initial_state)
    dtype = x.dtype
    if D is not None:
        D = D.contiguous()  # (h,), read as D_ptr + head (a no-op for a parameter)
    if not (x.dtype == B.dtype == C.dtype):
        # The kernels multiply raw x·dy and C·B tiles on tensor cores, which needs one dtype.
        x, B, C = x.float(), B.float(), C.float()
    y, states = ssd_chunk_scan(x, dt, A, B, C, D, seq_idx, initial_state, int(chunk_size))
    y = y.to(dtype)
    # A clone, so that a cache holding the final state does not keep every chunk's state alive.
    return (y, states[:, -1].clone()) if return_final_state else y
