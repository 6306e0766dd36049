"""The ``hybridlm`` command line: parse arguments, call the library, print results.

Exit status: 0 on success; 2 on any error (a bad pattern, config value or checkpoint, a full
disk, ...), with a one-line message and no traceback unless ``--debug``; 128 + N when training
stopped on signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence

from .errors import USER_ERRORS, HybridLMError


def _cmd_pattern(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .pattern import parse
    from .pattern.table import render

    for flag, value, low in (("--pp", args.pp, 1), ("--first-stage-layers", args.first_stage_layers, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.last_stage_layers is not None and args.last_stage_layers < 0:
        raise UsageError(f"--last-stage-layers must be >= 0, got {args.last_stage_layers}")
    p = parse(args.pattern)
    print(render(p, args.pp, args.first_stage_layers, args.last_stage_layers))
    return 0


def _add_pattern(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "pattern",
        help="show the blocks, canonical layers and pipeline stages of a layer pattern",
        description="Show the blocks of a layer pattern: block index, canonical layer indices, symbols, kind, "
        "fused or not, '|' segment, pipeline rank and virtual stage (with --pp), and MTP depth; then totals. "
        "Example: hybridlm pattern 'M-M-[*-]M-|M-[*E]M-/*-/*-' --pp 2",
    )
    ap.add_argument(
        "pattern",
        help="layer pattern, e.g. 'M-M-[*-]M-|M-[*E]M-/*-/*-' (quote it in the shell; one that starts with '-' "
        "goes after '--': hybridlm pattern -- '-M')",
    )
    ap.add_argument("--pp", type=int, default=None, metavar="N", help="pipeline-parallel size to lay the blocks out on")
    ap.add_argument(
        "--first-stage-layers",
        type=int,
        default=None,
        metavar="N",
        help="blocks on the first rank of an automatic split (pattern without '|')",
    )
    ap.add_argument(
        "--last-stage-layers",
        type=int,
        default=None,
        metavar="N",
        help="blocks on the last rank of an automatic split (pattern without '|')",
    )
    ap.set_defaults(func=_cmd_pattern)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .checkpoint.inspect import describe, render

    info = describe(args.path)
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "inspect",
        help="show a checkpoint's config, pattern, tensor count, bytes and dtypes",
        description="Summarize a hybridlm checkpoint directory, a Hugging Face directory, a DCP training-state "
        "directory or a safetensors file. Reads file headers only.",
    )
    ap.add_argument("path", help="checkpoint directory or .safetensors file")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.set_defaults(func=_cmd_inspect)


FORMATS = ("nemotron-h", "megatron")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .errors import UsageError

    if (args.to is None) == (args.from_ is None):
        raise UsageError("give exactly one of --to FORMAT or --from FORMAT")
    if args.to == "nemotron-h":
        from .checkpoint.hf_nemotron import convert_to_nemotron_h as convert
    elif args.to == "megatron":
        from .checkpoint.megatron import convert_to_megatron as convert
    elif args.from_ == "nemotron-h":
        from .checkpoint.hf_nemotron import convert_from_nemotron_h as convert
    else:
        from .checkpoint.megatron import convert_from_megatron

        config = None
        if args.config is not None:
            from .config import ModelConfig

            config = ModelConfig.from_json(args.config)
        out = convert_from_megatron(args.src, args.dst, config)
        print(f"wrote {out}")
        return 0
    if args.config is not None:
        raise UsageError("--config is only used with --from megatron")
    out = convert(args.src, args.dst)
    print(f"wrote {out}")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "convert",
        help="convert a checkpoint to or from Hugging Face NemotronH or Megatron-LM names",
        description="Convert between a hybridlm checkpoint directory and another format. "
        "--to nemotron-h writes a directory transformers loads as NemotronHForCausalLM (M * - E patterns "
        "only; '|' and brackets are dropped, MTP weights stay behind). --from nemotron-h reads one. "
        "--to megatron writes a Megatron-core HybridModel state dict (.pt or .safetensors) plus "
        "<DST>.hybridlm.json; --from megatron reads one (the model config comes from --config or that JSON file).",
    )
    ap.add_argument("src", help="source checkpoint (directory or file)")
    ap.add_argument("dst", help="destination")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--to", choices=FORMATS, help="write SRC (a hybridlm checkpoint) in this format")
    group.add_argument(
        "--from", dest="from_", choices=FORMATS, help="read SRC in this format into a hybridlm checkpoint"
    )
    ap.add_argument("--config", default=None, help="ModelConfig JSON for --from megatron")
    ap.set_defaults(func=_cmd_convert)


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import UsageError
    from .train.config import RunConfig
    from .train.trainer import CONFIG_FILE, Trainer

    run_dir = args.run_dir
    if args.resume is True:  # a bare --resume continues the run named by --run-dir
        if args.run_dir is None:
            raise UsageError("--resume without a directory needs --run-dir RUN_DIR (or give --resume RUN_DIR)")
        args.resume = args.run_dir
    if args.resume is not None:
        run_dir = args.resume
        base = RunConfig.from_toml(args.config or Path(args.resume) / CONFIG_FILE)
    else:
        base = RunConfig.from_toml(args.config) if args.config else RunConfig()
    run = base.with_overrides(args.set) if args.set else base
    trainer = Trainer(run, run_dir=run_dir, resume=args.resume is not None, progress=args.progress)
    summary = trainer.run_loop()
    if trainer.is_main:
        first, last = summary["first_val_loss"], summary["val_loss"]
        minutes, seconds = divmod(int(summary["seconds"]), 60)
        unit = "nats/byte" if run.data.tokenizer == "byte" else "nats/token"
        if first is not None and last is not None:
            print(f"validation loss {first:.4f} -> {last:.4f} {unit} (start -> end) in {minutes}m{seconds:02d}s")
        elif last is not None:
            print(f"validation loss {last:.4f} {unit} after {minutes}m{seconds:02d}s")
        if "model" in summary:
            print(
                f"model saved to {summary['model']}"
                + (f"; loss curve {summary['loss_curve']}" if summary.get("loss_curve") else "")
            )
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "train",
        help="train a model (with no arguments: a small hybrid on an embedded corpus, on this machine)",
        description="Train a hybrid model. With no arguments it trains the embedded default: the pattern "
        "'M-[*-]M-M-[*-]' (two fused attention+MLP blocks) on the English text of Python's own help topics as "
        "bytes, with a held-out validation split; a few minutes on 2 CPU cores. A run file (TOML, tables "
        "[model] [data] [optim] [train]) and --set overrides change anything; see docs/training.md. "
        "Under torchrun the same command trains data-parallel with FSDP2.",
    )
    ap.add_argument("--config", default=None, metavar="RUN.toml", help="run file (default: the embedded default run)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field, e.g. --set train.steps=100 --set model.pattern='M-[*E]'",
    )
    ap.add_argument("--run-dir", default=None, help="run directory (default: train.run_dir, runs/<start time>)")
    ap.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint (its config.toml, plus --set)",
    )
    bar = ap.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show a progress bar"
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")
    ap.set_defaults(func=_cmd_train)


def _cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .checkpoint.weights import load
    from .infer.generate import generate
    from .train.tokenizer import build_tokenizer, load_tokenizer
    from .train.trainer import MODEL_DIR

    path = Path(args.checkpoint)
    if (path / MODEL_DIR).is_dir() and not (path / "config.json").exists():
        path = path / MODEL_DIR  # a run directory: use its exported model
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(path, device=args.device, verify=not args.no_verify)
    tokenizer = build_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer(path)
    new = generate(
        model,
        tokenizer.encode(args.prompt),
        args.max_new_tokens,
        0.0 if args.greedy else args.temperature,
        args.top_k,
        eos_id=tokenizer.eos_id,
        seed=args.seed,
    )
    print(args.prompt + tokenizer.decode(new))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "generate",
        help="sample text from a trained checkpoint",
        description="Continue a prompt with a trained model (greedy with --temperature 0, else sampling). "
        "CHECKPOINT is a model directory (hybridlm checkpoint with its tokenizer) or a training run directory.",
    )
    ap.add_argument("checkpoint", help="model directory, or a run directory (its model/ is used)")
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--greedy", action="store_true", help="pick the most likely token (same as --temperature 0)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    ap.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the checkpoint's)")
    ap.add_argument(
        "--no-verify", action="store_true", help="skip the SHA-256 check of the weight files (a damaged file loads)"
    )
    ap.set_defaults(func=_cmd_generate)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .train.data import load_corpus, write_prepared
    from .train.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer)
    stream = load_corpus(args.source, tokenizer, args.jsonl_field, progress=True)
    out = write_prepared(stream, args.out, tokenizer, args.source)
    print(f"wrote {stream.num_tokens:,} tokens of {stream.num_docs:,} documents to {out}")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "prepare",
        help="tokenize text or JSONL into a token file for training",
        description="Tokenize a corpus once (a .txt file or folder: one document per file; a .jsonl file: one "
        "document per record; or builtin:pydoc) into OUT/tokens.bin (numpy memmap), OUT/docs.npy (document "
        "offsets) and OUT/meta.json. Train on it with --set data.source=OUT.",
    )
    ap.add_argument("source", help=".txt/.jsonl file or folder, or builtin:pydoc")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a Hugging Face tokenizer.json")
    ap.add_argument("--jsonl-field", default="text", help="text field of JSONL records")
    ap.set_defaults(func=_cmd_prepare)


def _subcommands() -> list[Callable[[argparse._SubParsersAction], None]]:
    return [_add_train, _add_generate, _add_prepare, _add_pattern, _add_inspect, _add_convert]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hybridlm",
        description="Build, train, checkpoint and serve hybrid language models laid out by one pattern string.",
    )
    ap.add_argument("--version", action="version", version=f"hybridlm {_version()}")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _subcommands():
        register(sub)
    return ap


def _version() -> str:
    from . import __version__

    return __version__


def one_line(message: str) -> str:
    """An error message on one line; a pattern quoted with a caret under it keeps its three lines."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if any(set(line) == {"^"} for line in lines):
        return message
    return "; ".join(lines)


def _error(e: BaseException) -> str:
    if isinstance(e, USER_ERRORS):
        return one_line(str(e))
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"no space left on device{where}: free some space (or choose another --run-dir) and retry"
        return f"{e.strerror or e}{where}"
    return one_line(f"unexpected {type(e).__name__}: {e} (this may be a bug in hybridlm; --debug shows the traceback)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        status = getattr(e, "exit_status", None)
        if isinstance(e, HybridLMError) and isinstance(status, int):
            # train.signals.TrainingInterrupted: a checkpoint was saved; the message says how to resume.
            print(str(e), file=sys.stderr)
            return status
        if args.debug:
            raise
        print(f"error: {_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
