"""``hybridlm eval``: a checkpoint's next-token loss and perplexity on a corpus, without training.

The corpus is read and packed as training reads it (:func:`~hybridlm.train.data.load_corpus`,
:class:`~hybridlm.train.data.PackedRows`), the checkpoint loaded and its tokenizer chosen as ``generate`` does, and
the loss summed by :func:`~hybridlm.train.evaluation.evaluate_corpus`, which the trainer's validation shares. With
``--split`` the corpus is a run's own split (:func:`~hybridlm.train.data.split`, as its trainer held it out)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..train.config import DataConfig

if TYPE_CHECKING:
    from ..train.data import TokenStream

#: ``--batch-size``'s default: rows per forward (evaluation keeps no activations for a backward).
DEFAULT_BATCH_SIZE = 16
#: ``--split``'s choices: the split's name in the table.
SPLITS = {"val": "validation", "train": "training"}


def _batches(value: str) -> int | None:
    """``--batches``: a positive count, or ``all`` (None)."""
    from ..errors import UsageError

    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"--batches must be a positive count or 'all', got {value!r}")
    return count


def _check_args(args: argparse.Namespace):
    """Refuse bad options by their flags before anything is read: (batches, device, dtype or None for the
    checkpoint's own)."""
    from ..errors import UsageError
    from ..ops.dispatch import check_device
    from . import device_option, dtype_option

    if args.data is None and args.split is None:
        raise UsageError(
            "eval needs --data SOURCE (the corpus to evaluate), or --split val|train for a run directory's own split"
        )
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    batches = _batches(args.batches)
    dtype = dtype_option("--dtype", args.dtype)
    device = device_option("--device", args.device)
    check_device(device)  # kernels forced to Triton on the CPU: refused before the model loads
    return batches, device, dtype


def _run_file(args: argparse.Namespace, path: Path):
    """The :class:`~hybridlm.train.config.RunConfig` of CHECKPOINT where it is a run directory (``path``, the
    folder read, is its ``model/`` and it holds the ``config.toml`` its trainer wrote), read only where ``--split``
    or the default ``--seq-len`` needs it; else None. ``--split`` on another folder, and ``--split val`` on a run
    without a validation split, are refused by name."""
    from ..errors import UsageError
    from ..train.config import RunConfig
    from ..train.rundir import CONFIG_FILE, MODEL_DIR

    folder = Path(args.checkpoint)
    file = folder / CONFIG_FILE
    if path != folder / MODEL_DIR or not file.is_file():
        if args.split is None:
            return None
        up = folder.absolute().parent  # a run's model/ named: its run is the folder above
        run = f"its run directory {up}" if path == folder and (up / CONFIG_FILE).is_file() else "a run directory"
        raise UsageError(
            f"--split {args.split}: {folder} is not a training run directory (the folder `hybridlm train` wrote, "
            f"with its {CONFIG_FILE} and {MODEL_DIR}/): give {run}, or evaluate a corpus with --data SOURCE"
        )
    if args.split is None and args.seq_len is not None:
        return None
    run = RunConfig.from_toml(file)
    if args.split == "val" and run.data.val_fraction <= 0:
        raise UsageError(
            f"--split val: the run {folder} held out no validation split (data.val_fraction = 0 in {file}); "
            "evaluate its whole corpus with --split train, or held-out text with --data SOURCE"
        )
    return run


@dataclass
class Corpus:
    """One corpus ``eval`` reads: a source's tokens (or its split), where they come from and how errors name them;
    for a source of a blended run, its name and its weight in the run's training mix."""

    stream: TokenStream
    source: str
    what: str
    name: str | None = None
    weight: float | None = None


def _corpora(args: argparse.Namespace, run, tokenizer, tokenizer_keys: tuple[str, str], progress: bool) -> list[Corpus]:
    """What ``eval`` reads: ``--data``, else the run's ``data.source`` (and ``data.jsonl_field``), a relative path
    read from the current directory as a resume reads it; with ``--split``, its part the trainer held out for
    validation or trained on (the run's data.val_fraction and data.seed). A blended run's split is each source's
    (``--data``: the one it names), weighted as the run's training mix (:class:`~hybridlm.train.data.Blend`)."""
    from ..errors import UsageError
    from ..train.data import Blend, load_corpus, row_count, same_source, source_labels, split
    from ..train.rundir import CONFIG_FILE

    if args.split is None:
        stream = load_corpus(args.data, tokenizer, args.jsonl_field or "text", progress, "--data", tokenizer_keys)
        return [Corpus(stream, args.data, f"--data {args.data}")]
    sources, part = run.data.sources(), SPLITS[args.split]
    field = args.jsonl_field or run.data.jsonl_field
    key = f"data.source of {Path(args.checkpoint) / CONFIG_FILE}"
    if args.data is not None:  # one of the run's sources, named anew (a path from elsewhere)
        if not any(same_source(args.data, s) for s in sources):
            listed = f"its data.source is {sources[0]}" if len(sources) == 1 else f"its sources: {', '.join(sources)}"
            raise UsageError(
                f"--split {args.split}: --data {args.data} is not a corpus the run split ({listed}): "
                f"the run's {part} split of another corpus means nothing; leave --data out for the "
                "run's own, or evaluate that corpus whole without --split"
            )
        stream = load_corpus(args.data, tokenizer, field, progress, "--data", tokenizer_keys)
        train, val = split(stream, run.data.val_fraction, run.data.seed, f"--data {args.data}")
        return [Corpus(val if args.split == "val" else train, args.data, f"the {part} split of --data {args.data}")]
    corpora, train_rows = [], []
    for i, source in enumerate(sources):
        named = key if len(sources) == 1 else f"{key} (source {i + 1})"
        stream = load_corpus(source, tokenizer, field, progress, named, tokenizer_keys)
        train, val = split(stream, run.data.val_fraction, run.data.seed, f"{named} {source}")
        corpora.append(Corpus(val if args.split == "val" else train, source, f"the {part} split of {named} {source}"))
        train_rows.append(max(1, row_count(train.num_tokens, run.data.seq_len)))  # as the trainer weighs them
    if len(corpora) > 1:
        weights = Blend(run.data.weights or train_rows).weights
        for corpus, name, w in zip(corpora, source_labels(sources), weights):
            corpus.name, corpus.weight = name, float(w)
    return corpora


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..checkpoint.weights import load, read_config
    from ..train.data import PackedRows
    from ..train.evaluation import evaluate_corpus
    from . import model_folder, model_tokenizer

    batches, device, dtype = _check_args(args)
    path = model_folder(args.checkpoint, "checkpoint")
    run = _run_file(args, path)
    config = read_config(path)  # the tokenizer's check, before the corpus and the weights are read
    tokenizer, name = model_tokenizer(path, config, args.tokenizer, args.eos_token)
    progress = sys.stderr.isatty() if args.progress is None else args.progress  # (tqdm writes to stderr)
    corpora = _corpora(args, run, tokenizer, (name, "--eos-token"), progress)
    seq_len = args.seq_len if args.seq_len is not None else run.data.seq_len if run is not None else DataConfig.seq_len
    rows = [PackedRows(c.stream, seq_len, c.what, key="--seq-len") for c in corpora]  # (all, before the weights)
    model = load(path, dtype=dtype, device=device)
    results = [evaluate_corpus(model, r, args.batch_size, batches, tokenizer.token_bytes(), progress) for r in rows]
    report = _report(args, path, corpora, seq_len, results, model, run)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def _measures(result, stream) -> dict:
    """A corpus's own part of the report (a blend's source, or the one corpus): counts, losses, bytes."""
    from ..train.evaluation import perplexity

    losses = result.losses()
    return {
        "corpus_tokens": stream.num_tokens,
        "corpus_documents": stream.num_docs,
        "rows": result.rows,
        "whole_corpus": result.whole,
        "tokens": result.tokens[0],
        "loss": _number(losses[0]),
        "perplexity": _number(None if losses[0] is None else perplexity(losses[0])),
        "bytes": result.bytes,
        "bits_per_byte": _number(result.bits_per_byte),
        "mtp": [
            {
                "depth": d,
                "tokens": n,
                "loss": _number(loss),
                "perplexity": _number(None if loss is None else perplexity(loss)),
            }
            for d, (n, loss) in enumerate(zip(result.tokens[1:], losses[1:]), start=1)
        ],
    }


def _number(x: float | None) -> float | None:
    """A finite number, else None (JSON has no inf or nan)."""
    import math

    return x if x is not None and math.isfinite(x) else None


def _blended(parts: list[dict], weights: list[float]) -> dict:
    """A blend's measures from its sources': counts summed, losses and bits per byte the means weighted by the
    run's training mix (as its logged val_loss), the perplexity that of the weighted loss."""
    from ..train.evaluation import perplexity, weighted_mean

    def total(key: str) -> int | None:
        values = [p[key] for p in parts]
        return None if None in values else sum(values)

    def mean(values: list[float | None]) -> float | None:
        return _number(weighted_mean(values, weights))

    loss = mean([p["loss"] for p in parts])
    depths = zip(*(p["mtp"] for p in parts))
    return {
        **{k: total(k) for k in ("corpus_tokens", "corpus_documents", "rows")},
        "whole_corpus": all(p["whole_corpus"] for p in parts),
        "tokens": total("tokens"),
        "loss": loss,
        "perplexity": None if loss is None else _number(perplexity(loss)),
        "bytes": total("bytes"),
        "bits_per_byte": mean([p["bits_per_byte"] for p in parts]),
        "mtp": [
            {
                "depth": ms[0]["depth"],
                "tokens": sum(m["tokens"] for m in ms),
                "loss": (d_loss := mean([m["loss"] for m in ms])),
                "perplexity": None if d_loss is None else _number(perplexity(d_loss)),
            }
            for ms in depths
        ],
    }


def _report(args: argparse.Namespace, path, corpora: list[Corpus], seq_len: int, results, model, run) -> dict:
    """The ``--json`` object (what the table shows too); a non-finite number is null (JSON has none), as is the
    loss and perplexity of a head without labels. ``corpus_tokens`` and ``corpus_documents`` are those of the
    split with ``--split``. A blended run's split (``--split`` without ``--data``): each key is the blend's (counts
    summed, losses weighted by the training mix, as the run's logged val_loss), and ``sources`` lists each source's
    own (with its ``name`` in the run's metrics and its ``weight``), a key only a blend's report has."""
    parts = [_measures(r, c.stream) for r, c in zip(results, corpora)]
    blend = len(corpora) > 1
    measures = _blended(parts, [c.weight for c in corpora]) if blend else parts[0]
    report = {
        "checkpoint": str(path),  # the model folder read (a run's model/)
        "data": run.data.source if blend else corpora[0].source,  # --data, or the run's data.source
        "split": args.split,
        "corpus_tokens": measures["corpus_tokens"],
        "corpus_documents": measures["corpus_documents"],
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        **{k: v for k, v in measures.items() if k not in ("corpus_tokens", "corpus_documents")},
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
    }
    if blend:
        report["sources"] = [
            {"name": c.name, "data": c.source, "weight": c.weight, **p} for c, p in zip(corpora, parts)
        ]
    return report


def _table(r: dict) -> str:
    """The report as aligned lines for a person."""

    def shown(x: float | None, digits: int, unit: str = "") -> str:
        return "not finite" if x is None else f"{x:.{digits}f}{unit}"

    # A head without labels (null in the JSON, as a loss that is not finite is): MTP depth d scores the token d + 1
    # places on, in the same row and document, so rows of d tokens or fewer hold none.
    none = "no labels in these rows"
    part = f", the run's {SPLITS[r['split']]} split" if r["split"] else ""
    scope = "every row and the tail" if r["whole_corpus"] else "the rows --batches picks, as training's validation"
    data = r["data"] if "sources" not in r else f"a blend of {len(r['sources'])} sources"
    lines = [
        ("checkpoint", r["checkpoint"]),
        ("data", f"{data}{part} ({r['corpus_tokens']:,} tokens in {r['corpus_documents']:,} documents)"),
        ("rows", f"{r['rows']:,} of {r['seq_len']} tokens, {r['batch_size']} per forward; {scope}"),
        ("tokens", f"{r['tokens']:,}"),
        ("loss", shown(r["loss"], 4, " nats/token") if r["tokens"] else none),
        ("perplexity", shown(r["perplexity"], 3) if r["tokens"] else none),
    ]
    # Where bytes are counted (the byte tokenizer), also when the loss is not finite: left out, the line read as a
    # tokenizer.json's, whose pieces have no fixed bytes.
    if r["bytes"] is not None:
        lines.append(("bits/byte", f"{shown(r['bits_per_byte'], 4)} ({r['bytes']:,} bytes)"))
    for m in r["mtp"]:
        d = m["depth"]
        loss = shown(m["loss"], 4, " nats/token")
        said = f"loss {loss}, perplexity {shown(m['perplexity'], 3)} ({m['tokens']:,} tokens)"
        why = f" (depth {d} needs --seq-len above {d})" if r["seq_len"] <= d else ""
        lines.append((f"MTP depth {d}", said if m["tokens"] else none + why))
    for s in r.get("sources", ()):  # a blend's loss above is their mean, weighted as the run's training mix
        loss = (
            f"loss {shown(s['loss'], 4, ' nats/token')}, perplexity {shown(s['perplexity'], 3)}"
            if s["tokens"]
            else none
        )
        lines.append(
            (f"source {s['name']}", f"weight {s['weight']:.3g}: {loss} ({s['tokens']:,} tokens) · {s['data']}")
        )
    lines.append(("model", f"{r['dtype']} on {r['device']}"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def add_eval(sub: argparse._SubParsersAction) -> None:
    from . import model_options, progress_flags

    ap = sub.add_parser(
        "eval",
        help="a checkpoint's loss and perplexity on a corpus (no training)",
        description="Measure a checkpoint on held-out text: the mean next-token loss (nats/token) of its main head, "
        "the perplexity, bits per byte where the tokenizer's ids are bytes, and each MTP depth's loss. The corpus "
        "is read and packed as training reads it: documents end with the end-of-document token, rows of --seq-len "
        "tokens, no label crosses a document. By default every row is evaluated and the tokens after the last "
        "whole row as one shorter row, so every token but the first is scored exactly once (unless it starts a document); losses are summed "
        "over tokens, so a short last batch counts as much per token as any. CHECKPOINT is a model directory "
        "(hybridlm.save, hybridlm convert --from) or a training run directory (its model/); --split val|train "
        "evaluates a run directory on its own validation or training split, as its trainer split the corpus.",
    )
    model_options(ap)
    ap.add_argument(
        "--data",
        metavar="SOURCE",
        help="one source of what data.source takes: a .txt/.jsonl/.ndjson/.parquet file (compressed too) or a folder "
        "of them, a folder written "
        "by hybridlm prepare, or builtin:pydoc (required without --split; with it the default is the run's data.source, "
        "every source of a blend)",
    )
    ap.add_argument(
        "--split",
        choices=list(SPLITS),
        help="CHECKPOINT is a run directory: evaluate the documents its trainer held out for validation (val) or "
        "trained on (train), split by the run's data.val_fraction and data.seed, of the run's data.source (a "
        "relative path read from the current directory, as a resume reads it) or of --data, which must name it "
        "(or one source of a blend); a blended run's split is each source's, reported alone and as their mean "
        "weighted by the run's training mix (as its val_loss)",
    )
    ap.add_argument(
        "--seq-len",
        type=int,
        help=f"tokens per row (default: the run's data.seq_len for a run directory, else {DataConfig.seq_len})",
    )
    ap.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"rows per forward (default: {DEFAULT_BATCH_SIZE})"
    )
    ap.add_argument(
        "--batches",
        default="all",
        metavar="K",
        help="evaluate K batches of rows spread evenly over the corpus, whole rows only (as training's validation "
        "picks them, with train.eval_batches and train.batch_size), or all: every row and the tail (default: all)",
    )
    ap.add_argument(
        "--jsonl-field",
        help="text field of JSONL records (default: text; the run's data.jsonl_field with --split)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    progress_flags(ap)
    ap.set_defaults(func=_cmd_eval)
