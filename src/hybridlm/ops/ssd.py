"""Mamba2's state-space duality (SSD) scan: a chunked form in plain PyTorch and a step-by-step reference.

Per head ``h`` (head dim P, state N, group ``g = h // (H / G)``)::

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t ⊗ B_t        (S: P × N, S_{-1} = initial state or 0)
    y_t = S_t · C_t + D_h * x_t

Packed sequences: where ``seq_idx`` changes the state restarts from zero, so every document is
scanned as if alone. The chunked form implements the restart by setting that step's log-decay
``dt·A`` to ``-inf``; every decay is then a sum of log-decays computed without subtraction
(``segsum``), so ``-inf`` never meets ``+inf`` and no NaN appears, forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import choose
from .grid import check_positive_int
from .precision import accumulation_dtype


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(a[..., j+1 : i+1])`` for ``j <= i``, ``-inf`` above the diagonal.

    Summing a masked copy instead of differencing a cumulative sum keeps precision for long
    chunks and tolerates ``-inf`` entries (document resets).

    Args:
        a: (..., T) log-decays.

    Returns:
        (..., T, T).
    """
    T = a.shape[-1]
    x = a.unsqueeze(-1).expand(*a.shape, T)  # x[..., i, j] = a[..., i]
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    x = x.masked_fill(~below, 0.0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~keep, float("-inf"))


