"""Gated DeltaNet mixer as Qwen3-Next defines it (parameter names are Qwen3-Next's ``linear_attn.*``).

in_proj_qkvz -> per key-head group [q | k | v | z]; in_proj_ba -> per group [b | a];
causal depthwise conv (no bias) + SiLU over [q | k | v]; q, k l2-normalized and repeated to the
value heads; beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias); the gated delta rule;
RMSNorm per value head, then gate with SiLU(z); out_proj.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.gated_delta import gated_delta_rule_chunked, l2_normalize
from ..ops.norm import rms_norm_then_gate
from ..ops.precision import accumulation_dtype
from ..ops.step import causal_conv1d_with_state, gated_delta_step, gdn_step
from .cache import RecurrentState
from .context import SequenceContext
from .conv import CausalConv1d
from .init import dt_bias_init, normal_


class GatedRMSNormAfter(nn.Module):
    """Qwen3-Next's output norm: RMSNorm over each head (norm *before* the gate), then ``* silu(z)``."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size))

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o, z: (..., head_dim) -> same shape, dtype of ``o``; normalized in float32 (float64 for float64 ``o``)."""
        return rms_norm_then_gate(o, z, self.weight, self.eps)


class GatedDeltaNet(nn.Module):
    """The ``G`` mixer. Input and output (B, L, hidden_size)."""

    keep_fp32 = ("A_log", "dt_bias")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.nk = c.resolved_gdn_num_heads
        self.nv = c.resolved_gdn_num_value_heads
        self.dk = c.gdn_head_dim
        self.dv = c.resolved_gdn_value_head_dim
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = nn.Linear(c.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(c.hidden_size, 2 * self.nv, bias=False)
        self.conv1d = CausalConv1d(self.conv_dim, c.gdn_conv_kernel, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.nv))
        self.A_log = nn.Parameter(torch.empty(self.nv))
        self.norm = GatedRMSNormAfter(self.dv, c.norm_eps)
        self.out_proj = nn.Linear(self.value_dim, c.hidden_size, bias=False)

    def _split(self, qkvz: torch.Tensor, ba: torch.Tensor):
        """Undo Qwen3-Next's per-key-head interleaving of the projections."""
        b, seqlen = qkvz.shape[:2]
        per = self.nv // self.nk
        qkvz = qkvz.view(b, seqlen, self.nk, 2 * self.dk + 2 * per * self.dv)
        q, k, v, z = torch.split(qkvz, [self.dk, self.dk, per * self.dv, per * self.dv], dim=-1)
        ba = ba.view(b, seqlen, self.nk, 2 * per)
        beta, a = torch.split(ba, [per, per], dim=-1)
        return (
            q.reshape(b, seqlen, self.key_dim),
            k.reshape(b, seqlen, self.key_dim),
            v.reshape(b, seqlen, self.value_dim),
            z.reshape(b, seqlen, self.nv, self.dv),
            beta.reshape(b, seqlen, self.nv),
            a.reshape(b, seqlen, self.nv),
        )

    def init_cache(self, batch: int, max_len: int, device, dtype) -> RecurrentState:
        """Conv inputs (B, K-1, conv_dim) in ``dtype`` and the delta-rule state (B, Hv, dk, dv) in float32
        (float64 for a float64 ``dtype``)."""
        K = self.conv1d.weight.shape[-1]
        return RecurrentState.zeros(batch, K, self.conv_dim, (self.nv, self.dk, self.dv), device, dtype)

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """x: (B, L, hidden) -> (B, L, hidden); with ``ctx.cache``, continues from and updates the cached state."""
        b, seqlen, _ = x.shape
        cache = ctx.cache
        q, k, v, z, beta, a = self._split(self.in_proj_qkvz(x), self.in_proj_ba(x))
        qkv = torch.cat([q, k, v], dim=-1)
        keep = None
        if cache is None:
            qkv = self.conv1d(qkv, ctx.seq_idx)
        else:
            state = cache.state(self)
            keep = cache.pad_mask(seqlen)
            if keep is not None:  # padding enters the conv as zeros, as the empty history does
                qkv = qkv * keep.unsqueeze(-1).to(qkv.dtype)
            qkv, _ = causal_conv1d_with_state(qkv, state.conv, self.conv1d.weight, None, "silu", inplace=True)
        q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        if cache is not None and seqlen == 1 and keep is None:  # a decode step: the raw q, k and gates go in
            q, k, v = q.view(b, self.nk, self.dk), k.view(b, self.nk, self.dk), v.view(b, self.nv, self.dv)
            o = gdn_step(q, k, v, a[:, 0], beta[:, 0], self.A_log, self.dt_bias, state.recurrent).unsqueeze(1)
        else:
            o = self._delta_rule(q, k, v, a, beta, keep, ctx)
        o = self.norm(o, z)
        return self.out_proj(o.reshape(b, seqlen, self.value_dim))

    def _delta_rule(self, q, k, v, a, beta, keep, ctx: SequenceContext) -> torch.Tensor:
        """The conv's q, k (B, L, key_dim), v (B, L, value_dim) and the raw gates a, beta (B, L, Hv) -> o (B, L, Hv,
        dv): the chunked rule (continuing the cache's state, where there is one), or one step at a padded position
        (``keep`` (B, L), False at padding: g = beta = 0 there, so padding neither decays nor writes the state)."""
        b, seqlen = q.shape[:2]
        acc = accumulation_dtype(q, k, v)  # float32 for bf16 / fp32 activations; a float64 model stays float64
        q = l2_normalize(q.reshape(b, seqlen, self.nk, self.dk).to(acc))
        k = l2_normalize(k.reshape(b, seqlen, self.nk, self.dk).to(acc))
        if self.nv != self.nk:
            q = q.repeat_interleave(self.nv // self.nk, dim=2)
            k = k.repeat_interleave(self.nv // self.nk, dim=2)
        v = v.reshape(b, seqlen, self.nv, self.dv)
        g = -torch.exp(self.A_log.to(acc)) * F.softplus(a.to(acc) + self.dt_bias.to(acc))
        beta = beta.to(acc).sigmoid()
        if keep is not None:
            g, beta = g * keep.unsqueeze(-1), beta * keep.unsqueeze(-1)
        if ctx.cache is None:
            return gated_delta_rule_chunked(q, k, v, g, beta, self.config.gdn_chunk_size, seq_idx=ctx.seq_idx)
        state = ctx.cache.state(self)
        if seqlen == 1:  # (a padded position: a one-token forward inside a prompt's padding)
            o, _ = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state.recurrent, inplace=True)
            return o.unsqueeze(1)
        # prefill, a prefill chunk or a verification window: the chunked form, never the step
        o, S = gated_delta_rule_chunked(
            q, k, v, g, beta, self.config.gdn_chunk_size, initial_state=state.recurrent, return_final_state=True
        )
        state.recurrent.copy_(S)
        return o

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator | None, std: float, out_std: float) -> None:
        c = self.config
        normal_(self.in_proj_qkvz.weight, std, gen)
        normal_(self.in_proj_ba.weight, std, gen)
        self.conv1d.init_weights(gen)
        with torch.no_grad():
            self.dt_bias.copy_(
                dt_bias_init(self.nv, c.gdn_dt_min, c.gdn_dt_max, c.gdn_dt_init_floor, gen, self.dt_bias.device)
            )
            self.A_log.copy_(
                torch.log(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16, generator=gen))
            )
        nn.init.ones_(self.norm.weight)
        normal_(self.out_proj.weight, out_std, gen)

    @staticmethod
    def flops_per_token(c: ModelConfig, seq_len: int) -> float:
        nk, nv, dk = c.resolved_gdn_num_heads, c.resolved_gdn_num_value_heads, c.gdn_head_dim
        dv = c.resolved_gdn_value_head_dim
        proj = 2 * c.hidden_size * (2 * nk * dk + 2 * nv * dv + 2 * nv) + 2 * nv * dv * c.hidden_size
        if seq_len == 0:  # no sequence: the projections alone
            return proj
        Q = min(c.gdn_chunk_size, seq_len)  # shorter than a chunk: one chunk of its length (ops/gated_delta.py)
        padded = math.ceil(seq_len / Q) * Q
        # Per padded position and value head: k·k and q·k within the chunk, the mix of corrected
        # values, and three reads/writes of the (dk x dv) state. Triangular solves are not counted.
        chunk = nv * (2 * Q * dk + 2 * Q * dk + 2 * Q * dv + 3 * 2 * dk * dv)
        return proj + chunk * padded / seq_len


