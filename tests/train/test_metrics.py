"""Metric sinks: TensorBoard across a resume."""

import json
import subprocess
import sys
import time

import pytest

from hybridlm.train.metrics import Metrics
from tests.helpers import subprocess_env


def test_tensorboard_shows_the_resumed_run_s_steps_once(tmp_path):
    """A run killed at step 5 after its checkpoint at step 3 and resumed logs steps 4 and 5 again: TensorBoard
    showed both (the curve went back and forth), where metrics.jsonl's later rows count."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    pytest.importorskip("torch.utils.tensorboard")
    killed = Metrics(tmp_path, 8, 0, progress=False)
    for step in range(1, 6):
        killed.record(step, {"loss": float(step)}, console=False)
    killed.close()
    second = int(time.time())
    while int(time.time()) == second:  # event files are named by the second they start in, then read in order
        time.sleep(0.05)
    resumed = Metrics(tmp_path, 8, 3, progress=False)
    for step in range(4, 9):
        resumed.record(step, {"loss": 10.0 + step}, console=False)
    resumed.close()
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), *((s, 10.0 + s) for s in range(4, 9))]


def test_tensorboard_only_scalars_stay_out_of_metrics_jsonl(tmp_path):
    """Each MoE layer's load imbalance goes to TensorBoard by its tag; metrics.jsonl keeps the one number."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    pytest.importorskip("torch.utils.tensorboard")
    metrics = Metrics(tmp_path, 2, 0, progress=False)
    layers = {"moe/load_imbalance/layer_1": 1.25, "moe/load_imbalance/mtp_0_layer_0": 1.5}
    metrics.record(1, {"loss": 2.0, "moe_load_imbalance": 1.5}, console=False, tensorboard=layers)
    metrics.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert {k for k in row if k not in ("step", "time")} == {"loss", "moe_load_imbalance"}
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for tag, value in {**layers, "moe_load_imbalance": 1.5}.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(1, value)]


def test_a_loss_curve_that_does_not_fit_on_the_disk_is_named_and_not_left_half_written(tmp_path, monkeypatch):
    """A full disk at the end of a run (after the export) said only "error: no space left on device" and left a
    truncated loss.png."""
    import errno

    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from hybridlm.cli import _error
    from hybridlm.train.metrics import plot_losses

    def full(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(OSError) as e:
        plot_losses([{"step": 1, "loss": 2.0}], tmp_path / "loss.png")
    assert _error(e.value).startswith(f"no space left on device ({tmp_path / 'loss.png'})")
    assert list(tmp_path.iterdir()) == []


def test_a_tensorboard_write_that_does_not_fit_on_the_disk_is_named(tmp_path):
    """TensorBoard writes from a thread of its own and raises its failure at the next add or close: a full disk
    there ended a run with only "error: no space left on device"."""
    import errno

    pytest.importorskip("torch.utils.tensorboard")
    from hybridlm.cli import _error

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    metrics = Metrics(tmp_path, 8, 0, progress=False)
    metrics._tb.add_scalar = full
    with pytest.raises(OSError) as e:
        metrics.record(1, {"loss": 1.0}, console=False)
    assert _error(e.value).startswith(f"no space left on device ({tmp_path / 'tensorboard'})")
    metrics._tb.close()
    metrics._tb.close = full
    with pytest.raises(OSError) as e:
        metrics.close()
    assert _error(e.value).startswith(f"no space left on device ({tmp_path / 'tensorboard'})")


def test_non_finite_values_are_written_as_json_null(tmp_path):
    """A skipped step's NaN gradient norm (or infinite loss) was written bare (``"grad_norm": NaN``): not JSON, so
    JSON.parse and strict readers refused the row. Written as null, read back as such, and the curve still draws."""
    import json
    import math

    from hybridlm.train.metrics import plot_losses, read_history

    metrics = Metrics(tmp_path, 3, 0, progress=False)
    metrics.record(1, {"loss": 5.0, "lm_loss": 5.0, "grad_norm": 1.0}, console=False)
    metrics.record(
        2, {"loss": math.inf, "lm_loss": math.nan, "grad_norm": math.nan, "nonfinite_skipped": 1}, console=False
    )
    metrics.record(3, {"loss": 4.0, "lm_loss": 4.0, "grad_norm": 2.0}, console=False)
    metrics.close()

    def strict(name):
        raise ValueError(f"not JSON: {name}")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=strict) for line in lines]
    assert {k: rows[1][k] for k in ("loss", "lm_loss", "grad_norm", "nonfinite_skipped")} == {
        "loss": None,
        "lm_loss": None,
        "grad_norm": None,
        "nonfinite_skipped": 1,
    }
    assert [r["loss"] for r in read_history(tmp_path / "metrics.jsonl")] == [5.0, None, 4.0]
    pytest.importorskip("matplotlib")
    assert plot_losses(metrics.history_all(), tmp_path / "loss.png") == tmp_path / "loss.png"


