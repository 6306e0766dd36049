"""``PatternError``: every problem with a pattern, shown with a caret under its cause."""

from __future__ import annotations

import unicodedata

from .._errors_base import HybridLMError


def _one_column(c: str) -> bool:
    # Control characters (tabs, newlines) shift or break the line; a combining mark takes no column
    # and a wide character (a full-width look-alike such as '＊') two.
    return c.isprintable() and not unicodedata.combining(c) and unicodedata.east_asian_width(c) not in ("W", "F")


def _printable(text: str) -> str:
    # Keep one display column per character so the caret lines up.
    return "".join(c if _one_column(c) else "?" for c in text)


_MAX_SHOWN = 80  #: characters of a long pattern quoted in an error message


class PatternError(HybridLMError, ValueError):
    """A layer pattern broke a rule of the pattern language.

    It is a :class:`~hybridlm.errors.HybridLMError` like every error of the package, and a
    ``ValueError`` because the pattern is a bad value.

    Attributes:
        rule: one sentence naming the rule that was broken.
        pattern: the pattern text as given.
        position: 0-based index of the offending character in ``pattern`` (``None`` when the
            problem is not tied to one character, e.g. a bad argument to ``stage``).
    """

    def __init__(self, rule: str, pattern: str, position: int | None = None) -> None:
        self.rule = rule
        self.pattern = pattern
        self.position = position
        super().__init__(self._format())

    def _format(self) -> str:
        text, position = _printable(self.pattern), self.position
        rule = self.rule
        if len(text) > _MAX_SHOWN + 2 * len("..."):  # shortened only where the window is shorter than the whole
            # A long pattern is shown as a window around the caret, so the message stays readable.
            centre = position if position is not None else 0
            start = max(0, min(centre - _MAX_SHOWN // 2, len(text) - _MAX_SHOWN))
            end = start + _MAX_SHOWN
            text = ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")
            if position is not None:
                position = position - start + (3 if start else 0)
            where = f", error at position {self.position}" if self.position is not None else ""
            rule = f"{rule} (pattern of {len(self.pattern)} characters, shortened{where})"
        lines = [rule, f"  pattern: '{text}'"]
        if position is not None:
            # 12 = len("  pattern: '"), so the caret sits under the quoted character.
            lines.append(" " * (12 + position) + "^")
        return "\n".join(lines)

    def __reduce__(self):  # keep the error picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.rule, self.pattern, self.position))


class RatioError(PatternError, AssertionError):
    """Bad arguments to :func:`pattern_from_ratios`.

    Megatron-LM checks these with plain ``assert`` statements, so this error is also an
    ``AssertionError``; it is a ``ValueError`` (through ``PatternError``) like every other
    pattern problem.
    """
