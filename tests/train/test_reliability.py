"""Reliability of a training run: non-finite steps, signals, checkpoint order and fallback, resume
checks, torn metrics lines. Tiny runs in one process (see tests/train/test_sigkill.py for kills)."""

import contextlib
import errno
import json
import logging
import os
import signal
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hybridlm.cli import main
from hybridlm.errors import CheckpointError, CheckpointMismatchError, TrainingDivergedError
from hybridlm.train import trainer as trainer_module
from hybridlm.train.listing import list_checkpoints
from hybridlm.train.metrics import read_history
from hybridlm.train.optim import lr_factor
from hybridlm.train.signals import TrainingInterrupted
from hybridlm.train.trainer import Trainer, latest_checkpoint
from tests.train.test_trainer import TINY_RUN, losses, tiny_run, weights


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted tiny run: final weights and per-step losses."""
    path = tmp_path_factory.mktemp("ref") / "run"
    t = Trainer(tiny_run(), run_dir=path, progress=False)
    t.run_loop()
    return weights(t.model), losses(path), averages(path)


def averages(run_dir):
    """Each console row's means over the steps since the previous row (a resume must not cut them short)."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: (r["loss_avg"], r["lm_loss_avg"]) for r in rows if "loss_avg" in r}


def assert_same_run(trainer, run_dir, reference):
    ref_weights, ref_losses, ref_averages = reference
    got = weights(trainer.model)
    assert got.keys() == ref_weights.keys()
    for k in got:
        assert torch.equal(got[k], ref_weights[k]), k
    assert losses(run_dir) == ref_losses
    assert averages(run_dir) == ref_averages


def poison_grads_from(trainer, first_step):
    """Make the gradient NaN on optimizer steps >= ``first_step`` (1-based)."""
    p = next(trainer.model.parameters())
    p.register_hook(lambda g: g * float("nan") if trainer.step + 1 >= first_step else g)


# -- non-finite loss or gradient ---------------------------------------------------------------------


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    t = Trainer(tiny_run(), run_dir=tmp_path, progress=False)
    t.train_step()
    t.train_step()
    before = weights(t.model)
    optim_before = {k: v.clone() for s in t.optimizer.state.values() for k, v in s.items() if k == "step"}
    moments = [s["exp_avg"].clone() for s in t.optimizer.state.values()]
    poison_grads_from(t, 3)
    out = t.train_step()
    assert out["nonfinite_skipped"] == 1
    after = weights(t.model)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(int(s["step"]) == 2 for s in t.optimizer.state.values()), optim_before  # AdamW counter unchanged
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, t.optimizer.state.values()))
    # The schedule moved on with the step: the next lr is the one planned for step 4.
    assert t.step == 3 and t.scheduler.last_epoch == 3
    assert t.optimizer.param_groups[0]["lr"] == t.run.optim.lr * lr_factor(3, t.run.train.steps, t.run.optim)


def test_a_run_that_ends_inside_a_streak_of_skipped_steps_says_so(tmp_path, caplog, recwarn):
    """Fewer skipped steps in a row than train.max_nonfinite_steps do not stop a run; one that ended inside the
    streak printed "model saved" for the weights of its last finite step (here its initial ones) as if they
    were trained. A skipped first step also drew torch's warning of a scheduler stepped before its optimizer."""
    run = tiny_run("train.steps=3", "train.max_nonfinite_steps=4")
    t = Trainer(run, run_dir=tmp_path, progress=False)
    poison_grads_from(t, 1)
    with caplog.at_level(logging.WARNING, logger="hybridlm"):
        t.run_loop()
    assert "the last 3 step(s) (to step 3) were not finite and were skipped" in caplog.text
    assert "the exported model is that of step 0" in caplog.text
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_diverging_run_stops_nonzero_and_keeps_finite_checkpoints(tmp_path):
    run = tiny_run("train.steps=12", "train.checkpoint_every=2", "train.max_nonfinite_steps=3")
    t = Trainer(run, run_dir=tmp_path, progress=False)
    poison_grads_from(t, 5)
    with pytest.raises(TrainingDivergedError, match=r"not finite at steps 5-7 .*stopped at step 7") as info:
        t.run_loop()
    # The periodic save of step 6 waited (inside the streak), so nothing the streak touched is kept,
    # and the message names the newest checkpoint from before it.
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-000002", "step-000004"]
    assert "the last checkpoint before them is " + str(kept[-1]) in str(info.value)
    assert not (tmp_path / "model").exists()
    rows = [r for r in read_history(tmp_path / "metrics.jsonl") if "nonfinite_skipped" in r]
    assert [r["step"] for r in rows] == [5, 6, 7]
    # Never a checkpoint from non-finite weights: the save refuses, the older ones stay.
    with torch.no_grad():
        next(t.model.parameters())[0] = float("inf")
    t.step = 8
    with pytest.raises(TrainingDivergedError, match="weights are not finite at step 8"):
        t.save_checkpoint()
    assert list_checkpoints(tmp_path / "checkpoints") == kept


