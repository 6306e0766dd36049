"""Metric sinks: TensorBoard across a resume."""

import time

import pytest

from hybridlm.train.metrics import Metrics


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
