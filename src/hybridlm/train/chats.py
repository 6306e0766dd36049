"""Conversations as training documents (``hybridlm prepare --jsonl-field messages``): a record's messages written out
by a chat template, and only the assistant's turns learned.

A JSON Lines record whose field holds a list of ``{role, content}`` messages (the chat completions shape) is a
:class:`ChatDocument`. :func:`chat_pieces` writes it as the template writes it for training (no generation prompt
after it) and cuts the text into pieces: each assistant turn, from where the template's generation prompt ends to
where the template ends that turn (its end-of-turn text included: the model learns to stop), is learned; the rest
(system and user turns, the template's markup) is context. The conversation is then tokenized whole, as its prompt is
at generation (:mod:`hybridlm.train.data`), and a token is learned where its first character is in an answer.

The template comes from the caller (:class:`ChatFormat`): it and the message rules are the serving side's
(:mod:`hybridlm.infer.chat_template`, :func:`hybridlm.infer.chat.check_messages`), which this level does not import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DataError


@dataclass(frozen=True)
class ChatDocument:
    """A conversation read from a corpus: its ``messages`` as the record holds them (checked when written out), and
    ``where`` it was read (``file:line``), for errors."""

    messages: object
    where: str


@dataclass(frozen=True)
class ChatFormat:
    """How conversations become text: ``render(messages, add_generation_prompt) -> str`` (a chat template's; a
    ValueError where it refuses them) and ``check(value) -> messages`` (the messages a record holds, checked and in
    the form the template reads; a ValueError saying what is wrong)."""

    render: Callable[[list[dict], bool], str]
    check: Callable[[object], list[dict]]


def chat_pieces(doc: ChatDocument, chats: ChatFormat) -> list[tuple[str, bool]]:
    """The text of ``doc`` as ``chats`` writes it, in pieces ``(text, learned)`` whose texts join into the whole
    conversation's; ``learned``: an assistant turn. DataError naming ``doc.where`` for messages the rules or the
    template refuse, and for a template that writes an earlier turn otherwise once later ones follow it (Qwen3's
    drops the thinking of answers before the last question), whose turns cannot be cut out of the whole."""
    try:
        messages = chats.check(doc.messages)
        whole = chats.render(messages, False)
        pieces, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            opened, closed = chats.render(messages[:i], True), chats.render(messages[: i + 1], False)
            if not (opened.startswith(done) and closed.startswith(opened) and whole.startswith(closed)):
                raise DataError(
                    f"{doc.where}: the chat template writes the conversation before its answer {i} (messages[{i}]) "
                    "otherwise once the answer follows, so the answer's tokens cannot be told from the rest; give each "
                    "answer a record of its own, the conversation before it as its messages"
                )
            pieces += [(opened[len(done) :], False), (closed[len(opened) :], True)]
            done = closed
    except ValueError as e:  # (the rules', the template's)
        if isinstance(e, DataError) and str(e).startswith(doc.where):
            raise
        raise DataError(f"{doc.where}: {e}") from None
    pieces.append((whole[len(done) :], False))
    return [(text, learned) for text, learned in pieces if text]
