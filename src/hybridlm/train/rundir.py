"""The run directory: choosing it, keeping two runs out of one folder, and what lives in it.

A run folder holds ``config.toml`` (the resolved run file), ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/step-N`` (DCP training states) and, at the end, ``model/`` (the exported weights).
:func:`claim` picks the folder before anything is built; the trainer writes ``config.toml`` only
once the run has started (data read, model built, a resumed state loaded), so a run that fails to
start, or a refused ``--resume``, leaves an existing folder exactly as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from ..checkpoint.io import check_replaceable, remove_leftovers, replace_file
from ..errors import DataError
from .listing import list_checkpoints, step_of

logger = logging.getLogger("hybridlm.checkpoint")

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
#: Marks a run folder in use: ``pid host`` of the process running it, then its start where the system shows
#: it (``boot-id start-ticks`` on Linux), see :func:`lock`.
LOCK_FILE = ".hybridlm.pid"
#: The placeholder of ``train.run_dir`` filled with the start time (``runs/{time}``).
TIME_FIELD = "{time}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = list_checkpoints(run_dir / CHECKPOINTS)  # in step order: step-1000000 after step-999999
    return steps[-1] if steps else None


def _check_fresh(path: Path, toml: str) -> None:
    """Refuse to start a new run in ``path`` if it holds another run's files (or a ``config.toml``
    that is not this run's: a user's run file, which the run's own would overwrite)."""
    if latest_checkpoint(path) is not None:
        raise DataError(f"{path} already holds a run; continue it with --resume {path}, or choose another --run-dir")
    metrics = path / METRICS_FILE
    if (path / MODEL_DIR).exists() or (metrics.is_file() and metrics.stat().st_size > 0):
        raise DataError(
            f"{path} already holds a run that has no checkpoint to resume from ({METRICS_FILE} or {MODEL_DIR}/ "
            "are there); remove it, or choose another --run-dir"
        )
    config = path / CONFIG_FILE
    if config.is_file() and config.read_text(errors="replace") != toml:
        raise DataError(
            f"{config} exists and is not this run's (a run file, or the config of a run stopped before its first "
            "checkpoint); refusing to overwrite it: choose another --run-dir, or move the file out"
        )


def claim(run_dir: str | Path | None, template: str, toml: str, resume: bool) -> tuple[Path, list[Path]]:
    """The run's folder and the folders this call created, deepest first (so that a failed start can remove
    them, see :func:`remove_if_empty`): the run's and those of its parents that were missing.

    Args:
        run_dir: the folder asked for (with :data:`TIME_FIELD`: a template); None: ``template`` with it filled in. Runs
            started in the same second get ``-2``, ``-3``, ... (each folder is created atomically).
        template: ``train.run_dir``.
        toml: the run file this run will write (a ``config.toml`` already there must be it).
        resume: continue the run in ``run_dir``, whose ``model/`` must be one a finished run can replace.

    Raises:
        DataError: the folder holds another run (or another file where the run writes its own).
    """
    # A run file's "~/runs/{time}" (no shell expands it there) made a folder named "~" in the current one.
    template = os.path.expanduser(template)
    run_dir = None if run_dir is None else Path(os.path.expanduser(run_dir))  # ("~nobody/x" stays as it is)
    if run_dir is not None and TIME_FIELD in str(run_dir) and not resume:  # a folder asked for as a template
        run_dir, template = None, str(run_dir)
    if run_dir is None and TIME_FIELD in template and not resume:
        base = template.replace(TIME_FIELD, time.strftime("%Y%m%d-%H%M%S"))
        parents = _make_folders(Path(base).parent)
        for i in itertools.count(1):
            path = Path(base if i == 1 else f"{base}-{i}")
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            lock(path)
            return path, [path, *parents]
    path = Path(template if run_dir is None else run_dir)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: a file, not a folder; the run writes a folder there (choose another --run-dir)")
    if resume:  # before training, not after it: the export at the end replaces model/
        check_replaceable(path / MODEL_DIR, "format", "hybridlm", "a hybridlm checkpoint")
        if path.is_dir():
            lock(path)
            try:
                # Under the lock no write runs: what a killed run was writing is only taking room.
                left = [*remove_leftovers(path), *remove_leftovers(path / CHECKPOINTS)]
            except BaseException:  # Ctrl-C in a long removal: the folder is free again (not held until exit)
                unlock(path)
                raise
            if left:
                logger.warning("%s: removed what interrupted writes left: %s", path, ", ".join(left))
        return path, []
    _refuse_if_in_use(path)  # first: "already holds a run ... remove it" is no advice for a live one
    _check_fresh(path, toml)
    created = _make_folders(path)
    lock(path)
    return path, created


def _make_folders(path: Path) -> list[Path]:
    """Create folder ``path`` and its missing parents; returns those this call created, deepest first. One made
    meanwhile by another process is not counted: it is not this run's to remove."""
    made: list[Path] = []
    for folder in reversed([p for p in (path, *path.parents) if not p.exists()]):  # from the top down
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        except OSError as e:  # a file where a parent folder must be, a read-only or missing place: say which setting
            file = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
            why = f"{file} is a file, not a folder" if file else f"{e.strerror} ({folder})"
            raise DataError(f"{path}: cannot create the run folder: {why}; choose another --run-dir") from None
        made.insert(0, folder)
    return made


