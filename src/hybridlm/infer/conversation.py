"""A chat held turn by turn in one process (``hybridlm chat``): the messages so far rendered by the model's chat
template, the assistant's answer generated until its end of turn, and the state after each answer kept, so that a
turn runs only what it adds.

Each turn renders the whole conversation and tokenizes it, as ``POST /v1/chat/completions`` and transformers'
``apply_chat_template`` do: what the model reads is exactly what a fresh forward over the conversation would read.
The :class:`~hybridlm.infer.prefix_store.PrefixStore` then finds the state after the previous answer (kept by
:func:`~hybridlm.infer.prefixes.keep_answers`), which the new prompt begins with, and only the rest runs: the end of
the answer's turn and the new message. Where it does not begin with it (a template that rewrites earlier turns,
Qwen3's dropping their thinking; an answer whose text tokenizes to other ids than the model took; fewer than
:data:`~hybridlm.infer.prefixes.SHARED_PREFIX` tokens) the turn runs whole, with the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .chat import Chat
from .completion import Completion, write_stdout
from .cuda_graph import DecodeGraphs
from .generate import check_logit_bias, check_sampling, generate
from .prefix_store import PrefixStore

#: States a conversation keeps by default: its last answer, the prefixes its turns were seen to share, one to spare.
KEPT_STATES = 4


@dataclass
class Turn:
    """One answer: its ``text`` (the end-of-turn token or stop string none of it), the ``tokens`` the model took (those
    included where it ended there), ``finish`` ("stop": its end of turn or a stop string; "length":
    ``max_new_tokens`` reached), ``prompt_tokens`` (the rendered conversation's ids), ``kept_tokens`` (of them, the
    positions a kept state stood for, not run) and ``seconds`` (the prompt's and the answer's)."""

    text: str
    tokens: list[int]
    finish: str
    prompt_tokens: int
    kept_tokens: int
    seconds: float
    drafted: int = 0  #: with speculation: tokens the MTP depths drafted, and of them those kept
    accepted: int = 0

    @property
    def run_tokens(self) -> int:
        """The prompt's positions that ran through the model this turn."""
        return self.prompt_tokens - self.kept_tokens


