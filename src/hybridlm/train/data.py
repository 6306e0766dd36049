"""Corpora as token streams, packed into fixed-length rows that keep their document boundaries.

Documents are tokenized, each followed by the end-of-document token, and concatenated. Row ``r``
is the slice ``[r*L, r*L + L + 1)`` of that stream: inputs are its first L tokens, labels its last
L. Every position carries the index of its document; a label whose token belongs to another
document than its input is ignored (-100), and the model is given the document ids so that no
mixer carries information across a boundary.

Sources: ``builtin:pydoc`` (the English text of Python's own help topics, in every CPython, no
download), a ``.txt`` file (one document), a ``.jsonl`` file (one per record), a ``.parquet`` file (one per row),
the first two also compressed (``.jsonl.gz``, ``.zst``, ...: :mod:`~hybridlm.train.formats`), a folder of such
files, or a folder written by ``hybridlm prepare`` (tokens in a numpy memmap). A blend of several sources is
sampled by :class:`Blend` (where each position of the row stream comes from) and read by :class:`BlendedRows`.

A prepared corpus of conversations (JSON Lines records holding a list of messages, :mod:`~hybridlm.train.chats`) also
holds a mask of the tokens to learn, the assistant's turns: the label of every other token is ignored too.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import is_special_file
from ..errors import DataError
from .chats import ChatDocument, ChatFormat, chat_pieces
from .formats import FileKind, file_kind, opened, parquet_values

PREPARED_META = "meta.json"
PREPARED_FORMAT = "hybridlm-tokens"
#: The newest meta.json "version" this hybridlm reads: 2 where the corpus has a mask of the tokens to learn (so that
#: an older hybridlm refuses it rather than learn every token), else 1.
PREPARED_VERSION = 2
PREPARED_TOKENS = "tokens.bin"
PREPARED_DOCS = "docs.npy"
PREPARED_MASK = "mask.bin"  #: uint8 per token: 1 where it is learned as a label (version 2, "loss_mask")
PREPARED_FILES = (PREPARED_TOKENS, PREPARED_DOCS)


@dataclass
class TokenStream:
    """Documents as one token array plus offsets.

    Attributes:
        tokens: (N,) token ids, every document ending with the end-of-document token.
        doc_starts: (D + 1,) offset of each document in the stream, then the stream's length.
        doc_offsets: (D,) where each document starts in ``tokens``, for a selection of another stream's
            documents (:meth:`select`) that shares its token array (a memmap stays one); None: the stream is
            ``tokens`` itself.
        mask: (N,) beside ``tokens``: nonzero where a token is learned as a label (a conversation's assistant
            turns); None: every token is.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    doc_offsets: np.ndarray | None = None
    mask: np.ndarray | None = None

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_starts[-1])

    def fingerprint(self, block: int = 4096, blocks: int = 1024) -> str:
        """A hash of the token ids: all of them up to ``block * blocks``, else ``blocks`` evenly spaced runs of
        ``block`` (a few reads, whatever the corpus's size). It tells a corpus edited in place at the same
        counts from the one a checkpoint recorded (an edit inside no sampled run of a large corpus passes).
        A selection (:meth:`select`) hashes its own documents' ids, in its order."""
        n = self.num_tokens
        starts = [0] if n <= block * blocks else np.linspace(0, n - block, blocks).astype(np.int64)
        size = n if n <= block * blocks else block
        h = hashlib.blake2b(digest_size=16)
        # The ids as int64 (the same ids hash alike whatever array type holds them), then the mask where there is one
        # (a stream without one hashes as it always did).
        arrays = [(self.tokens, np.int64)] + ([(self.mask, np.uint8)] if self.mask is not None else [])
        for s in starts:
            for values, dtype in arrays:
                run = (
                    values[s : s + size]
                    if self.doc_offsets is None
                    else self.take(np.arange(s, s + size), values=values)
                )
                h.update(np.asarray(run, dtype=dtype).tobytes())
        return h.hexdigest()

    def take(self, pos: np.ndarray, doc: np.ndarray | None = None, values: np.ndarray | None = None) -> np.ndarray:
        """The token ids at stream positions ``pos`` (any shape); ``doc``: the document of each, where known.
        ``values``: an array beside ``tokens`` (the ``mask``) read at those positions instead."""
        values = self.tokens if values is None else values
        if self.doc_offsets is None:
            return values[pos]
        if doc is None:
            doc = np.searchsorted(self.doc_starts, pos, side="right") - 1
        return values[self.doc_offsets[doc] + (pos - self.doc_starts[doc])]

    def select(self, docs: np.ndarray) -> TokenStream:
        """A stream of the given documents, in the given order, over the same token array (nothing copied)."""
        docs = np.asarray(docs, dtype=np.int64)
        offsets = self.doc_starts[:-1] if self.doc_offsets is None else self.doc_offsets
        lengths = np.diff(self.doc_starts)[docs]
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return TokenStream(self.tokens, starts, offsets[docs], self.mask)


# -- reading documents ---------------------------------------------------------------------------


def builtin_documents(name: str, key: str = "data.source") -> list[str]:
    if name == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    raise DataError(f"{key}: unknown built-in corpus 'builtin:{name}' (known: builtin:pydoc)")


