"""A completion's text as its tokens arrive: incremental decoding in a bounded window, stop strings (special tokens
included), and streaming that never shows the start of a stop string. ``hybridlm generate`` prints it; ``hybridlm
serve`` sends it to an HTTP client."""

from __future__ import annotations

import sys
from collections.abc import Callable


def write_stdout(text: str) -> None:
    """Where a streamed completion goes by default: standard output, flushed (looked up at each write, so that a
    replaced ``sys.stdout`` gets it)."""
    sys.stdout.write(text)
    sys.stdout.flush()


class Completion:
    """One row's text as tokens arrive: cut at the first stop string, optionally streamed (to ``write``).

    While streaming, a trailing replacement character (an incomplete UTF-8 sequence) is held back, and
    the ``len(longest stop) - 1`` characters before it (with the character it becomes, they may make a
    stop string).

    Each token decodes only the ids after a settled point (at most ``2 * WINDOW``), not the whole
    completion, which made a long completion quadratic (8,000 tokens: 0.55 ms a token).
    """

    #: Tokens decoded before the ids in question and cut off again: decoders that drop a leading
    #: space (sentencepiece's Metaspace, Strip) would otherwise glue the first word to what precedes it.
    CONTEXT = 8
    #: The settled point moves in steps of this many tokens, trailing the newest by at least as many.
    WINDOW = 16

    def __init__(
        self,
        tokenizer,
        stops: list[str],
        stream: bool,
        prompt: list[int] | None = None,
        heading: str = "",
        specials: dict[str, int] | None = None,
        write: Callable[[str], None] = write_stdout,
    ) -> None:
        """``specials``: the tokenizer's special tokens (text -> id), which decoding leaves out of the text, where no
        stop string would find them: a stop string that is one of them ends the text where the model picks it, and
        one that holds one with more text (``'<|im_end|>\\n'``) is searched in the text with the special tokens'
        texts put back where the model picked them. ``write``: where streamed text goes, a piece at a time (never
        an empty one); standard output by default."""
        self.tokenizer, self.stops, self.stream, self.write = tokenizer, stops, stream, write
        specials = specials or {}
        self.stop_ids = frozenset(specials[s] for s in stops if s in specials)
        self.marked_stops = [stop for stop in stops if stop not in specials and any(s in stop for s in specials)]
        # The special tokens whose texts those stops are searched with (all: as a decode that keeps them reads).
        self.marked = {i: s for s, i in specials.items()} if self.marked_stops else {}
        self.marks: list[tuple[int, str]] = []  # (offset in the text, special token's text) of each marked token picked
        self.heading = heading  # streamed before the first text: the prompt, once generation has started
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.context = self._context(list(prompt or []))  # the ids before ids[settled:]
        self.ids: list[int] = []
        self.settled, self.settled_text = 0, ""  # ids[:settled] decode to settled_text, whatever follows
        self.text, self.shown, self.stopped = "", 0, False

    def _context(self, before: list[int]) -> list[int]:
        """The last ids of ``before`` (at most ``CONTEXT``) that decode to text not starting inside a character.
        A cut through a character's bytes is not harmless: a ByteFallback decoder (Llama's, Mistral's) reads a
        run of byte tokens whole, and one that is not UTF-8 becomes a replacement character per byte, so the new
        ids of that run (a complete emoji) decoded as replacement characters too, and streamed text repeated."""
        context = before[-self.CONTEXT :]
        while context and self.tokenizer.decode(context).startswith("\ufffd"):
            context = context[1:]
        return context

    def _decode(self, ids: list[int], context: list[int] | None = None) -> str:
        """The text of ``ids``, which follow ``context`` (default ``self.context``)."""
        context = self.context if context is None else self._context(context)
        if not context:
            return self.tokenizer.decode(ids)
        prefix, text = self.tokenizer.decode(context), self.tokenizer.decode(context + ids)
        return text[len(prefix) :] if text.startswith(prefix) else self.tokenizer.decode(ids)

    def _settles(self, end: int, head: str, tail: str) -> bool:
        """Whether ``ids[settled:end]`` (decoding to ``head``) can be settled: ``tail``, the text of all pending ids,
        starts with it, and where ``head`` ends in a replacement character (the cut may split a byte sequence),
        the ids after ``end`` decode to the rest of ``tail`` (output that is not UTF-8 settles too) and the pending
        ids less the last one, two or three decode to text starting with ``head`` as well: a ByteFallback decoder
        (Llama's, Mistral's) reads a whole run of byte tokens as a replacement character per byte while the run ends
        inside a character, and those characters, once settled, stayed when the newest character was completed."""
        if not tail.startswith(head):
            return False
        if not head.endswith("\ufffd"):
            return True
        pending = self.ids[self.settled :]
        return self._decode(self.ids[end:], self.context + self.ids[self.settled : end]) == tail[len(head) :] and all(
            self._decode(pending[:-j]).startswith(head) for j in (1, 2, 3)
        )

    def add(self, token: int) -> bool:
        if self.stopped:
            return True
        if token in self.stop_ids:  # the text so far is all of it, characters held back for the stops too
            self.stopped = True
            self.finish()
            return True
        if token in self.marked:  # its text, left out of the text, stands here for the stop strings that hold it
            self.marks.append((len(self.text), self.marked[token]))
        self.ids.append(token)
        start = max(0, len(self.settled_text) - self.hold)  # before it, earlier tokens searched the same text
        tail = self._decode(self.ids[self.settled :])
        pending = len(self.ids) - self.settled
        if pending >= 2 * self.WINDOW and pending % self.WINDOW == 0:  # settle the older ids, if they decode alike
            for end in range(len(self.ids) - self.WINDOW, len(self.ids) - self.WINDOW - 4, -1):  # (a character
                head = self._decode(self.ids[self.settled : end])  # is up to 4 byte tokens: not cut in one)
                if self._settles(end, head, tail):
                    self.context = self._context(self.context + self.ids[self.settled : end])
                    self.settled, self.settled_text, tail = end, self.settled_text + head, tail[len(head) :]
                    break
        text = self.settled_text + tail
        cuts = [i for i in (text.find(s, start) for s in self.stops if s not in self.marked_stops) if i >= 0]
        cuts += self._marked_cuts(text, start)
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text
        if self.stream:
            safe = len(text)
            if not self.stopped:
                # A trailing replacement character may be an incomplete character, which may end a stop
                # string: it waits, and the characters held back for the stops are counted before it.
                while safe > self.shown and text[safe - 1] == "\ufffd":
                    safe -= 1
                safe -= self.hold
            self._show(safe)
        return self.stopped

    def _marked_cuts(self, text: str, start: int) -> list[int]:
        """Where in ``text`` the stop strings that hold a special token's text occur from ``start`` on, searched in
        ``text[start:]`` with the texts of the special tokens the model picked put back where it picked them (a
        match that begins at such a token cuts the text where it was picked)."""
        if not self.marked_stops:
            return []
        kept, where, at = "", [], start  # where[k]: the offset in text of kept[k]
        for offset, special in self.marks:
            offset = min(offset, len(text))  # (the bytes of a character the token cut in two decode together)
            if offset >= start:
                kept += text[at:offset] + special
                where += [*range(at, offset), *[offset] * len(special)]
                at = offset
        kept, where = kept + text[at:], [*where, *range(at, len(text))]
        return [where[i] for i in (kept.find(s) for s in self.marked_stops) if i >= 0]

    def finish(self) -> None:
        """Stream what is still held back (the text has ended: nothing more can make a stop string)."""
        if self.stream:
            self._show(len(self.text))

    def _show(self, upto: int) -> None:
        piece, self.heading = self.heading, ""
        if upto > self.shown:
            piece += self.text[self.shown : upto]
            self.shown = upto
        if piece:
            self.write(piece)
