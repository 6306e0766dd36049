import os

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
