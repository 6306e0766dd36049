"""``hybridlm inspect``: what a checkpoint holds, from file headers, trusting no pickle (docs/checkpoints.md)."""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, unused_fields
from ..errors import CheckpointError, ConfigError
from . import hf_qwen3_next as qwen3_next
from .hf_nemotron import _MTP, HF_MODEL_TYPE, _hf_layers
from .io import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    check_fit,
    meta_shapes,
    not_floating,
    open_safetensors,
    read_json,
    weight_files,
)
from .safe_dcp import METADATA_NAME, read_dcp_metadata
from .training_state import TRAINER_STATE, read_trainer_state
from .weights import read_config

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
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
}

#: model_type -> the pattern of the Hugging Face formats we import, read from config.json as the import reads it (as
#: symbols, whichever key transformers wrote; the canonical, unfused pattern).
_HF_PATTERNS = {
    HF_MODEL_TYPE: _hf_layers,
    # with the MTP depth the import reads where the folder holds Qwen3-Next's MTP head
    qwen3_next.HF_MODEL_TYPE: lambda cfg, path: qwen3_next._layers(
        cfg, path, qwen3_next._has_mtp(path, weight_files(path))
    ),
}


def _tensor_summary(files: list[Path], listed: dict[str, str] | None) -> dict[str, Any]:
    """Tensors, elements and dtypes from the headers (``listed``'s names, if given); bytes as the files hold them."""
    found, nbytes, shapes = [], 0, {}  # (elements, safetensors dtype code) of every tensor; name -> (shape, code)
    for file in files:
        with open_safetensors(file) as f:
            names = f.keys() if listed is None else [k for k, v in listed.items() if v == file.name]
            for k, s in zip(names, map(f.get_slice, names), strict=True):
                shapes[k] = tuple(s.get_shape()), s.get_dtype()
                found.append((math.prod(shapes[k][0]), shapes[k][1]))
        with open(file, "rb") as raw:  # safe_open has checked the header: 8-byte length, then JSON
            header = json.loads(raw.read(int.from_bytes(raw.read(8), "little")))
        nbytes += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    dtypes: Counter[str] = Counter()
    for numel, code in found:
        dtypes[str(_DTYPES[code]).removeprefix("torch.") if code in _DTYPES else code.lower()] += numel
    return dict(tensors=len(found), parameters=sum(dtypes.values()), bytes=nbytes, dtypes=dict(dtypes), shapes=shapes)


def _head(file: Path) -> bytes:
    with open(file, "rb") as f:
        return f.read(9)


def describe(path: str | Path, names: bool = False) -> dict[str, Any]:
    """A summary of a hybridlm checkpoint, a Hugging Face directory, a DCP state or a safetensors file; ``names``: also
    every tensor's shape (and a file's dtype) by name, under ``names``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and ((path / METADATA_NAME).exists() or (path / TRAINER_STATE).exists()):
        # Refused here, by name: a training state without .metadata, or with a missing or truncated data file.
        meta = read_dcp_metadata(path).state_dict_metadata
        sizes = [v.size.numel() for v in meta.values() if hasattr(v, "size")]
        info = dict(
            kind="DCP training state", path=str(path), tensors=len(sizes), elements=sum(sizes), entries=len(meta)
        )
        if names:
            info["names"] = {k: {"shape": list(v.size)} for k, v in meta.items() if hasattr(v, "size")}
        with contextlib.suppress(CheckpointError):  # the step and model beside the tensors, where readable
            state = read_trainer_state(path)
            cfg = state.get("model_config")
            info |= {"step": state.get("step")} | (
                {"pattern": cfg.get("pattern"), "config": cfg} if isinstance(cfg, dict) else {}
            )
        return info
    info: dict[str, Any] = {"path": str(path), "kind": "safetensors file" if path.is_file() else "directory"}
    if path.is_dir() and (path / CONFIG_NAME).exists():
        cfg = read_json(path / CONFIG_NAME, f"{path / CONFIG_NAME}: missing")
        if cfg.get("format") == "hybridlm":
            model = read_config(path)  # refused as a load refuses it: another format version, a bad config
            info.update(kind="hybridlm checkpoint", format_version=cfg.get("format_version"), config=cfg.get("config"))
            info.update(pattern=model.pattern, canonical=model.parsed.canonical)
        elif cfg.get("model_type"):
            pattern = cfg.get("hybrid_override_pattern") or cfg.get("layers_block_type")
            if (layers := _HF_PATTERNS.get(cfg["model_type"])) is not None:
                with contextlib.suppress(CheckpointError):
                    pattern = layers(cfg, path)
            info.update(kind=f"Hugging Face {cfg['model_type']}", pattern=pattern, config=cfg)
        else:
            info.update(kind="directory with config.json", config=cfg)
    listed = None  # name -> file of the tensors a load reads, where it reads by name
    if path.is_dir() and ((path / INDEX_NAME).exists() or (path / WEIGHTS_NAME).exists()):
        listed = weight_files(path)  # checked as a load checks them
        files = [path / name for name in sorted(set(listed.values()))]
    else:
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        states = sorted(p.name for p in path.iterdir() if (p / METADATA_NAME).is_file()) if path.is_dir() else []
        if (path / "checkpoints").is_dir():
            what = "a training run: inspect its model/ or one of its checkpoints/"
        elif states:  # a run's checkpoints/ folder
            what = f"a folder of training states: inspect one of them, such as {path / states[-1]}"
        else:  # (a prepared token folder, say)
            what = "inspect reads safetensors files, hybridlm and Hugging Face checkpoint folders and training states"
        raise CheckpointError(f"{path}: no safetensors files found ({what})")
    if path.is_file() and path.suffix != ".safetensors" and _head(path)[8:9] != b"{":  # a header opens with {
        raise CheckpointError(
            f"{path}: not a safetensors file (inspect reads .safetensors files and checkpoint folders)"
        )
    summary = _tensor_summary(files, listed)
    shapes = summary.pop("shapes")
    # From the headers, as a load checks them: our names, shapes and dtypes; an import's dtypes (MTP layers aside where
    # it drops them). Every integer, bool and complex code is in _DTYPES; the others are floating (F8_E8M0, F4, ...).
    mtp_read = "/" in str(info.get("pattern")) and info["kind"] == f"Hugging Face {qwen3_next.HF_MODEL_TYPE}"
    if info["kind"] == "hybridlm checkpoint":
        check_fit(_stand_ins(shapes, path), meta_shapes(model, path / CONFIG_NAME), str(path))
        if "E" in model.symbols:  # what one token uses: the file's tensors less each MoE layer's idle experts
            summary["active_parameters"] = summary["parameters"] - _idle_params(model)
    elif info["kind"] in {f"Hugging Face {t}" for t in _HF_PATTERNS} and (
        odd := not_floating(_stand_ins({k: v for k, v in shapes.items() if mtp_read or not _MTP.match(k)}, path))
    ):
        raise CheckpointError(f"{path}: {odd[0]}")
    if names:
        summary["names"] = {k: {"shape": list(shape), "dtype": code} for k, (shape, code) in shapes.items()}
    return {**info, "files": [f.name for f in files], **summary}


def _idle_params(config: ModelConfig) -> int:
    """Parameters of a model of ``config`` that one token leaves unused (counted by :mod:`hybridlm.counting`)."""
    from ..model import HybridLM

    meta = HybridLM(config, device="meta")
    return int(meta.num_params()) - int(meta.num_params(active=True))


def _stand_ins(shapes: dict[str, tuple[tuple[int, ...], str]], path: Path) -> dict[str, torch.Tensor]:
    """Meta tensors of the headers' ``{name: (shape, dtype code)}``; only checkpoints need them: a zero-element
    shape whose other dimensions overflow torch's strides is valid safetensors, and refused by name here."""
    tensors = {}
    for k, (s, c) in shapes.items():
        try:
            tensors[k] = torch.empty(s, dtype=_DTYPES.get(c, torch.float32), device="meta")
        except RuntimeError:
            raise CheckpointError(f"{path}: {k} has shape {list(s)}, which torch cannot hold") from None
    return tensors


