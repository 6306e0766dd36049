"""Python's garbage collector at chosen steps (Megatron's ``--manual-gc``).

Where the host sets the pace of a step (small batches, many small kernels) an automatic
collection is a pause of milliseconds at a step the allocation counts pick. With ``every = N``
automatic collection is off and a full collection runs after every N-th step, so the pauses land
at known steps; ``every = 0`` leaves Python's collector as it is.
"""

from __future__ import annotations

import gc


class ManualGC:
    """Context manager: automatic collection off inside (if ``every`` > 0), one collection on entry."""

    def __init__(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"ManualGC: every must be >= 0, got {every}")
        self.every = every
        self._was_enabled = True  # as found on entry

    def __enter__(self) -> ManualGC:
        if self.every:
            self._was_enabled = gc.isenabled()
            gc.collect()
            gc.disable()
        return self

    def after_step(self, step: int) -> None:
        """Collect after step ``step`` (1-based) when it is a multiple of ``every``."""
        if self.every and step % self.every == 0:
            gc.collect()

    def __exit__(self, *exc) -> None:
        if self.every and self._was_enabled:
            gc.enable()
