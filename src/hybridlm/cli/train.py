"""``hybridlm train``, ``hybridlm prepare`` and ``hybridlm tokenizer``: a training run (or its resume), a
pre-tokenized corpus, and a tokenizer learned from a corpus."""

from __future__ import annotations

import argparse
import os
import sys

from . import progress_flags


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..train.config import RunConfig, override_key
    from ..train.metrics import loss_unit
    from ..train.rundir import CONFIG_FILE
    from ..train.trainer import Trainer
    from . import ignore_stop_signals, say

    for flag, value in (("--run-dir", args.run_dir), ("--resume", args.resume)):
        if isinstance(value, str) and not value.strip():  # an unset shell variable: "" is the current folder
            raise UsageError(f"{flag}: an empty folder name (it would be the current folder); give the run's folder")
    # The run's folder reads a leading ~ as the home folder (rundir.claim): the checks here too, or a run started
    # with a quoted --run-dir '~/x' could not be resumed with the same flag ("no such folder").
    if args.run_dir is not None:
        args.run_dir = os.path.expanduser(args.run_dir)
    if isinstance(args.resume, str):
        args.resume = os.path.expanduser(args.resume)
    run_dir = args.run_dir
    if args.resume is True:  # a bare --resume continues the run named by --run-dir
        if args.run_dir is None:
            raise UsageError("--resume without a directory needs --run-dir RUN_DIR (or give --resume RUN_DIR)")
        args.resume = args.run_dir
    if args.resume is not None:
        if args.run_dir is not None and Path(args.run_dir).resolve() != Path(args.resume).resolve():
            raise UsageError(f"--resume {args.resume} and --run-dir {args.run_dir} name different runs; give one")
        run_dir = args.resume
        folder = Path(args.resume)
        if not folder.is_dir():
            what = "no such folder" if not folder.exists() else "not a folder"
            raise UsageError(f"--resume {args.resume}: {what}; give a run folder that `hybridlm train` wrote")
        if args.config is None and not (folder / CONFIG_FILE).is_file():
            what = f"its {CONFIG_FILE} is not a file" if (folder / CONFIG_FILE).exists() else f"no {CONFIG_FILE}"
            raise UsageError(
                f"--resume {args.resume}: not a training run ({what}; a run writes it once it has started)"
            )
        base = RunConfig.from_toml(args.config or folder / CONFIG_FILE)
    else:
        base = RunConfig.from_toml(args.config) if args.config else RunConfig()
    run = base.with_overrides(args.set) if args.set else base
    named = {override_key(item) for item in args.set or ()}
    trainer = Trainer(
        run,
        run_dir=run_dir,
        resume=args.resume is not None,
        progress=args.progress,
        data_named=bool(named & {"data.source", "data.jsonl_field"}),  # what is read
        tokenizer_named=bool(named & {"data.tokenizer", "data.eos_token"}),  # and how
    )
    summary = trainer.run_loop()
    ignore_stop_signals()  # the run is complete and saved: a signal from here on changes nothing
    if trainer.is_main:  # (say: a terminal gone loses the summary, not the status; the ranks still meet at close())
        first, last = summary["first_val_loss"], summary["val_loss"]
        minutes, seconds = divmod(int(summary["seconds"]), 60)
        unit = loss_unit(run.data.tokenizer)
        if first is not None and last is not None:
            say(f"validation loss {first:.4f} -> {last:.4f} {unit} (start -> end) in {minutes}m{seconds:02d}s")
        elif last is not None:
            say(f"validation loss {last:.4f} {unit} after {minutes}m{seconds:02d}s")
        if "model" in summary:
            say(
                f"model saved to {summary['model']}"
                + (f"; loss curve {summary['loss_curve']}" if summary.get("loss_curve") else "")
            )
    trainer.close(destroy=False)  # every rank is done; entry() leaves without C++ teardown
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "train",
        help="train a model (with no arguments: a small hybrid on an embedded corpus, on this machine)",
        description="Train a hybrid model. With no arguments it trains the embedded default: the pattern "
        "'M-[*-]M-M-[*-]' (two fused attention+MLP blocks) on the English text of Python's own help topics as "
        "bytes, with a held-out validation split; a few minutes on 2 CPU cores. A run file (TOML, tables "
        "[model] [data] [optim] [train] [parallel]) and --set overrides change anything; see docs/training.md. "
        "Under torchrun the same command trains data-parallel with FSDP2, and with --set parallel.pp=N "
        "runs the pattern's '|' stages on N pipeline ranks. --set train.init_from=DIR fine-tunes: it starts from "
        "the weights and config of a hybridlm model folder (hybridlm.save, a run's model/, hybridlm convert --from). "
        "--set data.source='[\"web/\", \"code.jsonl\"]' --set data.weights='[0.7, 0.3]' mixes corpora by weight.",
    )
    ap.add_argument("--config", default=None, metavar="RUN.toml", help="run file (default: the embedded default run)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field, e.g. --set train.steps=100 --set model.pattern='M-[*-]M-'",
    )
    ap.add_argument(
        "--run-dir",
        default=None,
        help="run directory; {time} becomes the start time (default: train.run_dir, runs/{time})",
    )
    ap.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint (its config.toml, or --config's run file, "
        "which then replaces it; plus --set)",
    )
    progress_flags(ap)
    ap.set_defaults(func=_cmd_train)


