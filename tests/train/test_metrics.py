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
