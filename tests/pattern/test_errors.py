"""``PatternError`` sits under the package's error base and stays a ``ValueError``."""

import pickle
import subprocess
import sys

import pytest

from hybridlm.errors import USER_ERRORS, HybridLMError
from hybridlm.pattern import PatternError, RatioError, parse, pattern_from_ratios


def test_pattern_error_is_a_hybridlm_error():
    with pytest.raises(HybridLMError) as info:
        parse("M*[M*-]")
    assert isinstance(info.value, PatternError) and isinstance(info.value, ValueError)
    assert issubclass(RatioError, HybridLMError) and issubclass(RatioError, AssertionError)
    with pytest.raises(HybridLMError):
        pattern_from_ratios(8, 0.5, 0.75)
    assert PatternError in USER_ERRORS


def test_pattern_error_pickles_and_names_its_public_module():
    e = pickle.loads(pickle.dumps(PatternError("a rule", "M?", 1)))
    assert (e.rule, e.pattern, e.position) == ("a rule", "M?", 1)
    assert HybridLMError.__module__ == "hybridlm.errors"
    assert pickle.loads(pickle.dumps(HybridLMError("x"))).args == ("x",)


def test_pattern_and_errors_import_without_torch():
    code = (
        "import sys, hybridlm.pattern, hybridlm.errors;"
        "from hybridlm.pattern import PatternError; from hybridlm.errors import HybridLMError;"
        "assert issubclass(PatternError, HybridLMError);"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_control_characters_show_as_question_marks_on_the_pattern_line():
    """A control character (here a newline) is quoted as '?', so the message keeps three lines and the caret its
    column."""
    with pytest.raises(PatternError) as info:
        parse("M\n*X")
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[1] == "  pattern: 'M?*X'"
    assert lines[2] == " " * len("  pattern: 'M") + "^"  # under the '?'


def _quoted_and_caret(text):
    with pytest.raises(PatternError) as info:
        parse(text)
    rule, quoted, caret = str(info.value).splitlines()
    return rule, quoted.removeprefix("  pattern: '").removesuffix("'"), caret.index("^") - len("  pattern: '")


def test_a_pattern_is_quoted_whole_unless_its_window_is_shorter():
    """A pattern is quoted as it is unless the 80-character window with its '...' marks (at most 86 characters) is
    shorter: 86 characters are quoted whole (a window of 81 would be 83 long), 87 are shortened."""
    for n in (80, 81, 86):
        text = "M" * (n - 1) + "X"
        rule, shown, caret = _quoted_and_caret(text)
        assert "shortened" not in rule and shown == text and caret == n - 1
    rule, shown, caret = _quoted_and_caret("M-" * 43 + "X")  # 87 characters
    assert "(pattern of 87 characters, shortened, error at position 86)" in rule
    assert shown == "..." + ("M-" * 43 + "X")[7:] and len(shown) == 83 and shown[caret] == "X"


def test_a_long_pattern_is_windowed_around_the_caret_and_not_padded_past_its_ends():
    """The window holds 40 characters before the offending one; at either end of the pattern it stops at that
    end, with '...' only on the side where characters were left out."""
    text = "M" * 100 + "X" + "M" * 99  # 200 characters, error at 100
    _, shown, caret = _quoted_and_caret(text)
    assert shown == "..." + "M" * 40 + "X" + "M" * 39 + "..." and caret == 3 + 40
    text = "M" * 199 + "X"  # error at the last character: the last 80 characters, nothing after them
    _, shown, caret = _quoted_and_caret(text)
    assert shown == "..." + "M" * 79 + "X" and caret == 3 + 79
    text = "X" + "M" * 199  # error at the first: the first 80 characters
    _, shown, caret = _quoted_and_caret(text)
    assert shown == "X" + "M" * 79 + "..." and caret == 0


@pytest.mark.parametrize(
    "text, shown",
    [
        ("＊[M", "?[M"),  # a full-width look-alike of '*' takes two columns
        ("M\u0301[M", "M?[M"),  # a combining accent takes none
    ],
)
def test_characters_not_one_column_wide_show_as_question_marks_so_the_caret_lines_up(text, shown):
    """The caret is placed by counting characters, so every character of the quoted pattern must take one column:
    a wide or a combining character before the one at fault would put the caret under another character."""
    with pytest.raises(PatternError) as info:
        parse(text)
    lines = str(info.value).splitlines()
    assert lines[1] == f"  pattern: '{shown}'"
    assert lines[2] == " " * len("  pattern: '" + shown.split("[")[0]) + "^"  # under the '['
