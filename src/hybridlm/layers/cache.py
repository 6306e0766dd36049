"""Per-mixer decoding state, and the small protocol a mixer follows to decode with a cache.

The protocol (every mixer in ``layers/`` follows it; MLA ``+`` and DeepSeek sparse attention ``D``
keep a ``LatentCache``, defined in ``layers/mla.py``):

* ``init_cache(batch, max_len, device, dtype)`` returns the mixer's state for ``batch`` sequences
  of up to ``max_len`` positions, or the mixer has no ``init_cache`` (MLP, MoE: stateless).
  Buffers are allocated once and updated in place, so a decode step can keep static shapes and be
  captured as a CUDA graph (where ``ctx.cache.static`` is set; see ``forward`` below).
* A state object has ``snapshot()`` and ``restore(snap)``: what must be copied to roll the state
  back to this moment (speculative decoding). A KV buffer needs nothing copied: rolling back the
  cache's ``offset`` hides the rejected positions, and they are overwritten next time.
* In ``forward(x, ctx)`` with ``ctx.cache`` set (an ``hybridlm.infer.cache.InferenceCache``), ``x``
  holds the ``L`` positions after the ``ctx.cache.offset`` already cached. The mixer reads and
  updates ``ctx.cache.state(self)``; ``ctx.cache.pad_mask(L)`` (None without padding) marks the
  real tokens: a padding position must leave every state untouched, and attention must not
  attend to it (``ctx.cache.valid`` holds the mask of all positions). ``L == 1`` is the decode
  step. Where ``ctx.cache.static_step(L)`` holds it must keep static shapes and not depend on the
  Python-side ``offset`` (use the device tensor ``offset_t``), so the step can be replayed as a CUDA
  graph; eager, attention reads only the positions written so far. ``L > 1`` (prefill, a prefill
  chunk, speculative verification) goes through the chunked kernels, continuing from the current
  state (Mamba2 steps through windows of at most ``STEPPED_WINDOW`` tokens position by position
  instead).
* A state's ``POSITION_DIM`` names its fields that hold one entry per cached position and their position
  dimension (the others are fixed-size, one per row); ``InferenceCache.place`` and ``shift`` move rows and
  positions by it (continuous batching: a row joins a running batch, the batch drops positions no row reads).
* While ``ctx.cache.trail`` is a dict (``InferenceCache.record_positions``), a recurrent mixer that
  can appends, per position of the window, what its ``restore`` takes to be at that position;
  ``InferenceCache.rollback`` uses it to keep a prefix of a speculative window without a re-run.
* The model advances the cache after each forward (``InferenceCache.advance``); mixers never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ops.precision import accumulation_dtype


def cached_keys_mask(cache, L: int, device: torch.device) -> torch.Tensor:
    """(B|1, L, S) bool: which of the S cached keys each of the L new queries may attend (S: the whole
    buffer, ``max_len``, for a static decode step; else ``offset + L``): itself and earlier real
    tokens. A padding query sees itself only, so its row is never all -inf (a NaN there would reach
    real rows through 0 * NaN in the next layers' values). Attention and MLA / DSA use it alike.
    """
    if cache.static_step(L):  # static shapes: the whole buffer, masked by the device-side offset
        key_pos = torch.arange(cache.max_len, device=device)
        return (((key_pos <= cache.offset_t) & cache.valid) | (key_pos == cache.offset_t))[:, None, :]
    off = cache.offset
    query_pos = torch.arange(off, off + L, device=device)[:, None]
    key_pos = torch.arange(off + L, device=device)[None, :]
    mask = (key_pos <= query_pos).unsqueeze(0)
    if cache.has_padding:
        mask = mask & (cache.valid[:, None, : off + L] | (key_pos == query_pos))
    return mask


@dataclass
class RecurrentState:
    """Mamba2 / Gated DeltaNet state: the conv's last inputs and the recurrent (SSM or delta-rule) state.

    Attributes:
        conv: (B, K-1, C) the last K-1 conv inputs (pre-activation), oldest first; zeros at start.
        recurrent: (B, H, P, N) for Mamba2, (B, H, dk, dv) for GDN; in the ops' accumulation dtype:
            float32, or float64 in a float64 cache (a float64 model's reference decoding).
    """

    conv: torch.Tensor
    recurrent: torch.Tensor
    #: The fields that hold one entry per cached position, and their position dimension: none (a fixed-size state).
    POSITION_DIM: ClassVar[dict[str, int]] = {}

    @classmethod
    def zeros(
        cls, batch: int, kernel: int, channels: int, state_shape: tuple[int, ...], device, dtype
    ) -> RecurrentState:
        return cls(
            conv=torch.zeros(batch, kernel - 1, channels, device=device, dtype=dtype),
            recurrent=torch.zeros(batch, *state_shape, device=device, dtype=accumulation_dtype(dtype)),
        )

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv.clone(), self.recurrent.clone()

    def restore(self, snap: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.conv.copy_(snap[0])
        self.recurrent.copy_(snap[1])


@dataclass
class KVState:
    """Preallocated attention keys and values.

    Attributes:
        k, v: (B, kv_heads, max_len, head_dim), zero-filled (masked positions must hold finite
            values: a zero attention weight times NaN is still NaN).
    """

    k: torch.Tensor
    v: torch.Tensor
    POSITION_DIM: ClassVar[dict[str, int]] = {"k": 2, "v": 2}  # (see RecurrentState)

    @classmethod
    def zeros(cls, batch: int, heads: int, max_len: int, head_dim: int, device, dtype) -> KVState:
        shape = (batch, heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def snapshot(self) -> None:
        return None

    def restore(self, snap: None) -> None:
        pass
