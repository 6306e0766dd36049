"""Tokenizers, corpora, packing with document boundaries, the stateless sampler, prepared token files."""

import bz2
import gzip
import io
import json
import lzma
import os
import re
import socket
import zipfile

import numpy as np
import pytest
import torch

from hybridlm.errors import DataError
from hybridlm.train.data import (
    PackedRows,
    Sampler,
    TokenStream,
    builtin_documents,
    load_corpus,
    split,
    text_documents,
    tokenize_documents,
    write_prepared,
)
from hybridlm.train.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer, load_tokenizer
from tests.helpers import fifos_never_read


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_id]) == text


def test_builtin_corpus_needs_no_download():
    docs = builtin_documents("pydoc")
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    with pytest.raises(DataError, match="unknown built-in corpus"):
        builtin_documents("wikipedia")


def _stream(lengths, eos=99):
    docs = [np.arange(10 * (i + 1), 10 * (i + 1) + n - 1) for i, n in enumerate(lengths)]
    tokens = np.concatenate([np.append(d, eos) for d in docs]).astype(np.uint16)
    return TokenStream(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def test_packed_rows_mask_labels_across_documents():
    stream = _stream([5, 7, 4])  # 16 tokens
    rows = PackedRows(stream, seq_len=5)
    assert rows.num_rows == 3
    b = rows.rows(np.array([0, 1]))
    ids, labels, docs = b["input_ids"], b["labels"], b["doc_ids"]
    flat = torch.from_numpy(stream.tokens.astype(np.int64))
    assert torch.equal(ids[0], flat[0:5]) and torch.equal(ids[1], flat[5:10])
    assert docs[0].tolist() == [0, 0, 0, 0, 0] and docs[1].tolist() == [1, 1, 1, 1, 1]
    # Row 0 ends on doc 0's end-of-document token (position 4); its label (doc 1's first token) is ignored.
    assert labels[0].tolist()[:4] == flat[1:5].tolist() and labels[0, 4] == -100
    assert labels[1].tolist() == flat[6:11].tolist()
    # Row 2 (tokens 10-14) crosses from doc 1 into doc 2 inside the row: doc 1's end-of-document token at
    # position 1 has its label ignored, the tokens around it keep theirs (rows 0 and 1 end where a document
    # ends, so a mask applied only at a row's end passed the checks above).
    last = rows.rows(np.array([2]))
    assert last["doc_ids"][0].tolist() == [1, 1, 2, 2, 2]
    assert last["labels"][0].tolist() == [int(flat[11]), -100, *flat[13:16].tolist()]


def test_rows_and_tail_label_every_token_but_the_first_exactly_once():
    """The tail is the tokens after the last whole row, one shorter row: with the rows, each stream position
    after the first is a label once (ignored where it starts a document), as a whole-corpus evaluation needs."""
    stream = _stream([5, 7, 6])  # 18 tokens: 3 rows of 5, a tail of 2
    rows = PackedRows(stream, seq_len=5)
    tail = rows.tail()
    assert tail["input_ids"].shape == tail["labels"].shape == tail["doc_ids"].shape == (1, 2)
    every = rows.rows(np.arange(rows.num_rows))
    labels = torch.cat([every["labels"].flatten(), tail["labels"].flatten()])
    flat = stream.tokens.astype(np.int64)
    starts = set(stream.doc_starts[1:-1].tolist())  # positions whose token begins a document: no label
    assert labels.tolist() == [-100 if p in starts else int(flat[p]) for p in range(1, 18)]
    assert tail["doc_ids"].tolist() == [[2, 2]]
    assert PackedRows(_stream([5, 6]), seq_len=5).tail() is None  # 11 tokens: 2 rows, nothing after them


def test_split_holds_out_whole_documents():
    stream = _stream([3] * 40)
    train, val = split(stream, 0.1, seed=0)
    assert (train.num_docs, val.num_docs) == (36, 4)
    assert train.num_tokens + val.num_tokens == stream.num_tokens
    assert split(stream, 0.0, 0)[1] is None
    with pytest.raises(DataError, match="single document"):
        split(_stream([50]), 0.1, 0)


def test_sampler_is_stateless_and_covers_epochs():
    s = Sampler(num_rows=10, batch_size=4, seed=3)
    first = [s.global_rows(i).tolist() for i in range(5)]
    again = Sampler(num_rows=10, batch_size=4, seed=3)
    assert [again.global_rows(i).tolist() for i in (4, 2, 0)] == [first[4], first[2], first[0]]
    epoch0 = [*first[0], *first[1], *first[2][:2]]
    assert sorted(epoch0) == list(range(10))
    ranks = [Sampler(10, 4, 3, rank=r, world_size=2).local_rows(1).tolist() for r in range(2)]
    assert ranks[0] + ranks[1] == first[1]
    with pytest.raises(DataError, match="not divisible"):
        Sampler(10, 3, 0, world_size=2)


def test_prepared_corpus_round_trip(tmp_path):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one doc", "two docs", "three"]))
    tok = ByteTokenizer()
    stream = load_corpus(str(tmp_path / "docs.jsonl"), tok)
    assert stream.num_docs == 3 and stream.tokens[stream.doc_starts[1] - 1] == tok.eos_id
    write_prepared(stream, tmp_path / "prep", tok, "docs.jsonl")
    again = load_corpus(str(tmp_path / "prep"), tok)
    assert np.array_equal(again.tokens, stream.tokens) and np.array_equal(again.doc_starts, stream.doc_starts)
    assert isinstance(load_tokenizer(tmp_path / "prep"), ByteTokenizer)


def test_preparing_again_replaces_the_whole_corpus_and_nothing_else(tmp_path):
    """A second prepare (byte tokenizer) left the first one's tokenizer.json beside its own meta.json, and
    prepare wrote into any folder; now the corpus is replaced as one folder, and only a corpus is."""
    from hybridlm import CheckpointError

    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tok.json"))
    first, byte, out = HFTokenizer(tmp_path / "tok.json"), ByteTokenizer(), tmp_path / "prep"
    write_prepared(tokenize_documents(["a b", "b a"], first), out, first, "test")
    assert (out / "tokenizer.json").exists()
    write_prepared(tokenize_documents(["a b", "b a"], byte), out, byte, "test")
    assert sorted(p.name for p in out.iterdir()) == ["docs.npy", "meta.json", "tokenizer.hybridlm.json", "tokens.bin"]
    assert isinstance(load_tokenizer(out), ByteTokenizer) and load_corpus(str(out), byte).num_docs == 2
    (out / "README.md").write_text("where this came from")
    with pytest.raises(CheckpointError, match=r"would delete README\.md"):
        write_prepared(tokenize_documents(["c"], byte), out, byte, "test")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a prepared corpus"):
        write_prepared(tokenize_documents(["c"], byte), tmp_path / "notes", byte, "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "prep", "tok.json"]  # nothing half-written


def test_prepare_refuses_its_destination_before_tokenizing(tmp_path, monkeypatch, capsys):
    from hybridlm.cli import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    monkeypatch.setattr("hybridlm.train.data.load_corpus", lambda *a, **k: pytest.fail("tokenized first"))
    monkeypatch.setattr(
        "hybridlm.train.data.token_batches", lambda *a, **k: pytest.fail("tokenized first"), raising=False
    )
    assert main(["prepare", "builtin:pydoc", str(tmp_path / "notes")]) == 2
    assert "exists and is not a prepared corpus" in capsys.readouterr().err


def test_a_split_of_a_prepared_corpus_stays_on_its_memmap(tmp_path):
    """The validation split selects documents without copying the corpus into memory; its rows are
    the rows of the selected documents laid end to end."""
    tok = ByteTokenizer()
    docs = [f"document {i} " * (i % 7 + 1) for i in range(60)]
    write_prepared(tokenize_documents(docs, tok), tmp_path / "prep", tok, "test")
    stream = load_corpus(str(tmp_path / "prep"), tok)
    train, val = split(stream, 0.2, seed=3)
    assert isinstance(train.tokens, np.memmap) and train.tokens is stream.tokens is val.tokens
    for part in (train, val):
        chosen = [i for i in range(60) if [*tok.encode(docs[i]), tok.eos_id] in _documents(part)]
        laid = tokenize_documents([docs[i] for i in chosen], tok)
        assert part.num_tokens == laid.num_tokens and np.array_equal(part.doc_starts, laid.doc_starts)
        got, want = PackedRows(part, seq_len=16), PackedRows(laid, seq_len=16)
        index = np.arange(got.num_rows)
        for key, value in got.rows(index).items():
            assert torch.equal(value, want.rows(index)[key]), key
    again = val.select(np.array([1, 0]))  # a selection of a selection
    assert _documents(again) == _documents(val)[1::-1]


def _documents(stream) -> list[list[int]]:
    return [stream.take(np.arange(a, b)).tolist() for a, b in zip(stream.doc_starts[:-1], stream.doc_starts[1:])]


def test_a_prepared_corpus_refuses_another_tokenizer_of_the_same_size(tmp_path):
    """Same vocabulary size and end-of-document id, other tokens: ids would mean other text."""
    tokenizers = pytest.importorskip("tokenizers")

    def bpe(words: list[str], path) -> HFTokenizer:
        vocab = {"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(words)}}
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tok.save(str(path))
        return HFTokenizer(path)

    first, second = bpe(["a", "b", "c"], tmp_path / "one.json"), bpe(["c", "b", "a"], tmp_path / "two.json")
    assert first.vocab_size == second.vocab_size and first.eos_id == second.eos_id
    write_prepared(tokenize_documents(["a b c", "c b a"], first), tmp_path / "prep", first, "test")
    assert load_corpus(str(tmp_path / "prep"), first).num_docs == 2
    with pytest.raises(DataError, match=r"prepared with another tokenizer \(tokenizer\.json differs.*; prepare its"):
        load_corpus(str(tmp_path / "prep"), second)


def test_a_damaged_prepared_corpus_is_named(tmp_path):
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    np.save(tmp_path / "prep" / "docs.npy", np.zeros(0, dtype=np.int64))
    with pytest.raises(DataError, match=r"docs\.npy must hold non-decreasing document offsets from 0"):
        load_corpus(str(tmp_path / "prep"), tok)
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    (tmp_path / "prep" / "meta.json").write_text(json.dumps(meta | {"num_tokens": "8"}))
    with pytest.raises(DataError, match=r"tokens\.bin holds 8 tokens, meta\.json says '8'"):
        load_corpus(str(tmp_path / "prep"), tok)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"dtype": "float16"}, "dtype must be an integer type, got 'float16'"),  # uint16's size: read silently
        ({"vocab_size": "257"}, "vocab_size must be a count, got '257'"),
        ({"eos_id": None}, "eos_id must be a count, got None"),
    ],
)
def test_a_prepared_corpus_with_a_bad_meta_json_is_named(tmp_path, edit, message):
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    (tmp_path / "prep" / "meta.json").write_text(json.dumps(meta | edit))
    with pytest.raises(DataError, match=re.escape(message)):
        load_corpus(str(tmp_path / "prep"), tok)


