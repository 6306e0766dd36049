"""The OpenAI completions API as ``hybridlm serve`` answers it: a request body checked field by field into a
:class:`CompletionRequest`, and the bodies of responses, stream chunks and errors.

No sockets and no model here: the HTTP layer (:mod:`hybridlm.infer.server`) reads the bytes, the batching worker
(:mod:`hybridlm.infer.batching`) runs the rows. A field the server cannot honour is refused by name rather than
ignored: a client that asked for ``n=2`` and got one plain text back would score or sample from
results it did not ask for, with nothing to tell it so.

``logprobs`` and ``echo`` are served (lm-evaluation-harness scores multiple-choice tasks with them): the values are
computed by :mod:`hybridlm.infer.logprobs`, and :func:`logprobs_body` writes them in OpenAI's shape.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass

from .generate import SEED_RANGE, check_sampling
from .logprobs import TokenLogprob

#: OpenAI's defaults for the completions endpoint (not the CLI's: ``hybridlm generate`` samples at 0.8).
DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
#: Stop strings per request at most. Not OpenAI's 4: HumanEval's (the Codex paper's) are five, lm-evaluation-harness
#: adds the end-of-text string to a task's, and vLLM takes any number. Each is searched in the text's tail once per
#: token; the bound only keeps that work small.
MAX_STOPS = 16
#: ``logprobs`` at most: OpenAI's cap is 5, vLLM's 20 (its default ``max_logprobs``); each is a decoded token in the
#: answer, per position.
MAX_LOGPROBS = 20
#: ``n`` (choices per prompt) at most: OpenAI's cap. Pass@k evaluations ask for many samples of one prompt; its
#: prefill runs once for them all where it is long enough to share (:data:`~hybridlm.infer.prefixes.SHARED_PREFIX`).
MAX_N = 128
#: OpenAI fields taken only at the value that leaves the result unchanged (null is always taken).
NEUTRAL = {
    "best_of": 1,
    "suffix": None,
}
#: ``stop_token_ids`` (vLLM's extension): at most this many ids.
MAX_STOP_TOKEN_IDS = 256
#: ``logit_bias``: at most this many tokens (OpenAI's limit), each biased by a number in [-LOGIT_BIAS, LOGIT_BIAS].
MAX_LOGIT_BIAS_TOKENS = 300
LOGIT_BIAS = 100
#: Fields read, besides :data:`NEUTRAL`'s; ``user`` (an end-user id for OpenAI's abuse monitoring) changes nothing.
FIELDS = (
    "model",
    "prompt",
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "seed",
    "stream",
    "stream_options",
    "user",
)
#: Fields of the completions route alone (the chat route reads its own ``logprobs``, a bool, with ``top_logprobs``).
SCORING = ("echo", "logprobs")


class RequestError(Exception):
    """A request the server answers with an error: HTTP ``status``, and the OpenAI error object's fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.kind)


def error_body(message: str, param: str | None = None, code: str | None = None, kind="invalid_request_error") -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _invalid(param: str, message: str) -> RequestError:
    return RequestError(400, f"{param}: {message}", param)


