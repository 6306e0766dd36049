"""The files a corpus's documents come in: text, JSON Lines or Parquet, the first two also compressed.

A file's name says what it holds (:func:`file_kind`): ``.txt`` one document, ``.jsonl`` / ``.ndjson`` one document
per line (a JSON object), ``.parquet`` one per row (a column of strings, or of lists of messages), and a last
``.gz``, ``.bz2``, ``.xz`` or ``.zst`` after ``.txt`` or ``.jsonl`` the compression it is read through
(``corpus.jsonl.zst``, as DCLM ships its shards; FineWeb ships Parquet). A compressed ``.json`` is JSON Lines too:
C4's, Dolma's and RedPajama's shards are ``.json.gz`` files of one object a line (a plain ``.json`` is refused: one
JSON document, as a config is, is what that name usually holds). Decompression streams: a file is never
held whole decompressed (a ``.txt`` is one document, held anyway).

gzip, bzip2 and xz are Python's own; zstd is Python 3.14's ``compression.zstd`` or the ``zstandard`` package, and
Parquet needs ``pyarrow`` (``pip install "hybridlm[data]"``): a file that needs a missing one is refused by name,
with the package to install.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import DataError

#: Extensions of JSON Lines files (a JSON object per line; NDJSON is the same format).
JSON_LINES = (".jsonl", ".ndjson")
#: Compression extensions read through their codec, after ``.txt`` or a JSON Lines extension.
CODECS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
#: Rows of a Parquet file read at a time: memory stays bounded however large its row groups.
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class FileKind:
    """What a corpus file holds, by its name.

    Attributes:
        kind: ``"text"`` (one document), ``"lines"`` (JSON Lines: one per line) or ``"parquet"`` (one per row).
        codec: the compression it is read through (``"gzip"``, ``"bzip2"``, ``"xz"``, ``"zstd"``), or None.
    """

    kind: str
    codec: str | None = None


def file_kind(path: Path) -> FileKind | None:
    """The kind of ``path`` by its extensions, in any case; None for a name no corpus file has."""
    suffix = path.suffix.lower()
    codec = CODECS.get(suffix)
    inner = Path(path.stem).suffix.lower() if codec else suffix
    if inner == ".txt":
        return FileKind("text", codec)
    if inner in JSON_LINES or (inner == ".json" and codec):
        return FileKind("lines", codec)
    if inner == ".parquet" and not codec:  # (Parquet compresses inside the file)
        return FileKind("parquet")
    return None


def _zstd_open(path: Path) -> BinaryIO:
    try:
        from compression import zstd  # Python 3.14+

        return zstd.open(path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise DataError(
            f"{path}: zstd-compressed; reading it needs the zstandard package (pip install zstandard, or "
            '"hybridlm[data]"), or decompress it first (zstd -d)'
        ) from None
    raw = open(path, "rb")  # noqa: SIM115 (the reader closes it: closefd)
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return io.BufferedReader(reader)  # lines and iteration, which the raw reader lacks


_OPENERS = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open, "zstd": _zstd_open}


def _codec_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError]
    try:
        from compression import zstd

        errors.append(zstd.ZstdError)
    except ImportError:
        pass
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


@contextmanager
def opened(path: Path, codec: str | None) -> Iterator[BinaryIO]:
    """``path`` opened for reading bytes, decompressed through ``codec``. Data the codec cannot decode (a file
    named ``.gz`` that is not gzip, one cut short) is a DataError naming the file; an error of the disk is raised
    as it is."""
    errors = _codec_errors()
    try:
        with _OPENERS[codec](path) if codec else open(path, "rb") as f:
            yield f
    except errors as e:
        raise DataError(f"{path}: not valid {codec} data ({e or type(e).__name__})") from None
    except OSError as e:
        if codec and e.errno is None:  # bzip2's "Invalid data stream" is a bare OSError; a disk's has an errno
            raise DataError(f"{path}: not valid {codec} data ({e})") from None
        raise


def parquet_values(path: Path, column: str) -> Iterator[tuple[int, object]]:
    """(row number from 1, value as Python) of ``column`` in the Parquet file ``path``, a batch of rows at a time.

    Raises DataError where pyarrow is missing, the file is no Parquet file, or has no such column (its columns
    named)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f'{path}: a Parquet file; reading it needs pyarrow (pip install pyarrow, or "hybridlm[data]"), or write '
            'its text as JSON Lines first (one {"text": ...} object a line)'
        ) from None
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{path}: not a Parquet file pyarrow reads ({e})") from None
    names = table.schema_arrow.names
    if column not in names:
        shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
        raise DataError(
            f"{path}: no column {column!r} (its columns: {shown or 'none'}); name the text's column with "
            "--jsonl-field (data.jsonl_field)"
        )
    row = 0
    try:
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield row, value
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:  # a damaged row group
        raise DataError(f"{path}: row {row + 1} and on cannot be read ({e})") from None