def _human(n: float) -> str:
    """``20172`` -> ``20.2K`` (powers of 1000)."""
    unit = next((u for u in range(5) if abs(n) < 1000 ** (u + 1)), 5)
    return f"{n / 1000**unit:.1f}{' KMGTP'[unit]}" if unit else str(int(n))


def _active(info: dict[str, Any]) -> str:
    """``, active 1,234 (1.2K)`` where the summary counts active parameters (a checkpoint with MoE layers)."""
    n = info.get("active_parameters")
    return "" if n is None else f", active {n:,} ({_human(n)})"


def _shown_fields(cfg: dict[str, Any]) -> list[str]:
    """The options of a saved config worth a line: those not off (False, 0, None) that a layer of its pattern reads.

    The options of a kind the pattern lacks keep their defaults in every config.json (``mamba_state_dim=128``,
    ``q_lora_rank=512`` in a Qwen3-Next-like ``GEGEGE*E``), where they read as part of the model.
    """
    keys = [k for k in cfg if k not in ("schema_version", "pattern") and cfg[k] not in (None, 0, False)]
    with contextlib.suppress(ConfigError):  # a training state's config that no longer reads is shown as saved
        unread = unused_fields(ModelConfig.from_dict(cfg), keys)
        keys = [k for k in keys if k not in unread]
    return keys


def render(info: dict[str, Any]) -> str:
    """The lines ``hybridlm inspect`` prints for a :func:`describe` summary."""
    rows = [(k, info[k]) for k in ("step", "pattern", "canonical", "tensors") if info.get(k) is not None]
    if "parameters" in info:
        rows += [
            ("parameters", f"{info['parameters']:,} ({_human(info['parameters'])})" + _active(info)),
            ("bytes", f"{info['bytes']:,} ({_human(info['bytes'])}B) in {len(info['files'])} file(s)"),
            ("dtypes", ", ".join(f"{k} {_human(v)}" for k, v in sorted(info["dtypes"].items()))),
        ]
    if "elements" in info:
        rows.append(("elements", f"{info['elements']:,} in {info['entries']} entries"))
    if info["kind"] in ("hybridlm checkpoint", "DCP training state") and isinstance(cfg := info.get("config"), dict):
        keys = _shown_fields(cfg)
        rows.append(("config", ", ".join(f"{k}={cfg[k]}" for k in keys)))
    lines = [f"{info['kind']}: {info['path']}"] + [f"{k:<13}{v}" for k, v in rows]
    if "names" in info:  # (--names: a hybridlm checkpoint's are the canonical names train.trainable matches)
        width = max((len(k) for k in info["names"]), default=0)
        lines += ["names"] + [
            f"  {k:<{width}}  {tuple(v['shape'])}" + (f"  {v['dtype']}" if "dtype" in v else "")
            for k, v in info["names"].items()
        ]
    return "\n".join(lines)
