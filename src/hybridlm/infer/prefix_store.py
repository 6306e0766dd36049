"""Prompt prefixes kept across batches: the model's state after a prefix that several prompts began with, so that a
later prompt that begins with it too runs only the rest (``hybridlm serve``'s prefix cache).

A recurrent layer's state (Mamba2's, Gated DeltaNet's) cannot be cut back to an earlier position, so a state is kept
only at a position chosen in advance: the end of a prefix that prompts were seen to share (two prompts of one batch,
or a prompt and one of the :attr:`PrefixStore.recent` prompts before it), where
:mod:`~hybridlm.infer.prefixes` splits them anyway, or the end of an answer: a row's prompt and the tokens it took,
which the next turn of a chat (or a client continuing the text) begins with. Answers are dropped before shared
prefixes: a batch's answers would otherwise push out the few-shot prefix every batch of an evaluation begins with.
Each entry holds a one-row
:class:`~hybridlm.infer.cache.InferenceCache` of exactly the prefix's positions, the logits of its last position
(they predict each later prompt's own next token) and, where it was scored, its tokens' scores
(:mod:`~hybridlm.infer.prefixes` makes and reads them).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from .cache import InferenceCache


@dataclass(eq=False)
class Entry:
    """A kept prefix: its ``tokens``, a one-row ``cache`` holding them (offset = their count), the (V,) ``logits`` of
    its last position, and ``scores`` (the :class:`~hybridlm.infer.logprobs.TokenLogprob` of each token after the
    first, at most ``k`` most likely each), None where it was prefilled unscored. ``answer``: the state at the end
    of a row's decoding (its prompt and tokens), dropped before shared prefixes."""

    tokens: tuple[int, ...]
    cache: InferenceCache
    logits: torch.Tensor
    scores: list | None = None
    k: int | None = None
    answer: bool = False

    @property
    def nbytes(self) -> int:
        """The memory it holds on the model's device: its cache's tensors and its logits."""
        return (0 if self.cache is None else self.cache.nbytes) + self.logits.nbytes

    def serves(self, k: int | None) -> bool:
        """Whether it can stand for its tokens' forward in a call that scores at ``k`` (None: scores nothing)."""
        return k is None or (self.scores is not None and self.k is not None and self.k >= k)

    @classmethod
    def of_row(
        cls, model, tokens, cache: InferenceCache, row: int, logits, scores=None, k=None, answer: bool = False
    ) -> Entry:
        """Row ``row`` of ``cache`` (whose positions end with ``tokens``) copied into a one-row cache of its own,
        with the (V,) ``logits`` of its last position (copied) and its tokens' ``scores`` (at ``k``; None
        unscored)."""
        own = InferenceCache.for_model(model, 1, len(tokens))
        own.shift(len(tokens))
        own.place(cache, row, 0, len(tokens))
        return cls(tuple(tokens), own, logits.clone(), None if k is None else list(scores), k, answer)


#: Positions the kept prefixes hold together at most, by default: their caches are the model's, on its device
#: (attention's keys and values for every position, besides the fixed-size recurrent states), so a count alone would
#: let a few long prompts hold gigabytes.
POSITIONS = 2**16


def entry_bytes(model) -> tuple[int, int]:
    """What a kept state of ``model`` costs: (the bytes every entry holds whatever its length: the recurrent states,
    the bytes each of its positions adds: attention's keys and values), measured on one-row caches of 1 and 2
    positions."""
    one, two = InferenceCache.for_model(model, 1, 1).nbytes, InferenceCache.for_model(model, 1, 2).nbytes
    return one - (two - one), two - one


