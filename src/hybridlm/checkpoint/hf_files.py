"""What every Hugging Face importer and exporter shares: the config.json of a model folder and its key table's
reading and writing, the layer types it lists, the weights read as transformers reads them (the MTP tensors a
format does not map dropped, expert stacks cut into experts) and checked, the tokenizer and generation files that
travel with a conversion, the end-of-document id the folder names, and the export and convert steps (used by
:mod:`~hybridlm.checkpoint.hf_nemotron` and :mod:`~hybridlm.checkpoint.hf_qwen3_next`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from .adapter import Aliases, Rule, normalize, to_foreign
from .io import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    check_replaceable,
    check_shard_size,
    destination,
    dominant_dtype,
    errors_at,
    fit_problems,
    full_cpu,
    peek_json,
    read_json,
    refuse_problems,
    weight_files,
    write_directory,
)
from .weights import check_destination, read_config, read_tensors, save_state_dict

logger = logging.getLogger(__name__)

#: A foreign per-expert name: (before the expert's index, the index, after it).
_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)(\..*)$")

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

#: A format's config.json key table: key -> (our field, the layer kinds that read it ("": every model), the default
#: of transformers' config class, which a key left out takes[, what else the format notes]). Field "": our model has
#: no option for it (written as that default); None: only read.
Keys = Mapping[str, tuple[Any, ...]]
#: The options a format computes one way only: our field -> (the layer kinds that read it ("": every model), the
#: values the format can export, why no other).
Options = Mapping[str, tuple[str, tuple[Any, ...], str]]


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
    vocab = peek_json(Path(path) / CONFIG_NAME).get("vocab_size")
    # generation_config.json first: where both name one (a chat model's end of turn there, its end of text in
    # config.json), transformers generates with the former.
    for name in ("generation_config.json", CONFIG_NAME):
        eos = peek_json(Path(path) / name).get("eos_token_id")
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


# -- config.json -----------------------------------------------------------------------------------


def fields_from_hf(keys: Keys, value: Callable[[str], Any], used: set[str]) -> dict[str, Any]:
    """Our fields of a config.json: ``value(key)`` of each key of ``keys`` that names a field and that a layer kind
    in ``used`` reads (the options of the others keep our defaults)."""
    return {field: value(key) for key, (field, kinds, *_) in keys.items() if field and (not kinds or used & set(kinds))}


def hf_keys(config: ModelConfig, keys: Keys, used: set[str], every: bool = False) -> dict[str, Any]:
    """The config.json values of ``keys`` for ``config``: its ``resolved_<field>`` where there is one, else the field
    (a float field as a float, the type of transformers' defaults: 2.0, not 2), and the default for a key without a
    field. Keys that no layer kind in ``used`` reads are left out, or with ``every`` written as their default."""
    hf = {}
    for key, (field, kinds, default, *_) in keys.items():
        reads = not kinds or bool(used & set(kinds))
        if field is not None and (reads or every):
            value = getattr(config, f"resolved_{field}", getattr(config, field)) if field and reads else default
            hf[key] = float(value) if isinstance(getattr(ModelConfig, field, None), float) else value
    return hf


def refuse_export(config: ModelConfig, name: str, options: Options, problems: Sequence[str]) -> None:
    """Refuse (CheckpointError) to export ``config``'s main stack as Hugging Face ``name``, listing the ``problems``
    found before and each of ``options`` that ``config`` sets otherwise where a layer kind of the stack reads it."""
    used = set(config.parsed.layers)
    problems = [*problems] + [
        f"{field}={getattr(config, field)!r}: {why}"
        for field, (kinds, values, why) in options.items()
        if (not kinds or used & set(kinds)) and getattr(config, field) not in values
    ]
    refuse_problems(f"pattern '{config.pattern}' cannot be exported as Hugging Face {name}", problems)


def check_model_type(hf: Mapping[str, Any], model_type: str, source: str | Path, to: str) -> None:
    """Refuse (CheckpointError naming ``source``) config.json ``hf`` unless its ``model_type`` is ``model_type``; a
    hybridlm checkpoint is told how to become one (``hybridlm convert --to`` ``to``)."""
    if hf.get("model_type") != model_type:
        ours = f" (this is a hybridlm checkpoint: `hybridlm convert SRC DST --to {to}` writes one)"
        hint = ours if hf.get("format") == "hybridlm" else ""
        raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}, not {model_type!r}{hint}")


def layer_symbols(types: Any, key: str, known: Mapping[str, str], source: str | Path, what: str = "layer types") -> str:
    """The pattern symbols (``known[t]``) of config.json's ``key``, a list of ``what`` (or, for "symbols", a string);
    CheckpointError naming ``source`` for another value, or one not in ``known``."""
    kind = (str, "string") if what == "symbols" else (list, "list of strings")
    if not isinstance(types, kind[0]) or not all(isinstance(t, str) for t in types):
        raise CheckpointError(f"{source}: {key} must be a {kind[1]}, got {types!r}")
    if unknown := sorted({t for t in types if t not in known}):
        raise CheckpointError(f"{source}: {key} has unknown {what} {unknown}; known: {', '.join(known)}")
    return "".join(known[t] for t in types)


# -- weights ---------------------------------------------------------------------------------------


def mtp_names(path: Path, files: Iterable[str], mtp: re.Pattern[str], why: str, declared: bool = False) -> set[str]:
    """The names of ``files`` (the tensors of folder ``path``) that ``mtp`` matches: MTP tensors the import does not
    map, dropped with the one warning that says so, and ``why`` (given also where config.json ``declared`` some and
    the folder holds none)."""
    names = sorted(k for k in files if mtp.match(k))
    if names or declared:
        eg = f", e.g. {names[0]}" if names else ""
        logger.warning("%s: dropping the MTP layers (%d tensors%s): %s", path, len(names), eg, why)
    return set(names)


def as_read(
    path: Path,
    files: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor],
    unstack: Callable[[str, torch.Tensor], list[tuple[str, int, torch.Tensor]]],
    aliases: Aliases = (),
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``tensors`` read from folder ``path`` (``files``: name -> file), each stack of experts cut by ``unstack`` into
    [(name, expert, tensor), ...] (others: []), names rewritten by ``aliases`` and checked
    (:func:`~.adapter.normalize`); and where each was read, for the errors: {name: "file: name read"}, expert ``e``
    of a stack as ``name[e]``."""
    state, shown = {}, {}
    for key, t in tensors.items():
        for name, e, part in unstack(key, t) or [(key, None, t)]:
            state[name] = part
            shown[name] = f"{path / files[key]}: {key}" + ("" if e is None else f"[{e}]")
    state, given = normalize(state, aliases, str(path))
    return state, {k: shown[name] for k, name in given.items()}


def check_import(
    path: Path,
    model: str,
    state: Mapping[str, torch.Tensor],
    where: Mapping[str, str],
    expected: Mapping[str, Any],
    problems: Sequence[str] = (),
) -> None:
    """Refuse (CheckpointError naming ``path`` and the ``model`` it holds) tensors ``state`` read from ``path``
    (``where``: where each was read, which the lines name) unless they are the ``expected`` names and shapes,
    listing the ``problems`` found before, then each difference; an expert's matrix missing from some experts is one
    line (``…experts.{e}.up_proj.weight: no tensor for expert(s) [5]``), not one per expert."""
    missing: dict[str, list[int]] = {}
    for m in (_EXPERT.match(k) for k in expected if k not in state):
        if m:
            missing.setdefault(f"{m[1]}{{e}}{m[3]}", []).append(int(m[2]))
    problems = [*problems] + [f"{name}: no tensor for expert(s) {experts}" for name, experts in missing.items()]
    problems += fit_problems(
        {k: tuple(t.shape) for k, t in state.items()},
        {k: s for k, s in expected.items() if k in state or not _EXPERT.match(k)},
        show=lambda k: where.get(k, k),
        wrong_shape="{name} has shape {got}, but " + CONFIG_NAME + " implies {want}",
        counted=False,
    )
    refuse_problems(f"{path}: cannot import this {model} model", problems)


# -- export and convert ----------------------------------------------------------------------------


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
    rules: Callable[[ModelConfig, torch.dtype], tuple[list[Rule], dict[str, tuple[int, ...]]]],
    hf_config: Callable[[ModelConfig, str], dict[str, Any]],
    mtp: tuple[int, str] = (0, ""),
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, tensors under a Hugging Face format's keys) of a model's canonical tensors, as contiguous CPU
    tensors in their dtypes; CheckpointError when ``check_exportable`` refuses or they do not fit.

    The MTP depths past the first ``mtp[0]`` are dropped (:func:`main_stack`, naming ``model`` or ``mtp[1]``);
    ``rules(config, dtype)`` gives the format's rules for the kept tensors' dominant dtype and the shapes it expects,
    and ``hf_config(config, dtype)`` its config.json for the written tensors' dominant dtype ("bfloat16")."""
    check_exportable(config)
    main = main_stack(config, canonical, model, mtp)
    rule_list, shapes = rules(config, dominant_dtype(main.values()))
    tensors = to_foreign(rule_list, main, shapes)
    return hf_config(config, str(dominant_dtype(tensors.values())).removeprefix("torch.")), tensors


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
    checked replaceable (a folder of ``model_type``, the format ``name`` says) before any weight is read; ``src``'s
    files checked against their SHA-256 unless not ``verify``; the main stack's tensors and those of the first
    ``mtp_depths(config)`` MTP depths (the format's; the others are not read) turned into config.json and tensors by
    ``export``; written atomically, weights sharded above ``max_shard_size`` bytes, with ``src``'s
    :data:`AUX_FILES` and ``extra_files`` (name -> content; the CLI adds the byte tokenizer's Hugging Face files).
    ``eos_token_id`` (the tokenizer's end of document; the CLI reads it from ``src``) goes into config.json, where
    transformers' generation reads it (its default, 2, is some other token of most vocabularies)."""
    what = f"a Hugging Face {name} directory"
    check_shard_size(max_shard_size)
    config = read_config(src)
    check_exportable(config)  # before reading any weights
    check_replaceable(Path(dst), "model_type", model_type, what)  # likewise (and again before the rename)
    destination(dst, src)
    kept = tuple(f"mtp.{d}." for d in range(mtp_depths(config)))
    names = [n for n in weight_files(src) if not n.startswith("mtp.") or n.startswith(kept)]
    canonical = read_tensors(src, names, verify)
    with errors_at(src):  # its config.json and weights disagree: say which folder
        hf, tensors = export(config, canonical)
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
    config and canonical tensors saved as a hybridlm checkpoint (sharded above ``max_shard_size`` bytes) with
    ``src``'s :data:`AUX_FILES` and ``extra_files`` (name -> content; the CLI adds our tokenizer spec naming
    :func:`hf_eos_token_id`)."""
    check_shard_size(max_shard_size)
    files = aux_files(src) | dict(extra_files or {})
    check_destination(dst, src, files)
    config, tensors = import_(src)
    return save_state_dict(tensors, config, dst, max_shard_size=max_shard_size, extra_files=files)