def test_a_prepared_corpus_with_ids_past_its_vocabulary_is_refused_when_read(tmp_path):
    """Training stopped at the first batch holding one ("unexpected ValueError ... may be a bug"), or never
    noticed where no batch did."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    ids = np.fromfile(tmp_path / "prep" / "tokens.bin", dtype="<u2")
    ids[2] = 300
    ids.tofile(tmp_path / "prep" / "tokens.bin")
    with pytest.raises(DataError, match=r"tokens\.bin holds ids from 0 to 300, outside the vocabulary of 257"):
        load_corpus(str(tmp_path / "prep"), tok)


def test_ndjson_is_json_lines(tmp_path):
    """A .ndjson file was read as one text document, its JSON syntax included."""
    (tmp_path / "c.ndjson").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert list(text_documents(str(tmp_path / "c.ndjson"))) == ["one", "two"]
    assert load_corpus(str(tmp_path), ByteTokenizer()).num_docs == 2


def test_bad_sources(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"), tok)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        load_corpus(str(tmp_path / "bad.jsonl"), tok)
    with pytest.raises(DataError, match="shorter than one row"):
        PackedRows(tokenize_documents(["tiny"], tok), seq_len=64)


def test_a_byte_order_mark_is_not_text(tmp_path):
    """A UTF-8 byte-order mark at a file's start (Windows editors write one) is dropped, in .txt and .jsonl;
    the same character inside a record is part of its text."""
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n{"text": "\xef\xbb\xbfkept"}\n')
    assert list(text_documents(str(tmp_path / "a.txt"))) == ["hello\n"]
    assert list(text_documents(str(tmp_path / "b.jsonl"))) == ["hello", "\ufeffkept"]  # inside a line it is text


def test_bad_bytes_and_escapes_name_the_line(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: not UTF-8 \(byte 0xff"):
        load_corpus(str(tmp_path / "a.jsonl"), tok)
    (tmp_path / "b.jsonl").write_text('{"text": "lone \\ud800 x"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'text' holds an unpaired surrogate"):
        load_corpus(str(tmp_path / "b.jsonl"), tok)
    (tmp_path / "c.json").write_text('{"text": "x"}')
    with pytest.raises(DataError, match=r"a \.json file; training reads \.txt"):
        load_corpus(str(tmp_path / "c.json"), tok)
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"not a prepared corpus .*not an object"):
        load_corpus(str(tmp_path / "prep"), tok)


def test_extensions_in_any_case_keep_the_txt_then_jsonl_order(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "B.JSONL").write_text('{"text": "from jsonl"}\n')
    (tmp_path / "d" / "a.TXT").write_text("from txt")
    (tmp_path / "d" / "skip.json").write_text("{}")
    stream = load_corpus(str(tmp_path / "d"), ByteTokenizer())
    assert stream.num_docs == 2 and bytes(stream.tokens[: len("from txt")].tolist()) == b"from txt"
    assert load_corpus(str(tmp_path / "d" / "B.JSONL"), ByteTokenizer()).num_tokens == len("from jsonl") + 1


def test_a_short_validation_split_is_named(tmp_path):
    tok = ByteTokenizer()
    stream = tokenize_documents(["a" * 500, "b" * 500, "c"], tok)
    with pytest.raises(DataError, match=r"the validation split .*raise data.val_fraction, or choose another data.seed"):
        PackedRows(
            stream.select(np.array([2])),
            32,
            "the validation split",
            ", raise data.val_fraction, or choose another data.seed",
        )


def test_hugging_face_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(
        builtin_documents("pydoc")[:5], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"])
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and tok.eos_id == hf.token_to_id("</s>")
    ids = tok.encode("The assert statement")
    assert tok.decode(ids).replace(" ", "") == "Theassertstatement"
    for name, content in tok.files().items():
        (tmp_path / "saved").mkdir(exist_ok=True)
        (tmp_path / "saved" / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert load_tokenizer(tmp_path / "saved").encode("The assert statement") == ids
    with pytest.raises(DataError, match="neither 'byte' nor"):
        build_tokenizer("gpt2")


def _word_level(vocab: dict[str, int], path, unk: str = "<|endoftext|>"):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return tok


def test_a_tokenizer_saved_with_truncation_or_padding_keeps_whole_documents(tmp_path):
    """Exported tokenizer.json files often carry truncation and fixed-length padding: documents were cut
    to the truncation length, or padded with pad ids inside them."""
    hf = _word_level({"<|endoftext|>": 0, "a": 1, "b": 2, "<pad>": 3}, tmp_path / "plain.json")
    text = " ".join(["a", "b"] * 20)
    hf.enable_truncation(max_length=4)
    hf.save(str(tmp_path / "truncating.json"))
    hf.no_truncation()
    hf.enable_padding(length=64, pad_id=3, pad_token="<pad>")
    hf.save(str(tmp_path / "padding.json"))
    want = HFTokenizer(tmp_path / "plain.json").encode(text)
    assert len(want) == 40
    for name in ("truncating.json", "padding.json"):
        tok = HFTokenizer(tmp_path / name)
        assert tok.encode(text) == want, name
        assert tokenize_documents([text], tok).num_tokens == 41, name  # and the end-of-document token


def test_a_vocabulary_with_gaps_refuses_ids_past_its_size_by_name(tmp_path):
    """Models and prepared corpora record the number of tokens: an id at or past it (a vocabulary with gaps)
    is refused when the text reaches it (prepare overflowed uint16, training failed in the embedding)."""
    _word_level({"<|endoftext|>": 0, "a": 1, "b": 70000}, tmp_path / "gaps.json")
    tok = HFTokenizer(tmp_path / "gaps.json")
    assert tok.vocab_size == 3 and tokenize_documents(["a a"], tok).tokens.tolist() == [1, 1, 0]  # a gap unused
    with pytest.raises(DataError, match=r"gaps\.json: token 'b' has id 70000, past the vocabulary's 3 tokens"):
        tokenize_documents(["a b a"], tok)


def test_a_text_folder_may_hold_a_meta_json_of_its_own(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("one document")
    (tmp_path / "c" / "meta.json").write_text('{"author": "me"}')  # not a prepared corpus: no token files
    assert load_corpus(str(tmp_path / "c"), ByteTokenizer()).num_docs == 1


def test_a_jsonl_line_without_the_field_lists_the_fields_it_has(tmp_path):
    """The message ended in the KeyError's own text, the field's name again: "...a 'body' field ('body')"."""
    (tmp_path / "a.jsonl").write_text('{"text": "ok", "id": 1}\n')
    with pytest.raises(
        DataError, match=r"a\.jsonl:1: not a JSON object with a 'body' field \(its fields: 'text', 'id'\)"
    ):
        load_corpus(str(tmp_path / "a.jsonl"), ByteTokenizer(), jsonl_field="body")


@pytest.mark.parametrize(
    "line, has",
    [
        ("[1, 2]", "an array"),
        ('"text"', "a string"),
        ("7", "a number"),
        ("null", "null"),
        ('{"' + "x" * 100_000 + '": 1}', "its fields: '" + "x" * 40 + "...'"),
    ],
)
def test_a_jsonl_line_without_the_field_says_what_it_holds_in_json_terms_and_short(tmp_path, line, has):
    """Python's type names ("a int", "a NoneType") told a JSON line's content, and a record keyed by its documents
    repeated each key whole: a 100 kB key made a 100 kB message."""
    (tmp_path / "a.jsonl").write_text(line + "\n")
    with pytest.raises(DataError) as e:
        load_corpus(str(tmp_path / "a.jsonl"), ByteTokenizer())
    assert str(e.value).endswith(f"a.jsonl:1: not a JSON object with a 'text' field ({has})")
    assert len(str(e.value)) < 200 + len(str(tmp_path))


@pytest.mark.parametrize("value, held", [("null", "null"), ("5", "a number"), ('{"a": 1}', "an object")])
def test_a_jsonl_field_that_is_not_a_string_says_what_it_holds(tmp_path, value, held):
    """A record whose text is null (a dump with missing texts) said only "is not a string"."""
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": ' + value + "}\n")
    with pytest.raises(DataError, match=rf"a\.jsonl:2: field 'text' is not a string but {held}$"):
        load_corpus(str(tmp_path / "a.jsonl"), ByteTokenizer())


def test_a_jsonl_field_that_holds_a_list_is_a_conversation_that_training_reads_once_prepared(tmp_path):
    """A list (of messages, or of strings) is a conversation: read as one only by ``hybridlm prepare``, with a chat
    template (tests/train/test_chats.py)."""
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": ["a", "b"]}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: a conversation .* hybridlm prepare"):
        load_corpus(str(tmp_path / "a.jsonl"), ByteTokenizer())


def test_a_jsonl_line_nested_too_deep_is_named(tmp_path):
    (tmp_path / "deep.jsonl").write_text('{"text": "ok"}\n' + "[" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl:2: not a JSON object"):
        load_corpus(str(tmp_path / "deep.jsonl"), ByteTokenizer())


def test_an_end_of_document_token_of_another_name_is_named_by_a_setting(tmp_path, capsys):
    """DeepSeek-style names are not among the usual ones: data.eos_token / prepare --eos-token name it, the
    model folder keeps its id, and generate loads it without the name."""
    from hybridlm.cli import main
    from tests.train.test_trainer import TINY_RUN

    eos = "<｜end▁of▁sentence｜>"
    words = builtin_documents("pydoc")[0].split()[:200]
    _word_level({eos: 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}, tmp_path / "ds.json", unk=eos)
    _word_level({eos: 0, "a": 1}, tmp_path / "no_unk.json")  # its unknown token is not in the vocabulary
    with pytest.raises(DataError, match=r"no_unk\.json: cannot tokenize the text"):
        build_tokenizer(str(tmp_path / "no_unk.json"), eos_token=eos).encode("b")
    with pytest.raises(DataError, match=r"no end-of-document token found .*name its own with data\.eos_token"):
        build_tokenizer(str(tmp_path / "ds.json"))
    with pytest.raises(DataError, match=r"data\.eos_token: '<x>' is not a token of"):
        build_tokenizer(str(tmp_path / "ds.json"), eos_token="<x>")
    with pytest.raises(DataError, match=r"data\.eos_token: the byte tokenizer's end of document is id 256"):
        build_tokenizer("byte", eos_token=eos)
    assert build_tokenizer(str(tmp_path / "ds.json"), eos_token=eos).eos_id == 0
    with pytest.raises(DataError, match=r"data\.eos_token: empty; leave it out"):
        build_tokenizer(str(tmp_path / "ds.json"), eos_token="")

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(words))
    assert main(["prepare", str(corpus), str(tmp_path / "prep"), "--tokenizer", str(tmp_path / "ds.json")]) == 2
    assert "--eos-token" in capsys.readouterr().err
    assert (
        main(
            [
                "prepare",
                str(corpus),
                str(tmp_path / "prep"),
                "--tokenizer",
                str(tmp_path / "ds.json"),
                "--eos-token",
                eos,
            ]
        )
        == 0
    )
    sets = [
        *TINY_RUN,
        "data.seq_len=16",
        "train.steps=1",
        "train.batch_size=2",
        "train.eval_batches=1",
        "data.val_fraction=0",
    ]
    sets += [f"data.source={tmp_path / 'prep'}", f"data.tokenizer={tmp_path / 'ds.json'}", f"data.eos_token={eos}"]
    argv = ["train", *(x for s in sets for x in ("--set", s)), "--no-progress", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 0, capsys.readouterr().err
    tok = load_tokenizer(tmp_path / "run" / "model")
    assert tok.eos_id == 0 and tok.encode(words[0]) == build_tokenizer(str(tmp_path / "ds.json"), eos_token=eos).encode(
        words[0]
    )
    # A folder without the saved id (as one converted from NemotronH): --eos-token names it.
    (tmp_path / "run" / "model" / "tokenizer.hybridlm.json").unlink()
    with pytest.raises(DataError, match="name its own with --eos-token"):
        load_tokenizer(tmp_path / "run" / "model")
    assert load_tokenizer(tmp_path / "run" / "model", eos_token=eos).eos_id == 0


def test_a_tokenizer_spec_pointing_at_a_missing_file_is_named(tmp_path):
    """A tokenizer.hybridlm.json reduced to {} was reported as ".../tokenizer.json: cannot load tokenizer (No such
    file)", naming a file the folder never had."""
    (tmp_path / "tokenizer.hybridlm.json").write_text("{}")
    with pytest.raises(DataError, match=r"tokenizer\.hybridlm\.json: its tokenizer file tokenizer\.json is not in"):
        load_tokenizer(tmp_path, "--tokenizer")
    (tmp_path / "tokenizer.hybridlm.json").write_text('{"file": "tok.json"}')
    with pytest.raises(DataError, match=r"its tokenizer file tok\.json is not in .*; pass --tokenizer explicitly"):
        load_tokenizer(tmp_path, "--tokenizer")


