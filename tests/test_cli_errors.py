"""Every CLI error: one line, exit 2, no traceback (unless --debug); a full disk says so."""

import errno
import gc
import os
import signal

import pytest

import hybridlm
from hybridlm import HybridLM
from hybridlm.cli import main
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "latin1.toml").write_bytes(b'[data]\nsource = "caf\xe9"\n')
    (d / "nested.toml").write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    (d / "list").mkdir()
    (d / "list/config.json").write_text("[1, 2]")
    (d / "notes.safetensors").write_text("not safetensors")
    hybridlm.save(HybridLM(tiny_config("M-")), d / "model")
    (d / "garbage.json").write_text("{garbage")
    (d / "model/tokenizer.hybridlm.json").write_text("[1]")
    deep = "[" * 100_000 + "]" * 100_000  # nesting past json's recursion limit: RecursionError, not ValueError
    (d / "deep.jsonl").write_text(deep + "\n")
    (d / "bigint.txt").write_text('{"prompt": ' + "1" * 5000 + "}\n")  # past int's 4,300 digits: ValueError
    hybridlm.save(HybridLM(tiny_config("M-", vocab_size=257)), d / "deep-tokenizer")
    (d / "deep-tokenizer/tokenizer.hybridlm.json").write_text(deep)
    for name in ("deep-meta", "deep-config"):
        (d / name).mkdir()
    (d / "deep-meta/meta.json").write_text(deep)
    (d / "deep-config/config.json").write_text(deep)
    return d


CASES = [
    ["pattern", "M-", "--pp", "0"],
    ["pattern", "M-", "--pp", "-1"],
    ["pattern", "M-M-", "--last-stage-layers", "-2", "--pp", "2"],
    ["train", "--set", "train.device=cuda:abc"],
    ["train", "--set", "train.device=cuda:"],
    ["train", "--set", "optim.lr=nan"],
    ["train", "--set", "optim.lr=inf"],
    ["train", "--set", "optim.grad_clip=nan"],
    ["train", "--set", "optim.weight_decay=inf"],
    ["train", "--set", "data.val_fraction=nan"],
    ["train", "--set", "model.rope_theta=inf"],
    ["train", "--set", "model.hidden_size=nan"],
    ["train", "--set", "train.steps=1e400"],
    ["train", "--set", "train.max_nonfinite_steps=0"],
    ["train", "--set", "model=3"],
    ["train", "--config", "{d}/latin1.toml"],
    ["train", "--config", "{d}/nested.toml"],
    ["train", "--config", "{d}"],
    ["train", "--config", "{d}/missing.toml"],
    ["train", "--resume", "{d}/no-run"],
    ["train", "--resume"],
    ["inspect", "{d}/list"],
    ["inspect", "{d}/notes.safetensors"],
    ["inspect", "{d}/missing"],
    ["generate", "{d}/missing", "--prompt", "a"],
    ["generate", "{d}/model", "--prompt", "a", "--tokenizer", "{d}/garbage.json"],
    ["generate", "{d}/model", "--prompt", "a"],
    ["generate", "{d}/list", "--prompt", "a"],
    ["convert", "{d}/model", "{d}/out", "--to", "megatron"],
    ["convert", "{d}/list", "{d}/out2", "--from", "nemotron-h"],
    ["convert", "{d}/list", "{d}/out3", "--from", "qwen3-next"],
    ["convert", "{d}/model", "{d}/out4", "--to", "qwen3-next"],
    ["prepare", "{d}/missing", "{d}/prepared"],
    ["generate", "{d}/model", "--prompts-file", "{d}/deep.jsonl"],
    ["generate", "{d}/model", "--prompts-file", "{d}/bigint.txt"],
    ["generate", "{d}/deep-tokenizer", "--prompt", "a"],
    ["prepare", "{d}/deep-meta", "{d}/prepared"],
    ["prepare", "{d}/notes.safetensors", "{d}/deep-meta"],
    ["convert", "{d}/model", "{d}/deep-config", "--to", "nemotron-h"],
]