def gdn_reference(layer: GatedDeltaNet, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The mixer written with the reference ops (per-document conv, step recurrence), in the dtype of ``x``."""
    from ..ops.conv import causal_conv1d_reference
    from ..ops.gated_delta import gated_delta_rule_reference

    b, seqlen, _ = x.shape
    q, k, v, z, beta, a = layer._split(x @ layer.in_proj_qkvz.weight.T, x @ layer.in_proj_ba.weight.T)
    qkv = causal_conv1d_reference(torch.cat([q, k, v], -1), layer.conv1d.weight, None, seq_idx, "silu", x.dtype)
    q, k, v = torch.split(qkv, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    q = l2_normalize(q.reshape(b, seqlen, layer.nk, layer.dk)).repeat_interleave(layer.nv // layer.nk, dim=2)
    k = l2_normalize(k.reshape(b, seqlen, layer.nk, layer.dk)).repeat_interleave(layer.nv // layer.nk, dim=2)
    g = -torch.exp(layer.A_log) * F.softplus(a + layer.dt_bias)
    o, _ = gated_delta_rule_reference(
        q, k, v.reshape(b, seqlen, layer.nv, layer.dv), g, beta.sigmoid(), seq_idx=seq_idx, dtype=x.dtype
    )
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm.eps) * layer.norm.weight * F.silu(z)
    return o.reshape(b, seqlen, layer.value_dim) @ layer.out_proj.weight.T
