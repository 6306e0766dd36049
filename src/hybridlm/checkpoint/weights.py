"""Published weights: a directory of safetensors in the canonical layout, plus ``config.json`` (the
resolved ModelConfig, the pattern, the SHA-256 of each file), written atomically. The layout is in
docs/checkpoints.md ("Published weights")."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..pattern import PatternError, parse
from .canonical import canonical_name, to_canonical
from .io import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    check_fit,
    check_format,
    check_replaceable,
    check_shard_size,
    destination,
    dominant_dtype,
    errors_at,
    file_sha256,
    full_cpu,
    load_safetensors,
    meta_shapes,
    read_json,
    refuse_losing_checkpoint,
    refuse_meta,
    weight_files,
    write_directory,
)

FORMAT = "hybridlm"
FORMAT_VERSION = 1
CHECKSUMS_KEY = "sha256"  #: config.json key: safetensors file name -> SHA-256 hex digest
WRONG_SHAPE = "{name}: {source} has {got}, model has {want}"  #: check_fit's line for a tensor loaded into a model

logger = logging.getLogger("hybridlm.checkpoint")

if TYPE_CHECKING:
    from ..model import HybridLM


def canonical_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under canonical names (tied weights once, non-persistent buffers left out)."""
    from ..model import HybridLM

    # torch.compile(model) returns a wrapper that runs the model it holds as ``_orig_mod``: save that one.
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, HybridLM):
        raise TypeError(f"expected a HybridLM, got {type(model).__name__}")
    # Before the stage check and the renaming: a config whose pattern fuses otherwise was called "a pipeline stage",
    # or failed in canonical_name with a bare KeyError.
    check_built(model)
    if not model.is_whole:
        raise CheckpointError(
            "save needs the whole model, but this one is a pipeline stage (some blocks, the embedding or the head "
            "are missing); gather the stages' canonical state dicts and save those with save_state_dict"
        )
    return to_canonical(model.state_dict(), model.config.parsed)


def check_built(model: HybridLM) -> None:
    """Refuse (CheckpointError, saying what differs) a ``model`` whose blocks are not those its ``config``'s pattern
    describes: the config was replaced after construction. A pipeline stage built from it passes."""
    p = model.config.parsed

    def shown(symbols: str | None) -> str:
        return "none" if symbols is None else f"[{symbols}]" if len(symbols) > 1 else symbols

    def held(blocks: torch.nn.ModuleDict) -> dict[int, str | None]:
        # torch.compile's and checkpoint_wrapper's wrappers pass ``symbols`` through
        return {int(k): getattr(b, "symbols", None) for k, b in blocks.items()}

    # A pipeline stage (or a pipeline rank's model) holds some of the blocks: only those are compared. Patterns that
    # differ only in brackets differ in a block both hold. An MTP depth is never split.
    stacks = [("blocks", held(model.blocks), p.blocks, False)]
    stacks += [(f"mtp.{d}.blocks", held(depth.blocks), p.mtp_blocks, True) for d, depth in enumerate(model.mtp)]
    diffs = []
    for where, got, wanted, whole in stacks:
        for k in sorted(set(got) | set(range(len(wanted)) if whole else set())):
            want = wanted[k] if k < len(wanted) else None
            # a module that is no Block (no ``symbols``) put in by hand is not judged here
            if (k not in got or got[k] is not None) and got.get(k) != want:
                diffs.append(f"{where}.{k}: model '{shown(got.get(k))}', config '{shown(want)}'")
    if len(model.mtp) not in (0, p.mtp_depths):
        diffs.insert(0, f"mtp: model {len(model.mtp)} depths, config {p.mtp_depths}")
    if diffs:
        built = "".join(shown(s) for s in stacks[0][1].values())
        built += "".join("/" + "".join(shown(s) for s in stack[1].values()) for stack in stacks[1:])
        raise CheckpointError(
            f"model.config does not describe this model (was it replaced after construction?): the model's blocks "
            f"are '{built}', the config's pattern is '{model.config.pattern}' (first difference: {diffs[0]}); "
            "build a model from the new config and load these weights into it"
        )


def save_state_dict(
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    path: str | Path,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    extra_files: dict[str, str | bytes | Path] | None = None,
) -> Path:
    """Write canonical ``tensors`` and ``config`` as a checkpoint directory at ``path`` (atomically); refused
    (CheckpointError, listing them) unless they are exactly the tensors of a model built from ``config``, with values."""
    from .. import __version__

    refuse_meta(tensors, "cannot save the weights")  # (before the copy to the host, which names no tensor)
    # Tensors that do not fit ``config`` (a config replaced after the model was built, a resized embedding, a stage
    # left out of a gather) were written without a word, and the checkpoint refused at load, the model maybe gone.
    hint = "\n(the config describes other tensors: was it replaced, or a weight resized, after the model was built?)"
    check_fit(tensors, meta_shapes(config), "the state dict", hint)
    tensors, p = {k: full_cpu(v) for k, v in tensors.items()}, config.parsed
    dtypes: Counter[str] = Counter()
    for t in tensors.values():
        dtypes[str(t.dtype).removeprefix("torch.")] += t.numel()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hybridlm_version": __version__,
        "pattern": config.pattern,
        "canonical": p.canonical,
        "canonical_layers": list(p.layers),
        "mtp_layers": list(p.mtp_layers),
        "mtp_depths": p.mtp_depths,
        "num_parameters": sum(dtypes.values()),
        "dtypes": dict(dtypes),
        "config": config.to_dict(),
    }
    kw = dict(max_shard_size=max_shard_size, extra_files=extra_files, checksums=CHECKSUMS_KEY)
    return write_directory(path, tensors, meta, "format", "a hybridlm checkpoint", **kw)


