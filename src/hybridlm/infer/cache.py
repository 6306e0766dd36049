"""The decoding cache of a model (or of one MTP depth): every mixer's state plus the positions written.

Mixers define their own state (``init_cache``, see ``hybridlm.layers.cache``); this container finds
them, keeps them keyed by mixer, and tracks what is shared: how many positions are cached
(``offset``, also as the device tensor ``offset_t`` for CUDA-graph replay), which positions are
real tokens rather than left padding (``valid``), the next RoPE position of each row, and whether a
decode step keeps static shapes (``static``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..pattern.symbols import KIND, SEQUENCE_MIXERS


class InferenceCache:
    """States of ``mixers`` for ``batch`` rows of up to ``max_len`` positions.

    Args:
        mixers: the mixers to hold state for; those without ``init_cache`` (MLP, MoE) are skipped.
        batch, max_len: rows and positions to allocate for.
        device, dtype: where and in which dtype (recurrent states are float32 whatever ``dtype``, float64
            when it is float64).

    Attributes:
        offset: positions already cached (the next forward's first position).
        offset_t: (1,) int64 tensor equal to ``offset``, on ``device``.
        valid: (B, max_len) bool, False at left-padding positions.
        next_pos: (B,) int64 RoPE position of each row's next real token.
        static: False (eager decoding): a decode step attends over the ``offset + 1`` positions
            written so far, so its cost grows with the tokens produced, not with ``max_len``.
            True (set by :class:`~hybridlm.infer.cuda_graph.GraphedDecodeStep`): a decode step
            writes at ``offset_t`` and attends over all ``max_len`` positions, masked, so that its
            shapes never change and a CUDA graph can replay it.
    """

    static: bool = False

    def __init__(self, mixers: Iterable[nn.Module], batch: int, max_len: int, device, dtype: torch.dtype | str) -> None:
        from ..model import float_dtype

        for name, value in (("batch", batch), ("max_len", max_len)):  # (failed inside torch.zeros, naming neither)
            try:
                ok = not isinstance(value, bool) and operator.index(value) >= 0
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"InferenceCache: {name} must be an integer >= 0, got {value!r}")
        batch, max_len = operator.index(batch), operator.index(max_len)
        dtype = float_dtype(dtype)  # a name too, as HybridLM(dtype=...) takes it
        self.batch, self.max_len = batch, max_len
        self.states: dict[nn.Module, object] = {}
        for m in mixers:
            init = getattr(m, "init_cache", None)
            if init is not None:
                self.states[m] = init(batch, max_len, device, dtype)
        self.offset = 0
        self.offset_t = torch.zeros(1, dtype=torch.long, device=device)
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self._pad_end = 0  # no padding at or after this position
        #: While recording (:meth:`record_positions`): mixer -> the state snapshot after each position
        #: of the next window, for the mixers that can give it (see :meth:`rollback`).
        self.trail: dict[nn.Module, list] | None = None

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int, device=None, dtype=None) -> InferenceCache:
        """A cache for the main blocks of a ``HybridLM`` (not its MTP depths)."""
        return cls(_mixers(model.blocks), batch, max_len, *_where(model, device, dtype))

    @classmethod
    def for_mtp_depth(cls, model: nn.Module, depth: int, batch: int, max_len: int) -> InferenceCache:
        """A cache for the blocks of MTP depth ``depth`` (1-based) of a ``HybridLM``."""
        n = len(model.mtp)
        # Checked here: depth 0 (counted from 0) indexed model.mtp[-1] and gave the last depth's cache silently.
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= n:
            has = f"depths 1..{n}" if n else "no MTP depths (a pattern without '/')"
            raise ValueError(f"for_mtp_depth: depth is 1-based, got {depth!r}; the model has {has}")
        return cls(_mixers(model.mtp[depth - 1].blocks), batch, max_len, *_where(model, None, None))

    @property
    def nbytes(self) -> int:
        """The bytes its tensors hold: every mixer's state, the padding mask and the positions."""
        states = sum(t.nbytes for state in self.states.values() for _, t, _ in _tensors(state, state))
        return states + self.offset_t.nbytes + self.valid.nbytes + self.next_pos.nbytes

    def state(self, mixer: nn.Module):
        try:
            return self.states[mixer]
        except KeyError:
            if not hasattr(mixer, "init_cache"):  # not "built for other mixers": this one has no state to keep
                raise NotImplementedError(
                    f"{type(mixer).__name__} reads ctx.cache but has no init_cache, so no cache holds a state for it "
                    "(the protocol is in hybridlm/layers/cache.py)"
                ) from None
            raise KeyError(
                f"no cached state for this {type(mixer).__name__}: the cache was built for other mixers "
                "(build it with InferenceCache.for_model / for_mtp_depth of the model that runs)"
            ) from None

    def static_step(self, L: int) -> bool:
        """Whether a forward of ``L`` positions is a decode step with static shapes (see ``static``)."""
        return L == 1 and self.static

    # -- padding and positions -----------------------------------------------------------------

    @property
    def has_padding(self) -> bool:
        return self._pad_end > 0

    def set_padding(self, valid: torch.Tensor) -> None:
        """Mark the prompt's padding before prefill. valid: (B, L) bool, False on the left only."""
        if self.offset != 0:
            raise ValueError("set_padding must be called on an empty cache, before prefill")
        if valid.dim() != 2 or valid.shape[1] == 0:
            raise ValueError(
                f"padding mask must be (batch, prompt length) with a position at least, got {tuple(valid.shape)}"
            )
        B, L = valid.shape
        if self.batch != B or self.max_len < L:
            raise ValueError(f"padding mask {tuple(valid.shape)} does not fit a cache of {self.batch} x {self.max_len}")
        valid = valid.to(self.valid.device, torch.bool)
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise ValueError("padding must be on the left: a row has a real token before a padding position")
        if not bool(valid[:, -1].all()):
            raise ValueError("every row needs at least one real token")
        self.valid[:, :L] = valid
        self.valid[:, L:] = True  # (what comes after the prompt is real: rows released before may hold False)
        self._pad_end = L if not bool(valid.all()) else 0

    def pad_mask(self, L: int) -> torch.Tensor | None:
        """(B, L) bool: which of the next L positions are real tokens; None when none is padding."""
        if self.offset >= self._pad_end:
            return None
        return self.valid[:, self.offset : self.offset + L]

    def position_ids(self, L: int) -> torch.Tensor:
        """(B, L) RoPE positions of the next L tokens, counted from each row's first real token."""
        keep = self.pad_mask(L)
        if keep is None:
            return self.next_pos[:, None] + torch.arange(L, device=self.next_pos.device)
        return (self.next_pos[:, None] + keep.long().cumsum(1) - 1).clamp(min=0)

    def advance(self, L: int) -> None:
        """Record that L more positions are cached (called by the model after each forward)."""
        keep = self.pad_mask(L)
        self.next_pos += L if keep is None else keep.long().sum(1)
        self.offset += L
        self.offset_t += L

    def check_room(self, L: int, batch: int | None = None) -> None:
        """Refuse ``L`` more positions (of ``batch`` rows, where given) that this cache cannot take."""
        if batch is not None and batch != self.batch:
            raise ValueError(f"the input has {batch} row(s); the cache was made for {self.batch}")
        if self.offset + L > self.max_len:
            raise ValueError(
                f"the cache holds {self.max_len} positions; {self.offset} are used and {L} more were given"
            )

    # -- rows joining, positions dropped (continuous batching) -----------------------------------

    def place(self, src: InferenceCache, src_row: int, row: int, length: int) -> None:
        """Make row ``row`` hold what row ``src_row`` of ``src`` holds: its last ``length`` cached positions (a
        row's real tokens: the positions before ``src.offset``) copied to the ``length`` positions before this
        cache's ``offset``, every fixed-size state (Mamba2's, Gated DeltaNet's) copied whole, its RoPE position
        taken over. The row's earlier positions become padding. ``src`` is a cache of the same model (another
        batch: a prompt prefilled alone, then joining this running batch); the copy is exact."""
        if not 0 < length <= min(self.offset, src.offset):
            raise ValueError(
                f"place: {length} position(s) do not fit: the source holds {src.offset}, this cache {self.offset}"
            )
        if src.states.keys() != self.states.keys():
            raise ValueError("place: the two caches were built for different mixers (another model)")
        start = self.offset - length
        for mixer, state in self.states.items():
            for name, dst, new in _tensors(state, src.states[mixer]):
                dim = state.POSITION_DIM.get(name)
                if dim is None:
                    dst[row].copy_(new[src_row])
                else:  # (dim counted with the batch's; row-indexed, it is one less)
                    dst[row].narrow(dim - 1, start, length).copy_(
                        new[src_row].narrow(dim - 1, src.offset - length, length)
                    )
        self.valid[row, :start] = False
        self.valid[row, start:] = True
        self.next_pos[row] = src.next_pos[src_row].to(self.next_pos.device)
        self._refresh_padding()

    def take(self, src: InferenceCache, src_rows: Sequence[int], length: int) -> None:
        """Make rows ``0 .. len(src_rows) - 1`` hold what rows ``src_rows`` of ``src`` hold, as :meth:`place` does
        each, the last ``length`` positions of all of them in one copy per tensor (a row shorter than ``length`` brings
        the padding before it, marked so): moving a batch's rows into a cache of another size."""
        if not 0 < length <= min(self.offset, src.offset) or len(src_rows) > self.batch:
            raise ValueError(
                f"take: {len(src_rows)} row(s) of {length} position(s) do not fit: the source holds {src.offset}, "
                f"this cache {self.batch} row(s) and {self.offset} position(s)"
            )
        if src.states.keys() != self.states.keys():
            raise ValueError("take: the two caches were built for different mixers (another model)")
        n, start = len(src_rows), self.offset - length
        index = torch.tensor(list(src_rows), device=self.valid.device)
        for mixer, state in self.states.items():
            for name, dst, new in _tensors(state, src.states[mixer]):
                dim = state.POSITION_DIM.get(name)
                window = new if dim is None else new.narrow(dim, src.offset - length, length)  # (only those copied)
                picked = window.index_select(0, index.to(new.device))
                if dim is None:
                    dst[:n].copy_(picked)
                else:
                    dst[:n].narrow(dim, start, length).copy_(picked)
        self.valid[:n, :start] = False
        self.valid[:n, start : self.offset] = src.valid.index_select(0, index)[:, src.offset - length : src.offset]
        self.valid[:n, self.offset :] = True
        self.next_pos[:n] = src.next_pos.index_select(0, index.to(src.next_pos.device)).to(self.next_pos.device)
        self._refresh_padding()

    def shift(self, delta: int) -> None:
        """Move every cached position by ``delta``: a negative one drops the first ``-delta`` positions (which no
        row may still need: every row's must be padding), a positive one puts ``delta`` positions of padding in
        front (room for a longer prompt to join on the right). ``offset`` moves with them; RoPE positions, which
        count each row's own tokens, do not."""
        if not -self.offset <= delta <= self.max_len - self.offset:
            raise ValueError(f"shift: {delta} moves the cached positions [0, {self.offset}) out of [0, {self.max_len})")
        if delta < 0 and bool(self.valid[:, :-delta].any()):
            raise ValueError(f"shift: the first {-delta} position(s) hold real tokens of some row")
        if delta == 0:
            return
        used = self.offset if delta > 0 else self.offset + delta  # the positions that move (none in an empty cache)
        for state in self.states.values():
            for name, dst, _ in _tensors(state, state):
                dim = state.POSITION_DIM.get(name)
                if dim is not None and used:  # (only those: the buffer past the offset holds nothing read yet)
                    moved = dst.narrow(dim, max(-delta, 0), used).clone()  # (the two ranges overlap)
                    dst.narrow(dim, max(delta, 0), used).copy_(moved)
        self.valid.copy_(self.valid.roll(delta, 1))
        if delta > 0:
            self.valid[:, :delta] = False
        else:  # the rolled-in positions are past the offset, not written yet: real for a live row, padding for a
            # released one (read at its last position), which would otherwise hold "real" positions a later shift
            # refused to drop
            end = self.offset + delta
            self.valid[:, delta:] = self.valid[:, end - 1 : end] if end > 0 else True
        self.offset += delta
        self.offset_t += delta
        self._refresh_padding()

    def release(self, row: int) -> None:
        """Row ``row`` is no longer read (its sequence has ended): all its positions become padding, so that
        :meth:`shift` may drop them. It keeps decoding with the others (a batch has fixed rows), attending to
        each new position of its own only."""
        self.valid[row] = False
        # (not _refresh_padding: no host synchronization here, a row can end while the next step is queued)
        self._pad_end = max(self._pad_end, self.offset)

    def clear(self) -> None:
        """Empty the cache in place, as a new one of its shape is: every state zeroed, no position cached, no padding.
        Its tensors stay the same objects (a CUDA graph captured over them replays on the emptied cache)."""
        for state in self.states.values():
            for _, t, _ in _tensors(state, state):
                t.zero_()
        self.offset = 0
        self.offset_t.zero_()
        self.valid.fill_(True)
        self.next_pos.zero_()
        self._pad_end = 0
        self.trail = None

    def _refresh_padding(self) -> None:
        self._pad_end = self.offset if not bool(self.valid[:, : self.offset].all()) else 0

    # -- rollback ------------------------------------------------------------------------------

    def snapshot(self) -> tuple:
        """What :meth:`restore` needs to return to this moment (recurrent states are copied, KV is not)."""
        return (
            self.offset,
            self.next_pos.clone(),
            {m: s.snapshot() for m, s in self.states.items()},
        )

    def restore(self, snap: tuple) -> None:
        offset, next_pos, states = snap
        self.offset = offset
        self.offset_t.fill_(offset)
        self.next_pos.copy_(next_pos)
        for m, s in states.items():
            self.states[m].restore(s)

    def record_positions(self) -> None:
        """Ask the mixers of the next forward to keep their state after each of its positions.

        Mixers whose state is a pure KV buffer need nothing kept; a recurrent mixer keeps
        (state snapshot) per position when its window takes the stepped path (Mamba2, windows of
        at most ``STEPPED_WINDOW`` tokens), and nothing otherwise.
        """
        self.trail = {}

    def rollback(self, snap: tuple, keep: int) -> bool:
        """Return to ``snap`` (taken before the recorded window), then keep its first ``keep`` positions.

        The KV of those positions is already in the buffers; each recurrent state is set to the
        one recorded after position ``keep - 1``. Returns False, with the cache restored to
        ``snap`` only, when some mixer with recurrent state did not record every position run since
        ``snap`` (the caller then runs the ``keep`` positions again). Recording stops either way.
        ``keep`` must lie between 0 and the positions run since ``snap``: ValueError otherwise, with
        the cache as it was.
        """
        ran = self.offset - snap[0]
        if not 0 <= keep <= ran:
            raise ValueError(f"rollback keeps 0 to {ran} positions (those run since the snapshot), got {keep}")
        trail, self.trail = self.trail, None
        recurrent = [m for m, s in snap[2].items() if s is not None]  # KV states snapshot as None
        self.restore(snap)
        if keep == 0:  # the snapshot is the answer (trail[m][keep - 1] would be the window's last state)
            return True
        # Entry i is the state after position i only if every position since snap was recorded: a chunked
        # forward records none, so a stepped window after it would be read as the window's start.
        if trail is None or any(len(trail.get(m, ())) != ran for m in recurrent):
            return False
        for m in recurrent:
            self.states[m].restore(trail[m][keep - 1])
        self.advance(keep)
        return True


def _mixers(blocks: nn.ModuleDict) -> list[nn.Module]:
    """The mixers of ``blocks``; NotImplementedError for a sequence mixer without ``init_cache``, which has
    no state to decode from (ignoring the cache, each step would see its own token alone: wrong tokens, no error)."""
    layers = [layer for block in blocks.values() for layer in block.layers]
    for layer in layers:
        if layer.symbol in SEQUENCE_MIXERS and not hasattr(layer.mixer, "init_cache"):
            raise NotImplementedError(
                f"'{layer.symbol}' ({KIND[layer.symbol]}) layers cannot decode with a cache: "
                f"{type(layer.mixer).__name__} has no init_cache. A sequence mixer carries information across "
                "positions, so it must keep a state to decode from (the protocol is in hybridlm/layers/cache.py)"
            )
    return [layer.mixer for layer in layers]


def _tensors(state, other) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(field name, tensor of ``state``, the same field's tensor of ``other``) for each tensor field of a mixer's state
    (a dataclass, see ``hybridlm.layers.cache``); fields left None (MLA's ``index_k``) are skipped."""
    return [
        (f.name, getattr(state, f.name), getattr(other, f.name))
        for f in dataclasses.fields(state)
        if getattr(state, f.name) is not None
    ]


def _where(model: nn.Module, device, dtype) -> tuple[torch.device, torch.dtype]:
    w = model.embeddings.weight
    return (w.device if device is None else torch.device(device)), (w.dtype if dtype is None else dtype)
