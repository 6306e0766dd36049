"""The decode loop: a batch of rows that take one token per step, rows joining and leaving between steps.

:class:`DecodeBatch` holds its rows in the slots of one :class:`~hybridlm.infer.cache.InferenceCache`.

* ``admit`` prefills new prompts and puts them in free slots. A fresh batch given a prompt per slot prefills them
  straight into its cache, left-padded (what ``generate`` runs). A prompt joining a running batch is prefilled in a
  cache of its own (with ``join_chunk``, a chunk per step, between the others' decode steps) and its positions are
  copied in, right-aligned with the batch's (:meth:`InferenceCache.place`; exact, so a row decodes as it would
  alone).
* ``step`` picks one token per row from the last logits, queues the next decode step before the host reads them
  (the device never waits for the host's bookkeeping) and hands each row's token to its callback. A row ends at an
  end-of-text id, at its token limit or when its callback says so, and its slot is free for the next prompt.
* Positions that no row reads any more are dropped when rows join (:meth:`InferenceCache.shift`, so eager attention
  never reads more than the longest row), and the cache grows, copied into a larger one, when a joining row needs
  more room than is left.

``generate`` runs one admission and steps to the end; ``hybridlm serve`` (continuous batching) admits waiting
requests between steps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import NonFiniteLogitsError
from .cache import InferenceCache
from .cuda_graph import DecodeGraphs, GraphedDecodeStep
from .device import inferring
from .logprobs import TokenLogprob, pick_logprobs, to_host

#: The fewest positions of a cache whose decode step is replayed as a CUDA graph (see ``DecodeBatch._positions``).
GRAPH_POSITIONS = 64

#: A row's callback: ``on_token(token, logprob)`` for each token picked (``logprob`` a
#: :class:`~hybridlm.infer.logprobs.TokenLogprob` where the row asked for logprobs, else None); True ends the row.
RowCallback = Callable[[int, "TokenLogprob | None"], "bool | None"]


def left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids padded on the left with 0 and the (B, P) bool mask of real tokens."""
    P = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    valid = torch.zeros(len(rows), P, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, P - len(r) :] = torch.tensor(r)
        valid[i, P - len(r) :] = True
    return ids.to(device), valid.to(device)


def prefill(model, ids: torch.Tensor, cache: InferenceCache, chunk_size: int) -> torch.Tensor:
    """Run ``ids`` (B, P) into ``cache`` in chunks; returns the last position's logits (B, V) float32 (float64 in a
    float64 model)."""
    logits = None
    for i in range(0, ids.shape[1], chunk_size):
        logits = model(ids[:, i : i + chunk_size], cache=cache, logits_to_keep=1).logits
    return logits[:, -1]


@contextlib.contextmanager
def cache_allocation(rows: int, prompt: int, max_new_tokens: int):
    """Turn a failure to allocate the decoding buffers into a ValueError naming ``max_new_tokens``.

    Attention keys and values are allocated for every position up front, so a large ``max_new_tokens``
    fails here: out of memory (RuntimeError, MemoryError) or, past int64, torch's overflow TypeError.
    """
    try:
        yield
    except (RuntimeError, MemoryError, OverflowError, TypeError) as e:
        # A mixer with no decode path (NotImplementedError, a RuntimeError) is no allocation failure.
        if isinstance(e, NotImplementedError) or (isinstance(e, TypeError) and "overflow" not in str(e).lower()):
            raise
        reason = (str(e).splitlines() or [""])[0][:160]
        raise ValueError(
            f"cannot allocate the cache for {rows} row(s) of {prompt} prompt + {max_new_tokens} new tokens "
            f"(max_new_tokens): {reason}"
        ) from None


def nonfinite(logits: torch.Tensor) -> torch.Tensor:
    """logits: (B, V) -> (B,) bool, True where a row holds a NaN or +inf, or no finite value (all -inf): logits
    no token can be picked from (argmax reads NaN as the largest value; sampling gets NaN probabilities). One
    reduction: ``amax`` propagates NaN."""
    return ~torch.isfinite(logits.amax(-1))