def _me() -> list[str]:
    return [str(os.getpid()), socket.gethostname(), *_started(os.getpid())]


def _started(pid: int | str) -> list[str]:
    """When process ``pid`` of this host started: the boot id and its start time in clock ticks since boot
    (field 22 of ``/proc/PID/stat``), which no other process shares, unlike its pid after a reboot or once
    the pids wrap around; ``[]`` where the system does not show them (not Linux, no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return []
    fields = stat.rsplit(")", 1)[-1].split()  # fields 3, 4, ...: the command name (field 2) may hold ")"
    return [boot, fields[19]] if len(fields) > 19 and boot else []  # field 22: the start time


#: Run folders this process holds -> the open lock file, whose ``flock`` is held until :func:`unlock`.
_HELD: dict[Path, int] = {}


def lock(path: Path) -> None:
    """Mark ``path`` as this process's run (:data:`LOCK_FILE` holds ``pid host``, and the process's start where
    known), refusing a folder that another live process holds: two runs started in one folder would write the
    same files. A lock left by a process that is gone (a kill, a reboot: its pid is now another process's) is
    taken over; one from another host is trusted.

    The file is also ``flock``-ed while the run lasts: reading, judging and writing it is then one step
    (two processes starting at once both took a stale or half-written lock), and the system frees it
    when the process dies."""
    file = path / LOCK_FILE
    if path.resolve() in _HELD:  # this process holds it already (a trainer built again in one process)
        _refuse_if_in_use(path)
        return
    for _ in range(100):  # an unlink between our open and our flock: open the new file
        fd = os.open(file, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process of this host
            os.close(fd)
            _refuse_if_in_use(path)  # names it, once it has written its name
            raise DataError(
                f"{path} is in use by another run, starting; wait for it, or choose another --run-dir"
            ) from None
        except OSError:  # a file system without flock: the file's content alone decides
            pass
        try:
            if os.fstat(fd).st_ino != os.stat(file).st_ino:
                os.close(fd)
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        try:
            _refuse_if_in_use(path)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, " ".join(_me()).encode())
        _HELD[path.resolve()] = fd
        return
    raise DataError(f"{file}: cannot take the run's lock (the file keeps changing)")


def _refuse_if_in_use(path: Path) -> None:
    """DataError if another live process holds ``path`` (see :func:`lock`)."""
    file = path / LOCK_FILE
    try:
        holder = file.read_text(errors="replace").split()
    except (FileNotFoundError, NotADirectoryError):
        return
    if holder != _me() and _alive(holder):
        pid, host = holder[:2]  # _alive accepts only "pid host" and "pid host boot-id start-ticks"
        raise DataError(
            f"{path} is in use by another run (process {pid} on {host}); wait for it, choose another --run-dir, "
            f"or remove {file} if that run is gone"
        )


def _alive(holder: list[str]) -> bool:
    if len(holder) not in (2, 4) or not holder[0].isdigit():
        return False  # not a lock this code wrote
    if holder[1] != socket.gethostname():
        return True  # another machine's process: no way to tell, so it may be running
    if int(holder[0]) == os.getpid():
        return False  # this process's pid in a line it did not write (see _refuse_if_in_use): a gone process's
    try:
        os.kill(int(holder[0]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    # A process has that pid: the holder unless it started at another time (a reboot, a pid used again). Without
    # both starts (an older lock file, a system without /proc) it may be the holder.
    now = _started(holder[0])
    return len(holder) == 2 or not now or now == holder[2:]


def unlock(path: Path) -> None:
    """Remove this process's lock from ``path`` (another process's is left alone), then release it."""
    file = path / LOCK_FILE
    with contextlib.suppress(OSError):
        if file.read_text().split() == _me():
            file.unlink()
    fd = _HELD.pop(path.resolve(), None)
    if fd is not None:
        os.close(fd)


def set_aside_newer(run_dir: Path, loaded: Path) -> list[Path]:
    """Rename the checkpoints newer than ``loaded`` (those a resume could not load) to hidden
    ``.step-N.damaged-<id>`` folders: kept for a look, no longer listed, pruned or in the way of the
    run's next save of that step. Returns their new paths."""
    moved = []
    for path in list_checkpoints(run_dir / CHECKPOINTS):
        if step_of(path) > step_of(loaded):
            aside = path.with_name(f".{path.name}.damaged-{uuid.uuid4().hex[:8]}")
            os.replace(path, aside)
            logger.warning("%s could not be loaded; moved aside to %s", path, aside)
            moved.append(aside)
    return moved


def write_config(path: Path, toml: str) -> None:
    """Write the run file atomically (a resume reads it)."""
    replace_file(path / CONFIG_FILE, lambda tmp: tmp.write_text(toml))


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a failed start created (deepest first, see :func:`claim`), each only if nothing was
    written into it: a folder that was there before the run, or that holds anything, stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
