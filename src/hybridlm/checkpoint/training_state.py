"""Training state (model, optimizer, scheduler, data position, RNG) through torch.distributed.checkpoint.

Tensors are stored under canonical names (optimizer state too, flattened per parameter), so a
run saved with one fusion choice, pipeline layout or world size resumes with another: DCP
reshards, and each process loads exactly the canonical tensors its model holds. The small
non-tensor state (step, scheduler position, data position, the model config) goes to
``trainer_state.json`` and each rank's RNG state to ``rng.safetensors`` beside the DCP files: no
pickle is written that a load would have to trust. Loading reads DCP's ``.metadata`` with an
allow-listed unpickler and reads tensors only (see :mod:`.safe_dcp`). Optimizer hyperparameters
(lr, betas, weight decay, ...) are not restored: those of the optimizer loaded into are in effect,
so a changed ``optim.*`` setting applies on resume. A directory is written under a temporary name
and renamed when complete.

Works in one process without ``torch.distributed`` initialized, and under ``torchrun`` (every rank
calls the same functions).
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import CheckpointError, CheckpointMismatchError
from .canonical import _pattern, canonical_name, model_name
from .io import commit_directory, read_json, temp_directory
from .safe_dcp import SafeFileSystemReader, TensorOnlyLoadPlanner, read_dcp_metadata

TRAINER_STATE = "trainer_state.json"
RNG_STATE = "rng.safetensors"
STATE_FORMAT = "hybridlm-training-state"
STATE_VERSION = 1
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


def _tensors_only(states: dict[str, Any]) -> dict[str, Any]:
    """What goes through DCP: tensors only. The optimizer's ``param_groups.*`` hyperparameters are
    left out (DCP would pickle them); the optimizer they are loaded into keeps its own."""
    out = {"model": states["model"]}
    if "optim" in states:
        out["optim"] = {k: v for k, v in states["optim"].items() if isinstance(v, torch.Tensor)}
    return out


def rng_state() -> dict[str, Any]:
    """This process's RNG states: Python's as JSON-able lists, torch's (and CUDA's) as uint8 tensors."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _scheduler_json(scheduler: Any) -> dict[str, Any]:
    state = scheduler.state_dict()
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, list)) and k != "lr_lambdas"}