def test_non_finite_weights_before_any_checkpoint_say_so(tmp_path):
    t = Trainer(tiny_run("train.steps=4"), run_dir=tmp_path, progress=False)
    with torch.no_grad():
        next(t.model.parameters())[0] = float("nan")
    with pytest.raises(
        TrainingDivergedError, match=r"there is no earlier checkpoint \(lower optim.lr and start again\)$"
    ):
        t.save_checkpoint()
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_a_save_inside_a_streak_prunes_nothing_and_a_deferred_save_follows_it(tmp_path):
    """Finite weights can still be the ones that diverge (a finite step that blew them up): a save
    inside a streak of skipped steps (here the last step's) must not push out an older checkpoint."""
    run = tiny_run("train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=1")
    t = Trainer(run, run_dir=tmp_path, progress=False)
    poison_grads_from(t, 5)
    t.run_loop()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000004", "step-000006"]
    # A streak that ends: the save deferred at step 4 comes at step 5, the first finite step after it.
    run = tiny_run("train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=3")
    t = Trainer(run, run_dir=tmp_path / "b", progress=False)
    p = next(t.model.parameters())
    p.register_hook(lambda g: g * float("nan") if t.step + 1 in (3, 4) else g)
    t.run_loop()
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-000005", "step-000008"]
    rows = [r["step"] for r in read_history(tmp_path / "b" / "metrics.jsonl") if "nonfinite_skipped" in r]
    assert rows == [3, 4]


def test_huge_learning_rate_diverges_without_a_nan_checkpoint(tmp_path):
    run = tiny_run("optim.lr=1e6", "optim.warmup_steps=0", "train.steps=40", "train.checkpoint_every=1")
    t = Trainer(run, run_dir=tmp_path, progress=False)
    with pytest.raises(TrainingDivergedError):
        t.run_loop()
    assert not (tmp_path / "model").exists()
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):
        fresh = Trainer(run, run_dir=tmp_path / "x", progress=False)
        from hybridlm.checkpoint.training_state import load_training_state

        load_training_state(ckpt, fresh.model)
        assert all(torch.isfinite(p).all() for p in fresh.model.parameters()), ckpt


# -- signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_between_steps_saves_the_current_step(tmp_path, reference, signum):
    t = Trainer(tiny_run(), run_dir=tmp_path, progress=False)
    step = t.train_step

    def train_step():
        out = step()
        if t.step == 3:
            os.kill(os.getpid(), signum)
        return out

    t.train_step = train_step
    with pytest.raises(TrainingInterrupted) as info:
        t.run_loop()
    assert info.value.exit_status == 128 + signum
    assert f"hybridlm train --resume {tmp_path}" in str(info.value)
    assert latest_checkpoint(tmp_path).name == "step-000003"
    resumed = Trainer(tiny_run(), run_dir=tmp_path, resume=True, progress=False)
    assert resumed.step == 3
    resumed.run_loop()
    assert_same_run(resumed, tmp_path, reference)


class _GoneTerminal:
    """Standard output on a terminal that went away: once ``gone``, every write fails with EIO (as Linux does
    after the hangup that sent SIGHUP)."""

    gone = False

    def write(self, text):
        if self.gone:
            raise OSError(errno.EIO, "Input/output error")
        return len(text)

    def flush(self):
        if self.gone:
            raise OSError(errno.EIO, "Input/output error")


def test_a_terminal_gone_with_its_sighup_still_saves_the_step(tmp_path, monkeypatch):
    """Closing the terminal (or losing the ssh session) sends SIGHUP, then fails every write: the console row
    of the step under way raised EIO out of the loop, so the run ended (exit 1) without the checkpoint."""
    terminal = _GoneTerminal()
    monkeypatch.setattr("sys.stdout", terminal)
    _console_gone_with_a_signal_at_step_two(tmp_path, lambda: setattr(terminal, "gone", True), signal.SIGHUP)


