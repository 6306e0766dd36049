"""Reading a corpus in each format it may come in: JSON Lines plain and compressed (gzip, xz, zstd) and Parquet.

    python benchmarks/corpus_formats.py              # a generated corpus of 32 MB of JSON Lines
    python benchmarks/corpus_formats.py --mb 8 --repeat 1

The corpus is ``prepare_throughput.py``'s (seeded words of 1-4 byte UTF-8 characters, nothing downloaded), written once
in each format. For each: the file's size, the rate at which ``hybridlm.train.data.text_documents`` gives its
documents (MB of document text a second, the median of ``--repeat`` runs taking turns) and that rate against the plain
file's; every format must give the plain file's documents exactly (exit status 1 otherwise). Results belong in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prepare_throughput import corpus

from hybridlm.train.data import text_documents


def write_formats(plain: Path) -> dict[str, Path]:
    """``plain`` (JSON Lines) and its copies: gzip, xz and zstd-compressed, and a Parquet file of its texts."""
    data = plain.read_bytes()
    out = {"jsonl": plain}
    out["jsonl.gz"] = plain.with_suffix(".jsonl.gz")
    out["jsonl.gz"].write_bytes(gzip.compress(data, compresslevel=6))
    out["jsonl.xz"] = plain.with_suffix(".jsonl.xz")
    out["jsonl.xz"].write_bytes(lzma.compress(data, preset=3))
    try:
        import zstandard

        out["jsonl.zst"] = plain.with_suffix(".jsonl.zst")
        out["jsonl.zst"].write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    except ImportError:
        print("(zstandard missing: no .zst row)", file=sys.stderr)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        texts = [json.loads(line)["text"] for line in data.decode().splitlines()]
        out["parquet"] = plain.with_suffix(".parquet")
        pq.write_table(pa.table({"text": texts}), out["parquet"], compression="zstd")  # as FineWeb's shards
    except ImportError:
        print("(pyarrow missing: no Parquet row)", file=sys.stderr)
    return out


def read_seconds(path: Path) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    docs = list(text_documents(str(path)))
    return time.perf_counter() - t0, docs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=32.0, help="megabytes of generated JSON Lines")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp, "corpus.jsonl")
        corpus(plain, args.mb)
        files = write_formats(plain)
        seconds: dict[str, list[float]] = {name: [] for name in files}
        reference, ok = None, True
        for r in range(args.repeat):
            for name, path in files.items() if r % 2 == 0 else reversed(files.items()):
                s, docs = read_seconds(path)
                seconds[name].append(s)
                if reference is None:
                    reference = docs
                elif docs != reference:
                    print(f"{name}: documents differ from the plain file's", file=sys.stderr)
                    ok = False
        text_mb = sum(len(d.encode()) for d in reference) / 1e6
        print(f"{len(reference):,} documents, {text_mb:.1f} MB of text; median of {args.repeat} reads each")
        print("\n| format | file MB | MB of text / s | against .jsonl |\n|---|---:|---:|---:|")
        base = statistics.median(seconds["jsonl"])
        for name, path in files.items():
            s = statistics.median(seconds[name])
            print(f"| .{name} | {path.stat().st_size / 1e6:.1f} | {text_mb / s:.1f} | {base / s:.2f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
