"""What every Hugging Face importer and exporter reads or carries beside the weights: the config.json of a model
folder, the tokenizer and generation files that travel with a conversion, and the end-of-document id the folder
names (used by :mod:`~hybridlm.checkpoint.hf_nemotron` and :mod:`~hybridlm.checkpoint.hf_qwen3_next`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from .adapter import Rule, to_foreign
from .io import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    check_replaceable,
    check_shard_size,
    destination,
    dominant_dtype,
    full_cpu,
    read_json,
    regular,
    weight_files,
    write_directory,
)
from .weights import check_destination, read_config, read_tensors, save_state_dict

logger = logging.getLogger(__name__)

#: Files other than the weights and config.json that travel with a conversion (tokenizer, generation).
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def aux_files(path: Path) -> dict[str, Path]:
    """Name -> path of the :data:`AUX_FILES` folder ``path`` holds."""
    return {name: path / name for name in AUX_FILES if (path / name).is_file()}


def hf_config(path: Path) -> dict[str, Any]:
    """config.json of Hugging Face model folder ``path``; CheckpointError when ``path`` is no folder or lacks one."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a Hugging Face model is a directory with {CONFIG_NAME})")
    return read_json(path / CONFIG_NAME, f"{path}: missing {CONFIG_NAME}")


def hf_eos_token_id(path: str | Path) -> int | None:
    """The end-of-document id a Hugging Face folder names (generation_config.json's ``eos_token_id``, which
    transformers' ``generate`` stops at, else config.json's; the first of a list), or None: none, or unreadable (the
    import says why). An id at or past config.json's ``vocab_size`` is passed over with a warning: saved, it made
    every later load of the converted folder's tokenizer fail."""
    try:  # (regular: a FIFO under the name would block the read; its CheckpointError is a ValueError)
        vocab = json.loads(regular(Path(path) / CONFIG_NAME).read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError, RecursionError):
        vocab = None
    # generation_config.json first: where both name one (a chat model's end of turn there, its end of text in
    # config.json), transformers generates with the former.
    for name in ("generation_config.json", CONFIG_NAME):
        try:
            eos = json.loads(regular(Path(path) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and not isinstance(eos, bool) and eos >= 0:
            if isinstance(vocab, int) and not isinstance(vocab, bool) and eos >= vocab:
                logger.warning(
                    "%s: eos_token_id %d is outside the vocabulary of %d; not saved (generate takes the tokenizer's "
                    "usual end-of-text name, or --eos-token)",
                    Path(path) / name,
                    eos,
                    vocab,
                )
                continue
            return eos
    return None


def main_stack(
    config: ModelConfig, canonical: Mapping[str, torch.Tensor], model: str, mtp: tuple[int, str] = (0, "")
) -> dict[str, torch.Tensor]:
    """The tensors of ``canonical`` a Hugging Face format writes, as contiguous CPU tensors (a DTensor is gathered):
    the main stack's and those of the first ``mtp[0]`` MTP depths; the other depths are dropped with a warning,
    ``mtp[1]`` saying why (by default, that ``model``, the Hugging Face model class, does not run them)."""
    keep, why = mtp
    if config.parsed.mtp_depths > keep:
        logger.warning(
            "dropping %d MTP depth(s) ('%s') on export: %s",
            config.parsed.mtp_depths - keep,
            config.parsed.mtp_layers,
            why or f"{model} does not run multi-token prediction",
        )
    kept = tuple(f"mtp.{d}." for d in range(keep))
    return {k: full_cpu(t) for k, t in canonical.items() if not k.startswith("mtp.") or k.startswith(kept)}


def export_hf(
    config: ModelConfig,
    canonical: Mapping[str, torch.Tensor],
    check_exportable: Callable[[ModelConfig], None],
    model: str,
    rules: Callable[[dict[str, torch.Tensor]], tuple[list[Rule], dict[str, tuple[int, ...]]]],
    hf_config: Callable[[str], dict[str, Any]],
    mtp: tuple[int, str] = (0, ""),
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, tensors under a Hugging Face format's keys) of a model's canonical tensors, as contiguous CPU
    tensors in their dtypes; CheckpointError when ``check_exportable`` refuses or they do not fit.

    The MTP depths past the first ``mtp[0]`` are dropped (:func:`main_stack`, naming ``model`` or ``mtp[1]``);
    ``rules(kept_tensors)`` gives the format's rules and the shapes it expects, and ``hf_config(dtype)`` its
    config.json for the written tensors' dominant dtype ("bfloat16")."""
    check_exportable(config)
    main = main_stack(config, canonical, model, mtp)
    rule_list, shapes = rules(main)
    tensors = to_foreign(rule_list, main, shapes)
    return hf_config(str(dominant_dtype(tensors.values())).removeprefix("torch.")), tensors


def convert_to_hf(
    src: Path,
    dst: str | Path,
    model_type: str,
    name: str,
    check_exportable: Callable[[ModelConfig], None],
    export: Callable[[ModelConfig, dict[str, torch.Tensor]], tuple[dict[str, Any], dict[str, torch.Tensor]]],
    *,
    mtp_depths: Callable[[ModelConfig], int] = lambda config: 0,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    verify: bool = True,
    eos_token_id: int | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """The export every Hugging Face format shares: ``src``'s config checked (``check_exportable``) and ``dst``
    checked replaceable (a folder of ``model_type``, the format ``name`` says) before any weight is read; the main
    stack's tensors and those of the first ``mtp_depths(config)`` MTP depths (the format's; the others are not read)
    turned into config.json and tensors by ``export``; ``eos_token_id`` into config.json; written atomically with
    ``src``'s :data:`AUX_FILES` and ``extra_files``."""
    what = f"a Hugging Face {name} directory"
    check_shard_size(max_shard_size)
    config = read_config(src)
    check_exportable(config)  # before reading any weights
    check_replaceable(Path(dst), "model_type", model_type, what)  # likewise (and again before the rename)
    destination(dst, src)
    kept = tuple(f"mtp.{d}." for d in range(mtp_depths(config)))
    names = [n for n in weight_files(src) if not n.startswith("mtp.") or n.startswith(kept)]
    canonical = read_tensors(src, names, verify)
    try:
        hf, tensors = export(config, canonical)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    if eos_token_id is not None:
        hf["eos_token_id"] = eos_token_id
    kw = dict(max_shard_size=max_shard_size, extra_files=aux_files(src) | dict(extra_files or {}))
    return write_directory(dst, tensors, hf, "model_type", what, **kw)


def convert_from_hf(
    src: Path,
    dst: str | Path,
    import_: Callable[[Path], tuple[ModelConfig, dict[str, torch.Tensor]]],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """The import every Hugging Face format shares: ``dst`` checked before anything is read, ``import_(src)``'s
    config and canonical tensors saved as a hybridlm checkpoint with ``src``'s :data:`AUX_FILES` and
    ``extra_files``."""
    check_shard_size(max_shard_size)
    files = aux_files(src) | dict(extra_files or {})
    check_destination(dst, src, files)
    config, tensors = import_(src)
    return save_state_dict(tensors, config, dst, max_shard_size=max_shard_size, extra_files=files)
