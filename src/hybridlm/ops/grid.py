"""CUDA's launch-grid limit, running a batched op in row groups that fit it, and the sizes ops cut work by.

A grid's first dimension may hold 2^31 - 1 programs, its second and third only 65,535. The Triton
wrappers put the batch (times heads or groups) on the second or third, so a large enough batch
would fail to launch ("invalid argument"). Rows are independent, so the wrappers run such a batch
in groups of rows and concatenate: the same result, one launch set per group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_positive_int(value: object, name: str, unit: str) -> None:
    """Refuse (ValueError naming ``name`` and its ``unit``) a size an op cuts its work by (a chunk) that is not a
    positive ``int``: a float (64.0) passed a plain ``< 1`` and failed later inside the padding ("type must be tuple
    of ints"), a negative chunk ran no chunk at all, and ``True`` read as 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer ({unit}), got {value!r}")


#: Programs a launch grid may hold along its second and third dimensions.
MAX_GRID_YZ = 65535


def rows_per_launch(programs_per_row: int) -> int:
    """The most batch rows whose ``programs_per_row`` programs each fit one grid dimension."""
    return max(1, MAX_GRID_YZ // max(1, programs_per_row))


def in_row_groups(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    rows: int,
    *batched: torch.Tensor | None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``fn(*batched)`` computed over groups of at most ``rows`` rows (dim 0 of every tensor; None passes
    through) and concatenated along dim 0; a single call when the batch fits."""
    b = next(t for t in batched if t is not None).shape[0]
    if b <= rows:
        return fn(*batched)
    outs = [fn(*(None if t is None else t[i : i + rows] for t in batched)) for i in range(0, b, rows)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)
