"""A byte-level BPE tokenizer learned from a corpus (train/bpe.py, ``hybridlm tokenizer``): every text encodes and
decodes back to itself, the end-of-document token is found by name, the merges compress the corpus, and the file is
a tokenizer.json that preparing, training and transformers read."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.cli import main
from hybridlm.errors import DataError
from hybridlm.train.bpe import MIN_VOCAB, document_texts, train_bpe
from hybridlm.train.chats import ChatDocument
from hybridlm.train.data import builtin_documents
from hybridlm.train.tokenizer import HFTokenizer

DOCS = builtin_documents("pydoc")


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A 1,024-token tokenizer of the built-in corpus, as a loaded HFTokenizer (auto end-of-document token)."""
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    path.write_text(train_bpe(DOCS, 1024))
    return HFTokenizer(path)


def test_the_vocabulary_is_the_bytes_the_end_token_and_the_merges(learned):
    data = json.loads(learned.path.read_text())
    assert learned.vocab_size == 1024 and learned.eos_id == 0
    assert learned.special_tokens() == {"<|endoftext|>": 0}
    assert len(data["model"]["merges"]) == 1024 - MIN_VOCAB
    # the merges learned the corpus: fewer tokens than bytes by far (bytes alone: 1.0)
    sample = DOCS[:20]
    tokens = sum(len(learned.encode(text)) for text in sample)
    assert sum(len(text.encode()) for text in sample) / tokens > 2.5


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_encodes_and_decodes_back_to_itself(learned, text):
    """No unknown token: any character (control characters, scripts the corpus never held, lone surrogates aside,
    which UTF-8 cannot hold) comes back; and no space is added in front of a text."""
    ids = learned.encode(text)
    assert all(0 < i < learned.vocab_size for i in ids)  # (the end token only where a caller puts it)
    assert learned.decode(ids) == text


def test_learning_twice_gives_the_same_file():
    assert train_bpe(DOCS[:30], 600) == train_bpe(DOCS[:30], 600)


def test_conversations_are_learned_from_their_messages_texts():
    chat = ChatDocument(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}],
        "chats.jsonl:1",
    )
    assert list(document_texts(["a text", chat])) == ["a text", "hi", "hello"]
    merges = json.loads(train_bpe([chat] * 5, 260, min_frequency=1))["model"]["merges"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges]  # (either file format)
    assert len(merged) == 3 and all(token in "hello" or token in "hi" for token in merged), merged  # not roles'


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        (dict(vocab_size=256), "--vocab-size must be an integer >= 257 (the 256 bytes and 1 special token), got 256"),
        (dict(vocab_size=1000, min_frequency=0), "--min-frequency must be an integer >= 1, got 0"),
    ],
)
def test_a_vocabulary_without_room_or_a_zero_frequency_is_refused(kwargs, says):
    with pytest.raises(DataError, match=r"^" + says.replace("|", r"\|").replace("(", r"\(").replace(")", r"\)")):
        train_bpe(DOCS[:2], **kwargs)


def test_more_special_tokens_follow_the_end_token_and_stay_whole(tmp_path):
    """--special-token: a chat template's markers get ids 1, 2, ... and encode as one token each wherever they stand
    (not split by the merges), and decoding leaves them out, as it leaves out the end of document."""
    path = tmp_path / "tok.json"
    path.write_text(train_bpe(DOCS[:30], 700, special_tokens=["<|im_start|>", "<|im_end|>"]))
    tok = HFTokenizer(path)
    assert tok.special_tokens() == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2} and tok.eos_id == 0
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1 and 2 in ids and tok.decode(ids) == "user\nhi\n"
    with pytest.raises(DataError, match=r"--vocab-size must be an integer >= 259 \(the 256 bytes and 3 special"):
        train_bpe(DOCS[:2], 258, special_tokens=["a", "b"])
    for bad in (["<|endoftext|>"], ["x", "x"], [" "]):
        with pytest.raises(DataError, match="--special-token: each must be a distinct, non-blank text"):
            train_bpe(DOCS[:2], 300, special_tokens=bad)


def test_a_corpus_without_text_is_refused():
    with pytest.raises(DataError, match="the corpus holds no text to learn from"):
        train_bpe([], 300)


def test_the_command_writes_a_tokenizer_that_prepare_and_transformers_read(tmp_path, capsys):
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "builtin:pydoc", str(out), "--vocab-size", "2048", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}: 2,048 tokens (256 bytes, <|endoftext|> = 0, 1,791 merges); ")
    assert "bytes a token on the corpus's first 79 texts" in said
    # never replaced: a tokenizer that models and corpora were made with
    assert main(["tokenizer", "builtin:pydoc", str(out), "--vocab-size", "512"]) == 2
    assert "exists; remove it or name another file" in capsys.readouterr().err
    assert HFTokenizer(out).vocab_size == 2048

    assert main(["prepare", "builtin:pydoc", str(tmp_path / "prepared"), "--tokenizer", str(out), "--no-progress"]) == 0
    assert "of 79 documents" in capsys.readouterr().out
    # a prepared folder holds ids, not text
    assert main(["tokenizer", str(tmp_path / "prepared"), str(tmp_path / "again.json")]) == 2
    assert "a prepared folder holds token ids" in capsys.readouterr().err

    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(out), eos_token="<|endoftext|>")
    text = "def f(x):\n    return x  # ünïcode ✓"
    assert fast.decode(fast(text)["input_ids"]) == text and fast.eos_token_id == 0
