"""Multi-latent attention (the ``+`` mixer), as DeepSeek-V2/V3 define it.

Per token, with ``nh`` heads, ``dn = qk_head_dim``, ``dr = qk_pos_emb_head_dim``, ``dv = v_head_dim``::

    c_q          = RMSNorm(x W_DQ)                      (q_lora_rank)   [q_lora_rank None: q = x W_Q]
    q            = c_q W_UQ, per head [q_nope (dn) | q_pe (dr)]
    [c_kv | k_pe] = x W_DKV;  c_kv = RMSNorm(c_kv)       (kv_lora_rank), (dr): k_pe is shared by all heads
    [k_nope | v] = c_kv W_UKV, per head                  (dn), (dv)
    q_pe, k_pe   = RoPE on adjacent channel pairs (DeepSeek's layout; base rope_theta)
    o_h          = softmax((q_nope·k_nope + q_pe·k_pe) / sqrt(dn + dr)) v_h      causal, per document
    y            = [o_1 .. o_nh] W_O

The softmax scale is DeepSeek's ``1/sqrt(dn + dr)``, times YaRN's ``mscale²`` under YaRN scaling
(:func:`~hybridlm.layers.rope.softmax_factor`). Packed rows attend within their documents through
:func:`~hybridlm.ops.attention.causal_attention` (FlexAttention on CUDA), as ``*`` does. Decoding keeps
only ``c_kv`` and the rotated ``k_pe`` per position (:class:`LatentCache`) and attends in the latent
space: ``W_UK`` is absorbed into the query and ``W_UV`` applied after the weighted sum, which is the
same function (see :meth:`MLA.attend_cached`).

Parameter names follow Hugging Face's DeepSeek-V3 (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj`` or
``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``); the Megatron
adapter maps them to ``linear_q_down_proj`` etc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.attention import causal_attention
from ..ops.precision import accumulation_dtype
from .cache import cached_keys_mask
from .context import SequenceContext
from .init import normal_
from .norm import RMSNorm
from .rope import Yarn, apply_rope_interleaved, rope_cos_sin, rope_frequencies, softmax_factor


@dataclass
class LatentCache:
    """What an MLA (or DSA) layer keeps per decoded position, preallocated for ``max_len`` positions.

    Attributes:
        c_kv: (B, max_len, kv_lora_rank) the normalized key/value latent.
        k_pe: (B, max_len, qk_pos_emb_head_dim) the rotated RoPE key shared by all heads.
        index_k: (B, max_len, dsa_indexer_head_dim) float32 (float64 in a float64 cache) lightning-indexer keys
            (DSA only, else None).

    Zero-filled (masked positions must hold finite values: a zero weight times NaN is still NaN) and
    written in place. The buffers are append-only, so rolling back the cache's ``offset`` is all a
    rollback needs (as for ``KVState``): nothing is copied.
    """

    c_kv: torch.Tensor
    k_pe: torch.Tensor
    index_k: torch.Tensor | None = None
    #: Fields with one entry per cached position, and their position dimension (see ``layers/cache.py``).
    POSITION_DIM: ClassVar[dict[str, int]] = {"c_kv": 1, "k_pe": 1, "index_k": 1}

    def snapshot(self) -> None:
        return None

    def restore(self, snap: None) -> None:
        pass

    def write(self, cache, c_kv: torch.Tensor, k_pe: torch.Tensor, index_k: torch.Tensor | None = None) -> int:
        """Store L new positions (each argument (B, L, ...)) after ``cache.offset``; returns the key count S.

        A decode step with static shapes (``cache.static_step(L)``, for CUDA graphs) writes at the
        device offset ``cache.offset_t`` and returns ``max_len`` (the step attends over the whole
        buffer); otherwise the positions are written as a slice and ``offset + L`` is returned.
        """
        if (index_k is None) != (self.index_k is None):
            raise ValueError("index_k must be given exactly when the cache holds indexer keys (DSA)")
        pairs = [(self.c_kv, c_kv), (self.k_pe, k_pe)] + ([] if index_k is None else [(self.index_k, index_k)])
        L = c_kv.shape[1]
        if cache.static_step(L):
            for buf, new in pairs:
                buf.index_copy_(1, cache.offset_t, new.to(buf.dtype))
            return self.c_kv.shape[1]
        off = cache.offset
        for buf, new in pairs:
            buf[:, off : off + L] = new
        return off + L


def allowed_keys(ctx: SequenceContext, seqlen: int, device: torch.device) -> torch.Tensor:
    """(B or 1, L, L) bool: query t may see key s (s <= t, same document)."""
    mask = ctx.attention_mask()
    if mask is not None:
        return mask[:, 0]
    return torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril().unsqueeze(0)


class MLA(nn.Module):
    """The ``+`` mixer. Input and output (B, L, hidden_size)."""

    keep_fp32: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        nh, dn, dr, dv, H = c.num_attention_heads, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim, c.hidden_size
        self.nh, self.dn, self.dr, self.dv = nh, dn, dr, dv
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * (dn + dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(H, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.norm_eps, c.norm_zero_centered)
            self.q_b_proj = nn.Linear(c.q_lora_rank, nh * (dn + dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, c.kv_lora_rank + dr, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.norm_eps, c.norm_zero_centered)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, nh * (dn + dv), bias=False)
        self.o_proj = nn.Linear(nh * dv, H, bias=False)
        # YaRN (DeepSeek-V3) also sharpens the softmax by m(s, mscale_all_dim)^2.
        self.softmax_scale = (dn + dr) ** -0.5 * softmax_factor(c)

    # -- the pieces, shared by training and decoding ----------------------------------------------

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, L, qk_pos_emb_head_dim) for ``position_ids`` (B, L): float32, float64 in a float64 model."""
        c = self.config
        return rope_cos_sin(position_ids, self.dr, c.rope_theta, accumulation_dtype(self.o_proj.weight), Yarn.of(c))

    def project_query(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, L, H) -> q (B, L, nh, dn + dr) with RoPE applied, and c_q (B, L, q_lora_rank) or None."""
        b, seqlen, _ = x.shape
        if self.config.q_lora_rank is None:
            c_q, q = None, self.q_proj(x)
        else:
            c_q = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(c_q)
        q_nope, q_pe = q.view(b, seqlen, self.nh, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        return torch.cat([q_nope, apply_rope_interleaved(q_pe, cos, sin)], dim=-1), c_q

    def project_latent(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, H) -> c_kv (B, L, kv_lora_rank) normalized, k_pe (B, L, dr) rotated: what the cache keeps."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.config.kv_lora_rank, self.dr], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope_interleaved(k_pe.unsqueeze(2), cos, sin).squeeze(2)

    def expand_latent(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv (B, S, kv_lora_rank), k_pe (B, S, dr) -> k (B, S, nh, dn + dr), v (B, S, nh, dv)."""
        b, s, _ = c_kv.shape
        k_nope, v = self.kv_b_proj(c_kv).view(b, s, self.nh, self.dn + self.dv).split([self.dn, self.dv], dim=-1)
        return torch.cat([k_nope, k_pe.unsqueeze(2).expand(b, s, self.nh, self.dr)], dim=-1), v

    def qkv(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q (B, L, nh, dn+dr), k (B, L, nh, dn+dr), v (B, L, nh, dv), c_q (B, L, q_lora_rank) or None."""
        cos, sin = self.rope(position_ids)
        q, c_q = self.project_query(x, cos, sin)
        k, v = self.expand_latent(*self.project_latent(x, cos, sin))
        return q, k, v, c_q

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax attention through SDPA over expanded cached keys: q (B, L, nh, dn+dr), k (B, S, nh, dn+dr),
        v (B, S, nh, dv), mask (B|1, 1, L, S) bool -> (B, L, nh * dv)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale))

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        """Attention's output (B, nh, L, dv) -> (B, L, nh * dv), ``o_proj``'s input."""
        b, _, seqlen, _ = o.shape
        return o.transpose(1, 2).reshape(b, seqlen, self.nh * self.dv)

    def attend_latent(
        self, q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention in the latent space (decoding): ``W_UK`` folded into the query, ``W_UV`` after the sum.

        Args:
            q: (B, T, nh, dn + dr) queries with RoPE applied.
            c_kv: (B, S, kv_lora_rank), k_pe: (B, S, dr) the cached keys, the queries' own included.
            mask: (B|1, T, S) bool, True where query t may attend key s.

        Returns:
            (B, T, nh * dv), before ``o_proj``.
        """
        b, t = q.shape[:2]
        c_kv, k_pe = c_kv.to(q.dtype), k_pe.to(q.dtype)
        w = self.kv_b_proj.weight.view(self.nh, self.dn + self.dv, self.config.kv_lora_rank).to(q.dtype)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_latent = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk)
        scores = torch.einsum("bhtc,bsc->bhts", q_latent, c_kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
        scores = (scores * self.softmax_scale).masked_fill(~mask.unsqueeze(1), float("-inf"))
        # At least float32 (bf16 scores), and float64 in a float64 model, as the full forward's SDPA.
        probs = scores.softmax(dim=-1, dtype=accumulation_dtype(scores)).to(q.dtype)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)
        return torch.einsum("bthc,hvc->bthv", o_latent, w_uv).reshape(b, t, self.nh * self.dv)

    # -- training (and, with ``ctx.cache`` set, cached decoding) ------------------------------------------

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        if ctx.cache is not None:
            return self._forward_cached(x, ctx)
        q, k, v, _ = self.qkv(x, ctx.position_ids)
        # Packed rows on CUDA take FlexAttention under the documents' block mask, as '*' does: SDPA under the dense
        # mask kept it as a bf16 bias for the backward (128 MiB a layer at 4 x 4096) and scored every pair of
        # positions, the other documents' too.
        o = causal_attention(
            *(t.transpose(1, 2) for t in (q, k, v)),
            ctx.seq_idx,
            block_mask=ctx.block_mask,
            dense_mask=ctx.attention_mask,
            scale=self.softmax_scale,
        )
        return self.o_proj(self.merge_heads(o))

    # -- decoding (the protocol of ``layers/cache.py``) -------------------------------------------------

    def init_cache(self, batch: int, max_len: int, device, dtype) -> LatentCache:
        """Preallocated latents: c_kv (B, max_len, kv_lora_rank) and k_pe (B, max_len, qk_pos_emb_head_dim),
        ``kv_lora_rank + qk_pos_emb_head_dim`` values per token instead of a KV cache's
        ``num_attention_heads * (qk_head_dim + qk_pos_emb_head_dim + v_head_dim)``."""
        return LatentCache(
            torch.zeros(batch, max_len, self.config.kv_lora_rank, device=device, dtype=dtype),
            torch.zeros(batch, max_len, self.dr, device=device, dtype=dtype),
        )

    def _forward_cached(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """x (B, L, hidden_size): the L positions after the ``ctx.cache.offset`` cached ones -> (B, L, hidden_size).

        Positions (RoPE) come from the cache (``ctx.position_ids``); the new latents are written into
        the layer's :class:`LatentCache` and the queries attend every cached key they may see.
        """
        cache, L = ctx.cache, x.shape[1]
        state = cache.state(self)
        cos, sin = self.rope(ctx.position_ids)
        q, _ = self.project_query(x, cos, sin)
        S = state.write(cache, *self.project_latent(x, cos, sin))
        return self.o_proj(self.attend_cached(q, state, S, cached_keys_mask(cache, L, x.device)))

    def attend_cached(self, q: torch.Tensor, state: LatentCache, S: int, mask: torch.Tensor) -> torch.Tensor:
        """q (B, L, nh, dn+dr) over the first S cached positions, mask (B|1, L, S) bool -> (B, L, nh * dv).

        A decode step (L == 1) always stays in the latent space: expanding every cached latent to
        per-head keys and values would cost ``S * kv_lora_rank * nh * (dn + dv)`` per step. Longer
        inputs (prefill, speculative verification) take whichever form costs fewer FLOPs.
        """
        c_kv, k_pe = state.c_kv[:, :S], state.k_pe[:, :S]
        L = q.shape[1]
        if L == 1 or self.latent_is_cheaper(L, S):
            return self.attend_latent(q, c_kv, k_pe, mask)
        k, v = self.expand_latent(c_kv.to(q.dtype), k_pe.to(q.dtype))
        return self.attend(q, k, v, mask.unsqueeze(1))

    def latent_is_cheaper(self, L: int, S: int) -> bool:
        """Whether L queries over S keys cost fewer FLOPs in the latent space than with expanded keys/values.

        Per head (common factors dropped): latent ``L*S*(2*rkv + dr) + L*rkv*(dn + dv)`` (scores and
        sums over the rkv-wide latent, plus absorbing ``W_UK``/``W_UV`` per query) against expanded
        ``L*S*(dn + dr + dv) + S*rkv*(dn + dv)`` (scores and sums per head, plus expanding each key).
        """
        rkv, dn, dr, dv = self.config.kv_lora_rank, self.dn, self.dr, self.dv
        latent = L * S * (2 * rkv + dr) + L * rkv * (dn + dv)
        expanded = L * S * (dn + dr + dv) + S * rkv * (dn + dv)
        return latent < expanded

    # -- initialization and cost ------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator | None, std: float, out_std: float) -> None:
        if self.config.q_lora_rank is None:
            normal_(self.q_proj.weight, std, gen)
        else:
            normal_(self.q_a_proj.weight, std, gen)
            normal_(self.q_b_proj.weight, std, gen)
            self.q_a_layernorm.init_weights()
        normal_(self.kv_a_proj_with_mqa.weight, std, gen)
        normal_(self.kv_b_proj.weight, std, gen)
        self.kv_a_layernorm.init_weights()
        normal_(self.o_proj.weight, out_std, gen)

    @staticmethod
    def flops_per_token(c: ModelConfig, seq_len: int) -> float:
        """Projections, then scores and weighted values over all ``seq_len`` keys (no causal halving)."""
        nh, dn, dr, dv, H = c.num_attention_heads, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim, c.hidden_size
        qr, kvr = c.q_lora_rank, c.kv_lora_rank
        q = 2 * H * nh * (dn + dr) if qr is None else 2 * H * qr + 2 * qr * nh * (dn + dr)
        kv = 2 * H * (kvr + dr) + 2 * kvr * nh * (dn + dv)
        return q + kv + 2 * nh * dv * H + 2 * seq_len * nh * (dn + dr + dv)


def mla_queries_keys_values_reference(
    layer: MLA, x: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q, k (B, L, nh, dn+dr), v (B, L, nh, dv), c_q, computed in the dtype of ``x`` with explicit math.

    RoPE here rotates each adjacent pair ``(2i, 2i+1)`` in place (the textbook form), not the
    regrouped layout of the layer; dot products between queries and keys are the same.
    """
    c = layer.config
    b, seqlen, _ = x.shape
    nh, dn, dr, dv, eps = layer.nh, layer.dn, layer.dr, layer.dv, c.norm_eps

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    if c.q_lora_rank is None:
        c_q, q = None, x @ layer.q_proj.weight.T
    else:
        c_q = rms(x @ layer.q_a_proj.weight.T, layer.q_a_layernorm.scale())
        q = c_q @ layer.q_b_proj.weight.T
    q = q.view(b, seqlen, nh, dn + dr)
    kv_a = x @ layer.kv_a_proj_with_mqa.weight.T
    c_kv = rms(kv_a[..., : c.kv_lora_rank], layer.kv_a_layernorm.scale())
    kv = (c_kv @ layer.kv_b_proj.weight.T).view(b, seqlen, nh, dn + dv)

    inv, amp = rope_frequencies(dr, c.rope_theta, Yarn.of(c), torch.float64, position_ids.device)
    ang = position_ids.to(torch.float64)[..., None] * inv  # (B, L, dr/2)
    cos, sin = (amp * ang.cos()).to(x.dtype)[:, :, None], (amp * ang.sin()).to(x.dtype)[:, :, None]

    def rot_pairs(t):  # (B, L, h, dr): pair i = channels (2i, 2i+1) turned by angle i
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)

    q = torch.cat([q[..., :dn], rot_pairs(q[..., dn:])], dim=-1)
    k_pe = rot_pairs(kv_a[..., c.kv_lora_rank :].unsqueeze(2)).expand(b, seqlen, nh, dr)
    k = torch.cat([kv[..., :dn], k_pe], dim=-1)
    return q, k, kv[..., dn:], c_q


def attention_over(
    layer: MLA, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Explicit per-head softmax attention: allowed (B, L, L) bool -> output after ``o_proj`` (B, L, H)."""
    b, seqlen = q.shape[:2]
    out = torch.empty(b, seqlen, layer.nh, layer.dv, dtype=q.dtype, device=q.device)
    for h in range(layer.nh):
        scores = torch.einsum("bld,bsd->bls", q[:, :, h], k[:, :, h]) / (layer.dn + layer.dr) ** 0.5
        scores = scores * softmax_factor(layer.config)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, h] = torch.einsum("bls,bsd->bld", scores.softmax(-1), v[:, :, h])
    return out.reshape(b, seqlen, -1) @ layer.o_proj.weight.T


def causal_document_mask(
    seqlen: int, seq_idx: torch.Tensor | None, batch: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(B, L, L) bool built by hand: s <= t and, when packed, the same document; on ``seq_idx``'s device
    (``device`` when there is none; the CPU by default)."""
    device = seq_idx.device if seq_idx is not None else device
    allowed = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril().expand(batch, seqlen, seqlen)
    if seq_idx is not None:
        allowed = allowed & (seq_idx[:, :, None] == seq_idx[:, None, :])
    return allowed


def mla_reference(
    layer: MLA, x: torch.Tensor, position_ids: torch.Tensor, seq_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference MLA in the dtype of ``x`` (pass a float64 copy of the layer and input): full-rank
    keys and values per head, explicit softmax, masks built by hand."""
    q, k, v, _ = mla_queries_keys_values_reference(layer, x, position_ids)
    return attention_over(layer, q, k, v, causal_document_mask(x.shape[1], seq_idx, x.shape[0], x.device))
