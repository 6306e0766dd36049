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


def _subcommands() -> list[Callable[[argparse._SubParsersAction], None]]:
    return [_add_pattern]


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