def test_sampler_draws_a_new_permutation_each_epoch():
    """Each epoch covers every row once in an order of its own: reusing epoch 0's permutation repeated the
    same batches epoch after epoch."""
    s = Sampler(num_rows=12, batch_size=4, seed=3)
    epochs = [[r for step in range(3 * e, 3 * e + 3) for r in s.global_rows(step).tolist()] for e in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert len({tuple(order) for order in epochs}) == 4, epochs
    assert Sampler(12, 4, seed=3).global_rows(3).tolist() == epochs[1][:4]  # stateless across epochs too


def test_the_tokenizer_counts_added_tokens_and_takes_the_first_usual_end_of_document_name(tmp_path):
    """A token added on top of the model's vocabulary (as special tokens usually are) has an id too; where the
    vocabulary holds several usual end-of-document names, the first of the usual order wins, whatever their ids."""
    hf = _word_level({"a": 0, "</s>": 1, "<|endoftext|>": 2, "b": 3}, tmp_path / "tok.json", unk="a")
    hf.add_special_tokens(["<|im_end|>"])  # id 4, outside the WordLevel model
    hf.save(str(tmp_path / "tok.json"))
    tok = HFTokenizer(tmp_path / "tok.json")
    assert tok.vocab_size == 5  # a, </s>, <|endoftext|>, b and the added token
    assert tok.eos_id == 2  # '<|endoftext|>' comes before '</s>' among the usual names
    assert tok.encode("b <|im_end|>") == [3, 4]


def test_the_tokenizer_refuses_an_id_equal_to_the_vocabulary_size_and_takes_empty_text(tmp_path):
    """Ids run from 0 to vocab_size - 1: one equal to the size is past the vocabulary. An empty document has no
    ids, and is its end-of-document token alone."""
    _word_level({"<|endoftext|>": 0, "a": 1, "b": 3}, tmp_path / "gap.json")
    tok = HFTokenizer(tmp_path / "gap.json")
    assert tok.vocab_size == 3 and tok.encode("a") == [1]
    with pytest.raises(DataError, match=r"token 'b' has id 3, past the vocabulary's 3 tokens"):
        tok.encode("a b")
    assert tok.encode("") == []
    assert tokenize_documents(["", "a"], tok).tokens.tolist() == [0, 1, 0]


def test_the_tokenizer_adds_no_special_tokens_of_a_post_processor(tmp_path):
    """A tokenizer.json with a template (BERT-style [CLS] ... [SEP]) would put those ids inside every document."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = _word_level({"<|endoftext|>": 0, "a": 1, "b": 2, "[CLS]": 3, "[SEP]": 4}, tmp_path / "tok.json")
    hf.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3), ("[SEP]", 4)]
    )
    hf.save(str(tmp_path / "tok.json"))
    assert hf.encode("a b").ids == [3, 1, 2, 4]  # what the file does by default
    assert HFTokenizer(tmp_path / "tok.json").encode("a b") == [1, 2]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("[1]", "tokenizer.hybridlm.json: expected a JSON object, got list"),
        ('{"file": "../tok.json"}', "'file' must name a file in"),
        ('{"file": "sub/tok.json"}', "'file' must name a file in"),
        ('{"eos_id": -1}', "tokenizer.hybridlm.json: eos_id must be a token id, got -1"),
        ('{"eos_id": true}', "tokenizer.hybridlm.json: eos_id must be a token id, got True"),
        ('{"eos_id": 3}', "tokenizer.hybridlm.json: eos_id must be a token id below 3, got 3"),
    ],
)
def test_a_bad_tokenizer_spec_is_named(tmp_path, spec, message):
    """A saved spec that is no object, names a file outside its folder, or records an id outside the vocabulary
    is refused by its file name (not an AttributeError, a tokenizer read from elsewhere, or an eos past the ids)."""
    (tmp_path / "model").mkdir()
    _word_level({"<|endoftext|>": 0, "a": 1, "b": 2}, tmp_path / "model" / "tokenizer.json")
    _word_level({"<|endoftext|>": 0, "a": 1, "b": 2}, tmp_path / "tok.json")
    (tmp_path / "model" / "sub").mkdir()
    _word_level({"<|endoftext|>": 0, "a": 1, "b": 2}, tmp_path / "model" / "sub" / "tok.json")
    (tmp_path / "model" / "tokenizer.hybridlm.json").write_text(spec)
    with pytest.raises(DataError, match=re.escape(message)):
        load_tokenizer(tmp_path / "model")


def test_a_folder_without_any_tokenizer_file_says_to_pass_one(tmp_path):
    with pytest.raises(
        DataError, match=r"no tokenizer\.hybridlm\.json or tokenizer\.json; pass --tokenizer explicitly"
    ):
        load_tokenizer(tmp_path, "--tokenizer")


def test_the_saved_end_of_document_id_is_read_from_the_spec_alone(tmp_path):
    """Id 0 is a token id like any other; anything but a non-negative int (or no readable spec) is no id. A
    converted folder gets a spec only where both its tokenizer.json and an id exist."""
    from hybridlm.train.tokenizer import converted_spec, saved_eos_id

    assert saved_eos_id(tmp_path) is None
    for content, want in (('{"eos_id": 0}', 0), ('{"eos_id": 7}', 7), ('{"eos_id": -1}', None)):
        (tmp_path / "tokenizer.hybridlm.json").write_text(content)
        assert saved_eos_id(tmp_path) == want, content
    for content in ('{"eos_id": true}', '{"eos_id": "0"}', "[0]", "{"):
        (tmp_path / "tokenizer.hybridlm.json").write_text(content)
        assert saved_eos_id(tmp_path) is None, content
    assert converted_spec(tmp_path, 5) == {}  # no tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{}")
    assert converted_spec(tmp_path, None) == {}
    spec = converted_spec(tmp_path, 0)
    assert json.loads(spec["tokenizer.hybridlm.json"]) == {"type": "hf", "file": "tokenizer.json", "eos_id": 0}


def test_json_lines_skip_blank_lines_and_name_bad_records_by_line_and_column(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n   \n{"text": "two"}\n')
    assert list(text_documents(str(tmp_path / "a.jsonl"))) == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: field 'text' is not a string"):
        list(text_documents(str(tmp_path / "b.jsonl")))
    line = b'{"text": "bad \xff"}'
    (tmp_path / "c.jsonl").write_bytes(line + b"\n")
    column = line.index(b"\xff") + 1  # 1-based, as editors count
    with pytest.raises(DataError, match=rf"c\.jsonl:1: not UTF-8 \(byte 0xff at column {column}\)"):
        list(text_documents(str(tmp_path / "c.jsonl")))


def test_a_byte_order_mark_starts_only_the_first_line(tmp_path):
    """A BOM at the start of a later line is no byte-order mark: that line is not a JSON object."""
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "one"}\n\xef\xbb\xbf{"text": "two"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: not a JSON object"):
        list(text_documents(str(tmp_path / "a.jsonl")))


def test_an_empty_corpus_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.txt or \.jsonl files under"):
        list(text_documents(str(tmp_path / "empty")))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="the corpus has no documents"):
        load_corpus(str(tmp_path / "blank.jsonl"), ByteTokenizer())


def test_token_ids_are_stored_in_16_bits_up_to_65536_tokens():
    """Ids 0 .. 65535 fit in uint16; one more token needs 32 bits."""

    class Sized:
        eos_id = 0

        def __init__(self, vocab_size):
            self.vocab_size = vocab_size

        def encode(self, text):
            return [self.vocab_size - 1]

    assert tokenize_documents(["x"], Sized(65536)).tokens.tolist() == [65535, 0]
    assert tokenize_documents(["x"], Sized(65536)).tokens.dtype == np.uint16
    assert tokenize_documents(["x"], Sized(65537)).tokens.dtype == np.uint32


def _prepared(tmp_path, docs=("one", "two")):
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(list(docs), tok), tmp_path / "prep", tok, "test")
    return tmp_path / "prep", tok


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"drop": ["vocab_size", "eos_id"]}, "meta.json has no vocab_size, eos_id"),
        ({"vocab_size": -1}, "meta.json: vocab_size must be a count, got -1"),
        ({"eos_id": -2}, "meta.json: eos_id must be a count, got -2"),
    ],
)
def test_a_prepared_corpus_with_missing_or_negative_meta_fields_is_named(tmp_path, edit, message):
    prep, tok = _prepared(tmp_path)
    meta = json.loads((prep / "meta.json").read_text())
    for key in edit.pop("drop", []):
        del meta[key]
    (prep / "meta.json").write_text(json.dumps(meta | edit))
    with pytest.raises(DataError, match=re.escape(f"not a prepared corpus ({message})")):
        load_corpus(str(prep), tok)


def test_a_prepared_corpus_with_offsets_off_its_tokens_is_named(tmp_path):
    """docs.npy must start at 0 and end at the token count (8 here: 'one', 'two' and their end tokens)."""
    prep, tok = _prepared(tmp_path)
    np.save(prep / "docs.npy", np.array([1, 4, 8], dtype=np.int64))
    with pytest.raises(DataError, match=r"docs\.npy must hold non-decreasing document offsets from 0"):
        load_corpus(str(prep), tok)
    np.save(prep / "docs.npy", np.array([0, 4, 7], dtype=np.int64))
    with pytest.raises(DataError, match=r"tokens\.bin holds 8 tokens, docs\.npy says 7$"):  # not np.int64(7)
        load_corpus(str(prep), tok)
    np.save(prep / "docs.npy", np.array([0], dtype=np.int64))  # no document: not even one offset pair
    with pytest.raises(DataError, match=r"docs\.npy must hold non-decreasing document offsets"):
        load_corpus(str(prep), tok)


def test_a_prepared_id_equal_to_the_vocabulary_size_or_negative_is_refused(tmp_path):
    prep, tok = _prepared(tmp_path)
    ids = np.fromfile(prep / "tokens.bin", dtype="<u2")
    ids[1] = 257  # the vocabulary holds ids 0 .. 256
    ids.tofile(prep / "tokens.bin")
    with pytest.raises(DataError, match=r"holds ids from 0 to 257, outside the vocabulary of 257"):
        load_corpus(str(prep), tok)
    signed = np.array([111, -5, 256, 116, 119, 111, 256, 256], dtype="<i2")  # stored as int16: a negative id
    signed.tofile(prep / "tokens.bin")
    meta = json.loads((prep / "meta.json").read_text())
    (prep / "meta.json").write_text(json.dumps(meta | {"dtype": "int16"}))
    with pytest.raises(DataError, match=r"holds ids from -5 to 256"):
        load_corpus(str(prep), tok)


def test_a_prepared_corpus_with_another_end_of_document_id_names_the_setting(tmp_path):
    """Same vocabulary size, another end-of-document id: the difference is data.eos_token's, and the way out is to
    prepare the text again (the message said what differs, not what to do)."""
    prep, tok = _prepared(tmp_path)
    meta = json.loads((prep / "meta.json").read_text())
    (prep / "meta.json").write_text(json.dumps(meta | {"eos_id": 10}))
    with pytest.raises(DataError) as info:
        load_corpus(str(prep), tok)
    assert "prepared with a tokenizer of vocab 257 (eos 10), but data.tokenizer has vocab 257 (eos 256, set by " in str(
        info.value
    )
    assert "data.eos_token" in str(info.value)
    assert str(info.value).endswith(
        "; prepare its text again with that tokenizer (hybridlm prepare SOURCE OUT --tokenizer ..., --eos-token)"
    )


def test_split_keeps_a_document_on_each_side():
    """However large or small val_fraction, both parts hold at least one document."""
    stream = _stream([3] * 5)
    train, val = split(stream, 1.0, seed=0)
    assert (train.num_docs, val.num_docs) == (1, 4)
    train, val = split(_stream([3] * 40), 0.001, seed=0)
    assert (train.num_docs, val.num_docs) == (39, 1)


def test_packed_rows_take_every_row_that_fits_and_no_more():
    """A row needs seq_len + 1 tokens (the labels run one ahead): 16 tokens hold 3 rows of 5, 15 hold only 2."""
    assert PackedRows(_stream([5, 7, 4]), seq_len=5).num_rows == 3
    stream = _stream([5, 7, 3])  # 15 tokens
    rows = PackedRows(stream, seq_len=5)
    assert rows.num_rows == 2
    last = rows.rows(np.array([1]))
    assert last["labels"][0].tolist() == stream.tokens[6:11].tolist()


def test_a_resumed_sampler_continues_from_the_rows_consumed():
    """After resume_at(step, rows) step s takes the rows after those consumed plus (s - step) batches, the same
    rows the uninterrupted stream gives at that position, whatever batch size was used before."""
    whole = Sampler(num_rows=10, batch_size=2, seed=1)
    stream_of_rows = [r for step in range(10) for r in whole.global_rows(step).tolist()]
    resumed = Sampler(num_rows=10, batch_size=4, seed=1)
    resumed.resume_at(step=3, rows=6)  # 3 steps of 2 rows were consumed
    assert resumed.global_rows(3).tolist() == stream_of_rows[6:10]
    assert resumed.global_rows(4).tolist() == stream_of_rows[10:14]


def test_evaluation_rows_are_spread_from_the_first_to_the_last():
    from hybridlm.train.data import eval_rows

    assert eval_rows(11, 3).tolist() == [0, 5, 10]  # the first, middle and last rows
    assert eval_rows(4, 10).tolist() == [0, 1, 2, 3]  # no more rows than there are
    assert eval_rows(7, 1).tolist() == [0]


def test_a_selected_stream_is_prepared_as_its_own_documents(tmp_path):
    """Writing a selection (e.g. a split) writes its documents' tokens, not the whole array it selects from."""
    tok = ByteTokenizer()
    stream = tokenize_documents(["aa", "bbb", "c"], tok)
    part = stream.select(np.array([2, 0]))
    write_prepared(part, tmp_path / "prep", tok, "test")
    again = load_corpus(str(tmp_path / "prep"), tok)
    assert again.tokens.tolist() == [*b"c", 256, *b"aa", 256]
    assert again.doc_starts.tolist() == [0, 2, 5]


def test_a_text_folder_is_read_with_its_subfolders(tmp_path):
    (tmp_path / "c" / "sub").mkdir(parents=True)
    (tmp_path / "c" / "a.txt").write_text("top")
    (tmp_path / "c" / "sub" / "b.txt").write_text("nested")
    assert list(text_documents(str(tmp_path / "c"))) == ["top", "nested"]


def test_a_selection_fingerprints_its_own_documents():
    """A selection hashed the whole shared token array, so any two selections of one corpus matched."""
    stream = tokenize_documents(["aa", "bbb", "c"], ByteTokenizer())
    assert stream.select(np.array([0])).fingerprint() != stream.select(np.array([1])).fingerprint()
    # Its own ids, in its order: every document in order is the stream itself, and the same ids alone hash alike.
    assert stream.select(np.arange(3)).fingerprint() == stream.fingerprint()
    assert stream.select(np.array([1])).fingerprint() == tokenize_documents(["bbb"], ByteTokenizer()).fingerprint()
    assert (
        stream.select(np.array([2, 0])).fingerprint() == tokenize_documents(["c", "aa"], ByteTokenizer()).fingerprint()
    )
    # Sampled runs (a corpus longer than block * blocks) read across the selection's documents too.
    assert stream.select(np.array([1, 0])).fingerprint(block=2, blocks=2) == (
        tokenize_documents(["bbb", "aa"], ByteTokenizer()).fingerprint(block=2, blocks=2)
    )


def test_an_empty_source_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    """Path("") is ".": `hybridlm prepare "" OUT` read every .txt under the current directory as the corpus."""
    (tmp_path / "notes.txt").write_text("not meant as a corpus")
    monkeypatch.chdir(tmp_path)
    for source in ("", "  "):
        with pytest.raises(DataError, match=r"^source: empty; name a \.txt or \.jsonl file or folder"):
            load_corpus(source, ByteTokenizer(), key="source")


def test_an_end_of_document_token_past_the_vocabulary_is_refused_when_the_tokenizer_loads(tmp_path):
    """A tokenizer.json whose ids have gaps may hold its end-of-document token at or past its number of tokens:
    the id went into every document unchecked (past 65,535 an OverflowError; below, an id the embedding lacks)."""
    _word_level({"a": 0, "b": 1, "<|endoftext|>": 3}, tmp_path / "gap.json", unk="a")
    with pytest.raises(DataError, match=r"gap\.json: end-of-document token '<\|endoftext\|>' has id 3, past the"):
        HFTokenizer(tmp_path / "gap.json")
    _word_level({"a": 0, "b": 1, "</s>": 70000}, tmp_path / "far.json", unk="a")
    with pytest.raises(DataError, match=r"far\.json: end-of-document token '</s>' has id 70000, past the"):
        build_tokenizer(str(tmp_path / "far.json"), eos_token="</s>")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip archive, as np.savez writes"])
def test_a_truncated_or_foreign_docs_npy_is_named(tmp_path, content):
    """An empty docs.npy (a copy cut short) raised EOFError, a zip archive AttributeError: neither named the file."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    if content:
        np.savez(tmp_path / "z.npz", docs=np.array([0, 8]))
        content = (tmp_path / "z.npz").read_bytes()
    (tmp_path / "prep" / "docs.npy").write_bytes(content)
    with pytest.raises(DataError, match=r"prep: not a prepared corpus \(docs\.npy"):
        load_corpus(str(tmp_path / "prep"), tok)


def test_a_zip_archive_cut_short_as_docs_npy_is_named(tmp_path):
    """A .npz archive cut short under the name raised zipfile.BadZipFile, which named no file."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    np.savez(tmp_path / "z.npz", docs=np.array([0, 8]))
    (tmp_path / "prep" / "docs.npy").write_bytes((tmp_path / "z.npz").read_bytes()[:30])
    with pytest.raises(DataError, match=r"prep: not a prepared corpus \(docs\.npy: "):
        load_corpus(str(tmp_path / "prep"), tok)


def test_a_prepared_corpus_without_its_meta_json_is_named_as_one(tmp_path):
    """Token files without meta.json were read as a text folder: "no .txt or .jsonl files under" it."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    (tmp_path / "prep" / "meta.json").unlink()
    with pytest.raises(DataError, match=r"prep: not a prepared corpus \(.*meta\.json"):
        load_corpus(str(tmp_path / "prep"), tok)


def test_a_text_file_that_is_not_utf8_names_its_line_and_column(tmp_path):
    """The error gave the byte's offset in the whole file (after a byte-order mark), not a line to open."""
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\nthree \xff here\n")
    with pytest.raises(DataError, match=r"a\.txt:3: not UTF-8 \(byte 0xff at column 7\)"):
        list(text_documents(str(tmp_path / "a.txt")))


def _zipped(text: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("corpus.jsonl", text)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "pack", "what"),
    [
        ("corpus.jsonl", gzip.compress, "gzip-compressed"),
        ("corpus.txt", bz2.compress, "bzip2-compressed"),
        ("corpus.jsonl", lzma.compress, "xz-compressed"),
        ("corpus.jsonl", lambda text: b"(\xb5/\xfd\x04\x58" + text, "zstd-compressed"),  # (a frame's header)
        ("corpus.zip", _zipped, "a zip archive"),
        ("corpus.jsonl", lambda text: b"PAR1\x15\x04\x15\x80" + text + b"\xff\x00PAR1", "a Parquet file"),
        ("corpus.txt", lambda text: text.decode().encode("utf-16"), "UTF-16 text"),  # (Notepad's "Unicode")
        ("corpus.jsonl", lambda text: text.decode().encode("utf-16"), "UTF-16 text"),  # (PowerShell 5's >)
        ("corpus.jsonl.gz", lambda text: gzip.compress(_zipped(text)), "a zip archive"),  # (what the .gz held)
    ],
)
def test_a_compressed_or_binary_source_is_named_as_such(tmp_path, name, pack, what):
    """A ``corpus.jsonl.gz`` named as the source was read as text: "corpus.jsonl.gz:1: not UTF-8 (byte 0x8b at column
    2)", as if the text held a bad byte, not saying that compressed files are not read or what to do; so were UTF-16
    files (Windows writes them), and compressed files under a text file's name. (A name that says the compression is
    read through it: tests/train/test_formats.py.)"""
    (tmp_path / name).write_bytes(pack(b'{"text": "hello"}\n' * 50))
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / name))}: {what}, not UTF-8 text; .* first"):
        load_corpus(str(tmp_path / name), ByteTokenizer())
    (tmp_path / "PAR1.txt").write_bytes(b"PAR1 is a name\n\xff")  # a text with a bad byte: named by line and column
    with pytest.raises(DataError, match=r"PAR1\.txt:2: not UTF-8 \(byte 0xff at column 1\)"):
        load_corpus(str(tmp_path / "PAR1.txt"), ByteTokenizer())


