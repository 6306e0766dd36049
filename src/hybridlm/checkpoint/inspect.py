"""``hybridlm inspect``: what a checkpoint holds, read from file headers (no tensor is loaded).

Nothing is unpickled freely: DCP's ``.metadata`` goes through the allow-listed reader of
:mod:`.safe_dcp`; everything else is JSON or safetensors headers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .io import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, check_shard_name

#: safetensors dtype codes -> torch dtypes (their names and element sizes).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / INDEX_NAME
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        for n in names:
            check_shard_name(index, n)
        return [path / n for n in names]
    if (path / WEIGHTS_NAME).exists():
        return [path / WEIGHTS_NAME]
    return sorted(path.glob("*.safetensors"))


def _tensor_summary(files: list[Path]) -> dict[str, Any]:
    from safetensors import safe_open

    count, total_bytes, params = 0, 0, 0
    dtypes: dict[str, int] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = f.get_slice(key)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    dt = sl.get_dtype()
                    count += 1
                    params += numel
                    total_bytes += numel * (_DTYPES[dt].itemsize if dt in _DTYPES else 0)
                    name = str(_DTYPES[dt]).removeprefix("torch.") if dt in _DTYPES else dt.lower()
                    dtypes[name] = dtypes.get(name, 0) + numel
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing") from None
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
    return {
        "files": [f.name for f in files],
        "tensors": count,
        "parameters": params,
        "bytes": total_bytes,
        "dtypes": dtypes,
    }


def describe(path: str | Path) -> dict[str, Any]:
    """A summary of a hybridlm checkpoint, a Hugging Face directory, a DCP state or a safetensors file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and (path / ".metadata").exists():
        from .safe_dcp import read_dcp_metadata

        meta = read_dcp_metadata(path)
        tensors = {k: v for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}
        numel = sum(v.size.numel() for v in tensors.values())
        return {
            "kind": "DCP training state",
            "path": str(path),
            "tensors": len(tensors),
            "elements": numel,
            "entries": len(meta.state_dict_metadata),
        }
    info: dict[str, Any] = {"path": str(path)}
    if path.is_dir() and (path / CONFIG_NAME).exists():
        try:
            cfg = json.loads((path / CONFIG_NAME).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / CONFIG_NAME}: unreadable ({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path / CONFIG_NAME}: expected a JSON object, got {type(cfg).__name__}")
        if cfg.get("format") == "hybridlm":
            info.update(
                kind="hybridlm checkpoint",
                format_version=cfg.get("format_version"),
                pattern=cfg.get("pattern"),
                canonical=cfg.get("canonical"),
                config=cfg.get("config"),
            )
        elif cfg.get("model_type"):
            info.update(
                kind=f"Hugging Face {cfg.get('model_type')}",
                pattern=cfg.get("hybrid_override_pattern") or cfg.get("layers_block_type"),
                config=cfg,
            )
        else:
            info.update(kind="directory with config.json", config=cfg)
    else:
        info["kind"] = "safetensors file" if path.is_file() else "directory"
    files = _safetensors_files(path)
    if not files:
        raise CheckpointError(f"{path}: no safetensors files found")
    info.update(_tensor_summary(files))
    return info


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}P"


def render(info: dict[str, Any]) -> str:
    lines = [f"{info['kind']}: {info['path']}"]
    if "pattern" in info and info["pattern"] is not None:
        lines.append(f"pattern      {info['pattern']}")
    if info.get("canonical"):
        lines.append(f"canonical    {info['canonical']}")
    if "tensors" in info:
        lines.append(f"tensors      {info['tensors']}")
    if "parameters" in info:
        lines.append(f"parameters   {info['parameters']:,} ({_human(info['parameters'])})")
        lines.append(f"bytes        {info['bytes']:,} ({_human(info['bytes'])}B) in {len(info['files'])} file(s)")
        lines.append("dtypes       " + ", ".join(f"{k} {_human(v)}" for k, v in sorted(info["dtypes"].items())))
    if "elements" in info:
        lines.append(f"elements     {info['elements']:,} in {info['entries']} entries")
    cfg = info.get("config")
    if isinstance(cfg, dict) and info.get("kind") == "hybridlm checkpoint":
        keys = [k for k in cfg if k not in ("schema_version", "pattern") and cfg[k] not in (None, 0, False)]
        lines.append("config       " + ", ".join(f"{k}={cfg[k]}" for k in keys))
    return "\n".join(lines)
