"""torch's CPU threads for the length of one call: ``torch.set_num_threads`` is process-wide."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Inside, torch uses ``n`` CPU threads (``train.threads``, ``generate --threads``; None or 0 leaves torch's
    choice); at the exit the process's setting comes back: a notebook that trained with ``threads = 1`` went on
    with one thread for everything else."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
