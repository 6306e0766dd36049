"""The run folder: one run per folder, config.toml written only once a run has started, failed starts
and refused resumes leave no trace; write errors inside a save reach the user as one line."""

import errno
import os
import signal

import pytest

from hybridlm.cli import main
from hybridlm.errors import CheckpointError, CheckpointMismatchError, ConfigError, DataError
from hybridlm.train import rundir
from hybridlm.train.signals import TrainingInterrupted
from hybridlm.train.trainer import Trainer
from tests.train.test_trainer import TINY_RUN, tiny_run


def _args(*extra):
    return [a for kv in [*TINY_RUN, *extra] for a in ("--set", kv)]


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20261202-010203")
    template = str(tmp_path / "runs" / "{time}")
    got = [rundir.claim(None, template, "toml", resume=False) for _ in range(3)]
    assert [p.name for p, _ in got] == ["20261202-010203", "20261202-010203-2", "20261202-010203-3"]
    assert all(created for _, created in got)


def test_a_run_dir_asked_for_with_the_time_field_is_a_template(tmp_path, monkeypatch):
    """``--run-dir 'x/{time}'`` fills in the start time as ``train.run_dir`` does (it made a folder named
    ``{time}``); a resume takes the folder it is given as it is."""
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20261202-010203")
    asked = str(tmp_path / "x" / "{time}")
    got = [rundir.claim(asked, "runs/{time}", "toml", resume=False)[0] for _ in range(2)]
    assert got == [tmp_path / "x" / "20261202-010203", tmp_path / "x" / "20261202-010203-2"]
    assert not (tmp_path / "x" / "{time}").exists()


def test_a_tilde_in_train_run_dir_is_the_home_folder(tmp_path, monkeypatch):
    """No shell expands a run file's ``run_dir = "~/runs/{time}"`` (or a quoted ``--run-dir '~/x'``): it made a
    folder named ``~`` in the current one."""
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20261202-010203")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert (
        rundir.claim(None, "~/runs/{time}", "toml", resume=False)[0] == tmp_path / "home" / "runs" / "20261202-010203"
    )
    assert rundir.claim("~/x", "runs/{time}", "toml", resume=False)[0] == tmp_path / "home" / "x"
    # A user that does not exist: the name stays as given (pathlib raised RuntimeError, an "unexpected" error).
    assert rundir.claim("~nobody-hybridlm/x", "runs/{time}", "toml", resume=False)[0].parts[:2] == (
        "~nobody-hybridlm",
        "x",
    )
    assert not (tmp_path / "~").exists()


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path):
    run = tiny_run("train.steps=2", "train.checkpoint_every=100")
    for name, make in (
        ("metrics", lambda p: (p / "metrics.jsonl").write_text('{"step": 0}\n')),
        ("model", lambda p: (p / "model").mkdir()),
        ("user", lambda p: (p / "config.toml").write_text("# my run file\n")),
    ):
        (tmp_path / name).mkdir()
        make(tmp_path / name)
        before = sorted(os.listdir(tmp_path / name))
        with pytest.raises(DataError, match=r"already holds a run|exists and is not this run's"):
            Trainer(run, run_dir=tmp_path / name, progress=False)
        assert sorted(os.listdir(tmp_path / name)) == before
    assert (tmp_path / "user" / "config.toml").read_text() == "# my run file\n"
    # Its own config.toml (a trainer built but not run) and an empty folder are fine.
    Trainer(run, run_dir=tmp_path / "fresh", progress=False)
    Trainer(run, run_dir=tmp_path / "fresh", progress=False)


