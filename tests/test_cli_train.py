"""The README's main command, shortened (the CI smoke test), and `hybridlm generate` / `prepare` on its output."""

import subprocess
import sys

from hybridlm.cli import main


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


def test_prepare_names_its_own_argument_and_refuses_before_tokenizing(tmp_path, capsys):
    """prepare's missing source was called data.source (the trainer's field), after an empty progress bar."""
    for source, said in (
        (tmp_path / "missing.txt", f"error: source: {tmp_path / 'missing.txt'} does not exist"),
        ("builtin:wikipedia", "error: source: unknown built-in corpus 'builtin:wikipedia'"),
        (tmp_path, f"error: source: no .txt or .jsonl files under {tmp_path}"),
    ):
        assert main(["prepare", str(source), str(tmp_path / "prep")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(said) and "tokenizing" not in err and "data.source" not in err, err
    (tmp_path / "one.json").write_text('{"text": "a"}')
    assert main(["prepare", str(tmp_path / "one.json"), str(tmp_path / "prep")]) == 2
    err = capsys.readouterr().err
    assert "a .json file; training reads .txt" in err and "tokenizing" not in err, err
    (tmp_path / "empty.txt").write_text("")
    assert main(["prepare", str(tmp_path / "empty.txt"), str(tmp_path / "prep")]) == 0
    assert "wrote 1 token of 1 document to" in capsys.readouterr().out  # the end-of-document token alone
