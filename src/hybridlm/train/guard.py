"""Non-finite loss or gradient: skip the step, count it, stop after too many in a row.

A step whose loss or global gradient norm is ``inf``/``nan`` is skipped: the optimizer does not
step (weights, moments and AdamW's step counter stay as they were), while the learning-rate
schedule and the data position move on, so the schedule stays aligned with ``step`` (and with a
resumed run). ``train.max_nonfinite_steps`` skipped steps in a row end the run with
:class:`~hybridlm.errors.TrainingDivergedError`. :func:`weights_finite` guards every save.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import TrainingDivergedError


class NonFiniteGuard:
    """Counts non-finite steps; raises once ``limit`` come in a row.

    Attributes:
        skipped: non-finite steps skipped in this process's run so far.
        in_a_row: the current streak of non-finite steps.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.skipped = 0
        self.in_a_row = 0

    def state(self) -> dict[str, int]:
        """What a checkpoint keeps, so that a resumed run counts on (a streak does not restart at a resume)."""
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def restore(self, saved: object) -> None:
        """Take the counts :meth:`state` saved; a missing (older checkpoint) or malformed one leaves them at 0."""
        if isinstance(saved, dict) and all(
            type(saved.get(k)) is int and saved[k] >= 0 for k in ("skipped", "in_a_row")
        ):
            self.skipped, self.in_a_row = saved["skipped"], saved["in_a_row"]

    @staticmethod
    def finite(loss: float, grad_norm: float) -> bool:
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def record(
        self, step: int, finite: bool, checkpoint_before: Callable[[int], Path | None] = lambda first: None
    ) -> None:
        """Account for optimizer step ``step`` (1-based); raise when the streak reaches the limit. The
        message names ``checkpoint_before(first)``, the newest checkpoint from before the streak's first
        step (looked up only then)."""
        if finite:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            first = step - self.in_a_row + 1
            latest = checkpoint_before(first)
            if latest:
                # The step just before the streak was finite but may be the one that broke the weights.
                where = (
                    f"; the last checkpoint before them is {latest} (lower optim.lr or set optim.grad_clip, then "
                    "resume; if the same steps fail again, its weights were already damaged: move it aside and "
                    "resume from an earlier one)"
                )
            else:
                where = "; no checkpoint precedes them (start a new run, in another --run-dir, with a lower optim.lr or optim.grad_clip set)"
            raise TrainingDivergedError(
                f"training diverged: the loss or gradient was not finite at steps {first}-{step} "
                f"({self.in_a_row} in a row, train.max_nonfinite_steps = {self.limit}); stopped at step {step} "
                f"without saving{where}"
            )


@torch.no_grad()
def weights_finite(model: torch.nn.Module, device: torch.device | None = None) -> bool:
    """Every parameter and floating buffer finite, on every process (a collective when distributed, on
    ``device``: by default the first parameter's; a pipeline stage may hold none)."""
    ok = True
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            ok = False
            break
    if dist.is_available() and dist.is_initialized():
        device = device or next(model.parameters()).device
        flag = torch.tensor([0.0 if ok else 1.0], device=device if device.type != "meta" else "cpu")
        dist.all_reduce(flag)
        ok = flag.item() == 0
    return ok