def test_a_source_without_documents_is_named_by_its_path(tmp_path):
    """A JSON Lines file of blank lines alone was refused as "the corpus has no documents", naming no file."""
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"^source: \S*blank\.jsonl: the corpus has no documents"):
        load_corpus(str(tmp_path / "blank.jsonl"), ByteTokenizer(), key="source")


def test_unsigned_document_offsets_out_of_order_are_refused(tmp_path):
    """np.diff of unsigned offsets wraps around: 10 then 5 passed the order check as a step of 2**64 - 5."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["hello", "world", "x"], tok), tmp_path / "prep", tok, "test")
    np.save(tmp_path / "prep" / "docs.npy", np.array([0, 10, 5, 14], dtype=np.uint64))
    with pytest.raises(DataError, match=r"docs\.npy must hold non-decreasing document offsets from 0"):
        load_corpus(str(tmp_path / "prep"), tok)


@pytest.mark.parametrize(
    "name, cut",
    [("meta.json", 30), ("docs.npy", -5), ("docs.npy", 20), ("tokens.bin", -1)],
)
def test_a_prepared_file_cut_short_is_named(tmp_path, name, cut):
    """A file cut short (a copy interrupted) was reported by the reader's own words alone ("Unterminated string
    starting at: line 2 column 13", "Size of available data is not a multiple ..."), naming no file."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["hello", "world", "x"], tok), tmp_path / "prep", tok, "test")
    path = tmp_path / "prep" / name
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(DataError, match=rf"prep: not a prepared corpus \({re.escape(name)}: "):
        load_corpus(str(tmp_path / "prep"), tok)


