"""``hybridlm pattern`` and ``hybridlm plan``: a pattern's blocks, layers and stages, and balanced stage cuts."""

from __future__ import annotations

import argparse
import sys


def _check_plot(plot: str | None) -> None:
    """Refuse a ``--plot`` file name that cannot be written, before any work is done."""
    if plot is not None:
        from ..plan.plot import check_plot_path

        check_plot_path(plot)


def _cmd_pattern(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..pattern import parse
    from ..pattern.table import render

    for flag, value, low in (("--pp", args.pp, 1), ("--first-stage-layers", args.first_stage_layers, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.last_stage_layers is not None and args.last_stage_layers < 0:
        raise UsageError(f"--last-stage-layers must be >= 0, got {args.last_stage_layers}")
    for flag, value in (
        ("--first-stage-layers", args.first_stage_layers),
        ("--last-stage-layers", args.last_stage_layers),
    ):
        if value is not None and (args.pp or 1) == 1:
            raise UsageError(f"{flag} sizes a stage of an automatic split: give --pp 2 or more")
    _check_plot(args.plot)
    p = parse(args.pattern)
    if args.pp is not None and len(p.segments) == 1 and args.pp > p.num_blocks + 2:
        # Every rank past these would be listed as empty, one line each: --pp 10**30 never finished.
        raise UsageError(
            f"--pp {args.pp}: an automatic split of {p.num_blocks} block(s) (no '|' in the pattern) has room for at "
            f"most {p.num_blocks + 2} pipeline ranks (the first and last may hold only the embedding and the head; "
            "every rank between them needs a block)"
        )
    print(render(p, args.pp, args.first_stage_layers, args.last_stage_layers))
    if args.plot is not None:
        from ..plan.plot import plot_pattern_cli

        print(f"wrote {plot_pattern_cli(p, args.plot, args.pp, args.first_stage_layers, args.last_stage_layers)}")
    return 0


def add_pattern(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "pattern",
        help="show the blocks, canonical layers and pipeline stages of a layer pattern",
        description="Show the blocks of a layer pattern: block index, canonical layer indices, symbols, kind, "
        "fused or not, '|' segment, pipeline rank and virtual stage (with --pp), and MTP depth; then totals. "
        "Example: hybridlm pattern 'M-M-[*-]M-|M-[*E]M-/*-/*-' --pp 2",
    )
    ap.add_argument(
        "pattern",
        help="layer pattern, e.g. 'M-M-[*-]M-|M-[*E]M-/*-/*-' (quote it in the shell; one that starts with '-', "
        "e.g. '-M', is the pattern too)",
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
    ap.add_argument(
        "--plot",
        default=None,
        metavar="OUT.png|OUT.svg",
        help="also draw the pattern: blocks by kind, fused groups boxed, stages with their layer counts, MTP depths",
    )
    ap.set_defaults(func=_cmd_pattern)


def _resolve_model(pattern: str | None, preset: str | None, run_file: str | None):
    """The model config of ``hybridlm plan``/``pattern``, and the run config when a run file is given.

    ``pattern`` replaces the preset's or run file's pattern; with neither a preset nor a run file
    the embedded default run's model is used (as ``hybridlm train`` does).
    """
    from ..config import ModelConfig
    from ..errors import ConfigError, UsageError
    from ..train.config import RunConfig

    run = None
    if preset is not None:
        config = ModelConfig.preset(preset)
    else:
        run = RunConfig.from_toml(run_file) if run_file is not None else RunConfig()
        vocab = None
        if "vocab_size" not in run.model and "preset" not in run.model:  # the head sized as train sizes it
            from ..train.tokenizer import build_tokenizer

            vocab = build_tokenizer(run.data.tokenizer, eos_token=run.data.eos_token).vocab_size
        config = run.model_config(vocab)
    if pattern is not None:
        try:
            config = config.replace(pattern=pattern)
        except ConfigError as e:  # ("moe_num_experts: required" named a field no flag of plan sets)
            if e.field == "pattern":  # the pattern itself (with its caret line)
                raise
            source = f"--preset {preset}" if preset else f"--config {run_file}" if run_file else "the default run"
            raise UsageError(
                f"pattern {pattern!r} does not fit the model of {source}: {e}; give a run file (--config RUN.toml) "
                "or a preset (--preset NAME) whose model sets it"
            ) from None
    return config, run


def _plan_micro_batch(run, pp: int) -> int:
    """The rows per micro-batch a run would give each pipeline stage with one data-parallel group: its
    ``train.micro_batch_size``, else its batch over ``parallel.microbatches`` (2 × pp by default), or at pp 1, which
    runs no pipeline, its whole batch (as the trainer does); 1 without a run."""
    if run is None:
        return 1
    if pp == 1:
        return run.train.micro_batch_size or run.train.batch_size
    return run.train.micro_batch_size or max(1, run.train.batch_size // _plan_microbatches(run, pp))


def _plan_microbatches(run, pp: int) -> int:
    """The run's ``parallel.microbatches``, or 2 × ``pp`` (the trainer's default, at the plan's pp)."""
    return run.parallel.microbatches or 2 * max(pp, 1)


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from ..ops.dispatch import check_device
    from ..plan.planner import plan_pipeline
    from . import device_option

    measure = None if args.measure is None else str(device_option("--measure", args.measure))
    if measure is not None:  # kernels forced to Triton on the CPU: refused before any timing
        check_device(measure)
    _check_plot(args.plot)
    config, run = _resolve_model(args.pattern, args.preset, args.config)
    float8 = args.float8 if args.float8 is not None else (run.train.float8 if run else "none")
    if measure is not None and measure.startswith("cpu") and float8 != "none":  # said before the timing, which is slow
        print(
            f"note: --measure {measure} with float8 ({float8}): the CPU emulates float8 matmuls, far slower than a "
            "GPU's float8 tensor cores, so these times say nothing of float8's speed; plan without --measure, or "
            "measure on a GPU of compute capability 8.9 or later",
            file=sys.stderr,
        )
    micro = args.micro_batch_size if args.micro_batch_size is not None else _plan_micro_batch(run, args.pp)
    trainable = None
    if run is not None and run.train.trainable is not None:  # (the run file's: frozen parameters hold no state)
        from ..model import HybridLM
        from ..train.trainable import trainable_names

        trainable = trainable_names(HybridLM(config, device="meta"), config.parsed, run.train.trainable)
    plan = plan_pipeline(
        config,
        args.pp,
        args.vpp,
        seq_len=args.seq_len if args.seq_len is not None else (run.data.seq_len if run else 4096),
        micro_batch_size=micro,
        recompute=args.recompute or bool(run and run.train.activation_checkpointing),
        hardware=args.hardware,
        measure=measure,
        float8=float8,
        float8_auto_filter=args.float8_auto_filter
        if args.float8_auto_filter is not None
        else bool(run and run.train.float8_auto_filter),
        # A run's step at pp 1 is one micro-batch unless its batch is split for accumulation: then the gradients,
        # set to None before each step, do not exist yet at its peak. A pipeline rank accumulates over several.
        grads_at_peak=not (args.pp == 1 and run is not None and micro >= run.train.batch_size),
        trainable=trainable,
    )
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.render())
    if run is not None and args.pp > 1 and args.micro_batch_size is None and not run.train.micro_batch_size:
        n, rows = _plan_microbatches(run, args.pp), run.train.batch_size
        if rows % n:  # planned anyway, at the rounded-down size: say that this run would not start so
            default = "" if run.parallel.microbatches else ", 2 × pp by default"
            print(
                f"note: the run's train.batch_size ({rows}) does not split into {n} micro-batches "
                f"(parallel.microbatches{default}): hybridlm train refuses it with one data-parallel group; the costs "
                f"above are for micro-batches of {_plan_micro_batch(run, args.pp)} row(s)",
                file=sys.stderr,
            )
    if trainable is not None:
        print(
            f"note: train.trainable {run.train.trainable!r} trains {len(trainable):,} of the model's tensors: the "
            "others are counted without gradient, optimizer state or weight-gradient products, the layers before "
            "the first that trains without a backward, and the inputs only frozen weights would need not kept",
            file=sys.stderr,
        )
    if args.plot is not None:  # as pattern --plot says it; on stderr under --json, which keeps stdout one document
        print(f"wrote {plan.plot(args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_plan(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "plan",
        help="place '|' in a pattern so that the pipeline stages are balanced",
        description="Balance a pattern over pipeline stages: exact dynamic programming over block boundaries "
        "(never inside a fused group) minimizing the slowest of the PP x VPP stages, with the embedding on the "
        "first stage and the head and MTP depths on the last. Prints the pattern with '|' placed, per-stage time "
        "and memory, and the imbalance (slowest / mean) next to Megatron's even split by block count and the "
        "pattern's own '|'. Times are a roofline estimate from the config, or measured with --measure. "
        "Example: hybridlm plan --preset nemotron-h-8b --pp 4 --seq-len 8192",
    )
    ap.add_argument("pattern", nargs="?", default=None, help="layer pattern (default: the preset's or run file's)")
    ap.add_argument("--pp", type=int, required=True, metavar="N", help="pipeline-parallel ranks")
    ap.add_argument("--vpp", type=int, default=1, metavar="V", help="virtual stages per rank (default 1)")
    model = ap.add_mutually_exclusive_group()
    model.add_argument("--preset", default=None, metavar="NAME", help="model preset, e.g. nemotron-h-8b")
    model.add_argument(
        "--config",
        default=None,
        metavar="RUN.toml",
        help="run file (its model, seq_len, batch; train.trainable: frozen parameters hold no optimizer state)",
    )
    ap.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="L",
        help="tokens per sequence (default: the run file's data.seq_len; 4096 with --preset; without either, the "
        "embedded default run's 256)",
    )
    ap.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        metavar="B",
        help="sequences per micro-batch (default: the run file's train.micro_batch_size, else its batch_size / "
        "parallel.microbatches (2 × pp unless set), at --pp 1 its batch_size; 1 with --preset); with a run file at "
        "--pp 1, a micro-batch of the whole batch is a step of one micro-batch, whose peak holds no gradients",
    )
    ap.add_argument("--recompute", action="store_true", help="block-level activation checkpointing")
    ap.add_argument("--hardware", default="h100", help="roofline of the estimate: h100 (default), h200 or a100")
    ap.add_argument(
        "--float8",
        default=None,
        metavar="RECIPE",
        help="train.float8's recipe, none, tensorwise or rowwise: the blocks' linear layers at the float8 peak, "
        "their casts and what compiled blocks save with them (estimate) or as torchao's float8 layers (--measure); "
        "default: the run file's train.float8, else none",
    )
    ap.add_argument(
        "--float8-auto-filter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --float8: leave in bf16 the linear layers too small to gain from float8 (train.float8_auto_filter; "
        "torchao's H100 thresholds); default: the run file's setting, else off",
    )
    ap.add_argument(
        "--measure",
        nargs="?",
        const="auto",
        default=None,
        metavar="DEVICE",
        help="time each block kind forward+backward on DEVICE (default cuda if available, else cpu) instead",
    )
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    ap.add_argument("--plot", default=None, metavar="OUT.png|OUT.svg", help="also draw the planned pattern")
    ap.set_defaults(func=_cmd_plan)
