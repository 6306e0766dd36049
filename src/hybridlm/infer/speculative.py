"""Self-speculative decoding with the model's MTP depths: greedy, or sampled with the main model's distribution.

Depth ``d`` at position ``t`` reads ``(h^{d-1}_t, embed(x_{t+d}))`` and predicts ``x_{t+d+1}``
(``h^0`` is the main model's normed hidden state). With ``n`` tokens known, the main cache covers
positions ``0..n-2`` and depth ``d``'s cache covers ``0..n-1-d``: the positions whose token
``x_{t+d}`` is known. One round:

1. **Commit** each depth over its newly known positions (true tokens only), in depth order (the commit over
   the prompt runs, and is timed, with the prefill, in windows of ``prefill_chunk_size`` as the main model's).
2. **Draft**: depth 1's last committed output predicts ``x_n``; depth ``d > 1`` runs tentatively
   over positions ``n-d..n-2`` whose tokens are the drafts so far (state snapshot, run, restore)
   and its last output predicts ``x_{n+d-1}``.
3. **Verify**: the main model runs ``[x_{n-1}, draft_1..draft_k]`` in one forward from a snapshot;
   :class:`_Picks` keeps drafts while the main model agrees (greedy: while they equal its argmax), then
   one more token is free (the main model's own pick after the last kept draft). On a rejection the main
   cache rolls back to the accepted prefix (``InferenceCache.rollback``: the states recorded after each
   position of the window), or, where a mixer recorded none, is restored and the accepted prefix
   re-run; either way its recurrent states never saw a rejected token.

Greedy output equals plain greedy decoding (up to floating-point ties: a long verify window runs
the chunked kernels instead of the step). Sampled output has the distribution of plain sampling (speculative
sampling: Leviathan et al. 2023, Chen et al. 2023), not its tokens: the draws differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.profiler import record_function

from ..ops.precision import accumulation_dtype
from .cache import InferenceCache
from .generate import Sampler, _accept, _logprobs, _sync, cache_allocation, check_finite, nonfinite
from .logprobs import TokenLogprob


class _Depths:
    """The MTP depths' caches and the hidden states each depth has yet to consume.

    ``chunk_size``: a depth runs at most this many positions per forward (the prompt's commit, the first
    round, as the main model's prefill in ``prefill_chunk_size`` chunks); None: all of them at once.
    ``pick``: logits (1, V) -> the draft token (default: the argmax; :meth:`_Picks.draft`).
    """

    def __init__(
        self,
        model,
        max_len: int,
        depths: int | None = None,
        chunk_size: int | None = None,
        pick: Callable[[torch.Tensor], int] | None = None,
    ) -> None:
        self.model = model
        self.pick = pick or (lambda logits: int(logits.argmax(-1)))
        self.k = len(model.mtp) if depths is None else depths  # the first ``depths`` depths draft
        self.chunk_size = chunk_size
        self.caches = [InferenceCache.for_mtp_depth(model, d, 1, max_len) for d in range(1, self.k + 1)]
        self.covered = [-1] * self.k  # last position committed by each depth
        self.last: torch.Tensor | None = None  # (1, 1, H) depth 1's output at its last committed position
        # Inputs h^{d-1} (1, L, H) of uncommitted positions, in pieces joined when read: concatenated per prefill
        # chunk, the prompt's hidden states were copied once per chunk (quadratic in the chunks).
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(self.k)]

    def feed_main(self, h: torch.Tensor) -> None:
        """Append the main model's normed hidden states (1, L, H) of newly cached positions."""
        self._append(0, h)

    def _append(self, d: int, h: torch.Tensor) -> None:
        self.parts[d].append(h)

    def pending(self, d: int) -> torch.Tensor | None:
        """(1, L, H) inputs of depth ``d``'s uncommitted positions (None before any)."""
        if len(self.parts[d]) > 1:
            self.parts[d] = [torch.cat(self.parts[d], dim=1)]
        return self.parts[d][0] if self.parts[d] else None

    def _commit(self, d: int, start: int, last: int, tokens: list[int]) -> torch.Tensor:
        """Run depth ``d`` over positions ``start..last`` (their tokens known), in windows of at most
        ``chunk_size``; returns the last window's outputs and hands every output on to depth ``d + 1``."""
        pending = self.pending(d)
        width = self.chunk_size or last - start + 1
        for a in range(start, last + 1, width):
            b = min(a + width, last + 1)  # positions a..b-1, whose tokens x_{t+d+1} are tokens[a+d+1 : b+d+1]
            committed = self._run(d, pending[:, a - start : b - start], tokens[a + d + 1 : b + d + 1])
            if d + 1 < self.k:
                self._append(d + 1, committed)
        self.parts[d] = [pending[:, last - start + 1 :]]
        self.covered[d] = last
        return committed

    def _run(self, d: int, h_prev: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        model = self.model
        emb = model.embeddings(torch.tensor([tokens], device=h_prev.device))
        cache = self.caches[d]
        ctx = model.make_context(1, len(tokens), h_prev.device, cache.position_ids(len(tokens)))
        ctx.cache = cache
        cache.check_room(len(tokens))
        out, _ = model.mtp[d](h_prev, emb, ctx)  # (hidden states, auxiliary losses: none without grad)
        cache.advance(len(tokens))
        return out

    def commit(self, tokens: list[int], num: int) -> None:
        """Run each of the first ``num`` depths over its positions whose tokens ``tokens`` now make known; depth 1's
        last output, which drafts the next token, is kept."""
        n = len(tokens)
        for d in range(min(num, self.k)):  # in depth order: depth d's outputs are depth d+1's inputs
            last, start = n - 2 - d, self.covered[d] + 1  # last position whose token is known
            if last >= start:
                committed = self._commit(d, start, last, tokens)
                if d == 0:
                    self.last = committed[:, -1:]

    def draft(self, tokens: list[int], num: int) -> list[int]:
        """Commit every depth over its known positions, then draft up to ``num`` tokens after ``tokens``."""
        n = len(tokens)
        drafts: list[int] = []
        prev = None  # depth d-1's tentative outputs, positions n-d..n-2 (none for depth 1)
        self.commit(tokens, num)
        for d in range(min(num, self.k)):  # 0-based: depth d+1 reads x_{t+d+1}, predicts x_{t+d+2}
            if n - 1 - d < 0:  # prompt too short for this depth's first position
                break
            if d == 0:
                out = self.last
            else:
                # Positions n-1-d..n-2 read the drafts so far: run from a snapshot, then roll back.
                h_in = self.pending(d) if prev is None else torch.cat([self.pending(d), prev], dim=1)
                snap = self.caches[d].snapshot()
                prev = self._run(d, h_in, drafts)
                self.caches[d].restore(snap)
                out = prev[:, -1:]
            drafts.append(self.pick(self.model.head(out[:, -1])))
        return drafts


class _Picks:
    """How one prompt's tokens are picked under speculation, with ``generate``'s :class:`~.generate.Sampler`.

    Greedy (temperature 0): drafts and the main model's picks are argmaxes, and a draft is kept while it equals
    the main model's pick. Sampled (temperature > 0), speculative sampling: draft ``x`` is drawn from the depth's
    distribution ``q``, kept with probability ``min(1, p(x) / q(x))`` (``p``: the main model's at that position),
    and the first one refused is replaced by a draw from ``max(p - q, 0)``, normalized; after the last kept draft
    one more token comes from ``p``. Each token then has the distribution plain sampling gives it. Both ``p`` and
    ``q`` are the sampler's (temperature, top-k, min-p, top-p, logit bias, penalties): the penalties read the
    row's tokens, and a window position's the drafts before it too.
    """

    def __init__(self, sampler: Sampler, prompt: Sequence[int], vocab: int, device: torch.device) -> None:
        self.sampler = sampler
        self.greedy = sampler.temperature == 0
        self.seen: torch.Tensor | None = None  # (1, V) bool: the prompt's and output's tokens (repetition penalty)
        if sampler.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        # (1, V) int32: each token's count in the output (frequency and presence penalties)
        self.counts = torch.zeros(1, vocab, dtype=torch.int32, device=device) if sampler.counting else None
        self.drafts: list[int] = []  # this round's drafts so far
        self.q: list[torch.Tensor] = []  # their (1, V) distributions (sampled)

    def _history(self, drafts: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The penalties' ``seen`` and ``counts`` (len(drafts) + 1, V) at window positions 0..len(drafts): the
        row's tokens, then those and ``drafts[:j]`` at position j."""
        rows = len(drafts) + 1
        seen = None if self.seen is None else self.seen.expand(rows, -1).clone()
        counts = None if self.counts is None else self.counts.expand(rows, -1).clone()
        for j, token in enumerate(drafts):
            if seen is not None:
                seen[j + 1 :, token] = True
            if counts is not None:
                counts[j + 1 :, token] += 1
        return seen, counts

    def accept(self, tokens: Sequence[int]) -> None:
        """Add the row's new ``tokens`` to what the penalties read, and start a new round of drafts."""
        for token in tokens:
            if self.seen is not None:
                self.seen[0, token] = True
            if self.counts is not None:
                self.counts[0, token] += 1
        self.drafts, self.q = [], []

    def first(self, logits: torch.Tensor) -> int:
        """The token after the prompt, from the main model's last logits (1, V) (checked finite by the caller)."""
        seen, counts = self._history(())
        return int(self.sampler.pick_rows(logits, nonfinite(logits), seen, counts))

    def draft(self, logits: torch.Tensor) -> int:
        """The next draft, from an MTP depth's logits (1, V)."""
        seen, counts = self._history(self.drafts)
        logits = self.sampler.adjusted(
            logits, seen if seen is None else seen[-1:], counts if counts is None else counts[-1:]
        )
        if self.greedy:
            token = int(logits.argmax(-1))
        else:
            self.q.append(self.sampler.probabilities(logits, nonfinite(logits)))
            token = int(self.sampler.draw(self.q[-1]))
        self.drafts.append(token)
        return token

    def verify(
        self, logits: torch.Tensor, drafts: Sequence[int], logprobs: int | None = None
    ) -> tuple[int, int, list[int], list[TokenLogprob]]:
        """The main model's logits (k + 1, V) over ``[x_{n-1}, *drafts]`` -> the number of drafts kept, the token
        after them, each window position's :func:`nonfinite` flag, and with ``logprobs`` (k) the
        :class:`~hybridlm.infer.logprobs.TokenLogprob` of each token taken (the kept drafts', then the one after
        them: from the raw logits, as plain decoding reports them); all read back together, one synchronization."""
        k = len(drafts)
        bad = nonfinite(logits)
        raw = logits
        logits = self.sampler.adjusted(logits, *self._history(drafts))
        x = torch.tensor(list(drafts), dtype=torch.long, device=logits.device)
        if self.greedy:
            keep, picks = None, logits.argmax(-1)
        else:
            if len(self.q) != k:  # (drafts that did not come from draft(): a test's oracle)
                raise RuntimeError(f"{k} drafts to verify, but {len(self.q)} were drawn by speculative sampling")
            p = self.sampler.probabilities(logits, bad)
            q = torch.cat(self.q) if k else p[:0]
            generator = self.sampler.generator
            u = torch.rand(k, generator=generator, device=generator.device).to(p.device)
            keep = u * q.gather(1, x[:, None])[:, 0] < p[:k].gather(1, x[:, None])[:, 0]  # u < p(x) / q(x)
            # Where a draft is refused, p(x) < q(x) so max(p - q, 0) has mass; rounding may still leave none: then p.
            residual = torch.cat([(p[:k] - q).clamp_min(0), p[k:]])
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
            picks = self.sampler.draw(residual)  # one for every position: which is used is known only once read back
        parts = [picks, bad.long()] + ([] if keep is None else [keep.long()])
        if logprobs is not None:  # each position's two candidates, its draft's and its own pick's, scored as well
            lp = torch.log_softmax(raw.to(accumulation_dtype(raw)), dim=-1)
            top = lp.topk(min(logprobs, lp.shape[-1]), dim=-1)
            parts += [lp[:k].gather(1, x[:, None])[:, 0], lp.gather(1, picks[:, None])[:, 0], top.values, top.indices]
        # One readback: float64 holds every id and flag exactly, and the float32 (or float64) log-probabilities.
        dtype = torch.long if logprobs is None else torch.float64
        flat = torch.cat([t.reshape(-1).to(dtype) for t in parts]).tolist()
        read, at = [], 0
        for t in parts:
            read.append(flat[at : at + t.numel()])
            at += t.numel()
        picks_l, flags = [int(t) for t in read[0]], [int(b) for b in read[1]]
        if keep is None:
            kept = 0
            while kept < k and drafts[kept] == picks_l[kept]:
                kept += 1
        else:
            kept = next((j for j in range(k) if not read[2][j]), k)
        infos: list[TokenLogprob] = []
        if logprobs is not None:
            drafted, picked, values, ids = read[-4:]
            width = top.values.shape[-1]
            for j, chosen in enumerate([*drafted[:kept], picked[kept]]):
                row = slice(j * width, (j + 1) * width)
                infos.append(TokenLogprob(chosen, tuple(zip((int(i) for i in ids[row]), values[row]))))
        return kept, picks_l[kept], flags, infos


class SpeculativeSession:
    """The main model's and the MTP depths' caches after a speculative generation, and the tokens they stand for
    (the main cache holds all but the last, as after any generation): a next prompt that begins with those tokens
    runs only the rest, as a chat's next turn does (:class:`~hybridlm.infer.conversation.Conversation`). Given to
    ``generate(..., speculative="mtp", speculative_session=...)`` for one prompt at a time; a prompt that does not
    begin with its tokens, or another ``draft_tokens``, starts it over, and one that needs more room than the caches
    have moves them into larger ones. ``kept``: the positions the last prompt did not run."""

    def __init__(self) -> None:
        self.cache: InferenceCache | None = None
        self.depths: _Depths | None = None
        self.tokens: list[int] = []
        self.kept = 0

    def clear(self) -> None:
        """Drop the caches (their memory goes before new ones are allocated)."""
        self.cache, self.depths, self.tokens = None, None, []

    def held(self, prompt: Sequence[int], k: int, chunk_size: int, model=None) -> int:
        """The positions of ``prompt`` the caches hold (0: they cannot serve it): all its tokens' but the last of
        this session's, where ``prompt`` begins with them, ``k`` and ``chunk_size`` are the depths' and ``model``
        (where given) is the one whose states they hold."""
        n = len(self.tokens)
        usable = self.cache is not None and self.depths is not None and 1 < n <= len(prompt)
        usable = usable and (model is None or self.depths.model is model)
        if not usable or list(prompt[:n]) != self.tokens or self.cache.offset != n - 1:
            return 0
        return n - 1 if (self.depths.k, self.depths.chunk_size) == (k, chunk_size) else 0

    def grow(self, model, max_len: int) -> None:
        """Move the caches into ones of ``max_len`` positions: their states copied (``InferenceCache.place``, exact),
        not recomputed."""

        def moved(old: InferenceCache, new: InferenceCache) -> InferenceCache:
            if old.offset:  # (an empty cache is a new one)
                new.advance(old.offset)
                new.place(old, 0, 0, old.offset)
            return new

        self.cache = moved(self.cache, InferenceCache.for_model(model, 1, max_len))
        self.depths.caches = [
            moved(c, InferenceCache.for_mtp_depth(model, d, 1, max_len)) for d, c in enumerate(self.depths.caches, 1)
        ]


@torch.no_grad()
def mtp_generate(
    model,
    prompt: list[int],
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    chunk_size: int,
    callback,
    stats,
    draft_tokens=None,
    row: int = 0,
    sampler: Sampler | None = None,
    session: SpeculativeSession | None = None,
    logprobs: int | None = None,
) -> list[int]:
    """Generation for one prompt, drafting with the MTP depths (see the module docstring), picking with ``sampler``
    (default: greedy); ``draft_tokens`` drafts per round from the first depths (default: every depth).
    :func:`generate` checks the arguments (a model with MTP depths among them). ``row``: the prompt's index in the
    batch, which a :class:`~hybridlm.errors.NonFiniteLogitsError` names. ``session``: caches to start from where
    ``prompt`` begins with their tokens, left holding the prompt and its answer. ``logprobs`` (k): each token's
    :class:`~hybridlm.infer.logprobs.TokenLogprob` goes to ``callback`` as its third argument."""
    device = next(model.parameters()).device
    k = len(model.mtp) if draft_tokens is None else min(draft_tokens, len(model.mtp))
    room = len(prompt) + max_new_tokens + k + 1
    picks = _Picks(sampler or Sampler(device=device), prompt, model.config.vocab_size, device)
    held = session.held(prompt, k, chunk_size, model) if session is not None else 0
    if held:
        if session.cache.max_len < room:  # room to grow again: a chat's turns each add to the last
            with cache_allocation(1, len(prompt), max_new_tokens):
                session.grow(model, 2 * room)
        cache, depths = session.cache, session.depths
        depths.pick = picks.draft
    else:
        if session is not None:
            session.clear()
        # A kept session gets room to grow: the next prompts (a chat's turns) begin with this one and its answer.
        max_len = room if session is None else 2 * room
        with cache_allocation(1, len(prompt), max_new_tokens):
            cache = InferenceCache.for_model(model, 1, max_len)
            depths = _Depths(model, max_len, k, chunk_size, picks.draft)
    if session is not None:
        session.kept = held
    try:
        new = _rounds(model, prompt, held, cache, depths, picks, max_new_tokens, eos_ids, chunk_size, callback, stats,
                      k, row, logprobs)  # fmt: skip
    except BaseException:  # (Ctrl-C in a callback: the caches may hold a window not rolled back)
        if session is not None:
            session.clear()
        raise
    if session is not None:
        session.cache, session.depths, session.tokens = cache, depths, [*prompt, *new]
    return new


def _rounds(
    model, prompt, held, cache, depths, picks, max_new_tokens, eos_ids, chunk_size, callback, stats, k, row, logprobs
):
    """:func:`mtp_generate`'s prefill of ``prompt[held:]`` (the caches hold the positions before it) and its rounds;
    the new tokens. Each round leaves the main cache holding every token but the last, and the depths fed its
    hidden states, so that the caches can serve a next prompt."""
    device = cache.offset_t.device
    for key in ("drafted", "accepted", "verify_steps"):
        stats.setdefault(key, 0)  # summed over the prompts of one generate call
    ids = torch.tensor([prompt[held:]], device=device)
    t0 = _sync(device)
    logits = None
    for i in range(0, len(prompt) - held, chunk_size):
        out = model(ids[:, i : i + chunk_size], cache=cache, logits_to_keep=1)
        depths.feed_main(model.norm_f(out.hidden_states))
        logits = out.logits
    t1 = _sync(device)
    stats["prefill_tokens"] += len(prompt) - held
    stats["prefill_seconds"] += t1 - t0
    tokens = list(prompt)
    new: list[int] = []
    check_finite(nonfinite(logits[:, -1]).tolist(), [False], [len(prompt)], [0], row)
    first = picks.first(logits[:, -1])
    scored = _logprobs(logits[:, -1], torch.tensor([first], device=device), logprobs)[0]
    done = _accept(new, first, 0, eos_ids, callback, scored)
    tokens.append(new[-1])
    picks.accept(new)
    if not done and len(new) < max_new_tokens:
        # The depths' pass over the prompt is prefill work: counted in decode_seconds, it made speculative decoding
        # look slower the longer the prompt. The first round's draft then runs on what this left.
        t = _sync(device)
        depths.commit(tokens, min(k, max_new_tokens - len(new) - 1))
        spent = _sync(device) - t
        stats["prefill_seconds"] += spent
        t1 += spent  # decode time starts after it
    while not done and len(new) < max_new_tokens:
        # (The phases are named for torch.profiler: benchmarks/generate.py --mtp-cost --mtp-profile times them.)
        with record_function("speculative.draft"):  # the depths' commit of the last round's tokens, then drafts
            drafts = depths.draft(tokens, min(k, max_new_tokens - len(new) - 1))
        with record_function("speculative.verify"):  # the main model over the window, its verdict read back
            window = torch.tensor([[tokens[-1], *drafts]], device=device)
            snap = cache.snapshot()
            cache.record_positions()
            out = model(window, cache=cache)
            a, pick, bad, scores = picks.verify(out.logits[0], drafts, logprobs)  # a drafts kept, then ``pick``
        stats["drafted"] += len(drafts)
        stats["accepted"] += a
        stats["verify_steps"] += 1
        taken = len(new)
        for j, token in enumerate([*drafts[:a], pick]):  # window position j's logits picked this token
            check_finite(bad[j : j + 1], [False], [len(prompt)], [len(new)], row)
            tokens.append(token)
            scored = scores[j] if scores else None
            done = _accept(new, token, 0, eos_ids, callback, scored) or len(new) >= max_new_tokens
            if done:
                break
        # The window positions that stand: those before each token taken (the last taken is not run yet). All of
        # them where every draft and the pick were taken; fewer where a draft was refused, or the answer ended first.
        keep = len(new) - taken
        hidden = out.hidden_states
        with record_function("speculative.keep"):  # the caches cut back to the positions kept
            if keep == window.shape[1]:
                cache.trail = None  # the window stands as it ran
            elif cache.rollback(snap, keep):  # states as they were after the positions kept
                hidden = hidden[:, :keep]  # causal: the verify computed these positions as a re-run would
            else:  # a mixer kept no per-position state: re-run the kept positions from the snapshot
                hidden = model(window[:, :keep], cache=cache, logits_to_keep=1).hidden_states
            depths.feed_main(model.norm_f(hidden[:, :keep]))
        picks.accept(new[taken:])
    stats["decode_tokens"] += len(new) - 1
    stats["decode_seconds"] += _sync(device) - t1
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    return new
