"""The decode step captured once as a CUDA graph and replayed for every token.

A decode step launches hundreds of small kernels for one token per row; on a GPU, launch overhead
then dominates. With the cache's ``static`` set, every mixer's decode step has static shapes
(attention over the whole preallocated buffer, masked) and reads the position from the cache's
device tensors (``offset_t``, ``next_pos``), so the whole step can be recorded once.

A capture costs a few eager steps (two warm-ups and the recording), tens of milliseconds for a 1B model. A graph is
tied to its cache's buffers, so :class:`DecodeGraphs` keeps the caches of ended batches, emptied, with their graphs:
a later batch of the same shape (rows, positions) replays the graph already captured instead of capturing its own.
``hybridlm serve`` (on CUDA) keeps one for the server's life, so that each shape is captured once, not once per
batch; its batches round their shapes up (rows and positions to powers of two) so that few shapes occur.
"""

from __future__ import annotations

import collections

import torch

from .cache import InferenceCache

#: Caches of ended batches (with their graphs) a :class:`DecodeGraphs` keeps by default, the least recently used
#: dropped first.
KEPT_GRAPHS = 4


class GraphedDecodeStep:
    """``step(tokens (B, 1)) -> logits (B, V)``, replaying a captured ``model(tokens, cache=cache)``.

    Capture runs the step (two warm-ups and the recording); the cache's states and positions are restored
    afterwards, but its ``static`` stays set (every later decode step of it, replayed or eager, attends over
    the whole buffer, masked: the same results). The graph is tied to ``cache``'s buffers: build a new
    one for a new cache.
    """

    def __init__(self, model: torch.nn.Module, cache: InferenceCache) -> None:
        device = cache.offset_t.device
        if device.type != "cuda":
            raise ValueError("cuda_graph needs the model and cache on a CUDA device")
        cache.check_room(1)
        self.model, self.cache = model, cache
        cache.static = True  # from now on every decode step of this cache, replayed or not
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        snap = cache.snapshot()
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph (lazy inits, autotuning)
                    self._run()
                    cache.restore(snap)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()
        except RuntimeError as e:
            # e.g. a layer that reads a tensor on the host (MoE's portable expert loop).
            raise RuntimeError(f"capturing the decode step as a CUDA graph failed; run without cuda_graph ({e})") from e
        finally:
            cache.restore(snap)

    def _run(self) -> torch.Tensor:
        return self.model(self.tokens, cache=self.cache, logits_to_keep=1).logits[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.check_room(1)
        self.tokens.copy_(tokens)
        self.graph.replay()  # advances offset_t and next_pos on the device
        self.cache.offset += 1
        return self.logits.clone()


class DecodeGraphs:
    """Decode caches and their captured steps, kept when a batch ends for the next batch of the same shape.

    Args:
        model: the ``HybridLM`` whose caches these are.
        keep: caches of ended batches kept at most, the least recently used dropped first (0: none; each batch
            then captures its own graph, as without a ``DecodeGraphs``). A kept cache holds its memory (its
            :attr:`~hybridlm.infer.cache.InferenceCache.nbytes`) while no batch uses it; when allocating a new one
            runs out of memory, the kept ones are dropped and the allocation tried again.

    Attributes:
        captures: graphs captured (replays of a kept one do not count).
        reused: caches taken from those kept.
    """

    def __init__(self, model: torch.nn.Module, keep: int = KEPT_GRAPHS) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"DecodeGraphs: keep must be an integer >= 0, got {keep!r}")
        self.model, self.keep = model, keep
        # (rows, positions) of each kept cache, least recently given back first -> [(cache, step or None)]
        self.kept: collections.OrderedDict[tuple[int, int], list] = collections.OrderedDict()
        self.captures = 0
        self.reused = 0

    @property
    def entries(self) -> int:
        """Caches kept now (read by a server's other threads: the dict's values copied by one C call first)."""
        return sum(map(len, list(self.kept.values())))

    @property
    def nbytes(self) -> int:
        """The bytes the kept caches hold."""
        return sum(cache.nbytes for pairs in self.kept.values() for cache, _ in pairs)

    def take(self, rows: int, positions: int) -> tuple[InferenceCache, GraphedDecodeStep | None]:
        """A cache of ``rows`` x ``positions``, empty, and its captured step: a kept one (emptied in place, its graph
        kept) where one of that shape is kept, else a new cache and None (:meth:`capture` records its step)."""
        pairs = self.kept.get((rows, positions))
        if pairs:
            cache, step = pairs.pop()
            if not pairs:
                del self.kept[(rows, positions)]
            cache.clear()
            self.reused += 1
            return cache, step
        try:
            return InferenceCache.for_model(self.model, rows, positions), None
        except torch.OutOfMemoryError:
            if not self.kept:
                raise
            self.clear()  # (memory the kept caches held, given back before the one retry)
            return InferenceCache.for_model(self.model, rows, positions), None

    def capture(self, cache: InferenceCache) -> GraphedDecodeStep:
        """Capture ``cache``'s decode step (see :class:`GraphedDecodeStep`); where that runs out of memory, the kept
        caches are dropped and it is tried once more."""
        try:
            step = GraphedDecodeStep(self.model, cache)
        except RuntimeError as e:
            if not (self.kept and isinstance(e.__cause__ or e, torch.OutOfMemoryError)):
                raise
            self.clear()
            step = GraphedDecodeStep(self.model, cache)
        self.captures += 1
        return step

    def give_back(self, cache: InferenceCache, step: GraphedDecodeStep | None) -> None:
        """Keep ``cache`` (whose batch has ended: nothing reads it any more) with its step for a later :meth:`take`,
        dropping the least recently kept beyond ``keep``. A cache without a step is dropped (allocating one is cheap;
        capturing its step is what a kept one saves)."""
        if self.keep == 0 or step is None:
            return
        key = (cache.batch, cache.max_len)
        self.kept.setdefault(key, []).append((cache, step))
        self.kept.move_to_end(key)
        while self.entries > self.keep:
            oldest = next(iter(self.kept))
            self.kept[oldest].pop(0)
            if not self.kept[oldest]:
                del self.kept[oldest]

    def clear(self) -> None:
        """Drop every kept cache (and its graph), and give their memory back to the device."""
        self.kept.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
