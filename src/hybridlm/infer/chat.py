"""The OpenAI chat completions API as ``hybridlm serve`` answers it (``POST /v1/chat/completions``): a body checked
into a :class:`ChatRequest`, the bodies of its answer and stream chunks, and what a model folder gives the route
(:class:`Chat`: its chat template and the ids that end a turn).

A chat request is a completion request whose prompt is the conversation rendered by the model's chat template
(:mod:`hybridlm.infer.chat_template`) and tokenized as transformers tokenizes a chat prompt (no special tokens
added: the template writes them). The fields both APIs share are checked by :func:`~hybridlm.infer.api.parse_request`
itself, so the two routes take and refuse them alike; a chat model ends its turn with a token of its own
(``<|im_end|>``), which ends the choice and is none of its text, as the end of document is. A template's own switches
(Qwen3's ``enable_thinking``) come as ``chat_template_kwargs``, vLLM's field: extra template variables, over the
server's defaults (``hybridlm serve --chat-template-kwargs``) key by key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.io import read_json
from . import api
from .api import CompletionRequest, RequestError, check_fields, check_model, parse_request
from .chat_template import (
    ChatFileError,
    ChatTemplate,
    ChatTemplateError,
    check_variables,
    find_chat_template,
    read_template_file,
    special_token_texts,
)
from .logprobs import TokenLogprob

#: Fields that :func:`~hybridlm.infer.api.parse_request` reads as they are, for the completions route too.
SHARED = tuple(f for f in api.FIELDS if f not in ("prompt", "max_tokens"))
#: Fields read besides :data:`NEUTRAL`'s: the completions route's, ``messages`` for its ``prompt``, and
#: ``max_completion_tokens`` beside ``max_tokens`` (its older name), and ``chat_template_kwargs`` (vLLM's and SGLang's).
FIELDS = (
    "messages",
    "max_completion_tokens",
    "max_tokens",
    "chat_template_kwargs",
    "logprobs",
    "top_logprobs",
    *SHARED,
)
#: OpenAI's chat fields taken only at the value that leaves the result unchanged (null is always taken): no tools
#: are given to the template, no JSON mode, nothing stored for OpenAI's evals (``store``), text out
#: (``modalities``): each at OpenAI's default, which a client may write.
NEUTRAL = {
    "tools": [],
    "tool_choice": "none",
    "response_format": {"type": "text"},
    "store": False,
    "modalities": ["text"],
}
#: The roles a message may have. Others are refused, not passed on: a template that does not know "developer" or
#: "tool" drops such a message without a word (Qwen's does), and tool results need tools, which are not served.
ROLES = ("system", "user", "assistant")
#: The keys a message may have (a null one is dropped first, as transformers drops it: a client that sends back an
#: answer's message sends ``tool_calls: null`` and ``refusal: null``). ``reasoning_content`` (an assistant's only: the
#: thinking a reasoning template such as Qwen3's writes back or drops) is also given as ``thinking``, as transformers
#: gives it (gpt-oss templates read that name).
MESSAGE_KEYS = ("role", "content", "name", "reasoning_content")
GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass
class ChatRequest(CompletionRequest):
    """A checked ``POST /v1/chat/completions``: one prompt, the rendered conversation's ids; answered in the chat
    API's shape."""


class Chat:
    """What the chat route needs of the served model: its ``template`` (None: it has none, and the route says so),
    ``stop_ids``, the ids that end a turn (:func:`end_of_turn_ids`), and ``template_kwargs``, the template variables
    a request's ``chat_template_kwargs`` overrides key by key (``--chat-template-kwargs``; checked: ValueError)."""

    def __init__(
        self,
        template: ChatTemplate | None,
        stop_ids: frozenset[int] = frozenset(),
        template_kwargs: dict | None = None,
    ) -> None:
        self.template, self.stop_ids = template, frozenset(stop_ids)
        self.template_kwargs = check_variables(template_kwargs or {})


def load_chat(folder: Path, tokenizer, template_file: Path | None = None, template_kwargs: dict | None = None) -> Chat:
    """The :class:`Chat` of model folder ``folder`` read with ``tokenizer``: ``template_file``'s template where one
    is given, else the folder's own (:func:`~hybridlm.infer.chat_template.find_chat_template`), given the folder's
    special tokens and the default ``template_kwargs``. ChatTemplateError naming the file for a template that cannot
    be read or compiled; ChatFileError (one) for the folder's other files (:func:`end_of_turn_ids`, the special
    tokens); ValueError for ``template_kwargs`` that :func:`~hybridlm.infer.chat_template.check_variables` refuses."""
    variables = special_token_texts(folder)
    if template_file is not None:
        found: tuple[str, str] | None = (read_template_file(template_file), str(template_file))
    else:
        found = find_chat_template(folder)
    template = None if found is None else ChatTemplate(*found, variables)
    return Chat(template, end_of_turn_ids(folder, tokenizer, variables.get("eos_token")), template_kwargs)


