"""Log-probabilities of tokens: of each token ``generate`` picks (from the logits it picked it from) and of each
prompt token (from a teacher-forced cached forward over the prompt), with the ``k`` most likely tokens beside it.

Values are ``log_softmax`` of the model's raw logits, before temperature, top-k / top-p and the repetition penalty
(what OpenAI and vLLM report: the model's distribution, not the sampler's), in float32 (float64 in a float64 model).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import torch

from ..errors import NonFiniteLogitsError
from ..ops.precision import accumulation_dtype
from .cache import InferenceCache

#: Logits (rows x positions x vocabulary) computed at once while scoring prompts: their batch's forward runs in
#: chunks of ``LOGITS_BUDGET // (rows * vocab_size)`` positions, so that (B, L, V) float32 logits (2 GB for one row
#: of 4,096 positions and a 131,072-token vocabulary, as much again for their log_softmax) are never made whole.
LOGITS_BUDGET = 2**25
#: Prompts scored or prefilled together that begin with the same tokens, at least this many, run those tokens once
#: (:func:`shared_prefixes`): lm-evaluation-harness sends a multiple-choice question's choices as prompts that share
#: the question (and its few-shot examples), then differ in their last tokens, and a few-shot task's prompts share
#: the examples. Below it, the forwards the split adds cost more than the tokens it saves.
SHARED_PREFIX = 64
#: Positions per forward of :func:`prefill_shared` (generate's default ``prefill_chunk_size``).
PREFILL_CHUNK = 2048


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``k`` most likely tokens at its position as (id, logprob), most likely
    first (ties: the lower id first, as ``torch.topk`` orders them)."""

    logprob: float
    top: tuple[tuple[int, float], ...]

    def most_likely(self, k: int) -> TokenLogprob:
        """The same token's, with only the ``k`` most likely tokens (a batch computes its rows' largest k)."""
        return TokenLogprob(self.logprob, self.top[:k])


def pick_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """logits: (B, V) raw, tokens: (B,) the ids picked -> (their (B,) logprobs, the (B, k) top logprobs, the (B, k)
    top ids), all left on the device (the caller copies them to the host with the tokens: no synchronization of
    their own)."""
    lp = torch.log_softmax(logits.to(accumulation_dtype(logits)), dim=-1)
    top = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return lp.gather(1, tokens.view(-1, 1)).view(-1), top.values, top.indices


def to_host(chosen: list[float], values: list[list[float]], ids: list[list[int]]) -> list[TokenLogprob]:
    """:func:`pick_logprobs`'s tensors, as lists (``.tolist()``), per row."""
    return [TokenLogprob(c, tuple(zip(i, v))) for c, v, i in zip(chosen, values, ids)]