def test_unsigned_document_offsets_read_as_any_other(tmp_path):
    """Offsets written as uint64 (another tool's) passed the checks, but a split's rows then added uint64 offsets
    to int64 positions: numpy made them float64, which cannot index the tokens."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["hello", "world", "x" * 40], tok), tmp_path / "prep", tok, "test")
    starts = np.load(tmp_path / "prep" / "docs.npy")
    np.save(tmp_path / "prep" / "docs.npy", starts.astype(np.uint64))
    stream = load_corpus(str(tmp_path / "prep"), tok)
    train, _ = split(stream, 0.3, seed=0)
    rows = PackedRows(train, 4).rows(np.arange(2))
    assert rows["input_ids"].dtype == torch.int64 and rows["input_ids"].shape == (2, 4)


def test_a_file_of_a_prepared_corpus_is_refused_as_text(tmp_path):
    """data.source=OUT/tokens.bin (the file, not its folder) was read as one text document: a byte tokenizer's
    uint16 ids of ASCII text are valid UTF-8 ('h', NUL, 'e', NUL, ...), so training went on, on that."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["hello", "world"], tok), tmp_path / "prep", tok, "test")
    for name in ("tokens.bin", "docs.npy"):
        with pytest.raises(DataError, match=rf"data\.source: \S*{name} is a file of the prepared corpus \S*prep; nam"):
            load_corpus(str(tmp_path / "prep" / name), tok)