def _text_files(folder: Path) -> list[Path]:
    """The text files under ``folder`` (``.txt``, compressed too), then its record files (JSON Lines, compressed too,
    and Parquet), each sorted; extensions in any case (:func:`~hybridlm.train.formats.file_kind`). Hidden
    files and folders are left out: editors' and tools' copies (``.ipynb_checkpoints/``, macOS's ``._x.txt``)
    would add documents twice or fail to decode.

    Linked folders are read as linked files are (``rglob`` read the files and silently left out the folders: a
    corpus of linked shards lost them), each real folder once (a link back up would loop); a folder that cannot
    be listed, a link to nothing, or a pipe, socket or device named like a document is refused by name (``rglob``
    left them out silently too)."""

    def refuse(e: OSError) -> None:
        raise DataError(f"{e.filename}: cannot read this folder of the corpus ({e.strerror})")

    found, seen = [], set()
    for root, dirs, files in os.walk(folder, onerror=refuse, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # (a second link to a folder already read, or a link to one of its parents)
            dirs[:] = []
            continue
        seen.add(real)
        # Sorted: which link reads a folder is the same each time. The lost+found of a disk's root (the corpus's, or a
        # linked shard's) is the file system's, which others may not list: never documents, and not refused. The
        # real path is asked: ismount() is False for a link, even one to a disk's root.
        mount = os.path.ismount(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (d == "lost+found" and mount))
        for name in files:
            path = Path(root, name)
            if name.startswith("."):
                continue
            # Whatever its name: a link to a folder of shards on a disk not mounted is listed here, among the files.
            if path.is_symlink() and not path.exists():
                raise DataError(f"{path}: a link to {os.readlink(path)}, which does not exist")
            if file_kind(path) is None or path.is_dir():  # (a folder named x.txt is walked)
                continue
            if is_special_file(path):  # refused as data.source itself is: passed over, a document went missing unsaid
                raise DataError(
                    f"{path}: named like a document of the corpus, but not a regular file (a pipe, socket or device, "
                    "whose read would wait or never end); move it out of the folder or rename it"
                )
            found.append(path)
    found.sort()
    text = [p for p in found if file_kind(p).kind == "text"]
    return text + [p for p in found if file_kind(p).kind != "text"]


def source_path(source: str) -> Path:
    """The path a ``data.source`` or ``data.tokenizer`` setting names, a leading ``~`` expanded: a run file's
    string reaches no shell that would expand it (``~nobody/x``, no such user, stays as it is)."""
    return Path(os.path.expanduser(source))


def text_documents(source: str, jsonl_field: str = "text", key: str = "data.source") -> Iterator[str]:
    """Documents of a .txt, .jsonl or .parquet file (the first two also compressed: ``formats.file_kind``), or a
    folder of them. A source that does not exist or holds no text is refused here, before any document is read
    (errors name it as ``key``)."""
    path = source_path(source)
    _refuse_megatron_dataset(path, source, key)
    if not path.exists():
        raise DataError(f"{key}: {source} does not exist")
    if is_special_file(path):
        raise DataError(f"{key}: {source}: not a regular file")
    if not path.is_dir() and path.name in PREPARED_FILES and is_prepared(path.parent):  # its ids, read as text
        raise DataError(f"{key}: {source} is a file of the prepared corpus {path.parent}; name the folder")
    files = _text_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{key}: no .txt or .jsonl files under {source} (hidden ones are left out)")
    if path.suffix.lower() == ".json" and not path.is_dir():
        raise DataError(
            f"{path}: a .json file; training reads .txt (text) or .jsonl (a JSON object per line): if it holds "
            "one object a line, name it .jsonl"
        )
    return _file_documents(files, jsonl_field)


def _refuse_megatron_dataset(path: Path, source: str, key: str) -> None:
    """Refuse Megatron-LM's indexed dataset: named by its prefix (as Megatron's --data-path does) it "does not
    exist", and its ``.bin`` of token ids was read as text ("not UTF-8")."""
    prefix = path.with_suffix("") if path.suffix.lower() in (".bin", ".idx") else path
    if (
        not path.is_dir()
        and prefix.with_name(prefix.name + ".bin").is_file()
        and prefix.with_name(prefix.name + ".idx").is_file()
    ):
        raise DataError(
            f"{key}: {source} is a Megatron-LM indexed dataset ({prefix.name}.bin / .idx), which hybridlm does not "
            "read: tokenize its text with hybridlm prepare SOURCE OUT (a .txt or .jsonl source) and train on OUT"
        )


#: How files that are no UTF-8 text begin (and, for Parquet, end), what each is and what to do instead. Named as the
#: source (``corpus.jsonl.gz``; PowerShell 5's ``>`` writes UTF-16), one was refused as "not UTF-8 (byte 0x8b at
#: column 2)", as if its text held one bad byte.
_COMPRESSED = (  # how each compressed format begins, its extension here and its tool
    (rb"\x1f\x8b", "gzip", ".gz", "gunzip -k"),
    (rb"\(\xb5/\xfd", "zstd", ".zst", "zstd -d"),
    (rb"\xfd7zXZ\x00", "xz", ".xz", "xz -dk"),
    (rb"BZh[1-9]1AY&SY", "bzip2", ".bz2", "bunzip2 -k"),
)
_NOT_TEXT = (
    *(
        (
            head,
            b"",
            f"{name}-compressed",
            f"name it .txt{ext} or .jsonl{ext} (what it holds, then {ext}) to read it so, or decompress it first ({tool})",
        )
        for head, name, ext, tool in _COMPRESSED
    ),
    (rb"PK\x03\x04", b"", "a zip archive", "extract it first (unzip)"),
    (rb"PAR1", b"PAR1", "a Parquet file", "name it .parquet to read it so, or write its text as JSON Lines first"),
    (rb"\xff\xfe|\xfe\xff", b"", "UTF-16 text", "convert it to UTF-8 first (iconv -f UTF-16 -t UTF-8)"),
)


def _refuse_not_text(file: Path) -> None:
    """Refuse (DataError) ``file``, which does not decode as UTF-8, where it is no UTF-8 text at all (a compressed
    file, an archive, UTF-16), saying what to do instead; text with a bad byte is for its line and column to name.
    (Of a compressed file, what decompression gave: a .gz of a zip is a zip.)"""
    codec = (file_kind(file) or FileKind("text")).codec
    with opened(file, codec) as f:
        head, tail = f.read(16), b""
        if not codec:  # (seeking to a compressed file's end would decompress it whole)
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4))
            tail = f.read()
    for start, end, what, fix in _NOT_TEXT:
        if re.match(start, head) and tail.endswith(end):
            raise DataError(f"{file}: {what}, not UTF-8 text; {fix}, then name the .txt or .jsonl files")


def _file_documents(files: list[Path], jsonl_field: str) -> Iterator[str | ChatDocument]:
    for file in files:
        kind = file_kind(file) or FileKind("text")  # a source file of another name: its text
        if kind.kind == "lines":
            yield from _jsonl_documents(file, jsonl_field, kind.codec)
        elif kind.kind == "parquet":
            for row, value in parquet_values(file, jsonl_field):
                yield _record_document(value, jsonl_field, f"{file}: row {row}")
        else:
            with opened(file, kind.codec) as f:
                raw = f.read()
            try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not text
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:  # name the line: one line at a time finds it
                _refuse_not_text(file)
                for line_no, line in enumerate(raw.removeprefix(codecs.BOM_UTF8).splitlines(), start=1):
                    decode_line(line, f"{file}:{line_no}")  # (as the JSON Lines reader counts)
                raise DataError(f"{file}: not UTF-8 text ({e})") from None
            yield text.replace("\r\n", "\n").replace("\r", "\n")  # line ends as Python's text files read them