def _console_gone_with_a_signal_at_step_two(tmp_path, console_goes, signum):
    """Train the tiny run; at step 2 (a console step: log_every = 2) ``console_goes()``, then ``signum`` arrives. The
    step's checkpoint and metrics row must be written, and the run stop with 128 + ``signum``."""
    t = Trainer(tiny_run(), run_dir=tmp_path, progress=False)
    step = t.train_step

    def train_step():
        out = step()
        if t.step == 2:
            console_goes()
            os.kill(os.getpid(), signum)
        return out

    t.train_step = train_step
    with pytest.raises(TrainingInterrupted) as info:
        t.run_loop()
    assert info.value.exit_status == 128 + signum
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert [r["step"] for r in read_history(tmp_path / "metrics.jsonl")][-1] == 2


def test_only_the_first_process_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """Every rank of a torchrun job printed the same stop message; the others now stop with the status alone."""
    from hybridlm.cli import main

    for rank, expected in ((0, 1), (1, 0)):
        t = Trainer(tiny_run(), run_dir=tmp_path / str(rank), progress=False)
        t.is_main = rank == 0  # what a second process of the job has
        t.train_step = lambda t=t, step=t.train_step: (step(), os.kill(os.getpid(), signal.SIGTERM))[0]
        monkeypatch.setattr("hybridlm.cli.train._cmd_train", lambda args, t=t: t.run_loop())
        assert main(["train"]) == 128 + signal.SIGTERM
        assert capsys.readouterr().err.count("SIGTERM received: stopped at step 1") == expected


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_the_first_evaluation_saves_step_zero(tmp_path, reference, signum):
    """The first evaluation runs under the signal handling too: the folder can then be resumed (it
    used to hold a run that could be neither resumed, for want of a checkpoint, nor replaced)."""
    t = Trainer(tiny_run(), run_dir=tmp_path, progress=False)
    evaluate = t.evaluate

    def first_evaluation():
        os.kill(os.getpid(), signum)
        t.evaluate = evaluate
        return evaluate()

    t.evaluate = first_evaluation
    with pytest.raises((TrainingInterrupted, KeyboardInterrupt)):
        t.run_loop()
    assert latest_checkpoint(tmp_path).name == "step-000000"
    assert not (tmp_path / ".hybridlm.pid").exists()
    resumed = Trainer(tiny_run(), run_dir=tmp_path, resume=True, progress=False)
    assert resumed.step == 0
    resumed.run_loop()
    assert_same_run(resumed, tmp_path, reference)


