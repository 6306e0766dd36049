"""`hybridlm plan` (text and --json), `--plot` for plan and pattern, and clean exit 2 on bad input."""

import json

import pytest

from hybridlm.cli import main
from hybridlm.pattern import parse


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_contract(capsys):
    out = _json(capsys, ["plan", "--preset", "tiny", "--pp", "2", "--vpp", "2", "--seq-len", "64", "--json"])
    p = parse(out["pattern"])
    assert len(p.segments) == 4 and p.canonical == parse("M-[*-]G-[ME]M*E/[*-]").canonical
    assert len(out["block_costs"]) == p.num_blocks
    assert len(out["stage_costs"]) == len(out["even_split_stage_costs"]) == 4
    assert all(isinstance(x, float) and x > 0 for x in out["block_costs"] + out["stage_costs"])
    assert max(out["stage_costs"]) <= max(out["even_split_stage_costs"])
    assert out["seq_len"] == 64 and out["vpp"] == 2 and "user_stage_costs" not in out


def test_text_and_positional_pattern(capsys):
    assert main(["plan", "M-M-|M*-M-M-", "--preset", "nemotron-h-8b", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "pattern  " in out and "even split" in out and "your '|'" in out and "imbalance" in out


def test_run_file(tmp_path, capsys):
    run = tmp_path / "run.toml"
    run.write_text('[model]\npreset = "tiny"\n[data]\nseq_len = 48\n[train]\nactivation_checkpointing = true\n')
    out = _json(capsys, ["plan", "--config", str(run), "--pp", "2", "--json"])
    assert out["seq_len"] == 48 and out["recompute"] is True
    assert parse(out["pattern"]).mtp_depths == 1


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot(tmp_path, capsys, suffix):
    path = tmp_path / f"plan{suffix}"
    assert main(["plan", "--preset", "tiny", "--pp", "2", "--seq-len", "32", "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data[:2000]
    assert capsys.readouterr().out.endswith(f"\nwrote {path}\n")  # as pattern --plot says it
    assert main(["plan", "--preset", "tiny", "--pp", "2", "--seq-len", "32", "--plot", str(path), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["pp"] == 2 and out.err == f"wrote {path}\n"  # stdout stays one JSON document
    other = tmp_path / f"pattern{suffix}"
    assert main(["pattern", "M-M-[*-]M-|M-[*E]M-/*-/*-", "--plot", str(other)]) == 0
    assert other.stat().st_size > 1000 and f"wrote {other}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "M-M", "--preset", "tiny", "--pp", "4"], "cannot place 4 pipeline stages"),
        (["plan", "--preset", "tiny", "--pp", "2", "--hardware", "tpu"], "--hardware 'tpu'"),
        (["plan", "--preset", "tiny", "--pp", "2", "--float8", "fp8"], "--float8 'fp8' is not one of none, tensorwise"),
        (["plan", "--preset", "tiny", "--pp", "2", "--plot", "x.pdf"], "must end in .png or .svg"),
        (["plan", "M-[*M]", "--preset", "tiny", "--pp", "1"], "a fused group must be"),
        (["plan", "--preset", "nope", "--pp", "2"], "unknown preset"),
        (["plan", "M-E", "--preset", "nemotron-h-8b", "--pp", "2"], "moe_num_experts"),
        (["plan", "M-+-*-", "--preset", "tiny", "--pp", "2"], "pattern"),  # + and * may not share a model
        (["plan", "--preset", "tiny", "--pp", "2", "--measure", "gpu"], "--measure 'gpu': not a device"),
        (["plan", "--preset", "tiny", "--pp", "2", "--measure", ""], "--measure '': not a device"),
        (["plan", "--preset", "tiny", "--pp", "2", "--measure", "meta"], "runs on cpu or cuda"),
        (["pattern", "MMMM", "--first-stage-layers", "1"], "give --pp 2 or more"),
        (["pattern", "MMMM", "--pp", "2", "--plot", "x.pdf"], "must end in .png or .svg"),
        (["pattern", "MMMM", "--plot", ""], "--plot '': the file name must end in .png or .svg"),
        # before a --measure run, which takes minutes on a GPU
        (
            ["plan", "--preset", "tiny", "--pp", "2", "--measure", "cpu", "--plot", "/no-such/p.png"],
            "'/no-such' is no folder",
        ),
    ],
)
def test_bad_input_exits_2(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err
    assert out == ""  # refused before anything is computed or printed


def test_a_plot_over_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "p.png").mkdir()
    assert main(["pattern", "MMMM", "--plot", str(tmp_path / "p.png")]) == 2
    assert "cannot write a folder" in capsys.readouterr().err


def test_a_plot_under_a_file_says_the_file_is_no_folder(tmp_path, capsys):
    """A file where the plot's folder should be was "no folder 'notes.txt'", as if nothing were there."""
    (tmp_path / "notes.txt").write_text("x")
    assert main(["pattern", "MMMM", "--plot", str(tmp_path / "notes.txt" / "p.png")]) == 2
    assert f"'{tmp_path / 'notes.txt'}' is a file, not a folder, to write it in" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, says",
    [(".png", "must end in .png or .svg, with a name before it"), ("p.jpg", "or .svg, not '.jpg'"), ("p", "or .svg\n")],
)
def test_a_plot_name_without_png_or_svg_says_what_it_has(tmp_path, capsys, name, says):
    """'.png' alone (a hidden file's name, no extension) was told it ended in "nothing"."""
    assert main(["pattern", "MMMM", "--plot", str(tmp_path / name)]) == 2
    assert says in capsys.readouterr().err


def test_one_stage_is_one_stage(capsys):
    assert main(["plan", "M-M-", "--pp", "1"]) == 0
    assert "= 1 stage, seq_len" in capsys.readouterr().out


def test_a_run_file_sizes_the_head_by_its_tokenizer(tmp_path, capsys):
    """As the trainer does: a run without model.vocab_size takes its tokenizer's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from hybridlm.train.tokenizer import build_tokenizer

    hf = Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [f"w{i} x{i * 7} y{i * 13}" for i in range(3000)]
    hf.train_from_iterator(words, trainers.BpeTrainer(vocab_size=3000, special_tokens=["[UNK]", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    vocab = build_tokenizer(str(tmp_path / "tokenizer.json")).vocab_size
    assert vocab > 1000
    model = '[model]\npattern = "M-M-M-M-"\nhidden_size = 64\nmamba_num_groups = 1\n'
    data = f'[data]\ntokenizer = "{tmp_path / "tokenizer.json"}"\nseq_len = 64\n'
    (tmp_path / "tok.toml").write_text(model + data)
    (tmp_path / "explicit.toml").write_text(model.replace("64\n", f"64\nvocab_size = {vocab}\n") + data)
    (tmp_path / "byte.toml").write_text(model + "[data]\nseq_len = 64\n")
    plans = [
        _json(capsys, ["plan", "--config", str(tmp_path / f), "--pp", "2", "--json"])
        for f in ("tok.toml", "explicit.toml", "byte.toml")
    ]
    assert plans[0] == plans[1] != plans[2]


def test_a_run_files_float8_is_planned_unless_the_flag_says_otherwise(tmp_path, capsys):
    run = tmp_path / "run.toml"
    run.write_text('[model]\npreset = "bench-1.3b"\n[data]\nseq_len = 4096\n[train]\nfloat8 = "tensorwise"\n')
    f8 = _json(capsys, ["plan", "--config", str(run), "--pp", "2", "--json"])
    plain = _json(capsys, ["plan", "--config", str(run), "--pp", "2", "--float8", "none", "--json"])
    assert f8["float8"] == "tensorwise" and plain["float8"] == "none"
    assert sum(f8["block_costs"]) < sum(plain["block_costs"])
    assert f8["last_stage_extra_cost"] == plain["last_stage_extra_cost"]  # the head stays in bf16


def test_a_run_files_float8_auto_filter_is_planned_unless_the_flag_says_otherwise(tmp_path, capsys):
    run = tmp_path / "run.toml"
    run.write_text(
        '[model]\npreset = "bench-1.3b"\n[data]\nseq_len = 4096\n[train]\nfloat8 = "rowwise"\nfloat8_auto_filter = true\n'
    )
    some = _json(capsys, ["plan", "--config", str(run), "--pp", "2", "--json"])
    every = _json(capsys, ["plan", "--config", str(run), "--pp", "2", "--no-float8-auto-filter", "--json"])
    assert some["float8_auto_filter"] is True and every["float8_auto_filter"] is False
    assert sum(every["block_costs"]) < sum(some["block_costs"])  # fewer layers at the float8 peak


def test_measure(capsys):
    argv = ["plan", "M-[*-]M", "--preset", "tiny", "--pp", "2", "--seq-len", "16", "--measure", "cpu", "--json"]
    out = _json(capsys, argv)
    assert out["source"] == "measured on cpu" and out["block_costs"][0] == out["block_costs"][3] > 0


def test_measuring_float8_on_the_cpu_says_the_times_are_emulated(capsys):
    pytest.importorskip("torchao")
    argv = ["plan", "-*-", "--preset", "tiny", "--pp", "2", "--seq-len", "16", "--float8", "tensorwise"]
    assert main([*argv, "--measure", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["source"] == "measured on cpu"
    assert "note: --measure cpu with float8 (tensorwise): the CPU emulates float8 matmuls" in captured.err
    assert main([*argv, "--json"]) == 0 and "emulates" not in capsys.readouterr().err  # the estimate: no note


def _plan(capsys, argv):
    assert main(["plan", *argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    return {k: out[k] for k in ("vpp", "seq_len", "micro_batch_size", "recompute", "source")}


def test_plan_defaults_with_a_preset(capsys):
    """--help's defaults: 4096 tokens, one sequence per micro-batch, one virtual stage, the H100 roofline."""
    assert _plan(capsys, ["--preset", "tiny", "--pp", "2"]) == {
        "vpp": 1,
        "seq_len": 4096,
        "micro_batch_size": 1,
        "recompute": False,
        "source": "estimate (H100 SXM roofline)",
    }


@pytest.mark.parametrize(
    "train, parallel, expected",
    [
        ("batch_size = 16\n", "", 4),  # 16 rows over 2 x pp = 4 micro-batches
        ("batch_size = 16\n", "microbatches = 8\n", 2),  # the run's own count of micro-batches
        ("batch_size = 16\nmicro_batch_size = 8\n", "", 8),  # the run's own micro-batch size wins
        ("batch_size = 2\n", "", 1),  # fewer rows than micro-batches: still one row each
    ],
)
def test_plan_sizes_micro_batches_as_the_run_file_would(tmp_path, capsys, train, parallel, expected):
    """The run file's tokenizer is not read with a preset (nor needed): the preset keeps its own vocabulary."""
    run = tmp_path / "run.toml"
    run.write_text(
        '[model]\npreset = "tiny"\n[data]\nseq_len = 48\ntokenizer = "/no-such/tokenizer.json"\n'
        f"[train]\n{train}[parallel]\n{parallel}"
    )
    got = _plan(capsys, ["--config", str(run), "--pp", "2"])
    assert (got["micro_batch_size"], got["seq_len"]) == (expected, 48)


def test_plan_does_not_read_the_tokenizer_of_a_run_that_sizes_its_head(tmp_path, capsys):
    """model.vocab_size given: a missing data.tokenizer is no reason to refuse a plan."""
    run = tmp_path / "run.toml"
    run.write_text(
        '[model]\npattern = "M-M-"\nhidden_size = 64\nvocab_size = 300\nmamba_num_groups = 1\n'
        '[data]\nseq_len = 32\ntokenizer = "/no-such/tokenizer.json"\n'
    )
    assert _plan(capsys, ["--config", str(run), "--pp", "2"])["seq_len"] == 32


@pytest.mark.parametrize("flag", ["--micro-batch-size", "--seq-len"])
def test_plan_refuses_zero_sizes(capsys, flag):
    """0 is a size given (and wrong), not a size left out."""
    assert main(["plan", "--preset", "tiny", "--pp", "2", flag, "0"]) == 2
    assert capsys.readouterr().err == f"error: {flag} must be a positive integer, got 0\n"


def test_plan_measure_refuses_a_bad_kernel_setting_first(monkeypatch, capsys):
    """The kernel setting is checked before anything else (the plot's folder here), so before any timing."""
    monkeypatch.setenv("HYBRIDLM_KERNELS", "bogus")
    assert main(["plan", "--preset", "tiny", "--pp", "2", "--measure", "cpu", "--plot", "/no-such/p.png"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: HYBRIDLM_KERNELS: 'bogus': expected one of auto, torch, triton") and out == ""


def test_plan_refuses_its_plot_before_reading_the_model(capsys):
    """A bad --plot is named first: nothing (a preset, a run file, a measurement) is looked at before it."""
    assert main(["plan", "--preset", "nope", "--pp", "2", "--plot", "x.pdf"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --plot 'x.pdf'") and "must end in .png or .svg" in err and out == ""


def test_a_pattern_the_model_cannot_hold_says_how_to_give_one(capsys):
    """plan 'M-E' said "moe_num_experts: required: the pattern has MoE ('E') layers", a field no flag of plan sets;
    a bad pattern keeps its own message and caret."""
    assert main(["plan", "M-E", "--pp", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pattern 'M-E' does not fit the model of the default run: moe_num_experts: required")
    assert err.endswith("give a run file (--config RUN.toml) or a preset (--preset NAME) whose model sets it\n")
    assert main(["plan", "M-X", "--pp", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: pattern: In main pattern, 'X' is not a valid layer symbol")


@pytest.mark.parametrize("pp, refused", [(2, False), (3, True)])
def test_plan_says_when_the_run_s_batch_does_not_split_into_its_micro_batches(tmp_path, capsys, pp, refused):
    """16 rows over pp 3's default 6 micro-batches were planned at 2 rows each without a word, for a layout the
    trainer refuses."""
    run = tmp_path / "run.toml"
    run.write_text('[model]\npreset = "tiny"\n[data]\nseq_len = 48\n[train]\nbatch_size = 16\n')
    assert main(["plan", "--config", str(run), "--pp", str(pp), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["micro_batch_size"] == 16 // (2 * pp)  # stdout stays one JSON document
    note = "note: the run's train.batch_size (16) does not split into 6 micro-batches (parallel.microbatches, 2 × pp"
    assert (note in err) == refused, err


def test_plan_measure_refuses_sizes_no_tensor_holds(capsys):
    """--seq-len 10**30 is estimated, but measuring it raised "unexpected TypeError ... Overflow when unpacking"."""
    assert main(["plan", "M-M-", "--pp", "2", "--measure", "cpu", "--seq-len", str(10**30)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --measure:") and "unexpected" not in err


@pytest.mark.parametrize(
    "train, args, micro, grads",
    [
        ("batch_size = 16\n", [], 16, False),  # pp 1 runs no pipeline: the whole batch, one micro-batch a step
        ("batch_size = 16\nmicro_batch_size = 8\n", [], 8, True),  # two accumulated: gradients from the first on
        ("batch_size = 16\n", ["--micro-batch-size", "4"], 4, True),
        ("batch_size = 16\n", ["--micro-batch-size", "16"], 16, False),
    ],
)
def test_plan_at_pp_1_sizes_the_step_as_the_trainer_runs_it(tmp_path, capsys, train, args, micro, grads):
    """At --pp 1 a run's step was planned as 2 micro-batches of half its batch (parallel.microbatches' pipeline
    default, which a run without a pipeline ignores), its peak with every gradient; a step of one micro-batch has
    none at its peak (they are set to None before it)."""
    run = tmp_path / "run.toml"
    run.write_text(f'[model]\npreset = "tiny"\n[data]\nseq_len = 48\n[train]\n{train}')
    assert main(["plan", "--config", str(run), "--pp", "1", "--json", *args]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)
    assert (got["micro_batch_size"], got["grads_at_peak"]) == (micro, grads) and err == ""
    assert main(["plan", "--config", str(run), "--pp", "1", *args]) == 0
    assert ("one micro-batch a step: no gradients at the peak" in capsys.readouterr().out) == (not grads)


def test_plan_of_a_preset_counts_the_gradients_at_the_peak(capsys):
    """Without a run file the number of micro-batches a step is unknown: the peak keeps the gradients (the larger)."""
    assert main(["plan", "--preset", "tiny", "--pp", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["grads_at_peak"] is True


def test_a_run_files_trainable_parameters_are_planned_with_their_state_alone(tmp_path, capsys):
    """train.trainable in the run file: the frozen parameters hold their weights only (12 bytes a parameter fewer than
    18, the embedding's and head's 12 of 16), said in a note; the first layer, which trains, costs what it costs when
    all train, the frozen ones after it less (no weight gradients)."""
    run = tmp_path / "run.toml"
    run.write_text('[model]\npreset = "tiny"\n[data]\nseq_len = 48\n')
    every = _json(capsys, ["plan", "--config", str(run), "--pp", "2", "--json"])
    run.write_text('[model]\npreset = "tiny"\n[data]\nseq_len = 48\n[train]\ntrainable = "layers.0.*"\n')
    assert main(["plan", "--config", str(run), "--pp", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    some = json.loads(out)
    assert "note: train.trainable 'layers.0.*' trains" in err and "others are counted without gradient" in err
    assert some["block_costs"][0] == every["block_costs"][0]
    assert all(a < b for a, b in zip(some["block_costs"][1:], every["block_costs"][1:]))
    params = [sum(s["params"] for s in every["stages"] if s["pp_rank"] == r) for r in range(2)]
    saved = [a["state_bytes"] - b["state_bytes"] for a, b in zip(every["ranks"], some["ranks"])]
    assert 0 < saved[0] < 12 * params[0] and saved[1] == pytest.approx(12 * params[1], rel=0.02), (saved, params)
    run.write_text('[model]\npreset = "tiny"\n[train]\ntrainable = "*.indexer.*"\n')
    assert main(["plan", "--config", str(run), "--pp", "2"]) == 2
    assert "train.trainable: '*.indexer.*' matches no parameter" in capsys.readouterr().err
