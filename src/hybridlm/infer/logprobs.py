"""Log-probabilities of tokens: of each token ``generate`` picks (from the logits it picked it from) and of each
prompt token (from a teacher-forced cached forward over the prompt), with the ``k`` most likely tokens beside it.

Values are ``log_softmax`` of the model's raw logits, before temperature, top-k / top-p and the repetition penalty
(what OpenAI and vLLM report: the model's distribution, not the sampler's), in float32 (float64 in a float64 model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NonFiniteLogitsError
from ..ops.precision import accumulation_dtype
from .cache import InferenceCache
from .device import inferring
from .prefix_store import PrefixStore

#: Logits (rows x positions x vocabulary) computed at once while scoring prompts: their batch's forward runs in
#: chunks of ``LOGITS_BUDGET // (rows * vocab_size)`` positions, so that (B, L, V) float32 logits (2 GB for one row
#: of 4,096 positions and a 131,072-token vocabulary, as much again for their log_softmax) are never made whole.
LOGITS_BUDGET = 2**25
#: Positions per forward of an unscored run (:func:`~hybridlm.infer.prefixes.prefill_shared`'s; generate's default
#: ``prefill_chunk_size``).
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


@inferring
def score_prompts(
    model: torch.nn.Module, prompts: list[list[int]], k: int, store: PrefixStore | None = None
) -> list[list[TokenLogprob | None]]:
    """Each token of each prompt scored by the model from the tokens before it: per prompt a list as long as it,
    its first None (nothing precedes it).

    The prompts run as one left-padded batch (a cached forward over each prompt but its last token, whose logits
    predict nothing in it), in chunks of at most ``LOGITS_BUDGET // (batch * vocab_size)`` positions, each chunk's
    logits scored and dropped before the next. Prompts that begin alike run their shared prefixes once
    (:mod:`~hybridlm.infer.prefixes`: a multiple-choice question's choices), their rests from copies of the
    prefixes' states. A row's values differ from its own forward's by float rounding only, as a padded batch's
    generation does. :class:`~hybridlm.errors.NonFiniteLogitsError` naming the prompt (its ``row``) and the position
    where logits are not finite. ``store`` (a :class:`~hybridlm.infer.prefix_store.PrefixStore`): prefixes kept from
    earlier calls stand for their tokens' forward, prefixes shared with the prompts it saw recently are found too,
    and the prefixes run are kept."""
    from .prefixes import run_prompts  # (it imports this module)

    out: list[list[TokenLogprob | None]] = [[None] * min(len(p), 1) for p in prompts]
    rows = [i for i, p in enumerate(prompts) if len(p) >= 2]
    if rows:
        inputs, targets = [prompts[i][:-1] for i in rows], [prompts[i][1:] for i in rows]
        scored, _, _ = run_prompts(model, inputs, targets, k, rows, False, store)
        for i, scores in zip(rows, scored):
            out[i] += scores
    return out


@inferring
def prefill_scored(
    model: torch.nn.Module, prompts: list[list[int]], k: int, store: PrefixStore | None = None
) -> tuple[list[list[TokenLogprob | None]], InferenceCache, torch.Tensor]:
    """:func:`score_prompts`' scores of ``prompts`` (non-empty), from one forward over the whole prompts that also
    prefills them: (the scores, the cache that holds the prompts, left-padded, and the (B, V) logits of their last
    positions, which pick each one's first new token). A prompt scored then continued runs through the model once,
    not once to be scored and again to be prefilled; shared prefixes run once, and ``store`` is read and kept, as
    :func:`score_prompts` does."""
    from .prefixes import run_prompts  # (it imports this module)

    rows = list(range(len(prompts)))
    scored, cache, last = run_prompts(model, prompts, [p[1:] for p in prompts], k, rows, True, store)
    return [[None, *scores] for scores in scored], cache, last


def _scored_forward(
    model: torch.nn.Module,
    inputs: list[list[int]],
    targets: list[list[int]],
    k: int | None,
    names: list[int],
    cache: InferenceCache | None = None,
    at: list[int] | None = None,
    chunk_size: int = PREFILL_CHUNK,
) -> tuple[list[list[TokenLogprob]], InferenceCache, torch.Tensor]:
    """``inputs`` (non-empty) run as one left-padded batch through a cache, in chunks of at most ``LOGITS_BUDGET //
    (batch * vocab_size)`` positions; input position j of a row is scored against ``targets[row][j]`` where it has
    one (``targets[row]`` is as long as its input, or one shorter: the last position then only predicts). Returns
    each row's scores, the cache and the (B, V) logits of the last position. Non-finite logits at a position: a
    :class:`~hybridlm.errors.NonFiniteLogitsError` naming prompt ``names[row]`` and the position. ``cache``: one
    that holds what comes before the inputs (then all of one length), ``at[row]`` their first position in their
    prompts (default 0: a new cache). ``k`` None: nothing scored (empty lists, no check: a prefill, ``chunk_size``
    positions per forward at most)."""
    from .decode import left_pad  # (decode imports this module)

    device = next(model.parameters()).device
    ids, valid = left_pad(inputs, device)  # (B, P)
    B, P = ids.shape
    at = [0] * B if at is None else at
    goal = torch.zeros(B, P, dtype=torch.long)  # the token each position is scored against,
    scoring = torch.zeros(B, P, dtype=torch.bool)  # where it has one
    for r, (row, want) in enumerate(zip(inputs, targets) if k is not None else ()):  # (a prefill scores nothing)
        goal[r, P - len(row) : P - len(row) + len(want)] = torch.tensor(want, dtype=torch.long)
        scoring[r, P - len(row) : P - len(row) + len(want)] = True
    if k is not None:
        goal, scoring = goal.to(device), scoring.to(device)
    if cache is None:
        cache = InferenceCache.for_model(model, B, P)
        if not bool(valid.all()):
            cache.set_padding(valid)
    # (unscored: a prefill, the head on each chunk's last position only, whose logits the decode step checks)
    chunk = chunk_size if k is None else max(1, LOGITS_BUDGET // (B * model.config.vocab_size))
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