def test_a_resume_at_step_zero_logs_the_first_evaluation_once(tmp_path):
    """A signal during the first evaluation saves step 0 after that evaluation's row is written: the resume
    evaluated and logged step 0 again (two step-0 rows in metrics.jsonl, where only a kill leaves rows twice),
    and TensorBoard must keep the first part's step 0 rather than hide it."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    pytest.importorskip("torch.utils.tensorboard")
    t = Trainer(tiny_run("train.steps=2"), run_dir=tmp_path, progress=False)
    evaluate = t.evaluate

    def first_evaluation():
        os.kill(os.getpid(), signal.SIGTERM)
        t.evaluate = evaluate
        return evaluate()

    t.evaluate = first_evaluation
    with pytest.raises(TrainingInterrupted):
        t.run_loop()
    second = int(time.time())
    while int(time.time()) == second:  # event files are named by the second they start in, then read in order
        time.sleep(0.05)
    Trainer(tiny_run("train.steps=2"), run_dir=tmp_path, resume=True, progress=False).run_loop()
    assert [r["step"] for r in read_history(tmp_path / "metrics.jsonl") if "val_loss" in r] == [0, 2]
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss")] == [0, 2]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_final_export_leaves_a_complete_run(tmp_path, reference, signum, capsys):
    """The export finishes under the signal handling, so the run is complete: it says so and returns its
    summary, not "stopped at the last step, resume with ..." (a resume would only export again)."""
    t = Trainer(tiny_run(), run_dir=tmp_path, progress=True)
    export = t.export

    def exporting():
        os.kill(os.getpid(), signum)
        return export()

    t.export = exporting
    summary = t.run_loop()
    assert summary["model"] == str(tmp_path / "model") and (tmp_path / "model" / "config.json").exists()
    assert f"{signal.Signals(signum).name} received after the last step: the run is complete" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert_same_run(t, tmp_path, reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
@pytest.mark.parametrize("resume", [False, True])
def test_a_signal_during_set_up_leaves_the_folder_as_it_was(tmp_path, monkeypatch, signum, resume):
    """SIGTERM and SIGHUP while the data are read or the model built end the start as SIGINT does: the
    folder is released (their default action killed the process and left it marked in use)."""
    run_dir = tmp_path / "run"
    if resume:
        Trainer(tiny_run(), run_dir=run_dir, progress=False).run_loop(until=2)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) if resume else None
    build, unlock, seen = Trainer._build, trainer_module.unlock, []

    def building(self, *args):
        os.kill(os.getpid(), signum)
        seen.append("built")  # not reached: the signal raises before this line
        return build(self, *args)

    def unlocking(path):  # a second signal (torchrun signals again) does not stop the clean-up
        os.kill(os.getpid(), signum)
        seen.append("unlocked")
        return unlock(path)

    def failing(self, *args):  # a start that fails by itself, then gets a signal while it cleans up
        raise ValueError("bad data")

    monkeypatch.setattr(trainer_module, "unlock", unlocking)
    for build_step, error in ((building, TrainingInterrupted), (failing, ValueError)):
        seen.clear()
        monkeypatch.setattr(Trainer, "_build", build_step)
        with pytest.raises(error) as info:
            Trainer(tiny_run(), run_dir=run_dir, resume=resume, progress=False)
        if error is TrainingInterrupted:
            assert info.value.exit_status == 128 + signum and "training did not start" in str(info.value)
        assert seen == ["unlocked"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if resume:
            assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
        else:
            assert not run_dir.exists()


def test_sigint_inside_a_save_finishes_it(tmp_path, reference, monkeypatch):
    real_save = dcp.save

    def save(*args, **kwargs):  # the signal lands inside the periodic save of step 4
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", save)
    t = Trainer(tiny_run(), run_dir=tmp_path, progress=False)
    with pytest.raises(TrainingInterrupted) as info:
        t.run_loop()
    monkeypatch.undo()
    assert info.value.exit_status == 130
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000004"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = Trainer(tiny_run(), run_dir=tmp_path, resume=True, progress=False)
    resumed.run_loop()
    assert_same_run(resumed, tmp_path, reference)


def _signals_at(t, where, read, signals):
    """Send ``signals`` to this process, one after the other, from inside ``where`` of trainer ``t``: "step" (step 3
    under way), "save" (the periodic save of step 4) or "export" (after the last step). Returns what fd 2 held after
    each signal (``read()``), read while the step, save or export was still under way."""
    seen = []
    name, at = {"step": ("train_step", 2), "save": ("save_checkpoint", 4), "export": ("export", 8)}[where]
    real = getattr(t, name)

    def inside(*args, **kwargs):
        if t.step == at and not seen:
            for s in signals:
                os.kill(os.getpid(), s)
                seen.append(read())
        return real(*args, **kwargs)

    setattr(t, name, inside)
    return seen


@pytest.mark.parametrize(
    "where, said, then",
    [
        ("step", "finishing step 3 and saving its checkpoint, then exiting", "ignored until step 3 is saved"),
        ("save", "saving a checkpoint of step 4, then exiting", "ignored until step 4 is saved"),
        (
            "export",
            "finishing the run (its last checkpoint, then the model's export), then exiting",
            "ignored until the run is finished",
        ),
    ],
    ids=["step", "save", "export"],
)
def test_a_stop_signal_is_answered_at_once_and_so_is_the_next(tmp_path, capfd, where, said, then):
    """Ctrl-C printed nothing until the step and the save under way were done (minutes on a large model), and a
    second Ctrl-C was ignored in silence: a user pressed again and again, then killed the run and lost the step.
    The first signal is answered at once, the step or save still under way; a later one says it is ignored and
    names the way out; the first one still decides. Only the first process speaks."""
    t = Trainer(tiny_run(), run_dir=tmp_path / "run", progress=False)

    def read():
        return capfd.readouterr().err

    seen = _signals_at(t, where, read, [signal.SIGINT, signal.SIGTERM])
    if where == "export":
        assert "model" in t.run_loop()
    else:
        with pytest.raises(TrainingInterrupted) as info:
            t.run_loop()
        assert info.value.exit_status == 130  # the first signal's
        assert latest_checkpoint(tmp_path / "run").name == f"step-00000{3 if where == 'step' else 4}"
    assert seen[0] == f"SIGINT received: {said} (further signals are ignored until then)\n"
    assert seen[1] == (
        f"SIGTERM received: {then} (kill -9 {os.getpid()} ends the process at once, losing what is not saved)\n"
    )
    other = Trainer(tiny_run(), run_dir=tmp_path / "other", progress=False)
    other.is_main = False  # what a second process of a torchrun job has
    seen = _signals_at(other, where, read, [signal.SIGINT])
    with contextlib.suppress(TrainingInterrupted):
        other.run_loop()
    assert seen == [""]


# -- checkpoints: order, fallback, resume checks ---------------------------------------------------


def test_step_one_million_is_kept(tmp_path):
    t = Trainer(tiny_run("train.keep_checkpoints=1"), run_dir=tmp_path, progress=False)
    for step in (999_999, 1_000_000):
        t.step = step
        t.save_checkpoint()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-1000000"]
    assert latest_checkpoint(tmp_path).name == "step-1000000"


@pytest.fixture
def saved_run(tmp_path):
    """A tiny run stopped at step 6 with checkpoints of steps 2, 4, 6."""
    run = tiny_run("train.checkpoint_every=2", "train.keep_checkpoints=3")
    t = Trainer(run, run_dir=tmp_path, progress=False)
    t.run_loop(until=6)
    return run, tmp_path


def test_resume_falls_back_to_the_newest_loadable_checkpoint(saved_run, caplog):
    run, path = saved_run
    (path / "checkpoints/step-000006/__0_0.distcp").write_bytes(b"damaged")
    (path / "checkpoints/step-000004/trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING):
        t = Trainer(run, run_dir=path, resume=True, progress=False)
    assert t.step == 2
    assert "step-000006" in caplog.text and "step-000004" in caplog.text
    (path / "checkpoints/step-000002/.metadata").write_bytes(b"\x80garbage")
    with pytest.raises(CheckpointError, match="no checkpoint could be loaded"):
        Trainer(run, run_dir=path, resume=True, progress=False)
    # The CLI says so in one line, exit 2.
    assert main(["train", "--resume", str(path), "--no-progress"]) == 2


def test_checkpoints_a_resume_could_not_load_are_moved_aside_and_saved_again(saved_run):
    run, path = saved_run
    (path / "checkpoints/step-000006/trainer_state.json").unlink()
    t = Trainer(run, run_dir=path, resume=True, progress=False)
    assert t.step == 4
    # Kept for a look, hidden: no longer listed, pruned, or in the way of the run's save of step 6.
    assert [p.name.split(".damaged-")[0] for p in (path / "checkpoints").glob(".*")] == [".step-000006"]
    t.run_loop()
    assert [p.name for p in list_checkpoints(path / "checkpoints")] == ["step-000004", "step-000006", "step-000008"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.pattern=M-[*-]G", "checkpoint has 7 layers, pattern has 5"),
        ("model.tie_embeddings=true", "model.tie_embeddings: checkpoint has False"),
        ("model.hidden_size=48", "model.hidden_size"),
    ],
)
def test_resume_refuses_another_architecture(saved_run, override, named):
    run, path = saved_run
    with pytest.raises(CheckpointMismatchError, match=named):
        Trainer(run.with_overrides([override]), run_dir=path, resume=True, progress=False)


def test_resume_refuses_another_architecture_before_reading_the_corpus(saved_run, monkeypatch):
    """The load refused it, after the whole corpus was tokenized (minutes for a large one) and the model built."""
    run, path = saved_run

    def reading(*args, **kwargs):
        raise AssertionError("the corpus was read before the checkpoint's model was compared")

    monkeypatch.setattr(trainer_module, "load_corpus", reading)
    with pytest.raises(CheckpointMismatchError, match=r"step-000006: .*model\.hidden_size: checkpoint has 32, this"):
        Trainer(run.with_overrides(["model.hidden_size=48"]), run_dir=path, resume=True, progress=False)


def test_resume_accepts_other_brackets_and_applies_optimizer_overrides(saved_run):
    run, path = saved_run
    changed = run.with_overrides(["model.pattern=M-*-G[ME]", "optim.lr=0.001", "optim.weight_decay=0.5"])
    t = Trainer(changed, run_dir=path, resume=True, progress=False)
    assert t.step == 6
    expected = 0.001 * lr_factor(6, changed.train.steps, changed.optim)
    assert [g["lr"] for g in t.optimizer.param_groups] == [expected, expected]
    assert t.optimizer.param_groups[0]["weight_decay"] == 0.5
    toml = (path / "config.toml").read_text()
    assert "lr = 0.001" in toml and "weight_decay = 0.5" in toml  # config.toml says what is in effect
    t.run_loop()
    assert t.step == 8


def test_resume_accepts_other_initialization_and_loss_settings(saved_run):
    """init_std and the dt ranges (read only at initialization) and a loss weight were refused as "another model",
    though the checkpoint's weights compute the same function: lowering moe_aux_loss_coeff meant starting over."""
    run, path = saved_run
    sets = ["model.init_std=0.05", "model.mamba_dt_max=0.2", "model.gdn_dt_min=0.002", "model.moe_aux_loss_coeff=0.01"]
    t = Trainer(run.with_overrides(sets), run_dir=path, resume=True, progress=False)
    assert t.step == 6 and t.model.config.moe_aux_loss_coeff == 0.01
    assert "moe_aux_loss_coeff = 0.01" in (path / "config.toml").read_text()
    t.run_loop()
    assert t.step == 8


