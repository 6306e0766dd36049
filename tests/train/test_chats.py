"""Conversations as training documents: written out by a chat template, cut into learned (assistant) and context
pieces, their mask kept by ``hybridlm prepare`` and read by the packed rows as labels ignored, end to end."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm import HybridLM
from hybridlm.cli import main
from hybridlm.cli.train import chat_format
from hybridlm.errors import DataError
from hybridlm.infer.chat_template import ChatTemplate
from hybridlm.model import IGNORE_INDEX
from hybridlm.train.chats import ChatDocument, ChatFormat, chat_pieces
from hybridlm.train.data import (
    PREPARED_MASK,
    PackedRows,
    load_corpus,
    prepare_corpus,
    read_prepared,
    tokenize_documents,
)
from hybridlm.train.tokenizer import ByteTokenizer, load_tokenizer
from tests.helpers import tiny_config
from tests.infer.test_chat_template import CHATML, model_folder, ours

TOKENIZER = ByteTokenizer()
#: ChatML in plain text: the byte tokenizer reads its markup byte by byte.
PLAIN = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: A template that writes earlier answers otherwise once a later question follows (as Qwen3's drops their thinking).
REWRITING = (
    "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<a>...</a>"
    "{% else %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6."},
]


def plain_chats(text: str = PLAIN) -> ChatFormat:
    return chat_format(ChatTemplate(text, "test"), "no template")


def test_a_conversation_is_cut_into_its_answers_learned_and_the_rest_as_context():
    pieces = chat_pieces(ChatDocument(CONVERSATION, "c.jsonl:1"), plain_chats())
    assert "".join(text for text, _ in pieces) == ChatTemplate(PLAIN, "t").render(CONVERSATION, None, False)
    assert [text for text, learned in pieces if learned] == ["4.<|im_end|>\n", "6.<|im_end|>\n"]
    assert pieces[0] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
        False,
    )
    # No answer: all of it context; an answer first: learned from the start.
    assert chat_pieces(ChatDocument(CONVERSATION[:2], "w"), plain_chats()) == [
        (ChatTemplate(PLAIN, "t").render(CONVERSATION[:2], None, False), False)
    ]


def test_a_template_that_rewrites_earlier_turns_is_refused_unless_a_record_holds_one_answer():
    with pytest.raises(DataError, match=r"^c\.jsonl:3: the chat template writes .* answer 2 .* a record of its own"):
        chat_pieces(ChatDocument(CONVERSATION, "c.jsonl:3"), plain_chats(REWRITING))
    pieces = chat_pieces(ChatDocument(CONVERSATION[:3], "c.jsonl:4"), plain_chats(REWRITING))
    assert [text for text, learned in pieces if learned] == ["4.</assistant>"]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "tool", "content": "x"}], r"^c\.jsonl:2: messages\[0\]\.role must be one of system, user"),
        (["just text"], r"^c\.jsonl:2: messages\[0\] must be a \{role, content\} object"),
        ([], r"^c\.jsonl:2: must be a non-empty list"),
    ],
)
def test_messages_the_chat_rules_refuse_are_named_by_their_line(messages, message):
    with pytest.raises(DataError, match=message):
        chat_pieces(ChatDocument(messages, "c.jsonl:2"), plain_chats())


def write_chats(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prepare_keeps_the_mask_and_the_rows_learn_exactly_the_answers(tmp_path):
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}]
    source = write_chats(tmp_path / "c.jsonl", [*records[:2], {"messages": [{"role": "user", "content": "hi"}]}])
    out, meta = prepare_corpus(str(source), tmp_path / "out", TOKENIZER, "messages", chats=plain_chats())
    stream, read = read_prepared(out)
    assert meta == read and meta["version"] == 2 and meta["loss_mask"] is True
    # The mask, byte by byte (the byte tokenizer's tokens): each answer's, not the end of document.
    expected_tokens, expected_mask = [], []
    for record in [*records[:2], {"messages": [{"role": "user", "content": "hi"}]}]:
        for text, learned in chat_pieces(ChatDocument(record["messages"], "x"), plain_chats()):
            expected_tokens += TOKENIZER.encode(text)
            expected_mask += [int(learned)] * len(TOKENIZER.encode(text))
        expected_tokens.append(TOKENIZER.eos_id)
        expected_mask.append(0)
    assert np.asarray(stream.tokens).tolist() == expected_tokens and np.asarray(stream.mask).tolist() == expected_mask
    assert meta["learned_tokens"] == sum(expected_mask) == len("4.<|im_end|>\n6.<|im_end|>\n4.<|im_end|>\n")
    # The rows: a label is learned exactly where its token is, within its document.
    rows = PackedRows(stream, 16)
    batch = rows.rows(np.arange(rows.num_rows))
    labels, tokens = batch["labels"].flatten(), np.asarray(expected_tokens[1 : rows.num_rows * 16 + 1])
    learned = np.asarray(expected_mask[1 : rows.num_rows * 16 + 1]) == 1
    assert (labels[learned].numpy() == tokens[learned]).all() and (labels[~learned] == IGNORE_INDEX).all()


def test_a_prepared_corpus_of_conversations_prepared_again_keeps_its_mask(tmp_path):
    source = write_chats(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"messages": "plain text, learned"}])
    first, meta = prepare_corpus(str(source), tmp_path / "one", TOKENIZER, "messages", chats=plain_chats())
    again, meta_again = prepare_corpus(str(first), tmp_path / "two", TOKENIZER)
    assert (again / PREPARED_MASK).read_bytes() == (first / PREPARED_MASK).read_bytes()
    assert {k: v for k, v in meta_again.items() if k != "source"} == {k: v for k, v in meta.items() if k != "source"}


def test_text_documents_learn_every_token_and_a_corpus_of_text_keeps_no_mask(tmp_path):
    source = write_chats(tmp_path / "t.jsonl", [{"text": "some text"}, {"text": "more"}])
    out, meta = prepare_corpus(str(source), tmp_path / "out", TOKENIZER, "text", chats=plain_chats())
    assert meta["version"] == 1 and "loss_mask" not in meta and not (out / PREPARED_MASK).exists()
    assert read_prepared(out)[0].mask is None
    # Beside conversations, a text is learned whole (its end of document too).
    mixed = tokenize_documents(["abc", ChatDocument(CONVERSATION[:3], "x")], TOKENIZER, chats=plain_chats())
    assert np.asarray(mixed.mask).tolist()[:4] == [1, 1, 1, 1]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=6), st.integers(2, 9))
def test_a_selection_of_conversations_keeps_each_token_s_mask(picks, seq_len):
    """The validation split and blends select documents: each token keeps its own mask."""
    docs = [ChatDocument(CONVERSATION[: 3 + 2 * (i % 2)], f"d{i}") if i % 3 else f"text {i}" for i in range(6)]
    stream = tokenize_documents(docs, TOKENIZER, chats=plain_chats())
    chosen = stream.select(np.array(picks))
    alone = tokenize_documents([docs[i] for i in picks], TOKENIZER, chats=plain_chats())
    pos = np.arange(chosen.num_tokens)
    assert (chosen.take(pos) == alone.tokens).all()
    assert (chosen.take(pos, values=chosen.mask) == (alone.mask if alone.mask is not None else 1)).all()
    if any(i % 3 for i in picks) and chosen.num_tokens > seq_len:
        got = PackedRows(chosen, seq_len).rows(np.arange(PackedRows(chosen, seq_len).num_rows))["labels"]
        expected = PackedRows(alone, seq_len).rows(np.arange(PackedRows(alone, seq_len).num_rows))["labels"]
        assert torch.equal(got, expected)


def test_a_corpus_that_learns_nothing_and_damaged_masks_are_refused(tmp_path):
    asked = tokenize_documents([ChatDocument(CONVERSATION[:2], "x")] * 3, TOKENIZER, chats=plain_chats())
    with pytest.raises(DataError, match=r"learns no token: its 3 conversation\(s\) hold no assistant answer"):
        PackedRows(asked, 8)
    source = write_chats(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 2)
    out, _ = prepare_corpus(str(source), tmp_path / "out", TOKENIZER, "messages", chats=plain_chats())
    (out / PREPARED_MASK).write_bytes((out / PREPARED_MASK).read_bytes()[:-1])
    with pytest.raises(DataError, match=rf"{PREPARED_MASK} holds \d+ entries for \d+ tokens"):
        read_prepared(out)
    (out / PREPARED_MASK).unlink()
    with pytest.raises(DataError, match=rf"not a prepared corpus \({PREPARED_MASK}: "):
        read_prepared(out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(DataError, match="loss_mask must be true, in a version 2"):
        read_prepared(out)


def test_training_reads_conversations_only_once_prepared(tmp_path):
    source = write_chats(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: a conversation .* hybridlm prepare SOURCE OUT --jsonl-field"):
        load_corpus(str(source), TOKENIZER, "messages")
    with pytest.raises(DataError, match=r"c\.jsonl:1: not a JSON object with a 'text' field .* --jsonl-field messages"):
        load_corpus(str(source), TOKENIZER)


def test_the_model_s_loss_on_prepared_rows_is_the_mean_over_the_answers_tokens(tmp_path):
    source = write_chats(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 4)
    out, _ = prepare_corpus(str(source), tmp_path / "out", TOKENIZER, "messages", chats=plain_chats())
    stream, _ = read_prepared(out)
    batch = PackedRows(stream, 64).rows(np.arange(3))
    model = HybridLM(tiny_config("M[*-]", vocab_size=257), seed=0).double()
    loss = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"]).loss
    logits = model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits
    pos = np.arange(3 * 64 + 1)
    learned = torch.from_numpy(np.asarray(stream.take(pos[1:], values=stream.mask)).reshape(3, 64) == 1)
    targets = torch.from_numpy(np.asarray(stream.take(pos[1:]), dtype=np.int64).reshape(3, 64))
    docs = np.searchsorted(stream.doc_starts, pos, side="right") - 1
    learned &= torch.from_numpy((docs[1:] == docs[:-1]).reshape(3, 64))
    expected = torch.nn.functional.cross_entropy(logits[learned], targets[learned])
    assert learned.sum() > 0 and torch.allclose(loss, expected, rtol=1e-12)


def test_prepare_writes_conversations_with_the_template_beside_the_tokenizer_or_given(tmp_path, capsys):
    folder = model_folder(tmp_path / "model", CHATML, "chat_template.jinja")
    source = write_chats(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}])
    tokenizer = str(folder / "tokenizer.json")
    args = ["prepare", str(source), str(tmp_path / "out"), "--jsonl-field", "messages", "--tokenizer", tokenizer]
    assert main([*args, "--no-progress"]) == 0
    said = capsys.readouterr().out
    stream, meta = read_prepared(tmp_path / "out")
    assert f"({meta['learned_tokens']:,} of them learned: the assistant's turns) of 2 documents" in said
    # <|im_end|> is one token of this tokenizer: each answer is its text, then that token and a newline, learned.
    tok = load_tokenizer(tmp_path / "out", "--tokenizer", "<|endoftext|>")
    end = tok.special_tokens()["<|im_end|>"]
    mask, ids = np.asarray(stream.mask), np.asarray(stream.tokens)
    answer = [[*tok.encode(text), end, *tok.encode("\n")] for text in ("4.", "6.", "4.")]
    assert ids[mask == 1].tolist() == [t for a in answer for t in a]
    # Each conversation's ids are those of its text tokenized whole, as generation tokenizes its prompt.
    rendered = ours(folder).render(CONVERSATION, add_generation_prompt=False)
    assert ids[: len(tok.encode(rendered)) + 1].tolist() == [*tok.encode(rendered), tok.eos_id]
    # --chat-template replaces the folder's; without either, a conversation is refused by its line.
    (tmp_path / "plain.jinja").write_text(PLAIN)
    assert (
        main(
            [
                "prepare",
                str(source),
                str(tmp_path / "out2"),
                "--jsonl-field",
                "messages",
                "--chat-template",
                str(tmp_path / "plain.jinja"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert read_prepared(tmp_path / "out2")[1]["learned_tokens"] == len("4.<|im_end|>\n6.<|im_end|>\n4.<|im_end|>\n")
    capsys.readouterr()
    assert main(["prepare", str(source), str(tmp_path / "out3"), "--jsonl-field", "messages", "--no-progress"]) == 2
    assert f"{source}:1: a conversation needs a chat template: give one with --chat-template FILE" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out3").exists()


@settings(max_examples=50, deadline=None)
@given(
    st.booleans(),
    st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), min_size=1, max_size=4),
    st.booleans(),
)
def test_any_conversation_joins_back_and_learns_exactly_its_answers_and_their_ends(system, turns, asked):
    messages = [{"role": "system", "content": "sys"}] if system else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if asked:  # (a last question without its answer: context)
        messages.append({"role": "user", "content": "and?"})
    pieces = chat_pieces(ChatDocument(messages, "x"), plain_chats())
    assert "".join(text for text, _ in pieces) == ChatTemplate(PLAIN, "t").render(messages, None, False)
    assert [text for text, learned in pieces if learned] == [f"{a}<|im_end|>\n" for _, a in turns]


def test_a_model_fine_tuned_on_prepared_conversations_keeps_the_chat_files_and_chats_as_it_learned(tmp_path, capsys):
    """prepare -> train -> the run's model folder holds the template and special tokens beside the tokenizer.json it
    was trained with, so that ``chat`` and ``serve`` write conversations as they were written for training."""
    from hybridlm.infer.chat import load_chat
    from tests.train.test_trainer import TINY_RUN

    folder = model_folder(tmp_path / "tok", CHATML, "chat_template.jinja")
    source = write_chats(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 40)
    tokenizer = str(folder / "tokenizer.json")
    prepare = ["prepare", str(source), str(tmp_path / "chats"), "--jsonl-field", "messages", "--tokenizer", tokenizer]
    assert main([*prepare, "--no-progress"]) == 0
    sets = [*TINY_RUN, "model.vocab_size=261", "train.steps=2", f"data.tokenizer={tokenizer}"]
    sets.append(f"data.source={tmp_path / 'chats'}")
    assert (
        main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", *[a for s in sets for a in ("--set", s)]])
        == 0
    )
    assert "rows of 48 · assistant turns learned only" in capsys.readouterr().out
    model = tmp_path / "run" / "model"
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        assert (model / name).read_bytes() == (folder / name).read_bytes()
    tok = load_tokenizer(model, "--tokenizer", "auto")
    chat = load_chat(model, tok)
    assert chat.template is not None and chat.template.where.endswith("chat_template.jinja")
    # The prompt chat renders for a conversation's next answer is the context piece training read before it.
    pieces = chat_pieces(ChatDocument(CONVERSATION[:3], "x"), chat_format(chat.template, "none"))
    assert chat.template.render(CONVERSATION[:2], chat.template_kwargs) == pieces[0][0] and pieces[1][1]


def test_the_mask_is_part_of_a_corpus_s_fingerprint_and_a_selection_hashes_its_own_order():
    """A resume refuses a corpus edited in place: a conversation corpus whose mask changed is another corpus."""
    stream = tokenize_documents([ChatDocument(CONVERSATION, "x"), "text"], TOKENIZER, chats=plain_chats())
    unmasked = tokenize_documents([ChatDocument(CONVERSATION, "x"), "text"], TOKENIZER, chats=plain_chats())
    unmasked.mask = None
    assert stream.fingerprint() != unmasked.fingerprint()
    assert stream.select(np.array([0, 1])).fingerprint() == stream.fingerprint()
    assert stream.select(np.array([1, 0])).fingerprint() != stream.fingerprint()