def check_finite(
    bad: Sequence[bool], done: Sequence[bool], prompt_lens: Sequence[int], made: Sequence[int], first: int = 0
) -> None:
    """Raise :class:`~hybridlm.errors.NonFiniteLogitsError` for the first row ``r`` still generating (not
    ``done[r]``) whose logits were flagged (``bad[r]``, see :func:`nonfinite`): they were
    to pick its new token ``made[r] + 1``, at position ``prompt_lens[r] + made[r]`` of its sequence. The error names
    prompt ``first + r`` (``first``: the batch's index of row 0)."""
    for r, flagged in enumerate(bad):
        if flagged and not done[r]:
            raise NonFiniteLogitsError(
                first + r,
                f"the logits for new token {made[r] + 1} (position {prompt_lens[r] + made[r]} of the sequence, "
                "counted from 0 with the prompt) are not finite (NaN or inf): the model's weights or activations "
                "hold NaN or inf (damaged weights, or an overflow in float16); no token can be picked from them",
            )


def sync(device: torch.device) -> float:
    """The time once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Row:
    """A sequence in a :class:`DecodeBatch` slot."""

    slot: int | None  # None while its prompt is prefilled in chunks, before it joins
    prompt: list[int]
    limit: int  # tokens it may take
    callback: RowCallback | None
    logprobs: int | None  # k, where it asked for logprobs
    tag: object = None  # the caller's (the serving worker's request row)
    sampler: object = None  # its Sampler (rows of equal settings share one)
    out: list[int] = field(default_factory=list)  # its tokens so far

    @property
    def length(self) -> int:
        """Its positions in the cache: its prompt and every token picked but the one at the batch's next step."""
        return len(self.prompt) + len(self.out)


