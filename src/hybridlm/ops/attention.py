"""Causal attention over packed rows: document masking without a dense (B, 1, L, L) mask on the GPU.

Three paths, one function (:func:`causal_attention`), chosen by :mod:`hybridlm.ops.dispatch` (op ``attention``):

- no document boundaries: ``scaled_dot_product_attention(is_causal=True)``, with cuDNN's kernel
  asked for first on CUDA (measured 1.8× the flash backend on an H200, gpu_stack.md §4);
- document boundaries on CUDA: FlexAttention with a block mask built from the document ids once per
  forward (:func:`document_block_mask`): fully masked key blocks are skipped, nothing is O(L²) in
  memory;
- document boundaries elsewhere (the CPU reference): SDPA with the dense boolean mask.

Attention under any per-query selection of keys (DSA's top-k, :func:`masked_attention`) takes FlexAttention on CUDA
too, its block mask built from the selection: the key blocks no query of a block selects (above the diagonal, other
documents) are skipped, and the backward keeps the selection (a byte a key and query), not SDPA's bf16 bias of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .dispatch import kernels_mode, record


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


#: FlexAttention's generated kernel needs head dimensions of at least 16 (inductor raises
#: "NYI: embedding dimension ... must be at least 16" otherwise); smaller heads take the dense mask.
FLEX_MIN_HEAD_DIM = 16


def use_flex(seq_idx: torch.Tensor | None, head_dim: int, dtype: torch.dtype | None = None) -> bool:
    """True when packed attention runs through FlexAttention: ``seq_idx`` (the document ids, or a selection mask) on
    CUDA, kernels not forced to torch, heads of at least :data:`FLEX_MIN_HEAD_DIM`, inputs of ``dtype`` other than
    float64 (a float64 model is a reference and takes SDPA's math backend, which computes in float64)."""
    return (
        seq_idx is not None
        and seq_idx.is_cuda
        and head_dim >= FLEX_MIN_HEAD_DIM
        and dtype != torch.float64
        and kernels_mode("attention") != "torch"
        and _flex_available()
    )


_COMPILED: dict[Callable, Callable] = {}


def _compiled_once(fn: Callable) -> Callable:
    """``fn`` compiled once (fixed shapes) for eager callers; ``fn`` itself inside a compiled region,
    whose own compilation traces it."""
    if torch.compiler.is_compiling():
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def document_block_mask(seq_idx: torch.Tensor):
    """FlexAttention block mask for causal attention within documents.

    Built by a compiled ``create_block_mask`` (as torch's documentation advises): run eagerly it
    materializes the dense (B, 1, L, L) boolean mask (1 GiB at 1 × 32768) and walks it with vmap
    on the host. The compiled builder takes each batch's ids as an input (no recompilation per
    batch of one shape) and gives the same mask (tests/ops/test_attention.py).

    Args:
        seq_idx: (B, L) document index per position, non-decreasing along L.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = seq_idx.shape

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (seq_idx[b, q] == seq_idx[b, kv])

    return _compiled_once(create_block_mask)(mask_mod, B, None, L, L, device=seq_idx.device)


def selection_block_mask(selected: torch.Tensor):
    """FlexAttention block mask (and mask_mod) of a dense selection: query t of row b sees key s iff ``selected[b, t, s]``.

    Built by the compiled ``create_block_mask``, as :func:`document_block_mask` is (one compilation per shape).

    Args:
        selected: (B, L, S) bool.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, L, S = selected.shape

    def mask_mod(b, h, q, kv):
        return selected[b, q, kv]

    return _compiled_once(create_block_mask)(mask_mod, B, None, L, S, device=selected.device)


def _flex():
    """FlexAttention as a fused kernel (eager flex would materialize the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_once(flex_attention)


def document_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True where query t may attend key s: s <= t in the same document.

    Args:
        seq_idx: (B, L) document index per position, non-decreasing along L (equal indices are one document:
            a label that comes back later joins the earlier document).
    """
    L = seq_idx.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq_idx.device).tril()
    return ((seq_idx[:, :, None] == seq_idx[:, None, :]) & causal).unsqueeze(1)