def _chat_format(args: argparse.Namespace):
    """How ``prepare`` writes out conversations: ``--chat-template``'s template, else the one beside the
    tokenizer.json (as a model folder converted from Hugging Face keeps it), given that folder's special tokens; with
    neither, a conversation is refused, saying so. UsageError for a template that cannot be read or compiled."""
    from pathlib import Path

    from ..errors import UsageError
    from ..infer.chat_template import (
        ChatTemplate,
        ChatTemplateError,
        find_chat_template,
        read_template_file,
        special_token_texts,
    )

    folder = None if args.tokenizer == "byte" else Path(args.tokenizer).expanduser().parent
    try:
        variables = {} if folder is None else special_token_texts(folder)
        if args.chat_template is not None:
            found = (read_template_file(Path(args.chat_template)), args.chat_template)
        else:
            found = None if folder is None else find_chat_template(folder)
        template = None if found is None else ChatTemplate(*found, variables)
    except ChatTemplateError as e:
        raise UsageError(f"--chat-template: {e}" if args.chat_template else str(e)) from None
    beside = f" and none is beside {args.tokenizer}" if folder is not None else ""
    return chat_format(template, f"a conversation needs a chat template: give one with --chat-template FILE{beside}")


def chat_format(template, missing: str):
    """A :class:`~hybridlm.train.chats.ChatFormat` of ``template`` (a
    :class:`~hybridlm.infer.chat_template.ChatTemplate`; None: every conversation refused with the message
    ``missing``) and the chat route's message rules (:func:`~hybridlm.infer.chat.check_messages`)."""
    from ..errors import DataError
    from ..infer.api import RequestError
    from ..infer.chat import check_messages
    from ..train.chats import ChatFormat

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        if template is None:
            raise DataError(missing)
        return template.render(messages, None, add_generation_prompt)

    def check(value: object) -> list[dict]:
        try:
            return check_messages(value)
        except RequestError as e:  # (the route's error, an HTTP answer: here a record's)
            raise ValueError(e.message.removeprefix(f"{e.param}: ")) from None

    return ChatFormat(render, check)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ..train.data import prepare_corpus, prepared_destination
    from ..train.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer, key="--tokenizer", eos_token=args.eos_token, eos_key="--eos-token")
    chats = _chat_format(args)
    # A leading ~ is the home folder, as in SOURCE (and in data.source, which then names OUT): a quoted '~/tokens'
    # was written to a folder named ~ in the current one, where --set data.source='~/tokens' did not find it.
    args.out = os.path.expanduser(args.out)
    prepared_destination(args.out, args.source)  # a destination it may not replace: refused before tokenizing
    flags = ("--tokenizer", "--eos-token")
    progress = sys.stderr.isatty() if args.progress is None else args.progress  # tqdm writes to stderr
    out, meta = prepare_corpus(
        args.source, args.out, tokenizer, args.jsonl_field, progress, key="source", tokenizer_keys=flags, chats=chats
    )
    tokens, docs = meta["num_tokens"], meta["num_docs"]
    learned = (
        f" ({meta['learned_tokens']:,} of them learned: the assistant's turns)" if "learned_tokens" in meta else ""
    )
    print(f"wrote {tokens:,} token{'s' * (tokens != 1)}{learned} of {docs:,} document{'s' * (docs != 1)} to {out}")
    return 0


#: What prepare and tokenizer read (train/formats.py).
_CORPUS_HELP = (
    ".txt/.jsonl/.ndjson/.parquet file (the first three also .gz/.bz2/.xz/.zst; a .json.gz is JSON Lines), a folder of "
    "them, or builtin:pydoc"
)