def test_prepare_from_a_prepared_corpus_of_another_tokenizer_names_its_flags(tmp_path, capsys):
    """prepare's refusal named data.tokenizer and data.eos_token, settings of train, not its own flags."""
    from hybridlm.cli import main

    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["a b", "b a"], tok), tmp_path / "prep", tok, "test")
    _word_level({"<|endoftext|>": 0, "a": 1, "b": 2}, tmp_path / "w.json")
    assert (
        main(["prepare", str(tmp_path / "prep"), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "w.json")]) == 2
    )
    err = capsys.readouterr().err
    assert "but --tokenizer has vocab 3 (eos 0)" in err and "data.tokenizer" not in err, err


def test_a_run_files_source_and_tokenizer_may_start_with_a_tilde(tmp_path, monkeypatch):
    """A run file's string reaches no shell: "~/corpus" is the home folder's, as on a command line."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("tilde")
    assert load_corpus("~/corpus", ByteTokenizer()).num_tokens == len("tilde") + 1
    _word_level({"<|endoftext|>": 0, "a": 1}, tmp_path / "tokenizer.json")
    assert build_tokenizer("~/tokenizer.json").vocab_size == 2
    with pytest.raises(DataError, match="~nobody_here/x does not exist"):  # no such user: a name, as the shell keeps it
        load_corpus("~nobody_here/x", ByteTokenizer())


def test_a_corpus_or_split_of_empty_documents_is_refused(tmp_path):
    """Every label of such rows crosses into another document: a run trained on nothing, showing a loss of 0."""
    tok = ByteTokenizer()
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n' * 40)
    with pytest.raises(DataError, match=r"^the corpus holds only empty documents \(40\), no label to learn; add text$"):
        PackedRows(load_corpus(str(tmp_path / "empty.jsonl"), tok), 8)
    stream = tokenize_documents(["some text " * 20, *[""] * 20], tok)
    with pytest.raises(DataError, match=r"the validation split holds only empty documents \(3\), no label to learn"):
        PackedRows(stream.select(np.array([4, 7, 9])), 2, "the validation split")
    assert PackedRows(stream.select(np.array([0, 7])), 2).num_rows > 0


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"version": 3}, "meta.json: version 3 is newer than this hybridlm reads (2)"),
        ({"version": "1"}, "meta.json: version must be a positive integer, got '1'"),
        ({"format": "hybridlm-checkpoint"}, "meta.json: format must be 'hybridlm-tokens', got 'hybridlm-checkpoint'"),
    ],
)
def test_a_prepared_corpus_of_another_format_or_a_newer_version_is_refused(tmp_path, edit, message):
    """Checkpoints refuse a newer format_version; a prepared corpus's meta.json was read as version 1, whatever it
    said."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert (meta["format"], meta["version"]) == ("hybridlm-tokens", 1)
    (tmp_path / "prep" / "meta.json").write_text(json.dumps(meta | edit))
    with pytest.raises(DataError, match=re.escape(message)):
        load_corpus(str(tmp_path / "prep"), tok)


def test_a_text_folder_leaves_hidden_files_and_folders_out(tmp_path):
    """Jupyter's .ipynb_checkpoints copies added documents twice; macOS's ._x.txt (binary) failed as not UTF-8."""
    (tmp_path / "c" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "c" / "a.txt").write_text("top")
    (tmp_path / "c" / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("top")
    (tmp_path / "c" / "._a.txt").write_bytes(b"\x00\x05\x16\x07\xff")
    assert list(text_documents(str(tmp_path / "c"))) == ["top"]
    (tmp_path / ".hidden_parent" / "data").mkdir(parents=True)  # only names under the folder count
    (tmp_path / ".hidden_parent" / "data" / "b.txt").write_text("kept")
    assert list(text_documents(str(tmp_path / ".hidden_parent" / "data"))) == ["kept"]


def test_a_text_folder_reads_linked_folders_once_and_names_a_dangling_link(tmp_path):
    """rglob read linked files but silently left out linked folders (a corpus of linked shards lost them)."""
    (tmp_path / "shards" / "sub").mkdir(parents=True)
    (tmp_path / "shards" / "sub" / "a.txt").write_text("linked")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "b.txt").write_text("own")
    (tmp_path / "c" / "shards").symlink_to(tmp_path / "shards")
    (tmp_path / "c" / "again").symlink_to(tmp_path / "shards")  # the same real folder: read once
    (tmp_path / "shards" / "loop").symlink_to(tmp_path / "c")  # a link back up: no endless walk
    assert sorted(text_documents(str(tmp_path / "c"))) == ["linked", "own"]
    (tmp_path / "c" / "gone.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(DataError, match=r"gone\.txt: a link to .*missing\.txt, which does not exist"):
        list(text_documents(str(tmp_path / "c")))


def test_a_dangling_link_to_a_folder_of_the_corpus_is_named(tmp_path):
    """A linked shard folder whose target is gone (a disk not mounted) is listed among the files, not the folders,
    and was left out in silence because its name has no .txt or .jsonl extension: the corpus lost the shard."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("own")
    (tmp_path / "c" / "shard2").symlink_to(tmp_path / "unmounted" / "shard2", target_is_directory=True)
    with pytest.raises(DataError, match=r"shard2: a link to .*unmounted/shard2, which does not exist"):
        list(text_documents(str(tmp_path / "c")))


def refuse_to_list(monkeypatch, name: str) -> None:
    """Folders called ``name`` cannot be listed (as without the permission: the tests run as root)."""
    scandir = os.scandir

    def refusing(path="."):
        if os.path.basename(os.fspath(path)) == name:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)


def test_a_text_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """rglob skipped a subfolder it was not allowed to list, and its documents with it, without a word."""
    (tmp_path / "c" / "locked").mkdir(parents=True)
    (tmp_path / "c" / "a.txt").write_text("top")
    (tmp_path / "c" / "locked" / "b.txt").write_text("hidden from the reader")
    refuse_to_list(monkeypatch, "locked")
    with pytest.raises(DataError, match=r"locked: cannot read this folder of the corpus \(Permission denied\)"):
        list(text_documents(str(tmp_path / "c")))


def test_the_lost_and_found_of_a_disk_root_is_left_out_not_refused(tmp_path, monkeypatch):
    """A corpus at a disk's root holds the file system's lost+found, which only root may list: refusing folders
    that cannot be listed refused the whole corpus. Elsewhere a folder of that name is the corpus's own."""
    (tmp_path / "c" / "lost+found").mkdir(parents=True)
    (tmp_path / "c" / "a.txt").write_text("top")
    (tmp_path / "c" / "lost+found" / "b.txt").write_text("file system's")
    refuse_to_list(monkeypatch, "lost+found")
    with pytest.raises(DataError, match=r"lost\+found: cannot read this folder of the corpus"):
        list(text_documents(str(tmp_path / "c")))  # not a disk's root: a folder of the corpus, refused
    monkeypatch.setattr(os.path, "ismount", lambda path: os.fspath(path) == str(tmp_path / "c"))
    assert list(text_documents(str(tmp_path / "c"))) == ["top"]


def test_the_lost_and_found_of_a_linked_disk_root_is_left_out_too(tmp_path, monkeypatch):
    """os.path.ismount is False for a link (it looks at the link itself), so the lost+found of a disk reached
    through one (a linked shard, or the corpus given as a link to the disk) was listed, and refused the corpus."""
    import posixpath

    disk = tmp_path / "disk"
    (disk / "lost+found").mkdir(parents=True)
    (disk / "a.txt").write_text("shard")
    (disk / "lost+found" / "b.txt").write_text("file system's")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "own.txt").write_text("own")
    (tmp_path / "c" / "shard").symlink_to(disk)
    (tmp_path / "data").symlink_to(disk)
    refuse_to_list(monkeypatch, "lost+found")
    real_ismount = posixpath.ismount

    def ismount(path):  # disk is a mount point; a link never is one, as for the real function
        return not os.path.islink(path) and (os.path.realpath(path) == os.path.realpath(disk) or real_ismount(path))

    monkeypatch.setattr(os.path, "ismount", ismount)
    assert sorted(text_documents(str(tmp_path / "c"))) == ["own", "shard"]
    assert list(text_documents(str(tmp_path / "data"))) == ["shard"]


