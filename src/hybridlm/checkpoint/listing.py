"""The ``step-N`` folders of a run, in step order (``step-1000000`` comes after ``step-999999``)."""

from __future__ import annotations

import re
from pathlib import Path

_STEP = re.compile(r"step-(\d+)")


def step_of(path: str | Path) -> int | None:
    """The step number of a ``step-N`` folder name, or None for any other name."""
    m = _STEP.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The ``step-N`` folders in ``folder``, oldest step first (numeric order, not text order).

    Temporary folders of a save in progress (``.step-N.tmp``) are not listed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(step_of(p), p) for p in folder.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]
