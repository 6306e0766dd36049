"""The code base is ruff-clean (lint and format), so CI catches style drift with the tests."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.mark.skipif(
    shutil.which("ruff") is None and not Path(sys.prefix, "bin", "ruff").exists(), reason="ruff not installed"
)
@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
    ruff = shutil.which("ruff") or str(Path(sys.prefix, "bin", "ruff"))
    r = subprocess.run([ruff, *args, "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