@pytest.mark.parametrize("name", ["meta.json", "docs.npy", "tokens.bin"])
def test_a_fifo_in_a_prepared_corpus_is_refused_not_waited_on(tmp_path, name):
    """A FIFO under one of the names (a folder from someone else) blocked the read forever."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    (tmp_path / "prep" / name).unlink()
    os.mkfifo(tmp_path / "prep" / name)
    with (
        fifos_never_read(tmp_path / "prep" / name),  # (a read would hang the suite, not fail the test)
        pytest.raises(DataError, match=rf"prep: not a prepared corpus \({re.escape(name)}: not a regular file\)"),
    ):
        load_corpus(str(tmp_path / "prep"), tok)


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl", "corpus"])
def test_a_fifo_as_the_source_is_refused_not_waited_on(tmp_path, name):
    """``data.source`` naming a FIFO (``<(zcat corpus.txt.gz)``, a pipe left by a tool) blocked the run forever in
    its read."""
    os.mkfifo(tmp_path / name)
    with (
        fifos_never_read(tmp_path / name),  # (a read would hang the suite, not fail the test)
        pytest.raises(DataError, match=rf"^data\.source: {re.escape(str(tmp_path / name))}: not a regular file$"),
    ):
        load_corpus(str(tmp_path / name), ByteTokenizer())


@pytest.mark.parametrize("kind", ["fifo", "socket", "link to a fifo"])
@pytest.mark.parametrize("name", ["shard.txt", "sub/shard.JSONL"])
def test_a_pipe_or_socket_named_like_a_document_in_a_text_folder_is_refused_by_name(tmp_path, monkeypatch, name, kind):
    """A FIFO or socket named ``*.txt`` / ``*.jsonl`` inside a folder of text was passed over without a word: a
    document the user placed went missing (``data.source`` naming one itself is refused). Other names are not read,
    and stay passed over."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "kept.txt").write_text("kept")
    special = corpus / name
    target = tmp_path / "pipe" if kind == "link to a fifo" else special
    if kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        monkeypatch.chdir(special.parent)  # a socket's path is at most 107 bytes: bound by its name alone
        sock.bind(special.name)
    else:
        os.mkfifo(target)
        if target != special:
            special.symlink_to(target)
    try:
        with (
            fifos_never_read(target),  # (a read would hang the suite, not fail the test)
            pytest.raises(DataError, match=rf"^{re.escape(str(special))}: named like a document .* not a regular file"),
        ):
            load_corpus(str(corpus), ByteTokenizer())
        moved = special.rename(corpus / "sub" / "shard.fifo")  # not a document's name: not read, not refused
        with fifos_never_read(moved if target == special else target):
            assert list(text_documents(str(corpus))) == ["kept"]
    finally:
        if kind == "socket":
            sock.close()


def test_a_docs_npy_header_claiming_more_offsets_than_it_holds_allocates_nothing(tmp_path):
    """np.load allocated the header's shape before reading: 10**15 offsets (a few bytes of header) were a
    MemoryError blaming the model and batch sizes, not the file."""
    tok = ByteTokenizer()
    write_prepared(tokenize_documents(["one", "two"], tok), tmp_path / "prep", tok, "test")
    file = tmp_path / "prep" / "docs.npy"
    old, new = b"(3,), }", b"(1000000000000000,), }"  # the header's padding makes room: its length stays
    file.write_bytes(file.read_bytes().replace(old + b" " * (len(new) - len(old)), new, 1))
    assert new in file.read_bytes()
    with pytest.raises(DataError, match=r"prep: not a prepared corpus \(docs\.npy: "):
        load_corpus(str(tmp_path / "prep"), tok)


@pytest.mark.parametrize("name", ["corpus_text_document", "corpus_text_document.bin", "corpus_text_document.idx"])
def test_a_megatron_indexed_dataset_is_named_as_such(tmp_path, name):
    """Megatron's --data-path prefix was refused as "does not exist", and its .bin of token ids was read as text
    ("not UTF-8"), neither saying that the format is not read nor what to do."""
    (tmp_path / "corpus_text_document.bin").write_bytes(bytes(range(256)))
    (tmp_path / "corpus_text_document.idx").write_bytes(b"MMIDIDX\x00\x00")
    with pytest.raises(DataError, match=r"is a Megatron-LM indexed dataset .*hybridlm prepare"):
        load_corpus(str(tmp_path / name), ByteTokenizer())


# -- batched tokenization, streamed prepare ---------------------------------------------------------------------


def _awkward_corpus(folder):
    """A folder of the inputs whose bytes are easy to get wrong: byte-order marks, CRLF and CR line ends, empty
    documents (an empty file, a BOM alone, an empty record), multi-byte UTF-8 and JSON escapes of it, a blank line."""
    folder.mkdir()
    (folder / "a.txt").write_bytes(
        b"\xef\xbb\xbfline one\r\nline two \xe2\x9c\x93\r\n\xe4\xb8\xad\xe6\x96\x87 caf\xc3\xa9\r"
    )
    (folder / "b.txt").write_bytes(b"")
    (folder / "c.txt").write_bytes(b"\xef\xbb\xbf")
    records = [
        json.dumps({"text": "h\u00e9llo \u2713 \U0001f600 " * (i % 4) + str(i)}, ensure_ascii=i % 2 == 0)
        for i in range(12)
    ]
    records[3:3] = [json.dumps({"text": ""}), "", json.dumps({"text": "a\r\nb\rc"})]
    (folder / "d.jsonl").write_bytes(("\r\n".join(records[:7]) + "\n" + "\n".join(records[7:])).encode())
    (folder / "e.ndjson").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first \u00fc"}).encode() + b"\n")
    return folder