def decode_line(raw: bytes, where: str) -> str:
    """One line of a text file as UTF-8; DataError at ``where`` (``file:line``) naming the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None


def _holds(record: object) -> str:
    """What a JSON Lines record holds, in JSON's words and short: a record keyed by its documents would
    repeat them whole in the message."""
    if not isinstance(record, dict):
        return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(record), "a number")
    names = [repr(k if len(k) <= 40 else k[:40] + "...") for k in list(record)[:8]]
    return "its fields: " + (", ".join(names) + (", ..." if len(record) > 8 else "") if names else "none")


def _jsonl_documents(file: Path, field: str, codec: str | None = None) -> Iterator[str | ChatDocument]:
    """The ``field`` strings of a JSON Lines file (decompressed through ``codec``), or conversations where the field
    holds a list (of messages); errors name the file and line."""
    with opened(file, codec) as f:
        lines = (piece for chunk in f for piece in chunk.splitlines())  # \n, \r\n and \r end a line
        for line_no, raw in enumerate(lines, start=1):
            where = f"{file}:{line_no}"
            try:
                line = decode_line(raw.removeprefix(codecs.BOM_UTF8) if line_no == 1 else raw, where)
            except DataError:
                _refuse_not_text(file)  # (a compressed file named .jsonl, or UTF-16)
                raise
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:  # (nesting beyond json's)
                raise DataError(f"{where}: not a JSON object ({e}){_json_lines_hint(file)}") from None
            if not isinstance(record, dict) or field not in record:
                chat = isinstance(record, dict) and isinstance(record.get("messages"), list)
                hint = "; a conversation: --jsonl-field messages (data.jsonl_field)" if chat else ""
                hint = hint or _json_lines_hint(file)
                raise DataError(f"{where}: not a JSON object with a {field!r} field ({_holds(record)}){hint}")
            yield _record_document(record[field], field, where)


def _json_lines_hint(file: Path) -> str:
    """What to say of a compressed ``.json`` whose line is no record: it is read as JSON Lines, by convention."""
    kind = file_kind(file)
    if kind and kind.codec and Path(file.stem).suffix.lower() == ".json":
        return "; a compressed .json is read as JSON Lines (one object a line, as C4's and Dolma's shards), not one document"
    return ""


def _record_document(text: object, field: str, where: str) -> str | ChatDocument:
    """A record's ``field`` (a JSON Lines record's, a Parquet row's column) as a document: a string, or a
    conversation where it is a list (of messages); DataError at ``where`` for anything else."""
    if isinstance(text, list):  # (checked when it is written out, by the chat format's rules)
        return ChatDocument(text, where)
    if not isinstance(text, str):  # said what it holds: a null (a record without text) asks another fix
        held = "an object" if isinstance(text, dict) else _holds(text)
        raise DataError(f"{where}: field {field!r} is not a string but {held}")
    try:
        text.encode("utf-8")  # JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer takes
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {field!r} holds an unpaired surrogate escape ({e.reason})") from None
    return text


#: A batch of documents is tokenized in one call when it reaches this many documents or characters, whichever comes
#: first: enough for a tokenizer.json's threads to share, small enough to hold (a tokenizer.json's encodings of a
#: batch of 2^20 characters, each token's id, string and masks, peaked ~50 MiB above the byte tokenizer's batch).
BATCH_DOCS = 4096
BATCH_CHARS = 1 << 20


def token_dtype(tokenizer) -> np.dtype:
    """The smallest unsigned type holding ``tokenizer``'s ids: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)


def token_batches(
    docs: Iterable[str | ChatDocument],
    tokenizer,
    progress: bool = False,
    where: str = "the corpus",
    chats: ChatFormat | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Tokenize ``docs`` a batch at a time (:data:`BATCH_DOCS` documents or :data:`BATCH_CHARS` characters), each
    document followed by the end-of-document token; ``where`` names them in errors. A document that cannot be read
    is named by ``docs`` when it is reached (a bad JSON Lines record by its line), whichever batch it falls in. The
    bar (``progress``) counts the documents tokenized, a batch at a time. ``chats``: how conversations are written
    out (:mod:`~hybridlm.train.chats`; None: a conversation is refused, as training reads text only once prepared).

    Yields:
        tokens: (N,) the batch's ids (:func:`token_dtype`), documents in order.
        lengths: (D,) int64, each document's token count, its end-of-document token included.
        mask: (N,) uint8, 1 where a token is learned (a text's every token; a conversation's assistant turns); None
            where ``chats`` is None.
    """
    dtype, bar, tokenized = token_dtype(tokenizer), None, False
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="tokenizing", unit="doc")
    try:
        for batch in _batched(docs):
            yield _encode(batch, tokenizer, dtype, chats)
            tokenized = True
            if bar is not None:
                bar.update(len(batch))
        if not tokenized:
            raise DataError(f"{where} has no documents")
    finally:
        if bar is not None:
            bar.close()


def _batched(docs: Iterable[str | ChatDocument]) -> Iterator[list[str | ChatDocument]]:
    """``docs`` in lists of :data:`BATCH_DOCS` documents, or fewer reaching :data:`BATCH_CHARS` characters (a
    conversation counted as one character a message)."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc) if isinstance(doc, str) else len(doc.messages) if isinstance(doc.messages, list) else 1
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _chat_pieces(doc: ChatDocument, chats: ChatFormat | None) -> list[tuple[str, bool]]:
    """:func:`~hybridlm.train.chats.chat_pieces` of ``doc``; DataError where ``chats`` is None (training reads text:
    a conversation is read once prepared)."""
    if chats is None:
        raise DataError(
            f"{doc.where}: a conversation (a list of messages), which training reads once hybridlm prepare has written "
            "it out with a chat template and marked the assistant's turns as the tokens to learn: hybridlm prepare "
            "SOURCE OUT --jsonl-field FIELD --tokenizer TOKENIZER, then train on OUT"
        )
    return chat_pieces(doc, chats)


def _encode(
    docs: list[str | ChatDocument], tokenizer, dtype: np.dtype, chats: ChatFormat | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``docs`` tokenized as one batch: (tokens (N,), lengths (D,), mask (N,) or None), as :func:`token_batches`
    yields them. A conversation is tokenized whole, as its prompt is at generation, and a token is learned where it
    starts inside an answer (its character offset); its end-of-document token is not (its turn ended)."""
    texts, spans = [], {}
    for i, doc in enumerate(docs):
        if isinstance(doc, str):
            texts.append(doc)
            continue
        pieces, at, spans[i] = _chat_pieces(doc, chats), 0, []
        for text, learned in pieces:
            if learned:
                spans[i].append((at, at + len(text)))
            at += len(text)
        texts.append("".join(text for text, _ in pieces))
    plain = [t for i, t in enumerate(texts) if i not in spans]
    if hasattr(tokenizer, "encode_batch"):
        plain_ids = iter(tokenizer.encode_batch(plain))
    else:  # (a tokenizer object of one's own that has only encode)
        plain_ids = iter([np.asarray(tokenizer.encode(text), dtype=np.int64) for text in plain])
    chat_ids = iter(tokenizer.encode_offsets([texts[i] for i in spans]) if spans else [])
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts, learned, lengths = [], [], []
    for i in range(len(docs)):
        if i in spans:
            ids, starts = next(chat_ids)
            mask = np.zeros(len(ids) + 1, dtype=np.uint8)  # (the end of document: 0)
            for lo, hi in spans[i]:
                mask[:-1][(starts >= lo) & (starts < hi)] = 1
        else:
            ids = next(plain_ids)
            mask = np.ones(len(ids) + 1, dtype=np.uint8) if chats is not None else None  # (a text: learned whole)
        # Cast per document: ids were checked below the vocabulary, so each fits dtype (numpy refuses int64 -> uint16
        # as a "same kind" cast).
        parts += [ids.astype(dtype, copy=False), eos]
        learned.append(mask)
        lengths.append(len(ids) + 1)
    tokens = np.concatenate(parts)
    return tokens, np.array(lengths, dtype=np.int64), np.concatenate(learned) if chats is not None else None


def tokenize_documents(
    docs: Iterable[str | ChatDocument],
    tokenizer,
    progress: bool = False,
    where: str = "the corpus",
    chats: ChatFormat | None = None,
) -> TokenStream:
    """Tokenize ``docs`` (see :func:`token_batches`) into one stream held in memory (with a mask where ``chats`` is
    given and some token is not learned)."""
    chunks, lengths, masks = [], [], []
    for tokens, sizes, mask in token_batches(docs, tokenizer, progress, where, chats):
        chunks.append(tokens)
        lengths.append(sizes)
        masks.append(mask)
    starts = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    mask = None if chats is None else np.concatenate(masks)
    return TokenStream(np.concatenate(chunks), starts, mask=None if mask is None or mask.all() else mask)


# -- prepared corpora (hybridlm prepare) ------------------------------------------------------------


def write_prepared(stream: TokenStream, out: str | Path, tokenizer, source: str) -> Path:
    """Write ``stream`` as ``tokens.bin`` (raw little-endian array), ``docs.npy``, ``meta.json`` and the tokenizer's
    files into a fresh folder that then takes ``out``'s place in one step (as a checkpoint is written): an existing
    ``out`` is replaced only if empty or a prepared corpus whose files are all this kind's (a run reading the old
    one keeps its open files; a tokenizer of an earlier prepare does not stay behind)."""
    return _commit_prepared(_one_batch(stream), out, tokenizer, source)[0]


def _one_batch(stream: TokenStream) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """``stream`` as one batch of :func:`token_batches`' form: its tokens in order (a selection's gathered), its
    documents' lengths, and its mask (None: none)."""
    pos = np.arange(stream.num_tokens)
    tokens = stream.tokens if stream.doc_offsets is None else stream.take(pos)
    mask = None if stream.mask is None else stream.take(pos, values=stream.mask)
    return [(tokens, np.diff(stream.doc_starts), mask)]