def prompt_logprobs(model: torch.nn.Module, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Each token of ``ids`` (one prompt) scored by the model from the tokens before it: :func:`score_prompts` of
    the one prompt."""
    return score_prompts(model, [ids], k)[0]


@torch.no_grad()
def score_prompts(model: torch.nn.Module, prompts: list[list[int]], k: int) -> list[list[TokenLogprob | None]]:
    """Each token of each prompt scored by the model from the tokens before it: per prompt a list as long as it,
    its first None (nothing precedes it).

    The prompts run as one left-padded batch (a cached forward over each prompt but its last token, whose logits
    predict nothing in it), in chunks of at most ``LOGITS_BUDGET // (batch * vocab_size)`` positions, each chunk's
    logits scored and dropped before the next. Prompts that begin with the same :data:`SHARED_PREFIX` tokens or more
    run them once (:func:`shared_prefixes`: a multiple-choice question's choices), their rests from a copy of the
    prefix's states. A row's values differ from its own forward's by float rounding only, as a padded batch's
    generation does. :class:`~hybridlm.errors.NonFiniteLogitsError` naming the prompt (its ``row``) and the position
    where logits are not finite."""
    out: list[list[TokenLogprob | None]] = [[None] * min(len(p), 1) for p in prompts]
    rows = [i for i, p in enumerate(prompts) if len(p) >= 2]
    if rows:
        inputs, targets = [prompts[i][:-1] for i in rows], [prompts[i][1:] for i in rows]
        scored, _, _ = _scored(model, inputs, targets, k, rows, keep=False)
        for i, scores in zip(rows, scored):
            out[i] += scores
    return out


@torch.no_grad()
def prefill_scored(
    model: torch.nn.Module, prompts: list[list[int]], k: int
) -> tuple[list[list[TokenLogprob | None]], InferenceCache, torch.Tensor]:
    """:func:`score_prompts`' scores of ``prompts`` (non-empty), from one forward over the whole prompts that also
    prefills them: (the scores, the cache that holds the prompts, left-padded, and the (B, V) logits of their last
    positions, which pick each one's first new token). A prompt scored then continued runs through the model once,
    not once to be scored and again to be prefilled; shared prefixes run once, as :func:`score_prompts` runs them."""
    rows = list(range(len(prompts)))
    scored, cache, last = _scored(model, prompts, [p[1:] for p in prompts], k, rows, keep=True)
    return [[None, *scores] for scores in scored], cache, last


@torch.no_grad()
def prefill_shared(model: torch.nn.Module, prompts: list[list[int]]) -> tuple[InferenceCache, torch.Tensor] | None:
    """Prefill ``prompts`` (non-empty) with the prefixes they share run once (:data:`SHARED_PREFIX` tokens or more:
    a few-shot task's prompts, a request's choices): (a cache that holds them left-padded, as one forward over them
    all would, and the (B, V) logits of their last positions), which ``generate(prefilled=...)`` and
    :meth:`~hybridlm.infer.decode.DecodeBatch.admit` decode from; None where no two share that many (a plain
    prefill then costs the same)."""
    if not shared_prefixes(prompts, SHARED_PREFIX):
        return None
    _, cache, last = _scored(model, prompts, [p[1:] for p in prompts], None, list(range(len(prompts))), keep=True)
    return cache, last


def shared_prefixes(prompts: list[list[int]], minimum: int) -> list[tuple[int, list[int]]]:
    """The prompts that begin with the same ``p`` >= ``minimum`` tokens, as (p, their indices in order), each
    prompt with at least one token after its group's p (the groups' last prefix positions predict a token of each
    member's own); a prompt that shares fewer with every other is in none. Prompts sorted as sequences put those
    sharing a prefix next to each other, and a run's common prefix is the least one of its neighbours': one level
    (a group whose members share more among some of them runs that more once per member)."""
    # (a prompt of at most ``minimum`` tokens has no such prefix and a token after it: it would only shorten a group)
    order = sorted((i for i in range(len(prompts)) if len(prompts[i]) > minimum), key=lambda i: prompts[i])
    runs: list[tuple[int, list[int]]] = []  # (common prefix, indices) of neighbours sharing at least minimum
    for a, b in itertools.pairwise(order):
        x, y = prompts[a], prompts[b]
        common = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        if common < minimum:
            continue
        if runs and runs[-1][1][-1] == a:
            runs[-1] = (min(runs[-1][0], common), runs[-1][1] + [b])
        else:
            runs.append((common, [a, b]))
    return [(min(common, *(len(prompts[i]) - 1 for i in members)), sorted(members)) for common, members in runs]


def _scored(
    model: torch.nn.Module,
    inputs: list[list[int]],
    targets: list[list[int]],
    k: int | None,
    names: list[int],
    keep: bool,
) -> tuple[list[list[TokenLogprob]], InferenceCache | None, torch.Tensor]:
    """:func:`_scored_forward`'s results for ``inputs`` (each scored against the next input tokens: ``targets[row][j]
    == inputs[row][j + 1]`` where both exist), their shared prefixes run once (:data:`SHARED_PREFIX`): the prefixes
    as one batch, then each member's rest from a copy of its prefix's states, the rests of one length as one batch.
    The cache (``keep``; else None) holds every row left-padded, as one forward over them all would. ``k`` None:
    nothing scored (empty lists; a prefill)."""
    groups = shared_prefixes(inputs, SHARED_PREFIX)
    if not groups:
        return _scored_forward(model, inputs, targets, k, names)
    device = next(model.parameters()).device
    n = len(inputs)
    scores: list[list[TokenLogprob]] = [[] for _ in inputs]
    held: list[tuple[InferenceCache, int]] = [None] * n  # type: ignore[list-item]  # the cache and row holding each
    last: list[torch.Tensor] = [None] * n  # type: ignore[list-item]  # the (V,) logits of its last position

    def run(rows: list[int], cut: list[int], prefix: tuple | None = None) -> None:
        """Score ``inputs[r][cut[i]:]`` for the rows (equal lengths where ``prefix`` = (its cache, each row's)), and
        record where they are held."""
        cache = None
        if prefix is not None:
            pcache, of = prefix
            front = max(cut)  # (shorter prefixes left-padded to the longest)
            cache = InferenceCache.for_model(model, len(rows), front + len(inputs[rows[0]]) - cut[0])
            cache.shift(front)
            for i, (source, p) in enumerate(zip(of, cut)):
                cache.place(pcache, source, i, p)
        got, cache, end = _scored_forward(
            model,
            [inputs[r][p:] for r, p in zip(rows, cut)],
            [targets[r][p:] for r, p in zip(rows, cut)],
            k,
            [names[r] for r in rows],
            cache,
            cut,
        )
        for i, r in enumerate(rows):
            scores[r] += got[i]
            held[r], last[r] = (cache, i), end[i]

    shared = {r for _, members in groups for r in members}
    alone = [r for r in range(n) if r not in shared]
    if alone:
        run(alone, [0] * len(alone))
    # The prefixes once each, scored up to their last position, whose logits predict each member's own next token.
    cut = [p for p, _ in groups]
    heads = [members[0] for _, members in groups]
    got, pcache, end = _scored_forward(
        model,
        [inputs[r][:p] for r, p in zip(heads, cut)],
        [targets[r][: p - 1] for r, p in zip(heads, cut)],
        k,
        [names[r] for r in heads],
    )
    for g, (p, members) in enumerate(groups):
        if k is None:
            continue
        goal = torch.tensor([targets[r][p - 1] for r in members], device=device)
        own = to_host(*(t.tolist() for t in pick_logprobs(end[g].expand(len(members), -1), goal, k)))
        for r, mine in zip(members, own):
            scores[r] = got[g] + [mine]
    rests = collections.defaultdict(list)  # the members by the length of their rest: (row, its group)
    for g, (p, members) in enumerate(groups):
        for r in members:
            rests[len(inputs[r]) - p].append((r, g))
    for members in rests.values():
        rows, of = [r for r, _ in members], [g for _, g in members]
        run(rows, [cut[g] for g in of], (pcache, of))
    if not keep:
        return scores, None, torch.stack(last)
    P = max(len(row) for row in inputs)
    cache = InferenceCache.for_model(model, n, P)
    cache.shift(P)
    for r, (source, i) in enumerate(held):
        cache.place(source, i, r, len(inputs[r]))
    return scores, cache, torch.stack(last)


def _scored_forward(
    model: torch.nn.Module,
    inputs: list[list[int]],
    targets: list[list[int]],
    k: int | None,
    names: list[int],
    cache: InferenceCache | None = None,
    at: list[int] | None = None,
) -> tuple[list[list[TokenLogprob]], InferenceCache, torch.Tensor]:
    """``inputs`` (non-empty) run as one left-padded batch through a cache, in chunks of at most ``LOGITS_BUDGET //
    (batch * vocab_size)`` positions; input position j of a row is scored against ``targets[row][j]`` where it has
    one (``targets[row]`` is as long as its input, or one shorter: the last position then only predicts). Returns
    each row's scores, the cache and the (B, V) logits of the last position. Non-finite logits at a position: a
    :class:`~hybridlm.errors.NonFiniteLogitsError` naming prompt ``names[row]`` and the position. ``cache``: one
    that holds what comes before the inputs (then all of one length), ``at[row]`` their first position in their
    prompts (default 0: a new cache). ``k`` None: nothing scored (empty lists, no check: a prefill)."""
    from .decode import left_pad  # (decode imports this module)

    device = next(model.parameters()).device
    ids, valid = left_pad(inputs, device)  # (B, P)
    B, P = ids.shape
    at = [0] * B if at is None else at
    goal = torch.zeros(B, P, dtype=torch.long)  # the token each position is scored against,
    scoring = torch.zeros(B, P, dtype=torch.bool)  # where it has one
    for r, (row, want) in enumerate(zip(inputs, targets)):
        goal[r, P - len(row) : P - len(row) + len(want)] = torch.tensor(want, dtype=torch.long)
        scoring[r, P - len(row) : P - len(row) + len(want)] = True
    goal, scoring = goal.to(device), scoring.to(device)
    if cache is None:
        cache = InferenceCache.for_model(model, B, P)
        if not bool(valid.all()):
            cache.set_padding(valid)
    # (unscored: a prefill, the head on each chunk's last position only, whose logits the decode step checks)
    chunk = PREFILL_CHUNK if k is None else max(1, LOGITS_BUDGET // (B * model.config.vocab_size))
    out: list[list[TokenLogprob]] = [[] for _ in inputs]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, P, chunk):
            end = min(start + chunk, P)
            logits = model(ids[:, start:end], cache=cache, logits_to_keep=1 if k is None else 0).logits  # (B, n, V)
            if k is None:
                continue
            real = valid[:, start:end]
            bad = (~torch.isfinite(logits.amax(-1)) & real).nonzero()
            if len(bad):  # (NaN logprobs are no JSON, and would score nothing)
                r, j = (int(x) for x in bad[0])
                position = at[r] + start + j - (P - len(inputs[r]))  # counted in the prompt itself
                raise NonFiniteLogitsError(
                    names[r],
                    f"the logits at prompt position {position} are not finite (NaN or inf): the model's weights or "
                    "activations hold NaN or inf; no token can be scored from them",
                )
            n = end - start
            scores = to_host(
                *(t.tolist() for t in pick_logprobs(logits.reshape(B * n, -1), goal[:, start:end].reshape(-1), k))
            )
            keep = scoring[:, start:end].reshape(-1).tolist()
            for flat, (score, scored) in enumerate(zip(scores, keep)):
                if scored:
                    out[flat // n].append(score)
    finally:
        model.train(was_training)
    return out, cache, logits[:, -1].clone()  # (not a view that keeps the chunk's logits)