def reset_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True where a new document starts (never at position 0)."""
    reset = torch.zeros_like(seq_idx, dtype=torch.bool)
    reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return reset


def check_ssd_shapes(x, dt, A, B, C, chunk_size, D=None, seq_idx=None, initial_state=None) -> None:
    """Raise ValueError naming the argument whose shape does not fit ``x: (b, l, h, p)``."""
    if x.dim() != 4 or B.dim() != 4:
        raise ValueError(f"ssd: x must be (b, l, h, p) and B (b, l, g, n), got {tuple(x.shape)} and {tuple(B.shape)}")
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    expected = {
        "dt": (dt, (b, seqlen, h)),
        "A": (A, (h,)),
        "B": (B, (b, seqlen, g, n)),
        "C": (C, (b, seqlen, g, n)),
        "D": (D, (h,)),
        "seq_idx": (seq_idx, (b, seqlen)),
        "initial_state": (initial_state, (b, h, p, n)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"ssd: {name} has shape {tuple(t.shape)}, expected {shape} for x {tuple(x.shape)}")
    if g == 0 or h % g:
        raise ValueError(f"ssd: {h} heads are not a multiple of {g} groups (B, C: (b, l, g, n))")
    check_positive_int(chunk_size, "ssd: chunk_size", "positions per chunk")


def ssd_chunked(
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
    """Chunked SSD scan, accumulated in float32 whatever the input dtype (also under autocast), or in
    float64 for float64 inputs.

    Runs the Triton kernels of :mod:`hybridlm.ops.ssd_triton` when :func:`~hybridlm.ops.dispatch.choose`
    says so (CUDA inputs by default), else :func:`ssd_chunked_torch`; both compute the same thing.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) positive step sizes (after softplus).
        A: (h,) negative decay rates.
        B, C: (b, l, g, n) input and output projections; ``h`` must be a multiple of ``g``.
        chunk_size: positions per chunk; ``l`` need not be a multiple of it.
        D: (h,) skip connection, or None.
        seq_idx: (b, l) document index per position (non-decreasing), or None.
        initial_state: (b, h, p, n), or None for zeros.
        return_final_state: also return the state after the last position.

    Returns:
        y: (b, l, h, p) in the dtype of ``x``; and the final state (b, h, p, n) in the accumulation dtype
        (float32, float64 for float64 inputs) if asked.
    """
    check_ssd_shapes(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state)
    if choose("ssd", x, dt, B, C, initial_state) == "triton":  # a float64 state (cache) takes the reference
        from .ssd_triton import ssd_chunked_triton

        return ssd_chunked_triton(
            x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx, initial_state=initial_state,
            return_final_state=return_final_state,
        )  # fmt: skip
    return ssd_chunked_torch(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state, return_final_state)


def ssd_chunked_torch(
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
    """The plain-PyTorch chunked SSD (the Mamba2 paper's "minimal SSD"), in float32 (float64 for
    float64 inputs): the reference path and the CPU path. Arguments and results as :func:`ssd_chunked`."""
    # Under autocast the einsums below would run in bf16; the scan's contract is float32 (or float64).
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ssd_chunked_float32(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state, return_final_state)


def _ssd_chunked_float32(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state, return_final_state):
    dtype = x.dtype
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    # A sequence shorter than a chunk is one chunk of its own length: the same result, without
    # padding a decode-time window (speculative verify, an MTP depth's commit) to a full chunk.
    Q = min(chunk_size, max(seqlen, 1))
    pad = (-seqlen) % Q
    acc = accumulation_dtype(x, dt, A, B, C, D, initial_state)
    xf, dtf, Bf, Cf = x.to(acc), dt.to(acc), B.to(acc), C.to(acc)
    a = dtf * A.to(acc)  # (b, l, h) log-decays, <= 0
    if seq_idx is not None:
        a = torch.where(reset_mask(seq_idx).unsqueeze(-1), float("-inf"), a)
    if pad:
        # Padding steps have dt = 0: no decay (a = 0) and no input; the final state is unchanged.
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = xf.shape[1] // Q

    xdt = (xf * dtf.unsqueeze(-1)).reshape(b, c, Q, g, r, p)  # (b, c, Q, g, r, p)
    Bc = Bf.reshape(b, c, Q, g, n)
    Cc = Cf.reshape(b, c, Q, g, n)
    a = a.reshape(b, c, Q, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, Q)
    a_cum = torch.cumsum(a, dim=-1)
    decay = torch.exp(segsum(a))  # (b, g, r, c, Q, Q): decay from s (excl.) to t (incl.)

    # 1. Within each chunk: y_t = sum_{s<=t} (C_t·B_s) decay[t, s] dt_s x_s.
    CB = torch.einsum("bcqgn,bcsgn->bcgqs", Cc, Bc)  # (b, c, g, Q, Q), shared by the heads of a group
    M = CB.unsqueeze(3) * decay.permute(0, 3, 1, 2, 4, 5)  # (b, c, g, r, Q, Q)
    y = torch.einsum("bcgrqs,bcsgrp->bcqgrp", M, xdt)

    # 2. The state each chunk adds by its end: sum_s decay[last, s] dt_s x_s ⊗ B_s.
    to_end = decay[..., -1, :].permute(0, 3, 4, 1, 2)  # (b, c, Q, g, r)
    states = torch.einsum("bcqgrp,bcqgn->bcgrpn", xdt * to_end.unsqueeze(-1), Bc)

    # 3. Carry states across chunks (a scan over c + 1 chunk boundaries).
    if initial_state is None:
        init = torch.zeros(b, 1, g, r, p, n, dtype=states.dtype, device=states.device)
    else:
        init = initial_state.to(acc).reshape(b, 1, g, r, p, n)
    states = torch.cat([init, states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, g, r, c+1, c+1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4. What the entering state contributes at each position: exp(a_cum[t]) C_t · S.
    from_start = torch.exp(a_cum).permute(0, 3, 4, 1, 2)  # (b, c, Q, g, r)
    y = y + torch.einsum("bcqgn,bcgrpn->bcqgrp", Cc, entering) * from_start.unsqueeze(-1)

    y = y.reshape(b, c * Q, h, p)[:, :seqlen]
    if D is not None:
        y = y + x.to(acc) * D.to(acc).unsqueeze(-1)
    y = y.to(dtype)
    if return_final_state:
        return y, final.reshape(b, h, p, n)
    return y


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step recurrence in ``dtype`` (float64 by default; slow, for tests). Returns ``(y, final_state)``."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    heads_per_group = h // g
    xd, dtd, Ad = x.to(dtype), dt.to(dtype), A.to(dtype)
    Bd = B.to(dtype).repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    Cd = C.to(dtype).repeat_interleave(heads_per_group, dim=2)
    S = torch.zeros(b, h, p, n, dtype=dtype, device=x.device)
    if initial_state is not None:
        S = initial_state.to(dtype).clone()
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(dtype).view(b, 1, 1, 1)
            S = S * same
        dA = torch.exp(dtd[:, t] * Ad)  # (b, h)
        S = S * dA[..., None, None] + (dtd[:, t, :, None, None] * xd[:, t, :, :, None]) * Bd[:, t, :, None, :]
        yt = torch.einsum("bhpn,bhn->bhp", S, Cd[:, t])
        if D is not None:
            yt = yt + D.to(dtype)[:, None] * xd[:, t]
        ys.append(yt)
    return torch.stack(ys, dim=1), S