def test_torn_metrics_line_does_not_break_resume(saved_run):
    run, path = saved_run
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')  # the process died mid-write
    t = Trainer(run, run_dir=path, resume=True, progress=False)
    summary = t.run_loop()
    assert summary["step"] == 8
    lines = (path / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert 8 in {r["step"] for r in read_history(path / "metrics.jsonl")}


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    """repair_jsonl cut every last line without a newline, a whole row too."""
    from hybridlm.train.metrics import repair_jsonl

    file = tmp_path / "metrics.jsonl"
    file.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}')
    repair_jsonl(file)
    assert file.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    file.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    repair_jsonl(file)
    assert file.read_text() == '{"step": 1, "loss": 2.0}\n'


def test_config_refuses_nonfinite_numbers():
    from hybridlm.errors import ConfigError

    for item in (
        "optim.lr=nan",
        "optim.lr=inf",
        "optim.grad_clip=nan",
        "optim.weight_decay=inf",
        "data.val_fraction=nan",
    ):
        with pytest.raises(ConfigError, match="finite"):
            tiny_run(item)
    assert "train.max_nonfinite_steps=10" not in TINY_RUN and tiny_run().train.max_nonfinite_steps == 10


def test_the_console_line_of_a_non_finite_step_shows_one_loss(tmp_path):
    """The main head's loss is shown beside the total only where they differ: NaN against NaN is no
    difference (it printed "loss nan | main nan")."""
    from hybridlm.train.metrics import Metrics

    m = Metrics(tmp_path, 10, 0, enabled=False, progress=False)
    nan = float("nan")
    assert "main" not in m.line(3, {"loss": nan, "lm_loss": nan})
    assert "main 2.0000" in m.line(3, {"loss": 2.5, "lm_loss": 2.0})
    assert "main nan" in m.line(3, {"loss": 2.5, "lm_loss": nan})
    assert "main" not in m.line(3, {"loss": 2.5}) and "main" not in m.line(3, {"loss": 2.5, "lm_loss": None})
    m.close()