def test_a_one_step_run_s_loss_curve_shows_its_point(tmp_path, monkeypatch):
    """A run of one step drew its training loss as a line through a single point, which matplotlib does not draw:
    loss.png held only the legend."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from hybridlm.train.metrics import plot_losses

    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), savefig(self, *a, **k)))
    rows = [{"step": 1, "loss": 5.5, "lm_loss": 5.0}]
    assert plot_losses(rows, tmp_path / "loss.png") == tmp_path / "loss.png"
    lines = figures[0].axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["train (main head)", "train, total (MTP, auxiliary)"]
    assert all(line.get_marker() not in ("None", None, "") for line in lines)


def bar_on_a_closed_pipe(tmp_path, monkeypatch):
    """(stderr: a pipe whose reader is gone, to be closed by the test; Metrics with a progress bar drawing to it)."""
    import os

    read, write = os.pipe()
    pipe = open(write, "w")  # noqa: SIM115 (the caller closes it)
    monkeypatch.setattr("sys.stderr", pipe)
    metrics = Metrics(tmp_path, 10, 0, progress=True)
    os.close(read)
    time.sleep(0.15)  # past tqdm's minimum interval: the update draws
    return pipe, metrics


def test_a_progress_bar_whose_pipe_is_gone_goes_quietly(tmp_path, monkeypatch):
    """The bar's stderr piped to a reader that is gone (``2>&1 | tee log``, tee stopped by the same Ctrl-C): the
    bar's next update raised BrokenPipeError out of the training loop, before the signal's checkpoint."""
    import contextlib

    pipe, metrics = bar_on_a_closed_pipe(tmp_path, monkeypatch)
    try:
        metrics.advance()
        metrics.record(1, {"loss": 1.0}, console=True)
        metrics.close()
    finally:
        with contextlib.suppress(BrokenPipeError):
            pipe.close()
    assert [r["step"] for r in metrics.history_all()] == [1]


def test_a_notice_goes_to_fd_2_on_a_line_of_its_own_beside_the_progress_bar(tmp_path):
    """A signal's notice is written with os.write to fd 2 (from the handler), where the progress bar is drawn
    without a newline: on a terminal it replaces the bar's line (drawn again below), elsewhere it starts a new one;
    without a bar it is the line alone; a process that does not log says nothing."""
    import os

    metrics, quiet = Metrics(tmp_path, 10, progress=False), Metrics(tmp_path, 10, enabled=False)
    out = tmp_path / "err"
    stderr = os.dup(2)
    controller, terminal = os.openpty()
    cases = [("file", False, b"stop\n"), ("file", True, b"\nstop\n"), ("tty", True, b"\r\x1b[Kstop\n")]
    try:
        for target, bar, expected in cases:
            fd = terminal if target == "tty" else os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            metrics._bar = object() if bar else None  # (whether a bar is shown is all that matters here)
            metrics.notice("stop")
            quiet.notice("not said")
            got = os.read(controller, 100).replace(b"\r\n", b"\n") if target == "tty" else out.read_bytes()
            assert got == expected, (target, bar, got)
            if target == "file":
                os.close(fd)
    finally:
        os.dup2(stderr, 2)
        for fd in (stderr, controller, terminal):
            os.close(fd)
        metrics._bar = None
        metrics.close()


def test_a_run_without_the_logging_extra_says_so(tmp_path, monkeypatch, caplog):
    """Without tensorboard and matplotlib (a base install) a run writes no tensorboard/ and no loss.png: it says so,
    naming the extra, at a level that is seen (the CLI configures no logging: info lines were never shown)."""
    import sys

    from hybridlm.train.metrics import plot_losses

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # (None: importing it raises ImportError)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    caplog.set_level("WARNING")
    metrics = Metrics(tmp_path, 1, 0, progress=False)
    metrics.record(1, {"loss": 2.0}, console=False)
    metrics.close()
    assert plot_losses(metrics.history_all(), tmp_path / "loss.png") is None
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("tensorboard is not installed") and "hybridlm[logging]" in m for m in said), said
    assert any(m.startswith("matplotlib is not installed") and "hybridlm[logging]" in m for m in said), said
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "loss.png").exists()


def test_drawing_the_loss_curve_leaves_the_process_s_matplotlib_backend_alone(tmp_path):
    """plot_losses called matplotlib.use("Agg"): a trainer run inside a notebook (or any program drawing its own
    plots) had its backend switched under it, in a fresh interpreter where pyplot was not imported yet."""
    pytest.importorskip("matplotlib")
    code = (
        "import matplotlib, sys; matplotlib.use('pdf')\n"
        "from hybridlm.train.metrics import plot_losses\n"
        f"assert plot_losses([{{'step': 1, 'loss': 2.0}}, {{'step': 2, 'loss': 1.0}}], {str(tmp_path / 'l.png')!r})\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["pdf", "False"]
    assert (tmp_path / "l.png").read_bytes().startswith(b"\x89PNG")


def test_the_console_line_formats_each_value_as_documented(tmp_path, monkeypatch):
    """Step padded to the total's width, the mean loss and main-head loss, validation, rate in thousands from 1,000
    on, MFU as a percentage, and an ETA from the steps run since this process started (a resume's too)."""
    m = Metrics(tmp_path, 100, 50, enabled=False, progress=False)
    monkeypatch.setattr(time, "time", lambda: 1e9)  # (a stall of the machine between two lines changes no ETA)
    m._t0 = time.time() - 100  # 100 s for the 10 steps since the resume at 50: 400 s for the 40 left
    v = {"loss": 3.0, "loss_avg": 2.5, "lm_loss": 2.0, "lm_loss_avg": 1.5, "val_loss": 1.25}
    line = m.line(60, {**v, "tokens_per_s": 1000.0, "mfu": 0.123})
    assert line == "step  60/100 | loss 2.5000 | main 1.5000 | val 1.2500 | 1.0k tok/s | MFU 12.3% | eta 6m40s"
    m._t0 = time.time() - 975  # 975 s for 10 steps: 3,900 s for the 40 left
    assert m.line(60, {}).endswith("eta 1h05m")
    assert m.line(100, {"loss": 1.0}) == "step 100/100 | loss 1.0000"  # the last step: nothing left to wait for
    assert m.line(50, {"val_loss": 2.0}).endswith("eta 0m00s")  # no step run yet (the first evaluation): no rate
    m.close()


def test_only_console_rows_are_printed_and_int_values_reach_tensorboard(tmp_path, capsys):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    m = Metrics(tmp_path, 10, 0, progress=False)
    m.record(1, {"loss": 2.0, "nonfinite_skipped": 3}, console=False)
    assert capsys.readouterr().out == ""
    m.record(2, {"loss": 1.0}, console=True)
    assert capsys.readouterr().out.startswith("step  2/10 | loss 1.0000")
    m.close()
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("nonfinite_skipped")] == [(1, 3.0)]


