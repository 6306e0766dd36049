"""SIGINT, SIGTERM and SIGHUP during training: finish what is running, save, exit conventionally.

The handler only records the signal (and says at once, on the first process, what happens next);
the training loop looks at the record between steps (and after a save), so a signal never lands
inside a DCP write. The loop then writes a checkpoint of the current step and raises
:class:`TrainingInterrupted`, which the CLI turns into exit status 128 + signal number (130, 143,
129) with a line saying how to resume. Later signals are ignored until then: a second Ctrl-C must
not cost the checkpoint the first one asked for.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..errors import HybridLMError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TrainingInterrupted(HybridLMError):
    """Training stopped on a signal, after saving a checkpoint (or before it started: see
    :class:`SetupSignals`). ``exit_status`` is 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.signum, str(self)))


class _Handlers:
    """While entered, ``self._handle`` is the handler of STOP_SIGNALS; the previous ones come back at exit.

    A signal the process ignores stays ignored: SIGHUP under ``nohup`` (a run that is to outlive the
    terminal), SIGINT in a shell script's background job. Handlers can only be installed from the main
    thread; elsewhere this does nothing.
    """

    def __enter__(self):
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError


class StopSignals(_Handlers):
    """While entered, STOP_SIGNALS set :attr:`received` (the first signal number) instead of acting.

    ``on_signal(signum, first)``, where given, is called from the handler for every signal (``first``: the one
    :attr:`received` keeps), to say at once what happens next: the step and the save it waits for may take
    minutes. It runs in the main thread between two bytecodes of whatever was running, so it must not raise,
    and writes with ``os.write`` (a write through ``sys.stderr`` could land inside one in progress: "reentrant
    call")."""

    def __init__(self, on_signal: Callable[[int, bool], None] | None = None) -> None:
        self.received: int | None = None
        self.on_signal = on_signal

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if self.on_signal is not None:
            self.on_signal(signum, first)

    def pending(self, device: torch.device | None = None) -> int | None:
        """The signal to stop for, agreed on by every process (a collective when distributed)."""
        signum = self.received or 0
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([signum], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t.item())
        return signum or None


class SetupSignals(_Handlers):
    """While entered (a run's set-up: its folder claimed, data read, model built), the first of STOP_SIGNALS
    raises :class:`TrainingInterrupted`, as SIGINT raises KeyboardInterrupt, so that the set-up's clean-up
    runs (SIGTERM's and SIGHUP's default action would kill the process and leave the folder marked in use).
    Later signals, and any while :attr:`deferred` is set (during that clean-up), are ignored. :attr:`raised` keeps
    what was raised: code that turns whatever interrupts it into an error of its own (DCP's load) hides it.
    """

    def __init__(self) -> None:
        self.deferred = False
        self.raised: TrainingInterrupted | None = None

    def _handle(self, signum, frame) -> None:
        if self.raised is None and not self.deferred:
            self.raised = TrainingInterrupted(
                signum, f"{signal_name(signum)} received while setting up: training did not start"
            )
            raise self.raised


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
