"""What every inference entry point runs under (``generate``, prompt scoring, the decode batch, the serving worker):
autograd off, and the model's CUDA device current.

Both are per-thread settings, which a serving worker's thread does not inherit: grad mode is on in a new thread (a
continuous batch's cache then held every step's autograd graph until the GPU ran out of memory), and the current
device is cuda:0, where kernels launched by Triton (which launches on the current device, not the tensors') would run
for a model on cuda:1.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def inference(model: torch.nn.Module):
    """No autograd, and ``model``'s CUDA device current (none made current for a model elsewhere)."""
    device = next(model.parameters()).device
    with torch.no_grad(), torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        yield


def inferring(fn):
    """``fn`` run under :func:`inference` of its model: its first argument, or that argument's ``model`` (a method
    of an object that holds one)."""

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        with inference(first if isinstance(first, torch.nn.Module) else first.model):
            return fn(first, *args, **kwargs)

    return run