def test_a_fallback_to_a_step_0_checkpoint_gives_a_fresh_optimizer(tmp_path, reference):
    """Reading the damaged step-1 checkpoint created the optimizer's state before DCP failed; step 0 holds none,
    so the resumed run kept it (44 states at step count 1) and trained differently."""
    t = Trainer(tiny_run(), run_dir=tmp_path, progress=False)
    t.save_checkpoint()  # step 0, as a signal during the first evaluation writes it
    t.run_loop(until=1)
    shard = tmp_path / "checkpoints" / "step-000001" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = Trainer(tiny_run(), run_dir=tmp_path, resume=True, progress=False)
    assert resumed.step == 0 and not resumed.optimizer.state
    resumed.run_loop()
    ref_weights, ref_losses, _ = reference  # (the stop at step 1 logged a row there: other averages)
    got = weights(resumed.model)
    assert all(torch.equal(got[k], ref_weights[k]) for k in ref_weights)
    assert losses(tmp_path) == ref_losses


def test_a_second_signal_does_not_replace_the_first():
    """The first stop signal decides the exit status: a later one overwrote it (SIGHUP's 129 for a SIGTERM)."""
    from hybridlm.train.signals import StopSignals

    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGHUP)
        assert signals.pending() == signal.SIGTERM


def test_weights_finite_checks_floating_buffers():
    """A non-finite floating buffer (running statistics, say) makes the weights non-finite: buffers were skipped."""
    from hybridlm.train.guard import weights_finite

    model = torch.nn.BatchNorm1d(3)
    assert weights_finite(model)
    model.running_mean[1] = float("nan")
    assert not weights_finite(model)