def check_destination(path: str | Path, source: str | Path, extra_names: Iterable[str] = ()) -> None:
    """Refuse (CheckpointError) a ``path`` that :func:`save_state_dict` would refuse (``source`` or a folder holding
    it, another kind of folder, files the write would delete): a conversion calls it before reading any weights."""
    real = destination(path, source)
    check_replaceable(real, "format", FORMAT, "a hybridlm checkpoint")
    refuse_losing_checkpoint(real, set(extra_names))


def save(
    model: torch.nn.Module,
    path: str | Path,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    extra_files: dict[str, str | bytes | Path] | None = None,
) -> Path:
    """Save ``model``'s weights in the canonical unfused layout, with its config, to directory ``path``.

    Args:
        model: a whole :class:`hybridlm.HybridLM` (any fusion choice; FSDP-sharded is gathered).
        path: the checkpoint directory; an existing hybridlm checkpoint there is replaced atomically.
        max_shard_size: bytes per safetensors file before the weights are split into shards.
        extra_files: more files to place in the directory (name -> text, bytes or a file to copy),
            e.g. a tokenizer.

    Returns:
        The checkpoint directory.
    """
    check_shard_size(max_shard_size)  # before the gather (collective under FSDP) and the copy to the host
    return save_state_dict(
        canonical_state_dict(model), model.config, path, max_shard_size=max_shard_size, extra_files=extra_files
    )


# -- reading ---------------------------------------------------------------------------------------

#: Hugging Face ``model_type`` -> (the format's name, ``hybridlm convert --from``'s value): a folder of one of these
#: given where a hybridlm checkpoint is read is refused with the command that converts it.
HF_CONVERTS = {"nemotron_h": ("NemotronH", "nemotron-h"), "qwen3_next": ("Qwen3-Next", "qwen3-next")}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of checkpoint directory ``path`` (checked for format and version)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a directory (with {CONFIG_NAME} and safetensors files)")
    meta = read_json(path / CONFIG_NAME, f"{path}: missing {CONFIG_NAME}; not a hybridlm checkpoint")
    kind = "hybridlm checkpoint"
    model_type = meta.get("model_type")
    if isinstance(model_type, str) and (foreign := HF_CONVERTS.get(model_type)):
        name, flag = foreign
        kind += f" (this is a Hugging Face {name} directory: use `hybridlm convert SRC DST --from {flag}`)"
    check_format(meta, path / CONFIG_NAME, kind, FORMAT, FORMAT_VERSION)
    return meta


def read_config(path: str | Path) -> ModelConfig:
    meta = read_metadata(path)
    with errors_at(f"{Path(path) / CONFIG_NAME}: invalid model config", KeyError, ConfigError):
        return ModelConfig.from_dict(meta.get("config"))  # a missing key reads as null, not as a bare KeyError


