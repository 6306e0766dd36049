"""Log-probabilities of tokens: of each token ``generate`` picks (from the logits it picked it from) and of each
prompt token (from a teacher-forced cached forward over the prompt), with the ``k`` most likely tokens beside it.

Values are ``log_softmax`` of the model's raw logits, before temperature, top-k / top-p and the repetition penalty
(what OpenAI and vLLM report: the model's distribution, not the sampler's), in float32 (float64 in a float64 model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.precision import accumulation_dtype
from .cache import InferenceCache

#: Logits (positions x vocabulary) computed at once while scoring a prompt: its forward runs in chunks of
#: ``LOGITS_BUDGET // vocab_size`` positions, so that (L, V) float32 logits (2 GB at 4,096 positions and a
#: 131,072-token vocabulary, as much again for their log_softmax) are never made whole.
LOGITS_BUDGET = 2**25


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``k`` most likely tokens at its position as (id, logprob), most likely
    first (ties: the lower id first, as ``torch.topk`` orders them)."""

    logprob: float
    top: tuple[tuple[int, float], ...]


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


@torch.no_grad()
def prompt_logprobs(model: torch.nn.Module, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Each token of ``ids`` (one prompt) scored by the model from the tokens before it: a list as long as ``ids``,
    its first None (nothing precedes it). One cached forward over ``ids[:-1]`` (the last token's logits predict
    nothing in the prompt), in chunks of at most ``LOGITS_BUDGET // vocab_size`` positions, each chunk's logits
    scored and dropped before the next."""
    if len(ids) < 2:
        return [None] * len(ids)
    device = next(model.parameters()).device
    chunk = max(1, LOGITS_BUDGET // model.config.vocab_size)
    x = torch.tensor([ids], device=device)
    cache = InferenceCache.for_model(model, 1, len(ids) - 1)
    out: list[TokenLogprob | None] = [None]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(ids) - 1, chunk):
            end = min(start + chunk, len(ids) - 1)
            logits = model(x[:, start:end], cache=cache).logits[0]  # (n, V), position i predicts token i + 1
            bad = (~torch.isfinite(logits.amax(-1))).nonzero()
            if len(bad):  # (NaN logprobs are no JSON, and would score nothing)
                raise ValueError(
                    f"the logits at prompt position {start + int(bad[0])} are not finite (NaN or inf): the model's "
                    "weights or activations hold NaN or inf; no token can be scored from them"
                )
            out += to_host(*(t.tolist() for t in pick_logprobs(logits, x[0, start + 1 : end + 1], k)))
    finally:
        model.train(was_training)
    return out
