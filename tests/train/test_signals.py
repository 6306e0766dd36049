"""Stop signals during training and set-up: recorded, raised once, handlers restored, exit status 128 + N."""

import pytest


def test_training_interrupted_exits_128_plus_the_signal_and_pickles_whole():
    import pickle
    import signal

    from hybridlm.train.signals import TrainingInterrupted

    e = pickle.loads(pickle.dumps(TrainingInterrupted(signal.SIGTERM, "SIGTERM received: resume with ...")))
    assert (e.signum, e.exit_status, str(e)) == (signal.SIGTERM, 143, "SIGTERM received: resume with ...")
    assert TrainingInterrupted(signal.SIGHUP, "x").exit_status == 129


def test_stop_signals_record_each_stop_signal_and_restore_the_handlers():
    import os
    import signal

    from hybridlm.train.signals import StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in before:
        with StopSignals() as signals:
            assert signals.pending() is None
            os.kill(os.getpid(), s)
            assert signals.pending() == s
        assert {t: signal.getsignal(t) for t in before} == before
    with StopSignals() as signals:  # entered again: the same object installs and restores again
        pass
    with signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM
    assert {t: signal.getsignal(t) for t in before} == before


def test_setup_signals_raise_once_and_not_while_deferred():
    import os
    import signal

    from hybridlm.train.signals import SetupSignals, TrainingInterrupted

    with SetupSignals() as setup:
        setup.deferred = True
        os.kill(os.getpid(), signal.SIGTERM)  # during the clean-up: ignored
        setup.deferred = False
        with pytest.raises(TrainingInterrupted) as e:
            os.kill(os.getpid(), signal.SIGHUP)
        assert str(e.value) == "SIGHUP received while setting up: training did not start"
        assert e.value.exit_status == 129
        os.kill(os.getpid(), signal.SIGINT)  # a second one: ignored, the clean-up goes on


def test_signal_handlers_are_left_alone_off_the_main_thread():
    """signal.signal raises ValueError off the main thread: entering there does nothing instead."""
    import signal
    import threading

    from hybridlm.train.signals import SetupSignals, StopSignals

    before = signal.getsignal(signal.SIGTERM)
    errors = []

    def enter():
        try:
            for cls in (StopSignals, SetupSignals):
                with cls():
                    pass
        except Exception as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert errors == [] and signal.getsignal(signal.SIGTERM) == before


def test_a_signal_the_process_ignores_stays_ignored():
    """Under nohup SIGHUP is ignored, so that the run outlives its terminal: the handlers replaced that, and the
    hangup stopped the run (or abandoned its set-up)."""
    import os
    import signal

    from hybridlm.train.signals import SetupSignals, StopSignals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGHUP)
            assert signals.pending() is None
        with SetupSignals():
            os.kill(os.getpid(), signal.SIGHUP)  # would raise TrainingInterrupted
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_stop_signals_call_on_signal_for_each_signal_first_or_not():
    """What the handler says at once (the trainer's notice) is told which signal came and whether it is the one
    that counts; the record keeps the first."""
    import os
    import signal

    from hybridlm.train.signals import StopSignals

    heard = []
    with StopSignals(on_signal=lambda signum, first: heard.append((signum, first))) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert heard == [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGINT, False)]
    assert signals.received == signal.SIGINT