class JoinError(RuntimeError):
    """Prompts joining a running batch could not be prefilled or placed (``rows``: theirs; ``__cause__``: why);
    they were dropped, the batch's own rows go on."""

    def __init__(self, rows: list[Row], cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.rows = rows


@dataclass
class _Joining:
    """Prompts admitted together, prefilled in a cache of their own until they are placed in the batch."""

    rows: list[Row]
    ids: torch.Tensor  # (n, P) left-padded
    cache: InferenceCache
    done: int = 0  # positions prefilled
    logits: torch.Tensor | None = None  # (n, V) the last prefilled position's

    def prefill(self, model: torch.nn.Module, size: int) -> None:
        chunk = self.ids[:, self.done : self.done + size]
        self.logits = model(chunk, cache=self.cache, logits_to_keep=1).logits[:, -1]
        self.done += chunk.shape[1]


class DecodeBatch:
    """Rows decoded together, one token per step, in ``slots`` slots (see the module).

    Args:
        model: a whole ``HybridLM``, in eval mode.
        slots: rows decoded at once (free slots decode too, their tokens dropped: a batch's shapes are fixed).
        max_len: positions the cache holds at first (it grows when a joining row needs more).
        sampler: a :class:`~hybridlm.infer.generate.Sampler`: the rows' that :meth:`admit` gives none of their own.
            Rows of one sampler are picked together (one draw of its generator for them all), each sampler's rows
            apart.
        eos_ids: ids that end a row (it keeps the id as its last token).
        chunk_size: prompts are prefilled in chunks of this many tokens.
        cuda_graph: replay the decode step as a CUDA graph (captured at the first step, again whenever the cache is
            copied into another: more positions, more slots). The batch's shapes are then rounded up so that few
            occur: its slots to ``max_slots`` (to a power of two without it), never fewer while rows decode (a
            replayed step costs about the same for 1 row as for 16, where each change costs a copy and a capture),
            and its positions to a power of two.
        stats: if given, admissions add ``prefill_tokens`` and ``prefill_seconds`` (synchronizing the device).
        max_slots: None: ``slots`` is fixed. A number: the batch takes up to that many rows, in as many slots as its
            rows need (rounded as ``power_of_two`` says, at most ``max_slots``), fewer when rows end (a free slot
            costs a row's compute at every step): the rows are then moved, exactly, into a cache of fewer slots.
        power_of_two: round the slots up to a power of two, and shrink only once half of them are free (default:
            on a GPU, where a decode step costs about the same for 1 or 16 rows, since it reads the weights, and each
            change of size costs a copy of the cache and a capture of the graph; on the CPU, where a slot costs its
            row's compute, the slots are the rows).
        join_chunk: prompts admitted while rows decode are prefilled this many tokens per :meth:`step`, between the
            others' decode steps (a long prompt then delays their tokens by a chunk's time at each step, not by its
            whole prefill at once); None: whole, at admission.
        on_end: if given, ``on_end(tokens, cache, slot, logits)`` for each row that ends in a :meth:`step` (its end
            of text, its limit, its callback's stop), before its slot is freed: ``tokens`` its prompt and the tokens
            whose positions ``cache`` holds in row ``slot`` (every token it took, or all but the last where no next
            step was run), ``logits`` the (V,) logits of the last of them (a prefix cache keeps the state: a chat's
            next turn begins with these tokens).
        graphs: with ``cuda_graph``, the :class:`~hybridlm.infer.cuda_graph.DecodeGraphs` the batch takes its caches
            from and gives them back to (with their graphs) when it resizes and at :meth:`close`: a cache of a
            shape kept there is replayed without a capture. None: the batch's own, keeping nothing.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        slots: int,
        max_len: int,
        sampler,
        eos_ids: Sequence[int] = (),
        chunk_size: int = 2048,
        cuda_graph: bool = False,
        stats: dict | None = None,
        max_slots: int | None = None,
        power_of_two: bool | None = None,
        join_chunk: int | None = None,
        on_end: Callable[[list[int], InferenceCache, int, torch.Tensor], None] | None = None,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.on_end = on_end
        self.model, self.sampler, self.eos_ids, self.chunk_size = model, sampler, tuple(eos_ids), chunk_size
        self.cuda_graph, self.stats, self.max_slots = cuda_graph, stats, max_slots
        self.device = next(model.parameters()).device
        self.power_of_two = self.device.type != "cpu" if power_of_two is None else power_of_two
        self.vocab = model.config.vocab_size
        self.graphs = None
        self.graph: GraphedDecodeStep | None = None  # the captured decode step, where cuda_graph
        if cuda_graph:
            self.graphs = DecodeGraphs(model, keep=0) if graphs is None else graphs
            slots, max_len = self._round(slots), self._positions(max_len)
        self.rows: list[Row | None] = [None] * slots
        self.cache = self._new_cache(slots, max_len)
        self.logits: torch.Tensor | None = None  # (slots, V): each live row's next token is picked from its row
        self.reader = _TokenReader(self.device)
        self.steps = 0  # decode steps run
        self.grown = 0  # times the cache was copied into another (more positions, more or fewer slots)
        self.seen: torch.Tensor | None = None  # (slots, V) bool: the tokens each row holds, once a row has a penalty
        # (slots, V) int32: each row's output tokens counted, once a row has a frequency or presence penalty
        self.counts: torch.Tensor | None = None
        self.join_chunk = join_chunk
        self.joining: list[_Joining] = []  # admitted prompts still prefilled, oldest first

    @property
    def free(self) -> list[int]:
        """The slots no row holds."""
        return [i for i, row in enumerate(self.rows) if row is None]

    @property
    def live(self) -> bool:
        """Whether some row is still decoding or waiting to join."""
        return bool(self.joining) or any(row is not None for row in self.rows)

    @property
    def held(self) -> list[Row]:
        """Its rows: those decoding, then those still joining."""
        return [row for row in self.rows if row is not None] + [row for j in self.joining for row in j.rows]

    @property
    def room(self) -> int:
        """How many more rows :meth:`admit` takes now."""
        return (self.max_slots or len(self.rows)) - len(self.held)

    # -- joining ---------------------------------------------------------------------------------

    def fits(self, new: Sequence[Row]) -> int:
        """The positions the cache needs to take the rows ``new`` beside the rows it holds: (the longest row after
        they join) + (the most tokens any row may still add)."""
        rows = [r for r in self.rows if r is not None] + list(new)
        return max(r.length for r in rows) + max(r.limit - len(r.out) for r in rows)

    @inferring  # (a serving worker's thread has grad mode on, and cuda:0 current)
    def admit(
        self,
        prompts: Sequence[Sequence[int]],
        limits: Sequence[int],
        callbacks: Sequence[RowCallback | None],
        logprobs: Sequence[int | None] | None = None,
        tags: Sequence | None = None,
        samplers: Sequence | None = None,
        prefilled: tuple[InferenceCache, torch.Tensor] | None = None,
    ) -> list[Row]:
        """Prefill ``prompts`` (non-empty token-id lists, at most :attr:`room` of them) and put them in free slots,
        each to take at most ``limits[i]`` >= 1 tokens, ``callbacks[i]`` given each (and, where ``logprobs[i]`` is an
        integer k, its :class:`TokenLogprob` with at least the k most likely; ``tags[i]`` kept as the row's ``tag``;
        ``samplers[i]``: its :class:`~hybridlm.infer.generate.Sampler`, default the batch's). Returns their
        :class:`Row` objects (each keeps its tokens in ``out``); their first tokens are picked at the next
        :meth:`step` that finds them prefilled, with the other rows'. With ``join_chunk`` and rows decoding, the
        prompts are prefilled ``join_chunk`` tokens per :meth:`step` (their ``slot`` None until they are placed).
        ``prefilled``: (a cache that holds the prompts, left-padded as :func:`left_pad` pads them, and the (n, V)
        logits of their last positions), from a forward the caller ran (prompts scored as they were prefilled:
        :func:`~hybridlm.infer.logprobs.prefill_scored`); they are placed at once."""
        n = len(prompts)
        if not 0 < n <= self.room:
            raise ValueError(f"admit: {n} prompt(s) for room for {self.room} more row(s)")
        logprobs = [None] * n if logprobs is None else list(logprobs)
        tags = [None] * n if tags is None else list(tags)
        samplers = [self.sampler] * n if samplers is None else list(samplers)
        new = [Row(None, *args) for args in zip(map(list, prompts), limits, callbacks, logprobs, tags, samplers)]
        t0 = sync(self.device) if self.stats is not None else 0.0
        ids, valid = left_pad([row.prompt for row in new], self.device)
        fresh = self.cache.offset == 0 and not self.live
        if fresh:  # (sized for these prompts first: as many slots as they need, and their positions)
            slots = self._round(n) if self.max_slots is not None else len(self.rows)
            need = self.fits(new)
            if slots != len(self.rows) or need > self.cache.max_len:
                self._resize(slots, max(self._positions(need), self.cache.max_len))
        if prefilled is not None:
            joining = _Joining(new, ids, prefilled[0], ids.shape[1], prefilled[1])
            self.joining.append(joining)
            self._join(joining)
        elif fresh and n == len(self.rows):  # a prompt per slot: prefilled in place, left-padded (generate's batch)
            self.cache.set_padding(valid)
            self.logits = prefill(self.model, ids, self.cache, self.chunk_size)
            for slot, row in enumerate(new):
                row.slot = slot
            self._seat(new)
        else:
            with cache_allocation(n, ids.shape[1], 0):
                own = InferenceCache.for_model(self.model, n, ids.shape[1])
            if not bool(valid.all()):
                own.set_padding(valid)
            joining = _Joining(new, ids, own)
            self.joining.append(joining)
            if self.join_chunk is None or not any(row is not None for row in self.rows):
                self._join(joining, whole=True)  # (nobody's decoding to interleave with)
        if self.stats is not None:
            self.stats["prefill_tokens"] += int(valid.sum())
            self.stats["prefill_seconds"] += sync(self.device) - t0
        return new

    def _join(self, joining: _Joining, whole: bool = False) -> None:
        """Prefill ``joining`` by ``join_chunk`` tokens (``whole``: to their end), and place them once prefilled.
        :class:`JoinError` naming them (they are dropped) where that fails."""
        try:
            while joining.done < joining.ids.shape[1]:
                size = self.chunk_size if whole or self.join_chunk is None else self.join_chunk
                joining.prefill(self.model, size)
                if not whole:
                    break
            if joining.done == joining.ids.shape[1]:
                self._place(joining)
        except Exception as e:
            if joining in self.joining:
                self.joining.remove(joining)
            raise JoinError(joining.rows, e) from e

    def _place(self, joining: _Joining) -> None:
        """Put prefilled prompts in free slots (more slots or positions first where needed), their positions ending
        at the batch's offset."""
        new, n = joining.rows, len(joining.rows)
        need, slots = self.fits(new), len(self.rows)
        if n > len(self.free):
            slots = min(self.max_slots or slots, self._round(slots - len(self.free) + n))
        if need > self.cache.max_len or slots != len(self.rows):
            grown = self._positions(max(need, self.cache.max_len + self.cache.max_len // 2))
            self._resize(slots, grown if need > self.cache.max_len else self.cache.max_len)
        free = self.free[:n]
        self._make_room(max(len(row.prompt) for row in new))
        for i, (slot, row) in enumerate(zip(free, new)):
            self.cache.place(joining.cache, i, slot, len(row.prompt))
            row.slot = slot
        if self.logits is None:
            self.logits = joining.logits.new_zeros(len(self.rows), joining.logits.shape[-1])
        self.logits[free] = joining.logits
        for slot in self.free[n:]:  # (slots left free: nothing they decode is read)
            self.cache.release(slot)
        self.joining.remove(joining)
        self._seat(new)

    def _seat(self, new: list[Row]) -> None:
        """Put placed rows in :attr:`rows`, with the tokens of their prompts seen (a penalty's) and no output
        counted yet."""
        for row in new:
            self.rows[row.slot] = row
        if self.seen is None and any(row.sampler.repetition_penalty != 1.0 for row in new):
            self.seen = torch.zeros(len(self.rows), self.vocab, dtype=torch.bool, device=self.device)
        if self.seen is not None:  # (a slot's last row's tokens forgotten)
            for row in new:
                self.seen[row.slot] = False
                self.seen[row.slot, torch.tensor(row.prompt, device=self.device)] = True
        if self.counts is None and any(row.sampler.counting for row in new):
            self.counts = torch.zeros(len(self.rows), self.vocab, dtype=torch.int32, device=self.device)
        if self.counts is not None:
            self.counts[[row.slot for row in new]] = 0

    def _make_room(self, longest_prompt: int) -> None:
        """Drop the positions before every live row's first, then put padding in front until the offset reaches
        ``longest_prompt`` (a joining prompt's positions end at the offset)."""
        lengths = [r.length for r in self.rows if r is not None]
        self.cache.shift(max(lengths, default=0) - self.cache.offset)
        if longest_prompt > self.cache.offset:
            self.cache.shift(longest_prompt - self.cache.offset)

    def _resize(self, slots: int, max_len: int) -> None:
        """Move the live rows, exactly, into a new cache of ``slots`` rows and ``max_len`` positions: the first
        slots, in order, their positions ending at its offset (the decode graph is captured again)."""
        old, old_graph, live = self.cache, self.graph, [row for row in self.rows if row is not None]
        longest = max((row.length for row in live), default=0)
        with cache_allocation(slots, longest, max_len - longest):
            self.cache = self._new_cache(slots, max_len)
        self.cache.shift(longest)
        keep = [row.slot for row in live]
        if live:  # (one copy per tensor for all rows)
            self.cache.take(old, keep, longest)
        for slot, row in enumerate(live):
            row.slot = slot
        for slot in range(len(live), slots):
            self.cache.release(slot)
        if self.logits is not None:
            logits = self.logits.new_zeros(slots, self.logits.shape[-1])
            logits[: len(live)] = self.logits[keep]
            self.logits = logits
        if self.seen is not None:
            seen = self.seen.new_zeros(slots, self.vocab)
            seen[: len(live)] = self.seen[keep]
            self.seen = seen
        if self.counts is not None:
            counts = self.counts.new_zeros(slots, self.vocab)
            counts[: len(live)] = self.counts[keep]
            self.counts = counts
        self.rows = live + [None] * (slots - len(live))
        if self.graphs is not None:  # (after the copy: nothing reads the old cache any more)
            self.graphs.give_back(old, old_graph)
        self.grown += 1

    def _new_cache(self, slots: int, max_len: int) -> InferenceCache:
        """An empty cache of ``slots`` x ``max_len`` (with ``cuda_graph``, from :attr:`graphs`, its graph in
        :attr:`graph` where one was captured)."""
        if self.graphs is None:
            return InferenceCache.for_model(self.model, slots, max_len)
        cache, self.graph = self.graphs.take(slots, max_len)
        return cache

    def close(self) -> None:
        """The batch has ended: with ``cuda_graph``, its cache and graph go back to :attr:`graphs` for a later batch
        of its shape. ValueError while it holds rows; the batch is not used after."""
        if self.live:
            raise ValueError("close: the batch still holds rows (step it to its end, or end them)")
        if self.graphs is not None and self.cache is not None:
            self.graphs.give_back(self.cache, self.graph)
        self.cache = self.graph = None

    # -- decoding --------------------------------------------------------------------------------

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cuda_graph:
            if self.graph is None:
                self.graph = self.graphs.capture(self.cache)
            return self.graph(tokens)
        return self.model(tokens, cache=self.cache, logits_to_keep=1).logits[:, -1]

    @inferring
    def step(self) -> None:
        """Pick each live row's next token, give it to the row's callback, and end the rows that are done (their
        slots free). The next decode step is queued first where some row may take another token.
        :class:`~hybridlm.errors.NonFiniteLogitsError` (its ``row`` the slot) where a live row's logits are not
        finite; the batch is unusable then. Prompts still joining are prefilled by a chunk first (whole where no row
        decodes), and placed once prefilled: :class:`JoinError` where that fails (they are dropped; the batch goes
        on)."""
        if not self.live:
            raise ValueError("step: no row to decode (admit prompts first)")
        if self.joining:
            self._join(self.joining[0], whole=not any(row is not None for row in self.rows))
            if not any(row is not None for row in self.rows):
                return
        rows = self.rows
        ks = [r.logprobs for r in rows if r is not None and r.logprobs is not None]
        tokens, bad = self._pick()
        if self.seen is not None:
            self.seen.scatter_(1, tokens.view(-1, 1), True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens.view(-1, 1), self.counts.new_ones(len(tokens), 1))
        # (computed before the next step is queued, and copied with the tokens: no synchronization of their own)
        self.reader.start(tokens, bad, *(pick_logprobs(self.logits, tokens, max(ks)) if ks else ()))
        queued = any(r is not None and len(r.out) + 1 < r.limit for r in rows)
        if queued:
            # Queued before the host reads these tokens; when every row ends here, this one step is wasted.
            self.logits = self._forward(tokens[:, None])
            self.steps += 1
        picked, flagged, *scored = self.reader.finish()
        done = [r is None for r in rows]
        lens = [0 if r is None else len(r.prompt) for r in rows]
        check_finite(flagged, done, lens, [0 if r is None else len(r.out) for r in rows])
        infos = to_host(*scored) if scored else [None] * len(rows)
        for slot, row in enumerate(rows):
            if row is None:
                continue
            token = picked[slot]
            row.out.append(token)
            stop = (
                False
                if row.callback is None
                else bool(row.callback(token, infos[slot] if row.logprobs is not None else None))
            )
            if stop or token in self.eos_ids or len(row.out) >= row.limit:
                if self.on_end is not None:  # (the step queued above holds the last token too)
                    self.on_end(row.prompt + (row.out if queued else row.out[:-1]), self.cache, slot, self.logits[slot])
                self.rows[slot] = None
                self.cache.release(slot)
        self._shrink()

    def _shrink(self) -> None:
        live = len(self.rows) - len(self.free)
        fewer = live <= len(self.rows) // 2 if self.power_of_two else live < len(self.rows)
        if self.max_slots is not None and live > 0 and fewer and self._round(live) != len(self.rows):
            self._resize(self._round(live), self.cache.max_len)

    def _round(self, rows: int) -> int:
        """The slots for ``rows`` rows (see ``power_of_two``; with ``cuda_graph``, ``max_slots`` where given)."""
        if self.cuda_graph:
            return self.max_slots or _power_of_two(rows)
        return _power_of_two(rows) if self.power_of_two else rows

    def _positions(self, need: int) -> int:
        """The positions of a cache that must hold ``need``: with ``cuda_graph``, a power of two (at least
        :data:`GRAPH_POSITIONS`), so that a later batch or growth meets a shape already captured."""
        return max(GRAPH_POSITIONS, _power_of_two(need)) if self.cuda_graph else need

    def _pick(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots,) token ids and :func:`nonfinite` flags, each sampler's rows picked together
        (one sampler: every slot at once, free ones too, as ``generate`` always picked)."""
        groups: dict[object, list[int]] = {}
        for row in self.rows:
            if row is not None:
                groups.setdefault(row.sampler, []).append(row.slot)
        bad = nonfinite(self.logits)
        if len(groups) == 1:
            (sampler,) = groups
            return sampler.pick_rows(self.logits, bad, self.seen, self.counts), bad
        tokens = torch.zeros(len(self.rows), dtype=torch.long, device=self.logits.device)
        for sampler, slots in groups.items():
            at = torch.tensor(slots, device=self.logits.device)
            seen, counts = (None if held is None else held[at] for held in (self.seen, self.counts))
            tokens[at] = sampler.pick_rows(self.logits[at], bad[at], seen, counts)
        return tokens, bad

    def end(self, slot: int) -> None:
        """End the row in ``slot`` now (its client went away)."""
        if self.rows[slot] is not None:
            self.rows[slot] = None
            self.cache.release(slot)
            self._shrink()


def _power_of_two(n: int) -> int:
    """The least power of two >= n (>= 1)."""
    return 1 << max(0, n - 1).bit_length()


class _TokenReader:
    """Copies a step's (B,) token ids and (B,) non-finite flags (and, where asked, the tensors of
    :func:`~hybridlm.infer.logprobs.pick_logprobs`) to the host without waiting for work queued after them.

    On CUDA the copies go to pinned memory and an event marks their end, so reading them waits
    for the copies only, not for the next decode step queued behind them.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.event = torch.cuda.Event()
        self.host: list[torch.Tensor] = []  # pinned buffers, made again when the shapes change (logprobs' k)
        self.tensors: tuple[torch.Tensor, ...] = ()

    def start(self, *tensors: torch.Tensor) -> None:
        if self.cuda:
            if [h.shape for h in self.host] != [t.shape for t in tensors]:
                self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, t in zip(self.host, tensors):
                host.copy_(t, non_blocking=True)
            # On the tokens' device's stream (not the current device's): the model may live on cuda:1.
            self.event.record(torch.cuda.current_stream(tensors[0].device))
        else:
            self.tensors = tensors

    def finish(self) -> list[list]:
        """The tensors given to :meth:`start`, as lists, in order."""
        if self.cuda:
            self.event.synchronize()
            return [host.tolist() for host in self.host]
        return [t.tolist() for t in self.tensors]