@pytest.mark.parametrize("argv", CASES, ids=[" ".join(c)[:60] for c in CASES])
def test_one_line_and_exit_2(files, argv, capsys):
    assert main([a.format(d=files) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if not line.startswith(("tokenizing", "\r"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in lines[0]
    assert "unexpected" not in lines[0], lines[0]  # an error the code did not foresee: a bug, whatever the line


def test_a_model_too_large_to_train_names_a_field(capsys, tmp_path):
    """The allocator's error came from inside torch: "unexpected RuntimeError ... (this may be a bug)"."""
    argv = ["train", "--set", "model.vocab_size=10000000000", "--run-dir", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: model.vocab_size: the model's 3,840,002,033,196 parameters need 57,220.5 GiB per process" in err


def test_an_allocation_the_machine_cannot_meet_is_out_of_memory():
    from hybridlm.cli import _error

    for e in (
        MemoryError("Unable to allocate 191. GiB for an array"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"),
    ):
        message = _error(e)
        assert message.startswith("out of memory (") and "train.batch_size" in message and "bug" not in message


def test_a_heading_and_its_list_join_without_a_semicolon():
    from hybridlm.cli import one_line

    assert one_line("ck does not fit the model:\n  missing: a\n  unexpected: b") == (
        "ck does not fit the model: missing: a; unexpected: b"
    )


def test_long_pattern_shortened_around_the_caret(capsys):
    text = "M-" * 50_000 + "X" + "M-" * 10
    assert main(["pattern", text]) == 2
    err = capsys.readouterr().err
    assert len(err) < 500 and "X" in err and "shortened, error at position 100000" in err
    quoted, caret = err.splitlines()[1:3]
    assert quoted[caret.index("^")] == "X"


def test_pattern_starting_with_a_dash(capsys):
    assert main(["pattern", "--", "-M"]) == 0
    assert "MLP" in capsys.readouterr().out


def test_full_disk_says_so(monkeypatch, capsys):
    import hybridlm.train.trainer as trainer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/.step-000100.tmp")

    monkeypatch.setattr(trainer, "Trainer", full)
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on device (runs/x/") and "\n" not in err
    with pytest.raises(OSError):
        main(["--debug", "train"])


def test_a_dead_peer_process_is_named_with_the_way_back(monkeypatch, capsys):
    import hybridlm.train.trainer as trainer

    def gone(*args, **kwargs):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:939\nmore")

    monkeypatch.setattr(trainer, "Trainer", gone)
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: another process of this torchrun job stopped") and "--resume RUN_DIR" in err
    assert "may be a bug" not in err and "\n" not in err


def test_the_resume_command_names_torchrun_under_torchrun(tmp_path, monkeypatch):
    from tests.train.test_trainer import tiny_run

    t = trainer_for(tmp_path, tiny_run())
    assert t.resume_command() == f"hybridlm train --resume {tmp_path}"
    t.world = 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert t.resume_command() == f"torchrun --nnodes 2 --nproc_per_node 4 -m hybridlm.cli train --resume {tmp_path}"


def trainer_for(path, run):
    from hybridlm.train.trainer import Trainer

    return Trainer(run, run_dir=path, progress=False)


@pytest.mark.parametrize(("signum", "status"), [(2, 130), (15, 143), (1, 129)])
def test_training_stopped_by_a_signal_exits_128_plus_n(monkeypatch, capsys, signum, status):
    import hybridlm.train.trainer as trainer
    from hybridlm.train.signals import TrainingInterrupted

    def stopped(*args, **kwargs):
        raise TrainingInterrupted(signum, "SIGTERM received: ...; resume with: hybridlm train --resume runs/x")

    monkeypatch.setattr(trainer, "Trainer", stopped)
    assert main(["train"]) == status
    assert "resume with: hybridlm train --resume runs/x" in capsys.readouterr().err


def test_training_stopped_by_sighup_of_a_closed_terminal_still_exits_129(monkeypatch):
    """After SIGHUP from a closed terminal stderr fails with EIO: printing the stop message raised out of main
    (exit 1, as if the run had failed) though the checkpoint was saved."""
    import hybridlm.train.trainer as trainer
    from hybridlm.train.signals import TrainingInterrupted

    class GoneTerminal:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            raise OSError(errno.EIO, "Input/output error")

    def stopped(*args, **kwargs):
        raise TrainingInterrupted(1, "SIGHUP received: ...; resume with: hybridlm train --resume runs/x")

    monkeypatch.setattr(trainer, "Trainer", stopped)
    monkeypatch.setattr("sys.stderr", GoneTerminal())
    assert main(["train"]) == 129


@pytest.mark.parametrize("interrupt, status", [("sighup", 128 + signal.SIGHUP), ("sigint", 130)])
def test_another_command_stopped_by_sighup_of_a_closed_terminal_still_exits_129(monkeypatch, interrupt, status):
    """`prepare`, `convert` or `generate` stopped by the SIGHUP of a closed terminal (or Ctrl-C with stderr gone):
    printing "interrupted by SIGHUP" to the gone stderr raised EIO out of main, exit 1 instead of 129."""
    import hybridlm.cli as cli

    class GoneTerminal:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            raise OSError(errno.EIO, "Input/output error")

    def hung_up(text, *args, **kwargs):
        raise cli._Terminated(signal.SIGHUP) if interrupt == "sighup" else KeyboardInterrupt

    monkeypatch.setattr("hybridlm.pattern.parse", hung_up)
    monkeypatch.setattr("sys.stderr", GoneTerminal())
    assert main(["pattern", "M-"]) == status


def test_a_closed_pipe_ends_quietly():
    """`hybridlm pattern ... | head -1`: the reader leaves early; no error message, no traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "hybridlm.cli", "pattern", "M-" * 2000 + "*-"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc (Linux)")
def test_a_closed_pipe_in_a_callers_process_leaves_no_descriptor_open(monkeypatch, tmp_path):
    """main() in a caller's process (a harness) whose stdout's reader went away: the /dev/null opened to take
    stdout's place was copied onto it and left open, one more descriptor at every such call."""

    class GonePipe:  # a stdout whose reader left; its descriptor is a file of this test
        def __init__(self, fd):
            self.fd = fd

        def fileno(self):
            return self.fd

        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

    with open(tmp_path / "out", "w") as out:
        monkeypatch.setattr("sys.stdout", GonePipe(out.fileno()))
        gc.collect()  # (files an earlier test left to the collector would otherwise close between the counts)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            assert main(["pattern", "M-"]) == 141
        assert len(os.listdir("/proc/self/fd")) == before


@pytest.fixture
def handlers_kept():
    """The stop signals' handlers of this process, put back after a test that runs ``entry`` (which leaves them
    ignored: nothing follows it in a process of its own)."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in kept.items():
        signal.signal(s, handler)


def test_a_torchrun_process_leaves_with_os_exit_after_flushing(monkeypatch, capsys, handlers_kept):
    """`hybridlm.cli.entry` under torchrun (WORLD_SIZE > 1): main's status through os._exit, output flushed."""
    import logging
    import os
    import sys

    from hybridlm.cli import entry

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["hybridlm", "pattern", "M-"])
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # pytest's own log handlers stay open
    with pytest.raises(SystemExit):
        entry()
    assert exits == [0] and "Mamba2" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["hybridlm", "pattern", "M-", "--pp", "0"])
    with pytest.raises(SystemExit):
        entry()
    assert exits == [0, 2]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_the_interpreter_shuts_down_keeps_the_status(tmp_path, signum):
    """A command has ended (a training run complete and saved), then a signal arrives while Python shuts down
    (a second or so with torch loaded): SIGTERM and SIGHUP killed the process (143, 129), Ctrl-C raised
    KeyboardInterrupt into the shutdown (a traceback). The command's status stands, and nothing is printed. The
    signal comes from an exit handler (atexit runs it last: it is registered first)."""
    import os
    import subprocess
    import sys

    code = (
        "import atexit, os, sys\n"
        f"atexit.register(os.kill, os.getpid(), {int(signum)})\n"
        "sys.argv = ['hybridlm', 'pattern', 'M-']\n"
        "from hybridlm.cli import entry\n"
        "entry()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "Mamba2" in proc.stdout


@pytest.mark.parametrize(
    "argv, prefix",
    [
        (["train", "--bogus"], "hybridlm train: error: unrecognized arguments: --bogus"),
        (["pattern", "M-", "--bogus", "x"], "hybridlm pattern: error: unrecognized arguments: --bogus x"),
        (["convert", "a", "b", "--to", "foo"], "hybridlm convert: error: argument --to: invalid choice"),
        (["generate"], "hybridlm generate: error: the following arguments are required"),
    ],
)
def test_unparsable_options_get_their_commands_usage(capsys, argv, prefix):
    """An unknown flag too (argparse reported it under the top-level usage, as "hybridlm: error")."""
    from hybridlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: hybridlm {argv[0]} " in err and prefix in err, err


def test_other_os_errors_read_as_their_reason_and_file():
    """An OSError is shown by its reason and, where it has one, its file: not Python's '[Errno 13] ...' form, and
    no '(None)' for an error without a file."""
    from hybridlm.cli import _error

    assert _error(PermissionError(errno.EACCES, "Permission denied", "runs/x/log.txt")) == (
        "Permission denied (runs/x/log.txt)"
    )
    assert _error(OSError(errno.EIO, "Input/output error")) == "Input/output error"
    assert _error(OSError(errno.ENOSPC, "No space left on device")).startswith("no space left on device: free")


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_two_operands_that_look_like_patterns_are_left_to_argparse(capsys):
    """Only a single dash-led pattern operand is moved after '--'; with two, neither is taken for the pattern."""
    from hybridlm.cli import dash_pattern_operands

    assert dash_pattern_operands(["pattern", "-M", "--pp", "2"]) == ["pattern", "--pp", "2", "--", "-M"]
    assert dash_pattern_operands(["pattern", "-M", "-M-"]) == ["pattern", "-M", "-M-"]


def test_a_dash_led_pattern_of_any_layer_symbol_is_taken_for_the_pattern():
    """The pattern characters come from the pattern language's symbols (a copy of them missed a new kind)."""
    from hybridlm.cli import dash_pattern_operands
    from hybridlm.pattern.symbols import LAYER_SYMBOLS

    for s in LAYER_SYMBOLS:
        operand = f"-{s}[{s}E]|{s}/{s}"
        assert dash_pattern_operands(["plan", operand, "--pp", "2"]) == ["plan", "--pp", "2", "--", operand]


def test_only_hybridlm_errors_choose_the_exit_status(monkeypatch, capsys):
    """An exit_status on a foreign exception (here 0) is no training interruption: the command fails with status 2."""
    import hybridlm.train.trainer as trainer

    class Foreign(RuntimeError):
        exit_status = 0

    def failing(*args, **kwargs):
        raise Foreign("from elsewhere")

    monkeypatch.setattr(trainer, "Trainer", failing)
    assert main(["train"]) == 2
    assert capsys.readouterr().err.startswith("error: unexpected Foreign: from elsewhere")


def test_messages_become_one_line_without_empty_pieces():
    """Blank lines are dropped, not joined as '; ;'; an unexpected error's message is one line too; a MemoryError
    without a message is named by its type."""
    from hybridlm.cli import _error, one_line

    assert one_line("first\n\n  \nsecond\n") == "first; second"
    # A list's bullets: "cannot be exported as Hugging Face NemotronH: - position_embedding=..." read as a stray dash.
    assert one_line("cannot be exported:\n  - one\n  - two") == "cannot be exported: one; two"
    unexpected = _error(TypeError("a\nb"))
    assert "\n" not in unexpected and unexpected.startswith("unexpected TypeError: a; b (this may be a bug")
    assert _error(MemoryError()).startswith("out of memory (MemoryError): ")


def test_a_cuda_device_without_cuda_is_refused_by_its_flag(files, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["generate", str(files / "model"), "--prompt", "a", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda: no CUDA device is available"


@pytest.mark.parametrize("signum, status", [(15, 143), (1, 129)])
def test_sigterm_during_a_write_removes_its_temporary_folder(tmp_path, signum, status):
    """SIGTERM (or SIGHUP) while `prepare` wrote its output killed the process with the default action: the hidden
    .OUT.tmp-ID folder (as large as the corpus) stayed behind. Now it raises as SIGINT does: removed, exit 128 + N."""
    import os
    import subprocess
    import sys

    (tmp_path / "c.jsonl").write_text('{"text": "some text"}\n' * 10)
    code = (
        "import os, sys\n"
        "import hybridlm.train.data as data\n"
        "from hybridlm.cli import main\n"
        "write = data._write_prepared\n"
        "def killed(*args):\n"
        "    write(*args)\n"
        f"    os.kill(os.getpid(), {signum})\n"
        "    for _ in range(10**8): pass\n"
        "data._write_prepared = killed\n"
        f"sys.exit(main(['prepare', {str(tmp_path / 'c.jsonl')!r}, {str(tmp_path / 'out')!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.endswith(f"interrupted by {'SIGTERM' if signum == 15 else 'SIGHUP'}\n"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_training_stopped_with_its_pipe_reader_still_exits_143(monkeypatch):
    """Ctrl-C or a SIGTERM to ``hybridlm train 2>&1 | tee log`` stops tee at once: printing the stop message to
    the broken pipe raised BrokenPipeError out of main's handler (exit 1, as if the run had failed) though the
    checkpoint was saved."""
    import hybridlm.train.trainer as trainer
    from hybridlm.train.signals import TrainingInterrupted

    class GonePipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def stopped(*args, **kwargs):
        raise TrainingInterrupted(signal.SIGTERM, "SIGTERM received: ...; resume with: hybridlm train --resume runs/x")

    monkeypatch.setattr(trainer, "Trainer", stopped)
    monkeypatch.setattr("sys.stderr", GonePipe())
    assert main(["train"]) == 128 + signal.SIGTERM
