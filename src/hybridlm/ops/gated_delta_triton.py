"""Triton kernels for the chunked gated delta rule, forward and backward (the WY / UT-transform form).

Per (batch, head) and chunk of ``BT`` positions, with ``gc`` the log-decay summed from the chunk's
start, ``D[t,s] = exp(gc_t - gc_s)`` for ``s <= t`` in the same document (else 0), ``Γ_t =
exp(gc_t)`` if ``t`` still sees the state entering the chunk (else 0), ``γ_s = D[last, s]``::

    A  = strictly_lower(diag(β) (K Kᵀ ⊙ D))        T = (I + A)^-1   (block substitution)
    W  = T diag(β Γ) K                              U = T diag(β) V
    Vn = U - W H                                    (H: state entering the chunk, dk × dv)
    O  = scale (diag(Γ) Q H + (Q Kᵀ ⊙ D) Vn)
    H' = Γ_last H + Kᵀ diag(γ) Vn

Kernels: ``_prep`` (T, W, U; parallel over chunks), ``_state`` (H and Vn; sequential over chunks,
parallel over value columns, which evolve independently), ``_output`` (O; parallel). The backward
recomputes T, W, U, H, Vn rather than storing them, then runs ``_dvn_local`` (the part of dVn
that comes from O; parallel), ``_dstate`` (dH and dVn; sequential, in reverse), ``_grads_v``
(dv and the products summed over value columns; parallel) and ``_grads_k`` (dq, dk, dβ and the
gradient of ``gc``; parallel). The cumulative sum of ``g``, padding to
whole chunks and the document counter are plain torch around the op (see ``gated_delta_rule_triton``).

Every product accumulates in float32 and every intermediate is float32, whatever the input dtype.
Matrix products take float32 operands; ``DOT_PRECISION`` chooses how tensor cores multiply them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import grid as launch_grid
from .dispatch import record
from .grid import in_row_groups, rows_per_launch
from .precision import LOG_DECAY_FLOOR

#: ``tl.dot``'s input precision for float32 operands: "tf32" (tensor cores: operands rounded to a
#: 10-bit mantissa, sums in float32), "tf32x3" (about float32 products, three tf32 products each)
#: or "ieee". On an H200 (b=4, l=4096, 16 heads x 128) "tf32" ran fwd+bwd in 6.2 ms with bf16
#: error ratios 1.0-1.3 (issue 8's bar: <= 2); "tf32x3" took 19 ms for ratios of 1.00.
DOT_PRECISION = "tf32"


#: Larger key/value heads would need tiles beyond the shared memory of one Hopper SM.
MAX_HEAD_DIM = 128


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _decays(gc_ptr, doc_ptr, bh, b, L, t0, BT: tl.constexpr, HAS_DOC: tl.constexpr):
    """The chunk's decay factors: gc (BT,), D (BT, BT) incl. diagonal, Γ (BT,), γ (BT,), Γ_last."""
    r = tl.arange(0, BT)
    gc = tl.load(gc_ptr + bh * L + t0 + r)
    g_last = tl.load(gc_ptr + bh * L + t0 + BT - 1)
    lower = r[:, None] >= r[None, :]
    if HAS_DOC:
        doc = tl.load(doc_ptr + b * L + t0 + r)
        doc_last = tl.load(doc_ptr + b * L + t0 + BT - 1)
        prev = tl.load(doc_ptr + b * L + tl.maximum(t0 - 1, 0))
        lower = lower & (doc[:, None] == doc[None, :])
        enter = doc == prev
        to_end = doc == doc_last
        enter_last = doc_last == prev
    else:
        enter = r >= 0
        to_end = r >= 0
        enter_last = True
    D = tl.where(lower, tl.exp(gc[:, None] - gc[None, :]), 0.0)
    Gam = tl.where(enter, tl.exp(gc), 0.0)
    gam = tl.where(to_end, tl.exp(g_last - gc), 0.0)
    Gam_last = tl.where(enter_last, tl.exp(g_last), 0.0)
    return gc, D, Gam, gam, Gam_last


