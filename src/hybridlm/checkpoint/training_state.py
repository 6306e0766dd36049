"""Training state (model, optimizer, scheduler, data position, RNG) through torch.distributed.checkpoint.

Tensors under canonical names, so a run resumes under another fusion, pipeline layout or world size;
the rest as JSON and safetensors (no pickle is written or trusted). One process or torchrun, where
every rank calls the same functions. Files and rules: docs/checkpoints.md, "Training state".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn import Module
from torch.optim import Optimizer

from ..config import TRAINING_ONLY_FIELDS
from ..errors import CheckpointError, CheckpointMismatchError
from ..pattern import PatternError, parse
from .canonical import canonical_name, model_name
from .io import (
    check_format,
    check_replaceable,
    commit_directory,
    destination,
    errors_at,
    listed,
    load_safetensors,
    read_json,
    refuse_meta,
    regular,
    unavailable,
    written,
)
from .safe_dcp import METADATA_NAME, SafeFileSystemReader, TensorOnlyLoadPlanner, read_dcp_metadata
from .weights import check_built

TRAINER_STATE = "trainer_state.json"
RNG_STATE = "rng.safetensors"
#: The trainer state of the first hybridlm versions: a pickle, never opened (unpickling can run code).
PICKLED_TRAINER_STATE = "trainer_state.pt"
STATE_FORMAT = "hybridlm-training-state"
STATE_VERSION = 1
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
#: A flattened optimizer key: ``state.<param>.<stat>`` or ``param_groups.<param>.<hyperparameter>``.
_OPTIM_KEY = re.compile(r"([^.]+)\.(.+)\.([^.]+)")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dcp(call: Callable, *args: Any, **kwargs: Any) -> Any:
    """``dcp.save`` / ``dcp.load``, quiet about assuming one process when torch.distributed is not initialized."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return call(*args, **kwargs)


def _renamed(states: dict[str, Any], rename: Callable, model: Module) -> dict[str, Any]:
    """``states`` ({"model": ..., "optim": ...}) with each parameter name replaced by ``rename(name, pattern)``."""
    p = model.config.parsed

    def key(part: str, k: str) -> str:
        if part == "model":
            return rename(k, p)
        kind, param, leaf = _OPTIM_KEY.fullmatch(k).groups()
        return f"{kind}.{rename(param, p)}.{leaf}"

    return {part: {key(part, k): v for k, v in sd.items()} for part, sd in states.items()}


def _canonical_states(model, optimizer, doing: str) -> dict[str, Any]:
    """The model's and optimizer's states under canonical names; ``doing`` (what they are for) names a refusal."""
    check_built(getattr(model, "_orig_mod", model))  # a replaced config: a bare KeyError from canonical_name
    model_sd, optim_sd = get_state_dict(model, [] if optimizer is None else optimizer, options=_OPTIONS)
    # A ValueError, not a damaged file (CheckpointError): the save failed inside DCP ("Cannot copy out of meta
    # tensor"), the load was called a damaged checkpoint ("Default process group has not been initialized").
    refuse_meta(model_sd, doing, ValueError)
    return _renamed({"model": model_sd} | ({} if optimizer is None else {"optim": optim_sd}), canonical_name, model)


def _tensors_only(states: dict[str, Any]) -> dict[str, Any]:
    """What goes through DCP: tensors only. The optimizer's ``param_groups.*`` hyperparameters are
    left out (DCP would pickle them); the optimizer they are loaded into keeps its own."""
    optim = {k: v for k, v in states.get("optim", {}).items() if isinstance(v, torch.Tensor)}
    return {**states, "optim": optim} if "optim" in states else states