def read_tensors(path: str | Path, names: Iterable[str] | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
    """Tensors (all, or ``names``) of checkpoint directory ``path``, on the CPU, each file read checked against its
    SHA-256 in config.json unless not ``verify`` (which also reads safetensors folders that are no checkpoint)."""
    path, by_file = Path(path), {}
    files = weight_files(path)
    for name in files if names is None else names:
        by_file.setdefault(files[name], []).append(name)
    out = {k: t for file, keys in by_file.items() for k, t in load_safetensors(path / file, keys).items()}
    if verify:  # after the structural checks above, whose messages say more
        verify_checksums(path, by_file)
    return out


def verify_checksums(path: str | Path, files: Iterable[str] | None = None) -> None:
    """Refuse a file of checkpoint ``path`` (``files``, default all) whose SHA-256 differs from the one
    :func:`save` wrote into config.json."""
    path = Path(path)
    sums = read_metadata(path).get(CHECKSUMS_KEY)
    if sums is None:
        logger.warning("%s: written without checksums (an older hybridlm); loading unverified", path)
        return
    if not isinstance(sums, dict):
        raise CheckpointError(f"{path / CONFIG_NAME}: {CHECKSUMS_KEY} is not a JSON object")
    for file in sorted(set(weight_files(path).values()) if files is None else set(files)):
        if file not in sums:
            raise CheckpointError(f"{path}: {file} has no checksum in {CONFIG_NAME} (added after the save?)")
        if not (isinstance(sums[file], str) and re.fullmatch(r"[0-9a-f]{64}", sums[file])):
            raise CheckpointError(f"{path / CONFIG_NAME}: {CHECKSUMS_KEY} of {file} is no SHA-256 hex digest")
        if file_sha256(path / file) != sums[file]:
            raise CheckpointError(
                f"{path / file}: checksum mismatch, the file is damaged "
                "(load anyway with verify=False, or --no-verify with hybridlm generate or convert --to)"
            )


def config_for_pattern(config: ModelConfig, pattern: str | None) -> ModelConfig:
    """``config`` with its pattern replaced by ``pattern``, refused unless only brackets and ``|`` differ."""
    if pattern is None or pattern == config.pattern:
        return config
    with errors_at("pattern", PatternError):
        wanted = parse(pattern)
    diffs = config.parsed.differences(wanted)
    if diffs:
        raise CheckpointError(
            f"pattern '{pattern}' does not fit the checkpoint's '{config.pattern}' (only brackets and '|' may "
            "differ):\n  " + "\n  ".join(diffs)
        )
    return config.replace(pattern=pattern)


def load_canonical_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy canonical ``tensors`` into ``model`` (any fusion), refusing (listing names) missing or mis-shaped
    tensors, and unexpected ones (a pipeline stage takes the tensors it holds of its whole model's). ``model`` may
    be (or hold blocks) wrapped by ``torch.compile``; one on the meta device is refused."""
    check_built(getattr(model, "_orig_mod", model))  # a replaced config: a bare KeyError from canonical_name
    p, own = model.config.parsed, model.state_dict()
    # Canonical name -> the model's own, wrappers kept: torch.compile's "_orig_mod." (of the model or of a block) was
    # dropped by from_canonical, and the strict load listed every tensor as missing.
    names = {canonical_name(k, p): k for k in own}
    expected = {c: own[k] for c, k in names.items()}
    refuse_meta(expected, f"cannot load {source} into the model")  # (torch copies into a meta tensor as a no-op)
    # A stage skips the tensors of the other stages, not those no model of its config has: an untied checkpoint's
    # lm_head.weight was skipped by the last stage of a tied config, which then computed logits with the embedding.
    known = expected if model.is_whole else meta_shapes(model.config)
    held = {k: t for k, t in tensors.items() if k in expected or k not in known}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    check_fit(held, want, source, wrong_shape=WRONG_SHAPE)
    with torch.no_grad():
        model.load_state_dict({names[k]: tensors[k] for k in expected}, strict=True)
    model.reset_buffers()


def load(
    path: str | Path,
    pattern: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    verify: bool = True,
) -> HybridLM:
    """Build a :class:`hybridlm.HybridLM` from checkpoint directory ``path``.

    Args:
        path: a directory written by :func:`save`.
        pattern: build with this pattern instead of the saved one; it may differ only in
            brackets and ``|`` (any fusion, any pipeline layout of the same model).
        dtype: parameter dtype (float32, bfloat16, float16 or float64, or its name); default: the dtype
            holding most of the checkpoint's elements (refused where that is float8: name one then). Numerically sensitive parameters (``A_log``, ``D``, ``dt_bias``,
            router weights, DSA's indexer scales) are float32 whatever the file holds: a model saved from
            ``.to(torch.bfloat16)`` comes back with those in float32, one from ``.double()`` rounds them.
        device: where to put the model (default CPU).
        verify: check each safetensors file against the SHA-256 written at save (default);
            ``False`` skips the check (e.g. a file edited on purpose).

    Raises:
        CheckpointError: a missing or damaged file (checksum mismatch), a pattern that describes another model, or
            tensors that are missing, unexpected or mis-shaped (all listed by name).
    """
    from ..model import COMPUTE_DTYPES, HybridLM, allocate, float_dtype

    path = Path(path)
    if dtype is not None:
        dtype = float_dtype(dtype)
    if device is not None and torch.device(device).type == "meta":
        raise CheckpointError("device 'meta' holds no weights; build HybridLM(config, device='meta') instead")
    config = config_for_pattern(read_config(path), pattern)
    tensors = read_tensors(path, verify=False)
    # Before allocating: an edited config.json (vocab_size=10**13) failed in the allocator, not here.
    want = meta_shapes(config, path / CONFIG_NAME)
    check_fit(tensors, want, str(path), wrong_shape=WRONG_SHAPE)
    if dtype is None:
        dtype = dominant_dtype(tensors.values())
        if dtype not in COMPUTE_DTYPES:  # float8: built in it, the model failed at its first forward, inside torch
            names = ", ".join(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES)
            raise CheckpointError(
                f"{path}: most weights are {str(dtype).removeprefix('torch.')}, a storage format the model cannot "
                f"compute in; load them in one of {names}: hybridlm.load(path, dtype=torch.bfloat16)"
            )
    model = HybridLM(config, device="meta")
    if dtype != torch.float32:  # on meta, so that the weights are allocated once, in their dtype: allocated in
        model.cast(dtype)  # float32 and then cast, a bf16 model took twice its size on the GPU while it loaded
    allocate(model, torch.device(device) if device is not None else torch.device("cpu"))
    load_canonical_into(model, tensors, source=str(path))
    if verify:  # last, so that a file that does not fit says how
        verify_checksums(path)
    return model
