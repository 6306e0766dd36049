"""The ``step-N`` folders of a run, in step order (``step-1000000`` comes after ``step-999999``),
and resuming from the newest one that loads."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import CheckpointError, CheckpointMismatchError

logger = logging.getLogger("hybridlm.checkpoint")
T = TypeVar("T")

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


def load_newest(checkpoints: list[Path], load: Callable[[Path], T]) -> tuple[T, Path]:
    """``load`` the newest of ``checkpoints`` (oldest first) that loads; a damaged one is skipped
    with a warning. A checkpoint of another model (:class:`CheckpointMismatchError`) stops the
    search: an older one holds the same model.

    Returns:
        (what ``load`` returned, the checkpoint it loaded).

    Raises:
        CheckpointError: none loads (each one's reason listed), or there is none.
    """
    if not checkpoints:
        raise CheckpointError("no checkpoint to resume from")
    failures = []
    for path in reversed(checkpoints):
        try:
            result = load(path)
        except CheckpointMismatchError:
            raise
        except CheckpointError as e:
            failures.append(f"{path.name}: {e}")
            logger.warning("cannot resume from %s (%s); trying the previous checkpoint", path, e)
            continue
        if failures:
            logger.warning("resuming from %s: the newer checkpoint(s) could not be loaded", path)
        return result, path
    raise CheckpointError("no checkpoint could be loaded: " + "; ".join(failures))
