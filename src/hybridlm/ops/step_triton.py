"""Triton kernels for the one-token decode step: the SSD and gated delta rule state updates, the conv carry-over.

:mod:`hybridlm.ops.step` dispatches here on CUDA; its torch code is the reference. A decode step
moves little data per kernel, so what matters is the number of launches and, at large batch, the
passes over the float32 SSM state: the torch reference makes about five (casts, repeat of B and C,
decay, update, read-out); :func:`ssd_step_triton` reads and writes the state once and returns y in
the same pass. Both kernels update their state in place, so a CUDA graph can capture them.

Precision: float32 throughout (state, products, sums); y and the conv output are stored in the
input's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: The SSD step's head channels per program and its warps, read at every launch (``benchmarks/step_kernel.py`` times
#: other values against them). At 64 and 4 the sm_90 build uses 255 registers and spills 40 bytes a thread, and one
#: row of bench-1.3b (64 heads of 64 channels) launches 64 programs, fewer than an H100 has SMs. Timed on an H100
#: (docs/benchmarks.md, forty-ninth session): 32 and 4 is 1.13x faster at one row and 1.09x at 8, 0.98x at 64, a
#: step's 0.3 % at one row: the defaults stay.
SSD_STEP_BLOCK_P = 64
SSD_STEP_WARPS = 4


@triton.jit
def _softplus(u):
    """torch's softplus (beta 1, threshold 20: u above 20 stays u) in float32, log1p(t) by Kahan's trick: log(1 + t)
    rounds 1 + t, which loses t's low bits (all of them below 2^-24), and the factor t / ((1 + t) - 1) restores them
    (Triton's interpreter has no libdevice.log1p). Comparisons, not tl.minimum, which may drop a NaN torch keeps."""
    t = tl.exp(tl.where(u > 20.0, 20.0, u))
    w = 1.0 + t
    d = w - 1.0  # 0 where t < 2^-24: log1p(t) is t there
    return tl.where(u > 20.0, u, tl.where(d == 0.0, t, tl.log(w) * (t / tl.where(d == 0.0, 1.0, d))))


@triton.jit
def _ssd_step_kernel(
    x_ptr,
    dt_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    s_ptr,
    y_ptr,
    H,
    P,
    N,
    heads_per_group,
    sx_b,
    sx_h,
    sx_p,
    sdt_b,
    sdt_h,
    sb_b,
    sb_g,
    sb_n,
    sc_b,
    sc_g,
    sc_n,
    bias_ptr,
    clamp_min,
    HAS_D: tl.constexpr,
    RAW_DT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (row, head, block of head channels): S = exp(dt A) S + dt x ⊗ B; y = S · C (+ D x).

    With RAW_DT, ``dt_ptr`` holds the in-projection's raw dt and ``a_ptr`` A_log: dt = softplus(dt + bias),
    clamped from below at ``clamp_min``, and A = -exp(A_log), here instead of in five launches of their own."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    g = h // heads_per_group
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok = p < P
    n_ok = n < N
    dt = tl.load(dt_ptr + b * sdt_b + h * sdt_h).to(tl.float32)
    a = tl.load(a_ptr + h).to(tl.float32)
    if RAW_DT:
        dt = _softplus(dt + tl.load(bias_ptr + h).to(tl.float32))
        dt = tl.where(dt < clamp_min, clamp_min, dt)  # (a comparison keeps a NaN, as torch's clamp does)
        a = -tl.exp(a)
    decay = tl.exp(dt * a)
    x = tl.load(x_ptr + b * sx_b + h * sx_h + p * sx_p, mask=p_ok, other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + b * sb_b + g * sb_g + n * sb_n, mask=n_ok, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + b * sc_b + g * sc_g + n * sc_n, mask=n_ok, other=0.0).to(tl.float32)
    rows = (pid_bh.to(tl.int64) * P + p) * N
    s_off = rows[:, None] + n[None, :]
    mask = p_ok[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + s_off, mask=mask, other=0.0)
    s = s * decay + (dt * x)[:, None] * bv[None, :]
    tl.store(s_ptr + s_off, s, mask=mask)
    y = tl.sum(s * cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + pid_bh.to(tl.int64) * P + p, y.to(y_ptr.dtype.element_ty), mask=p_ok)


def _check_state(op: str, state: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse a state the kernel cannot update in place: it reads and writes a contiguous float32 ``shape``."""
    if state.dtype != torch.float32 or not state.is_contiguous() or tuple(state.shape) != shape:
        raise ValueError(
            f"{op}: the state is updated in place, so it must be a contiguous float32 {shape}; got "
            f"{'a contiguous' if state.is_contiguous() else 'a non-contiguous'} {state.dtype} {tuple(state.shape)}"
        )


def ssd_step_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_clamp_min: float = 0.0,
) -> torch.Tensor:
    """The Triton path of :func:`hybridlm.ops.step.ssd_step` with ``inplace=True`` and, given ``dt_bias``, of
    :func:`hybridlm.ops.step.mamba2_step`.

    Args:
        x: (b, h, p); dt: (b, h) (after softplus; with ``dt_bias``, raw); A: (h,) (with ``dt_bias``, A_log);
            B, C: (b, g, n); D: (h,) or None; any strides (A and D are small: made contiguous).
        state: (b, h, p, n) contiguous float32, updated in place.
        dt_bias: (h,) or None: dt is the in-projection's raw one and A is A_log; the kernel computes
            ``softplus(dt + dt_bias)`` (clamped from below at ``dt_clamp_min``) and ``-exp(A_log)``.

    Returns:
        y: (b, h, p) contiguous, dtype of ``x``.
    """
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    _check_state("ssd_step", state, (b, h, p, n))
    y = torch.empty(b, h, p, dtype=x.dtype, device=x.device)
    A, D = A.contiguous(), None if D is None else D.contiguous()  # (h,) read as ptr + head
    bias = A if dt_bias is None else dt_bias.contiguous()
    block_p = min(triton.next_power_of_2(p), SSD_STEP_BLOCK_P)
    grid = (b * h, triton.cdiv(p, block_p))
    _ssd_step_kernel[grid](
        x,
        dt,
        A,
        B,
        C,
        D if D is not None else A,
        state,
        y,
        h,
        p,
        n,
        h // g,
        *x.stride(),
        *dt.stride(),
        *B.stride(),
        *C.stride(),
        bias,
        float(dt_clamp_min),
        HAS_D=D is not None,
        RAW_DT=dt_bias is not None,
        BLOCK_P=block_p,
        BLOCK_N=triton.next_power_of_2(n),
        num_warps=SSD_STEP_WARPS,
    )
    return y


@triton.jit
def _conv_step_kernel(
    x_ptr,
    s_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    C,
    sx_b,
    sx_c,
    ss_b,
    ss_k,
    ss_c,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One (row, block of channels): out = sum_j w[j] * [state, x][j] (+ bias, SiLU); then the
    state shifts by one and takes x as its newest row. Each program owns its channels, so the
    shift in place races with no other program."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < C
    x = tl.load(x_ptr + b * sx_b + c * sx_c, mask=ok, other=0.0)
    acc = x.to(tl.float32) * tl.load(w_ptr + c * K + (K - 1), mask=ok, other=0.0).to(tl.float32)
    row = s_ptr + b * ss_b + c * ss_c
    for j in tl.static_range(K - 1):  # state row j holds the input K-1-j steps back
        sj = tl.load(row + j * ss_k, mask=ok, other=0.0).to(tl.float32)
        acc += sj * tl.load(w_ptr + c * K + j, mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(K - 2):
        tl.store(row + j * ss_k, tl.load(row + (j + 1) * ss_k, mask=ok, other=0.0), mask=ok)
    tl.store(row + (K - 2) * ss_k, x.to(s_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=ok, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b * C + c, acc.to(out_ptr.dtype.element_ty), mask=ok)


def conv_step_triton(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """The Triton path of :func:`hybridlm.ops.step.causal_conv1d_with_state` for one token, in place.

    Args:
        x: (B, 1, C), any strides; conv_state: (B, K-1, C) with K >= 2, updated in place;
        weight: (C, K) contiguous; bias: (C,) or None.

    Returns:
        out: (B, 1, C) contiguous, dtype of ``x``.
    """
    Bsz, _, C = x.shape
    K = weight.shape[1]
    out = torch.empty(Bsz, 1, C, dtype=x.dtype, device=x.device)
    block_c = min(triton.next_power_of_2(C), 1024)
    _conv_step_kernel[(Bsz, triton.cdiv(C, block_c))](
        x,
        conv_state,
        weight,
        bias.contiguous() if bias is not None else weight,  # read as b_ptr + channel
        out,
        C,
        x.stride(0),
        x.stride(2),
        *conv_state.stride(),
        K=K,
        HAS_BIAS=bias is not None,
        SILU=silu,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out


@triton.jit
def _gdn_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    b_ptr,
    alog_ptr,
    bias_ptr,
    s_ptr,
    o_ptr,
    H,
    heads_per_key,
    DK,
    DV,
    sq_b,
    sq_h,
    sk_b,
    sk_h,
    sv_b,
    sv_h,
    sa_b,
    sb_b,
    scale,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One (row, value head, block of value channels): q, k l2-normalized, g = -exp(A_log) softplus(a + dt_bias),
    beta = sigmoid(b); S = exp(g) S; S += k ⊗ beta (v - Sᵀk); o = Sᵀ q · scale. The state is read and written once."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // heads_per_key
    kk = tl.arange(0, BLOCK_K)
    vv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = kk < DK
    v_ok = vv < DV
    q = tl.load(q_ptr + b * sq_b + hk * sq_h + kk, mask=k_ok, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * sk_b + hk * sk_h + kk, mask=k_ok, other=0.0).to(tl.float32)
    q = q * (1.0 / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6))  # ops.gated_delta.l2_normalize's eps
    k = k * (1.0 / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6))
    u = tl.load(a_ptr + b * sa_b + h).to(tl.float32) + tl.load(bias_ptr + h).to(tl.float32)
    g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * _softplus(u)
    beta = tl.sigmoid(tl.load(b_ptr + b * sb_b + h).to(tl.float32))
    v = tl.load(v_ptr + b * sv_b + h * sv_h + vv, mask=v_ok, other=0.0).to(tl.float32)
    s_off = (pid_bh.to(tl.int64) * DK + kk)[:, None] * DV + vv[None, :]
    mask = k_ok[:, None] & v_ok[None, :]
    S = tl.load(s_ptr + s_off, mask=mask, other=0.0) * tl.exp(g)
    delta = beta * (v - tl.sum(S * k[:, None], axis=0))
    S += k[:, None] * delta[None, :]
    tl.store(s_ptr + s_off, S, mask=mask)
    o = tl.sum(S * (q * scale)[:, None], axis=0)
    tl.store(o_ptr + pid_bh.to(tl.int64) * DV + vv, o.to(o_ptr.dtype.element_ty), mask=v_ok)


def gdn_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The Triton path of :func:`hybridlm.ops.step.gdn_step`: one kernel, the state updated in place.

    Args:
        q, k: (B, Hk, dk) raw (before the l2 norm), last dim contiguous; v: (B, Hv, dv), last dim contiguous;
            a, b: (B, Hv) raw gates, last dim contiguous; A_log, dt_bias: (Hv,); state: (B, Hv, dk, dv) contiguous
            float32; Hv a multiple of Hk (value head h reads key head h // (Hv / Hk)).

    Returns:
        o: (B, Hv, dv) contiguous, dtype of ``v``.
    """
    Bsz, Hk, dk = q.shape
    Hv, dv = v.shape[1], v.shape[2]
    _check_state("gdn_step", state, (Bsz, Hv, dk, dv))
    q, k, v, a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, a, b))
    o = torch.empty(Bsz, Hv, dv, dtype=v.dtype, device=v.device)
    block_v = min(triton.next_power_of_2(dv), 32)
    _gdn_step_kernel[(Bsz * Hv, triton.cdiv(dv, block_v))](
        q, k, v, a, b, A_log.contiguous(), dt_bias.contiguous(), state, o,
        Hv, Hv // Hk, dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), a.stride(0), b.stride(0),
        float(scale),
        BLOCK_K=triton.next_power_of_2(dk), BLOCK_V=block_v, num_warps=4,
    )  # fmt: skip
    return o
