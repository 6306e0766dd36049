"""``hybridlm prepare`` throughput and peak memory: one document at a time (the path before batching) against
batches streamed to disk, for the byte tokenizer and a trained byte-level BPE tokenizer.json.

    python benchmarks/prepare_throughput.py               # generated JSON Lines corpora of 8 and 32 MB
    python benchmarks/prepare_throughput.py --mb 2 --repeat 1

The corpus is generated (seeded words of 1-4 byte UTF-8 characters, documents of 50-5,000 characters; nothing is
downloaded) and a BPE tokenizer (vocab 8,192) is trained on its first 2 MB with the ``tokenizers`` package. Each
variant runs in a fresh subprocess (so that one's peak does not hide another's), ``--repeat`` times, taking turns;
the table shows the median rate and the largest peak RSS (``resource.getrusage``'s ``ru_maxrss``), and the peak
above the RSS the process had once imported (what the corpus cost). Both variants' output folders are compared
byte for byte (exit status 1 when they differ). Results belong in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("one at a time", "batched, streamed")


def corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """A JSON Lines file of about ``megabytes`` MB of generated documents."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz" * 4 + "éüßçñαβγδ" + "中文字" + "🙂"  # 1, 2, 3 and 4 bytes a character
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(20_000)]
    written, limit = 0, int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        while written < limit:
            text, size = [], rng.randint(50, 5_000)
            while sum(map(len, text)) + len(text) < size:
                text.append(rng.choice(words))
            line = json.dumps({"text": " ".join(text) + "\n"}, ensure_ascii=False) + "\n"
            written += len(line.encode())
            f.write(line)


def bpe(path: Path, sample: Path) -> None:
    """A byte-level BPE tokenizer.json (vocab 8,192, end of document ``<|endoftext|>``) trained on ``sample``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts, size = [], 0
    with open(sample, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > 2e6:
                break
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))


def one_at_a_time(source: str, out: Path, tokenizer) -> dict:
    """The path before batching: ``encode`` per document, every document's array kept, joined, then written."""
    import numpy as np

    from hybridlm.train.data import TokenStream, text_documents, token_dtype, write_prepared

    chunks = []
    for text in text_documents(source):
        ids = tokenizer.encode(text)
        ids.append(tokenizer.eos_id)
        chunks.append(np.asarray(ids, dtype=token_dtype(tokenizer)))
    starts = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    write_prepared(TokenStream(np.concatenate(chunks), starts), out, tokenizer, source)
    return json.loads((out / "meta.json").read_text())


def child(variant: str, tokenizer_spec: str, source: str, out: str) -> None:
    """Run one variant in this process and print its measures as JSON."""
    from hybridlm.train.data import prepare_corpus
    from hybridlm.train.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_spec)
    with open("/proc/self/statm") as f:  # resident pages once imported
        start_rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    if variant == VARIANTS[0]:
        meta = one_at_a_time(source, Path(out), tokenizer)
    else:
        meta = prepare_corpus(source, out, tokenizer)[1]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (kB on Linux)
    print(json.dumps({"seconds": seconds, "docs": meta["num_docs"], "tokens": meta["num_tokens"], "peak": peak,
                      "start": start_rss}))  # fmt: skip


def measure(variant: str, tokenizer: str, source: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, __file__, "--child", variant, tokenizer, str(source), str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{variant} ({tokenizer}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[8, 32], help="corpus sizes in MB (default 8 32)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each variant, taking turns (default 3)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    status, rows = 0, []
    print(f"{os.cpu_count()} CPUs; median time of {args.repeat} runs, largest peak")
    for size in args.mb:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            corpus(tmp / "corpus.jsonl", size)
            bpe(tmp / "bpe.json", tmp / "corpus.jsonl")
            mb = (tmp / "corpus.jsonl").stat().st_size / 1e6
            for name, spec in (("byte", "byte"), ("BPE 8k", str(tmp / "bpe.json"))):
                runs = {v: [] for v in VARIANTS}
                for _ in range(args.repeat):
                    for i, variant in enumerate(VARIANTS):
                        runs[variant].append(measure(variant, spec, tmp / "corpus.jsonl", tmp / f"out{i}"))
                if not all(filecmp.cmp(tmp / "out0" / f, tmp / "out1" / f, False) for f in os.listdir(tmp / "out0")):
                    print(f"{mb:.1f} MB, {name}: the two variants wrote different files")
                    status = 1
                base = statistics.median(r["seconds"] for r in runs[VARIANTS[0]])
                for variant in VARIANTS:
                    r, s = runs[variant], statistics.median(x["seconds"] for x in runs[variant])
                    peak, above = max(x["peak"] for x in r), max(x["peak"] - x["start"] for x in r)
                    rows.append([
                        f"{mb:.1f} MB, {r[0]['docs']:,} docs", name, variant, f"{s:.2f}", f"{r[0]['docs'] / s:,.0f}",
                        f"{r[0]['tokens'] / s / 1e6:.2f} M", f"{peak / 2**20:,.0f}", f"{above / 2**20:,.0f}",
                        f"{base / s:.2f}x",
                    ])  # fmt: skip
    header = ["corpus", "tokenizer", "path", "s", "docs/s", "tokens/s", "peak RSS MiB", "above start MiB", "speed"]
    print(table(header, rows))
    return status


if __name__ == "__main__":
    sys.exit(main())