class PrefixStore:
    """At most ``capacity`` prefixes of ``positions`` positions in all and, where ``max_bytes`` is given, of at most
    that many bytes in all (:attr:`Entry.nbytes`; the least recently used dropped first), and the last ``remember``
    prompts seen, in which prefixes that later prompts share are found. Used by one thread (the model's)."""

    def __init__(
        self, capacity: int = 8, remember: int = 64, positions: int = POSITIONS, max_bytes: int | None = None
    ) -> None:
        if capacity < 1 or remember < 0 or positions < 1 or (max_bytes is not None and max_bytes < 1):
            raise ValueError(
                f"PrefixStore: capacity, positions and max_bytes must be >= 1 and remember >= 0, got {capacity}, "
                f"{positions}, {max_bytes} and {remember}"
            )
        self.capacity, self.positions, self.max_bytes = capacity, positions, max_bytes
        self.entries: collections.OrderedDict[tuple[int, ...], Entry] = collections.OrderedDict()
        self.recent: collections.deque[tuple[int, ...]] = collections.deque(maxlen=remember)
        self.hits = 0  # prompts that began with a kept prefix
        self.hit_tokens = 0  # their positions that the kept prefixes stood for (not run)
        #: Per prompt of the last call planned against the store (in its order), the leading positions a state kept
        #: before that call stood for (0: none): what ``usage.prompt_tokens_details.cached_tokens`` reports.
        self.last_kept: list[int] = []

    def most_bytes(self, model) -> int:
        """The most memory its entries can hold for ``model`` (on its device): ``capacity`` entries' fixed states and
        ``positions`` positions (:func:`entry_bytes`), or ``max_bytes`` where that is less."""
        fixed, per_position = entry_bytes(model)
        most = self.capacity * fixed + self.positions * per_position
        return most if self.max_bytes is None else min(most, self.max_bytes)

    @property
    def nbytes(self) -> int:
        """The memory its entries hold now."""
        return sum(entry.nbytes for entry in self.entries.values())

    def _over(self) -> bool:
        """Whether the entries exceed a bound."""
        if len(self.entries) > self.capacity or sum(len(t) for t in self.entries) > self.positions:
            return True
        return self.max_bytes is not None and self.nbytes > self.max_bytes

    def lookup(self, prompt, k: int | None, proper: bool = True) -> Entry | None:
        """The longest kept prefix that ``prompt`` (token ids) begins with and that can serve a call scoring at ``k``
        (``proper``: shorter than the prompt, so that its rest has a token), now the most recently used; None if
        none."""
        best = None
        for tokens, entry in self.entries.items():
            n = len(tokens)
            fits = n < len(prompt) or (n == len(prompt) and not proper)
            longer = best is None or n > len(best.tokens)
            if fits and longer and entry.serves(k) and tuple(prompt[:n]) == tokens:
                best = entry
        if best is not None:
            self.entries.move_to_end(best.tokens)
        return best

    def put(self, entry: Entry) -> None:
        """Keep ``entry`` (replacing one of the same tokens), dropping entries past ``capacity``, ``positions`` or
        ``max_bytes``: the least recently used answer first, then the least recently used prefix (an entry longer
        than ``positions`` or larger than ``max_bytes`` alone is not kept; an answer, also none where only prefixes
        would make room for it, nor in place of a prefix of the same tokens, which is used instead). An answer
        replaces the answers it begins with: a conversation's earlier turns, which its next turn would not begin
        with alone."""
        if len(entry.tokens) > self.positions or (self.max_bytes is not None and entry.nbytes > self.max_bytes):
            return
        held = self.entries.get(entry.tokens)
        if not (entry.answer and held is not None and not held.answer):  # (a prefix may hold scores an answer lacks)
            self.entries[entry.tokens] = entry
        if entry.answer:  # (a conversation's earlier answers, which its later turns no longer begin with alone)
            n = len(entry.tokens)
            for tokens in [t for t, kept in self.entries.items() if kept.answer and len(t) < n]:
                if entry.tokens[: len(tokens)] == tokens:
                    del self.entries[tokens]
        self.entries.move_to_end(entry.tokens)
        while self._over():
            answers = [tokens for tokens, kept in self.entries.items() if kept.answer]
            del self.entries[answers[0] if answers else next(iter(self.entries))]

    def seen(self, prompts) -> None:
        """Remember ``prompts`` (token-id lists) for finding the prefixes later prompts share with them."""
        self.recent.extend(tuple(p) for p in prompts)