def end_of_turn_ids(folder: Path, tokenizer, eos_token: str | None = None) -> frozenset[int]:
    """The ids a chat turn ends at: ``generation_config.json``'s ``eos_token_id`` (an id or a list, where
    transformers' ``generate`` stops: an instruct model's end of turn beside its end of text), the tokenizer's end
    of document, and ``eos_token`` (tokenizer_config.json's, which templates such as Mistral's write after each
    answer) where it is one of the tokenizer's special tokens. ChatFileError (a ChatTemplateError) for a file that is
    not JSON, or an ``eos_token_id`` of another shape."""
    ids = {tokenizer.eos_id}
    file = folder / GENERATION_CONFIG_NAME
    if file.is_file():
        try:
            value = read_json(file, f"{file}: missing").get("eos_token_id")
        except ValueError as e:  # (CheckpointError: not JSON, not an object)
            raise ChatFileError(str(e)) from None
        values = value if isinstance(value, list) else [] if value is None else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ChatFileError(f"{file}: eos_token_id must be a token id or a list of them, got {value!r}")
        ids.update(values)
    if eos_token is not None and eos_token in tokenizer.special_tokens():
        ids.add(tokenizer.special_tokens()[eos_token])
    return frozenset(ids)


def _invalid(param: str, message: str) -> RequestError:
    return RequestError(400, f"{param}: {message}", param)


def _content(value, where: str) -> str:
    """A message's ``content``: a string, or a list of text parts (``{"type": "text", "text": ...}``) joined by
    newlines, as vLLM joins them; another part type is refused by its name."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _invalid("messages", f"{where} must be a string or a list of text parts, got {json.dumps(value)[:60]}")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = repr(kind) if isinstance(kind, str) else json.dumps(part)[:60]
            raise _invalid("messages", f"{where}[{i}]: part {shown} is not supported (text parts only)")
        if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
            raise _invalid("messages", f'{where}[{i}] must be {{"type": "text", "text": STRING}}')
        texts.append(part["text"])
    return "\n".join(texts)


def check_messages(value) -> list[dict]:
    """``messages`` as the template reads them: a non-empty list of ``{role, content[, name]}`` (an assistant's with
    ``reasoning_content``, also given as ``thinking``) with text content (parts joined, null keys dropped);
    RequestError 400 naming the message and key otherwise."""
    if not isinstance(value, list) or not value:
        raise _invalid(
            "messages", f"must be a non-empty list of {{role, content}} objects, got {json.dumps(value)[:60]}"
        )
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid("messages", f"{where} must be a {{role, content}} object, got {json.dumps(message)[:60]}")
        message = {k: v for k, v in message.items() if v is not None}
        extra = [k for k in message if k not in MESSAGE_KEYS]
        if extra:
            raise _invalid("messages", f"{where}.{extra[0]} is not supported (a message has {', '.join(MESSAGE_KEYS)})")
        role = message.get("role")
        if role not in ROLES:
            hint = " (send it as system)" if role == "developer" else ""
            raise _invalid("messages", f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}{hint}")
        if "content" not in message:
            raise _invalid("messages", f"{where}.content: missing")
        message["content"] = _content(message["content"], f"{where}.content")
        for key in ("name", "reasoning_content"):
            if not isinstance(message.get(key, ""), str):
                raise _invalid("messages", f"{where}.{key} must be a string")
        if "reasoning_content" in message and role != "assistant":
            raise _invalid("messages", f"{where}.reasoning_content: only an assistant message has one")
        for key, text in message.items():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON's lone surrogate escapes (\ud800)
                raise _invalid("messages", f"{where}.{key} is not UTF-8 text (a lone surrogate)") from None
        if "reasoning_content" in message:  # transformers' alias, first as it puts it
            message = {"thinking": message["reasoning_content"], **message}
        messages.append(message)
    return messages


def parse_chat_request(
    body: dict,
    chat: Chat | None,
    *,
    model_name: str,
    encode,
    vocab_size: int,
    max_tokens_limit: int,
    max_batch_size: int,
) -> ChatRequest:
    """Check a ``POST /v1/chat/completions`` body (a JSON object) field by field; RequestError naming the field.

    ``max_completion_tokens`` (or ``max_tokens``) defaults to ``max_tokens_limit``: a chat answer runs to its end of
    turn, as OpenAI's does, not to the completions route's 16 tokens. No template (``chat`` None or without one):
    400 ``chat_template_missing``."""
    check_fields(body, FIELDS, NEUTRAL)
    check_model(body, model_name)
    if chat is None or chat.template is None:
        raise RequestError(
            400,
            "this model has no chat template (its folder has no chat_template.jinja, chat_template.json or "
            "tokenizer_config.json chat_template; a model hybridlm trained with the byte tokenizer has none): start "
            "the server with --chat-template FILE, or send the prompt as text to /v1/completions",
            "messages",
            "chat_template_missing",
        )
    messages = check_messages(body.get("messages"))
    extra = body.get("chat_template_kwargs")
    try:
        extra = {**chat.template_kwargs, **check_variables({} if extra is None else extra)}
    except ValueError as e:
        raise _invalid("chat_template_kwargs", str(e)) from None
    try:
        prompt = chat.template.render(messages, extra)
    except ChatTemplateError as e:
        given = f" with chat_template_kwargs {json.dumps(extra)[:80]}" if extra else ""
        raise _invalid("messages", f"the chat template ({chat.template.where}) refused them{given}: {e}") from None
    try:
        ids = list(encode(prompt))
    except ValueError as e:  # (the tokenizer's DataError)
        raise _invalid("messages", f"their prompt cannot be tokenized: {e}") from None
    if not ids:
        raise _invalid("messages", "the chat template rendered them as no text")
    scoring = _logprobs(body)
    name, limit = _max_tokens(body, max_tokens_limit)
    shared = {k: body[k] for k in SHARED if k in body}
    try:
        request = parse_request(
            {**shared, "prompt": [ids], "max_tokens": limit},
            model_name=model_name,
            encode=encode,
            vocab_size=vocab_size,
            max_tokens_limit=max_tokens_limit,
            max_batch_size=max_batch_size,
        )
    except RequestError as e:
        if e.param != "max_tokens" or name == "max_tokens":
            raise
        raise _invalid(name, e.message.removeprefix("max_tokens: ")) from None
    return ChatRequest(**{**vars(request), "stop_ids": chat.stop_ids | request.stop_ids, "logprobs": scoring})


def _logprobs(body: dict) -> int | None:
    """The k of ``logprobs: true`` with ``top_logprobs: k`` (0 without it), None without ``logprobs``."""
    asked, k = body.get("logprobs"), body.get("top_logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise _invalid("logprobs", f"must be true or false, got {json.dumps(asked)[:60]}")
    api.check_logprobs_count("top_logprobs", k)
    if k and not asked:  # (OpenAI's rule: 0 alone is its default, taken)
        raise _invalid("top_logprobs", f"{k} needs logprobs: true")
    return (k or 0) if asked else None


def _max_tokens(body: dict, default: int) -> tuple[str, object]:
    """(the field the client named, its value, or ``default``) of ``max_completion_tokens`` and ``max_tokens``."""
    new, old = body.get("max_completion_tokens"), body.get("max_tokens")
    if new is not None and old is not None and new != old:
        raise _invalid(
            "max_completion_tokens", f"{new} and max_tokens {old} disagree; give one (max_tokens is its older name)"
        )
    if new is not None:
        return "max_completion_tokens", new
    return "max_tokens", default if old is None else old


def logprobs_body(scored: list[tuple[int, TokenLogprob | None]], piece, offset: int = 0) -> dict:
    """A chat choice's ``logprobs`` object, OpenAI's: ``{"content": [...], "refusal": null}``, per token its
    ``token`` (text), ``logprob``, ``bytes`` and ``top_logprobs`` (a list of the k most likely, each with its
    ``token``, ``logprob`` and ``bytes``). ``bytes`` are the text's UTF-8 bytes, null where the token is only part of
    a character (its decode alone gives U+FFFD, not its bytes). ``scored`` and ``piece`` as
    :func:`hybridlm.infer.api.logprobs_body`'s; ``offset`` is not part of this shape."""

    def entry(token: int, logprob: float) -> dict:
        text = piece(token)
        return {"token": text, "logprob": logprob, "bytes": None if "\ufffd" in text else list(text.encode())}

    content = [
        {**entry(token, s.logprob), "top_logprobs": [entry(i, v) for i, v in s.top]}
        for token, s in scored
        if s is not None
    ]
    return {"content": content, "refusal": None}