def test_a_streak_of_skipped_steps_goes_on_across_a_resume(tmp_path):
    """A run saved inside a streak (a signal, ``until``) and resumed counts the streak on: the guard's counts
    restarted at 0, so the resumed run skipped max_nonfinite_steps more steps than the uninterrupted one (every
    resume another streak) and named a checkpoint inside the streak as the one before it."""
    run = tiny_run("train.steps=12", "train.checkpoint_every=2", "train.max_nonfinite_steps=3")
    first = Trainer(run, run_dir=tmp_path, progress=False)
    poison_grads_from(first, 5)
    first.run_loop(until=6)  # steps 5 and 6 skipped, saved at step 6
    resumed = Trainer(run, run_dir=tmp_path, resume=True, progress=False)
    assert (resumed.guard.skipped, resumed.guard.in_a_row) == (2, 2)
    poison_grads_from(resumed, 5)
    with pytest.raises(TrainingDivergedError, match=r"not finite at steps 5-7 .*stopped at step 7") as info:
        resumed.run_loop()
    assert "the last checkpoint before them is " + str(tmp_path / "checkpoints" / "step-000004") in str(info.value)
    rows = [r for r in read_history(tmp_path / "metrics.jsonl") if "nonfinite_skipped" in r]
    assert [(r["step"], r["nonfinite_skipped"]) for r in rows] == [(5, 1), (6, 2), (7, 3)]


def test_a_skipped_step_drops_its_expert_routing_counts(tmp_path):
    """The expert-bias counts of a non-finite step go with it: kept, the next step's bias update would count the
    skipped step's tokens as well as its own."""
    from hybridlm.layers import MoE

    t = Trainer(tiny_run(), run_dir=tmp_path, progress=False)
    moes = [m for m in t.model.modules() if isinstance(m, MoE) and m.config.moe_router_expert_bias]
    assert moes
    t.train_step()
    biases = [m.gate.e_score_correction_bias.clone() for m in moes]
    poison_grads_from(t, 2)
    assert t.train_step()["nonfinite_skipped"] == 1
    for m, bias in zip(moes, biases):
        assert m.tokens_per_expert.sum() == 0
        assert torch.equal(m.gate.e_score_correction_bias, bias)