def _scheduler_setter(scheduler: Any, saved: Any) -> Callable[[], None]:
    """What puts ``scheduler`` at the saved position, ``saved`` checked now (KeyError, TypeError, ValueError,
    OverflowError). A LambdaLR (hybridlm's schedules) takes only the position, its rates coming from the
    optimizer's base rates: a changed ``optim.lr`` applies (unchanged: bitwise the saved). Any other scheduler
    steps from the rates the optimizer holds: it takes its whole entry (tried on it now and put back) and the
    optimizer its last rates."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        entry = dict(saved)
        if hasattr(scheduler, "lr_lambdas"):  # a MultiplicativeLR: its functions are code, left out when saved
            entry.setdefault("lr_lambdas", [None] * len(scheduler.lr_lambdas))
        optimizer = getattr(scheduler, "optimizer", None)
        lrs = entry.get("_last_lr") if hasattr(optimizer, "param_groups") else None
        if lrs is not None and not (
            isinstance(lrs, list)
            and len(lrs) == len(optimizer.param_groups)
            and all(type(lr) in (int, float) for lr in lrs)
        ):
            raise ValueError(f"_last_lr is not one rate per parameter group: {lrs!r}")
        before = scheduler.state_dict()
        try:
            scheduler.load_state_dict(dict(entry))
        finally:
            scheduler.load_state_dict(before)

        def put_whole() -> None:
            scheduler.load_state_dict(dict(entry))
            for group, lr in zip(optimizer.param_groups, lrs) if lrs else ():  # the groups DCP's load put there
                group["lr"] = lr

        return put_whole
    epoch = int(saved["last_epoch"])
    count = int(saved.get("_step_count", epoch + 1))
    lrs = [base * lam(epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]

    def put() -> None:
        scheduler.last_epoch, scheduler._step_count, scheduler._last_lr = epoch, count, lrs
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr

    return put


def config_differences(saved: dict[str, Any], config: Any) -> list[str]:
    """Where model config ``config`` differs from the saved config dict, beyond brackets, ``|`` and the fields
    only initialization or the training loss reads (``TRAINING_ONLY_FIELDS``). A field the saved dict lacks (written
    by a hybridlm from before the field existed: the first JSON states have no MLA fields) reads as its default, as
    ``ModelConfig.from_dict`` reads it, not as None ("model.q_lora_rank: checkpoint has None" refused them)."""
    mine = config.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    saved = {**defaults, **saved}
    try:
        diffs = parse(str(saved.get("pattern"))).differences(config.parsed)
    except PatternError:
        diffs = [f"pattern: checkpoint has an invalid pattern {saved.get('pattern')!r}"]
    for key in sorted((set(saved) | set(mine)) - {"pattern", "schema_version"} - TRAINING_ONLY_FIELDS):
        if saved.get(key) != mine.get(key):
            diffs.append(f"model.{key}: checkpoint has {saved.get(key)!r}, this run has {mine.get(key)!r}")
    return diffs


def save_training_state(
    path: str | Path, model: Module, optimizer: Optimizer | None = None, scheduler: Any = None, **trainer_state: Any
) -> Path:
    """Write a resumable training state to directory ``path`` (replacing one that is there).

    Args:
        model: a HybridLM (whole, a pipeline stage, or FSDP-sharded).
        optimizer, scheduler: optional; the scheduler needs ``state_dict()``.
        trainer_state: small JSON-serializable values to restore (step, data position, ...). Each
            rank's RNG state and the model config are added.
    """
    path, rank = destination(path), dist.get_rank() if _distributed() else 0
    if optimizer is not None and not optimizer.state:
        # Never stepped (a save at step 0): nothing to keep, and DCP's get_state_dict would give the
        # optimizer a state by running a step (at lr 0), so that a resume took a second first step.
        optimizer = None
    tmp = path.parent / f".{path.name}.tmp"  # a name every rank knows
    if rank == 0:  # fresh, with the mode of a plain mkdir
        check_replaceable(path, "format", STATE_FORMAT, "a training state", TRAINER_STATE)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if _distributed():
        dist.barrier()

    def save_tensors() -> None:
        try:
            states = _canonical_states(model, optimizer, "cannot save a training state")
            _dcp(dcp.save, _tensors_only(states), checkpoint_id=str(tmp))
        except dcp.api.CheckpointException as e:  # a BaseException: raise what failed (e.g. OSError ENOSPC) instead
            raise next(iter(e.failures.values()), (e,))[0] from None

    try:  # a failed save leaves no hidden folder behind (a full disk stays full)
        written(tmp, save_tensors)  # torch.save's failed writes named, not "unexpected pos"
        version, internal, gauss = random.getstate()  # this rank's RNG: Python's as JSON, torch's and CUDA's as tensors
        cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
        mine = ([version, list(internal), gauss], {"torch": torch.get_rng_state(), **cuda})
        gathered = [None] * dist.get_world_size() if _distributed() else [mine]
        if _distributed():
            dist.all_gather_object(gathered, mine)
        if rank == 0:
            state = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **trainer_state}
            state.update(world_size=len(gathered), model_config=model.config.to_dict())
            state.update(rng_python={str(r): py for r, (py, _) in enumerate(gathered)})
            if scheduler is not None:  # its position; LambdaLR's functions are code, not state
                saved = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
                state["scheduler"] = {k: v for k, v in saved.items() if isinstance(v, (int, float, str, bool, list))}
            written(tmp / TRAINER_STATE, (tmp / TRAINER_STATE).write_text, json.dumps(state) + "\n")
            rng = {f"rank{r}.{k}": t.contiguous() for r, (_, ts) in enumerate(gathered) for k, t in ts.items()}
            written(tmp / RNG_STATE, save_file, rng, tmp / RNG_STATE)
            commit_directory(tmp, path)  # durable, then renamed
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _distributed():
        dist.barrier()
    return path


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The JSON trainer state of training-state folder ``path`` (step, scheduler, model config, ...)."""
    file = Path(path) / TRAINER_STATE
    missing = f"{path}: missing {TRAINER_STATE} (an incomplete save, or a folder written by an older hybridlm)"
    if (Path(path) / PICKLED_TRAINER_STATE).exists():  # ("an incomplete save" alone sent users looking for damage)
        missing = (
            f"{path}: missing {TRAINER_STATE}: the folder was written by an older hybridlm, whose trainer state "
            f"{PICKLED_TRAINER_STATE} is a pickle that this one never opens (unpickling can run code); continue the "
            "run with the hybridlm that wrote it (its `hybridlm train --resume` with --set train.steps=STEP exports "
            "the checkpoint's model/ at STEP, which this hybridlm loads)"
        )
    state = read_json(file, missing)
    check_format(state, file, "hybridlm training state", STATE_FORMAT, STATE_VERSION)
    if "step" in state and not (type(state["step"]) is int and state["step"] >= 0):
        raise CheckpointError(f"{file}: step must be a non-negative integer, got {state['step']!r}")
    return state


