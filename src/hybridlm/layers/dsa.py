"""DeepSeek sparse attention (the ``D`` mixer, DeepSeek-V3.2): MLA whose queries attend only the top-k keys
that a small "lightning indexer" picks.

The indexer (float32 here, float64 in a float64 model), with ``n = dsa_indexer_n_heads``, ``d = dsa_indexer_head_dim``::

    q_j  = c_q W_j^Q  (per index head j; c_q is MLA's normalized query latent)      (d)
    k    = LayerNorm(x W^K)   one key per token, shared by the index heads           (d)
    RoPE (rotate-half) on the first qk_pos_emb_head_dim channels of q_j and k
    w_j  = (x W^w)_j / sqrt(n) / sqrt(d)
    I(t, s) = sum_j w_j(t) * ReLU(q_j(t) · k(s))

Each query keeps the ``dsa_indexer_topk`` keys with the largest ``I(t, s)`` among those it may see
(``s <= t``, same document; ties go to the earlier position), and MLA's attention runs over those
keys only. Here that is attention under the selection as a mask (no gather kernel): on CUDA
FlexAttention under the selection's block mask, which skips the key blocks no query of a block selects
(above the diagonal, other documents) but computes every other block whole; elsewhere SDPA under the
dense mask (:func:`~hybridlm.ops.attention.masked_attention`). :meth:`DSA.flops_per_token` counts
dense attention, the MFU convention.

The indexer reads ``x`` and ``c_q`` detached, and its selection is discrete, so the language-model
loss never reaches it and its own loss never reaches the rest of the model (the paper trains the two
separately). Its loss (DeepSeek-V3.2, section 2.1), recorded in the caller's ``aux_losses`` list when
``dsa_indexer_loss_coeff > 0``, gradients are on and a parameter of the indexer trains (a frozen indexer's loss
would cost its target, several times the layer's step, and reach nothing)::

    p_t = normalize(sum_h softmax_h(main attention logits of query t))   (detached target)
    L_I = coeff * mean_t KL(p_t || softmax(I(t, :)))

(the target: :func:`~hybridlm.ops.indexer.indexer_target`, two Triton kernels on CUDA that keep nothing per head)

over all keys query ``t`` may see (the paper's dense warm-up stage; run it with
``dsa_indexer_topk >= seq_len`` so attention is dense and freeze everything but the indexer: ``train.trainable``), or
over the selected keys only with ``dsa_indexer_use_sparse_loss`` (the sparse training stage).

Left out, as they do not change the function in float32: the Hadamard ``rotate_activation`` of q
and k (an orthogonal map, so every ``q·k`` is unchanged) and the FP8 quantization of the scores.
Names follow DeepSeek's reference code (``indexer.wq_b``, ``wk``, ``k_norm``, ``weights_proj``);
Megatron calls them ``core_attention.indexer.linear_wq_b`` etc.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..ops.attention import masked_attention
from ..ops.indexer import index_scores, indexer_target, select_topk
from ..ops.precision import accumulation_dtype, matmul_dtype
from .cache import cached_keys_mask
from .context import SequenceContext
from .init import normal_
from .mla import (
    MLA,
    LatentCache,
    allowed_keys,
    attention_over,
    causal_document_mask,
    mla_queries_keys_values_reference,
)
from .rope import Yarn, apply_rope, rope_frequencies


class Indexer(nn.Module):
    """The lightning indexer's weights, queries and keys, in float32 (float64 in a float64 model: a reference, whose
    selection and loss float32 rounding would cap at ~1e-7); its scores (B, T, S) of every query against every key
    are :func:`~hybridlm.ops.indexer.index_scores` (a Triton kernel on CUDA)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.n, self.d = c.dsa_indexer_n_heads, c.dsa_indexer_head_dim
        self.wq_b = nn.Linear(c.q_lora_rank, self.n * self.d, bias=False)
        self.wk = nn.Linear(c.hidden_size, self.d, bias=False)
        self.k_norm = nn.LayerNorm(self.d, eps=c.norm_eps)
        self.weights_proj = nn.Linear(c.hidden_size, self.n, bias=False)

    def queries(
        self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, H), c_q (B, T, q_lora_rank) -> q (B, T, n, d) and head weights w (B, T, n), float32
        (float64 for float64 ``x``)."""
        b, t, _ = x.shape
        q = self.wq_b(c_q)
        acc = accumulation_dtype(x)
        with _float32(x):
            q = apply_rope(q.to(acc).view(b, t, self.n, self.d), cos, sin)
            w = F.linear(x.to(acc), self.weights_proj.weight.to(acc)) * (self.n**-0.5 * self.d**-0.5)
        return q, w

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, S, H) -> k (B, S, d) float32, float64 for float64 ``x`` (what a decoding cache keeps)."""
        norm, k, acc = self.k_norm, self.wk(x), accumulation_dtype(x)
        with _float32(x):
            k = F.layer_norm(k.to(acc), (self.d,), norm.weight.to(acc), norm.bias.to(acc), norm.eps)
            return apply_rope(k.unsqueeze(2), cos, sin).squeeze(2)


