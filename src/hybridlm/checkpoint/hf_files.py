"""What every Hugging Face importer and exporter reads or carries beside the weights: the config.json of a model
folder, the tokenizer and generation files that travel with a conversion, and the end-of-document id the folder
names (used by :mod:`~hybridlm.checkpoint.hf_nemotron` and :mod:`~hybridlm.checkpoint.hf_qwen3_next`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .io import CONFIG_NAME, read_json, regular

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