def _byte_level_bpe(path):
    """A small byte-level BPE tokenizer.json (every byte has a token, as in GPT-2's), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], initial_alphabet=alphabet)
    hf.train_from_iterator(["hello world caf\u00e9 \u2713 line one two"] * 20, trainer)
    hf.save(str(path))
    return build_tokenizer(str(path))


def _one_document_at_a_time(docs, tok):
    """The stream as prepare built it before batches: ``encode`` per document, all of them kept, then joined."""
    ids = [np.asarray([*tok.encode(text), tok.eos_id], dtype=np.uint16) for text in docs]
    return TokenStream(np.concatenate(ids), np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64))


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_in_batches_writes_the_files_of_one_document_at_a_time(tmp_path, monkeypatch, kind):
    """Batches cut by count and by characters, streamed to disk, give the same bytes in every file as the
    document-at-a-time path (checked once against the previous release's `prepare` as well)."""
    from hybridlm.train import data

    corpus = _awkward_corpus(tmp_path / "corpus")
    tok = ByteTokenizer() if kind == "byte" else _byte_level_bpe(tmp_path / "tok.json")
    monkeypatch.setattr(data, "BATCH_DOCS", 3)
    monkeypatch.setattr(data, "BATCH_CHARS", 40)
    docs = list(text_documents(str(corpus)))
    assert len(docs) == 18 and "" in docs and "a\r\nb\rc" in docs
    out, meta = data.prepare_corpus(str(corpus), tmp_path / "new", tok)
    old = _one_document_at_a_time(docs, tok)
    ref = write_prepared(old, tmp_path / "ref", tok, str(corpus))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for file in ref.iterdir():
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    assert (out / "tokens.bin").read_bytes() == old.tokens.astype("<u2").tobytes()
    assert np.load(out / "docs.npy").tolist() == old.doc_starts.tolist()
    assert meta == json.loads((out / "meta.json").read_text())
    assert (meta["num_docs"], meta["num_tokens"]) == (18, old.num_tokens)


def test_prepare_appends_each_batch_to_its_token_file_while_it_reads(tmp_path, monkeypatch):
    """prepare kept every document's ids in memory and wrote them after the last document was read (its peak
    memory about twice the token array); now each batch is on disk, in the hidden folder, before the next is read."""
    from hybridlm.cli import main
    from hybridlm.train import data

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(6)))
    monkeypatch.setattr(data, "BATCH_DOCS", 2, raising=False)
    on_disk, decode = [], data.decode_line

    def reading(raw, where):  # (called for each line as it is read)
        on_disk.append(sum(f.stat().st_size for f in tmp_path.glob(".out.tmp-*/tokens.bin")))
        return decode(raw, where)

    monkeypatch.setattr(data, "decode_line", reading)
    assert main(["prepare", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--no-progress"]) == 0
    assert on_disk == [0, 0, 44, 44, 88, 88]  # two documents of 10 bytes and an end token, 2 bytes an id


def test_documents_are_tokenized_a_batch_at_a_time(monkeypatch):
    """One encode_batch call per batch (a tokenizer.json's threads share it), cut at BATCH_DOCS documents or at
    BATCH_CHARS characters; the ids are those of one document at a time."""
    from hybridlm.train import data

    calls = []

    class Counting(ByteTokenizer):
        def encode(self, text):
            calls.append("encode")
            return super().encode(text)

        def encode_batch(self, texts):
            calls.append(len(texts))
            return super().encode_batch(texts)

    docs = [f"doc {i}" for i in range(10)]  # 5 characters each
    monkeypatch.setattr(data, "BATCH_DOCS", 4, raising=False)
    stream = tokenize_documents(docs, Counting())
    assert calls == [4, 4, 2]
    old = _one_document_at_a_time(docs, ByteTokenizer())
    assert stream.tokens.tolist() == old.tokens.tolist() and stream.doc_starts.tolist() == old.doc_starts.tolist()
    calls.clear()
    monkeypatch.setattr(data, "BATCH_CHARS", 12, raising=False)  # the third document reaches 15 characters
    tokenize_documents(docs, Counting())
    assert calls == [3, 3, 3, 1]


def test_a_bad_line_inside_a_batch_is_named_and_nothing_is_left(tmp_path, capsys):
    """A record the reader refuses in the middle of a batch is named by its own line; the hidden folder goes."""
    from hybridlm.cli import main

    lines = [json.dumps({"text": f"document {i}"}) for i in range(9)]
    lines[4] = '{"text": 5}'
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["prepare", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'c.jsonl'}:5: field 'text' is not a string but a number\n"
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(line.encode() for line in lines[:4]) + b'\n{"text": "\xff"}\n')
    assert main(["prepare", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'c.jsonl'}:5: not UTF-8 (byte 0xff at column 11)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_the_tokenizing_bar_counts_documents(tmp_path, monkeypatch, capsys):
    from hybridlm.cli import main
    from hybridlm.train import data

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(7)))
    monkeypatch.setattr(data, "BATCH_DOCS", 3, raising=False)
    assert main(["prepare", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--progress"]) == 0
    assert re.search(r"tokenizing: 7doc \[", capsys.readouterr().err)


# -- blends ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights", [[0.7, 0.3], [1, 2, 3], [5, 1, 1, 1, 1, 0.01], [1] * 7, [1e-6, 1], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
)
def test_a_blend_holds_its_weights_within_depth_rows_at_every_prefix(weights):
    """The documented precision: among the first n positions a source holds within ceil(log2 D) / 2 rows of w_d * n
    (each level of the tree rounds once), at every n; counts() says how many without walking them, and the
    positions of a source number its own stream 0, 1, 2, ... in order."""
    from hybridlm.train.data import Blend

    blend, n = Blend(weights), 60_000
    source, k = blend.locate(np.arange(n))
    held = np.zeros((n + 1, len(weights)), dtype=np.int64)
    held[1:][np.arange(n), source] = 1
    held = held.cumsum(0)
    error = np.abs(held - np.arange(n + 1)[:, None] * blend.weights[None, :])
    assert error.max() <= blend.depth / 2 + 1e-4, error.max()  # (+ the weights' 30-bit rounding, n * 2**-31)
    assert np.allclose(blend.weights.sum(), 1) and blend.depth == int(np.ceil(np.log2(len(weights))))
    for m in (0, 1, 977, n):
        assert blend.counts(m).tolist() == held[m].tolist()
    for d in range(len(weights)):
        assert k[source == d].tolist() == list(range(held[-1, d]))
    far = 10**15 + np.arange(1000)  # exact integer arithmetic far along the stream: still within the bound
    assert np.abs(blend.counts(10**15 + 1000) - blend.counts(10**15) - 1000 * blend.weights).max() < 2 * blend.depth
    assert blend.locate(far)[0].tolist() == [int(np.argmax(blend.counts(i + 1) - blend.counts(i))) for i in far]


def test_a_blend_refuses_weights_that_are_no_mix():
    from hybridlm.train.data import Blend

    for bad in ([], [1, 0], [1, -1], [1, float("nan")], [1, float("inf")]):
        with pytest.raises(ValueError, match="positive finite"):
            Blend(bad)


def test_one_source_of_a_blend_is_the_single_corpus_s_order():
    """data.source = ["x"] trains on the rows of data.source = "x", in the same order: the same permutations."""
    plain = Sampler(10, 4, seed=3)
    for listed in (Sampler([10], 4, seed=3), Sampler([10], 4, seed=3, weights=[2.5])):
        assert all(listed.global_rows(s).tolist() == plain.global_rows(s).tolist() for s in range(8))


def test_the_data_order_is_pinned_as_checkpoints_recorded_it():
    """A checkpoint records how many rows were consumed, not which: a resume, also by a newer hybridlm, replays the
    run only while the order is this one. A single corpus's epoch e (a list of one included) is
    default_rng([seed, e]).permutation(rows), as before blends; a blend's source d's is default_rng([seed, e, d]),
    at the positions Blend gives it (the left half of the tree takes the odd source out: [0, 1] | [2])."""
    from hybridlm.train.data import Blend

    want = np.concatenate([np.random.default_rng([3, e]).permutation(10) for e in (0, 1)])
    for rows in (10, [10]):
        sampler = Sampler(rows, 4, seed=3)
        assert np.concatenate([sampler.global_rows(s) for s in range(5)]).tolist() == want.tolist()
    assert Blend([1, 1, 1]).locate(np.arange(6))[0].tolist() == [0, 2, 1, 0, 2, 1]
    source, k = Blend([0.6, 0.4]).locate(np.arange(10))
    assert source.tolist() == [0, 1, 0, 1, 0, 0, 1, 0, 1, 0]
    perms = {(e, d): np.random.default_rng([0, e, d]).permutation(n) for e in (0, 1, 2) for d, n in enumerate((3, 2))}
    want = [3 * d + perms[(kk // (3, 2)[d], d)][kk % (3, 2)[d]] for d, kk in zip(source.tolist(), k.tolist())]
    sampler = Sampler([3, 2], 5, seed=0, weights=[0.6, 0.4])
    assert [*sampler.global_rows(0), *sampler.global_rows(1)] == want


def test_a_tiny_weight_still_gets_its_rows():
    """A node's share is clamped into (0, 2**30): a weight of 1e-12 beside 1 gets one row in 2**30, on either side
    of the tree, rather than none (its validation loss was logged for a source never trained on)."""
    from hybridlm.train.data import Blend

    assert Blend([1e-12, 1]).counts(1 << 30).tolist() == [1, (1 << 30) - 1]
    assert Blend([1, 1e-12]).counts(1 << 30).tolist() == [(1 << 30) - 1, 1]


def test_a_blend_s_rows_are_a_pure_function_of_the_position():
    """Rows numbered source after source (source 1's row r is 7 + r); each source's rows run through epochs of its
    own permutation (the small one repeats sooner); a resume, also at another batch size, continues the stream."""
    whole = Sampler([7, 3], 4, seed=1, weights=[0.6, 0.4])
    stream_of_rows = [r for step in range(15) for r in whole.global_rows(step).tolist()]
    big, small = [r for r in stream_of_rows if r < 7], [r - 7 for r in stream_of_rows if r >= 7]
    assert (len(big), len(small)) == tuple(whole.blend.counts(60)) == (36, 24)
    for rows, n in ((big, 7), (small, 3)):  # whole epochs, each a permutation of its own
        epochs = [sorted(rows[i : i + n]) for i in range(0, len(rows) - n + 1, n)]
        assert all(e == list(range(n)) for e in epochs)
    assert whole.epochs(60).tolist() == [36 / 7, 24 / 3]
    again = Sampler([7, 3], 4, seed=1, weights=[0.6, 0.4])
    assert [again.global_rows(s).tolist() for s in (9, 2)] == [stream_of_rows[36:40], stream_of_rows[8:12]]
    resumed = Sampler([7, 3], 8, seed=1, weights=[0.6, 0.4])
    resumed.resume_at(step=5, rows=20)
    assert resumed.global_rows(5).tolist() == stream_of_rows[20:28]
    assert resumed.global_rows(6).tolist() == stream_of_rows[28:36]
    ranks = [Sampler([7, 3], 4, 1, rank=r, world_size=2, weights=[0.6, 0.4]).local_rows(3) for r in range(2)]
    assert [*ranks[0], *ranks[1]] == stream_of_rows[12:16]
    assert Sampler([7, 3], 4, seed=2, weights=[0.6, 0.4]).global_rows(0).tolist() != stream_of_rows[:4]


def test_blended_rows_cut_each_row_from_its_source_in_the_order_asked():
    from hybridlm.train.data import BlendedRows

    a, b = PackedRows(_stream([30, 20]), 8), PackedRows(_stream([9, 40]), 8)
    rows = BlendedRows([a, b])
    assert (rows.num_rows, rows.offsets.tolist()) == (a.num_rows + b.num_rows, [0, a.num_rows, rows.num_rows])
    index = np.array([a.num_rows + 2, 0, a.num_rows, 5, 1])
    got = rows.rows(index)
    for i, r in enumerate(index.tolist()):
        want = a.rows(np.array([r])) if r < a.num_rows else b.rows(np.array([r - a.num_rows]))
        for key in ("input_ids", "labels", "doc_ids"):
            assert torch.equal(got[key][i], want[key][0]), (i, key)
    assert rows.rows(np.array([], dtype=np.int64))["input_ids"].shape == (0, 8)


def test_a_blend_s_sources_are_labelled_short_and_unique():
    from hybridlm.train.data import source_labels

    assert source_labels(["builtin:pydoc", "data/web.jsonl", "code/", "~/m a+th.txt"]) == [
        "pydoc",
        "web",
        "code",
        "m_a_th",
    ]
    assert source_labels(["a/data.jsonl", "b/data.jsonl", "c.txt"]) == ["data-1", "data-2", "c"]
    assert source_labels(["web.jsonl.zst", "code.txt.gz", "fw-000.parquet", "v1.2.jsonl"]) == [
        "web",
        "code",
        "fw-000",
        "v1.2",
    ]
    # A numbered label that is another source's own name: numbered again, so no two sources share a metrics key.
    labels = source_labels(["a/data.jsonl", "b/data.jsonl", "data-1.txt"])
    assert labels == ["data-1-1", "data-2", "data-1-3"]


def test_a_blend_refuses_one_file_named_twice_through_other_spellings(tmp_path, monkeypatch):
    """An absolute path and a relative one, or a symbolic link, name the same corpus: refused by name, as
    data.source's validation refuses the same text twice (it trained that corpus at the sum of the weights, under
    two metrics names)."""
    from hybridlm.train.data import check_distinct_sources, same_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    (tmp_path / "link.jsonl").symlink_to("a.jsonl")
    check_distinct_sources(["a.jsonl", "builtin:pydoc", "sub/../b.jsonl"])
    for other in (str(tmp_path / "a.jsonl"), "link.jsonl", "sub/../a.jsonl"):
        assert same_source(other, "a.jsonl") and not same_source(other, "b.jsonl")
        with pytest.raises(DataError) as info:
            check_distinct_sources(["a.jsonl", "builtin:pydoc", other])
        assert str(info.value).startswith(f"data.source: {other!r} (source 3) is 'a.jsonl' (source 1) again")
    with pytest.raises(DataError, match=r"'builtin:pydoc' \(source 2\) is 'builtin:pydoc' \(source 1\) again"):
        check_distinct_sources(["builtin:pydoc", "builtin:pydoc"])
    assert not same_source("builtin:pydoc", "pydoc")


def test_the_split_of_a_single_document_names_the_source():
    with pytest.raises(DataError, match=r"data\.val_fraction: data\.source x\.txt has a single document"):
        split(_stream([50]), 0.1, 0, "data.source x.txt")
