"""Checkpoint I/O that every format shares, each job written once.

* :func:`atomic_directory` / :func:`replace_file`: fill a temporary directory (file) next to the
  target, flush it to disk, then rename it into place, so a crash never leaves a half-written
  checkpoint where a good one was. Everything is created as a plain ``mkdir`` / ``open`` would:
  directories ``0777 & ~umask``, files ``0666 & ~umask`` (0755 / 0644 under the usual umask 022),
  so another user of a shared cluster can read a checkpoint.
* :func:`write_safetensors` / :func:`weight_files` / :func:`read_safetensors`: safetensors files
  in Hugging Face's layout (one ``model.safetensors``, or numbered shards plus an index).
* :func:`check_fit`: the one missing / unexpected / mis-shaped check, listing every problem by name.
* :func:`dominant_dtype` and :func:`meta_shapes`: the checkpoint's dtype and a config's tensor shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # bytes, as Hugging Face's save_pretrained
MAX_LISTED = 20  #: names listed per kind of problem before "..."


# -- atomic writes ---------------------------------------------------------------------------------


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (from /proc where it can be read, so it is never changed even for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(file: Path) -> None:
    """Give ``file`` the mode a plain ``open()`` would (``0o666 & ~umask``; safetensors writes 0o600)
    and flush it to disk."""
    os.chmod(file, 0o666 & ~umask())
    fsync(file)


def temp_directory(path: Path, unique: bool = True) -> Path:
    """A fresh empty directory next to ``path`` (``.name.tmp-<id>``; ``.name.tmp`` when not ``unique``,
    a name every rank of a distributed save can compute), with the permissions of a plain ``mkdir``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (f".{path.name}.tmp-{uuid.uuid4().hex[:8]}" if unique else f".{path.name}.tmp")
    if not unique:
        shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)  # mode 0o777 & ~umask (tempfile.mkdtemp would give 0o700)
    return tmp


def read_json(file: Path, missing: str) -> Any:
    """The parsed JSON of ``file``; CheckpointError ``missing`` when there is none, naming the file when unreadable."""
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(missing) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None


def config_says(path: Path, key: str, value: str) -> bool:
    """Is ``path`` an empty directory, or one whose config.json has ``key: value``?"""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get(key) == value
    except (OSError, ValueError, AttributeError):
        return False


def commit_directory(tmp: Path, path: Path, overwrite: Callable[[Path], bool], what: str) -> Path:
    """Flush the files of ``tmp`` to disk and rename it to ``path``, replacing an existing ``path``
    only if ``overwrite(path)`` (else CheckpointError, ``what`` naming the kind it must be)."""
    for f in tmp.iterdir():
        if f.is_file():
            publish(f)
    fsync(tmp)
    if path.exists():
        if not overwrite(path):
            raise CheckpointError(f"{path} exists and is not {what}; refusing to replace it")
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync(path.parent)
    return path


def atomic_directory(
    path: str | Path, write: Callable[[Path], None], overwrite: Callable[[Path], bool], what: str
) -> Path:
    """Fill a fresh temporary directory with ``write(tmp)``, then move it to ``path``.

    Until the final rename, ``path`` keeps its old content; see :func:`commit_directory`.
    """
    path = Path(path)
    tmp = temp_directory(path)
    try:
        write(tmp)
        return commit_directory(tmp, path, overwrite, what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` next to ``path``, flush it to disk, then rename it over ``path`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        publish(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- safetensors -----------------------------------------------------------------------------------


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


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): gather the shards
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> None:
    """Write ``tensors`` into ``directory`` as ``model.safetensors``, or as numbered shards plus an index
    (Hugging Face's layout) when they exceed ``max_shard_size`` bytes. ``tensors`` are contiguous CPU
    tensors (see :func:`full_cpu`)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
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


def weight_files(path: str | Path) -> dict[str, str]:
    """Map tensor name -> safetensors file name of the directory ``path``."""
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


def read_safetensors(
    path: Path, files: Mapping[str, str], names: Iterable[str]
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Tensors ``names`` of directory ``path`` (``files``: name -> file, from :func:`weight_files`)
    onto the CPU; returns them and the names read from each file."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
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
    return out, by_file


# -- checking --------------------------------------------------------------------------------------


def listing(what: str, names: list[str], counted: bool = True) -> str:
    """``what (n): a, b, ...`` with at most :data:`MAX_LISTED` names (``what: ...`` when not ``counted``)."""
    more = f" ... ({len(names)} in all)" if len(names) > MAX_LISTED else ""
    return f"{what}{f' ({len(names)})' if counted else ''}: " + ", ".join(names[:MAX_LISTED]) + more


def fit_problems(
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str = "checkpoint",
    show: Callable[[str], str] = str,
    wrong_shape: str = "{name}: {source} has {got}, expected {want}",
    skip: Iterable[str] = (),
    counted: bool = True,
) -> list[str]:
    """Every way the name -> shape map ``shapes`` differs from ``expected``, one line per kind.

    Args:
        source: what ``shapes`` were read from.
        show: how a name is written in the message (e.g. where it was read from).
        wrong_shape: the line for a mis-shaped tensor (``{name}``, ``{source}``, ``{got}``, ``{want}``).
        skip: expected names already reported otherwise (not listed again as missing).
    """
    skip = set(skip)
    missing = [show(k) for k in expected if k not in shapes and k not in skip]
    unexpected = [show(k) for k in sorted(shapes) if k not in expected]
    wrong = [
        wrong_shape.format(name=show(k), source=source, got=tuple(shapes[k]), want=tuple(s))
        for k, s in expected.items()
        if k in shapes and tuple(shapes[k]) != tuple(s)
    ]
    problems = []
    if missing:
        problems.append(listing("missing tensors", missing, counted))
    if unexpected:
        problems.append(listing("unexpected tensors", unexpected, counted))
    if wrong:
        problems.append("shape mismatches:\n    " + "\n    ".join(wrong))
    return problems


def check_fit(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str, hint: str = "", **kw
) -> None:
    """Refuse ``tensors`` unless its names and shapes are exactly ``expected``; list every problem by name."""
    problems = fit_problems({k: tuple(t.shape) for k, t in tensors.items()}, expected, source=source, **kw)
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems) + hint)


def dominant_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype holding the most elements (float32 when there is none)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor of a model with ``config`` (``ModelConfig``), built on
    the meta device: no memory whatever the model's size."""
    from ..model import HybridLM
    from .canonical import to_canonical

    state = HybridLM(config, device="meta").state_dict()
    return {k: tuple(v.shape) for k, v in to_canonical(state, config.parsed).items()}