@pytest.mark.parametrize("inside", ["dcp.load", "metadata"])
def test_a_signal_while_a_resume_loads_stops_it_and_moves_nothing_aside(tmp_path, monkeypatch, inside):
    """DCP's load (and the reader of its metadata) wrap whatever stops them: a SIGTERM or Ctrl-C while a resume
    loaded the newest checkpoint made it a damaged one, so the resume went on from the one before and moved the
    newest aside (the signal itself was lost)."""
    from hybridlm.checkpoint import safe_dcp

    run = tiny_run("train.checkpoint_every=2")
    Trainer(run, run_dir=tmp_path, progress=False).run_loop(until=4)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    target, name = (dcp, "load") if inside == "dcp.load" else (safe_dcp._MetadataUnpickler, "find_class")
    real, calls = getattr(target, name), []

    def signalled(*args, **kwargs):
        if not calls:
            calls.append(os.kill(os.getpid(), signal.SIGTERM))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, signalled)
    with pytest.raises(TrainingInterrupted, match="SIGTERM received while setting up"):
        Trainer(run, run_dir=tmp_path, resume=True, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "where, error",
    [
        ("data", OSError(errno.EIO, "Input/output error")),  # a network mount that dropped: read() names no file
        ("data", MemoryError()),
        ("metadata", PermissionError(errno.EACCES, "Permission denied")),
        ("rng", PermissionError(errno.EACCES, "Permission denied")),  # safetensors said "No such file" for it
    ],
    ids=["eio-in-dcp", "memory-in-dcp", "eacces-metadata", "eacces-rng"],
)
def test_a_checkpoint_that_cannot_be_read_now_stops_the_resume_and_moves_nothing_aside(
    tmp_path, monkeypatch, where, error
):
    """A refused read (permissions, a dropped network mount, memory) was taken for a damaged checkpoint: the resume
    went on from the one before and moved the newest, intact, aside."""
    from hybridlm.checkpoint import io as checkpoint_io
    from hybridlm.checkpoint import safe_dcp

    run = tiny_run("train.checkpoint_every=2")
    Trainer(run, run_dir=tmp_path, progress=False).run_loop(until=4)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def refuse(*args, **kwargs):
        if where == "rng" and not str(args[0]).endswith("rng.safetensors"):
            return open(*args, **kwargs)
        if where in ("metadata", "rng"):  # open() names its file
            raise PermissionError(error.errno, error.strerror, str(args[0]))
        raise error

    if where == "data":
        monkeypatch.setattr(safe_dcp.SafeFileSystemReader, "read_data", refuse)
    else:  # the module's open(): .metadata's read, or the one before safetensors opens a file
        monkeypatch.setattr(safe_dcp if where == "metadata" else checkpoint_io, "open", refuse, raising=False)
    with pytest.raises(type(error)) as info:
        Trainer(run, run_dir=tmp_path, resume=True, progress=False)
    if isinstance(error, OSError):
        assert "step-000004" in str(info.value.filename), info.value.filename  # the CLI prints it beside the reason
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_skipped_step_between_console_rows_is_said_on_the_console(tmp_path, capsys):
    """A non-finite step that is not a logged one was skipped in silence: the next console row showed a finite
    gradient norm, and only metrics.jsonl counted it."""
    t = Trainer(tiny_run("train.steps=4", "train.log_every=2"), run_dir=tmp_path, progress=False)
    p = next(t.model.parameters())
    p.register_hook(lambda g: g * float("nan") if t.step + 1 == 3 else g)
    t.run_loop()
    out = capsys.readouterr().out
    assert "step 3: the loss or gradient is not finite" in out
    assert "the step is skipped (1 so far; the run stops after 10 in a row)" in out
    assert "step 4: " not in out and "step 1: " not in out


def test_a_pipe_reader_gone_with_the_signal_still_saves_the_step(tmp_path, monkeypatch):
    """Ctrl-C (or a SIGTERM to the process group) on ``hybridlm train | tee log`` stops tee at once: the console
    row of the step under way raised BrokenPipeError out of the loop, so the run ended (exit 141, nothing said)
    without the checkpoint its signal promises, and the folder could not be resumed. With ``2>&1`` standard error
    (fd 2, where the signal's notice is written from its handler) is the same broken pipe."""
    read, write = os.pipe()
    pipe = open(write, "w")  # noqa: SIM115 (closed below)
    monkeypatch.setattr("sys.stdout", pipe)
    stderr = os.dup(2)
    os.dup2(write, 2)
    try:
        _console_gone_with_a_signal_at_step_two(tmp_path, lambda: os.close(read), signal.SIGTERM)
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        with contextlib.suppress(OSError):
            pipe.close()


def test_a_console_row_averages_the_finite_losses_since_the_last(tmp_path):
    """A step skipped for a NaN loss made the next row's loss_avg NaN (and wrote NaN into the checkpoint's window)."""
    t = Trainer(tiny_run("train.steps=4", "train.log_every=2"), run_dir=tmp_path, progress=False)
    t.model.embeddings.register_forward_hook(
        lambda module, args, out: out * float("nan") if module.training and t.step + 1 == 3 else out
    )
    t.run_loop()
    rows = {r["step"]: r for r in read_history(tmp_path / "metrics.jsonl")}
    assert rows[3]["loss"] is None and rows[3]["nonfinite_skipped"] == 1  # (NaN is written as null)
    assert rows[4]["loss_avg"] == rows[4]["loss"] and rows[4]["lm_loss_avg"] == rows[4]["lm_loss"]
