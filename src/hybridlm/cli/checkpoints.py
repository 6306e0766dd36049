"""``hybridlm inspect`` and ``hybridlm convert``: what a checkpoint holds, and other formats' names."""

from __future__ import annotations

import argparse


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..checkpoint.inspect import describe, render
    from ..train.rundir import MODEL_DIR

    path = Path(args.path)
    if not (path / "config.json").exists() and (path / MODEL_DIR).is_dir():
        path = path / MODEL_DIR  # a run directory: its exported model, as generate and convert read it
    info = describe(path, names=args.names)
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


def add_inspect(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "inspect",
        help="show a checkpoint's config, pattern, tensor count, bytes and dtypes",
        description="Summarize a hybridlm checkpoint directory (or a training run's exported model/), a Hugging "
        "Face directory, a DCP training-state directory or a safetensors file: its pattern, tensor and parameter "
        "counts (a checkpoint with MoE layers also its active parameters, those one token uses), bytes, dtypes and "
        "config. Reads file headers only.",
    )
    ap.add_argument("path", help="checkpoint or run directory, or .safetensors file")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument(
        "--names",
        action="store_true",
        help="also list every tensor's name and shape (a hybridlm checkpoint's are the canonical names, those "
        "train.trainable's patterns match)",
    )
    ap.set_defaults(func=_cmd_inspect)


FORMATS = ("nemotron-h", "megatron", "qwen3-next")
#: The Hugging Face formats: their folders carry a tokenizer and name its end-of-text id.
HF_FORMATS = ("nemotron-h", "qwen3-next")


def _cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..train.tokenizer import converted_spec, exported_files, saved_eos_id
    from . import model_folder

    if (args.to is None) == (args.from_ is None):
        raise UsageError("give exactly one of --to FORMAT or --from FORMAT")
    if args.no_verify and args.to is None:
        raise UsageError("--no-verify is only used with --to (it skips the SHA-256 check of a hybridlm checkpoint)")
    if args.to == "nemotron-h":
        from ..checkpoint.hf_nemotron import convert_to_nemotron_h as convert
    elif args.to == "megatron":
        from ..checkpoint.megatron import convert_to_megatron as convert
    elif args.to == "qwen3-next":
        from ..checkpoint.hf_qwen3_next import convert_to_qwen3_next as convert
    elif args.from_ == "nemotron-h":
        from ..checkpoint.hf_nemotron import convert_from_nemotron_h as convert
    elif args.from_ == "qwen3-next":
        from ..checkpoint.hf_qwen3_next import convert_from_qwen3_next as convert
    else:
        from ..checkpoint.megatron import convert_from_megatron

        config = _megatron_config(args.config) if args.config is not None else None
        out = convert_from_megatron(args.src, args.dst, config, **_shard_size(args))
        print(f"wrote {out}")
        return 0
    if args.config is not None:
        raise UsageError("--config is only used with --from megatron")
    if args.max_shard_size is not None and args.to == "megatron":
        raise UsageError("--max-shard-size is not used with --to megatron (it writes one state-dict file)")
    src = model_folder(args.src, "src") if args.to else args.src  # --to: a checkpoint, or a run's model/
    kw = ({"verify": False} if args.no_verify else {}) | _shard_size(args)
    if args.to in HF_FORMATS:  # transformers' generation stops at it; a byte tokenizer as a tokenizer.json
        kw |= {"eos_token_id": saved_eos_id(Path(src)), "extra_files": exported_files(Path(src))}
    elif args.from_ in HF_FORMATS:  # and ours: keep the id the Hugging Face config names
        from ..checkpoint.hf_files import hf_eos_token_id

        kw["extra_files"] = converted_spec(src, hf_eos_token_id(src))
    out = convert(src, args.dst, **kw)
    print(f"wrote {out}")
    return 0


def _shard_size(args: argparse.Namespace) -> dict[str, int]:
    return {} if args.max_shard_size is None else {"max_shard_size": args.max_shard_size}


def _megatron_config(path: str):
    """``convert --from megatron --config``: a ModelConfig JSON, or a hybridlm checkpoint's config.json or folder."""
    import json
    from pathlib import Path

    from ..checkpoint.weights import read_config
    from ..config import ModelConfig, is_special_file
    from ..errors import ConfigError, UsageError

    if Path(path).is_dir():
        return read_config(path)
    if is_special_file(path):  # a FIFO or a device: reading it would block, or never end
        raise UsageError(f"--config {path}: not a regular file")
    try:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and data.get("format") == "hybridlm":  # a checkpoint's config.json
            return ModelConfig.from_dict(data.get("config"))
        return ModelConfig.from_json(path)
    except (OSError, ValueError, RecursionError) as e:
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, ConfigError) else str(e)
        raise UsageError(f"--config {path}: not a model config ({reason})") from None


def add_convert(sub: argparse._SubParsersAction) -> None:
    from . import byte_size

    ap = sub.add_parser(
        "convert",
        help="convert a checkpoint to or from Hugging Face NemotronH or Qwen3-Next, or Megatron-LM names",
        description="Convert between a hybridlm checkpoint directory and another format. "
        "--to nemotron-h writes a directory transformers loads as NemotronHForCausalLM (M * - E patterns "
        "only; '|' and brackets are dropped, MTP weights stay behind). --from nemotron-h reads one. "
        "--to qwen3-next writes one transformers loads as Qwen3NextForCausalLM (G or * then E or -, in pairs, with "
        "its options, and the first MTP depth as its MTP head where Qwen3-Next computes it); --from qwen3-next reads "
        "one (its MTP head as an MTP depth '/*E'; the pattern written is unfused: hybridlm.load(DST, pattern=...) takes any brackets). "
        "--to megatron writes a Megatron-core HybridModel state dict (.pt or .safetensors) plus "
        "<DST>.hybridlm.json; --from megatron reads one (the model config comes from --config or that JSON file).",
    )
    ap.add_argument(
        "src",
        help="source: with --to a hybridlm checkpoint or a training run (its model/); with --from the foreign one",
    )
    ap.add_argument("dst", help="destination")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--to", choices=FORMATS, help="write SRC (a hybridlm checkpoint) in this format")
    group.add_argument(
        "--from", dest="from_", choices=FORMATS, help="read SRC in this format into a hybridlm checkpoint"
    )
    ap.add_argument(
        "--config",
        default=None,
        help="--from megatron: the model's config, a ModelConfig JSON or a hybridlm checkpoint (folder or its "
        "config.json); default: <SRC>.hybridlm.json",
    )
    ap.add_argument(
        "--max-shard-size",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="split the weights written into safetensors files of at most SIZE (bytes, or with a unit: 5GB, "
        "500MiB); not with --to megatron. Default: 5GB, as Hugging Face's save_pretrained",
    )
    ap.add_argument(
        "--no-verify",
        action="store_true",
        help="--to: skip the SHA-256 check of SRC's weight files (a damaged file converts)",
    )
    ap.set_defaults(func=_cmd_convert)
