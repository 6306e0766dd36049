"""Corpus files read compressed (gzip, bzip2, xz, zstd) and from Parquet: the same documents as the plain files,
and every bad file named with what is wrong."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path

import pytest

from hybridlm.errors import DataError
from hybridlm.train.data import load_corpus, text_documents
from hybridlm.train.formats import FileKind, file_kind
from hybridlm.train.tokenizer import ByteTokenizer

DOCS = ["first document", "second one, with ünïcödé", "third\nwith a newline"]
LINES = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)).encode()


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def _parquet(path: Path, columns: dict) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=2)  # several row groups


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("a.txt", FileKind("text")),
        ("a.TXT.GZ", FileKind("text", "gzip")),
        ("a.jsonl", FileKind("lines")),
        ("a.ndjson.bz2", FileKind("lines", "bzip2")),
        ("a.jsonl.xz", FileKind("lines", "xz")),
        ("shard_00.jsonl.zst", FileKind("lines", "zstd")),
        ("train-00000-of-00099.parquet", FileKind("parquet")),
        ("a.parquet.gz", None),  # Parquet compresses inside the file
        ("a.gz", None),
        ("c4-train.00000-of-01024.json.gz", FileKind("lines", "gzip")),  # C4's, Dolma's: JSON Lines
        ("a.json", None),
        ("a.csv", None),
    ],
)
def test_a_files_name_says_what_it_holds(name, kind):
    assert file_kind(Path(name)) == kind


@pytest.mark.parametrize(
    ("name", "pack"),
    [
        ("corpus.jsonl.gz", gzip.compress),
        ("corpus.jsonl.bz2", bz2.compress),
        ("corpus.ndjson.xz", lzma.compress),
        ("corpus.jsonl.zst", _zstd),
        ("corpus.jsonl.gz", lambda data: gzip.compress(data[:40]) + gzip.compress(data[40:])),  # two gzip members
    ],
)
def test_compressed_json_lines_give_the_plain_files_documents(tmp_path, name, pack):
    (tmp_path / name).write_bytes(pack(LINES))
    assert list(text_documents(str(tmp_path / name))) == DOCS


def test_compressed_text_files_in_a_folder_are_read_as_their_plain_copies(tmp_path):
    """A folder of .txt.gz and .jsonl.zst shards tokenizes to the stream its plain copies give, in the same order:
    the text files first, then the record files, each sorted by name."""
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    for folder in (plain, packed):
        folder.mkdir()
    for i, doc in enumerate(DOCS):
        (plain / f"{i}.txt").write_text(doc)
        (packed / f"{i}.txt.gz").write_bytes(gzip.compress(doc.encode()))
    (plain / "r.jsonl").write_bytes(LINES)
    (packed / "r.jsonl.xz").write_bytes(lzma.compress(LINES))
    tok = ByteTokenizer()
    a, b = load_corpus(str(plain), tok), load_corpus(str(packed), tok)
    assert a.tokens.tolist() == b.tokens.tolist() and a.doc_starts.tolist() == b.doc_starts.tolist()
    assert a.num_docs == 2 * len(DOCS)


def test_a_parquet_column_gives_its_rows_documents_and_conversations(tmp_path):
    _parquet(tmp_path / "c.parquet", {"text": [*DOCS, "x" * 5000], "url": ["u"] * 4})
    assert list(text_documents(str(tmp_path / "c.parquet"))) == [*DOCS, "x" * 5000]
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    _parquet(tmp_path / "chat.parquet", {"messages": chats})
    (doc,) = text_documents(str(tmp_path / "chat.parquet"), jsonl_field="messages")
    assert doc.messages == chats[0] and doc.where.endswith("chat.parquet: row 1")


def test_a_parquet_file_without_the_column_or_with_a_null_row_is_named(tmp_path):
    _parquet(tmp_path / "c.parquet", {"content": DOCS, "url": ["u"] * 3})
    with pytest.raises(
        DataError, match=r"c\.parquet: no column 'text' \(its columns: 'content', 'url'\); .*--jsonl-field"
    ):
        list(text_documents(str(tmp_path / "c.parquet")))
    _parquet(tmp_path / "n.parquet", {"text": ["a", "b", None]})
    with pytest.raises(DataError, match=r"n\.parquet: row 3: field 'text' is not a string but null"):
        list(text_documents(str(tmp_path / "n.parquet")))


@pytest.mark.parametrize(
    ("name", "data", "said"),
    [
        ("c.jsonl.gz", b"not gzip at all", "not valid gzip data"),
        ("c.jsonl.gz", gzip.compress(LINES)[:-12], "not valid gzip data"),  # cut short
        ("c.txt.bz2", b"BZh9 garbage", "not valid bzip2 data"),
        ("c.jsonl.xz", b"\xfd7zXZ\x00garbage", "not valid xz data"),
        ("c.parquet", b"PAR1 not really PAR1", "not a Parquet file pyarrow reads"),
    ],
)
def test_a_file_its_name_misdescribes_is_named(tmp_path, name, data, said):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / name))}: {said}"):
        list(text_documents(str(tmp_path / name)))


def test_a_missing_package_is_named_with_what_to_install(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "c.jsonl.zst").write_bytes(b"(\xb5/\xfd")
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    real = builtins.__import__

    def without(name, *args, **kwargs):
        if name.split(".")[0] in ("zstandard", "pyarrow", "compression"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(DataError, match=r"c\.jsonl\.zst: zstd-compressed; reading it needs the zstandard package"):
        list(text_documents(str(tmp_path / "c.jsonl.zst")))
    with pytest.raises(DataError, match=r"c\.parquet: a Parquet file; reading it needs pyarrow"):
        list(text_documents(str(tmp_path / "c.parquet")))


def test_a_compressed_json_file_is_json_lines_as_c4_and_dolma_ship_them(tmp_path):
    """C4's, Dolma's and RedPajama's shards are .json.gz files of one JSON object a line: read so. One JSON document
    compressed is named with what was expected; a plain .json stays refused (one document, as a config)."""
    (tmp_path / "shard.json.gz").write_bytes(gzip.compress(LINES))
    assert list(text_documents(str(tmp_path / "shard.json.gz"))) == DOCS
    (tmp_path / "one.json.gz").write_bytes(gzip.compress(json.dumps({"docs": DOCS}, indent=1).encode()))
    with pytest.raises(DataError, match=r"one\.json\.gz:1: not a JSON object .*read as JSON Lines \(one object a line"):
        list(text_documents(str(tmp_path / "one.json.gz")))
    (tmp_path / "plain.json").write_bytes(LINES)
    with pytest.raises(DataError, match=r"plain\.json: a \.json file; .* name it \.jsonl"):
        list(text_documents(str(tmp_path / "plain.json")))


@pytest.mark.parametrize(("name", "pack"), [("c.txt", lambda b: b), ("c.txt.gz", gzip.compress)])
def test_a_text_files_line_ends_read_as_pythons_text_files_read_them(tmp_path, name, pack):
    """\\r\\n and \\r are \\n, a byte-order mark is no text, compressed or not (reading the bytes to decompress them
    had kept \\r\\n)."""
    (tmp_path / name).write_bytes(pack(b"\xef\xbb\xbfa\r\nb\rc\n"))
    assert list(text_documents(str(tmp_path / name))) == ["a\nb\nc\n"]
