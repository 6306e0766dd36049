"""Tokenizers: built-in bytes, or a Hugging Face ``tokenizer.json`` through the tokenizers package.

A tokenizer is saved beside a model as ``tokenizer.hybridlm.json`` (its kind and end-of-document
id) plus, for Hugging Face tokenizers, the ``tokenizer.json`` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DataError
from .data import source_path

SPEC_NAME = "tokenizer.hybridlm.json"
#: The byte tokenizer's end of document (id 256) in its Hugging Face files.
HF_EOS = "<|endoftext|>"
#: Hugging Face's tokenizer settings file (its special tokens), beside tokenizer.json.
HF_CONFIG_NAME = "tokenizer_config.json"
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def encode_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def files(self) -> dict[str, str | bytes]: ...

    def beside(self) -> dict[str, bytes]: ...

    def special_tokens(self) -> dict[str, int]: ...

    def token_bytes(self) -> list[int] | None: ...


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of what ``tokenizer`` is: its files (kind, end-of-document id, a tokenizer.json's vocabulary and rules),
    each JSON file read and written back with sorted keys, so that the same tokenizer saved with other spacing or
    key order hashes alike. A checkpoint records it, to tell at a resume a tokenizer.json replaced at its path."""
    h = hashlib.blake2b(digest_size=16)
    for name, content in sorted(tokenizer.files().items()):
        with contextlib.suppress(ValueError, RecursionError):  # (not JSON: hashed as it is)
            content = json.dumps(json.loads(content), sort_keys=True, separators=(",", ":"))
        h.update(name.encode() + b"\0" + (content.encode() if isinstance(content, str) else content) + b"\0")
    return h.hexdigest()


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, and 256 as end of document."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids, (n_i,) uint8: its UTF-8 bytes, viewed without a Python int per byte."""
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def encode_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's ids (as :meth:`encode_batch`) and, (n_i,) int64, the index of the character each byte is of."""
        out = []
        for text, ids in zip(texts, self.encode_batch(texts)):
            sizes = np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64, count=len(text))
            out.append((ids, np.repeat(np.arange(len(text), dtype=np.int64), sizes)))
        return out

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def files(self) -> dict[str, str | bytes]:
        """Files that describe this tokenizer (name -> content), to store beside a model."""
        return {SPEC_NAME: json.dumps({"type": "byte", "vocab_size": 257, "eos_id": 256}) + "\n"}

    def beside(self) -> dict[str, bytes]:
        """None: the byte tokenizer has no folder (see :meth:`HFTokenizer.beside`)."""
        return {}

    def special_tokens(self) -> dict[str, int]:
        """Special tokens (text -> id): none with a text (the end of document, 256, has none)."""
        return {}

    def token_bytes(self) -> list[int]:
        """The UTF-8 bytes each id stands for: 1 for a byte, 0 for the end of document (bits per byte need them)."""
        return [1] * 256 + [0]

    def hf_files(self) -> dict[str, str]:
        """The same tokenizer as Hugging Face files (``tokenizer.json``, ``tokenizer_config.json``), for an
        exported model: byte-level BPE without merges, so byte ``b`` is token ``b`` and ``HF_EOS`` is 256."""
        # GPT-2's printable stand-ins for bytes, which the ByteLevel pre-tokenizer and decoder use.
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        shifted = iter(range(256, 512))
        char = {b: chr(b if b in printable else next(shifted)) for b in range(256)}
        eos = {"id": 256, "content": HF_EOS, "single_word": False, "lstrip": False, "rstrip": False}
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        tokenizer = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [eos | {"normalized": False, "special": True}],
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": None,
            "decoder": byte_level,
            "model": {"type": "BPE", "vocab": {char[b]: b for b in range(256)} | {HF_EOS: 256}, "merges": []},
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": HF_EOS,
            "clean_up_tokenization_spaces": False,
        }
        return {
            "tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
            HF_CONFIG_NAME: json.dumps(config),
        }


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (any model family), loaded with the ``tokenizers`` package."""

    def __init__(
        self, path: str | Path, eos_token: str | None = None, key: str = "data.eos_token", eos_id: int | None = None
    ) -> None:
        """``eos_token``: the end-of-document token (default: the first of the usual ones the vocabulary
        holds; errors name its setting as ``key``), or its id ``eos_id`` (a saved tokenizer's)."""
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise DataError(
                "tokenizer.json files need the tokenizers package: pip install 'hybridlm[tokenizers]'"
            ) from None
        self.path = Path(path)
        try:
            # Read once, and kept: files() gives what was loaded. Read again there, a tokenizer.json replaced during a
            # run (retrained for the next one) was exported beside a model that had never seen it.
            self._json = self.path.read_bytes()
            self._tok = _Tokenizer.from_str(self._json.decode("utf-8"))
            self._beside = _files_beside(self.path)
        except Exception as e:
            said = e.strerror if isinstance(e, OSError) else e  # ("Is a directory", as the tokenizers package said)
            raise DataError(f"{self.path}: cannot load tokenizer ({said}){_not_a_tokenizer_json(self.path)}") from None
        # Every document whole and unpadded: a tokenizer.json saved with truncation or fixed-length padding
        # (common in exported ones) would cut documents short or put pad ids inside them.
        self._tok.no_truncation()
        self._tok.no_padding()
        # The number of tokens (as models and prepared corpora recorded it); where the vocabulary has gaps,
        # encode refuses an id at or past it by name.
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eos_id is not None:
            self.eos_id = eos_id
            return
        candidates = (eos_token,) if eos_token else _EOS_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            if eos_token:
                raise DataError(f"{key}: {eos_token!r} is not a token of {self.path}")
            raise DataError(
                f"{self.path}: no end-of-document token found among {', '.join(candidates)}; name its own with {key}"
            )
        self.eos_id = found[0]
        if self.eos_id >= self.vocab_size:  # (a vocabulary with gaps): every document would end in an id past it
            name = candidates[ids.index(self.eos_id)]
            raise DataError(
                f"{self.path}: end-of-document token {name!r} has id {self.eos_id}, past the vocabulary's "
                f"{self.vocab_size} tokens (its ids have gaps); hybridlm needs ids below the number of tokens"
            )

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids, (n_i,) int64, the texts tokenized in parallel (the package's Rust threads; its
        ``TOKENIZERS_PARALLELISM`` applies): the same ids as :meth:`encode` gives each text."""
        # encode_batch_fast (newer tokenizers releases) skips the characters' offsets, of no use for ids: 10-20 % faster
        # on one core here, with less memory per batch.
        return self._ids(self._encodings(texts, getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)))

    def encode_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's ids (as :meth:`encode_batch`) and, (n_i,) int64, the index of the character each token starts
        at (the package's offsets)."""
        encodings = self._encodings(texts, self._tok.encode_batch)
        starts = [np.fromiter((start for start, _ in e.offsets), dtype=np.int64, count=len(e.ids)) for e in encodings]
        return list(zip(self._ids(encodings), starts))

    def _encodings(self, texts: list[str], encode) -> list:
        try:
            return encode(texts, add_special_tokens=False)
        except Exception as e:  # e.g. a word-level vocabulary without its unknown token
            raise DataError(f"{self.path}: cannot tokenize the text ({e})") from None

    def _ids(self, encodings: list) -> list[np.ndarray]:
        """The ids of ``encodings``, (n_i,) int64; DataError for an id past the vocabulary's size."""
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        high = max((int(a.max()) for a in ids if len(a)), default=-1)
        if high >= self.vocab_size:  # a vocabulary with gaps in its ids
            raise DataError(
                f"{self.path}: token {self._tok.id_to_token(high)!r} has id {high}, past the vocabulary's "
                f"{self.vocab_size} tokens (its ids have gaps); hybridlm needs ids below the number of tokens"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def special_tokens(self) -> dict[str, int]:
        """The tokens marked special (text -> id), which :meth:`decode` leaves out of the text."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_bytes(self) -> None:
        """None: a token's bytes are not fixed (a byte-fallback piece is part of a character, a leading space
        may be dropped or added by the decoder), so no exact byte count comes from the ids alone."""
        return None

    def files(self) -> dict[str, str | bytes]:
        spec = {"type": "hf", "file": "tokenizer.json", "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        return {SPEC_NAME: json.dumps(spec) + "\n", "tokenizer.json": self._json}

    def beside(self) -> dict[str, bytes]:
        """The files that travel with a model folder's tokenizer.json (its tokenizer_config.json and special tokens,
        its chat template, generation_config.json's end-of-turn ids: ``convert``'s list) found beside it when it was
        loaded: a model trained with it keeps them, so that ``chat`` and ``serve`` write a conversation as it was
        written for training (``prepare``'s conversations) and end a turn where it ends. Not part of :meth:`files`
        (the tokenizer's identity, which a resume checks)."""
        return dict(self._beside)


def _files_beside(path: Path) -> dict[str, bytes]:
    """:meth:`HFTokenizer.beside`'s files of the tokenizer.json at ``path``, read now (those that are regular files)."""
    from ..checkpoint.hf_files import AUX_FILES

    found = {}
    for name in AUX_FILES:
        file = path.with_name(name)
        if name != path.name and name != "tokenizer.json" and file.is_file():
            with contextlib.suppress(OSError):  # (one that cannot be read stays behind: the tokenizer still loads)
                found[name] = file.read_bytes()
    return found


def _not_a_tokenizer_json(path: Path) -> str:
    """A hint where ``path`` is JSON but no tokenizers file (one without its "model": a tokenizer_config.json or a
    config.json beside it), whose parse error alone ("expected ',' or '}'") reads as a damaged file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return ""
    if isinstance(data, dict) and "model" in data:
        return ""
    return '; it is JSON but not a tokenizers file (no "model" in it): pass the folder\'s tokenizer.json'


def build_tokenizer(
    spec: str, key: str = "data.tokenizer", eos_token: str = "auto", eos_key: str = "data.eos_token"
) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` or the path of a ``tokenizer.json`` whose end-of-document token is ``eos_token`` ("auto":
    the first of the usual ones it holds); errors name the settings as ``key`` and ``eos_key``."""
    if not eos_token:
        raise DataError(f"{eos_key}: empty; leave it out (auto: the first of the usual names)")
    eos_token = "" if eos_token == "auto" else eos_token
    if spec == "byte":
        if eos_token:
            raise DataError(
                f"{eos_key}: the byte tokenizer's end of document is id 256; {eos_key} is for a tokenizer.json"
            )
        return ByteTokenizer()
    path = source_path(spec)
    if not spec or not path.exists():  # ("" is the current directory's path)
        raise DataError(f"{key}: {spec!r} is neither 'byte' nor an existing tokenizer.json")
    if path.is_dir():  # a model folder, as Megatron's --tokenizer-model and Hugging Face take: "Is a directory"
        inside = path / "tokenizer.json"
        raise DataError(
            f"{key}: {spec} is a folder; "
            + (f"name its tokenizer.json: {inside}" if inside.is_file() else "give 'byte' or a tokenizer.json file")
        )
    if not path.is_file():  # a FIFO or a device: reading it would block, or never end
        raise DataError(f"{key}: {spec}: not a regular file")
    return HFTokenizer(path, eos_token or None, eos_key)


def _saved_spec(directory: Path) -> dict:
    """A model folder's tokenizer spec as JSON alone (no tokenizer loaded); empty where it is missing or unreadable
    (loading the tokenizer says why)."""
    if not (directory / SPEC_NAME).is_file():  # (a FIFO under the name would block the read)
        return {}
    try:
        spec = json.loads((directory / SPEC_NAME).read_text())
    except (OSError, ValueError, RecursionError):  # (RecursionError: nesting deeper than json parses)
        return {}
    return spec if isinstance(spec, dict) else {}


def exported_files(directory: Path) -> dict[str, str]:
    """Tokenizer files to add to a Hugging Face export of the model folder ``directory``: the byte tokenizer's
    (:meth:`ByteTokenizer.hf_files`) where its spec names it; for a tokenizer.json (which travels as it is) without a
    ``tokenizer_config.json`` or ``special_tokens_map.json`` beside it (a model hybridlm trained with it), one naming the spec's end-of-document
    token, so that transformers' tokenizer knows it (``eos_token``) as config.json's ``eos_token_id`` does."""
    spec = _saved_spec(directory)
    if spec.get("type") == "byte":
        return ByteTokenizer().hf_files()
    eos, path = saved_eos_id(directory), directory / "tokenizer.json"
    settings = any((directory / name).exists() for name in (HF_CONFIG_NAME, "special_tokens_map.json"))
    if spec.get("type", "hf") != "hf" or eos is None or not path.is_file() or settings:
        return {}
    try:
        from tokenizers import Tokenizer as _Tokenizer

        name = _Tokenizer.from_file(str(path)).id_to_token(eos)
    except Exception:  # (no tokenizers package, or a file it cannot read: the tokenizer.json still travels)
        return {}
    if name is None:
        return {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name, "clean_up_tokenization_spaces": False}
    return {HF_CONFIG_NAME: json.dumps(config)}


def saved_eos_id(directory: Path) -> int | None:
    """The end-of-document id a model folder's tokenizer spec records, or None (no spec, or an unreadable one):
    read from the JSON alone, without loading the tokenizer (or needing the ``tokenizers`` package)."""
    eos = _saved_spec(directory).get("eos_id")
    return eos if isinstance(eos, int) and not isinstance(eos, bool) and eos >= 0 else None


def converted_spec(directory: str | Path, eos_id: int | None) -> dict[str, str]:
    """The tokenizer spec (name -> content) of a model folder converted from another format, whose
    ``tokenizer.json`` is in ``directory`` and whose config names end-of-document id ``eos_id``;
    empty where either is missing (then the folder's tokenizer takes the first usual name, or --eos-token)."""
    if eos_id is None or not (Path(directory) / "tokenizer.json").is_file():
        return {}
    return {SPEC_NAME: json.dumps({"type": "hf", "file": "tokenizer.json", "eos_id": eos_id}) + "\n"}


#: The ``type`` values of a tokenizer spec (:meth:`ByteTokenizer.files`, :meth:`HFTokenizer.files`).
SPEC_TYPES = ("byte", "hf")


def load_tokenizer(
    directory: str | Path, option: str = "a tokenizer", eos_token: str = "auto", eos_key: str = "--eos-token"
) -> ByteTokenizer | HFTokenizer:
    """The tokenizer saved beside a model in ``directory`` (see :meth:`ByteTokenizer.files`); where there is
    none, the error says to pass ``option`` instead (the CLI names its flag). ``eos_token`` (named by
    ``eos_key``) replaces the saved end-of-document id, which a folder converted from another format lacks."""
    directory = Path(directory)
    spec_file = directory / SPEC_NAME
    spec = {}
    if spec_file.exists():
        if not spec_file.is_file():  # a FIFO in a downloaded folder blocked the read forever
            raise DataError(f"{spec_file}: not a regular file")
        try:
            spec = json.loads(spec_file.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise DataError(f"{spec_file}: unreadable ({e})") from None
        if not isinstance(spec, dict):
            raise DataError(f"{spec_file}: expected a JSON object, got {type(spec).__name__}")
    elif not (directory / "tokenizer.json").exists():
        raise DataError(f"{directory}: no {SPEC_NAME} or tokenizer.json; pass {option} explicitly")
    kind = spec.get("type", "hf")  # (a spec without a type, or no spec: the folder's tokenizer.json)
    if kind not in SPEC_TYPES:  # {"type": "x"} was read as a Hugging Face spec: "no tokenizer.json"
        raise DataError(f"{spec_file}: unknown tokenizer type {kind!r} (known: {', '.join(SPEC_TYPES)})")
    if kind == "byte":
        # The byte tokenizer's ids are fixed: a spec saying otherwise (eos_id 10**30, vocab_size 300) is damaged.
        for key, value in (("vocab_size", ByteTokenizer.vocab_size), ("eos_id", ByteTokenizer.eos_id)):
            if key in spec and (spec[key] != value or type(spec[key]) is not int):
                raise DataError(f"{spec_file}: {key} of the byte tokenizer must be {value}, got {spec[key]!r}")
        return build_tokenizer("byte", option, eos_token, eos_key)
    name = spec.get("file", "tokenizer.json")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise DataError(f"{spec_file}: 'file' must name a file in {directory}, got {name!r}")
    if spec_file.exists() and not (directory / name).exists():  # the spec is what is wrong: name it
        raise DataError(f"{spec_file}: its tokenizer file {name} is not in {directory}; pass {option} explicitly")
    if not (directory / name).is_file():  # a folder, or a FIFO (whose read would block)
        raise DataError(f"{directory / name}: not a regular file")
    if eos_token != "auto":
        return build_tokenizer(str(directory / name), option, eos_token, eos_key)
    eos = spec.get("eos_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or eos < 0):
        raise DataError(f"{spec_file}: eos_id must be a token id, got {eos!r}")
    tok = HFTokenizer(directory / name, key=eos_key, eos_id=eos)  # the saved id: the token may have no usual name
    if not tok.eos_id < tok.vocab_size:
        raise DataError(f"{spec_file}: eos_id must be a token id below {tok.vocab_size}, got {eos!r}")
    return tok
