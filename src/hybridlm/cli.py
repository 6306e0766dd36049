"""The ``hybridlm`` command line: parse arguments, call the library, print results.

Exit status: 0 on success; 2 on any error (a bad pattern, config value or checkpoint, a full
disk, ...), with a one-line message and no traceback unless ``--debug``; 128 + N when training
stopped on signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import os
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
    if args.plot:
        from .plan.plot import plot_pattern_cli

        print(f"wrote {plot_pattern_cli(p, args.plot, args.pp, args.first_stage_layers, args.last_stage_layers)}")
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
    from .config import ModelConfig
    from .train.config import RunConfig

    run = None
    if preset is not None:
        config = ModelConfig.preset(preset)
    else:
        run = RunConfig.from_toml(run_file) if run_file is not None else RunConfig()
        config = run.model_config()
    if pattern is not None:
        config = config.replace(pattern=pattern)
    return config, run


def _plan_micro_batch(run, pp: int) -> int:
    """The rows per micro-batch a run would give each pipeline stage with one data-parallel group: its
    ``train.micro_batch_size``, else its batch over ``parallel.microbatches`` (2 × pp by default); 1 without a run."""
    if run is None:
        return 1
    microbatches = run.parallel.microbatches or 2 * max(pp, 1)
    return run.train.micro_batch_size or max(1, run.train.batch_size // microbatches)


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .plan.measure import default_device
    from .plan.planner import plan_pipeline

    config, run = _resolve_model(args.pattern, args.preset, args.config)
    plan = plan_pipeline(
        config,
        args.pp,
        args.vpp,
        seq_len=args.seq_len if args.seq_len is not None else (run.data.seq_len if run else 4096),
        micro_batch_size=args.micro_batch_size
        if args.micro_batch_size is not None
        else _plan_micro_batch(run, args.pp),
        recompute=args.recompute or bool(run and run.train.activation_checkpointing),
        hardware=args.hardware,
        measure=default_device() if args.measure == "auto" else args.measure,
    )
    if args.plot:
        plan.plot(args.plot)
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.render())
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
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
    model.add_argument("--config", default=None, metavar="RUN.toml", help="run file (its model, seq_len, batch)")
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
        "parallel.microbatches (2 × pp unless set); 1 with --preset)",
    )
    ap.add_argument("--recompute", action="store_true", help="block-level activation checkpointing")
    ap.add_argument("--hardware", default="h100", help="roofline of the estimate: h100 (default), h200 or a100")
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

        config = _megatron_config(args.config) if args.config is not None else None
        out = convert_from_megatron(args.src, args.dst, config)
        print(f"wrote {out}")
        return 0
    if args.config is not None:
        raise UsageError("--config is only used with --from megatron")
    if args.no_verify and args.to is None:
        raise UsageError("--no-verify is only used with --to (it skips the SHA-256 check of a hybridlm checkpoint)")
    out = convert(args.src, args.dst, **({"verify": False} if args.no_verify else {}))
    print(f"wrote {out}")
    return 0


def _megatron_config(path: str):
    """``convert --from megatron --config``: a ModelConfig JSON, or a hybridlm checkpoint's config.json or folder."""
    import json
    from pathlib import Path

    from .checkpoint.weights import read_config
    from .config import ModelConfig
    from .errors import ConfigError, UsageError

    if Path(path).is_dir():
        return read_config(path)
    try:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and data.get("format") == "hybridlm":  # a checkpoint's config.json
            return ModelConfig.from_dict(data.get("config"))
        return ModelConfig.from_json(path)
    except (OSError, ValueError, RecursionError) as e:
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, ConfigError) else str(e)
        raise UsageError(f"--config {path}: not a model config ({reason})") from None


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
    ap.add_argument(
        "--config",
        default=None,
        help="--from megatron: the model's config, a ModelConfig JSON or a hybridlm checkpoint (folder or its "
        "config.json); default: <SRC>.hybridlm.json",
    )
    ap.add_argument(
        "--no-verify",
        action="store_true",
        help="--to: skip the SHA-256 check of SRC's weight files (a damaged file converts)",
    )
    ap.set_defaults(func=_cmd_convert)


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import UsageError
    from .train.config import RunConfig
    from .train.rundir import CONFIG_FILE
    from .train.trainer import Trainer

    run_dir = args.run_dir
    if args.resume is True:  # a bare --resume continues the run named by --run-dir
        if args.run_dir is None:
            raise UsageError("--resume without a directory needs --run-dir RUN_DIR (or give --resume RUN_DIR)")
        args.resume = args.run_dir
    if args.resume is not None:
        if args.run_dir is not None and Path(args.run_dir) != Path(args.resume):
            raise UsageError(f"--resume {args.resume} and --run-dir {args.run_dir} name different runs; give one")
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
    trainer.close(destroy=False)  # every rank is done; entry() leaves without C++ teardown
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "train",
        help="train a model (with no arguments: a small hybrid on an embedded corpus, on this machine)",
        description="Train a hybrid model. With no arguments it trains the embedded default: the pattern "
        "'M-[*-]M-M-[*-]' (two fused attention+MLP blocks) on the English text of Python's own help topics as "
        "bytes, with a held-out validation split; a few minutes on 2 CPU cores. A run file (TOML, tables "
        "[model] [data] [optim] [train] [parallel]) and --set overrides change anything; see docs/training.md. "
        "Under torchrun the same command trains data-parallel with FSDP2, and with --set parallel.pp=N "
        "runs the pattern's '|' stages on N pipeline ranks.",
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


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from --prompt (repeatable) and --prompts-file (one per line, or JSONL with "prompt"/"text")."""
    import json
    from pathlib import Path

    from .errors import UsageError

    prompts = list(args.prompt or [])
    for i, p in enumerate(prompts, start=1):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal's locale could not decode (kept as surrogates)
            raise UsageError(f"--prompt number {i}: not UTF-8 text") from None
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:  # "-": standard input; also pipes and devices
            raw = sys.stdin.buffer.read() if args.prompts_file == "-" else path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"--prompts-file {path}: no such file") from None
        except OSError as e:
            raise UsageError(f"--prompts-file {path}: cannot read it ({e.strerror})") from None
        lines = raw.split(b"\n")
        jsonl = path.suffix == ".jsonl"
        for n, line in enumerate(lines, start=1):
            try:
                line = line.decode("utf-8").removesuffix("\r")
            except UnicodeDecodeError as e:
                raise UsageError(f"{path}:{n}: not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            if jsonl or line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UsageError(f'{path}:{n}: a JSONL record needs a string "prompt" or "text" field')
                prompts.append(text)
            else:
                prompts.append(line)
    if not prompts:
        raise UsageError("give a prompt: --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


class _Completion:
    """One row's text as tokens arrive: cut at the first stop string, optionally streamed to stdout.

    While streaming, the last ``len(longest stop) - 1`` characters are held back (they may begin a
    stop string), as is a trailing replacement character (an incomplete UTF-8 sequence).
    """

    #: Prompt tokens decoded before the completion and cut off again: decoders that drop a leading
    #: space (sentencepiece's Metaspace, Strip) would otherwise glue the first word to the prompt.
    CONTEXT = 8

    def __init__(self, tokenizer, stops: list[str], stream: bool, prompt: list[int] | None = None) -> None:
        self.tokenizer, self.stops, self.stream = tokenizer, stops, stream
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.context = list(prompt or [])[-self.CONTEXT :]
        self.prefix = tokenizer.decode(self.context) if self.context else ""
        self.ids: list[int] = []
        self.text, self.shown, self.stopped = "", 0, False

    def _decode(self) -> str:
        text = self.tokenizer.decode(self.context + self.ids)
        return text[len(self.prefix) :] if text.startswith(self.prefix) else self.tokenizer.decode(self.ids)

    def add(self, token: int) -> bool:
        if self.stopped:
            return True
        self.ids.append(token)
        text = self._decode()
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text
        if self.stream:
            safe = len(text) if self.stopped else len(text) - self.hold
            while safe > self.shown and text[safe - 1] == "\ufffd" and not self.stopped:
                safe -= 1
            self._show(safe)
        return self.stopped

    def finish(self) -> None:
        if self.stream:
            self._show(len(self.text))

    def _show(self, upto: int) -> None:
        if upto > self.shown:
            sys.stdout.write(self.text[self.shown : upto])
            sys.stdout.flush()
            self.shown = upto


def _unescape(stop: str) -> str:
    r"""``--stop`` with the escapes \n, \t, \r and \\ read as the characters they name (a shell passes them as typed)."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m[1]], stop)


