"""Generation: batched prompts, cached prefill + decode, greedy or sampled, optional MTP self-speculation.

``generate(model, prompts, ...)`` prefills every prompt through the chunked kernels (in chunks of
``prefill_chunk_size`` tokens) into an :class:`~hybridlm.infer.cache.InferenceCache`, then decodes
one token per row per step. Prompts of different lengths are padded on the left; the cache marks
the padding so it enters no state and no attention. ``use_cache=False`` is the exact, slow
reference: every new token reruns the full forward over the whole sequence of each prompt alone, the rows
stepped together so that sampling draws what the cached batch draws.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from ..checkpoint.io import refuse_meta
from ..ops.precision import accumulation_dtype
from ..ops.top_p import top_p_filter
from .cache import InferenceCache
from .cuda_graph import DecodeGraphs
from .decode import DecodeBatch, cache_allocation, check_finite, left_pad, nonfinite, prefill
from .decode import sync as _sync
from .device import inference
from .logprobs import TokenLogprob, pick_logprobs, to_host
from .prefix_store import PrefixStore
from .prefixes import keep_answers, prefill_shared

# (left_pad, prefill and check_finite are read from here by speculative decoding, prompt scoring and the tests)
__all__ = ["Sampler", "TokenCallback", "check_finite", "check_sampling", "generate", "left_pad", "nonfinite", "prefill"]

#: ``callback(row, token)`` is called for every new token; returning True stops that row. With ``generate``'s
#: ``logprobs``, ``callback(row, token, logprob)`` (a :class:`~hybridlm.infer.logprobs.TokenLogprob`).
TokenCallback = Callable[[int, int], "bool | None"]


#: Seeds accepted: 64-bit signed integers (torch takes them all, a negative one as its two's complement;
#: its CPU generator, a Mersenne twister, reads only the low 32 bits, so seeds 2**32 apart sample alike there).
SEED_RANGE = (-(2**63), 2**63 - 1)
#: ``frequency_penalty`` and ``presence_penalty`` lie in [-PENALTY_LIMIT, PENALTY_LIMIT]: OpenAI's range (vLLM's too).
PENALTY_LIMIT = 2.0


def _whole(x) -> bool:
    """An integer (int, numpy or 0-d integer tensor), not a bool or a float."""
    try:
        return not isinstance(x, bool) and isinstance(operator.index(x), int)
    except TypeError:
        return False


def _real(x) -> bool:
    """A real number (a Python or numpy number, or a one-element tensor), not a bool."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and x.dtype != torch.bool and not x.is_complex()
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _seed_ok(seed) -> bool:
    return seed is None or (_whole(seed) and SEED_RANGE[0] <= operator.index(seed) <= SEED_RANGE[1])


def _integer(name: str, value, low: int | None = None) -> int:
    """``value`` as an int (see :func:`_whole`), at least ``low``; ValueError naming ``name`` otherwise."""
    if not _whole(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and operator.index(value) < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return operator.index(value)


def check_sampling(
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seed: int | None = None,
    name: Callable[[str], str] = str,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    min_p: float = 0.0,
) -> None:
    """Refuse sampling settings :class:`Sampler` cannot use (NaN included): ValueError naming the
    setting as ``name(parameter)`` (the CLI passes its flags)."""
    for ok, param, rule, value in (
        (_real(temperature) and 0 <= temperature < float("inf"), "temperature", ">= 0 and finite", temperature),
        (_whole(top_k) and top_k >= 0, "top_k", "an integer >= 0", top_k),
        (_real(top_p) and 0 < top_p <= 1, "top_p", "in (0, 1]", top_p),
        (_real(min_p) and 0 <= min_p <= 1, "min_p", "in [0, 1]", min_p),
        (
            _real(repetition_penalty) and 0 < repetition_penalty < float("inf"),
            "repetition_penalty",
            "> 0 and finite",
            repetition_penalty,
        ),
        (_seed_ok(seed), "seed", "None or an integer in [-2**63, 2**63 - 1]", seed),
        *(
            (
                _real(value) and -PENALTY_LIMIT <= value <= PENALTY_LIMIT,
                param,
                f"in [-{PENALTY_LIMIT}, {PENALTY_LIMIT}]",
                value,
            )
            for param, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty))
        ),
    ):
        if not ok:
            shown = repr(value) if isinstance(value, str) else value  # ("got 0.5" for the text '0.5' read as a number)
            raise ValueError(f"{name(param)} must be {rule}, got {shown}")