def fused_sdpa_takes(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether SDPA's fused CUDA kernels (cuDNN, flash, memory-efficient) may take these heads: query / key and value
    head sizes that are multiples of 8 (their 16-bit alignment), not float64. Others (tiny test models: MLA with value
    heads of 5) only SDPA's math backend takes."""
    return q.dtype != torch.float64 and q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool, scale: float | None) -> torch.Tensor:
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # cuDNN first (the fastest on Hopper at these shapes). Heads no fused kernel takes (float64, a reference
        # model; head sizes off their alignment) take the math backend, as the dispatch records (sdpa_math); a call
        # that the fused kernels should take but do not still fails by name rather than run the slow math silently.
        fast = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        order = fast if fused_sdpa_takes(q, v) else [SDPBackend.MATH]
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)


def attention_growing_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, gqa: bool
) -> torch.Tensor:
    """SDPA for a query window over keys whose count changes from call to call (a growing cache:
    prefill chunks, speculative verification).

    cuDNN's SDPA builds an execution plan for every new shape: measured on an H200, 15 ms of host
    time per call, 0.09x plain decoding for MTP speculation. So it is left out here (the memory-
    efficient kernel takes the mask); fixed-shape calls keep cuDNN.

    Args:
        q: (B, Hq, L, D); k, v: (B, Hkv, S, D); attn_mask: (B or 1, 1, L, S) bool or None.
    """
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    block_mask=None,
    dense_mask: Callable[[], torch.Tensor] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal (grouped-query) attention that never crosses a document boundary.

    Args:
        q, k: (B, Hq, L, D), (B, Hkv, L, D) with Hq a multiple of Hkv; v: (B, Hkv, L, Dv) (MLA's Dv is not D).
        seq_idx: (B, L) document index per position, non-decreasing along L (as
            :func:`hybridlm.layers.context.segment_ids` gives it), or None for one document per row.
        block_mask: a precomputed :func:`document_block_mask` (shared by all layers of a forward).
        dense_mask: returns the (B, 1, L, L) boolean mask of the reference path (called only when
            that path runs, so a caller can share one cached mask between layers).
        scale: the scores' factor; None for ``D ** -0.5``.

    Returns:
        (B, Hq, L, Dv).
    """
    gqa = k.shape[1] != q.shape[1]
    if seq_idx is None:
        record("attention", "sdpa_math" if q.is_cuda and not fused_sdpa_takes(q, v) else "sdpa")
        return _sdpa_causal(q, k, v, gqa, scale)
    if use_flex(seq_idx, min(q.shape[-1], v.shape[-1]), q.dtype):
        record("attention", "flex")
        if block_mask is None:
            block_mask = document_block_mask(seq_idx)
        return _flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    record("attention", "sdpa_dense_mask")
    mask = dense_mask() if dense_mask is not None else document_causal_mask(seq_idx)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention of each query over the keys it selects (DSA's top-k, already within its document and causal).

    FlexAttention under :func:`selection_block_mask` where :func:`use_flex` allows it (CUDA, heads of at least
    :data:`FLEX_MIN_HEAD_DIM`, not float64, the ``attention`` op not forced to torch); else SDPA under the dense mask.

    Args:
        q, k: (B, H, L, D), (B, H, S, D); v: (B, H, S, Dv).
        selected: (B, L, S) bool, every query selecting at least one key.
        scale: the scores' factor; None for ``D ** -0.5``.

    Returns:
        (B, H, L, Dv).
    """
    if use_flex(selected, min(q.shape[-1], v.shape[-1]), q.dtype):
        record("attention", "flex_selection")
        return _flex()(q, k, v, block_mask=selection_block_mask(selected), scale=scale)
    record("attention", "sdpa_dense_mask")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=selected.unsqueeze(1), scale=scale)