def _check_generate_args(args: argparse.Namespace, stops: list[str]) -> None:
    """Refuse bad ``hybridlm generate`` options by their flags, before the model is loaded."""
    import math

    import torch

    from .errors import UsageError

    checks = (
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {args.max_new_tokens}"),
        (
            math.isfinite(args.temperature) and args.temperature >= 0,
            f"--temperature must be >= 0, got {args.temperature}",
        ),
        (args.top_k >= 0, f"--top-k must be >= 0, got {args.top_k}"),
        (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (
            math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0,
            f"--repetition-penalty must be > 0, got {args.repetition_penalty}",
        ),
        (args.threads is None or args.threads >= 1, f"--threads must be >= 1, got {args.threads}"),
        (all(stops), "--stop: an empty string would end every text at once"),
        (args.draft_tokens is None or args.speculative, "--draft-tokens needs --speculative mtp"),
        (args.draft_tokens is None or args.draft_tokens >= 1, f"--draft-tokens must be >= 1, got {args.draft_tokens}"),
        (
            not args.speculative or args.greedy or args.temperature == 0,
            "--speculative mtp decodes greedily: add --greedy",
        ),
        (not (args.speculative and args.no_cache), "--speculative needs the cache: leave out --no-cache"),
        (not (args.cuda_graph and args.no_cache), "--cuda-graph needs the cache: leave out --no-cache"),
    )
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    if args.cuda_graph and device.type != "cuda":
        raise UsageError("--cuda-graph needs --device cuda")


def _print_rows(batch: list[str], rows: list[_Completion], stream: bool, separate: bool) -> None:
    """The texts of a batch: a streamed row's rest, or each prompt with its text; a blank line after each
    when several prompts are printed."""
    for prompt, row in zip(batch, rows):
        if stream:
            row.finish()
            print()
        else:
            print(prompt + row.text)
        if separate:
            print()


def _cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .checkpoint.weights import load
    from .errors import UsageError
    from .infer.generate import generate
    from .train.rundir import MODEL_DIR
    from .train.tokenizer import build_tokenizer, load_tokenizer

    prompts = _read_prompts(args)
    stops = [_unescape(s) for s in args.stop or []]
    _check_generate_args(args, stops)
    path = Path(args.checkpoint)
    if (path / MODEL_DIR).is_dir() and not (path / "config.json").exists():
        path = path / MODEL_DIR  # a run directory: use its exported model
    elif (path / "checkpoints").is_dir() and not (path / "config.json").exists():
        raise UsageError(
            f"{path} is a training run without an exported model yet ({MODEL_DIR}/ is written when it reaches "
            f"train.steps): finish it with hybridlm train --resume {path}"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load(path, device=args.device, verify=not args.no_verify)
    tokenizer = build_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer(path)
    totals = dict(prefill_tokens=0, prefill_seconds=0.0, decode_tokens=0, decode_seconds=0.0, drafted=0, accepted=0)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        ids = [tokenizer.encode(p) for p in batch]
        stream = len(batch) == 1  # one row at a time streams; a batch prints each text when done
        rows = [_Completion(tokenizer, stops, stream, prompt) for prompt in ids]
        if stream:
            sys.stdout.write(batch[0])
            sys.stdout.flush()
        stats: dict = {}
        try:
            generate(
                model,
                ids,
                max_new_tokens=args.max_new_tokens,
                temperature=0.0 if args.greedy else args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                eos_id=tokenizer.eos_id,
                seed=None if args.seed is None else args.seed + start,  # each batch its own random stream
                use_cache=not args.no_cache,
                speculative=args.speculative,
                draft_tokens=args.draft_tokens,
                repetition_penalty=args.repetition_penalty,
                callback=lambda row, token, rows=rows: rows[row].add(token),
                stats=stats,
                cuda_graph=args.cuda_graph,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        except KeyboardInterrupt:  # show what this batch has so far (held-back characters too), then stop
            _print_rows(batch, rows, stream, separate=False)
            raise
        _print_rows(batch, rows, stream, separate=len(prompts) > 1)
        for key in totals:
            totals[key] += stats.get(key, 0)
    t = totals
    line = (
        f"prefill {t['prefill_tokens']} tokens at {t['prefill_tokens'] / max(t['prefill_seconds'], 1e-9):,.0f} tok/s, "
        f"decode {t['decode_tokens']} tokens at {t['decode_tokens'] / max(t['decode_seconds'], 1e-9):,.1f} tok/s"
    )
    if args.speculative:
        line += f", MTP acceptance {t['accepted'] / max(t['drafted'], 1):.1%} of {t['drafted']} drafts"
    print(line, file=sys.stderr)
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "generate",
        help="generate text from a trained checkpoint (streamed, cached, batched)",
        description="Continue prompts with a trained model (greedy with --temperature 0 or --greedy, else "
        "sampling), with a state cache for every mixer. A single prompt at a time (--batch-size 1) streams its "
        "tokens as they come; larger batches print each text when the batch is done. Prefill and decode "
        "tokens/s go to stderr. CHECKPOINT is a model directory (hybridlm checkpoint with its tokenizer) or a "
        "training run directory.",
    )
    ap.add_argument("checkpoint", help="model directory, or a run directory (its model/ is used)")
    ap.add_argument("--prompt", action="append", help="text to continue (repeat for several prompts)")
    ap.add_argument(
        "--prompts-file",
        default=None,
        help='prompts, one per line, or JSONL (*.jsonl or lines starting with "{") with a "prompt" or "text" field; '
        "- reads standard input",
    )
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--greedy", action="store_true", help="pick the most likely token (same as --temperature 0)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set reaching this probability")
    ap.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="divide logits of tokens already seen by this (1 = off)"
    )
    ap.add_argument(
        "--stop",
        action="append",
        help=r"stop a text at this string (repeatable; not printed; \n, \t, \r and \\ are read as escapes)",
    )
    ap.add_argument("--batch-size", type=int, default=1, help="prompts generated together (left-padded)")
    ap.add_argument("--no-cache", action="store_true", help="rerun the full forward per token (slow reference)")
    ap.add_argument(
        "--speculative", choices=["mtp"], default=None, help="draft with the model's MTP depths (greedy only)"
    )
    ap.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        metavar="N",
        help="with --speculative: drafts per round (default: all depths)",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed (each batch of --batch-size prompts draws from seed + its first index)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cuda-graph", action="store_true", help="replay the decode step as a CUDA graph (CUDA only)")
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
    return [_add_train, _add_generate, _add_prepare, _add_pattern, _add_plan, _add_inspect, _add_convert]


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
    except BrokenPipeError:
        # The reader went away (`hybridlm pattern ... | head`): stop quietly, as other CLI tools do;
        # stdout goes to /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
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


def entry() -> None:
    """The ``hybridlm`` command (and ``python -m hybridlm.cli``).

    A process of a torchrun job leaves with ``os._exit`` once ``main`` returned: its ranks have
    met at a final barrier, so nothing is in flight, and skipping the interpreter's teardown
    skips gloo's (a finished run could otherwise end with SIGABRT on one rank, which torchrun
    reports as a failed job). Streams and logging are flushed first."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
