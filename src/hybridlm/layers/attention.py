"""Causal self-attention with grouped-query heads, optional (partial) RoPE, QK-norm and output gate.

Parameter names are NemotronH's (q_proj, k_proj, v_proj, o_proj), plus Qwen3's q_norm / k_norm and, with
``attention_output_gate``, gate_proj (nq * head_dim, hidden): Qwen3-Next's gate, which Qwen3-Next interleaves
per head into a q_proj twice as wide and Megatron per query group into linear_qkv; here it is a projection of
its own, so that q_proj means the same with and without the gate (docs/design.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.attention import attention_growing_keys, causal_attention
from ..ops.precision import accumulation_dtype
from .cache import KVState, cached_keys_mask
from .context import SequenceContext
from .init import normal_
from .norm import RMSNorm
from .rope import Yarn, apply_rope, rope_frequencies


class Attention(nn.Module):
    """The ``*`` mixer. Input and output (B, L, hidden_size)."""

    keep_fp32 = ()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.nq = c.num_attention_heads
        self.nkv = c.resolved_num_query_groups
        self.head_dim = c.resolved_head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nq * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.nq * self.head_dim, c.hidden_size, bias=False)
        if c.attention_output_gate:
            self.gate_proj = nn.Linear(c.hidden_size, self.nq * self.head_dim, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.norm_eps, c.norm_zero_centered)
            self.k_norm = RMSNorm(self.head_dim, c.norm_eps, c.norm_zero_centered)

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """x: (B, L, hidden) -> (B, L, hidden)."""
        b, seqlen, _ = x.shape
        q = self.q_proj(x).view(b, seqlen, self.nq, self.head_dim)
        k = self.k_proj(x).view(b, seqlen, self.nkv, self.head_dim)
        v = self.v_proj(x).view(b, seqlen, self.nkv, self.head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, L, d)
        if ctx.cache is not None:
            o = self._attend_cached(q, k, v, ctx.cache)
        else:
            o = causal_attention(q, k, v, ctx.seq_idx, block_mask=ctx.block_mask, dense_mask=ctx.attention_mask)
        o = o.transpose(1, 2)  # (b, L, heads, d)
        if self.config.attention_output_gate:
            # The gate is each position's own (from its input): a cached step gates as the full forward does.
            o = output_gate(o, self.gate_proj(x).view(b, seqlen, self.nq, self.head_dim))
        return self.o_proj(o.reshape(b, seqlen, self.nq * self.head_dim))

    def init_cache(self, batch: int, max_len: int, device, dtype) -> KVState:
        """Preallocated keys and values, (B, kv_heads, max_len, head_dim) each."""
        return KVState.zeros(batch, self.nkv, max_len, self.head_dim, device, dtype)

    def _attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache) -> torch.Tensor:
        """Write k, v (b, kv_heads, L, d) after the cached positions; attend q (b, heads, L, d) to all of them."""
        state = cache.state(self)
        L = q.shape[2]
        gqa = self.nkv != self.nq
        k, v = k.to(state.k.dtype), v.to(state.v.dtype)
        if cache.static_step(L):
            # Decode step with static shapes (a CUDA graph can replay it): write at the device-side
            # offset and attend over the whole buffer, masking positions not yet written and padding.
            state.k.index_copy_(2, cache.offset_t, k)
            state.v.index_copy_(2, cache.offset_t, v)
            mask = cached_keys_mask(cache, L, q.device).unsqueeze(1)  # (B, 1, 1, max_len)
            keys, values = state.k.to(q.dtype), state.v.to(q.dtype)  # (a cache of another dtype: read in q's)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        off = cache.offset
        state.k[:, :, off : off + L] = k
        state.v[:, :, off : off + L] = v
        keys, values = state.k[:, :, : off + L].to(q.dtype), state.v[:, :, : off + L].to(q.dtype)
        if off == 0 and not cache.has_padding:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        if L == 1 and not cache.has_padding:  # an eager decode step: one query sees every key written
            return attention_growing_keys(q, keys, values, None, gqa)
        mask = cached_keys_mask(cache, L, q.device).unsqueeze(1)  # (B|1, 1, L, off+L)
        return attention_growing_keys(q, keys, values, mask, gqa)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator | None, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            normal_(proj.weight, std, gen)
        normal_(self.o_proj.weight, out_std, gen)
        if self.config.attention_output_gate:  # drawn last: q, k, v and o get the ungated layer's weights
            normal_(self.gate_proj.weight, std, gen)
        if self.config.qk_norm:
            self.q_norm.init_weights()
            self.k_norm.init_weights()

    @staticmethod
    def flops_per_token(c: ModelConfig, seq_len: int) -> float:
        """Projections (the output gate's too) plus scores and weighted values over all ``seq_len`` keys (no
        causal halving); the gate's sigmoid and product are elementwise, not counted."""
        hq, hkv, d = c.num_attention_heads, c.resolved_num_query_groups, c.resolved_head_dim
        proj = 2 * c.hidden_size * ((3 if c.attention_output_gate else 2) * hq * d + 2 * hkv * d)
        return proj + 4 * seq_len * d * hq