def prepare_corpus(
    source: str,
    out: str | Path,
    tokenizer,
    jsonl_field: str = "text",
    progress: bool = False,
    key: str = "data.source",
    tokenizer_keys: tuple[str, str] = ("data.tokenizer", "data.eos_token"),
    chats: ChatFormat | None = None,
) -> tuple[Path, dict]:
    """``hybridlm prepare``: tokenize ``source`` (as :func:`load_corpus` reads it) into the prepared corpus ``out``
    (as :func:`write_prepared` writes it) in bounded memory: each batch of documents (:func:`token_batches`) is
    appended to ``tokens.bin`` as it is tokenized, and only the documents' offsets are kept until the end. Returns
    the folder and its meta.json (its ``num_tokens`` and ``num_docs``, and ``learned_tokens`` where not every token
    is learned). ``chats``: how its conversations are written out (None: a conversation is refused)."""
    docs = corpus_documents(source, jsonl_field, key)
    if docs is None:  # a prepared corpus, written again (with its tokenizer checked): its memmap is read in one pass
        stream = load_corpus(source, tokenizer, jsonl_field, progress, key, tokenizer_keys)
        return _commit_prepared(_one_batch(stream), out, tokenizer, source)
    batches = token_batches(docs, tokenizer, progress, _corpus_name(source, key), chats)
    return _commit_prepared(batches, out, tokenizer, source)


