"""The README's main command, shortened (the CI smoke test), and `hybridlm generate` / `prepare` on its output."""

import os
import signal
import subprocess
import sys
from typing import ClassVar

import pytest

from hybridlm.cli import main
from tests.helpers import fifos_never_read


def test_default_run_shortened_learns(tmp_path, capsys):
    code = main(
        [
            "train",
            "--set",
            "train.steps=30",
            "--set",
            "train.eval_every=30",
            "--set",
            "train.log_every=10",
            "--run-dir",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "M-[*-]M-M-[*-]" in out and "step 30/30" in out
    line = next(x for x in out.splitlines() if x.startswith("validation loss ") and "->" in x)
    start, end = (float(v) for v in line.split()[2:5:2])
    assert start > 5.0 and end < 0.6 * start, line
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()

    assert (
        main(["generate", str(tmp_path / "run"), "--prompt", "The ", "--max-new-tokens", "20", "--temperature", "0"])
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("The ") and len(text) > 10


def test_bad_config_value_exits_2_naming_the_field(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "hybridlm.cli", "train", "--set", "optim.lr=-0.1", "--run-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "optim.lr" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "hybridlm.cli", "train", "--set", "model.pattern=M[-*]"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "model.pattern" in r.stderr and "^" in r.stderr


def test_a_failed_start_removes_the_folders_it_created_and_only_those(tmp_path, capsys):
    """``--run-dir a/b/c`` with ``a/b`` missing: a run that failed to start (here: no such corpus) removed ``c``
    and left ``a/b`` behind, empty. The folders the start created go (while empty), those there before stay."""
    missing = "data.source=" + str(tmp_path / "missing.txt")
    (tmp_path / "kept").mkdir()  # there before the run: stays, though empty
    for run_dir in ("a/b/c", "kept/x/y", "t/u/{time}"):  # {time}: a template, its parents made the same way
        assert main(["train", "--set", missing, "--run-dir", str(tmp_path / run_dir), "--no-progress"]) == 2
        assert "missing.txt" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]


def test_a_fifo_as_run_file_or_corpus_is_an_error_not_a_hang(tmp_path, capsys):
    """``train --config FIFO``, ``train --set data.source=FIFO`` and ``prepare FIFO OUT`` waited forever for a
    writer; each is now refused (status 2) naming the file."""
    os.mkfifo(tmp_path / "run.toml")
    os.mkfifo(tmp_path / "corpus.txt")
    run = ["--run-dir", str(tmp_path / "r"), "--no-progress"]
    missing = f"data.source={tmp_path / 'missing.txt'}"  # (a run file read as empty stops there, not after a run)
    with fifos_never_read(tmp_path / "run.toml", tmp_path / "corpus.txt"):  # (a read would hang the suite)
        assert main(["train", "--config", str(tmp_path / "run.toml"), "--set", missing, *run]) == 2
        assert "run.toml: not a regular file" in capsys.readouterr().err
        assert main(["train", "--set", f"data.source={tmp_path / 'corpus.txt'}", *run]) == 2
        assert "data.source: " in (err := capsys.readouterr().err) and "corpus.txt: not a regular file" in err
        assert main(["prepare", str(tmp_path / "corpus.txt"), str(tmp_path / "out")]) == 2
        assert "source: " in (err := capsys.readouterr().err) and "corpus.txt: not a regular file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "run.toml"]


def test_prepare_then_train_on_tokens(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i}.txt").write_text(("hybrid models mix mixers. " * 20) + str(i))
    assert main(["prepare", str(corpus), str(tmp_path / "tokens")]) == 0
    assert "12 documents" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                "--set",
                f"data.source={tmp_path / 'tokens'}",
                "--set",
                "data.seq_len=32",
                "--set",
                "train.steps=3",
                "--set",
                "train.batch_size=2",
                "--set",
                "model.hidden_size=64",
                "--set",
                "model.num_attention_heads=2",
                "--set",
                "data.val_fraction=0.2",
                "--run-dir",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 0
    )


def test_bare_resume_uses_run_dir(tmp_path, capsys):
    args = [
        "--set",
        "train.steps=2",
        "--set",
        "data.seq_len=32",
        "--set",
        "train.batch_size=2",
        "--set",
        "model.hidden_size=64",
        "--set",
        "model.num_attention_heads=2",
        "--no-progress",
    ]
    assert main(["train", *args, "--run-dir", str(tmp_path / "r")]) == 0
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "r"), "--set", "train.steps=3", "--no-progress"]) == 0
    assert "step 3/3" in capsys.readouterr().out
    assert main(["train", "--resume"]) == 2