def output_gate(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``o * sigmoid(gate)`` in float32 (float64 for a float64 input), returned in ``o``'s dtype, as Megatron's
    ``_apply_output_gate`` computes it (Hugging Face's Qwen3-Next computes it in the model's dtype).

    Args:
        o: (B, L, heads, head_dim) attention output.
        gate: (B, L, heads, head_dim) gate logits, one per output channel.
    """
    dtype = accumulation_dtype(o, gate)
    return (o.to(dtype) * torch.sigmoid(gate.to(dtype))).to(o.dtype)


def attention_reference(
    layer: Attention, x: torch.Tensor, position_ids: torch.Tensor, seq_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Explicit softmax attention in the dtype of ``x`` (pass a float64 copy of the layer and input for
    the reference): per-head loops over shared KV groups, masks built by hand, the output gate written out.

    Args:
        x: (B, L, hidden); position_ids, seq_idx: (B, L).
    """
    c = layer.config
    b, seqlen, _ = x.shape
    d = layer.head_dim
    q = (x @ layer.q_proj.weight.T).view(b, seqlen, layer.nq, d)
    k = (x @ layer.k_proj.weight.T).view(b, seqlen, layer.nkv, d)
    v = (x @ layer.v_proj.weight.T).view(b, seqlen, layer.nkv, d)
    if c.qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + c.norm_eps) * layer.q_norm.scale()
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + c.norm_eps) * layer.k_norm.scale()
    R = c.rotary_dim
    if R:
        inv, amp = rope_frequencies(R, c.rope_theta, Yarn.of(c), torch.float64)
        ang = position_ids.to(x.dtype)[..., None] * inv.to(x.dtype)  # (b, L, R/2)
        cos, sin = amp * ang.cos()[:, :, None], amp * ang.sin()[:, :, None]

        def rot(t):
            a, bb, rest = t[..., : R // 2], t[..., R // 2 : R], t[..., R:]
            return torch.cat([a * cos - bb * sin, bb * cos + a * sin, rest], dim=-1)

        q, k = rot(q), rot(k)
    allowed = torch.ones(seqlen, seqlen, dtype=torch.bool).tril().expand(b, seqlen, seqlen)
    if seq_idx is not None:
        allowed = allowed & (seq_idx[:, :, None] == seq_idx[:, None, :])
    out = torch.empty(b, seqlen, layer.nq, d, dtype=x.dtype)
    per_group = layer.nq // layer.nkv
    for hq in range(layer.nq):
        hk = hq // per_group
        scores = torch.einsum("bld,bsd->bls", q[:, :, hq], k[:, :, hk]) / d**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, hq] = torch.einsum("bls,bsd->bld", scores.softmax(-1), v[:, :, hk])
    if c.attention_output_gate:  # each head's channels times 1 / (1 + exp(-gate)) of the same position
        gate = (x @ layer.gate_proj.weight.T).view(b, seqlen, layer.nq, d)
        out = out / (1 + torch.exp(-gate))
    return out.reshape(b, seqlen, -1) @ layer.o_proj.weight.T
