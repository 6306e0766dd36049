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


def test_table_columns_for_mtp_rows_and_as_many_segments_as_ranks():
    """With one segment per rank there are no virtual stages; MTP blocks run on the last rank (with the head),
    number their layers within a depth and have no segment."""
    from hybridlm.pattern import parse
    from hybridlm.pattern.table import block_rows, pipeline_plan

    p = parse("M-|M-/[*-]/[*-]")
    rows = block_rows(p, pipeline_plan(p, 2))
    assert [r.stage for r in rows] == ["rank 0", "rank 0", "rank 1", "rank 1", "rank 1", "rank 1"]
    assert [(r.mtp_depth, r.layers) for r in rows[4:]] == [(1, (0, 1)), (2, (0, 1))]
    empty_main = parse("/*-")  # no main blocks: the MTP depth is still on the last rank
    assert [r.stage for r in block_rows(empty_main, pipeline_plan(empty_main, 2))] == ["rank 1", "rank 1"]


def test_table_totals_and_pipeline_lines(capsys):
    assert main(["pattern", "M-||M-/*-/*-", "--pp", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    mtp_row = next(line.split() for line in lines if line.startswith("0 ") and line.split()[2] == "*")
    assert mtp_row[-4:] == ["-", "rank", "2", "1"]  # segment '-', stage 'rank 2', depth 1
    assert "3 segment(s)" in next(line for line in lines if line.startswith("main stack"))
    # 4 main layers and 2 depths of 2: Mamba2 2, MLP 2 + 2, attention 2 (symbols named as in docs/pattern.md).
    assert "total layers   8 (attention 2, Mamba2 2, MLP 4)" in lines
    at = lines.index("pipeline       3 rank(s)")
    assert [line.split(maxsplit=2)[2] for line in lines[at + 1 : at + 4]] == [
        "blocks 0-1",
        "no blocks",
        "blocks 2-3",
    ]


def test_table_kind_names_the_layers_as_the_docs_do(capsys):
    assert main(["pattern", "MG-E"]) == 0
    out = capsys.readouterr().out
    for name in ("Mamba2", "Gated DeltaNet", "MLP"):  # (E, "mixture of experts" there, is abbreviated MoE)
        assert f"  {name} " in out, name


def test_table_of_an_empty_pattern_and_of_fused_mtp_layers(capsys):
    assert main(["pattern", ""]) == 0
    out = capsys.readouterr().out
    assert "(no blocks)" in out and "canonical      (empty)" in out and "total layers   0 (none)" in out
    assert main(["pattern", "M-/[*-]"]) == 0
    out = capsys.readouterr().out
    assert "MTP            1 depth(s) of '[*-]' (2 layers each)" in out  # a fused block: two canonical layers
    assert "canonical      M-/*-" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pp", "0"], "--pp must be >= 1, got 0"),
        (["--pp", "2", "--first-stage-layers", "-1"], "--first-stage-layers must be >= 0, got -1"),
        (["--pp", "2", "--last-stage-layers", "-1"], "--last-stage-layers must be >= 0, got -1"),
    ],
)
def test_pattern_names_the_first_out_of_range_number(capsys, argv, message):
    """Each bound is checked on its own flag, at its own limit (a rank of no blocks is allowed, no ranks is not)."""
    assert main(["pattern", "M-M-M-M-", *argv]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: {message}\n" and out == ""


def _rank_lines(capsys, argv):
    assert main(["pattern", "M-M-M-M-", *argv]) == 0
    return [line.split(None, 2)[2] for line in capsys.readouterr().out.splitlines() if line.startswith("  rank ")]


def test_pattern_takes_each_bound_itself_and_sizes_the_stage_it_names(capsys):
    """--pp 1 and 0 blocks on a rank are the lowest numbers allowed; first and last size the ranks they name."""
    assert _rank_lines(capsys, ["--pp", "1"]) == ["blocks 0-7"]
    assert _rank_lines(capsys, ["--pp", "2", "--first-stage-layers", "0"]) == ["no blocks", "blocks 0-7"]
    assert _rank_lines(capsys, ["--pp", "2", "--first-stage-layers", "1"]) == ["blocks 0-0", "blocks 1-7"]
    assert _rank_lines(capsys, ["--pp", "2", "--last-stage-layers", "3"]) == ["blocks 0-4", "blocks 5-7"]


def _svg_texts(path):
    import re

    return [t for t in re.findall(r"<text[^>]*>([^<]*)", path.read_text())]


def test_pattern_plot_labels_each_rank_with_the_layers_the_flag_gave_it(tmp_path, capsys):
    """--first-stage-layers 1 of 8 blocks: the plot's stage labels read 1 then 7 (rank 0 first), as the table."""
    for flag, counts in (("--first-stage-layers", ["1", "7"]), ("--last-stage-layers", ["7", "1"])):
        out = tmp_path / f"{flag}.svg"
        assert main(["pattern", "M-M-M-M-", "--pp", "2", flag, "1", "--plot", str(out)]) == 0
        texts = _svg_texts(out)
        start = texts.index("canonical layers") + 1
        assert texts[start : start + 3] == [*counts, " mean"], texts
    capsys.readouterr()


def test_pattern_plot_warns_about_an_automatic_split_once(tmp_path, caplog, capsys):
    """The table and the plot both lay the ranks out; the deprecation (and the fused-group warning) is said once."""
    import logging

    with caplog.at_level(logging.WARNING, logger="hybridlm.pattern"):
        assert main(["pattern", "M[M-]MM", "--pp", "2", "--plot", str(tmp_path / "p.svg")]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert sum("DEPRECATION" in m for m in said) == 1, said
    assert sum("counts a fused block as one block" in m for m in said) == 1, said
    capsys.readouterr()


def test_an_automatic_split_that_leaves_a_rank_empty_blames_the_stage_sizes_not_pipes(capsys):
    """No '|' in the pattern: the empty middle ranks come from --first/--last-stage-layers, not from '|'s."""
    assert main(["pattern", "MMMM", "--pp", "4", "--first-stage-layers", "4"]) == 0
    out = capsys.readouterr().out
    assert "ranks 1, 2 hold no layers" in out
    assert "between '|'s" not in out
    assert "--first-stage-layers / --last-stage-layers" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["M-", "--pp", "5", "--first-stage-layers", "2"],
        ["", "--pp", "10" * 15],
        ["M-", "--pp", "10" * 15, "--last-stage-layers", "2"],
    ],
)
def test_a_pp_with_more_ranks_than_an_automatic_split_has_room_for_is_refused(capsys, argv):
    """Past blocks + 2 ranks every further rank is empty: the table listed them one by one (--pp 10**30 never ended)."""
    assert main(["pattern", *argv]) == 2
    assert "has room for at most" in capsys.readouterr().err


def test_a_pp_that_does_not_divide_the_pattern_s_own_segments_is_refused_as_such(capsys):
    """The "automatic split" limit is for a pattern without '|': one with '|' is refused for its segments."""
    assert main(["pattern", "M-|M-", "--pp", "7"]) == 2
    err = capsys.readouterr().err
    assert "segments (2)" in err and "divisible by" in err and "automatic split" not in err