def check_logit_bias(logit_bias: Mapping[int, float] | None, vocab: int | None = None) -> dict[int, float]:
    """``logit_bias`` as a {token id: bias} dict of ints and floats (None: {}); ValueError naming the entry that is
    not a token id (an integer >= 0, below ``vocab`` where given) with a finite bias."""
    if logit_bias is None:
        return {}
    if not isinstance(logit_bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token ids to biases, got {logit_bias!r}"[:200])
    checked = {}
    for token, bias in logit_bias.items():
        if not _whole(token) or token < 0 or (vocab is not None and token >= vocab):
            where = f"[0, {vocab})" if vocab is not None else ">= 0"
            raise ValueError(f"logit_bias: {token!r} is not a token id (an integer in {where})")
        if not (_real(bias) and math.isfinite(bias)):
            raise ValueError(f"logit_bias: the bias of token {token} must be a finite number, got {bias!r}")
        checked[operator.index(token)] = float(bias)
    return checked


class Sampler:
    """Picks the next token of each row from its logits: the penalties, then greedy or sampling.

    Args:
        temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: sample among the k most likely tokens (0 = all; tokens tied with the k-th are kept, as in
            transformers).
        top_p: sample from the smallest set of tokens whose probability reaches ``top_p`` (1 = all; among tied
            tokens the lower id first: :func:`~hybridlm.ops.top_p.top_p_filter`).
        min_p: sample among the tokens at least ``min_p`` times as likely as the most likely one (0 = all; vLLM's
            and transformers' ``min_p``; keyword-only, as are the three below).
        logit_bias: {token id: bias} added to the model's logits before anything else (OpenAI's ``logit_bias``:
            -100 bans a token, 100 all but forces it; greedy rows too). None or {}: none.
        repetition_penalty: CTRL-style: logits of tokens already in the row (prompt or output)
            are divided by it when positive, multiplied when negative (1 = off).
        seed: seed of the sampling generator (None = nondeterministic).
        frequency_penalty, presence_penalty: OpenAI's, after the repetition penalty: a token's logit loses
            ``frequency_penalty`` times the number of times the row's output holds it, and ``presence_penalty`` once
            if it holds it at all (the output only, not the prompt, as OpenAI and vLLM count; each in [-2, 2], 0 =
            off; negative values favour repeating).
    """

    def __init__(
        self,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = 0,
        device: torch.device | str = "cpu",
        *,
        min_p: float = 0.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
    ) -> None:
        check_sampling(
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            min_p=min_p,
        )
        self.temperature, self.top_k, self.top_p = float(temperature), operator.index(top_k), float(top_p)
        self.min_p = float(min_p)
        self.logit_bias = check_logit_bias(logit_bias)
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, biases) on the logits' device
        self.repetition_penalty = float(repetition_penalty)
        self.frequency_penalty, self.presence_penalty = float(frequency_penalty), float(presence_penalty)
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(operator.index(seed))
        self.seen: torch.Tensor | None = None  # (B, V) bool, for the repetition penalty
        self.counts: torch.Tensor | None = None  # (B, V) int32: each output token's count, for the other two

    @property
    def counting(self) -> bool:
        """Whether a frequency or presence penalty reads each row's output counts."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def observe(self, rows: Sequence[Sequence[int]] | torch.Tensor, vocab: int, device) -> None:
        """Record tokens already present in each row (the prompts, then every picked token: a (B,) tensor, which
        the output counts take too)."""
        if self.counting and isinstance(rows, torch.Tensor):
            if self.counts is None:
                self.counts = torch.zeros(len(rows), vocab, dtype=torch.int32, device=device)
            self.counts.scatter_add_(1, rows.view(-1, 1).to(device), self.counts.new_ones(len(rows), 1))
        if self.repetition_penalty == 1.0:
            return
        if self.seen is None:
            self.seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        if isinstance(rows, torch.Tensor):
            self.seen.scatter_(1, rows.view(-1, 1).to(device), True)
        else:
            for i, row in enumerate(rows):
                if len(row):
                    self.seen[i, torch.tensor(list(row), device=device)] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, V) -> (B,) int64 token ids."""
        return self.pick(logits)[0]

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: (B, V) -> (B,) int64 token ids and the (B,) bool :func:`nonfinite` flags of the rows, both left on
        the device: the caller reads them back together, so the check costs no synchronization of its own. A flagged
        row's token means nothing."""
        bad = nonfinite(logits)
        return self.pick_rows(logits, bad, self.seen, self.counts), bad

    def pick_rows(
        self, logits: torch.Tensor, bad: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """logits: (B, V), bad: their (B,) :func:`nonfinite` flags, seen: (B, V) bool, the tokens each row holds
        (None: no repetition penalty), counts: (B, V) integers, each token's count in the row's output (None: none
        yet) -> (B,) int64 token ids (a decode batch picks each group of rows with its own sampler)."""
        logits = self.adjusted(logits, seen, counts)
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        return self.draw(self.probabilities(logits, bad))

    def adjusted(
        self, logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """logits: (B, V) -> the (B, V) logits a token is picked from (the argmax, or :meth:`probabilities`' input):
        in float32 (float64 in a float64 model), with the logit bias and the penalties (``seen``, ``counts``: as
        :meth:`pick_rows` takes them)."""
        # float32 (bf16 logits), float64 in a float64 model: rounding its logits to float32 made near-tied
        # ones equal, and argmax then took the lower id where the full forward (and speculation) did not.
        logits = logits.to(accumulation_dtype(logits))
        if self.logit_bias:  # (out of place: the caller's logits are read again for the logprobs)
            if self._bias is None or self._bias[1].device != logits.device or self._bias[1].dtype != logits.dtype:
                ids, biases = zip(*self.logit_bias.items())
                self._bias = (
                    torch.tensor(ids, device=logits.device),
                    torch.tensor(biases, device=logits.device, dtype=logits.dtype),
                )
            ids, biases = self._bias
            logits = logits.index_add(1, ids, biases.expand(len(logits), -1))
        if seen is not None and self.repetition_penalty != 1.0:
            penalized = torch.where(logits > 0, logits / self.repetition_penalty, logits * self.repetition_penalty)
            # A penalty beyond float32's range (1e-300, 1e300) divides by 0 or multiplies by inf: the logits become
            # inf (then inf - inf = NaN below), or NaN (0 * inf); the largest finite ones instead, and 0 stays 0.
            logits = torch.where(seen, penalized.nan_to_num(nan=0.0, neginf=float("-inf")), logits)
        if counts is not None and self.counting:  # (OpenAI's formula; counts are exact in the logits' float)
            counts = counts.to(logits.dtype)
            logits = logits - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def probabilities(self, logits: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """:meth:`adjusted` logits (B, V) and their (B,) :func:`nonfinite` flags -> the (B, V) probabilities a token is
        sampled from (temperature > 0): after the temperature, top-k, min-p and top-p."""
        # A flagged row samples uniformly instead: multinomial on its NaN probabilities fails inside the kernel (on
        # CUDA a device-side assert, which ends the process's use of the GPU), before the caller can name the row.
        logits = logits.masked_fill(bad[:, None], 0.0)
        # The best logit becomes 0 first, so that a tiny temperature gives -inf, not inf - inf = NaN; one below
        # float32's smallest normal number (1e-300 is 0 in float32, and 0 / 0 is NaN) divides as that number.
        logits = (logits - logits.amax(-1, keepdim=True)) / max(self.temperature, torch.finfo(logits.dtype).tiny)
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.min_p > 0.0:  # (p < min_p * p_max, as logits after the shift above: logit < log(min_p))
            logits = logits.masked_fill(logits < math.log(self.min_p), float("-inf"))
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        return logits.softmax(-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, V) probabilities -> (B,) int64 token ids drawn from them with this sampler's generator, on ``probs``'
        device."""
        return torch.multinomial(probs.to(self.generator.device), 1, generator=self.generator).view(-1).to(probs.device)


def generate(
    model: torch.nn.Module,
    prompts: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = 0,
    use_cache: bool = True,
    *,
    speculative: str | None = None,
    draft_tokens: int | None = None,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    min_p: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    prefill_chunk_size: int = 2048,
    callback: TokenCallback | None = None,
    stats: dict | None = None,
    cuda_graph: bool = False,
    logprobs: int | None = None,
    prefilled: tuple[InferenceCache, torch.Tensor] | None = None,
    prefix_store: PrefixStore | None = None,
    graphs: DecodeGraphs | None = None,
    speculative_session=None,
) -> list[int] | list[list[int]]:
    """Continue one prompt or a batch of prompts.

    Args:
        prompts: one list of token ids, or a list of such lists (any lengths); a tensor or numpy array of ids
            counts as those lists (a 2-D one is a batch).
        max_new_tokens: new tokens per prompt at most.
        temperature, top_k, top_p, min_p, repetition_penalty, seed, frequency_penalty, presence_penalty,
        logit_bias: see :class:`Sampler`. Greedy at temperature 0 (the logit bias and the penalties apply there
            too).
        eos_id: a row stops after this token, or after any of these tokens (a list, as a Hugging Face
            ``generation_config.json``'s ``eos_token_id`` may be: an instruct model's end-of-turn beside its
            end-of-text). An empty prompt starts from the first.
        use_cache: False reruns the full forward for every token (the exact reference).
        speculative: ``"mtp"``: the model's MTP depths draft tokens that the main model verifies
            in one forward (prompts run one at a time). Greedy output equals plain greedy; sampled output (any
            temperature, top-k/top-p/min-p, penalties, logit bias) has plain sampling's distribution (speculative
            sampling), not its tokens for a seed.
        draft_tokens: with ``speculative``, tokens drafted per round, from the first depths (default, and
            at most: one per MTP depth). Deeper drafts are accepted less often; fewer can be faster.
        speculative_session: with ``speculative`` and one prompt, a
            :class:`~hybridlm.infer.speculative.SpeculativeSession`: the prompt runs from its caches where it begins
            with their tokens (a chat's next turn), and leaves them holding it and its answer.
        prefill_chunk_size: prompts are prefilled in chunks of this many tokens. Prompts of a batch that begin alike
            (64 tokens or more: a few-shot batch, samples of one prompt) run what they share once
            (:mod:`~hybridlm.infer.prefixes`), each row's tokens still those it takes alone.
        callback: ``callback(row, token)`` for every new token as it is picked (streaming);
            returning True stops that row.
        stats: if given, filled with ``prefill_tokens``, ``prefill_seconds`` (the prompts' forwards; with
            ``speculative``, the MTP depths' first pass over the prompt too), ``decode_tokens``,
            ``decode_seconds`` (from then until the last token) and, with ``speculative``, ``drafted``,
            ``accepted``, ``acceptance_rate`` and ``verify_steps``.
        cuda_graph: replay the decode step as a CUDA graph (CUDA only, cached, not speculative). The batch's rows and
            positions are rounded up to powers of two (free rows decode too, their tokens dropped).
        logprobs: an integer k >= 0: ``callback`` is called as ``callback(row, token, logprob)`` instead, ``logprob``
            a :class:`~hybridlm.infer.logprobs.TokenLogprob`: the token's log_softmax of the raw logits it was picked
            from (before temperature, top-k/top-p and the penalty) and the k most likely (id, logprob). Needs a
            callback (with ``speculative``, from the verify's logits: a kept draft's as any other token's). None
            (default): nothing is computed.
        prefilled: (cache, logits): the prompts already run through the model, from
            :func:`~hybridlm.infer.logprobs.prefill_scored` over these same prompts (a cache that holds them
            left-padded, and the (B, V) logits of their last positions). Decoding starts from them, so a prompt
            scored and then continued runs through the model once. Cached decoding only, not ``speculative``.
        prefix_store: a :class:`~hybridlm.infer.prefix_store.PrefixStore` (``hybridlm serve``'s prefix cache): a
            prompt that begins with one of its kept states runs only the rest, the prefixes the prompts share with
            its recent prompts are kept in it, and so is each row's state at its end (its prompt and tokens: a
            chat's next turn begins with them). Cached decoding only, not ``speculative``.
        graphs: with ``cuda_graph``, a :class:`~hybridlm.infer.cuda_graph.DecodeGraphs` of this model: the decode
            cache and its graph are taken from it where it keeps one of the batch's shape (no capture), and given back
            to it at the end for a later call (a server's batches, a chat's turns). None: captured for this call.

    Returns:
        The new tokens (without the prompt): a list for one prompt, a list of lists in prompt
        order for a batch.
    """
    eos_ids = _eos_ids(eos_id)
    single, rows = _normalize(prompts, eos_ids[0] if eos_ids else None)
    extras = dict(frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, min_p=min_p)
    check_sampling(temperature, top_k, top_p, repetition_penalty, seed, **extras)
    check_logit_bias(logit_bias)  # (its ids against the vocabulary below, once the model is known)
    max_new_tokens = _integer("max_new_tokens", max_new_tokens, 0)
    prefill_chunk_size = _integer("prefill_chunk_size", prefill_chunk_size, 1)
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
    if draft_tokens is not None:
        draft_tokens = _integer("draft_tokens", draft_tokens, 1)
        if not speculative:
            raise ValueError(f"draft_tokens ({draft_tokens}) needs speculative='mtp'")
    if speculative:  # refused whatever max_new_tokens is
        if cuda_graph:
            raise ValueError("cuda_graph is not supported with speculative decoding")
        if not len(getattr(model, "mtp", ())):
            raise ValueError("speculative='mtp' needs a model with MTP depths (a pattern with '/')")
    if callback is not None and not callable(callback):  # (failed at the first token, after the prefill)
        raise ValueError(f"callback must be a function callback(row, token), got {callback!r}")
    if logprobs is not None:
        logprobs = _integer("logprobs", logprobs, 0)
        if callback is None:  # (where else would they go)
            raise ValueError("logprobs are given to the callback: pass callback(row, token, logprob)")
    # A model built on meta has shapes and no values: torch failed far from the cause, naming nothing ("META device
    # type not an accelerator", from the sampler's generator; a partly meta model, inside a matmul).
    refuse_meta({**dict(model.named_parameters()), **dict(model.named_buffers())}, "cannot generate", ValueError)
    if not getattr(model, "is_whole", True):  # (failed inside the forward: "'NoneType' object is not subscriptable")
        raise ValueError(
            "generate needs the whole model, but this one is a pipeline stage (some blocks, the embedding or the final "
            "norm are missing); load the saved weights whole (hybridlm.load) and generate with that model"
        )
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    # eos_id first: an empty prompt starts from it, and was blamed for holding it ("prompt 0: token ids [500]").
    for eos in eos_ids:
        if not 0 <= eos < vocab:
            raise ValueError(f"eos_id {eos} is outside the vocabulary [0, {vocab})")
    extras["logit_bias"] = check_logit_bias(logit_bias, vocab)
    for i, row in enumerate(rows):
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    sampler = Sampler(temperature, top_k, top_p, repetition_penalty, seed, device, **extras)
    stats = {} if stats is None else stats
    stats.update(prefill_tokens=0, prefill_seconds=0.0, decode_tokens=0, decode_seconds=0.0)
    if speculative:
        stats.update(drafted=0, accepted=0, verify_steps=0, acceptance_rate=0.0)
    if not use_cache and (speculative or cuda_graph):
        raise ValueError("speculative decoding and cuda_graph decode with the cache: leave use_cache=True")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs the model on a CUDA device, not {device}")
    if graphs is not None and (not cuda_graph or graphs.model is not model):
        why = "needs cuda_graph=True" if not cuda_graph else "were made for another model"
        raise ValueError(f"graphs (decode caches kept with their CUDA graphs) {why}")
    if prefilled is not None:
        _check_prefilled(prefilled, rows, vocab, speculative, use_cache)
    if prefix_store is not None and (speculative or not use_cache):
        raise ValueError("prefix_store keeps and reads the cache's states: leave use_cache=True and speculative=None")
    if speculative_session is not None:
        from .speculative import SpeculativeSession

        if not isinstance(speculative_session, SpeculativeSession) or not speculative or len(rows) != 1:
            raise ValueError(
                "speculative_session: a hybridlm.infer.speculative.SpeculativeSession, with speculative='mtp' and one "
                f"prompt (got {type(speculative_session).__name__}, speculative={speculative!r}, {len(rows)} prompts)"
            )
    was_training = model.training
    model.eval()
    try:
        with inference(model):
            if max_new_tokens == 0 or not rows:
                out = [[] for _ in rows]
            elif speculative == "mtp":
                from .speculative import mtp_generate

                out = [
                    mtp_generate(
                        model,
                        row,
                        max_new_tokens,
                        eos_ids,
                        prefill_chunk_size,
                        _row_callback(callback, i),
                        stats,
                        draft_tokens=draft_tokens,
                        row=i,
                        sampler=sampler,
                        session=speculative_session,
                        logprobs=logprobs,
                    )
                    for i, row in enumerate(rows)
                ]
            elif not use_cache:
                out = _generate_uncached(model, rows, max_new_tokens, sampler, eos_ids, callback, stats, logprobs)
            else:
                out = _generate_cached(
                    model,
                    rows,
                    max_new_tokens,
                    sampler,
                    eos_ids,
                    prefill_chunk_size,
                    callback,
                    stats,
                    cuda_graph,
                    logprobs,
                    prefilled,
                    prefix_store,
                    graphs,
                )
    finally:
        model.train(was_training)
    return out[0] if single else out


def _plain(x):
    """A tensor or numpy array (of any rank) as Python lists and ints; anything else unchanged."""
    return x.tolist() if isinstance(x, torch.Tensor) or type(x).__module__ == "numpy" else x


def _token(t) -> int:
    try:  # ints, numpy or 0-d integer tensors; not floats (truncated), text or bools (a mask, not ids)
        if isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
            raise TypeError
        return operator.index(t)
    except TypeError:
        raise ValueError(f"prompts are token ids (integers): got {t!r}; encode text with the tokenizer first") from None


def _normalize(prompts, eos_id: int | None) -> tuple[bool, list[list[int]]]:
    # A (B, L) tensor or array is a batch even of no rows: its tolist() is [], which reads as one empty prompt.
    batch_array = getattr(prompts, "ndim", None) == 2
    prompts = _plain(prompts)
    if not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a list of token ids or a list of such lists, got {prompts!r}")
    prompts = [_plain(p) for p in prompts]
    single = not batch_array and (not prompts or not isinstance(prompts[0], (list, tuple)))
    for i, p in enumerate(prompts if not single else ()):
        if not isinstance(p, (list, tuple)):
            raise ValueError(f"prompt {i}: a batch is a list of token-id lists, got {p!r}")
    rows = [prompts] if single else [list(p) for p in prompts]
    rows = [[_token(t) for t in r] for r in rows]
    # An empty prompt starts from the end-of-text token (or 0), as the uncached loop always did.
    rows = [r or [eos_id if eos_id is not None else 0] for r in rows]
    return single, rows


def _row_callback(callback: TokenCallback | None, row: int) -> TokenCallback | None:
    """``callback`` for one prompt run alone as row 0 (speculation): its calls name prompt ``row``, with the logprob
    as third argument where one is given."""
    if callback is None:
        return None
    return lambda _, token, *logprob: callback(row, token, *logprob)


def _eos_ids(eos_id) -> tuple[int, ...]:
    """``generate``'s ``eos_id`` (None, an id, or a sequence of ids) as a tuple of ids, in the order given."""
    if eos_id is None:
        return ()
    if _whole(eos_id):
        return (operator.index(eos_id),)
    eos_id = _plain(eos_id)
    if not isinstance(eos_id, (list, tuple)) or not eos_id or not all(_whole(e) for e in eos_id):
        raise ValueError(f"eos_id must be a token id or a non-empty list of token ids, got {eos_id!r}")
    return tuple(operator.index(e) for e in eos_id)


def _per_row(callback: TokenCallback, row: int):
    """``generate``'s ``callback(row, token[, logprob])`` as row ``row``'s ``on_token(token, logprob)`` of a
    :class:`DecodeBatch` (the logprob passed only where asked for)."""
    return lambda token, logprob: callback(row, token) if logprob is None else callback(row, token, logprob)


def _accept(
    out: list[int], token: int, row: int, eos_ids: tuple[int, ...], callback, logprob: TokenLogprob | None = None
) -> bool:
    """Append ``token``; True when the row is finished (``callback`` said so, or ``token`` is in ``eos_ids``).
    ``logprob`` (given where ``generate`` was asked for them) goes to the callback as its third argument."""
    out.append(token)
    if callback is None:
        stop = False
    else:
        stop = bool(callback(row, token) if logprob is None else callback(row, token, logprob))
    return stop or token in eos_ids


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int | None) -> list[TokenLogprob | None]:
    """Each row's :class:`TokenLogprob` for ``tokens`` picked from ``logits`` (B, V); Nones where ``k`` is None."""
    if k is None:
        return [None] * len(tokens)
    return to_host(*(t.tolist() for t in pick_logprobs(logits, tokens, k)))


def _generate_uncached(model, rows, max_new_tokens, sampler, eos_ids, callback, stats, logprobs) -> list[list[int]]:
    """The reference: each row's logits from the full forward over that row alone (no padding, no cache), the
    rows stepped together so that the sampler draws for the whole batch at each step, as the cached loop does
    (sampled rows one after the other drew other numbers than the cached batch with the same seed)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    seqs = [torch.tensor([row], device=device) for row in rows]
    sampler.seen = sampler.counts = None
    sampler.observe(rows, vocab, device)
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    lens = [len(row) for row in rows]
    last: list[torch.Tensor | None] = [None] * len(rows)
    t0 = _sync(device)
    for step in range(max_new_tokens):
        for r, ids in enumerate(seqs):
            if not done[r]:  # a finished row is sampled still (its token dropped), as in the cached batch
                # The last position's logits only: all of them were (1, L, V) float32 per row and step, and as
                # many again per MTP depth (2 GB at a 4,096-token prompt and a 131,072-token vocabulary).
                last[r] = model(ids, logits_to_keep=1).logits[:, -1]
        logits = torch.cat(last)
        tokens, bad = sampler.pick(logits)
        sampler.observe(tokens, vocab, device)
        if step == 0:
            t1 = _sync(device)
            stats["prefill_tokens"] += sum(len(row) for row in rows)
            stats["prefill_seconds"] += t1 - t0
        check_finite(bad.tolist(), done, lens, [len(new) for new in out])
        infos = _logprobs(logits, tokens, logprobs)
        for r, token in enumerate(tokens.tolist()):
            if not done[r]:
                done[r] = _accept(out[r], token, r, eos_ids, callback, infos[r])
                seqs[r] = torch.cat([seqs[r], torch.tensor([[token]], device=device)], dim=1)
        if all(done):
            break
    stats["decode_tokens"] += sum(len(new) - 1 for new in out)
    stats["decode_seconds"] += _sync(device) - t1
    return out


def _check_prefilled(prefilled, rows: list[list[int]], vocab: int, speculative, use_cache: bool) -> None:
    """Refuse a ``prefilled`` that cannot hold ``rows``: its cache must have a row per prompt and the longest
    prompt's positions, its logits (rows, vocab)."""
    if speculative or not use_cache:
        raise ValueError("prefilled prompts are decoded with the cache: leave use_cache=True and speculative=None")
    if not (isinstance(prefilled, tuple) and len(prefilled) == 2 and isinstance(prefilled[0], InferenceCache)):
        raise ValueError("prefilled must be (cache, logits), as prefill_scored returns them (after its scores)")
    cache, logits = prefilled
    longest = max((len(row) for row in rows), default=0)
    if cache.batch != len(rows) or cache.offset != longest:
        raise ValueError(
            f"prefilled holds {cache.batch} row(s) of {cache.offset} position(s), but the prompts are "
            f"{len(rows)} of at most {longest} tokens: prefill these same prompts"
        )
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(rows), vocab):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"prefilled logits must be a ({len(rows)}, {vocab}) tensor, got {got}")


def _generate_cached(
    model,
    rows,
    max_new_tokens,
    sampler,
    eos_ids,
    chunk_size,
    callback,
    stats,
    cuda_graph,
    logprobs,
    prefilled=None,
    store=None,
    graphs=None,
):
    """The prompts prefilled together, left-padded, then decoded one token per row per step (a finished row
    decodes on, its tokens dropped, until every row has finished): one admission of a :class:`DecodeBatch`
    (``prefilled``: the prompts' cache and last logits, from a forward already run; else prompts that begin alike,
    or begin with a state ``store`` keeps, run what they share once, :func:`~hybridlm.infer.prefixes.prefill_shared`;
    ``store`` keeps each row's state at its end too)."""
    device = next(model.parameters()).device
    B, P = len(rows), max(len(row) for row in rows)
    if prefilled is None and (B > 1 or store is not None):  # (a few-shot batch, samples of one prompt, a chat)
        t0 = _sync(device)
        prefilled = prefill_shared(model, rows, store, chunk_size=chunk_size)
        stats["prefill_seconds"] += _sync(device) - t0
    on_end = None if store is None else keep_answers(model, store)
    with cache_allocation(B, P, max_new_tokens):
        batch = DecodeBatch(
            model, B, P + max_new_tokens, sampler, eos_ids, chunk_size, cuda_graph, stats, on_end=on_end, graphs=graphs
        )
    callbacks = [None if callback is None else _per_row(callback, r) for r in range(B)]
    admitted = batch.admit(rows, [max_new_tokens] * B, callbacks, [logprobs] * B, prefilled=prefilled)
    t1 = _sync(device)
    while batch.live:
        batch.step()
    batch.close()
    stats["decode_tokens"] += batch.steps * B
    stats["decode_seconds"] += _sync(device) - t1
    return [row.out for row in admitted]
