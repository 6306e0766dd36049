"""The gated delta rule (Gated DeltaNet, as Qwen3-Next and flash-linear-attention define it).

Per head, with state ``S`` (dk × dv), log-decay ``g_t <= 0`` and write strength ``beta_t``::

    S_t = exp(g_t) S_{t-1}
    S_t = S_t + k_t ⊗ beta_t (v_t - S_t^T k_t)          (delta rule: replace what k_t reads)
    o_t = S_t^T (q_t * scale)

The chunked form solves each chunk's writes at once (the "WY" form): with ``D[t,s]`` the decay
from ``s`` to ``t`` and ``A[t,s] = beta_t D[t,s] k_t·k_s`` for ``s < t``, the corrected values are
``U = (I + A)^{-1} (beta V - beta exp(Gcum) K S_0)``; outputs and the next state follow from U
with plain matmuls. Resets at document starts set ``g`` to ``-inf``; decays are built with
``segsum`` so no ``inf - inf`` arises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import choose
from .grid import check_positive_int
from .precision import accumulation_dtype
from .ssd import reset_mask, segsum


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x**2) + eps)`` over the last dim (flash-linear-attention's l2norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def check_gated_delta_shapes(q, k, v, g, beta, chunk_size, seq_idx=None, initial_state=None) -> None:
    """Raise ValueError naming the argument whose shape does not fit ``q: (b, l, h, dk)`` (the Triton
    kernels index every tensor by q's layout, so a misfit would be read, not refused)."""
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"gated delta rule: q must be (b, l, h, dk) and v (b, l, h, dv), got {tuple(q.shape)} and {tuple(v.shape)}"
        )
    b, seqlen, h, dk = q.shape
    expected = {
        "k": (k, (b, seqlen, h, dk)),
        "v": (v, (b, seqlen, h, v.shape[-1])),
        "g": (g, (b, seqlen, h)),
        "beta": (beta, (b, seqlen, h)),
        "seq_idx": (seq_idx, (b, seqlen)),
        "initial_state": (initial_state, (b, h, dk, v.shape[-1])),
    }
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"gated delta rule: {name} has shape {tuple(t.shape)}, expected {shape} for q {tuple(q.shape)}"
            )
    check_positive_int(chunk_size, "gated delta rule: chunk_size", "positions per chunk")


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule, accumulating in float32 whatever the input dtype (float64 for float64 inputs).

    Runs the Triton kernels (:mod:`hybridlm.ops.gated_delta_triton`) or the plain-torch body
    (:func:`gated_delta_rule_chunked_torch`), as :func:`hybridlm.ops.dispatch.choose` decides.

    Args:
        q, k: (b, l, h, dk) queries and keys (normalize them first if the model does).
        v: (b, l, h, dv) values.
        g: (b, l, h) log-decays (<= 0).
        beta: (b, l, h) write strengths in [0, 1].
        chunk_size: positions per chunk; ``l`` need not be a multiple of it.
        scale: query scale, default ``dk ** -0.5``.
        seq_idx: (b, l) document index per position, or None.
        initial_state: (b, h, dk, dv), or None for zeros.
        return_final_state: also return the state after the last position.

    Returns:
        o: (b, l, h, dv) in the dtype of ``v``; and the final state (b, h, dk, dv) if asked.
    """
    check_gated_delta_shapes(q, k, v, g, beta, chunk_size, seq_idx, initial_state)
    if choose("gated_delta", q, k, v, initial_state) == "triton":  # a float64 state (cache) takes the reference
        from .gated_delta_triton import gated_delta_rule_triton

        o, final = gated_delta_rule_triton(q, k, v, g, beta, chunk_size, scale, seq_idx, initial_state)
        return (o, final) if return_final_state else o
    return gated_delta_rule_chunked_torch(
        q, k, v, g, beta, chunk_size, scale, seq_idx, initial_state, return_final_state
    )


def gated_delta_rule_chunked_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch chunked gated delta rule (the reference and the CPU path); arguments and
    result as :func:`gated_delta_rule_chunked`. Inputs are upcast and every product runs in float32
    (float64 for float64 inputs), also under ``torch.autocast``."""
    # Under autocast the matmuls below would run in bf16: upcast, then keep autocast out.
    with torch.autocast(q.device.type, enabled=False):
        return _chunked_torch_fp32(q, k, v, g, beta, chunk_size, scale, seq_idx, initial_state, return_final_state)