def test_fine_tuning_from_a_run_s_model_then_resuming_after_the_folder_is_gone(tmp_path, capsys):
    """train.init_from: a run starts from another run's exported weights and model (the embedded default's [model]
    table does not override it), and its resume reads only its own checkpoint."""
    from tests.helpers import short_documents

    corpus = short_documents(tmp_path / "c.jsonl")
    small = [f"data.source={corpus}", "data.seq_len=32", "train.batch_size=2", "train.steps=2", "--no-progress"]
    model = ["model.pattern=M-*-", "model.hidden_size=32", "model.num_attention_heads=2", "model.mamba_head_dim=16"]
    args = [x for s in small for x in (("--set", s) if "=" in s else (s,))]
    assert main(["train", *args, *(x for s in model for x in ("--set", s)), "--run-dir", str(tmp_path / "a")]) == 0
    init = tmp_path / "a" / "model"
    assert main(["train", *args, "--set", f"train.init_from={init}", "--run-dir", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"init    weights from {init} (train.init_from)" in out and "model   M-*- ·" in out
    init.rename(tmp_path / "moved")
    assert main(["train", "--resume", str(tmp_path / "b"), "--set", "train.steps=3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "step 3/3" in out and "init    " not in out


def test_prepare_names_its_own_argument_and_refuses_before_tokenizing(tmp_path, capsys):
    """prepare's missing source was called data.source (the trainer's field), after an empty progress bar."""
    for source, said in (
        (tmp_path / "missing.txt", f"error: source: {tmp_path / 'missing.txt'} does not exist"),
        ("builtin:wikipedia", "error: source: unknown built-in corpus 'builtin:wikipedia'"),
        (tmp_path, f"error: source: no .txt or .jsonl files under {tmp_path} (hidden ones are left out)"),
    ):
        assert main(["prepare", str(source), str(tmp_path / "prep"), "--progress"]) == 2  # a bar if it tokenized
        err = capsys.readouterr().err
        assert err.startswith(said) and "tokenizing" not in err and "data.source" not in err, err
    (tmp_path / "one.json").write_text('{"text": "a"}')
    assert main(["prepare", str(tmp_path / "one.json"), str(tmp_path / "prep"), "--progress"]) == 2
    err = capsys.readouterr().err
    assert "a .json file; training reads .txt" in err and "tokenizing" not in err, err
    (tmp_path / "empty.txt").write_text("")
    assert main(["prepare", str(tmp_path / "empty.txt"), str(tmp_path / "prep")]) == 0
    assert "wrote 1 token of 1 document to" in capsys.readouterr().out  # the end-of-document token alone


class _FakeTrainer:
    """Stands in for the Trainer: records what the CLI built and returns a set summary (no training)."""

    made: ClassVar[list] = []
    summary: ClassVar[dict] = {}

    def __init__(self, run, run_dir=None, resume=False, progress=None, data_named=False, tokenizer_named=False):
        self.is_main = True
        made = dict(run=run, run_dir=run_dir, resume=resume, data_named=data_named, tokenizer_named=tokenizer_named)
        _FakeTrainer.made.append(made)

    def run_loop(self):
        return dict(_FakeTrainer.summary)

    def close(self, destroy=True):
        pass


@pytest.fixture
def fake_trainer(monkeypatch):
    from hybridlm.train import trainer

    monkeypatch.setattr(trainer, "Trainer", _FakeTrainer)
    _FakeTrainer.made = []
    _FakeTrainer.summary = {"first_val_loss": None, "val_loss": None, "seconds": 0.0}
    return _FakeTrainer


@pytest.mark.parametrize(
    "summary, tokenizer, line",
    [
        (
            {"first_val_loss": 5.5, "val_loss": 1.25, "seconds": 125.7},
            "byte",
            "validation loss 5.5000 -> 1.2500 nats/byte (start -> end) in 2m05s",
        ),
        (
            {"first_val_loss": None, "val_loss": 2.0, "seconds": 61},
            "byte",
            "validation loss 2.0000 nats/byte after 1m01s",
        ),
        ({"first_val_loss": 3.0, "val_loss": None, "seconds": 3}, "byte", None),
        (
            {"first_val_loss": 5.5, "val_loss": 1.25, "seconds": 9},
            "tok.json",
            "validation loss 5.5000 -> 1.2500 nats/token (start -> end) in 0m09s",
        ),
    ],
)
def test_train_summary_line(fake_trainer, capsys, summary, tokenizer, line):
    """Minutes and two-digit seconds; bytes or tokens as the tokenizer counts; a loss line only with a last loss."""
    fake_trainer.summary = summary
    argv = ["train", "--set", f"data.tokenizer={tokenizer}", "--no-progress"] if tokenizer != "byte" else ["train"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ([line] if line else []), out


def test_train_names_the_model_and_its_loss_curve(fake_trainer, capsys, tmp_path):
    fake_trainer.summary = {"first_val_loss": None, "val_loss": None, "seconds": 1, "model": tmp_path / "m"}
    assert main(["train"]) == 0
    assert capsys.readouterr().out == f"model saved to {tmp_path / 'm'}\n"
    fake_trainer.summary |= {"loss_curve": tmp_path / "loss.png"}
    assert main(["train"]) == 0
    assert capsys.readouterr().out == f"model saved to {tmp_path / 'm'}; loss curve {tmp_path / 'loss.png'}\n"


def test_train_builds_the_run_from_config_and_set(fake_trainer, tmp_path):
    """--set overrides the run file; only an override of data.source names the data (a resume may change it), and
    only one of data.tokenizer or data.eos_token its tokenizer."""
    (tmp_path / "run.toml").write_text("[train]\nsteps = 7\n")
    argv = ["train", "--config", str(tmp_path / "run.toml"), "--set", "train.batch_size=4", "--set", "data.seq_len=32"]
    assert main(argv) == 0
    assert main([*argv, "--set", " data . source =builtin:pydoc"]) == 0
    assert main([*argv, "--set", "data.eos_token=auto"]) == 0
    first, second, third = fake_trainer.made
    assert (first["run"].train.steps, first["run"].train.batch_size, first["run"].data.seq_len) == (7, 4, 32)
    assert (first["data_named"], second["data_named"], third["data_named"]) == (False, True, False)
    assert (first["tokenizer_named"], second["tokenizer_named"], third["tokenizer_named"]) == (False, False, True)
    assert (first["resume"], first["run_dir"]) == (False, None)


def test_train_resume_takes_its_folder_and_a_replacing_run_file(fake_trainer, tmp_path, capsys):
    """--resume DIR reads DIR/config.toml unless --config replaces it; --run-dir may name DIR in another spelling."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text("[train]\nsteps = 5\n")
    (tmp_path / "other.toml").write_text("[train]\nsteps = 9\n")
    assert main(["train", "--resume", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--config", str(tmp_path / "other.toml")]) == 0
    assert main(["train", "--resume", "--run-dir", f"{run}/"]) == 0
    assert main(["train", "--resume", str(run), "--run-dir", str(tmp_path / "r" / ".." / "r")]) == 0
    made = fake_trainer.made
    assert [m["run"].train.steps for m in made] == [5, 9, 5, 5]
    assert all(m["resume"] is True for m in made)
    assert [str(m["run_dir"]) for m in made] == [str(run), str(run), f"{run}/", str(run)]
    assert main(["train", "--resume", str(run), "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --resume {run} and --run-dir {tmp_path / 'x'} name different runs; give one\n"
    assert main(["train", "--resume"]) == 2
    assert "error: --resume without a directory needs --run-dir RUN_DIR" in capsys.readouterr().err
    assert len(made) == 4


# -- prepare -------------------------------------------------------------------------------------------


def test_prepare_reads_jsonl_text_fields_by_default(tmp_path, capsys):
    """Each record's "text" is a document: 2 + 1 bytes and one end-of-document token each."""
    (tmp_path / "c.jsonl").write_text('{"text": "ab"}\n{"text": "c", "body": "zzzz"}\n')
    assert main(["prepare", str(tmp_path / "c.jsonl"), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"wrote 5 tokens of 2 documents to {tmp_path / 'out'}\n"


def test_prepare_reads_a_tilde_in_its_output_folder_as_the_home_folder_as_in_its_source(tmp_path, capsys, monkeypatch):
    """``prepare '~/c.jsonl' '~/tokens'`` (quoted, or from a script) read the home folder's corpus but wrote
    ``./~/tokens``, which ``--set data.source='~/tokens'`` (a run file's path, read with ~ as home) did not find."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "home" / "c.jsonl").write_text('{"text": "ab"}\n')
    assert main(["prepare", "~/c.jsonl", "~/tokens"]) == 0
    assert capsys.readouterr().out == f"wrote 3 tokens of 1 document to {tmp_path / 'home' / 'tokens'}\n"
    assert list((tmp_path / "work").iterdir()) == []
    assert main(["prepare", "~/tokens", "~"]) == 2  # the source is inside OUT (its home, ~ read as such)
    assert f"{tmp_path / 'home'}: is the source {tmp_path / 'home' / 'tokens'} or holds it" in capsys.readouterr().err


def test_prepare_refuses_a_folder_it_may_not_replace_before_tokenizing(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"text": "ab"}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.md").write_text("keep")
    assert main(["prepare", str(tmp_path / "c.jsonl"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'out'} exists and is not a prepared corpus; refusing to replace it\n", err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.md"]


@pytest.mark.parametrize(
    "option, message",
    [
        (["--eos-token", "foo"], "--eos-token: the byte tokenizer's end of document is id 256; --eos-token is for"),
        (["--tokenizer", "missing.json"], "--tokenizer: 'missing.json' is neither 'byte' nor an existing"),
    ],
)
def test_prepare_names_its_own_tokenizer_options(tmp_path, capsys, option, message):
    """prepare's flags, not the trainer's data.tokenizer / data.eos_token fields."""
    (tmp_path / "c.jsonl").write_text('{"text": "ab"}\n')
    assert main(["prepare", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), *option]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_resume_names_a_folder_that_is_missing_or_not_a_run(fake_trainer, tmp_path, capsys):
    """--resume of a missing folder, a file or a folder without config.toml (a start abandoned at once) said
    "config: cannot read .../config.toml: No such file or directory", naming a file the user never gave."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for name, says in (
        ("missing", "no such folder; give a run folder"),
        ("file", "not a folder; give a run folder"),
        ("empty", "not a training run (no config.toml; a run writes it once it has started)"),
    ):
        assert main(["train", "--resume", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err == f"error: --resume {tmp_path / name}: {says}" + (
            " that `hybridlm train` wrote\n" if name != "empty" else "\n"
        )
    assert fake_trainer.made == []


def test_an_empty_run_folder_name_is_refused(fake_trainer, tmp_path, capsys, monkeypatch):
    """`--run-dir "$RUN"` with RUN unset trained in the current folder, spreading config.toml, checkpoints/ and
    model/ there (train.run_dir = "" is refused for that reason)."""
    monkeypatch.chdir(tmp_path)
    for argv in (["--run-dir", ""], ["--run-dir", " "], ["--resume", ""], ["--resume", "--run-dir", ""]):
        assert main(["train", *argv]) == 2, argv
        assert "an empty folder name" in capsys.readouterr().err
    assert fake_trainer.made == []


def test_a_tilde_in_the_run_folder_is_the_home_folder_for_a_resume_too(fake_trainer, tmp_path, capsys, monkeypatch):
    """A run started with a quoted ``--run-dir '~/r'`` lives in the home folder (rundir.claim), but the same flag
    with ``--resume`` said "no such folder", and against ``--resume ~/r`` expanded by the shell "different runs"."""
    from pathlib import Path

    from hybridlm.train.config import RunConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home" / "r").mkdir(parents=True)
    (tmp_path / "home" / "r" / "config.toml").write_text(RunConfig().to_toml())
    for argv in (["--resume", "~/r"], ["--run-dir", "~/r", "--resume"], ["--run-dir", "~/r", "--resume", "home/r"]):
        fake_trainer.made = []
        assert main(["train", *argv]) == 0, capsys.readouterr().err
        assert [Path(m["run_dir"]).resolve() for m in fake_trainer.made] == [(tmp_path / "home" / "r").resolve()], argv


def test_a_finished_run_whose_terminal_went_away_exits_0(fake_trainer, monkeypatch):
    """Training goes quiet once its terminal is gone (EIO on every write: a closed window, a job left running), but
    the summary printed after the last step raised EIO out of main: exit 1 (or 2) for a run complete and saved."""
    import errno

    class GoneTerminal:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            raise OSError(errno.EIO, "Input/output error")

    fake_trainer.summary = {"first_val_loss": 5.5, "val_loss": 1.25, "seconds": 9, "model": "runs/x/model"}
    monkeypatch.setattr("sys.stdout", GoneTerminal())
    assert main(["train"]) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_once_the_run_is_complete_changes_nothing(fake_trainer, monkeypatch, capsys, signum):
    """A signal while the summary of a complete, saved run printed said "interrupted by SIGTERM" and exited 143 (130
    for Ctrl-C, with "interrupted"). Now the summary is printed whole, the status is 0, and the caller of main gets
    its handlers back."""
    import hybridlm.cli as cli

    fake_trainer.summary = {"first_val_loss": 5.5, "val_loss": 1.25, "seconds": 9, "model": "runs/x/model"}
    say, sent = cli.say, []

    def signalled(line, *args):  # the signal arrives while the first line of the summary prints
        if not sent:
            sent.append(signum)  # (first: the old handlers raised inside os.kill)
            os.kill(os.getpid(), signum)
        say(line, *args)

    monkeypatch.setattr(cli, "say", signalled)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert main(["train"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "model saved to runs/x/model" and err == ""
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("flag, bar", [(None, False), ("--progress", True), ("--no-progress", False)])
def test_prepare_shows_its_bar_on_a_terminal_or_when_asked(tmp_path, capsys, flag, bar):
    """prepare always drew its bar, into log files too; train drew it only on a terminal. Both now take
    --progress / --no-progress, and neither flag means: on a terminal only (captured stderr is none)."""
    (tmp_path / "a.txt").write_text("some text")
    assert main(["prepare", str(tmp_path / "a.txt"), str(tmp_path / "prep"), *([flag] if flag else [])]) == 0
    assert ("tokenizing" in capsys.readouterr().err) == bar
