import os
import signal

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors), so the kernels'
# tests compare them with their references here too. It must be set before any kernel module
# is imported (``triton.jit`` reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _signal_handlers_put_back():
    """A test leaves the stop signals' handlers as it found them: one left SIGINT ignored in the pytest process,
    and every child a later test started inherited it (a terminal's Ctrl-C then did nothing)."""
    before = [signal.getsignal(s) for s in _STOP_SIGNALS]
    yield
    after = [signal.getsignal(s) for s in _STOP_SIGNALS]
    changed = [f"{s.name}: {b!r} -> {a!r}" for s, b, a in zip(_STOP_SIGNALS, before, after, strict=True) if a != b]
    for s, handler in zip(_STOP_SIGNALS, before, strict=True):
        if handler is not None:
            signal.signal(s, handler)
    assert not changed, f"the test left signal handlers changed: {'; '.join(changed)}"


def pytest_collection_modifyitems(config, items):
    # GPU tests skip themselves (visibly) when there is no CUDA device; they never pass vacuously.
    # A module that sets INTERPRETER_ONLY runs its other tests in Triton's interpreter on CPU
    # tensors, which a CUDA machine does not use (kernels there are compiled): they skip, visibly,
    # and its gpu tests cover the kernels.
    from tests.helpers import interpreter_only

    cuda = torch.cuda.is_available()
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if not cuda and "gpu" in item.keywords:
            item.add_marker(no_gpu)
        elif cuda and "gpu" not in item.keywords and getattr(item.module, "INTERPRETER_ONLY", False):
            item.add_marker(interpreter_only)