def _commit_prepared(
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]], out: str | Path, tokenizer, source: str
) -> tuple[Path, dict]:
    """Write ``batches`` (as :func:`token_batches` yields them) into a fresh hidden folder beside ``out``, then put
    it in ``out``'s place; removed instead on any error or interruption, so nothing half-written is left."""
    from ..checkpoint.io import commit_directory, hidden

    out = prepared_destination(out, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden(out, "tmp")
    tmp.mkdir()
    try:
        meta = _write_prepared(batches, tmp, tokenizer, source)
        return commit_directory(tmp, out, lambda: prepared_destination(out, source)), meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepared_destination(out: str | Path, source: str) -> Path:
    """Where :func:`write_prepared` writes ``out`` (resolved), after refusing (CheckpointError) a folder it may not
    replace: call it before tokenizing, so that a refusal comes before the work."""
    from ..checkpoint.io import check_replaceable, destination, refuse_losing
    from .tokenizer import SPEC_NAME

    out = destination(out, source_path(source) if source_path(source).exists() else None)
    check_replaceable(out, "format", PREPARED_FORMAT, "a prepared corpus", PREPARED_META)
    if out.is_dir():
        refuse_losing(out, {PREPARED_META, *PREPARED_FILES, PREPARED_MASK, SPEC_NAME, "tokenizer.json"})
    return out


def _write_prepared(
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]], out: Path, tokenizer, source: str
) -> dict:
    """Write the prepared corpus's files into folder ``out``: each batch's tokens appended to ``tokens.bin`` as it
    comes (and its mask to ``mask.bin``), then the offsets, the tokenizer's files and ``meta.json`` (returned). A
    mask that learns every token is not kept: the corpus is then one of version 1, which any hybridlm reads."""
    from ..checkpoint.io import written  # a refused write (disk full) names its file

    dtype, lengths, learned = token_dtype(tokenizer), [], None
    # Unbuffered: numpy's tofile writes each batch through the file's descriptor, and closing has nothing to flush
    # (a full disk is named by the batch's write, not lost at close).
    with open(out / PREPARED_TOKENS, "wb", buffering=0) as f, open(out / PREPARED_MASK, "wb", buffering=0) as m:
        for tokens, sizes, mask in batches:
            dtype = tokens.dtype
            written(out / PREPARED_TOKENS, tokens.astype(dtype.newbyteorder("<"), copy=False).tofile, f)
            if mask is not None:
                written(out / PREPARED_MASK, np.asarray(mask, dtype=np.uint8).tofile, m)
                learned = (learned or 0) + int(np.count_nonzero(mask))
            lengths.append(sizes)
    starts = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    if learned is None or learned == starts[-1]:
        (out / PREPARED_MASK).unlink()
        learned = None
    written(out / PREPARED_DOCS, np.save, out / PREPARED_DOCS, starts)
    for name, content in tokenizer.files().items():
        written(out / name, (out / name).write_bytes, content if isinstance(content, bytes) else content.encode())
    meta = {
        "format": PREPARED_FORMAT,
        "version": 1 if learned is None else 2,
        "dtype": str(dtype),
        "num_tokens": int(starts[-1]),
        "num_docs": len(starts) - 1,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "source": source,
        **({} if learned is None else {"loss_mask": True, "learned_tokens": learned}),
    }
    (out / PREPARED_META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_prepared(path: str | Path) -> tuple[TokenStream, dict]:
    path = Path(path)
    reading = PREPARED_META  # the file being read, which an error names (the readers' own words do not)
    try:
        for reading in (*PREPARED_FILES, PREPARED_MASK, PREPARED_META):  # a FIFO's read would block forever
            if (path / reading).exists() and not (path / reading).is_file():
                raise ValueError("not a regular file")
        meta = json.loads((path / PREPARED_META).read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{PREPARED_META} holds a {type(meta).__name__}, not an object")
        if meta.get("format") != PREPARED_FORMAT:  # (every prepare wrote it, and its version)
            raise ValueError(f"{PREPARED_META}: format must be {PREPARED_FORMAT!r}, got {meta.get('format')!r}")
        version = meta.get("version")
        if type(version) is not int or version < 1:
            raise ValueError(f"{PREPARED_META}: version must be a positive integer, got {version!r}")
        if version > PREPARED_VERSION:  # another layout: read as this one, its ids would be wrong
            raise ValueError(
                f"{PREPARED_META}: version {version} is newer than this hybridlm reads ({PREPARED_VERSION})"
            )
        missing = [k for k in ("dtype", "num_tokens", "vocab_size", "eos_id") if k not in meta]
        if missing:
            raise ValueError(f"{PREPARED_META} has no {', '.join(missing)}")
        for key in ("vocab_size", "eos_id"):  # (num_tokens is compared with the files below)
            if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
                raise ValueError(f"{PREPARED_META}: {key} must be a count, got {meta[key]!r}")
        dtype = np.dtype(meta["dtype"])
        if dtype.kind not in "ui":  # ids: "float16" has uint16's size and would read every id as another
            raise ValueError(f"{PREPARED_META}: dtype must be an integer type, got {meta['dtype']!r}")
        reading = PREPARED_TOKENS
        tokens = np.memmap(path / PREPARED_TOKENS, dtype=dtype.newbyteorder("<"), mode="r")
        reading = PREPARED_DOCS
        try:
            # Mapped, not read: a header claiming 10**12 offsets was allocated (7 TiB) before the file was found short.
            starts = np.load(path / PREPARED_DOCS, mmap_mode="r")
        except EOFError:  # an empty file (a copy cut short)
            raise ValueError("empty") from None
        if not isinstance(starts, np.ndarray):  # a .npz archive under the name
            raise ValueError(f"holds a {type(starts).__name__}, not one array")
        mask = None
        if meta.get("loss_mask") is not None:
            reading = PREPARED_META
            if meta["loss_mask"] is not True or version < 2:
                raise ValueError(f"{PREPARED_META}: loss_mask must be true, in a version 2, got {meta['loss_mask']!r}")
            reading = PREPARED_MASK
            mask = np.memmap(path / PREPARED_MASK, dtype=np.uint8, mode="r")
    except (OSError, ValueError, TypeError, RecursionError, zipfile.BadZipFile) as e:  # (a .npz archive cut short)
        said = str(e) if str(e).startswith(reading) else f"{reading}: {e}"
        raise DataError(f"{path}: not a prepared corpus ({said})") from None
    ordered = starts.ndim == 1 and len(starts) >= 2 and np.issubdtype(starts.dtype, np.integer)
    if not (ordered and starts[0] == 0 and bool(np.all(starts[1:] >= starts[:-1]))):  # (np.diff of uints wraps)
        raise DataError(
            f"{path}: {PREPARED_DOCS} must hold non-decreasing document offsets from 0 to the token count "
            f"(got a {starts.dtype} array of shape {starts.shape})"
        )
    for what, count in ((PREPARED_DOCS, starts[-1]), (PREPARED_META, meta["num_tokens"])):
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count != len(tokens):
            shown = count.item() if isinstance(count, np.generic) else count  # 7, not np.int64(7)
            raise DataError(f"{path}: {PREPARED_TOKENS} holds {len(tokens)} tokens, {what} says {shown!r}")
    if mask is not None and len(mask) != len(tokens):
        raise DataError(f"{path}: {PREPARED_MASK} holds {len(mask)} entries for {len(tokens)} tokens")
    # One pass over the ids (memory-bound): an id past the vocabulary would stop training at the first batch
    # holding it, or pass unseen where no batch does.
    low = int(tokens.min()) if len(tokens) and tokens.dtype.kind == "i" else 0
    high = int(tokens.max()) if len(tokens) else 0
    if low < 0 or high >= meta["vocab_size"]:
        raise DataError(
            f"{path}: {PREPARED_TOKENS} holds ids from {low} to {high}, outside the vocabulary of "
            f"{meta['vocab_size']} that {PREPARED_META} records"
        )
    return TokenStream(tokens, starts.astype(np.int64), mask=mask), meta  # (uint64 + int64 would be float64)


def is_prepared(path: Path) -> bool:
    """Whether :func:`load_corpus` reads folder ``path`` as a prepared corpus. A folder of text may hold a meta.json
    of its own: it is read as prepared only with token files, or without text; token files without text are one
    too, its meta.json lost (a damaged prepared corpus is named as one)."""
    if not path.is_dir():
        return False
    has_meta, has_tokens = (path / PREPARED_META).exists(), any((path / f).exists() for f in PREPARED_FILES)
    return (has_meta and has_tokens) or ((has_meta or has_tokens) and not _text_files(path))


def check_outside_text_folder(folder: Path, source: str) -> None:
    """Refuse (DataError) a run folder ``folder`` inside ``source`` where that is a folder read for its .txt and JSON
    Lines files: the run's metrics.jsonl would be read as documents (a resume failed on its first line)."""
    path = source_path(source)
    if source.startswith("builtin:") or not path.is_dir() or is_prepared(path):
        return
    if folder.resolve().is_relative_to(path.resolve()):
        raise DataError(
            f"{folder}: the run folder is inside data.source {source}, whose .txt and .jsonl files are the corpus: "
            "the run's metrics.jsonl would be read as documents; choose a --run-dir outside it"
        )


def corpus_documents(source: str, jsonl_field: str = "text", key: str = "data.source") -> Iterable[str] | None:
    """The documents of ``source`` (named ``key`` in errors): a built-in corpus or text files; None for a prepared
    folder, whose tokens :func:`load_corpus` reads as they are. A source that cannot be read is refused here."""
    if not source.strip():  # Path("") is the current directory: every .txt under it would be read
        raise DataError(f"{key}: empty; name a .txt or .jsonl file or folder, a prepared folder, or builtin:pydoc")
    if source.startswith("builtin:"):
        return builtin_documents(source.split(":", 1)[1], key)
    if is_prepared(source_path(source)):
        return None
    return text_documents(source, jsonl_field, key)


def _source_key(source: str) -> str:
    """What tells sources apart: a built-in corpus's name, else the real path of the file or folder (a relative path
    read from the current directory, links followed)."""
    return source if source.startswith("builtin:") else os.path.realpath(source_path(source))


def same_source(a: str, b: str) -> bool:
    """Whether sources ``a`` and ``b`` are one: the same built-in corpus, or the same file or folder however its
    path is spelled (``data/a.jsonl``, ``./data/../data/a.jsonl``, an absolute path, a symbolic link to it)."""
    return _source_key(a) == _source_key(b)


def check_distinct_sources(sources: list[str]) -> None:
    """Refuse (DataError) a blend that names one file or folder twice under other spellings (an absolute and a
    relative path, a symbolic link): it would train on that corpus at the sum of their weights, validate it twice
    under two names, and record it twice. (``data.source``'s validation refuses a spelling repeated as text; only
    the filesystem knows these.)"""
    seen: dict[str, int] = {}
    for i, source in enumerate(sources):
        key = _source_key(source)
        if key in seen:
            first = sources[seen[key]]
            raise DataError(
                f"data.source: {source!r} (source {i + 1}) is {first!r} (source {seen[key] + 1}) again, the same "
                f"{'corpus' if source.startswith('builtin:') else 'file or folder'} ({key}): name each source once "
                "and give it the sum of the weights (data.weights)"
            )
        seen[key] = i


def source_labels(sources: list[str]) -> list[str]:
    """Short unique names of a blend's sources, for its metrics (``val_loss/<name>``) and header: a path's file or
    folder name without its extension (a compressed file's two), a built-in corpus's name; where two would be
    alike, each of them gets its place in the list after it (``data-1``, ``data-2``), again until none are alike
    (``data-1.txt`` beside two
    ``data.jsonl``: ``data-1-1``, ``data-2``, ``data-1-3``; two alike labels were one metrics key, and one source's
    loss overwrote the other's). Only letters, digits, ``.``, ``_`` and ``-`` are kept (a ``/`` would nest
    TensorBoard's tags)."""
    labels = []
    for i, source in enumerate(sources):
        if source.startswith("builtin:"):
            name = source.split(":", 1)[1]
        else:
            path = source_path(source)
            kind = file_kind(path)
            name = Path(path.stem).stem if kind and kind.codec else path.stem  # web.jsonl.zst: web, as web.jsonl
        labels.append(re.sub(r"[^A-Za-z0-9._-]", "_", name) or f"source{i + 1}")
    while len(set(labels)) < len(labels):  # (each round lengthens only alike labels, by their distinct places)
        labels = [f"{s}-{i + 1}" if labels.count(s) > 1 else s for i, s in enumerate(labels)]
    return labels


def _corpus_name(source: str, key: str) -> str:
    """How errors about the documents of ``source`` name it (as "... has no documents")."""
    return f"{key}: {source}: the corpus"


def load_corpus(
    source: str,
    tokenizer,
    jsonl_field: str = "text",
    progress: bool = False,
    key: str = "data.source",
    tokenizer_keys: tuple[str, str] = ("data.tokenizer", "data.eos_token"),
) -> TokenStream:
    """The tokens of ``source`` (named ``key`` in errors): a built-in corpus, a prepared folder, or text files.
    ``tokenizer_keys``: the settings of the tokenizer and its end-of-document token, as errors name them."""
    docs = corpus_documents(source, jsonl_field, key)
    if docs is not None:
        return tokenize_documents(docs, tokenizer, progress, _corpus_name(source, key))
    path = source_path(source)
    stream, meta = read_prepared(path)
    again = "prepare its text again with that tokenizer (hybridlm prepare SOURCE OUT --tokenizer ..., --eos-token)"
    if meta["vocab_size"] != tokenizer.vocab_size or meta["eos_id"] != tokenizer.eos_id:
        hint = f", set by {tokenizer_keys[1]}" if meta["vocab_size"] == tokenizer.vocab_size else ""
        raise DataError(
            f"{path}: prepared with a tokenizer of vocab {meta['vocab_size']} (eos {meta['eos_id']}), but "
            f"{tokenizer_keys[0]} has vocab {tokenizer.vocab_size} (eos {tokenizer.eos_id}{hint}); {again}"
        )
    # The folder keeps the tokenizer's files: another one of the same size would map ids to other text.
    for name, content in tokenizer.files().items():
        kept = path / name
        if kept.is_file() and kept.read_bytes() != (content.encode() if isinstance(content, str) else content):
            raise DataError(
                f"{path}: prepared with another tokenizer ({name} differs from {tokenizer_keys[0]}'s); {again}"
            )
    return stream


def split(
    stream: TokenStream, val_fraction: float, seed: int, what: str = "the corpus"
) -> tuple[TokenStream, TokenStream | None]:
    """Hold out whole documents (a seeded choice) for validation; ``what`` names the stream in errors. Each source
    of a blend is split alone, with the same seed: ``split(load_corpus(source), ...)`` is that source's split."""
    if val_fraction <= 0:
        return stream, None
    n = stream.num_docs
    if n < 2:
        raise DataError(f"data.val_fraction: {what} has a single document; nothing to hold out (set it to 0)")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return stream.select(np.sort(order[n_val:])), stream.select(np.sort(order[:n_val]))


# -- packed rows -------------------------------------------------------------------------------------


def row_count(num_tokens: int, seq_len: int) -> int:
    """How many rows of ``seq_len`` inputs a stream of ``num_tokens`` tokens holds (row ``r`` reads tokens
    ``[r*L, r*L + L + 1)``): :class:`PackedRows`'s, which weigh a blend without ``data.weights``."""
    return (num_tokens - 1) // seq_len


class PackedRows:
    """Fixed-length rows cut from a stream, with labels and document ids."""

    def __init__(
        self, stream: TokenStream, seq_len: int, what: str = "the corpus", fix: str = "", key: str = "data.seq_len"
    ) -> None:
        """``what`` names the stream in errors (e.g. "the validation split"), ``fix`` says what else helps, ``key``
        names the row length's setting (``hybridlm eval``'s is ``--seq-len``)."""
        self.stream = stream
        self.seq_len = seq_len
        self.num_rows = row_count(stream.num_tokens, seq_len)
        if stream.num_tokens == stream.num_docs:  # every label crosses into another document: a loss of 0 shown
            raise DataError(
                f"{what} holds only empty documents ({stream.num_docs:,}), no label to learn; add text{fix}"
            )
        if stream.mask is not None and not _learns(stream):
            raise DataError(
                f"{what} learns no token: its {stream.num_docs:,} conversation(s) hold no assistant answer (only the "
                f"assistant's turns are learned); add answers{fix}"
            )
        if self.num_rows < 1:
            raise DataError(
                f"{key}: {what} ({stream.num_tokens} tokens in {stream.num_docs} document(s)) is shorter "
                f"than one row of {seq_len + 1} tokens; shorten {key}{fix}"
            )

    def rows(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``index`` as input_ids, labels and doc_ids, each (len(index), seq_len) int64."""
        return self._cut(np.asarray(index, dtype=np.int64) * self.seq_len, self.seq_len)

    def tail(self) -> dict[str, torch.Tensor] | None:
        """The tokens after the last whole row as one shorter row, (1, T) each with T = (num_tokens - 1) % seq_len,
        so that the rows and the tail hold every token of the stream but the first exactly once as a label (-100
        where it starts a document); None when T = 0. Training never reads it (its rows have one length); a
        whole-corpus evaluation does."""
        length = self.stream.num_tokens - 1 - self.num_rows * self.seq_len
        return self._cut(np.array([self.num_rows * self.seq_len], dtype=np.int64), length) if length else None

    def _cut(self, starts: np.ndarray, length: int) -> dict[str, torch.Tensor]:
        """Rows of ``length`` inputs from stream positions ``starts`` (R,): each reads ``length + 1`` tokens."""
        pos = starts[:, None] + np.arange(length + 1)[None, :]
        docs = np.searchsorted(self.stream.doc_starts, pos, side="right") - 1
        tokens = np.asarray(self.stream.take(pos, docs), dtype=np.int64)
        labels = tokens[:, 1:].copy()
        labels[docs[:, 1:] != docs[:, :-1]] = -100  # the next token starts another document
        if self.stream.mask is not None:  # (a conversation's: only the assistant's turns are learned)
            labels[self.stream.take(pos[:, 1:], docs[:, 1:], self.stream.mask) == 0] = -100
        return {
            "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
            "labels": torch.from_numpy(labels),
            "doc_ids": torch.from_numpy(docs[:, :-1].copy()),
        }


def _learns(stream: TokenStream) -> bool:
    """Whether some label of ``stream`` (a token after the first of its document) is learned by its mask."""
    for start in range(0, stream.num_tokens, 1 << 22):  # (in pieces: positions as int64 are 8 bytes a token)
        pos = np.arange(start, min(start + (1 << 22), stream.num_tokens))
        learned = stream.take(pos, values=stream.mask) != 0
        firsts = stream.doc_starts[(stream.doc_starts >= pos[0]) & (stream.doc_starts <= pos[-1])]
        learned[firsts - start] = False  # (a document's first token is no label: the one before is another's)
        if learned.any():
            return True
    return False


def check_batch_split(batch_size: int, world_size: int) -> None:
    """Refuse (DataError) a batch that the ``world_size`` data-parallel ranks cannot share evenly."""
    if batch_size % world_size:
        raise DataError(
            f"train.batch_size {batch_size} is not divisible by the {world_size} data-parallel ranks "
            "(processes / parallel.pp)"
        )


class Blend:
    """Where each position of a blend's row stream comes from: position ``i`` (0-based, over all steps) is the
    ``k``-th row of source ``d``'s own stream, a pure function of ``i`` and the weights.

    The sources are the leaves of a balanced binary tree (in their order: the first half left). At a node whose
    left side weighs ``p`` of the two, the left side's count of the first ``n`` positions reaching it is
    ``round(n p)`` (Bresenham's line: ``floor(n p + 1/2)``), so the ``i``-th position goes left when
    ``round((i + 1) p)`` passes ``round(i p)``, and goes on as that side's ``round(i p)``-th, or the right side's
    ``i - round(i p)``-th. Each level is off by at most half a row, scaled by the shares below it: the first ``n``
    positions hold within ``depth / 2`` rows of ``w_d n`` of each source, ``depth`` = ceil(log2 D) (two sources:
    the nearest whole number), at every ``n``. So every batch is the mix itself, not a draw from it. A node's
    ``p`` is held as an integer fraction of 2**30 (exact integer arithmetic, the same on every machine), which
    moves a share by at most ``depth`` * 2**-31: a row in ~2 * 10**9 / depth.

    Args:
        weights: (D,) positive finite numbers, normalised here to sum to 1.
    """

    SCALE = 1 << 30  #: a node's left share is an integer over this

    def __init__(self, weights) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"blend weights must be positive finite numbers, got {list(weights)!r}")
        self.weights = w / w.sum()
        self.depth = int(np.ceil(np.log2(len(w)))) if len(w) > 1 else 0
        # (lo, hi) -> (mid, share): the node over sources [lo, hi), its left side [lo, mid) of share / SCALE.
        self._nodes: dict[tuple[int, int], tuple[int, int]] = {}
        self._build(0, len(w))

    def _build(self, lo: int, hi: int) -> None:
        if hi - lo < 2:
            return
        mid = (lo + hi + 1) // 2  # the left half takes the odd source out: [0, 1] | [2] for three
        left, total = self.weights[lo:mid].sum(), self.weights[lo:hi].sum()
        # Clamped into (0, SCALE): each side keeps a share (a weight of 1e-12 still gets its rows, rarely).
        share = min(max(round(left / total * self.SCALE), 1), self.SCALE - 1)
        self._nodes[(lo, hi)] = (mid, share)
        self._build(lo, mid)
        self._build(mid, hi)

    @classmethod
    def _rounded_share(cls, n: np.ndarray, share: int) -> np.ndarray:
        """``floor(n * share / SCALE + 1/2)`` exactly, in int64 for any ``n`` < 2**63 (no product past 2**60)."""
        high, low = np.divmod(n, cls.SCALE)
        return high * share + (low * share + cls.SCALE // 2) // cls.SCALE

    def locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sources and their own stream positions of blend positions ``pos`` (R,) int64: ((R,), (R,)) int64."""
        pos = np.asarray(pos, dtype=np.int64)
        source, k = np.zeros(len(pos), dtype=np.int64), pos.copy()
        todo = [(0, len(self.weights), np.arange(len(pos)))]
        while todo:
            lo, hi, at = todo.pop()
            if hi - lo < 2:
                source[at] = lo
                continue
            mid, share = self._nodes[(lo, hi)]
            before = self._rounded_share(k[at], share)  # left positions among the first k[at] reaching this node
            left = self._rounded_share(k[at] + 1, share) > before
            k[at] = np.where(left, before, k[at] - before)
            todo += [(lo, mid, at[left]), (mid, hi, at[~left])]
        return source, k

    def counts(self, n: int) -> np.ndarray:
        """(D,) int64: how many of the first ``n`` positions each source holds (summing to ``n``)."""
        out = np.zeros(len(self.weights), dtype=np.int64)

        def walk(lo: int, hi: int, m: int) -> None:
            if hi - lo < 2:
                out[lo] = m
                return
            mid, share = self._nodes[(lo, hi)]
            left = int(self._rounded_share(np.array([m], dtype=np.int64), share)[0])
            walk(lo, mid, left)
            walk(mid, hi, m - left)

        walk(0, len(self.weights), n)
        return out


class Sampler:
    """Which rows each step uses: epochs of seeded permutations, sliced per step, process and micro-batch.

    The rows form one stream (epoch after epoch); step ``s`` takes the next ``batch_size`` of them from
    :meth:`position`, a pure function of ``s``, the seed and where a resume placed the stream
    (:meth:`resume_at`), so resuming replays exactly the data order of an uninterrupted run, and a
    batch size changed at a resume continues from the rows consumed.

    A blend (``num_rows`` a list, one count per source) places its stream's positions by :class:`Blend` and gives
    each source its own stream of epochs (a small source repeats sooner): a source ``d``'s rows are numbered after
    those of the sources before it (row ``r`` of ``d`` is ``sum(num_rows[:d]) + r``, as :class:`BlendedRows` reads
    them). One source is the single corpus: the same rows as an int ``num_rows``.

    Args:
        num_rows: the rows of the corpus, or (D,) of each source of a blend.
        weights: (D,) the blend's weights (normalised; None: each source's rows, the mix of the concatenation).
    """

    def __init__(
        self,
        num_rows: int | list[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: list[float] | None = None,
    ) -> None:
        check_batch_split(batch_size, world_size)
        self.sizes = [num_rows] if isinstance(num_rows, (int, np.integer)) else [int(n) for n in num_rows]
        self.num_rows, self.batch_size, self.seed = sum(self.sizes), batch_size, seed
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.blend = Blend(self.sizes if weights is None else weights)
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)
        self._start_step, self._start_row = 0, 0

    def resume_at(self, step: int, rows: int) -> None:
        """Continue the stream at row ``rows`` (the rows consumed before) with step ``step``."""
        self._start_step, self._start_row = step, rows

    def position(self, step: int) -> int:
        """The rows of the stream consumed before step ``step``."""
        return self._start_row + (step - self._start_step) * self.batch_size

    def _permutation(self, epoch: int, source: int = 0) -> np.ndarray:
        """Source ``source``'s row order in its epoch ``epoch``. A lone source's seed is the single corpus's."""
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            key = [self.seed, epoch] if len(self.sizes) == 1 else [self.seed, epoch, source]
            cached = self._perms[source] = (epoch, np.random.default_rng(key).permutation(self.sizes[source]))
        return cached[1]

    def epochs(self, rows: int) -> np.ndarray:
        """(D,) float: how many epochs of each source the first ``rows`` rows of the stream hold."""
        return self.blend.counts(rows) / np.asarray(self.sizes, dtype=np.float64)

    def global_rows(self, step: int) -> np.ndarray:
        """The ``batch_size`` rows of optimizer step ``step`` (0-based), over all processes: (batch_size,) int64."""
        start = self.position(step)
        source, k = self.blend.locate(np.arange(start, start + self.batch_size, dtype=np.int64))
        out = np.empty(self.batch_size, dtype=np.int64)
        for d in np.unique(source):
            at = np.flatnonzero(source == d)
            epoch, j = np.divmod(k[at], self.sizes[d])
            for e in np.unique(epoch):  # (a step spans two epochs of a source at most, unless it is tiny)
                here = epoch == e
                out[at[here]] = self.offsets[d] + self._permutation(int(e), int(d))[j[here]]
        return out

    def local_rows(self, step: int) -> np.ndarray:
        per = self.batch_size // self.world_size
        return self.global_rows(step)[self.rank * per : (self.rank + 1) * per]


class BlendedRows:
    """The packed rows of several sources as one numbering: source ``d``'s row ``r`` is row
    ``sum(num_rows of the sources before d) + r`` (what :class:`Sampler` hands out for a blend).

    Args:
        parts: each source's :class:`PackedRows`, of one ``seq_len``.
    """

    def __init__(self, parts: list[PackedRows]) -> None:
        self.parts = parts
        self.seq_len = parts[0].seq_len
        self.offsets = np.cumsum([0] + [p.num_rows for p in parts]).astype(np.int64)
        self.num_rows = int(self.offsets[-1])

    def rows(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``index`` in their order, each cut from its source: input_ids, labels and doc_ids, each
        (len(index), seq_len) int64 (a document id is its source's: ids only tell a row's documents apart).
        Each source's rows are cut at once and written to their places: one copy more than a single corpus's."""
        index = np.asarray(index, dtype=np.int64)
        source = np.searchsorted(self.offsets, index, side="right") - 1
        # Placed by numpy, not by torch's index_put: that runs on torch's CPU thread pool, which on a host whose
        # cores were busy took ~140 ms a step (256 rows of 256 tokens from 20 sources; numpy ~2 ms, a single corpus's).
        out = {k: np.empty((len(index), self.seq_len), dtype=np.int64) for k in ("input_ids", "labels", "doc_ids")}
        for d in np.unique(source).tolist():
            at = np.flatnonzero(source == d)
            piece = self.parts[d].rows(index[at] - self.offsets[d])
            for k, v in out.items():
                v[at] = piece[k].numpy()
        return {k: torch.from_numpy(v) for k, v in out.items()}


def eval_rows(num_rows: int, count: int) -> np.ndarray:
    """Evenly spaced validation rows (the same every evaluation)."""
    count = min(count, num_rows)
    return np.unique(np.linspace(0, num_rows - 1, count).round().astype(np.int64))
