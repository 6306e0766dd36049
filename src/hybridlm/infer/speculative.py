"""Self-speculative greedy decoding with the model's MTP depths.

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
   drafts are accepted while they equal the main model's argmax, then one more token (the main
   model's own pick after the last accepted draft) is free. On a rejection the main cache rolls
   back to the accepted prefix (``InferenceCache.rollback``: the states recorded after each
   position of the window), or, where a mixer recorded none, is restored and the accepted prefix
   re-run; either way its recurrent states never saw a rejected token.

Greedy output equals plain greedy decoding (up to floating-point ties: a long verify window runs
the chunked kernels instead of the step).
"""

from __future__ import annotations

import torch

from .cache import InferenceCache
from .generate import _accept, _sync, cache_allocation, check_finite, nonfinite


class _Depths:
    """The MTP depths' caches and the hidden states each depth has yet to consume.

    ``chunk_size``: a depth runs at most this many positions per forward (the prompt's commit, the first
    round, as the main model's prefill in ``prefill_chunk_size`` chunks); None: all of them at once.
    """

    def __init__(self, model, max_len: int, depths: int | None = None, chunk_size: int | None = None) -> None:
        self.model = model
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
            drafts.append(int(self.model.head(out[:, -1]).argmax(-1)))
        return drafts


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
) -> list[int]:
    """Greedy generation for one prompt, drafting with the MTP depths (see the module docstring);
    ``draft_tokens`` drafts per round from the first depths (default: every depth). :func:`generate` checks
    the arguments (a model with MTP depths among them). ``row``: the prompt's index in the batch, which a
    :class:`~hybridlm.errors.NonFiniteLogitsError` names."""
    device = next(model.parameters()).device
    k = len(model.mtp) if draft_tokens is None else min(draft_tokens, len(model.mtp))
    max_len = len(prompt) + max_new_tokens + k + 1
    with cache_allocation(1, len(prompt), max_new_tokens):
        cache = InferenceCache.for_model(model, 1, max_len)
        depths = _Depths(model, max_len, k, chunk_size)
    for key in ("drafted", "accepted", "verify_steps"):
        stats.setdefault(key, 0)  # summed over the prompts of one generate call
    ids = torch.tensor([prompt], device=device)
    t0 = _sync(device)
    logits = None
    for i in range(0, len(prompt), chunk_size):
        out = model(ids[:, i : i + chunk_size], cache=cache, logits_to_keep=1)
        depths.feed_main(model.norm_f(out.hidden_states))
        logits = out.logits
    t1 = _sync(device)
    stats["prefill_tokens"] += len(prompt)
    stats["prefill_seconds"] += t1 - t0
    tokens = list(prompt)
    new: list[int] = []
    check_finite(nonfinite(logits[:, -1]).tolist(), [False], [len(prompt)], [0], row)
    done = _accept(new, int(logits[0, -1].argmax()), 0, eos_ids, callback)
    tokens.append(new[-1])
    if not done and len(new) < max_new_tokens:
        # The depths' pass over the prompt is prefill work: counted in decode_seconds, it made speculative decoding
        # look slower the longer the prompt. The first round's draft then runs on what this left.
        t = _sync(device)
        depths.commit(tokens, min(k, max_new_tokens - len(new) - 1))
        spent = _sync(device) - t
        stats["prefill_seconds"] += spent
        t1 += spent  # decode time starts after it
    while not done and len(new) < max_new_tokens:
        drafts = depths.draft(tokens, min(k, max_new_tokens - len(new) - 1))
        window = torch.tensor([[tokens[-1], *drafts]], device=device)
        snap = cache.snapshot()
        cache.record_positions()
        out = model(window, cache=cache)
        picks, bad = torch.stack([out.logits[0].argmax(-1), nonfinite(out.logits[0]).long()]).tolist()  # one readback
        a = 0
        while a < len(drafts) and drafts[a] == picks[a]:
            a += 1
        hidden = out.hidden_states
        if a == len(drafts):
            cache.trail = None  # every draft taken: the window stands as it ran
        elif cache.rollback(snap, a + 1):  # states as they were after the accepted prefix
            hidden = hidden[:, : a + 1]  # causal: the verify computed these positions as a re-run would
        else:  # a mixer kept no per-position state: re-run the accepted prefix from the snapshot
            hidden = model(window[:, : a + 1], cache=cache, logits_to_keep=1).hidden_states
        depths.feed_main(model.norm_f(hidden[:, : a + 1]))
        stats["drafted"] += len(drafts)
        stats["accepted"] += a
        stats["verify_steps"] += 1
        for j, token in enumerate([*drafts[:a], picks[a]]):  # window position j's logits picked this token
            check_finite(bad[j : j + 1], [False], [len(prompt)], [len(new)], row)
            tokens.append(token)
            done = _accept(new, token, 0, eos_ids, callback) or len(new) >= max_new_tokens
            if done:
                break
    stats["decode_tokens"] += len(new) - 1
    stats["decode_seconds"] += _sync(device) - t1
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    return new
