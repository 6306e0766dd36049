"""Training state (model, optimizer, scheduler, data position, RNG) through torch.distributed.checkpoint.

Tensors are stored under canonical names (optimizer state too, flattened per parameter), so a
run saved with one fusion choice, pipeline layout or world size resumes with another: DCP
reshards, and each process loads exactly the canonical tensors its model holds. The small
non-tensor state (step, scheduler, data position, RNG) goes to ``trainer_state.pt`` beside the
DCP files. A directory is written under a temporary name and renamed when complete.

Works in one process without ``torch.distributed`` initialized, and under ``torchrun`` (every rank
calls the same functions).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import CheckpointError
from .canonical import _pattern, canonical_name, model_name

TRAINER_STATE = "trainer_state.pt"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process when torch.distributed is not initialized: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rename_optimizer(state: dict[str, Any], rename) -> dict[str, Any]:
    """Flattened optimizer keys are ``state.<param>.<stat>`` / ``param_groups.<param>.<hyper>``."""
    out = {}
    for key, value in state.items():
        kind, rest = key.split(".", 1)
        param, leaf = rest.rsplit(".", 1)
        out[f"{kind}.{rename(param)}.{leaf}"] = value
    return out


def _canonical_states(model, optimizer) -> dict[str, Any]:
    p = _pattern(model.config.parsed)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    else:
        model_sd, optim_sd = get_state_dict(model, [], options=_OPTIONS)[0], None
    states: dict[str, Any] = {"model": {canonical_name(k, p): v for k, v in model_sd.items()}}
    if optim_sd is not None:
        states["optim"] = _rename_optimizer(optim_sd, lambda n: canonical_name(n, p))
    return states


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    **trainer_state: Any,
) -> Path:
    """Write a resumable training state to directory ``path`` (replacing one that is there).

    Args:
        model: a HybridLM (whole, a pipeline stage, or FSDP-sharded).
        optimizer, scheduler: optional; the scheduler needs ``state_dict()``.
        trainer_state: small picklable values to restore (step, data position, ...). Each rank's
            RNG state is added.
    """
    path = Path(path)
    rank = _rank()
    tmp = path.parent / f".{path.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(_canonical_states(model, optimizer), checkpoint_id=str(tmp))
    extra = {"rng": {rank: rng_state()}, **trainer_state}
    if scheduler is not None:
        extra["scheduler"] = scheduler.state_dict()
    gathered = [extra]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, extra)
    if rank == 0:
        merged = dict(gathered[0])
        merged["rng"] = {r: g["rng"][r] for r, g in enumerate(gathered)}
        merged["world_size"] = len(gathered)
        torch.save(merged, tmp / TRAINER_STATE)
        old = path.parent / f".{path.name}.old"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state` into ``model`` (and optimizer, scheduler).

    The model may use other brackets, another pipeline split or another world size than the one
    that saved. Returns the trainer state (step, data position, ...).
    """
    path = Path(path)
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path}: not a training-state directory (no DCP .metadata)")
    p = _pattern(model.config.parsed)
    states = _canonical_states(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(states, checkpoint_id=str(path))
    except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException
        # DCP wraps each rank's traceback; its last line says what did not fit.
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1:] or [repr(e)]
        raise CheckpointError(f"{path}: cannot load training state into this model: {reason[0]}") from None
    model_sd = {model_name(k, p): v for k, v in states["model"].items()}
    if optimizer is not None:
        optim_sd = _rename_optimizer(states["optim"], lambda n: model_name(n, p))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTIONS)
    else:
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={}, options=_OPTIONS)
    try:
        extra = torch.load(path / TRAINER_STATE, weights_only=True)
    except FileNotFoundError:
        extra = {}
    if scheduler is not None and "scheduler" in extra:
        scheduler.load_state_dict(extra["scheduler"])
    if restore_rng and "rng" in extra:
        mine = extra["rng"].get(_rank()) or extra["rng"].get(0)
        if mine is not None:
            set_rng_state(mine)
    return extra
