"""Published weights: a directory of safetensors in the canonical layout plus ``config.json``.

::

    path/
      config.json                         format, format_version, the resolved ModelConfig, the
                                          pattern, its canonical layers, and the SHA-256 of each
                                          safetensors file (``sha256``), checked at load
      model.safetensors                   or, above ``max_shard_size``:
      model-00001-of-00003.safetensors ... + model.safetensors.index.json (weight_map)

A directory is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..pattern import HybridPattern, PatternError, parse
from .canonical import from_canonical, to_canonical

FORMAT = "hybridlm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # bytes, as Hugging Face's save_pretrained
CHECKSUMS_KEY = "sha256"  #: config.json key: safetensors file name -> SHA-256 hex digest

logger = logging.getLogger("hybridlm.checkpoint")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def check_shard_name(index: Path, name: object) -> str:
    """An index entry must name a file inside the checkpoint folder: a bare ``*.safetensors`` name."""
    if not isinstance(name, str) or Path(name).name != name or "\\" in name or not name.endswith(".safetensors"):
        raise CheckpointError(f"{index}: shard {name!r} is not a .safetensors file inside the checkpoint folder")
    return name


# -- writing ---------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_checkpoint_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def atomic_directory(
    path: str | Path, write: Callable[[Path], None], overwrite: Callable[[Path], bool] | None = None
) -> Path:
    """Fill a fresh temporary directory with ``write(tmp)``, then move it to ``path``.

    An existing ``path`` is replaced only if ``overwrite(path)`` says it may be (default: it is
    empty or a hybridlm checkpoint). Until the final rename, ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        if path.exists():
            if not (overwrite or _is_checkpoint_dir)(path):
                raise CheckpointError(f"{path} exists and is not a hybridlm checkpoint; refusing to replace it")
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): gather the shards
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def canonical_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under canonical names (tied weights once, non-persistent buffers left out)."""
    from ..model import HybridLM

    if not isinstance(model, HybridLM):
        raise TypeError(f"expected a HybridLM, got {type(model).__name__}")
    p = model.config.parsed
    present = {int(b) for b in model.blocks}
    if present != set(range(p.num_blocks)) or model.embeddings is None or model.norm_f is None:
        raise CheckpointError(
            "save needs the whole model, but this one is a pipeline stage (some blocks, the embedding or the head "
            "are missing); gather the stages' canonical state dicts and save those with save_state_dict"
        )
    return to_canonical(model.state_dict(), p)


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> None:
    """Write ``tensors`` into ``directory`` as ``model.safetensors``, or as numbered shards plus an index
    (Hugging Face's layout) when they exceed ``max_shard_size`` bytes. ``tensors`` are contiguous CPU
    tensors (see :func:`full_cpu`)."""
    from safetensors.torch import save_file

    shards = _shards(tensors, max_shard_size)
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def checkpoint_metadata(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    from .. import __version__

    p = config.parsed
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        dtypes[str(t.dtype).removeprefix("torch.")] = dtypes.get(str(t.dtype).removeprefix("torch."), 0) + t.numel()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hybridlm_version": __version__,
        "pattern": config.pattern,
        "canonical": p.canonical,
        "canonical_layers": list(p.layers),
        "mtp_layers": list(p.mtp_layers),
        "mtp_depths": p.mtp_depths,
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "dtypes": dtypes,
        "config": config.to_dict(),
    }


def save_state_dict(
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    path: str | Path,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    extra_files: dict[str, str | bytes | Path] | None = None,
) -> Path:
    """Write canonical ``tensors`` and ``config`` as a checkpoint directory at ``path`` (atomically)."""
    tensors = {k: full_cpu(v) for k, v in tensors.items()}
    meta = checkpoint_metadata(config, tensors)

    def write(tmp: Path) -> None:
        write_safetensors(tmp, tensors, max_shard_size)
        meta[CHECKSUMS_KEY] = {f.name: file_sha256(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)

    return atomic_directory(path, write)


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
    return save_state_dict(
        canonical_state_dict(model), model.config, path, max_shard_size=max_shard_size, extra_files=extra_files
    )


# -- reading ---------------------------------------------------------------------------------------


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of checkpoint directory ``path`` (checked for format and version)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a directory (with {CONFIG_NAME} and safetensors files)")
    file = path / CONFIG_NAME
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {CONFIG_NAME}; not a hybridlm checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        hint = ""
        if isinstance(meta, dict) and meta.get("model_type") == "nemotron_h":
            hint = " (this is a Hugging Face NemotronH directory: use `hybridlm convert SRC DST --from nemotron-h`)"
        raise CheckpointError(f"{file}: not a hybridlm checkpoint{hint}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version {version!r} is newer than this hybridlm reads ({FORMAT_VERSION})"
        )
    return meta


def read_config(path: str | Path) -> ModelConfig:
    meta = read_metadata(path)
    try:
        return ModelConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_NAME}: invalid model config: {e}") from None


def weight_files(path: str | Path) -> dict[str, str]:
    """Map tensor name -> safetensors file name of checkpoint directory ``path``."""
    from safetensors import safe_open

    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is not a JSON object")
        for name in set(weight_map.values()):
            check_shard_name(index, name)
            if not (path / name).exists():
                raise CheckpointError(f"{path}: shard {name} listed in {INDEX_NAME} is missing")
        return dict(weight_map)
    single = path / WEIGHTS_NAME
    if not single.exists():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} and no {INDEX_NAME}")
    try:
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), WEIGHTS_NAME)
    except Exception as e:
        raise CheckpointError(f"{single}: cannot read safetensors file ({e})") from None


def _expected_checksums(path: Path) -> dict[str, str]:
    """The ``sha256`` map of a hybridlm checkpoint's config.json ({} for other folders)."""
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return {}
    sums = meta.get(CHECKSUMS_KEY)
    if sums is None:
        logger.warning("%s: written without checksums (an older hybridlm); loading unverified", path)
        return {}
    if not isinstance(sums, dict):
        raise CheckpointError(f"{path / CONFIG_NAME}: {CHECKSUMS_KEY} is not a JSON object")
    return sums


def verify_file(path: Path, file: str, expected: dict[str, str]) -> None:
    """Refuse ``path/file`` when its SHA-256 differs from the one written at save."""
    if file not in expected:
        raise CheckpointError(f"{path}: {file} has no checksum in {CONFIG_NAME} (added after the save?)")
    if file_sha256(path / file) != expected[file]:
        raise CheckpointError(
            f"{path / file}: checksum mismatch, the file is damaged "
            "(load anyway with verify=False, or --no-verify on the command line)"
        )


def read_tensors(path: str | Path, names: Iterable[str] | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read tensors (all, or ``names``) from checkpoint directory ``path`` onto the CPU.

    With ``verify`` (the default) each file read is checked against the SHA-256 that
    :func:`save` wrote into ``config.json`` (folders without checksums load unverified).
    """
    from safetensors import safe_open

    path = Path(path)
    files = weight_files(path)
    wanted = list(files) if names is None else list(names)
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, keys in by_file.items():
        try:
            with safe_open(path / file, framework="pt") as f:
                stored = set(f.keys())
                for k in keys:
                    if k not in stored:
                        raise CheckpointError(f"{path / file}: tensor {k} listed in the index is not in the file")
                    out[k] = f.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path / file}: cannot read safetensors file ({e})") from None
    if verify:  # after the structural checks above, whose messages say more
        verify_checksums(path, by_file)
    return out


def verify_checksums(path: str | Path, files: Iterable[str] | None = None) -> None:
    """Check ``files`` (default: all) of checkpoint ``path`` against the SHA-256 in its config.json."""
    path = Path(path)
    expected = _expected_checksums(path)
    if expected:
        for file in sorted(set(weight_files(path).values()) if files is None else set(files)):
            verify_file(path, file, expected)


def pattern_differences(saved: HybridPattern, wanted: HybridPattern) -> list[str]:
    """Why a model with pattern ``wanted`` cannot take the weights of one with ``saved``.

    Only brackets and ``|`` may differ; everything else (each canonical layer's symbol, MTP depths
    and their layers) must match. Returns one line per difference (empty when compatible).
    """
    diffs = []
    a, b = saved.layers, wanted.layers
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            diffs.append(f"layer {i}: checkpoint has '{a[i]}', pattern has '{b[i]}'")
    if len(a) != len(b):
        diffs.append(f"checkpoint has {len(a)} layers, pattern has {len(b)}")
    if saved.mtp_depths != wanted.mtp_depths:
        diffs.append(f"checkpoint has {saved.mtp_depths} MTP depth(s), pattern has {wanted.mtp_depths}")
    a, b = saved.mtp_layers, wanted.mtp_layers
    if saved.mtp_depths and wanted.mtp_depths:
        for i in range(min(len(a), len(b))):
            if a[i] != b[i]:
                diffs.append(f"MTP layer {i}: checkpoint has '{a[i]}', pattern has '{b[i]}'")
        if len(a) != len(b):
            diffs.append(f"checkpoint has {len(a)} layers per MTP depth, pattern has {len(b)}")
    return diffs


def config_for_pattern(config: ModelConfig, pattern: str | None) -> ModelConfig:
    """``config`` with its pattern replaced by ``pattern``, refused unless only brackets and ``|`` differ."""
    if pattern is None or pattern == config.pattern:
        return config
    try:
        wanted = parse(pattern)
    except PatternError as e:
        raise CheckpointError(f"pattern: {e}") from None
    diffs = pattern_differences(config.parsed, wanted)
    if diffs:
        raise CheckpointError(
            f"pattern '{pattern}' does not fit the checkpoint's '{config.pattern}' (only brackets and '|' may "
            "differ):\n  " + "\n  ".join(diffs)
        )
    return config.replace(pattern=pattern)


def load_canonical_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy canonical ``tensors`` into ``model`` (any fusion; a pipeline stage takes the tensors it holds).

    Every tensor the model has must be present with the right shape; tensors of layers the model
    does not hold are expected only if the model is a pipeline stage. Refusals list the names.
    """
    p = model.config.parsed
    expected = to_canonical(model.state_dict(), p)
    is_stage = len(model.blocks) != p.num_blocks or model.embeddings is None or model.norm_f is None
    missing = sorted(set(expected) - set(tensors))
    unexpected = [] if is_stage else sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: {source} has {tuple(tensors[k].shape)}, model has {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(
            f"missing tensors ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected tensors ({len(unexpected)}): "
            + ", ".join(unexpected[:20])
            + (" ..." if len(unexpected) > 20 else "")
        )
    if shapes:
        problems.append("shape mismatches:\n    " + "\n    ".join(shapes))
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    state = from_canonical({k: tensors[k] for k in expected}, p)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    model.reset_buffers()


def load(
    path: str | Path,
    pattern: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    verify: bool = True,
) -> torch.nn.Module:
    """Build a :class:`hybridlm.HybridLM` from checkpoint directory ``path``.

    Args:
        path: a directory written by :func:`save`.
        pattern: build with this pattern instead of the saved one; it may differ only in
            brackets and ``|`` (any fusion, any pipeline layout of the same model).
        dtype: parameter dtype; default: the checkpoint's. Numerically sensitive parameters
            (``A_log``, ``D``, ``dt_bias``, router weights) stay float32.
        device: where to put the model (default CPU).
        verify: check each safetensors file against the SHA-256 written at save (default);
            ``False`` skips the check (e.g. a file edited on purpose).

    Raises:
        CheckpointError: a missing or damaged file (checksum mismatch), a pattern that describes another model, or
            tensors that are missing, unexpected or mis-shaped (all listed by name).
    """
    from ..model import HybridLM

    path = Path(path)
    config = config_for_pattern(read_config(path), pattern)
    tensors = read_tensors(path, verify=False)
    if dtype is None:
        counts: dict[torch.dtype, int] = {}
        for t in tensors.values():
            if t.is_floating_point():
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        dtype = max(counts, key=counts.get) if counts else torch.float32
    model = HybridLM(config, device="meta")
    model.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    if dtype != torch.float32:
        model.cast(dtype)
    load_canonical_into(model, tensors, source=str(path))
    if verify:  # last, so that a file that does not fit says how
        verify_checksums(path)
    return model