@dataclass(frozen=True)
class Sampling:
    """What one ``generate`` call decodes with: rows whose settings are equal can run as one batch. Greedy
    (temperature 0) reads none of top_k, top_p, min_p and seed, so they are left at their neutral values there; the
    penalties apply to greedy rows too."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_p: float = 0.0
    #: (token id, bias) pairs in id order: hashable, so that rows of equal biases batch together
    logit_bias: tuple[tuple[int, float], ...] = ()

    def options(self) -> dict:
        """The settings beyond the first five that are set (the penalties, ``min_p``, ``logit_bias``), as
        ``generate``'s and ``Sampler``'s keyword arguments (none where none is set: a ``generate`` given in place of
        the library's need not take them)."""
        given = {
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "min_p": self.min_p,
        }
        options: dict = {name: value for name, value in given.items() if value != 0.0}
        if self.logit_bias:
            options["logit_bias"] = dict(self.logit_bias)
        return options

    @property
    def seeded(self) -> bool:
        """Sampled from a stream the client seeded: rows from other requests would draw from it too (one
        generator per batch) and change its samples, so such a request runs in batches of its own."""
        return self.temperature > 0 and self.seed is not None


@dataclass
class CompletionRequest:
    """A checked ``POST /v1/completions``: one prompt (token ids) per choice, in order (with ``n`` > 1, each prompt
    ``n`` times in a row: choice ``i * n + j`` is prompt i's j-th)."""

    prompts: list[list[int]]
    max_tokens: int
    sampling: Sampling
    stops: list[str]
    stream: bool
    include_usage: bool
    #: Token ids that end a choice besides the tokenizer's end of document (a chat model's end of turn); none of
    #: the text, as that one is not.
    stop_ids: frozenset[int] = frozenset()
    #: The prompt's text starts each choice's (and with ``logprobs``, its tokens start the lists).
    echo: bool = False
    #: None: no log-probabilities; k: each token's, and the k most likely tokens' at its position.
    logprobs: int | None = None
    #: Choices per prompt (their prompt tokens count once in the usage).
    n: int = 1
    #: The end of document does not end a choice (vLLM's ``ignore_eos``: a benchmark's answers of a fixed length).
    ignore_eos: bool = False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_json(body: bytes) -> dict:
    """The request body as a JSON object; RequestError 400 for anything else (NaN and Infinity are not JSON)."""
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e) or type(e).__name__
        raise RequestError(400, f"the body is not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


def _prompts(value, encode: Callable[[str], list[int]], vocab_size: int) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of token-id lists; the ids of each."""
    shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _invalid("prompt", f"must be {shapes}, got {json.dumps(value)[:60]}")
    if all(_is_int(t) for t in value):
        value = [value]
    rows = []
    for i, item in enumerate(value):
        where = "prompt" if len(value) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:  # JSON's lone surrogate escapes (\ud800)
                raise _invalid("prompt", f"{where} is not UTF-8 text (a lone surrogate)") from None
            try:
                rows.append(list(encode(item)))
            except ValueError as e:  # (the tokenizer's DataError)
                raise _invalid("prompt", f"{where}: {e}") from None
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise _invalid("prompt", f"{where}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
            rows.append(list(item))
        else:
            raise _invalid("prompt", f"must be {shapes}; {where} is {json.dumps(item)[:60]}")
    return rows


def _logit_bias(value, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """``logit_bias``: a JSON object of token ids (as strings, as JSON writes keys) to numbers in
    [-:data:`LOGIT_BIAS`, :data:`LOGIT_BIAS`], at most :data:`MAX_LOGIT_BIAS_TOKENS` of them; null or {}: none."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _invalid("logit_bias", f"must be an object of token ids to biases, got {json.dumps(value)[:60]}")
    if len(value) > MAX_LOGIT_BIAS_TOKENS:
        raise _invalid("logit_bias", f"at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(value)}")
    pairs = []
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None
        if token is None or token >= vocab_size:
            raise _invalid("logit_bias", f"{json.dumps(key)[:40]} is not a token id (an integer in [0, {vocab_size}))")
        if not _is_number(bias) or not -LOGIT_BIAS <= bias <= LOGIT_BIAS:
            why = f"must be a number in [-{LOGIT_BIAS}, {LOGIT_BIAS}], got {json.dumps(bias)[:40]}"
            raise _invalid("logit_bias", f"the bias of token {token} {why}")
        pairs.append((token, float(bias)))
    return tuple(sorted(pairs))


def _stop_token_ids(value, vocab_size: int) -> frozenset[int]:
    """``stop_token_ids`` (vLLM's extension): null or a list of token ids that end a choice, none of its text."""
    if value is None:
        return frozenset()
    if not isinstance(value, list) or len(value) > MAX_STOP_TOKEN_IDS:
        raise _invalid(
            "stop_token_ids", f"must be a list of at most {MAX_STOP_TOKEN_IDS} token ids, got {json.dumps(value)[:60]}"
        )
    for token in value:
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise _invalid(
                "stop_token_ids", f"{json.dumps(token)[:40]} is not a token id (an integer in [0, {vocab_size}))"
            )
    return frozenset(value)


def _stops(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _invalid("stop", f"must be a string or a list of strings, got {json.dumps(value)[:60]}")
    if len(stops) > MAX_STOPS:
        raise _invalid("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    if not all(stops):
        raise _invalid("stop", "an empty string would end every text at once")
    return stops


def check_fields(body: dict, fields: tuple[str, ...], neutral: dict) -> None:
    """RequestError 400 naming the first field of ``body`` that is neither in ``fields`` nor in ``neutral``, or
    the first of ``neutral`` (name -> the value that changes nothing) given another value than its own or null."""
    unknown = [k for k in body if k not in fields and k not in neutral]
    if unknown:
        raise RequestError(
            400, f"{unknown[0]}: unknown field (this server reads {', '.join(fields + tuple(neutral))})", unknown[0]
        )
    for name, taken in neutral.items():
        value = body.get(name)
        # (0.0 == 0 and 1.0 == 1, but True == 1 too: a bool is not a count or a penalty)
        if value is not None and (value != taken or isinstance(value, bool) != isinstance(taken, bool)):
            raise _invalid(name, f"only {json.dumps(taken)} is supported, got {json.dumps(value)[:60]}")


def check_model(body: dict, model_name: str) -> None:
    """``model`` is optional; given, it must be ``model_name`` (RequestError 404 ``model_not_found`` otherwise)."""
    model = body.get("model")
    if model is not None and model != model_name:
        if not isinstance(model, str):
            raise _invalid("model", f"must be a string, got {json.dumps(model)[:60]}")
        raise RequestError(404, f"model: this server serves {model_name!r}, not {model!r}", "model", "model_not_found")


def check_logprobs_count(name: str, value) -> None:
    """How many most likely tokens a request asks for at each position (completions' ``logprobs``, chat's
    ``top_logprobs``): null or an integer in [0, :data:`MAX_LOGPROBS`]; RequestError naming ``name`` otherwise."""
    if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
        raise _invalid(name, f"must be null or an integer in [0, {MAX_LOGPROBS}], got {json.dumps(value)[:60]}")


def parse_request(
    body: dict,
    *,
    model_name: str,
    encode: Callable[[str], list[int]],
    vocab_size: int,
    max_tokens_limit: int,
    max_batch_size: int,
) -> CompletionRequest:
    """Check a ``POST /v1/completions`` body (a JSON object) field by field; RequestError naming the field.

    ``model`` is optional; given, it must be ``model_name`` (404 ``model_not_found`` otherwise, as OpenAI answers):
    a client that names another model would get this one's text. A null field takes its default."""
    check_fields(body, FIELDS + SCORING, NEUTRAL)
    check_model(body, model_name)
    if not isinstance(body.get("user", ""), (str, type(None))):
        raise _invalid("user", "must be a string")
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError(400, "prompt: missing (the text, or texts, to continue)", "prompt")
    prompts = _prompts(body["prompt"], encode, vocab_size)

    def get(name, default):
        value = body.get(name)
        return default if value is None else value

    n = get("n", 1)
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise _invalid("n", f"must be an integer in [1, {MAX_N}] (choices per prompt), got {json.dumps(n)[:60]}")
    prompts = [ids for ids in prompts for _ in range(n)]  # (each choice a row of its own; greedy ones are equal)

    # (with a limit below OpenAI's default, a request that gives none runs at the limit: it was refused, "got 16",
    # a number the client never sent)
    echo, logprobs = get("echo", False), body.get("logprobs")
    if not isinstance(echo, bool):
        raise _invalid("echo", f"must be true or false, got {json.dumps(echo)[:60]}")
    check_logprobs_count("logprobs", logprobs)
    max_tokens = get("max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_limit))
    least = 0 if echo else 1  # (max_tokens 0 with echo: the prompt alone, scored)
    if not _is_int(max_tokens) or not least <= max_tokens <= max_tokens_limit:
        # (no "0 with echo" hint: the chat route, which has no echo, words its max_tokens errors with this)
        raise _invalid(
            "max_tokens", f"must be an integer in [{least}, {max_tokens_limit}], got {json.dumps(max_tokens)}"
        )
    temperature, top_p = get("temperature", DEFAULT_TEMPERATURE), get("top_p", 1.0)
    top_k, penalty, seed = get("top_k", 0), get("repetition_penalty", 1.0), body.get("seed")
    frequency, presence, min_p = get("frequency_penalty", 0.0), get("presence_penalty", 0.0), get("min_p", 0.0)
    for name, value, ok in (
        ("temperature", temperature, _is_number),
        ("top_p", top_p, _is_number),
        ("min_p", min_p, _is_number),
        ("repetition_penalty", penalty, _is_number),
        ("frequency_penalty", frequency, _is_number),
        ("presence_penalty", presence, _is_number),
        ("top_k", top_k, _is_int),
        ("seed", seed, lambda v: v is None or _is_int(v)),
    ):
        if not ok(value):
            kind = "a number" if ok is _is_number else "an integer"
            raise _invalid(name, f"must be {kind}, got {json.dumps(value)[:60]}")
    try:
        check_sampling(
            temperature,
            top_k,
            top_p,
            penalty,
            seed,
            frequency_penalty=frequency,
            presence_penalty=presence,
            min_p=min_p,
        )
    except ValueError as e:  # "top_p must be in (0, 1], got 2": named by the field already
        raise RequestError(400, str(e), str(e).split()[0]) from None
    last = (len(prompts) - 1) // max_batch_size * max_batch_size
    if seed is not None and temperature > 0 and seed + last > SEED_RANGE[1]:  # (each batch draws from seed + start)
        raise _invalid("seed", f"must be at most {SEED_RANGE[1] - last} for {len(prompts)} prompts, got {seed}")
    stream = get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream", f"must be true or false, got {json.dumps(stream)[:60]}")
    options = get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _invalid("stream_options", f'must be {{"include_usage": BOOL}}, got {json.dumps(options)[:60]}')
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _invalid("stream_options", f"include_usage must be true or false, got {json.dumps(include_usage)}")
    if options and not stream:
        raise _invalid("stream_options", "is only read with stream: true")
    temperature = float(temperature)
    # (the penalties and the bias apply to greedy rows too; min_p, as top_k and top_p, to sampled ones only)
    extras = {
        "frequency_penalty": float(frequency),
        "presence_penalty": float(presence),
        "logit_bias": _logit_bias(body.get("logit_bias"), vocab_size),
    }
    sampling = (
        Sampling(0.0, 0, 1.0, float(penalty), None, **extras)
        if temperature == 0
        else Sampling(
            temperature, operator.index(top_k), float(top_p), float(penalty), seed, **extras, min_p=float(min_p)
        )
    )
    stops = _stops(body.get("stop"))
    ignore_eos = get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _invalid("ignore_eos", f"must be true or false, got {json.dumps(ignore_eos)[:60]}")
    stop_ids = _stop_token_ids(body.get("stop_token_ids"), vocab_size)
    return CompletionRequest(
        prompts,
        max_tokens,
        sampling,
        stops,
        stream,
        include_usage,
        stop_ids=stop_ids,
        echo=echo,
        logprobs=logprobs,
        n=n,
        ignore_eos=ignore_eos,
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's ``usage`` object; ``cached_tokens``: of the prompt tokens, those a state kept from an earlier request
    stood for (the prefix cache), under ``prompt_tokens_details`` as OpenAI's prompt caching reports them."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    """A completion's choice; its ``logprobs`` null until the server sets them (a request that asked for them)."""
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def logprobs_body(scored: list[tuple[int, TokenLogprob | None]], piece: Callable[[int], str], offset: int = 0) -> dict:
    """A choice's ``logprobs`` object, OpenAI's: ``tokens`` (each token's text), ``token_logprobs``, ``top_logprobs``
    (per token, {text: logprob} of the most likely tokens, the token itself added where it is not among them) and
    ``text_offset`` (where each token starts, counted as the lengths of the tokens' texts before it, as vLLM counts).

    Args:
        scored: (token id, its :class:`TokenLogprob`) per token of the choice, in order; None where nothing
            precedes the token (an echoed prompt's first), which gives a null logprob and top dict.
        piece: a token id's text (the tokenizer's decode of that id alone).
        offset: the first token's ``text_offset`` (a stream chunk's: the length of the texts of the tokens before).
    """
    tokens, values, tops, offsets, at = [], [], [], [], offset
    for token, scores in scored:
        text = piece(token)
        tokens.append(text)
        offsets.append(at)
        at += len(text)
        if scores is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(scores.logprob)
        top: dict[str, float] = {}
        others = scores.top if any(i == token for i, _ in scores.top) else (*scores.top, (token, scores.logprob))
        for i, value in others:  # two ids of one text (partial UTF-8 characters are all U+FFFD): the higher kept
            key = piece(i)
            top[key] = max(value, top.get(key, value))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def completion(request_id: str, created: int, model: str, choices: list[dict], counts: dict | None) -> dict:
    """A completion object (``object: "text_completion"``); a stream chunk is one too, with a choice's new text."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if counts is not None:
        body["usage"] = counts
    return body