def _restore_scheduler(scheduler: Any, saved: dict[str, Any]) -> None:
    """Put ``scheduler`` at the saved position. For a LambdaLR (hybridlm's schedules) only the
    position is taken: the learning rates come from the optimizer's own base rates, so a changed
    ``optim.lr`` applies (and equals the saved rates bit for bit when unchanged)."""
    epoch = int(saved["last_epoch"])
    if hasattr(scheduler, "lr_lambdas"):
        scheduler.last_epoch = epoch
        scheduler._step_count = int(saved.get("_step_count", epoch + 1))
        lrs = [base * lam(epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
    else:
        scheduler.load_state_dict(saved)


def config_differences(saved: dict[str, Any], config: Any) -> list[str]:
    """Where model config ``config`` differs from the saved config dict, beyond brackets and ``|``."""
    from ..pattern import PatternError, parse

    mine = config.to_dict()
    diffs = []
    try:
        diffs += parse(str(saved.get("pattern"))).differences(config.parsed)
    except PatternError:
        diffs.append(f"pattern: checkpoint has an invalid pattern {saved.get('pattern')!r}")
    for key in sorted(set(saved) | set(mine)):
        if key in ("pattern", "schema_version"):
            continue
        if saved.get(key) != mine.get(key):
            diffs.append(f"model.{key}: checkpoint has {saved.get(key)!r}, this run has {mine.get(key)!r}")
    return diffs


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
        trainer_state: small JSON-serializable values to restore (step, data position, ...). Each
            rank's RNG state and the model config are added.
    """
    from safetensors.torch import save_file

    path = Path(path)
    rank = _rank()
    tmp = path.parent / f".{path.name}.tmp"  # a name every rank knows
    if rank == 0:
        temp_directory(path, unique=False)
    _barrier()
    with _quiet_single_process():
        dcp.save(_tensors_only(_canonical_states(model, optimizer)), checkpoint_id=str(tmp))
    gathered = [rng_state()]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rng_state())
    if rank == 0:
        state = {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            **trainer_state,
            "world_size": len(gathered),
            "model_config": model.config.to_dict(),
            "rng_python": {str(r): g["python"] for r, g in enumerate(gathered)},
        }
        if scheduler is not None:
            state["scheduler"] = _scheduler_json(scheduler)
        (tmp / TRAINER_STATE).write_text(json.dumps(state) + "\n")
        rng = {f"rank{r}.{k}": g[k].contiguous() for r, g in enumerate(gathered) for k in ("torch", "cuda") if k in g}
        save_file(rng, tmp / RNG_STATE)
        commit_directory(tmp, path, lambda _: True, "a training state")  # durable, then renamed
    _barrier()
    return path


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The JSON trainer state of training-state folder ``path`` (step, scheduler, model config, ...)."""
    file = Path(path) / TRAINER_STATE
    missing = f"{path}: missing {TRAINER_STATE} (an incomplete save, or a folder written by an older hybridlm)"
    state = read_json(file, missing)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{file}: not a hybridlm training state")
    if not isinstance(state.get("format_version"), int) or state["format_version"] > STATE_VERSION:
        raise CheckpointError(
            f"{file}: format_version {state.get('format_version')!r} is newer than this hybridlm reads"
        )
    return state


def _read_rng(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path / RNG_STATE)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {RNG_STATE}") from None
    except Exception as e:
        raise CheckpointError(f"{path / RNG_STATE}: cannot read safetensors file ({e})") from None


def load_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state` into ``model`` (and optimizer, scheduler).

    The model may use other brackets, another pipeline split or another world size than the one
    that saved; any other difference of the model config is refused. The optimizer keeps its own
    hyperparameters (lr, betas, ...); its moments and step counts are loaded. Returns the trainer
    state (step, data position, ...).

    Raises:
        CheckpointMismatchError: the checkpoint holds another model (the differences are listed).
        CheckpointError: a missing, damaged or crafted file (nothing in it is unpickled freely).
    """
    path = Path(path)
    read_dcp_metadata(path)  # refuse a crafted or damaged .metadata before anything else
    extra = read_trainer_state(path)
    saved_config = extra.get("model_config")
    if isinstance(saved_config, dict) and hasattr(model, "config"):
        diffs = config_differences(saved_config, model.config)
        if diffs:
            raise CheckpointMismatchError(
                f"{path}: cannot load training state into this model: the checkpoint holds another model "
                "(only brackets and '|' may differ): " + "; ".join(diffs)
            )
    rng = _read_rng(path) if restore_rng else {}
    p = _pattern(model.config.parsed)
    states = _canonical_states(model, optimizer)
    wanted = _tensors_only(states)
    try:
        with _quiet_single_process():
            dcp.load(
                wanted,
                storage_reader=SafeFileSystemReader(str(path)),
                planner=TensorOnlyLoadPlanner(),
            )
    except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException
        # DCP wraps each rank's traceback; its last line says what did not fit.
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1:] or [repr(e)]
        raise CheckpointError(f"{path}: cannot load training state into this model: {reason[0]}") from None
    states["model"] = wanted["model"]
    if optimizer is not None:
        states["optim"].update(wanted["optim"])
    model_sd = {model_name(k, p): v for k, v in states["model"].items()}
    if optimizer is not None:
        optim_sd = _rename_optimizer(states["optim"], lambda n: model_name(n, p))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTIONS)
    else:
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={}, options=_OPTIONS)
    if scheduler is not None and isinstance(extra.get("scheduler"), dict):
        _restore_scheduler(scheduler, extra["scheduler"])
    if restore_rng:
        rank = str(_rank())
        py = extra.get("rng_python", {})
        key = rank if rank in py else "0"
        if key in py and f"rank{key}.torch" in rng:
            state = {"python": py[key], "torch": rng[f"rank{key}.torch"]}
            if f"rank{key}.cuda" in rng:
                state["cuda"] = rng[f"rank{key}.cuda"]
            try:
                set_rng_state(state)
            except (TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{path}: damaged RNG state ({e})") from None
    return extra
