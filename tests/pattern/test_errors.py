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