def _float32(t: torch.Tensor) -> torch.autocast:
    """A region where autocast is off, so the indexer's float32 math stays float32 under bf16 autocast."""
    return torch.autocast(t.device.type, enabled=False)


def indexer_kl_rows(target: torch.Tensor, index_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``KL(p_t || softmax(I(t, :)))`` of each query over the ``valid`` keys.

    Args:
        target: (B, T, S) the target ``p`` (:func:`~hybridlm.ops.indexer.indexer_target`, a constant), zero at keys
            not valid.
        index_scores: (B, T, S) the indexer's scores (the only input with a gradient).
        valid: (B|1, T, S) bool, keys the distributions range over (each query has at least one).

    Returns:
        (B, T) float32 (float64 for float64 inputs).
    """
    acc = accumulation_dtype(target, index_scores)
    target = target.to(acc)
    log_pred = index_scores.to(acc).masked_fill(~valid, float("-inf")).log_softmax(dim=-1).masked_fill(~valid, 0.0)
    return (torch.xlogy(target, target) - target * log_pred).sum(dim=-1)


def _joined(chunks) -> torch.Tensor:
    """Chunks of queries (B, C, S) joined along the queries (one chunk: itself, no copy)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


#: Bytes the indexer's per-head products (B x queries x heads x keys, float32) may take at once: the selection and
#: the indexer loss run over the queries in chunks this size allows, so that their transient memory grows with the
#: keys, not with keys x queries x heads (16 GiB for one layer of 64 index heads at 4 x 4096 in one piece).
INDEXER_CHUNK_BYTES = 2**30


def query_chunks(batch: int, queries: int, keys: int, heads: int, itemsize: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``queries`` rows in chunks within :data:`INDEXER_CHUNK_BYTES` (at least one)."""
    rows = max(1, INDEXER_CHUNK_BYTES // max(1, batch * keys * heads * itemsize))
    return [(a, min(a + rows, queries)) for a in range(0, queries, rows)] or [(0, 0)]  # (no query: one empty chunk)


class DSA(MLA):
    """The ``D`` mixer: MLA restricted to the indexer's top-k keys. Input and output (B, L, hidden_size)."""

    keep_fp32 = ("indexer.weights_proj.weight", "indexer.k_norm.weight", "indexer.k_norm.bias")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.indexer = Indexer(config)

    def select(
        self, x: torch.Tensor, c_q: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor, scored: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Index scores (B, L, L) (None unless ``scored``: the forward needs none) and the selected keys (B, L, L)
        bool of a whole sequence, without gradients (the selection is discrete; with the indexer loss
        :meth:`select_with_loss` selects instead), in chunks of queries (:func:`query_chunks`).

        ``allowed`` must be causal (no key after its query): unless ``scored``, the keys after the diagonal are
        not scored at all (:func:`~hybridlm.ops.indexer.index_scores`' ``diagonal``)."""
        cos, sin = self.rope(position_ids)
        with torch.no_grad():
            x, c_q = x.detach(), c_q.detach()  # the indexer learns from its own loss only
            keys = self.indexer.keys(x, cos, sin)
            return self._chunked_selection(x, c_q, cos, sin, keys, allowed, scored, causal=not scored)

    def _chunked_selection(
        self, x, c_q, cos, sin, keys, allowed, scored: bool = False, causal: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The queries' index scores (B, T, S) (``scored``; else None) and selected keys (B, T, S) bool against
        ``keys`` (B, S, d), chunk by chunk (:func:`query_chunks`); ``allowed`` (B|1, T, S) bool. ``causal``: query
        ``t`` is key ``t`` (a whole sequence), so no key after it is scored."""
        B, T, S = x.shape[0], x.shape[1], keys.shape[1]
        scores, selected = [], []
        for a, b in query_chunks(B, T, S, self.indexer.n, keys.element_size()):
            part = self._score_and_select(
                x[:, a:b], c_q[:, a:b], cos[:, a:b], sin[:, a:b], keys, allowed[:, a:b], a if causal else None
            )
            if scored:  # (else each chunk's scores go as soon as it has selected)
                scores.append(part[0])
            selected.append(part[1])
        return (_joined(scores) if scored else None), _joined(selected)  # (a decode step: one chunk, no copy)

    def _score_and_select(
        self, x, c_q, cos, sin, keys, allowed, diagonal: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of queries: its index scores (B, C, S) and selected keys (B, C, S) bool (``diagonal``: see
        :func:`~hybridlm.ops.indexer.index_scores`)."""
        iq, iw = self.indexer.queries(x, c_q, cos, sin)
        # (The projections that made q and k compute in matmul_dtype: their backward rounds the gradients to it.)
        scores = index_scores(iq, iw, keys, diagonal, grad_dtype=matmul_dtype(c_q))
        return scores, select_topk(scores.detach(), allowed, self.config.dsa_indexer_topk)

    @property
    def indexer_trains(self) -> bool:
        """Whether a parameter of the indexer takes a gradient (``train.trainable`` may freeze it): its loss has
        nothing to train otherwise, and is not computed."""
        return any(p.requires_grad for p in self.indexer.parameters())

    def select_with_loss(
        self,
        x: torch.Tensor,
        c_q: torch.Tensor,
        position_ids: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        allowed: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`select`'s selected keys (B, L, L) bool and the indexer loss: the mean over queries of
        :func:`indexer_kl_rows` (0-d, before ``dsa_indexer_loss_coeff``), its gradient reaching the indexer's weights
        only (``x`` (B, L, H) and ``c_q`` read detached; MLA's ``q`` and ``k`` (B, L, nh, dn + dr) give the target).

        Chunks of queries (:func:`query_chunks`) each score, select and take their KL under activation
        checkpointing: the backward computes a chunk's scores and target again, so the loss keeps the indexer's
        keys and the chunks' inputs (views of tensors the layer keeps anyway), not the per-head products of every
        query and key (3 bytes a key, query and index head measured: 13 GiB for one layer of 64 heads at 4 x 4096).
        The selection comes out of the same chunks: scored apart from the loss (as :meth:`select` does), one
        chunk's computation was merged with it by torch.compile, which then kept the products after all."""
        cos, sin = self.rope(position_ids)
        x, c_q, q, k = x.detach(), c_q.detach(), q.detach(), k.detach()
        keys = self.indexer.keys(x, cos, sin)
        B, T, S = q.shape[0], q.shape[1], k.shape[1]
        parts = [
            checkpoint(self._chunk_loss, *part, use_reentrant=False)
            for part in (
                (x[:, a:b], c_q[:, a:b], cos[:, a:b], sin[:, a:b], q[:, a:b], k, keys, allowed[:, a:b], a)
                for a, b in query_chunks(B, T, S, self.indexer.n, keys.element_size())
            )
        ]
        kls, selected = zip(*parts)
        return _joined(selected), sum(kls) / max(1, B * T)  # (no query at all: 0)

    def _chunk_loss(self, x, c_q, cos, sin, q, k, keys, allowed, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of queries of :meth:`select_with_loss`, from query ``start`` on: (its summed KL, its selected
        keys). Its queries see no key after their own (``allowed`` is causal), so those are not scored."""
        scores, selected = self._score_and_select(x, c_q, cos, sin, keys, allowed, start)
        valid = selected if self.config.dsa_indexer_use_sparse_loss else allowed
        target = indexer_target(q, k, valid, self.softmax_scale, start)
        with _float32(x):
            return indexer_kl_rows(target, scores, valid).sum(), selected

    #: ``forward`` takes ``aux_losses``: a list owned by the caller for this one call.
    has_aux_loss = True

    def forward(
        self, x: torch.Tensor, ctx: SequenceContext, aux_losses: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x: (B, L, H) -> (B, L, H); the indexer loss (0-d) goes to ``aux_losses`` (see ``MoE.forward``)."""
        if ctx.cache is not None:
            return self._forward_cached(x, ctx)
        c = self.config
        q, k, v, c_q = self.qkv(x, ctx.position_ids)
        allowed = allowed_keys(ctx, x.shape[1], x.device)
        if c.dsa_indexer_loss_coeff > 0 and aux_losses is not None and torch.is_grad_enabled() and self.indexer_trains:
            selected, loss = self.select_with_loss(x, c_q, ctx.position_ids, q, k, allowed)
            aux_losses.append(c.dsa_indexer_loss_coeff * loss)
        else:
            _, selected = self.select(x, c_q, ctx.position_ids, allowed, scored=False)
        # FlexAttention under the selection's block mask on CUDA (no key block above the diagonal or in another
        # document is computed; the backward keeps the selection, not SDPA's bf16 bias of it), else SDPA
        o = masked_attention(*(t.transpose(1, 2) for t in (q, k, v)), selected, self.softmax_scale)
        return self.o_proj(self.merge_heads(o))

    def init_cache(self, batch: int, max_len: int, device, dtype) -> LatentCache:
        """MLA's latents plus the indexer's keys, index_k (B, max_len, dsa_indexer_head_dim) float32 (float64 in
        a float64 cache, as :meth:`Indexer.keys` computes them)."""
        cache = super().init_cache(batch, max_len, device, dtype)
        cache.index_k = torch.zeros(batch, max_len, self.indexer.d, device=device, dtype=accumulation_dtype(dtype))
        return cache

    def _forward_cached(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """As :meth:`MLA._forward_cached`; the indexer scores every cached key and each query keeps the
        top-k of those it may see (ties to the earlier key), as :meth:`forward` selects, in chunks of queries as it
        does."""
        cache, L = ctx.cache, x.shape[1]
        state = cache.state(self)
        cos, sin = self.rope(ctx.position_ids)
        q, c_q = self.project_query(x, cos, sin)
        S = state.write(cache, *self.project_latent(x, cos, sin), self.indexer.keys(x, cos, sin))
        keys, allowed = state.index_k[:, :S], cached_keys_mask(cache, L, x.device)
        _, selected = self._chunked_selection(x, c_q, cos, sin, keys, allowed)  # (a long prompt's chunk: many keys)
        return self.o_proj(self.attend_cached(q, state, S, selected))

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator | None, std: float, out_std: float) -> None:
        super().init_weights(gen, std, out_std)
        for proj in (self.indexer.wq_b, self.indexer.wk, self.indexer.weights_proj):
            normal_(proj.weight, std, gen)
        nn.init.ones_(self.indexer.k_norm.weight)
        nn.init.zeros_(self.indexer.k_norm.bias)

    @staticmethod
    def flops_per_token(c: ModelConfig, seq_len: int) -> float:
        """MLA's (attention over all keys: the mask does not skip work) plus the indexer's projections and
        its scores and head-weighted sums over all keys. The indexer loss (training only) is not counted."""
        n, d, H = c.dsa_indexer_n_heads, c.dsa_indexer_head_dim, c.hidden_size
        indexer = 2 * c.q_lora_rank * n * d + 2 * H * d + 2 * H * n + 2 * seq_len * n * (d + 1)
        return MLA.flops_per_token(c, seq_len) + indexer

    @staticmethod
    def target_flops_per_token(c: ModelConfig, seq_len: int) -> float:
        """One pass of the indexer loss's target over the main attention's logits (``ops.indexer.indexer_target``
        takes two, forward only) against all ``seq_len`` keys: a query-key product per head and key."""
        return 2 * seq_len * c.num_attention_heads * (c.qk_head_dim + c.qk_pos_emb_head_dim)


def dsa_reference(
    layer: DSA,
    x: torch.Tensor,
    position_ids: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense reference in the dtype of ``x``: MLA attention masked to the top-k keys.

    The selection is computed here with explicit per-head indexer loops unless ``selected``
    (B, L, L) bool is given (e.g. the layer's own, to compare everything else exactly).
    """
    b, seqlen, _ = x.shape
    q, k, v, c_q = mla_queries_keys_values_reference(layer, x, position_ids)
    allowed = causal_document_mask(seqlen, seq_idx, b, x.device)
    if selected is None:
        selected = select_topk(
            indexer_scores_reference(layer, x, c_q, position_ids), allowed, layer.config.dsa_indexer_topk
        )
    return attention_over(layer, q, k, v, selected & allowed)


def indexer_scores_reference(
    layer: DSA, x: torch.Tensor, c_q: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """``I(t, s)`` (B, L, L) in the dtype of ``x``, one index head at a time."""
    ix, c = layer.indexer, layer.config
    b, seqlen, _ = x.shape
    dr = c.qk_pos_emb_head_dim
    inv, amp = rope_frequencies(dr, c.rope_theta, Yarn.of(c), torch.float64, position_ids.device)
    ang = position_ids.to(torch.float64)[..., None] * inv
    cos, sin = (amp * ang.cos()).to(x.dtype), (amp * ang.sin()).to(x.dtype)  # (B, L, dr/2)

    def rot_half(t):  # (B, L, d): channels (i, i + dr/2) turned by angle i, the rest untouched
        a, bb, rest = t[..., : dr // 2], t[..., dr // 2 : dr], t[..., dr:]
        return torch.cat([a * cos - bb * sin, bb * cos + a * sin, rest], dim=-1)

    k = x @ ix.wk.weight.T
    k = (k - k.mean(-1, keepdim=True)) / torch.sqrt(k.var(-1, unbiased=False, keepdim=True) + c.norm_eps)
    k = rot_half(k * ix.k_norm.weight + ix.k_norm.bias)
    q = (c_q @ ix.wq_b.weight.T).view(b, seqlen, ix.n, ix.d)
    w = (x @ ix.weights_proj.weight.T) / (ix.n * ix.d) ** 0.5
    scores = torch.zeros(b, seqlen, seqlen, dtype=x.dtype, device=x.device)
    for j in range(ix.n):
        scores += w[:, :, j, None] * torch.relu(rot_half(q[:, :, j]) @ k.transpose(1, 2))
    return scores
