"""The ``hybridlm`` command line: parse arguments, call the library, print results.

Exit status: 0 on success, 2 on bad input (a bad pattern, config value or checkpoint), with a
message and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import USER_ERRORS


def _cmd_pattern(args: argparse.Namespace) -> int:
    from .pattern import parse
    from .pattern.table import render

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
    ap.add_argument("pattern", help="layer pattern, e.g. 'M-M-[*-]M-|M-[*E]M-/*-/*-' (quote it in the shell)")
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


def _subcommands() -> list[Callable[[argparse._SubParsersAction], None]]:
    return [_add_pattern, _add_inspect, _add_convert]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hybridlm",
        description="Build, train, checkpoint and serve hybrid language models laid out by one pattern string.",
    )
    ap.add_argument("--version", action="version", version=f"hybridlm {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _subcommands():
        register(sub)
    return ap


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
