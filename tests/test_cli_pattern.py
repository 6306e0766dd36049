"""`hybridlm pattern`: the table, and a clean exit 2 on bad patterns."""

import json
import subprocess
import sys

import pytest

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


def test_a_pattern_that_starts_with_an_mlp_is_the_operand_not_an_option(capsys):
    # '-M-M' looks like an option to argparse; both commands take it for the pattern, wherever it stands.
    assert main(["pattern", "-M-M", "--pp", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:6]]
    assert [r[2] for r in rows] == ["-", "M", "-", "M"] and rows[-1][6:8] == ["rank", "1"]
    assert main(["plan", "--pp", "2", "--json", "-M-M*-"]) == 0
    assert json.loads(capsys.readouterr().out)["pattern"].replace("|", "") == "-M-M*-"
    assert main(["pattern", "--", "-M"]) == 0  # the explicit form still works
    capsys.readouterr()
    assert main(["pattern", "--pp", "-1", "M-"]) == 2  # an option's negative number is not moved
    assert "--pp" in capsys.readouterr().err


def test_a_split_that_training_refuses_says_so(capsys):
    # A rank between the first (embedding) and the last (head) with no blocks: `hybridlm train` refuses it.
    from hybridlm.errors import ConfigError
    from hybridlm.train.config import RunConfig

    for pattern, pp, note in (("M-||M-", 3, "rank 1 holds no layers"), ("M-|||M-", 4, "ranks 1, 2 hold no layers")):
        with pytest.raises(ConfigError, match="would hold no layers"):
            RunConfig().with_overrides([f"model.pattern={pattern}", f"parallel.pp={pp}"])
        assert main(["pattern", pattern, "--pp", str(pp)]) == 0
        assert note in capsys.readouterr().out
    for pattern in ("|M-|M-", "M-|M-|", "M-|M-|M-"):  # first and last ranks hold the embedding and the head
        RunConfig().with_overrides([f"model.pattern={pattern}", "parallel.pp=3"])
        assert main(["pattern", pattern, "--pp", "3"]) == 0
        assert "no layers" not in capsys.readouterr().out
