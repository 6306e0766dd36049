"""What every mixer may need besides its input: positions, document boundaries, side outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.attention import document_causal_mask


@dataclass
class SequenceContext:
    """Per-forward information shared by all mixers.

    Attributes:
        position_ids: (B, L) position of each token within its document (for RoPE).
        seq_idx: (B, L) document index of each token (non-decreasing along L), or None when
            every row is one document. Mixers never let information cross a change of index.
        rope: (cos, sin), each (B, L, rotary_dim), when the attention layers use RoPE.
        block_mask: FlexAttention block mask of the documents (CUDA, packed rows), built once
            per forward and shared by every attention and MLA layer; None elsewhere.
        cache: an ``hybridlm.infer.cache.InferenceCache`` when decoding with a cache (the input
            continues the cached positions; see ``layers/cache.py`` for what mixers do with it).
    """

    position_ids: torch.Tensor
    seq_idx: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    block_mask: object | None = None
    cache: Any = None
    _attention_mask: torch.Tensor | None = field(default=None, repr=False)

    def attention_mask(self) -> torch.Tensor | None:
        """(B, 1, L, L) bool, True where query t may attend key s: s <= t in the same document.

        None without document boundaries (plain causal attention needs no mask).
        """
        if self.seq_idx is None:
            return None
        if self._attention_mask is None:  # built once per forward, shared by the attention layers
            self._attention_mask = document_causal_mask(self.seq_idx)
        return self._attention_mask


def segment_ids(
    batch: int,
    seqlen: int,
    device: torch.device,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Normalize document boundaries to (B, L) segment indices 0, 1, 2, ... per row.

    Args:
        doc_ids: (B, L) any labels; a new document starts wherever the label changes.
        cu_seqlens: (N+1,) cumulative document lengths over the flattened (B*L) tokens, as
            flash-attention's varlen API takes them (starts at 0, ends at B*L). Every row start
            also starts a document.

    Returns:
        (B, L) int64, or None when neither is given.
    """
    if doc_ids is not None and cu_seqlens is not None:
        raise ValueError("pass doc_ids or cu_seqlens, not both")
    if doc_ids is not None:
        if doc_ids.shape != (batch, seqlen):
            raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected {(batch, seqlen)}")
        doc_ids = doc_ids.to(device)
        change = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
        change[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
        return change.cumsum(dim=1)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long).flatten()
        total = batch * seqlen
        if cu.numel() < 2 or cu[0].item() != 0 or cu[-1].item() != total or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to batch*seqlen={total}, got {cu.tolist()}")
        starts = torch.zeros(total, dtype=torch.long, device=device)
        starts[cu[1:-1][cu[1:-1] < total]] = 1  # a boundary at the end (empty last documents) starts nothing
        starts = starts.view(batch, seqlen)
        starts[:, :1] = 0  # a slice: rows of no positions (an empty batch) have no first position to index
        return starts.cumsum(dim=1)
    return None


def positions_in_segment(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) position of each token counted from the start of its document."""
    B, L = seq_idx.shape
    idx = torch.arange(L, device=seq_idx.device).expand(B, L)
    start = torch.zeros_like(seq_idx)
    start[:, 1:] = torch.where(seq_idx[:, 1:] != seq_idx[:, :-1], idx[:, 1:], 0)
    return idx - torch.cummax(start, dim=1).values
