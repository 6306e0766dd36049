"""Manual garbage collection: automatic collection off inside, collections at the chosen steps only."""

import gc

import pytest

from hybridlm.train.collector import ManualGC
from hybridlm.train.trainer import Trainer
from tests.train.test_trainer import losses, tiny_run


def counting_collect(monkeypatch) -> list[int]:
    calls = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(1) or real(*a))
    return calls


def test_manual_gc_collects_at_multiples_and_restores(monkeypatch):
    calls = counting_collect(monkeypatch)
    assert gc.isenabled()
    with ManualGC(3) as collector:
        assert not gc.isenabled() and len(calls) == 1  # one collection on entry
        for step in range(1, 8):
            collector.after_step(step)
        assert len(calls) == 3  # after steps 3 and 6
    assert gc.isenabled()
    with pytest.raises(RuntimeError), ManualGC(2):
        raise RuntimeError("a failing step")
    assert gc.isenabled()  # restored on the way out of an error too


def test_manual_gc_zero_leaves_the_collector_alone(monkeypatch):
    calls = counting_collect(monkeypatch)
    with ManualGC(0) as collector:
        assert gc.isenabled()
        collector.after_step(5)
    assert calls == [] and gc.isenabled()
    with pytest.raises(ValueError, match="every"):
        ManualGC(-1)


def test_trainer_gc_every_same_losses(tmp_path, monkeypatch):
    base = Trainer(tiny_run(), run_dir=tmp_path / "auto", progress=False)
    base.run_loop()
    calls = counting_collect(monkeypatch)
    manual = Trainer(tiny_run("train.gc_every=3"), run_dir=tmp_path / "manual", progress=False)
    calls.clear()
    manual.run_loop()
    assert gc.isenabled()
    assert len(calls) == 3  # on entry, after steps 3 and 6
    assert losses(tmp_path / "manual") == losses(tmp_path / "auto")


def test_manual_gc_leaves_the_collector_off_when_it_was_off():
    """On exit the collector is restored as found: one switched off by the caller was switched on again."""
    gc.disable()
    try:
        with ManualGC(2) as collector:
            collector.after_step(2)
        assert not gc.isenabled()
    finally:
        gc.enable()