def test_a_failed_start_leaves_no_folder_and_a_refused_resume_keeps_config_toml(tmp_path):
    with pytest.raises(DataError):
        Trainer(tiny_run("data.source=" + str(tmp_path / "missing.txt")), run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    run = tiny_run("train.steps=2", "train.checkpoint_every=1")
    Trainer(run, run_dir=tmp_path / "run", progress=False).run_loop()
    toml = (tmp_path / "run" / "config.toml").read_text()
    for bad, error in (
        (tiny_run("train.steps=4", "model.hidden_size=48"), CheckpointMismatchError),
        (tiny_run("train.steps=4", "data.source=" + str(tmp_path / "missing.txt")), DataError),
        (tiny_run("train.steps=1"), DataError),  # the checkpoint is at step 2: nothing to train
    ):
        with pytest.raises(error):
            Trainer(bad, run_dir=tmp_path / "run", resume=True, progress=False)
        assert (tmp_path / "run" / "config.toml").read_text() == toml
    # A model/ folder the final export could not replace is refused before training, not after it.
    (tmp_path / "run2" / "model").mkdir(parents=True)
    (tmp_path / "run2" / "model" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="is not a hybridlm checkpoint; refusing"):
        Trainer(run, run_dir=tmp_path / "run2", resume=True, progress=False)


def test_a_write_error_inside_a_save_is_one_line(tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # DCP flushes each file it writes
    args = ["train", *_args("train.steps=1"), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on device") and "Traceback" not in err


@pytest.mark.parametrize(
    "number, at, said", [(errno.ENOSPC, 8, "no space left on device"), (errno.EDQUOT, 4, "disk quota exceeded")]
)
def test_a_full_disk_at_a_save_names_the_checkpoint_kept_and_how_to_go_on(
    tmp_path, monkeypatch, capsys, number, at, said
):
    """The save of step ``at`` finds the disk full (or the user's quota reached): the message said "free some space,
    or write elsewhere, and retry", but a retry (the same command) is refused, the folder holding a run. It now names
    the checkpoint the run kept and the resume command, or, with none kept, how to start again. Still an OSError
    with its number and file, for a caller in Python."""
    import torch.distributed.checkpoint as dcp

    save = dcp.save

    def full(*args, checkpoint_id, **kwargs):
        if checkpoint_id.endswith(f".step-{at:06d}.tmp"):
            raise OSError(number, os.strerror(number))  # (DCP's write names no file: the save names its folder)
        return save(*args, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(dcp, "save", full)
    run = tmp_path / "run"
    assert main(["train", *_args(), "--run-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    if at == 8:
        then = f"the last checkpoint is {run}/checkpoints/step-000004; free some space, then resume with: "
        then += f"hybridlm train --resume {run}"
    else:
        then = f"no checkpoint was written; free some space, then start again with --config {run}/config.toml and "
        then += "another --run-dir"
    assert err == f"error: {said} ({run}/checkpoints/.step-{at:06d}.tmp) at step {at}: training stopped; {then}\n"
    monkeypatch.undo()
    if at == 8:  # the command it gives continues the run
        assert main(["train", "--resume", str(run), "--no-progress"]) == 0
        assert (run / "model" / "config.json").is_file()
    from hybridlm.errors import DiskFullError

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(DiskFullError) as info:  # from Python: the OSError, with what the run kept
        Trainer(tiny_run(), run_dir=tmp_path / "again", progress=False).run_loop()
    assert isinstance(info.value, OSError) and info.value.errno == number
    assert info.value.filename == str(tmp_path / "again" / "checkpoints" / f".step-{at:06d}.tmp")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_at_a_metrics_write_stays_named_when_closing_the_metrics_fails_again(tmp_path):
    """metrics.jsonl's write finds the disk full (/dev/full: every flush fails with ENOSPC). Closing the metrics at
    the end of run_loop flushes the same row again, which fails again: that bare OSError ("[Errno 28] No space left
    on device", no file) replaced the DiskFullError that names the step and how to go on, and the TensorBoard
    writer after it was never closed (its thread left behind)."""
    from hybridlm.errors import DiskFullError

    t = Trainer(tiny_run(), run_dir=tmp_path / "run", progress=False)
    t.metrics._jsonl.close()
    t.metrics._jsonl = open("/dev/full", "a")  # noqa: SIM115 (closed by run_loop)
    with pytest.raises(DiskFullError) as info:
        t.run_loop()
    assert str(info.value).startswith("no space left on device (/dev/full) at step 0: training stopped; no checkpoint")
    assert t.metrics._jsonl.closed
    if t.metrics._tb is not None:  # (tensorboard installed)
        assert t.metrics._tb.all_writers is None  # closed


def test_cli_refuses_resume_and_run_dir_naming_two_runs(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b")]) == 2
    assert "name different runs" in capsys.readouterr().err


def test_settings_that_change_nothing_are_noted(tmp_path, capsys):
    run = tiny_run("train.steps=2", "optim.warmup_steps=5", "train.ac_policy=selective", "parallel.microbatches=3")
    notes = run.notes()
    assert any("never reaches optim.lr" in n for n in notes)
    assert any("at the last step only" in n for n in tiny_run("train.steps=5", "optim.warmup_steps=5").notes())
    assert any("train.ac_policy has no effect" in n for n in notes)
    assert any("parallel.microbatches has no effect" in n for n in notes)
    assert tiny_run().notes() == []
    t = Trainer(run, run_dir=tmp_path, progress=False)
    assert [line for line in t.describe() if line.startswith("note")] == [f"note    {n}" for n in notes]


def test_an_empty_pattern_is_refused():
    with pytest.raises(ConfigError, match="no layers"):
        tiny_run("model.pattern=").model_config()


def test_a_folder_in_use_by_another_live_process_is_refused(tmp_path):
    """Two runs started in one folder would write the same files: the second is refused while the
    first lives; a lock left by a process that is gone is taken over, and a finished run frees it."""
    import socket

    run = tiny_run("train.steps=2", "train.checkpoint_every=100")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / rundir.LOCK_FILE).write_text(f"{os.getppid()} {socket.gethostname()}")
    with pytest.raises(DataError, match=r"in use by another run \(process \d+"):
        Trainer(run, run_dir=tmp_path / "busy", progress=False)
    with pytest.raises(DataError, match="in use by another run"):
        Trainer(run, run_dir=tmp_path / "busy", resume=True, progress=False)
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    (tmp_path / "busy" / rundir.LOCK_FILE).write_text(f"{dead} {socket.gethostname()}")
    t = Trainer(run, run_dir=tmp_path / "busy", progress=False)
    t.run_loop()
    assert not (tmp_path / "busy" / rundir.LOCK_FILE).exists()


def _claim_at(path, start, results):
    import time

    while time.time() < start:  # both processes claim at the same instant
        pass
    try:
        rundir.claim(path, "runs/{time}", "", resume=True)
        results.put("claimed")
    except DataError:
        results.put("refused")
    time.sleep(0.3)  # a live run while the other decides


# fork, not spawn: both children must reach the claim within the same instant, which spawn's
# seconds of start-up cannot promise; the children run only Python file calls, no torch threads.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("stale", [True, False], ids=["stale-lock", "no-lock"])
def test_two_processes_starting_at_once_never_both_hold_a_folder(tmp_path, stale):
    """Between creating the lock file and writing it, the other process read it empty, judged it dead and took
    it; a stale lock was taken by read-then-write: both claimed the folder in 15 of 40 tries."""
    import multiprocessing
    import socket
    import time

    ctx = multiprocessing.get_context("fork")
    for trial in range(8):
        path = tmp_path / str(trial)
        path.mkdir()
        if stale:
            (path / rundir.LOCK_FILE).write_text(f"{2**22 + 12345} {socket.gethostname()}")  # a pid no process has
        results = ctx.Queue()
        start = time.time() + 0.2
        procs = [ctx.Process(target=_claim_at, args=(path, start, results)) for _ in range(2)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert got == ["claimed", "refused"], (trial, got)


def test_a_new_run_in_a_live_run_s_folder_is_told_it_is_in_use(tmp_path):
    """Not "already holds a run ... remove it", which is no advice for a folder a live run writes."""
    import socket

    run = tiny_run("train.steps=2", "train.checkpoint_every=100")
    Trainer(run, run_dir=tmp_path / "live", progress=False).run_loop()  # a run's files
    (tmp_path / "live" / rundir.LOCK_FILE).write_text(f"{os.getppid()} {socket.gethostname()}")
    with pytest.raises(DataError, match=r"in use by another run \(process \d+"):
        Trainer(run, run_dir=tmp_path / "live", progress=False)


def test_a_bad_kernel_choice_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDLM_KERNELS", "fast")
    with pytest.raises(ConfigError, match=r"^HYBRIDLM_KERNELS: 'fast': expected one of"):
        Trainer(tiny_run(), run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_cr_line_endings_still_split_jsonl_lines(tmp_path):
    from hybridlm.train.data import text_documents

    (tmp_path / "cr.jsonl").write_bytes(b'{"text":"aaaa"}\r{"text":"bbbb"}\r\n{"text":"cc"}\n')
    assert list(text_documents(str(tmp_path / "cr.jsonl"))) == ["aaaa", "bbbb", "cc"]


def test_a_refused_resume_moves_nothing_aside_and_one_folder_has_one_name(tmp_path, monkeypatch, capsys):
    run = tiny_run("train.steps=4", "train.checkpoint_every=2")
    Trainer(run, run_dir=tmp_path / "r", progress=False).run_loop()
    (tmp_path / "r" / "checkpoints" / "step-000004" / "trainer_state.json").write_text("garbage")
    before = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    with pytest.raises(DataError, match=r"beyond train\.steps"):  # falls back to step 2, then refuses
        Trainer(tiny_run("train.steps=1"), run_dir=tmp_path / "r", resume=True, progress=False)
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == before
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "r", "--run-dir", str(tmp_path / "r"), "--set", "train.steps=1"]) == 2
    assert "beyond train.steps" in capsys.readouterr().err  # the same run, named twice: not refused as two


def test_a_resume_removes_what_interrupted_writes_left(tmp_path, caplog):
    """A kill during an export or a save left hidden folders (16 MB each for a 16 MB model) that nothing removed."""
    import logging

    run = tiny_run("train.steps=4", "train.checkpoint_every=2")
    Trainer(run, run_dir=tmp_path, progress=False).run_loop(until=2)
    left = [".model.tmp-0123abcd", ".model.del-deadbeef", "checkpoints/.step-000004.tmp", "checkpoints/.x.old-89abcdef"]
    for name in left:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    kept = [".notes", ".model.tmp-mine"]  # not names an interrupted write leaves
    for name in kept:
        (tmp_path / name).write_text("mine")
    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint"):
        Trainer(run, run_dir=tmp_path, resume=True, progress=False)
    assert not any((tmp_path / name).exists() for name in left)
    assert all((tmp_path / name).read_text() == "mine" for name in kept)
    assert "removed what interrupted writes left" in caplog.text


def test_a_resume_stopped_while_it_removes_leftovers_frees_the_folder(tmp_path, monkeypatch):
    """Ctrl-C while a resume deletes what a killed save left (seconds for a large checkpoint on a network file
    system) stopped the start but kept the folder locked by this process until it exited: in a notebook, every
    later run in that folder was refused as "in use by another run"."""
    run = tiny_run("train.steps=4", "train.checkpoint_every=2")
    Trainer(run, run_dir=tmp_path, progress=False).run_loop(until=2)
    (tmp_path / "checkpoints" / ".step-000004.tmp").mkdir()

    def interrupted(folder):
        os.kill(os.getpid(), signal.SIGINT)  # the set-up's handler raises here
        return []

    monkeypatch.setattr(rundir, "remove_leftovers", interrupted)
    with pytest.raises(TrainingInterrupted, match="while setting up"):
        Trainer(run, run_dir=tmp_path, resume=True, progress=False)
    assert not (tmp_path / rundir.LOCK_FILE).exists()
    assert tmp_path.resolve() not in rundir._HELD  # its flock released too


def _claim_refused(path):
    """Whether rundir.claim refuses ``path`` (a folder claimed by mistake is released again)."""
    try:
        rundir.claim(path, "runs/{time}", "", resume=True)
    except DataError as e:
        assert "in use by another run" in str(e)
        return True
    rundir.unlock(path)
    return False


def test_a_lock_from_another_host_is_trusted(tmp_path):
    """A lock written on another machine cannot be checked: it was taken as dead and two nodes shared a folder."""
    import socket

    (tmp_path / "r").mkdir()
    lock_file = tmp_path / "r" / rundir.LOCK_FILE
    lock_file.write_text(f"{2**22 + 12345} not-{socket.gethostname()}")
    assert _claim_refused(tmp_path / "r")
    assert lock_file.read_text() == f"{2**22 + 12345} not-{socket.gethostname()}"


def test_a_lock_of_another_users_live_process_is_trusted(tmp_path, monkeypatch):
    """kill(pid, 0) raising PermissionError means the process lives (under another user): it was taken as dead."""
    import socket

    def kill(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / rundir.LOCK_FILE).write_text(f"{2**22 + 12345} {socket.gethostname()}")
    monkeypatch.setattr(rundir.os, "kill", kill)
    assert _claim_refused(tmp_path / "r")


def test_unlock_leaves_another_process_s_lock(tmp_path):
    """unlock removes only this process's lock: it removed a live run's lock from its folder."""
    import socket

    (tmp_path / "r").mkdir()
    lock_file = tmp_path / "r" / rundir.LOCK_FILE
    lock_file.write_text(f"{os.getppid()} {socket.gethostname()}")
    rundir.unlock(tmp_path / "r")
    assert lock_file.read_text() == f"{os.getppid()} {socket.gethostname()}"
    rundir.claim(tmp_path / "s", "runs/{time}", "", resume=False)  # this process's own lock is removed
    assert (tmp_path / "s" / rundir.LOCK_FILE).exists()
    rundir.unlock(tmp_path / "s")
    assert not (tmp_path / "s" / rundir.LOCK_FILE).exists()


def _start_of(pid):
    """Boot id and start time (field 22 of /proc/PID/stat, after the parenthesized command name) of ``pid``."""
    with open("/proc/sys/kernel/random/boot_id") as boot, open(f"/proc/{pid}/stat") as stat:
        return boot.read().strip(), stat.read().rsplit(")", 1)[1].split()[19]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc/PID/stat (Linux)")
def test_a_lock_whose_pid_now_names_another_process_is_taken_over(tmp_path):
    """After a reboot, or once pids wrap around, a killed run's pid names an unrelated live process, which kept the
    folder "in use" for good. The lock records its process's start (boot id, start time): another start is stale."""
    import socket

    host, run = socket.gethostname(), tmp_path / "r"
    run.mkdir()
    lock_file = run / rundir.LOCK_FILE
    boot, ticks = _start_of(os.getpid())
    for stale in (f"{boot} {int(ticks) - 1}", f"another-boot {ticks}"):  # this live pid, another process's start
        lock_file.write_text(f"{os.getpid()} {host} {stale}")
        assert not _claim_refused(run)
    rundir.claim(run, "runs/{time}", "", resume=True)
    assert lock_file.read_text() == f"{os.getpid()} {host} {boot} {ticks}"
    rundir.unlock(run)
    parent = os.getppid()  # alive: refused with its own start, and with none (a lock an older hybridlm wrote)
    for held in (" ".join([str(parent), host, *_start_of(parent)]), f"{parent} {host}"):
        lock_file.write_text(held)
        assert _claim_refused(run)
        assert lock_file.read_text() == held


def test_a_damaged_data_position_falls_back_to_the_older_checkpoint(tmp_path, caplog):
    """It was refused after the newest checkpoint had loaded, outside the fallback: the resume stopped, though
    an older checkpoint was sound (as it does for a damaged step or scheduler entry)."""
    import json

    run = tiny_run("train.steps=4", "train.checkpoint_every=2")
    Trainer(run, run_dir=tmp_path / "r", progress=False).run_loop()
    file = tmp_path / "r" / "checkpoints" / "step-000004" / "trainer_state.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | {"data_position": {"rows": -1, "seq_len": 64}}))
    trainer = Trainer(tiny_run("train.steps=6"), run_dir=tmp_path / "r", resume=True, progress=False)
    assert trainer.step == 2
    assert "damaged data_position" in caplog.text


def test_a_lock_without_a_start_naming_this_process_is_taken_over(tmp_path):
    """A lock with pid and host only (an older hybridlm's) that names this very process was written by a process
    that is gone (a container restarted under the same host name starts its run under the same pid): the pid
    alone was compared once, and the lock taken over; with the start added to this process's own line, the
    old line no longer equalled it and the live pid (this process) refused the folder to itself."""
    import socket

    run = tmp_path / "r"
    run.mkdir()
    (run / rundir.LOCK_FILE).write_text(f"{os.getpid()} {socket.gethostname()}")
    assert not _claim_refused(run)


def test_a_damaged_data_position_leaves_nothing_of_its_checkpoint_behind(tmp_path):
    """The data position was checked after the newest checkpoint had loaded: its moments stayed in the optimizer
    when the fallback then loaded a checkpoint saved before the first step (which holds none, and so leaves the
    optimizer as it is), and the resumed run trained on from another run's moments."""
    import json

    run = tiny_run("train.steps=2", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    trainer = Trainer(run, run_dir=tmp_path / "r", progress=False)
    trainer.save_checkpoint()  # step 0: no optimizer state
    trainer.run_loop()
    file = tmp_path / "r" / "checkpoints" / "step-000002" / "trainer_state.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | {"data_position": {"rows": -1, "seq_len": 64}}))
    resumed = Trainer(tiny_run("train.steps=4"), run_dir=tmp_path / "r", resume=True, progress=False)
    assert resumed.step == 0 and len(resumed.optimizer.state) == 0


def test_a_run_folder_that_cannot_be_created_names_why_and_the_flag(tmp_path):
    """A file where a parent folder must be came out as the system's "Not a directory (a.txt/sub)", naming
    neither the setting nor the file in the way."""
    (tmp_path / "a.txt").write_text("")
    for run_dir in (tmp_path / "a.txt" / "sub", tmp_path / "a.txt" / "sub" / "{time}"):
        with pytest.raises(DataError, match=r"cannot create the run folder: .*a\.txt is a file, not a folder; choose"):
            rundir.claim(str(run_dir), "runs/{time}", "", resume=False)


def test_a_checkpoint_that_is_no_folder_is_named_not_taken_for_a_run_stopped_before_its_first(tmp_path):
    """A step-N that is a broken link (checkpoints on purged scratch space) or a file, or a checkpoints/ that is
    one, was not listed, and the resume said "the run stopped before its first: start it anew"."""
    import shutil

    run = tiny_run("train.steps=2")
    Trainer(run, run_dir=tmp_path, progress=False).run_loop()
    checkpoints = tmp_path / "checkpoints"
    shutil.rmtree(checkpoints / "step-000002")
    (checkpoints / "step-000002").symlink_to(tmp_path / "purged" / "step-000002")
    with pytest.raises(DataError, match=r"checkpoints\); step-000002 in it is not a folder \(a broken link\?\)$"):
        Trainer(run, run_dir=tmp_path, resume=True, progress=False)
    shutil.rmtree(checkpoints)
    checkpoints.write_text("")
    with pytest.raises(DataError, match=r"checkpoints\); it is not a folder \(a file, or a broken link\?\)$"):
        Trainer(run, run_dir=tmp_path, resume=True, progress=False)


def test_a_checkpoint_left_between_two_renames_is_put_back_at_resume(tmp_path, caplog):
    """Where the system cannot swap two folders in one step, replacing step-N renames it to .step-N.old-ID, then the
    new one into place: a kill between the two left the checkpoint only under the hidden name, which the next
    resume deleted as a leftover (with the new copy beside it), so the run went back to an older step."""
    import logging
    import shutil

    run = tiny_run("train.steps=6", "train.checkpoint_every=2")
    Trainer(run, run_dir=tmp_path, progress=False).run_loop(until=4)
    ckpts = tmp_path / "checkpoints"
    os.replace(ckpts / "step-000004", ckpts / ".step-000004.old-0123abcd")
    shutil.copytree(ckpts / ".step-000004.old-0123abcd", ckpts / ".step-000004.tmp")  # the new copy, not yet renamed
    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint"):
        t = Trainer(run, run_dir=tmp_path, resume=True, progress=False)
    assert t.step == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    assert "put back step-000004" in caplog.text