class Conversation:
    """A conversation with ``model`` read through ``tokenizer`` and ``chat`` (its template, end-of-turn ids and
    template variables): :meth:`reply` answers a user's message, :meth:`reset` starts over.

    ``system``: the system message that begins it (None: none). ``max_new_tokens``: an answer's tokens at most.
    ``stops``: strings that end an answer too, none of its text (a template's end-of-turn text that the tokenizer has
    no token for: ``<|im_end|>`` read by a byte tokenizer).
    Sampling as :func:`~hybridlm.infer.generate.generate` samples (greedy at ``temperature`` 0); turn ``n`` (from 0)
    draws from ``seed + n``, so that a session repeats but its turns differ. ``kept_states``: states kept across
    turns (0: none, every turn runs the whole conversation: the reference). ``speculative="mtp"`` (``draft_tokens``
    a round) drafts with the model's MTP depths as :func:`~hybridlm.infer.generate.generate` does; the main model's
    and the depths' states after the last answer are then what is kept (a
    :class:`~hybridlm.infer.speculative.SpeculativeSession`; ``kept_states`` 0: none). ValueError for a ``chat``
    without a template, bad sampling settings, and speculation with a model without MTP depths or with
    ``cuda_graph``."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        chat: Chat,
        *,
        system: str | None = None,
        max_new_tokens: int = 1024,
        stops: list[str] | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        min_p: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        seed: int = 0,
        cuda_graph: bool = False,
        kept_states: int = KEPT_STATES,
        speculative: str | None = None,
        draft_tokens: int | None = None,
    ) -> None:
        if chat.template is None:
            raise ValueError("this model has no chat template: give one (load_chat's template_file)")
        if speculative is not None and (
            speculative != "mtp" or not len(getattr(model, "mtp", ())) or cuda_graph or draft_tokens == 0
        ):
            raise ValueError(
                f"speculative={speculative!r} needs 'mtp', a model with MTP depths (a pattern with '/'), no cuda_graph "
                f"and draft_tokens >= 1 (got {draft_tokens})"
            )
        extras = dict(frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, min_p=min_p)
        check_sampling(temperature, top_k, top_p, repetition_penalty, seed, **extras)
        extras["logit_bias"] = check_logit_bias(logit_bias, model.config.vocab_size)
        if max_new_tokens < 1 or kept_states < 0:
            raise ValueError(f"max_new_tokens must be >= 1 and kept_states >= 0, got {max_new_tokens}, {kept_states}")
        self.stops = list(stops or [])
        if not all(isinstance(s, str) and s for s in self.stops):
            raise ValueError(f"stops must be non-empty strings, got {self.stops!r}")
        self.model, self.tokenizer, self.chat = model, tokenizer, chat
        self.max_new_tokens, self.cuda_graph = max_new_tokens, cuda_graph
        self.sampling = dict(
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, **extras
        )
        self.seed = seed
        self.speculative = dict(speculative=speculative, draft_tokens=draft_tokens) if speculative else {}
        self.store = PrefixStore(kept_states) if kept_states and not speculative else None
        if speculative and kept_states:  # (the depths' caches are kept with the main model's: the last answer's)
            from .speculative import SpeculativeSession

            self.speculative["speculative_session"] = SpeculativeSession()
        # (the decode cache and its graph kept between turns: a turn of a shape seen before captures nothing)
        self.graphs = DecodeGraphs(model, keep=2) if cuda_graph else None
        self.messages: list[dict] = []
        self.turns = 0
        self.reset(system)

    def reset(self, system: str | None = None) -> None:
        """Start over, with ``system`` as the system message (None: none). The kept states stay: a conversation begun
        alike again (the same system message) runs from them."""
        self.messages = [] if system is None else [{"role": "system", "content": system}]

    @property
    def system(self) -> str | None:
        """The system message, None where there is none."""
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def prompt(self, text: str) -> list[int]:
        """The ids the model would read for the next answer if the user said ``text``: the conversation rendered
        by the template, the assistant's turn opened, and tokenized. ChatTemplateError where the template refuses
        the messages (a system message some templates do not take), ValueError (the tokenizer's DataError) where the
        text cannot be tokenized."""
        return self.tokenizer.encode(
            self.chat.template.render([*self.messages, _user(text)], self.chat.template_kwargs)
        )

    def reply(self, text: str, write: Callable[[str], None] | None = None) -> Turn:
        """The assistant's answer to the user's ``text``, streamed to ``write`` a piece at a time as it comes (None:
        not streamed); the message and the answer are then part of the conversation. Ctrl-C (KeyboardInterrupt) while
        it answers keeps the answer so far, as it was shown, and is raised again."""
        ids = self.prompt(text)
        stop_ids = self.chat.stop_ids
        specials = self.tokenizer.special_tokens()
        completion = Completion(
            self.tokenizer, self.stops, write is not None, ids, specials=specials, write=write or write_stdout
        )
        kept_before = self.store.hit_tokens if self.store is not None else 0
        session = self.speculative.get("speculative_session")
        tokens: list[int] = []  # (as they come: an interrupted answer's too)

        def take(_, token: int) -> bool:
            tokens.append(token)
            return token not in stop_ids and completion.add(token)  # (the end of turn is none of the text)

        t0 = time.perf_counter()
        stats: dict = {}
        try:
            generate(
                self.model,
                ids,
                max_new_tokens=self.max_new_tokens,
                eos_id=sorted(stop_ids),
                seed=self.seed + self.turns,
                callback=take,
                cuda_graph=self.cuda_graph,
                prefix_store=self.store,
                graphs=self.graphs,
                stats=stats,
                **self.speculative,
                **self.sampling,
            )
        except KeyboardInterrupt:  # (the answer so far, as shown, is the conversation's; after an error, nothing is)
            self._answered(text, completion)
            raise
        self._answered(text, completion)
        finish = "stop" if completion.stopped or (tokens and tokens[-1] in stop_ids) else "length"
        kept = (self.store.hit_tokens if self.store is not None else 0) - kept_before
        if session is not None:
            kept = session.kept
        seconds = time.perf_counter() - t0
        return Turn(
            completion.text, tokens, finish, len(ids), kept, seconds, stats.get("drafted", 0), stats.get("accepted", 0)
        )

    def _answered(self, text: str, completion: Completion) -> None:
        """The user's ``text`` and the answer ``completion`` holds (what it still held back shown) added."""
        completion.finish()
        self.messages += [_user(text), {"role": "assistant", "content": completion.text}]
        self.turns += 1


def _user(text: str) -> dict:
    return {"role": "user", "content": text}
