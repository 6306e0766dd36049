"""Single-step and stateful forms of the ops, for cached decoding.

Each continues from a state instead of from zeros. The chunked ops (``ssd_chunked``,
``gated_delta_rule_chunked``) already take ``initial_state`` and return the final one, so prompts and
prefill chunks use them; these functions cover the conv carry-over and the one-token recurrences.

On CUDA the one-token conv and SSD steps run Triton kernels (:mod:`hybridlm.ops.step_triton`,
chosen by :func:`hybridlm.ops.dispatch.choose` as ``conv_step`` / ``ssd_step`` / ``mamba2_step`` / ``gdn_step``);
the torch code here is the reference and the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv import causal_conv1d, check_conv_shapes
from .dispatch import choose, triton_available
from .gated_delta import l2_normalize
from .mamba2_core import mamba2_dt
from .precision import accumulation_dtype

if triton_available():
    from .step_triton import conv_step_triton, gdn_step_triton, ssd_step_triton


def causal_conv1d_with_state(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal conv of ``x`` continuing after the inputs kept in ``conv_state``.

    Args:
        x: (B, L, C) new inputs.
        conv_state: (B, K-1, C) the previous K-1 inputs, oldest first.
        weight: (C, K) or (C, 1, K); bias: (C,) or None.
        inplace: write the new state into ``conv_state`` (and return it) instead of a new tensor.

    Returns:
        ``(out, new_state)``: out (B, L, C) in the dtype of ``x``; new_state (B, K-1, C), the last
        K-1 inputs of ``[conv_state, x]``.
    """
    K1 = conv_state.shape[1]
    if activation not in (None, "silu"):
        raise ValueError(f"unknown activation {activation!r}")
    check_conv_shapes(x, weight, bias, None)  # the one-token sum below would broadcast a (1, K) weight
    want = (x.shape[0], weight.shape[-1] - 1, x.shape[-1])
    if tuple(conv_state.shape) != want:
        # The Triton step reads and shifts K-1 rows whatever the state holds: a shorter state would
        # let it write past its end.
        raise ValueError(
            f"causal_conv1d_with_state: conv_state has shape {tuple(conv_state.shape)}, expected {want} "
            f"(B, K-1, C) for x {tuple(x.shape)} and {weight.shape[-1]} taps"
        )
    if (
        inplace
        and x.shape[1] == 1
        and K1 >= 1
        and conv_state.dtype == x.dtype
        and choose("conv_step", x, conv_state, weight, bias) == "triton"
    ):
        w = weight.reshape(weight.shape[0], -1).contiguous()
        return conv_step_triton(x, conv_state, w, bias, activation == "silu"), conv_state
    full = torch.cat([conv_state.to(x.dtype), x], dim=1)  # (B, K-1+L, C)
    L = x.shape[1]
    if L == 1:
        # One dot product per channel: the step path skips the shifted-sum loop.
        w = weight.reshape(weight.shape[0], -1)
        # In the promoted dtype (float32 for bf16 inputs and float32 weights), as the multi-token path and the
        # Triton step compute: weights rounded to bf16 made a step differ from the prefill's conv.
        out = (full * w.T).sum(dim=1, keepdim=True)
        if bias is not None:
            out = out + bias
        if activation == "silu":
            out = torch.nn.functional.silu(out)
    else:
        out = causal_conv1d(full, weight, bias, None, activation)[:, K1:]
    out = out.to(x.dtype)  # a float32 weight or bias promoted it (the Triton step keeps x's dtype)
    new_state = full[:, full.shape[1] - K1 :]
    if inplace:
        conv_state.copy_(new_state)
        new_state = conv_state
    return out, new_state