def add_prepare(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "prepare",
        help="tokenize text or JSONL into a token file for training",
        description="Tokenize a corpus once (a .txt file: one document; a .jsonl or .ndjson file: one document "
        "per record; a .parquet file: one per row of its --jsonl-field column (pyarrow); .txt and JSON Lines also "
        "compressed, read through a last .gz, .bz2, .xz or .zst (zstandard), and a compressed .json as JSON Lines; a "
        "folder of such files, searched "
        "recursively, hidden files and folders left out; or builtin:pydoc) into OUT/tokens.bin (numpy "
        "memmap), OUT/docs.npy (document offsets), OUT/meta.json and the tokenizer's files, a batch of documents "
        "at a time (its ids appended to the token file as it is done: memory stays bounded). Conversations (JSONL "
        "records whose --jsonl-field holds a list of messages) are written out by a chat template, and OUT/mask.bin "
        "marks the assistant's turns as the only tokens learned (supervised fine-tuning). Train on it with --set "
        "data.source=OUT.",
    )
    ap.add_argument("source", help=_CORPUS_HELP)
    ap.add_argument("out", help="output folder")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a Hugging Face tokenizer.json (default: byte)")
    ap.add_argument(
        "--jsonl-field",
        default="text",
        help="field of JSONL records: a text, or a conversation (a list of {role, content} messages, as in "
        "'messages' of a chat completions body: written out by the chat template, only the assistant's turns "
        "learned) (default: text)",
    )
    ap.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template that writes out the conversations (default: the one beside the tokenizer.json, "
        "chat_template.jinja or tokenizer_config.json's, as a model folder converted from Hugging Face keeps it)",
    )
    ap.add_argument(
        "--eos-token",
        default="auto",
        metavar="TOKEN",
        help="the tokenizer.json's end-of-document token (default: auto, the first of the usual names it holds)",
    )
    progress_flags(ap)
    ap.set_defaults(func=_cmd_prepare)


#: Documents whose bytes per token ``hybridlm tokenizer`` reports (the first ones of the corpus).
SAMPLE_DOCUMENTS = 1000


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    import itertools
    import json
    from pathlib import Path

    from ..checkpoint.io import replace_file
    from ..errors import UsageError
    from ..train.bpe import document_texts, train_bpe
    from ..train.data import corpus_documents, source_path
    from ..train.tokenizer import HF_EOS, HFTokenizer

    out = source_path(args.out)
    if out.exists() or out.is_symlink():  # (a tokenizer.json models and prepared corpora were made with)
        raise UsageError(f"{args.out}: exists; remove it or name another file (a tokenizer is never replaced)")

    def documents():
        docs = corpus_documents(args.source, args.jsonl_field, key="source")
        if docs is None:
            raise UsageError(f"{args.source}: a prepared folder holds token ids; learn the tokenizer from its text")
        return docs

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    text = train_bpe(documents(), args.vocab_size, args.min_frequency, progress, args.special_token)
    replace_file(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    tokenizer = HFTokenizer(out, HF_EOS, "--eos-token")
    merges = len(json.loads(text)["model"]["merges"])
    sample = list(itertools.islice(document_texts(documents()), SAMPLE_DOCUMENTS))
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(sample))
    ratio = f"{sum(len(t.encode('utf-8')) for t in sample) / tokens:.2f} bytes a token" if tokens else "no tokens"
    specials = ", ".join(f"{t} = {i}" for t, i in sorted(tokenizer.special_tokens().items(), key=lambda ti: ti[1]))
    print(
        f"wrote {Path(args.out)}: {tokenizer.vocab_size:,} tokens (256 bytes, {specials}, {merges:,} merges); "
        f"{ratio} on the corpus's first {len(sample):,} texts"
    )
    return 0


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser(
        "tokenizer",
        help="learn a byte-level BPE tokenizer.json from a corpus (for --tokenizer and data.tokenizer)",
        description="Learn a byte-level BPE tokenizer from a corpus with the tokenizers package (GPT-2's scheme: "
        "every text encodes and decodes back to itself, in any language) and write it as OUT, a tokenizer.json with "
        "<|endoftext|> (id 0) as its end-of-document token. Use it with hybridlm prepare --tokenizer OUT or "
        "--set data.tokenizer=OUT. The corpus is read as prepare and train read one (a .txt, .jsonl, .ndjson or "
        ".parquet file, compressed too, a folder of them, or builtin:pydoc); a conversation's messages are learned "
        "from as texts.",
    )
    ap.add_argument("source", help=_CORPUS_HELP)
    ap.add_argument("out", help="the tokenizer.json to write (not replaced if it exists)")
    ap.add_argument(
        "--vocab-size",
        type=int,
        default=32768,
        metavar="N",
        help="tokens in all, at most: the 256 bytes, the end-of-document token and the merges (default: 32768; "
        "fewer where the corpus has fewer pairs seen --min-frequency times)",
    )
    ap.add_argument(
        "--min-frequency", type=int, default=2, metavar="N", help="how often a pair must occur to merge (default: 2)"
    )
    ap.add_argument("--jsonl-field", default="text", help="field of JSONL records (default: text)")
    ap.add_argument(
        "--special-token",
        action="append",
        default=[],
        metavar="TEXT",
        help="one more special token (repeatable), ids 1, 2, ... after <|endoftext|>: a chat template's markers, "
        "such as <|im_start|> and <|im_end|>, each then one token, matched whole in a text and left out of a "
        "decoded one",
    )
    progress_flags(ap)
    ap.set_defaults(func=_cmd_tokenizer)