def check_same_model(path: str | Path, extra: dict[str, Any], config: Any) -> None:
    """Refuse (:class:`CheckpointMismatchError`, the differences listed) to load the training state at ``path``,
    whose trainer state is ``extra``, into a model of ``config`` (see :func:`config_differences`)."""
    if isinstance(saved := extra.get("model_config"), dict) and (diffs := config_differences(saved, config)):
        why = "the checkpoint holds another model (only brackets, '|' and initialization or loss settings may differ)"
        raise CheckpointMismatchError(f"{path}: cannot load training state into this model: {why}: {'; '.join(diffs)}")


def load_training_state(
    path: str | Path, model: Module, optimizer: Optimizer | None = None, scheduler: Any = None, restore_rng: bool = True
) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state` into ``model`` (and optimizer, scheduler), which may
    differ from the saving one in brackets, pipeline split, world size and the model fields only initialization
    or the training loss reads (``hybridlm.config.TRAINING_ONLY_FIELDS``); returns the trainer state. The
    optimizer keeps its own hyperparameters (lr, betas, ...) and takes the saved moments and step counts.

    Raises:
        CheckpointMismatchError: the checkpoint holds another model (the differences are listed).
        CheckpointError: a missing, damaged or crafted file (nothing in it is unpickled freely); refused before the
            model, optimizer, scheduler or RNG is touched unless the damage is inside tensor data.
    """
    # Reading creates the optimizer's state before DCP fills it: a checkpoint that then fails to load must not
    # leave it behind (a fallback to a step-0 checkpoint, which holds none, kept it and trained differently).
    before = None if optimizer is None else dict(optimizer.state)
    try:
        return _load_training_state(Path(path), model, optimizer, scheduler, restore_rng)
    except BaseException:
        if optimizer is not None:
            optimizer.state.clear()
            optimizer.state.update(before)
        raise


def _every_rank_accepts(path: Path, refusal: CheckpointError | None) -> None:
    """Raise ``refusal`` on this rank and, under torch.distributed, a CheckpointError naming it on every other
    rank. The checks before DCP's load read per-rank entries (each rank's RNG state): a rank that refused the
    checkpoint alone fell back to an older one while the others loaded this one, within one collective DCP
    load, and the ranks went on from different steps."""
    said = [None] * dist.get_world_size() if _distributed() else []
    if said:
        dist.all_gather_object(said, None if refusal is None else str(refusal))
    if refusal is not None:
        raise refusal
    if refused := [(r, why) for r, why in enumerate(said) if why is not None]:
        rank, why = refused[0]
        raise CheckpointError(f"{path}: refused by rank {rank} of {len(said)}: {why.removeprefix(f'{path}: ')}")


def _load_training_state(
    path: Path, model: Module, optimizer: Optimizer | None, scheduler: Any, restore_rng: bool
) -> dict[str, Any]:
    refusal = None
    try:  # every rank checks before any rank's DCP load: all load this checkpoint, or none does
        optimizer, extra, puts, states, wanted, stateless = _checked(path, model, optimizer, scheduler, restore_rng)
    except CheckpointError as e:
        refusal = e
    _every_rank_accepts(path, refusal)
    try:
        _dcp(dcp.load, wanted, storage_reader=SafeFileSystemReader(str(path)), planner=TensorOnlyLoadPlanner())
    except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException
        failure = next(iter(e.failures.values()), (e,))[0] if isinstance(e, dcp.api.CheckpointException) else e
        if not isinstance(failure, Exception) or unavailable(failure):  # Ctrl-C, a refused read: no damaged file
            if isinstance(failure, OSError) and failure.filename is None:  # (a failed read() names no file)
                failure.filename = str(path)
            raise failure from None
        # DCP wraps each rank's traceback; its last line says what did not fit.
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1:] or [repr(e)]
        # A damaged file or another model's tensors (the saved model config matched, so most likely the former).
        raise CheckpointError(f"{path}: cannot load training state (a damaged file?): {reason[0]}") from None
    sd = _renamed({part: {**states[part], **wanted[part]} for part in states}, model_name, model)
    optims = [] if optimizer is None else optimizer
    set_state_dict(model, optims, model_state_dict=sd["model"], optim_state_dict=sd.get("optim", {}), options=_OPTIONS)
    for name, param in model.named_parameters() if optimizer is not None else ():
        if canonical_name(name, model.config.parsed) in stateless:
            optimizer.state.pop(param, None)
    for put in puts:
        put()
    return extra


def _checked(
    path: Path, model: Module, optimizer: Optimizer | None, scheduler: Any, restore_rng: bool
) -> tuple[Optimizer | None, dict[str, Any], list[Callable[[], None]], dict[str, Any], dict[str, Any], set[str]]:
    """Every file of the training state at ``path`` checked (CheckpointError), nothing loaded yet. Returns the
    optimizer (None where the checkpoint holds no optimizer state), the trainer state, what puts the scheduler and
    the RNG back, this model's canonical state dicts, those DCP is to fill, and the parameters saved without
    optimizer state."""
    # First, before DCP writes into the live model: a crafted or damaged .metadata, a missing or truncated data file.
    entries = read_dcp_metadata(path).state_dict_metadata
    if not any(k.startswith("optim.") for k in entries):
        optimizer = None  # saved before the first step: the optimizer stays as it is, fresh
    extra = read_trainer_state(path)
    check_same_model(path, extra, model.config)
    if restore_rng and not regular(path / RNG_STATE).is_file():  # (a folder in its place is named as one)
        raise CheckpointError(f"{path}: missing {RNG_STATE}")
    rng = load_safetensors(path / RNG_STATE) if restore_rng else {}
    # The rest of the JSON side is checked (RNG states on throwaway generators) here and applied once the tensors are
    # loaded: a damaged entry leaves the model, optimizer, scheduler and RNG as they were.
    puts = []
    if scheduler is not None and extra.get("scheduler") is not None:  # null: saved without a scheduler
        try:
            puts.append(_scheduler_setter(scheduler, extra["scheduler"]))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:  # (int(Infinity))
            raise CheckpointError(f"{path}: damaged scheduler state in {TRAINER_STATE} ({e!r})") from None
    py, rank = extra.get("rng_python", {}), str(dist.get_rank() if _distributed() else 0)
    with errors_at(f"{path}: damaged RNG state", TypeError, ValueError, RuntimeError):
        key = rank if restore_rng and rank in py else "0"  # a rank the saving run did not have: rank 0's
        if restore_rng and key in py and f"rank{key}.torch" in rng:
            version, internal, gauss = py[key]
            sets = [(random.setstate, random.Random().setstate, (version, tuple(internal), gauss))]
            sets.append((torch.set_rng_state, torch.Generator().set_state, rng[f"rank{key}.torch"]))
            if f"rank{key}.cuda" in rng and torch.cuda.is_available():
                sets.append((torch.cuda.set_rng_state, torch.Generator("cuda").set_state, rng[f"rank{key}.cuda"]))
            for put, check, state in sets:
                check(state)
                puts.append(functools.partial(put, state))
    # (The optimizer gets a state for every parameter here.)
    states = _canonical_states(model, optimizer, f"cannot load the training state {path} into the model")
    wanted = _tensors_only(states)
    # A parameter with no saved state had none when saved (it never had a gradient, e.g. DSA's indexer
    # without its loss): it gets none back, so that its first gradient starts from step 0 as it would have.
    state_keys = [k[len("optim.") :] for k in entries if k.startswith("optim.state.")]
    if odd := [f"optim.{k}" for k in state_keys if not _OPTIM_KEY.fullmatch(k)]:  # not state.<param>.<stat>
        raise CheckpointError(f"{path}: damaged optimizer entries in {METADATA_NAME}: {listed(odd)}")
    saved = {_OPTIM_KEY.fullmatch(k)[2] for k in state_keys}
    stateless = {_OPTIM_KEY.fullmatch(k)[2] for k in wanted.get("optim", {})} - saved
    if "optim" in wanted:
        wanted["optim"] = {k: v for k, v in wanted["optim"].items() if _OPTIM_KEY.fullmatch(k)[2] not in stateless}
    return optimizer, extra, puts, states, wanted, stateless