def check_ssd_step_shapes(x, dt, A, B, C, state, D=None) -> None:
    """Raise ValueError naming the argument whose shape does not fit ``x: (b, h, p)``: the torch step would
    broadcast a (1, g, n) B or an (h,) dt over the batch, and the Triton step reads them by x's layout."""
    if x.dim() != 3 or B.dim() != 3:
        raise ValueError(f"ssd_step: x must be (b, h, p) and B (b, g, n), got {tuple(x.shape)} and {tuple(B.shape)}")
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    expected = {"dt": (dt, (b, h)), "A": (A, (h,)), "C": (C, (b, g, n)), "state": (state, (b, h, p, n)), "D": (D, (h,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"ssd_step: {name} has shape {tuple(t.shape)}, expected {shape} for x {tuple(x.shape)}")
    if B.shape[0] != b or g == 0 or h % g:
        raise ValueError(f"ssd_step: B has shape {tuple(B.shape)}, expected ({b}, g, n) with g dividing {h} heads")


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the SSD recurrence, ``S = exp(dt A) S + dt x ⊗ B; y = S · C + D x``, in float32
    (float64 for float64 inputs or state).

    Args:
        x: (b, h, p); dt: (b, h) (after softplus); A: (h,); B, C: (b, g, n); state: (b, h, p, n).
        inplace: update ``state`` (contiguous, in the accumulation dtype) in place instead of returning
            a new tensor.
            Decoding is bound by state traffic at large batch: in place reads and writes the
            state twice per step instead of about five times.

    Returns:
        ``(y, new_state)``: y (b, h, p) in the dtype of ``x``, new_state (b, h, p, n) float32, float64
        for float64 inputs (``state`` itself when ``inplace``).
    """
    check_ssd_step_shapes(x, dt, A, B, C, state, D)
    if inplace and choose("ssd_step", x, dt, A, B, C, state, D) == "triton":
        return ssd_step_triton(x, dt, A, B, C, state, D), state
    h, g = x.shape[1], B.shape[1]
    acc = accumulation_dtype(x, dt, A, B, C, state, D)
    xf, dtf = x.to(acc), dt.to(acc)
    Bh = B.to(acc).repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.to(acc).repeat_interleave(h // g, dim=1)
    S = _working_state(state, acc, inplace)
    S.mul_(torch.exp(dtf * A.to(acc))[..., None, None])
    S.addcmul_((dtf[..., None] * xf)[..., None], Bh[:, :, None, :])  # one fused pass, no outer-product temporary
    with torch.autocast(x.device.type, enabled=False):  # autocast would run the einsum in bf16
        y = torch.einsum("bhpn,bhn->bhp", S, Ch)
    if D is not None:
        y = y + D.to(acc)[:, None] * xf
    return y.to(x.dtype), _write_back(S, state, inplace)


def mamba2_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_clamp_min: float = 0.0,
) -> torch.Tensor:
    """One token of the Mamba2 core's recurrence from the in-projection's raw ``dt``: :func:`ssd_step` (in place) of
    ``dt = softplus(dt + dt_bias)``, clamped from below at ``dt_clamp_min`` when it is > 0, and ``A = -exp(A_log)``,
    as :func:`~hybridlm.ops.mamba2_core.mamba2_dt` and the core compute them.

    On CUDA one kernel does it all (``mamba2_step`` in :mod:`~hybridlm.ops.dispatch`): dt's and A's elementwise ops
    were five launches of their own per layer (a ``bench-1.3b`` step's launches: 265 before, 211 after).

    Args:
        x: (b, h, p); dt: (b, h) raw; dt_bias, A_log: (h,); B, C: (b, g, n); state: (b, h, p, n), updated in place;
            D: (h,) or None.

    Returns:
        y: (b, h, p) in the dtype of ``x``.
    """
    for name, t in (("dt_bias", dt_bias), ("A_log", A_log)):
        if t.shape != x.shape[1:2]:
            raise ValueError(
                f"mamba2_step: {name} has shape {tuple(t.shape)}, expected ({x.shape[1]},) for x {tuple(x.shape)}"
            )
    if choose("mamba2_step", x, dt, dt_bias, A_log, B, C, state, D) == "triton":
        check_ssd_step_shapes(x, dt, A_log, B, C, state, D)
        return ssd_step_triton(x, dt, A_log, B, C, state, D, dt_bias=dt_bias, dt_clamp_min=dt_clamp_min)
    A = -torch.exp(A_log.to(accumulation_dtype(x, A_log)))  # as ops.mamba2_core computes it
    return ssd_step(x, mamba2_dt(dt, dt_bias, dt_clamp_min), A, B, C, state, D=D, inplace=True)[0]


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the gated delta rule (see ``ops.gated_delta``), in float32 (float64 for float64
    inputs or state).

    Args:
        q, k: (b, h, dk); v: (b, h, dv); g, beta: (b, h); state: (b, h, dk, dv).
        inplace: update ``state`` (contiguous, in the accumulation dtype) in place instead of returning
            a new tensor.

    Returns:
        ``(o, new_state)``: o (b, h, dv) in the dtype of ``v``, new_state float32, float64 for float64
        inputs (``state`` itself when ``inplace``).
    """
    if q.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"gated_delta_step: q must be (b, h, dk) and v (b, h, dv), got {tuple(q.shape)} and {tuple(v.shape)}"
        )
    b, h, dk = q.shape
    dv = v.shape[-1]
    expected = {"k": (k, (b, h, dk)), "v": (v, (b, h, dv)), "g": (g, (b, h)), "beta": (beta, (b, h))}
    expected["state"] = (state, (b, h, dk, dv))
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:  # the einsums and products below would broadcast a misfit silently
            raise ValueError(
                f"gated_delta_step: {name} has shape {tuple(t.shape)}, expected {shape} for q {tuple(q.shape)}"
            )
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q, k, v, g, beta, state)
    S = _working_state(state, acc, inplace)
    S.mul_(torch.exp(g.to(acc))[..., None, None])
    kf = k.to(acc)
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the einsums (the state's read) in bf16
        read = torch.einsum("bhkv,bhk->bhv", S, kf)
        delta = beta.to(acc)[..., None] * (v.to(acc) - read)
        S.addcmul_(kf[..., None], delta[:, :, None, :])
        o = torch.einsum("bhkv,bhk->bhv", S, q.to(acc) * scale)
    return o.to(v.dtype), _write_back(S, state, inplace)


def gdn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One token of Gated DeltaNet from its conv outputs and raw gates, as the mixer computes it: q and k
    l2-normalized (:func:`~hybridlm.ops.gated_delta.l2_normalize`), each key head serving ``Hv / Hk`` value heads,
    ``g = -exp(A_log) * softplus(a + dt_bias)``, ``beta = sigmoid(b)``, then :func:`gated_delta_step` in place.

    On CUDA one kernel does it all (``gdn_step`` in :mod:`~hybridlm.ops.dispatch`), reading and writing the state
    once; the torch code here, the reference, runs about 30 ops and passes over the state about five times.

    Args:
        q, k: (B, Hk, dk); v: (B, Hv, dv); a, b: (B, Hv); A_log, dt_bias: (Hv,); state: (B, Hv, dk, dv), updated in
            place; scale: of the read-out, default dk ** -0.5.

    Returns:
        o: (B, Hv, dv) in the dtype of ``v``.
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[0] != q.shape[0]:
        raise ValueError(
            f"gdn_step: q and k must be (B, Hk, dk) and v (B, Hv, dv), got {tuple(q.shape)}, {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    (B, Hk, dk), (Hv, dv) = q.shape, v.shape[1:]
    expected = {"a": (a, (B, Hv)), "b": (b, (B, Hv)), "A_log": (A_log, (Hv,)), "dt_bias": (dt_bias, (Hv,))}
    expected["state"] = (state, (B, Hv, dk, dv))
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"gdn_step: {name} has shape {tuple(t.shape)}, expected {shape} for q {tuple(q.shape)}")
    if Hv % Hk:
        raise ValueError(f"gdn_step: {Hv} value heads are not a multiple of {Hk} key heads")
    scale = dk**-0.5 if scale is None else scale
    if choose("gdn_step", q, k, v, a, b, A_log, dt_bias, state) == "triton":
        return gdn_step_triton(q, k, v, a, b, A_log, dt_bias, state, scale)
    acc = accumulation_dtype(q, k, v)
    q, k = l2_normalize(q.to(acc)), l2_normalize(k.to(acc))
    if Hv != Hk:
        q, k = q.repeat_interleave(Hv // Hk, dim=1), k.repeat_interleave(Hv // Hk, dim=1)
    g = -torch.exp(A_log.to(acc)) * F.softplus(a.to(acc) + dt_bias.to(acc))
    return gated_delta_step(q, k, v, g, b.to(acc).sigmoid(), state, scale, inplace=True)[0]


def _working_state(state: torch.Tensor, acc: torch.dtype, inplace: bool) -> torch.Tensor:
    """The state the step updates: ``state`` itself in place, else (or where a cache of another dtype holds it,
    e.g. a float32 cache under a float64 model) a contiguous copy in the accumulation dtype."""
    if inplace and state.dtype == acc:
        return state
    return state.to(acc, memory_format=torch.contiguous_format, copy=True)  # one copy, whatever the dtype


def _write_back(S: torch.Tensor, state: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``state`` holding ``S`` when the step was asked to work in place (a no-op where it did), else ``S``."""
    if inplace and S is not state:
        state.copy_(S)
        return state
    return S
