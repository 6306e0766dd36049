"""`hybridlm pattern`: the table, and a clean exit 2 on bad patterns."""

import subprocess
import sys

from hybridlm.cli import main


def test_table(capsys):
    assert main(["pattern", "M-M-[*-]M-|M-[*E]M-/*-/*-", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "attention + MLP" in out and "attention + MoE" in out
    row = next(line for line in out.splitlines() if line.startswith("4 "))
    assert row.split()[:3] == ["4", "4-5", "*-"] and "yes" in row and "rank 0" in row
    assert "14 canonical layers" in out and "12 blocks (2 fused)" in out
    assert "2 depth(s)" in out


def test_bad_pattern_exits_2_without_traceback():
    r = subprocess.run([sys.executable, "-m", "hybridlm.cli", "pattern", "M*[M*-]"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "a fused group must be a sequence mixer followed by a channel mixer" in r.stderr
    assert "^" in r.stderr


def test_bad_pipeline_exits_2(capsys):
    assert main(["pattern", "M|M|M", "--pp", "2"]) == 2
    assert "evenly divisible" in capsys.readouterr().err


def test_python_dash_m_hybridlm_is_the_command():
    r = subprocess.run([sys.executable, "-m", "hybridlm", "pattern", "M-*"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[:3] == ["block", "layers", "symbols"]