@triton.jit
def _prep_kernel(
    k_ptr, v_ptr, gc_ptr, beta_ptr, doc_ptr, t_ptr, w_ptr, u_ptr,
    L, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
    LOG2_BT: tl.constexpr,
):  # fmt: skip
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    t0 = i_t * BT
    r = tl.arange(0, BT)
    ok, ov = tl.arange(0, BK), tl.arange(0, BV)
    rows = (b * L + t0 + r) * H + h
    kk = tl.load(k_ptr + rows[:, None] * DK + ok[None, :], mask=ok[None, :] < DK, other=0.0).to(tl.float32)
    vv = tl.load(v_ptr + rows[:, None] * DV + ov[None, :], mask=ov[None, :] < DV, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + i_bh * L + t0 + r)
    _gc, D, Gam, _gam, _Gam_last = _decays(gc_ptr, doc_ptr, i_bh, b, L, t0, BT, HAS_DOC)
    strict = r[:, None] > r[None, :]
    A = tl.where(strict, tl.dot(kk, tl.trans(kk), input_precision=PREC) * D * beta[:, None], 0.0)
    # T = (I + A)^-1 by block forward substitution, doubling the block size: with T the inverse of
    # (I + A)'s diagonal blocks of size b, the inverse for blocks of 2b is T - T C T, C the part of
    # A below those blocks inside each 2b block ([[X, 0], [C, Y]]^-1 has -Y^-1 C X^-1 there).
    T = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in tl.static_range(LOG2_BT):
        b_ = 1 << i
        sel = (
            (r[:, None] // (2 * b_) == r[None, :] // (2 * b_))
            & ((r[:, None] // b_) % 2 == 1)
            & ((r[None, :] // b_) % 2 == 0)
        )
        C = tl.where(sel, A, 0.0)
        T -= tl.dot(T, tl.dot(C, T, input_precision=PREC), input_precision=PREC)
    out = i_bh * L + t0 + r
    tl.store(t_ptr + out[:, None] * BT + r[None, :], T)
    w = tl.dot(T, kk * (beta * Gam)[:, None], input_precision=PREC)
    tl.store(w_ptr + out[:, None] * BK + ok[None, :], w)
    u = tl.dot(T, vv * beta[:, None], input_precision=PREC)
    tl.store(u_ptr + out[:, None] * BV + ov[None, :], u)


@triton.jit
def _state_kernel(
    k_ptr, w_ptr, u_ptr, gc_ptr, doc_ptr, h0_ptr, h_ptr, vn_ptr, ht_ptr,
    L, NT, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVS: tl.constexpr,
    HAS_DOC: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    r = tl.arange(0, BT)
    ok, ov = tl.arange(0, BK), i_v * BVS + tl.arange(0, BVS)
    hmask = (ok[:, None] < DK) & (ov[None, :] < DV)
    if HAS_H0:
        state = tl.load(h0_ptr + i_bh * DK * DV + ok[:, None] * DV + ov[None, :], mask=hmask, other=0.0)
    else:
        state = tl.zeros((BK, BVS), dtype=tl.float32)
    for i_t in range(NT):
        t0 = i_t * BT
        tl.store(h_ptr + ((i_bh * NT + i_t) * BK + ok[:, None]) * BV + ov[None, :], state)
        out = i_bh * L + t0 + r
        w = tl.load(w_ptr + out[:, None] * BK + ok[None, :])
        u = tl.load(u_ptr + out[:, None] * BV + ov[None, :])
        vn = u - tl.dot(w, state, input_precision=PREC)
        tl.store(vn_ptr + out[:, None] * BV + ov[None, :], vn)
        rows = (b * L + t0 + r) * H + h
        kk = tl.load(k_ptr + rows[:, None] * DK + ok[None, :], mask=ok[None, :] < DK, other=0.0).to(tl.float32)
        _gc, _D, _Gam, gam, Gam_last = _decays(gc_ptr, doc_ptr, i_bh, b, L, t0, BT, HAS_DOC)
        state = state * Gam_last + tl.dot(tl.trans(kk * gam[:, None]), vn, input_precision=PREC)
    tl.store(ht_ptr + i_bh * DK * DV + ok[:, None] * DV + ov[None, :], state, mask=hmask)


@triton.jit
def _output_kernel(
    q_ptr, k_ptr, gc_ptr, doc_ptr, h_ptr, vn_ptr, o_ptr, scale,
    L, NT, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVS: tl.constexpr,
    HAS_DOC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    t0 = i_t * BT
    r = tl.arange(0, BT)
    ok, ov = tl.arange(0, BK), i_v * BVS + tl.arange(0, BVS)
    rows = (b * L + t0 + r) * H + h
    qq = tl.load(q_ptr + rows[:, None] * DK + ok[None, :], mask=ok[None, :] < DK, other=0.0).to(tl.float32)
    kk = tl.load(k_ptr + rows[:, None] * DK + ok[None, :], mask=ok[None, :] < DK, other=0.0).to(tl.float32)
    _gc, D, Gam, _gam, _Gam_last = _decays(gc_ptr, doc_ptr, i_bh, b, L, t0, BT, HAS_DOC)
    state = tl.load(h_ptr + ((i_bh * NT + i_t) * BK + ok[:, None]) * BV + ov[None, :])
    vn = tl.load(vn_ptr + (i_bh * L + t0 + r)[:, None] * BV + ov[None, :])
    P = tl.dot(qq, tl.trans(kk), input_precision=PREC) * D
    o = tl.dot(qq * Gam[:, None], state, input_precision=PREC) + tl.dot(P, vn, input_precision=PREC)
    tl.store(o_ptr + rows[:, None] * DV + ov[None, :], o * scale, mask=ov[None, :] < DV)


@triton.jit
def _dvn_local_kernel(
    q_ptr, k_ptr, gc_ptr, doc_ptr, do_ptr, dvn_ptr, scale,
    L, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVS: tl.constexpr,
    HAS_DOC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    t0 = i_t * BT
    r = tl.arange(0, BT)
    ok, ov = tl.arange(0, BK), i_v * BVS + tl.arange(0, BVS)
    rows = (b * L + t0 + r) * H + h
    qq = tl.load(q_ptr + rows[:, None] * DK + ok[None, :], mask=ok[None, :] < DK, other=0.0).to(tl.float32)
    kk = tl.load(k_ptr + rows[:, None] * DK + ok[None, :], mask=ok[None, :] < DK, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + rows[:, None] * DV + ov[None, :], mask=ov[None, :] < DV, other=0.0).to(tl.float32)
    _gc, D, _Gam, _gam, _Gam_last = _decays(gc_ptr, doc_ptr, i_bh, b, L, t0, BT, HAS_DOC)
    P = tl.dot(qq, tl.trans(kk), input_precision=PREC) * D
    dvn = tl.dot(tl.trans(P), do, input_precision=PREC) * scale
    tl.store(dvn_ptr + (i_bh * L + t0 + r)[:, None] * BV + ov[None, :], dvn)


@triton.jit
def _dstate_kernel(
    q_ptr, k_ptr, w_ptr, gc_ptr, doc_ptr, do_ptr, dht_ptr, dvn_ptr, dh_ptr, dh0_ptr, scale,
    L, NT, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVS: tl.constexpr,
    HAS_DOC: tl.constexpr, HAS_DHT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Reverse over chunks: dVn = dVn_local + diag(γ) K dH',  dH = Γ_last dH' + scale (ΓQ)ᵀ dO - Wᵀ dVn.
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    r = tl.arange(0, BT)
    ok, ov = tl.arange(0, BK), i_v * BVS + tl.arange(0, BVS)
    hmask = (ok[:, None] < DK) & (ov[None, :] < DV)
    if HAS_DHT:
        dstate = tl.load(dht_ptr + i_bh * DK * DV + ok[:, None] * DV + ov[None, :], mask=hmask, other=0.0)
    else:
        dstate = tl.zeros((BK, BVS), dtype=tl.float32)
    for j in range(NT):
        i_t = NT - 1 - j
        t0 = i_t * BT
        tl.store(dh_ptr + ((i_bh * NT + i_t) * BK + ok[:, None]) * BV + ov[None, :], dstate)
        rows = (b * L + t0 + r) * H + h
        out = i_bh * L + t0 + r
        kk = tl.load(k_ptr + rows[:, None] * DK + ok[None, :], mask=ok[None, :] < DK, other=0.0).to(tl.float32)
        qq = tl.load(q_ptr + rows[:, None] * DK + ok[None, :], mask=ok[None, :] < DK, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + rows[:, None] * DV + ov[None, :], mask=ov[None, :] < DV, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + out[:, None] * BK + ok[None, :])
        _gc, _D, Gam, gam, Gam_last = _decays(gc_ptr, doc_ptr, i_bh, b, L, t0, BT, HAS_DOC)
        dvn = tl.load(dvn_ptr + out[:, None] * BV + ov[None, :])
        dvn += tl.dot(kk * gam[:, None], dstate, input_precision=PREC)
        tl.store(dvn_ptr + out[:, None] * BV + ov[None, :], dvn)
        dstate = (
            dstate * Gam_last
            + tl.dot(tl.trans(qq * (Gam * scale)[:, None]), do, input_precision=PREC)
            - tl.dot(tl.trans(w), dvn, input_precision=PREC)
        )
    tl.store(dh0_ptr + i_bh * DK * DV + ok[:, None] * DV + ov[None, :], dstate, mask=hmask)


@triton.jit
def _grads_v_kernel(
    v_ptr, beta_ptr, t_ptr, h_ptr, dh_ptr, vn_ptr, dvn_ptr, do_ptr,
    dv_ptr, doh_ptr, vndh_ptr, dw_ptr, dovn_ptr, dt_ptr, dbeta_ptr, dgl_ptr,
    L, NT, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVS: tl.constexpr, PREC_V: tl.constexpr,
):  # fmt: skip
    # Everything that sums over value columns: dv, and the products the key side needs
    # (dO Hᵀ, Vn dH'ᵀ, dW = -dVn Hᵀ, dO Vnᵀ, dT from U, <H, dH'>), stored for _grads_k.
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    t0 = i_t * BT
    r = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    rows = (b * L + t0 + r) * H + h
    out = i_bh * L + t0 + r
    beta = tl.load(beta_ptr + i_bh * L + t0 + r)
    T = tl.load(t_ptr + out[:, None] * BT + r[None, :])
    dOH = tl.zeros((BT, BK), dtype=tl.float32)
    dOVn = tl.zeros((BT, BT), dtype=tl.float32)
    VndH = tl.zeros((BT, BK), dtype=tl.float32)
    dW = tl.zeros((BT, BK), dtype=tl.float32)
    dT = tl.zeros((BT, BT), dtype=tl.float32)
    dbeta = tl.zeros((BT,), dtype=tl.float32)
    dGL = tl.zeros((BK,), dtype=tl.float32)
    for i_v in range(0, BV // BVS):
        ov = i_v * BVS + tl.arange(0, BVS)
        vmask = ov[None, :] < DV
        hoff = ((i_bh * NT + i_t) * BK + ok[:, None]) * BV + ov[None, :]
        st = tl.load(h_ptr + hoff)
        dst = tl.load(dh_ptr + hoff)
        vn = tl.load(vn_ptr + out[:, None] * BV + ov[None, :])
        dvn = tl.load(dvn_ptr + out[:, None] * BV + ov[None, :])
        do = tl.load(do_ptr + rows[:, None] * DV + ov[None, :], mask=vmask, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + rows[:, None] * DV + ov[None, :], mask=vmask, other=0.0).to(tl.float32)
        dOH += tl.dot(do, tl.trans(st), input_precision=PREC_V)
        dOVn += tl.dot(do, tl.trans(vn), input_precision=PREC_V)
        VndH += tl.dot(vn, tl.trans(dst), input_precision=PREC_V)
        dW -= tl.dot(dvn, tl.trans(st), input_precision=PREC_V)
        dT += tl.dot(dvn, tl.trans(vv * beta[:, None]), input_precision=PREC_V)
        dvb = tl.dot(tl.trans(T), dvn, input_precision=PREC_V)  # gradient of diag(β) V
        tl.store(dv_ptr + rows[:, None] * DV + ov[None, :], dvb * beta[:, None], mask=vmask)
        dbeta += tl.sum(dvb * vv, 1)
        dGL += tl.sum(st * dst, 1)
    tl.store(doh_ptr + out[:, None] * BK + ok[None, :], dOH)
    tl.store(vndh_ptr + out[:, None] * BK + ok[None, :], VndH)
    tl.store(dw_ptr + out[:, None] * BK + ok[None, :], dW)
    tl.store(dovn_ptr + out[:, None] * BT + r[None, :], dOVn)
    tl.store(dt_ptr + out[:, None] * BT + r[None, :], dT)
    tl.store(dbeta_ptr + i_bh * L + t0 + r, dbeta)
    tl.store(dgl_ptr + i_bh * NT + i_t, tl.sum(dGL, 0))


@triton.jit
def _grads_k_kernel(
    q_ptr, k_ptr, gc_ptr, beta_ptr, doc_ptr, t_ptr, doh_ptr, vndh_ptr, dw_ptr, dovn_ptr, dt_ptr, dgl_ptr,
    dq_ptr, dk_ptr, dgc_ptr, dbeta_ptr, scale,
    L, NT, H: tl.constexpr, DK: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Two passes over blocks of key columns (whole-dk tiles exceed Hopper's shared memory): the
    # first sums what needs all of dk (QKᵀ, KKᵀ, dT, row sums), the second writes dq and dk.
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    t0 = i_t * BT
    r = tl.arange(0, BT)
    rows = (b * L + t0 + r) * H + h
    out = i_bh * L + t0 + r
    beta = tl.load(beta_ptr + i_bh * L + t0 + r)
    dbeta = tl.load(dbeta_ptr + i_bh * L + t0 + r)  # the part from U, written by _grads_v
    _gc, D, Gam, gam, Gam_last = _decays(gc_ptr, doc_ptr, i_bh, b, L, t0, BT, HAS_DOC)
    T = tl.load(t_ptr + out[:, None] * BT + r[None, :])
    dT = tl.load(dt_ptr + out[:, None] * BT + r[None, :])
    bg = beta * Gam
    QK = tl.zeros((BT, BT), dtype=tl.float32)
    KK = tl.zeros((BT, BT), dtype=tl.float32)
    dbg = tl.zeros((BT,), dtype=tl.float32)  # gradient of βΓ through W = T diag(βΓ) K
    qdOH = tl.zeros((BT,), dtype=tl.float32)
    dgam = tl.zeros((BT,), dtype=tl.float32)  # gradient of γ through H' = ... + Kᵀ diag(γ) Vn
    for i_k in range(0, BK // BKS):
        ok = i_k * BKS + tl.arange(0, BKS)
        kmask = ok[None, :] < DK
        qq = tl.load(q_ptr + rows[:, None] * DK + ok[None, :], mask=kmask, other=0.0).to(tl.float32)
        kk = tl.load(k_ptr + rows[:, None] * DK + ok[None, :], mask=kmask, other=0.0).to(tl.float32)
        dW = tl.load(dw_ptr + out[:, None] * BK + ok[None, :])
        QK += tl.dot(qq, tl.trans(kk), input_precision=PREC)
        KK += tl.dot(kk, tl.trans(kk), input_precision=PREC)
        dT += tl.dot(dW, tl.trans(kk * bg[:, None]), input_precision=PREC)
        dbg += tl.sum(tl.dot(tl.trans(T), dW, input_precision=PREC) * kk, 1)
        qdOH += tl.sum(qq * tl.load(doh_ptr + out[:, None] * BK + ok[None, :]), 1)
        dgam += tl.sum(tl.load(vndh_ptr + out[:, None] * BK + ok[None, :]) * kk, 1)
    dbeta += dbg * Gam
    dGam = dbg * beta + qdOH * scale
    # O = scale (diag(Γ) Q H + (Q Kᵀ ⊙ D) Vn): dP is the gradient of Q Kᵀ.
    dP = tl.load(dovn_ptr + out[:, None] * BT + r[None, :]) * D * scale
    dDD = dP * QK  # (gradient of D) ⊙ D, from O
    # T = (I + A)^-1, A = strictly_lower(diag(β) (K Kᵀ ⊙ D))
    dA = -tl.dot(tl.trans(T), tl.dot(dT, tl.trans(T), input_precision=PREC), input_precision=PREC)
    strict = r[:, None] > r[None, :]
    dA = tl.where(strict, dA, 0.0)
    Ds = tl.where(strict, D, 0.0)
    dbeta += tl.sum(dA * KK * Ds, 1)
    G = dA * beta[:, None] * Ds  # gradient of K Kᵀ
    dDD += G * KK
    # Decays to the cumulative log-decay gc.
    dGL = tl.load(dgl_ptr + i_bh * NT + i_t)
    dgc = tl.sum(dDD, 1) - tl.sum(dDD, 0) + dGam * Gam - dgam * gam
    dgc += tl.where(r == BT - 1, tl.sum(dgam * gam, 0) + dGL * Gam_last, 0.0)
    tl.store(dgc_ptr + i_bh * L + t0 + r, dgc)
    tl.store(dbeta_ptr + i_bh * L + t0 + r, dbeta)
    GG = G + tl.trans(G)
    for i_k in range(0, BK // BKS):
        ok = i_k * BKS + tl.arange(0, BKS)
        kmask = ok[None, :] < DK
        qq = tl.load(q_ptr + rows[:, None] * DK + ok[None, :], mask=kmask, other=0.0).to(tl.float32)
        kk = tl.load(k_ptr + rows[:, None] * DK + ok[None, :], mask=kmask, other=0.0).to(tl.float32)
        dOH = tl.load(doh_ptr + out[:, None] * BK + ok[None, :])
        dq = dOH * (Gam * scale)[:, None] + tl.dot(dP, kk, input_precision=PREC)
        tl.store(dq_ptr + rows[:, None] * DK + ok[None, :], dq, mask=kmask)
        dW = tl.load(dw_ptr + out[:, None] * BK + ok[None, :])
        VndH = tl.load(vndh_ptr + out[:, None] * BK + ok[None, :])
        dk = tl.dot(tl.trans(T), dW, input_precision=PREC) * bg[:, None] + VndH * gam[:, None]
        dk += tl.dot(tl.trans(dP), qq, input_precision=PREC) + tl.dot(GG, kk, input_precision=PREC)
        tl.store(dk_ptr + rows[:, None] * DK + ok[None, :], dk, mask=kmask)


def _meta(q: torch.Tensor, v: torch.Tensor, chunk: int) -> dict:
    b, L, h, dk = q.shape
    dv = v.shape[-1]
    BK, BV = _pow2(dk), _pow2(dv)
    return dict(b=b, L=L, h=h, dk=dk, dv=dv, BT=chunk, BK=BK, BV=BV, BVS=min(BV, 64), NT=L // chunk)


def _forward_pieces(q, k, v, gc, beta, doc, h0, m):
    """Runs _prep and _state; returns T, W, U, H (every chunk's entering state), Vn, final state."""
    b, L, h, BT, BK, BV, BVS, NT = (m[x] for x in ("b", "L", "h", "BT", "BK", "BV", "BVS", "NT"))
    f32 = dict(device=q.device, dtype=torch.float32)
    T = torch.empty(b * h, L, BT, **f32)
    W = torch.empty(b * h, L, BK, **f32)
    U = torch.empty(b * h, L, BV, **f32)
    has_doc = doc is not None
    doc_arg = doc if has_doc else gc
    common = dict(H=h, DK=m["dk"], DV=m["dv"], BT=BT, BK=BK, BV=BV, HAS_DOC=has_doc, PREC=DOT_PRECISION)
    _prep_kernel[(NT, b * h)](
        k, v, gc, beta, doc_arg, T, W, U, L, **common, LOG2_BT=BT.bit_length() - 1, num_warps=8, num_stages=1
    )
    Hs = torch.empty(b * h, NT, BK, BV, **f32)
    Vn = torch.empty(b * h, L, BV, **f32)
    ht = torch.empty(b, h, m["dk"], m["dv"], **f32)
    _state_kernel[(BV // BVS, b * h)](
        k, W, U, gc, doc_arg, h0 if h0 is not None else gc, Hs, Vn, ht, L, NT,
        **common, BVS=BVS, HAS_H0=h0 is not None, num_warps=4, num_stages=1,
    )  # fmt: skip
    return T, W, Hs, Vn, ht


def _fwd_impl(q, k, v, gc, beta, doc, h0, scale, chunk):
    m = _meta(q, v, chunk)
    _T, _W, Hs, Vn, ht = _forward_pieces(q, k, v, gc, beta, doc, h0, m)
    o = torch.empty((*q.shape[:-1], m["dv"]), device=q.device, dtype=v.dtype)
    grid = (m["BV"] // m["BVS"], m["NT"], m["b"] * m["h"])
    _output_kernel[grid](
        q, k, gc, doc if doc is not None else gc, Hs, Vn, o, scale, m["L"], m["NT"],
        H=m["h"], DK=m["dk"], DV=m["dv"], BT=m["BT"], BK=m["BK"], BV=m["BV"], BVS=m["BVS"],
        HAS_DOC=doc is not None, PREC=DOT_PRECISION, num_warps=4,
    )  # fmt: skip
    return o, ht


def _bwd_impl(q, k, v, gc, beta, doc, h0, do, dht, scale, chunk):
    m = _meta(q, v, chunk)
    b, L, h, BT, BK, BV, BVS, NT = (m[x] for x in ("b", "L", "h", "BT", "BK", "BV", "BVS", "NT"))
    T, W, Hs, Vn, _ = _forward_pieces(q, k, v, gc, beta, doc, h0, m)
    do = do.contiguous()
    has_doc = doc is not None
    doc_arg = doc if has_doc else gc
    common = dict(H=h, DK=m["dk"], DV=m["dv"], BT=BT, BK=BK, BV=BV, BVS=BVS, HAS_DOC=has_doc, PREC=DOT_PRECISION)
    dVn = torch.empty_like(Vn)
    _dvn_local_kernel[(BV // BVS, NT, b * h)](q, k, gc, doc_arg, do, dVn, scale, L, **common, num_warps=4)
    dHs = torch.empty_like(Hs)
    dh0 = torch.empty(b, h, m["dk"], m["dv"], device=q.device, dtype=torch.float32)
    _dstate_kernel[(BV // BVS, b * h)](
        q, k, W, gc, doc_arg, do, dht if dht is not None else gc, dVn, dHs, dh0, scale, L, NT,
        **common, HAS_DHT=dht is not None, num_warps=4, num_stages=1,
    )  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dgc, dbeta = torch.empty_like(gc), torch.empty_like(beta)
    f32 = dict(device=q.device, dtype=torch.float32)
    dOH, VndH, dW = (torch.empty(b * h, L, BK, **f32) for _ in range(3))
    dOVn, dT = (torch.empty(b * h, L, BT, **f32) for _ in range(2))
    dGL = torch.empty(b * h, NT, **f32)
    _grads_v_kernel[(NT, b * h)](
        v, beta, T, Hs, dHs, Vn, dVn, do, dv, dOH, VndH, dW, dOVn, dT, dbeta, dGL, L, NT,
        H=h, DK=m["dk"], DV=m["dv"], BT=BT, BK=BK, BV=BV, BVS=min(BV, 32), PREC_V=DOT_PRECISION, num_warps=4, num_stages=1,
    )  # fmt: skip
    _grads_k_kernel[(NT, b * h)](
        q, k, gc, beta, doc_arg, T, dOH, VndH, dW, dOVn, dT, dGL, dq, dk, dgc, dbeta, scale, L, NT,
        H=h, DK=m["dk"], BT=BT, BK=BK, BKS=min(BK, 64), HAS_DOC=has_doc, PREC=DOT_PRECISION, num_warps=8,
        num_stages=1,
    )  # fmt: skip
    return dq, dk, dv, dgc, dbeta, dh0


# torch.compile sees the kernels as two opaque ops with a registered backward.


@torch.library.custom_op("hybridlm::gated_delta_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    beta: torch.Tensor,
    doc: torch.Tensor | None,
    h0: torch.Tensor | None,
    scale: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    record("gated_delta", "triton")  # also at run time inside compiled graphs (tracing records nothing)
    return _fwd_impl(q, k, v, gc, beta, doc, h0, scale, chunk)


@_fwd_op.register_fake
def _(q, k, v, gc, beta, doc, h0, scale, chunk):
    b, _, h, dk = q.shape
    return v.new_empty(v.shape), q.new_empty(b, h, dk, v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("hybridlm::gated_delta_bwd", mutates_args=())
def _bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    beta: torch.Tensor,
    doc: torch.Tensor | None,
    h0: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(q, k, v, gc, beta, doc, h0, do, dht, scale, chunk)


@_bwd_op.register_fake
def _(q, k, v, gc, beta, doc, h0, do, dht, scale, chunk):
    b, _, h, dk = q.shape
    state = q.new_empty(b, h, dk, v.shape[-1], dtype=torch.float32)
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(gc),
        torch.empty_like(beta),
        state,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, gc, beta, doc, h0, scale, chunk = inputs
    ctx.save_for_backward(q, k, v, gc, beta, doc, h0)
    ctx.scale, ctx.chunk, ctx.has_h0 = scale, chunk, h0 is not None


def _backward(ctx, do, dht):
    q, k, v, gc, beta, doc, h0 = ctx.saved_tensors
    dq, dk, dv, dgc, dbeta, dh0 = _bwd_op(q, k, v, gc, beta, doc, h0, do, dht, ctx.scale, ctx.chunk)
    return dq, dk, dv, dgc, dbeta, None, dh0 if ctx.has_h0 else None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def kernel_chunk(chunk_size: int) -> int:
    """The kernels' chunk: ``chunk_size`` rounded up to a power of two, 16 to 64 (tl.dot needs >= 16)."""
    return min(64, _pow2(chunk_size))


def gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`hybridlm.ops.gated_delta.gated_delta_rule_chunked` (same arguments).

    The chunk size only changes rounding, never the result, so the kernels use
    :func:`kernel_chunk` of it. Returns ``(o, final_state)``: o (b, l, h, dv) in the dtype of ``v``,
    final_state (b, h, dk, dv) float32.
    """
    b, seqlen, h, dk = q.shape
    if max(dk, v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(
            f"gated delta rule (Triton): head dims up to {MAX_HEAD_DIM} are supported, got dk={dk}, "
            f'dv={v.shape[-1]}; choose the torch path (hybridlm.ops.dispatch.set_kernels("torch"))'
        )
    chunk = kernel_chunk(chunk_size)
    if triton.cdiv(seqlen, chunk) > launch_grid.MAX_GRID_YZ:
        raise ValueError(
            f"gated delta rule (Triton): {seqlen} positions make {triton.cdiv(seqlen, chunk)} chunks of {chunk}, "
            f"more than a launch grid holds ({launch_grid.MAX_GRID_YZ}); split the sequence (initial_state carries it on)"
        )
    if b > rows_per_launch(h):  # grids hold batch x heads programs along one dimension

        def part(q, k, v, g, beta, seq_idx, initial_state):
            return gated_delta_rule_triton(q, k, v, g, beta, chunk_size, scale, seq_idx, initial_state)

        return in_row_groups(part, rows_per_launch(h), q, k, v, g, beta, seq_idx, initial_state)
    scale = dk**-0.5 if scale is None else scale
    pad = (-seqlen) % chunk
    # The kernels difference cumulative sums (exp(gc_t - gc_s)): a g of -inf (a full reset) made -inf - -inf = NaN,
    # and one large |g| left every later gc of its chunk too large to difference finely (4e-3 off at g = -1e5).
    # exp(-LOG_DECAY_FLOOR) is 0 in float32, so a step below the floor already zeroed every decay across it:
    # clamping changes no result, forward or backward.
    gf, bf = g.float().clamp(min=-LOG_DECAY_FLOOR), beta.float()
    doc = None
    if seq_idx is not None:
        from .ssd import reset_mask

        # A monotone document counter: equal counters = same document (labels may repeat).
        doc = reset_mask(seq_idx).to(torch.int32).cumsum(1, dtype=torch.int32)
    if pad:
        # Padding steps write nothing (beta = 0), do not decay (g = 0) and stay in the last document.
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        gf, bf = (F.pad(t, (0, 0, 0, pad)) for t in (gf, bf))
        if doc is not None:
            doc = torch.cat([doc, doc[:, -1:].expand(b, pad)], dim=1)
    n = (seqlen + pad) // chunk
    # In-chunk cumulative log-decays, laid out (b, h, l) for the kernels.
    gc = gf.reshape(b, n, chunk, h).cumsum(2).reshape(b, n * chunk, h).transpose(1, 2).contiguous()
    bt = bf.transpose(1, 2).contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, final = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), gc, bt, doc, h0, float(scale), chunk)
    return o[:, :seqlen], final