def _chunked_torch_fp32(q, k, v, g, beta, chunk_size, scale, seq_idx, initial_state, return_final_state):
    dtype = v.dtype
    acc = accumulation_dtype(q, k, v, g, beta, initial_state)
    b, seqlen, h, dk = q.shape
    dv = v.shape[-1]
    # A sequence shorter than a chunk is one chunk of its own length (as in the SSD): padding a 3-token
    # verification window to 64 rows, or any prompt to a chunk of 2**20, only multiplied zeros.
    Q = max(1, min(chunk_size, seqlen))
    scale = dk**-0.5 if scale is None else scale
    gf = g.to(acc)
    if seq_idx is not None:
        gf = torch.where(reset_mask(seq_idx).unsqueeze(-1), float("-inf"), gf)
    pad = (-seqlen) % Q
    qf, kf, vf, bf = q.to(acc) * scale, k.to(acc), v.to(acc), beta.to(acc)
    if pad:
        # Padding steps write nothing (beta = 0) and do not decay (g = 0).
        qf, kf, vf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (qf, kf, vf))
        gf, bf = (F.pad(t, (0, 0, 0, pad)) for t in (gf, bf))
    c = qf.shape[1] // Q

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (b, l, h, ...) -> (b, h, c, Q, ...)
        t = t.reshape(b, c, Q, h, *t.shape[3:])
        return t.permute(0, 3, 1, 2, *range(4, t.dim()))

    qc, kc, vc = chunks(qf), chunks(kf), chunks(vf)
    gc, bc = chunks(gf), chunks(bf)  # (b, h, c, Q)
    g_cum = torch.cumsum(gc, dim=-1)
    decay = torch.exp(segsum(gc))  # (b, h, c, Q, Q), zero above the diagonal
    strictly_lower = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril(-1)

    A = (bc.unsqueeze(-1) * (kc @ kc.transpose(-1, -2)) * decay).masked_fill(~strictly_lower, 0.0)
    T = A + torch.eye(Q, dtype=A.dtype, device=A.device)
    U0 = torch.linalg.solve_triangular(T, bc.unsqueeze(-1) * vc, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(T, (bc * torch.exp(g_cum)).unsqueeze(-1) * kc, upper=False, unitriangular=True)
    qk = (qc @ kc.transpose(-1, -2)) * decay  # causal, decayed q·k within the chunk
    q_in = qc * torch.exp(g_cum).unsqueeze(-1)  # queries reading the entering state
    k_out = kc * decay[..., -1, :].unsqueeze(-1)  # keys as seen from the chunk's end
    chunk_decay = torch.exp(g_cum[..., -1])  # (b, h, c)

    S = q.new_zeros(b, h, dk, dv, dtype=acc) if initial_state is None else initial_state.to(acc)
    outs = []
    for i in range(c):
        U = U0[:, :, i] - W[:, :, i] @ S  # (b, h, Q, dv)
        outs.append(q_in[:, :, i] @ S + qk[:, :, i] @ U)
        S = chunk_decay[:, :, i, None, None] * S + k_out[:, :, i].transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2) if outs else q_in.new_zeros(b, h, 0, Q, dv)  # (b, h, c, Q, dv); c = 0 at L = 0
    o = o.permute(0, 2, 3, 1, 4).reshape(b, c * Q, h, dv)[:, :seqlen].to(dtype)
    if return_final_state:
        return o, S
    return o


def gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step recurrence in ``dtype`` (float64 by default; slow, for tests). Returns ``(o, final_state)``."""
    b, seqlen, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    qd, kd, vd, gd, bd = (t.to(dtype) for t in (q, k, v, g, beta))
    S = torch.zeros(b, h, dk, dv, dtype=dtype, device=q.device)
    if initial_state is not None:
        S = initial_state.to(dtype).clone()
    outs = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            S = S * (seq_idx[:, t] == seq_idx[:, t - 1]).to(dtype).view(b, 1, 1, 1)
        S = S * torch.exp(gd[:, t])[..., None, None]
        read = torch.einsum("bhkv,bhk->bhv", S, kd[:, t])
        delta = bd[:, t, :, None] * (vd[:, t] - read)
        S = S + kd[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, qd[:, t] * scale))
    return torch.stack(outs, dim=1), S