def test_the_history_keeps_the_last_write_of_each_row_and_both_rows_of_a_step(tmp_path, caplog):
    """A resume writes the steps after its checkpoint again (the later row counts); a step's training row and its
    evaluation row are two rows."""
    rows = [
        {"step": 2, "loss": 9.0},
        {"step": 2, "val_loss": 8.0},
        {"step": 1, "loss": 5.0},  # (a resumed run's rows come after the killed run's)
        {"step": 2, "loss": 4.0},
    ]
    other = ['{"note": "no step"}\n', '{"step": "3", "loss": 1.0}\n']  # objects of another tool: skipped
    text = "".join(json.dumps(r) + "\n" for r in rows) + "\n"  # a blank line is no row, and no warning
    (tmp_path / "metrics.jsonl").write_text(text + "".join(other))
    m = Metrics(tmp_path, 10, 0, enabled=False, progress=False)
    assert m.history_all() == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "val_loss": 8.0}]
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "skipping a line that is not a metrics row"
    ] * 2


def test_the_progress_bar_follows_the_terminal_and_shows_the_loss(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    m = Metrics(tmp_path, 10, 0)  # progress=None: shown on a terminal
    m.record(1, {"loss": 1.23456}, console=False)
    assert m._bar is not None and m._bar.postfix == "loss=1.235"
    m.close()
    assert "step/s" in capsys.readouterr().err
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    m = Metrics(tmp_path, 10, 0)
    assert m._bar is None
    m.close()


def test_a_progress_bar_whose_pipe_is_gone_says_nothing_when_collected(tmp_path, monkeypatch):
    """The bar dropped after a broken pipe is disabled: collected, its close would draw again and print
    "Exception ignored in ... BrokenPipeError" at the end of the run."""
    import contextlib
    import gc
    import sys

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    pipe, metrics = bar_on_a_closed_pipe(tmp_path, monkeypatch)
    try:
        metrics.advance()
        metrics.close()
        del metrics
        gc.collect()
    finally:
        with contextlib.suppress(BrokenPipeError):
            pipe.close()
    assert unraisable == []


def test_an_empty_metrics_file_is_no_torn_line(tmp_path, caplog):
    """A run killed before its first row leaves an empty metrics.jsonl: nothing to repair, nothing to say."""
    from hybridlm.train.metrics import repair_jsonl

    (tmp_path / "metrics.jsonl").write_bytes(b"")
    repair_jsonl(tmp_path / "metrics.jsonl")
    assert caplog.records == [] and (tmp_path / "metrics.jsonl").read_bytes() == b""