def chat_id(request_id: str) -> str:
    """A chat completion's id (``chatcmpl-...``, as OpenAI's) from a job's ``cmpl-...``."""
    return "chat" + request_id if request_id.startswith("cmpl-") else request_id


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    """A chat completion's choice: the assistant's message."""
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def delta(index: int, text: str, finish_reason: str | None) -> dict:
    """A stream chunk's choice: new text, or (``finish_reason`` set) none and how the choice ended."""
    change = {"content": text} if finish_reason is None else {}
    return {"index": index, "delta": change, "logprobs": None, "finish_reason": finish_reason}


def opening(index: int) -> dict:
    """The first chunk's choice of each choice, as OpenAI streams it: the role, and no text yet."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def completion(request_id: str, created: int, model: str, choices: list[dict], counts: dict | None) -> dict:
    """A ``chat.completion`` object (its ``usage`` where ``counts`` is given)."""
    return _object("chat.completion", request_id, created, model, choices, counts)


def chunk(request_id: str, created: int, model: str, choices: list[dict], counts: dict | None) -> dict:
    """A ``chat.completion.chunk`` object (its ``usage`` where ``counts`` is given)."""
    return _object("chat.completion.chunk", request_id, created, model, choices, counts)


def _object(kind: str, request_id: str, created: int, model: str, choices: list[dict], counts: dict | None) -> dict:
    body = {"id": chat_id(request_id), "object": kind, "created": created, "model": model, "choices": choices}
    if counts is not None:
        body["usage"] = counts
    return body
