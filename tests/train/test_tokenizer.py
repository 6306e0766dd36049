"""The byte tokenizer as Hugging Face files: what an exported model carries, so transformers and a round trip
back read the same ids as the bytes the model was trained on."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm import HybridLM, save
from hybridlm.cli import main
from hybridlm.errors import DataError
from hybridlm.train.tokenizer import HF_EOS, SPEC_NAME, ByteTokenizer, build_tokenizer, exported_files, load_tokenizer
from tests.helpers import fifos_never_read, tiny_config

TEXTS = ["", "a", "héllo wörld", " two  spaces\n\ttab\r\n", "\x00\x7f\x80 control", "日本語 🙂 emoji", "~!¡¬®ÿ"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_byte")
    for name, content in ByteTokenizer().hf_files().items():
        (path / name).write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize("text", TEXTS)
def test_the_hugging_face_files_encode_each_text_as_its_bytes(hf_dir, text):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    expected = list(text.encode("utf-8"))  # the ids the model was trained on
    assert Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids == expected
    auto = AutoTokenizer.from_pretrained(hf_dir)
    assert auto(text, add_special_tokens=False)["input_ids"] == expected
    assert auto.decode(expected) == text
    assert (auto.eos_token, auto.eos_token_id, len(auto)) == (HF_EOS, 256, 257)
    assert auto.decode([*expected, 256], skip_special_tokens=True) == text


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40))
def test_any_text_round_trips_through_the_hugging_face_files(hf_dir, text):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    if HF_EOS not in text:  # the literal text of the end token reads as that token, as in GPT-2's files
        assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_a_byte_model_exported_to_nemotron_h_carries_its_tokenizer_and_comes_back_with_it(tmp_path, capsys):
    """The export had no tokenizer: transformers could not read text for it, and the model converted back
    could not generate without --tokenizer."""
    config = tiny_config("M-*-", vocab_size=257).replace(position_embedding="none")
    save(HybridLM(config, seed=0), tmp_path / "ours", extra_files=ByteTokenizer().files())
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "nemotron-h"]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == 256
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--from", "nemotron-h"]) == 0
    back = load_tokenizer(tmp_path / "back")
    assert back.eos_id == 256 and back.vocab_size == 257
    for text in TEXTS:
        assert back.encode(text) == ByteTokenizer().encode(text)
        assert back.decode(ByteTokenizer().encode(text)) == text
    capsys.readouterr()
    argv = ["--prompt", "héllo", "--max-new-tokens", "6", "--greedy", "--device", "cpu"]
    outs = []
    for folder in ("ours", "back"):
        assert main(["generate", str(tmp_path / folder), *argv]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("héllo")


def test_only_a_byte_spec_adds_files(tmp_path):
    assert exported_files(tmp_path) == {}  # no spec
    (tmp_path / SPEC_NAME).write_text(json.dumps({"type": "hf", "file": "tokenizer.json", "eos_id": 2}))
    assert exported_files(tmp_path) == {}  # its tokenizer.json travels as it is
    (tmp_path / SPEC_NAME).write_text("not json")
    assert exported_files(tmp_path) == {}
    (tmp_path / SPEC_NAME).write_text(ByteTokenizer().files()[SPEC_NAME])
    assert set(exported_files(tmp_path)) == {"tokenizer.json", "tokenizer_config.json"}


def test_the_end_token_is_special_to_the_tokenizers_package_too(hf_dir):
    """Skipping special tokens drops id 256 in the tokenizers package itself, not only in transformers."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = [*b"end. ", 256]
    assert tok.decode(ids, skip_special_tokens=True) == "end. "
    assert tok.decode(ids, skip_special_tokens=False) == "end. " + HF_EOS


def test_the_vocabulary_is_gpt2s_byte_alphabet(hf_dir):
    """Byte b is the token of GPT-2's printable stand-in for b (transformers' own table), id b: so the
    ByteLevel pre-tokenizer and decoder, which use that table, meet every byte, 0xff included."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert vocab == {char: b for b, char in bytes_to_unicode().items()} | {HF_EOS: 256}
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for b in (0, 0x7E, 0x7F, 0xAD, 0xFE, 0xFF):  # printable edges and the stand-ins around them
        assert tok.decode([b]) == bytes([b]).decode("utf-8", errors="replace"), b


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a <|endoftext|> b", [97, 32, 256, 32, 98]),  # the spaces around it stay bytes of their own
        ("x<|endoftext|>y", [120, 256, 121]),  # inside a word too
    ],
)
def test_the_end_token_takes_exactly_its_own_text(hf_dir, text, ids):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert tok.encode(text, add_special_tokens=False).ids == ids


def test_transformers_knows_no_special_token_but_the_end(hf_dir):
    """No begin, unknown or padding token: every byte is a token, and 256 ends a document."""
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(hf_dir)
    assert (auto.all_special_tokens, auto.bos_token, auto.unk_token, auto.pad_token) == ([HF_EOS], None, None, None)


@pytest.mark.parametrize("spec", ["[1]", '"byte"', "3", "null"])
def test_a_spec_that_is_not_an_object_adds_no_files(tmp_path, spec):
    """A spec file of valid JSON but not an object is no byte tokenizer: nothing added, nothing raised."""
    (tmp_path / SPEC_NAME).write_text(spec)
    assert exported_files(tmp_path) == {}
    (tmp_path / SPEC_NAME).write_text(json.dumps({"type": "byte"}))
    assert set(exported_files(tmp_path)) == {"tokenizer.json", "tokenizer_config.json"}


def test_an_empty_tokenizer_path_is_not_the_current_directory(tmp_path, monkeypatch):
    """build_tokenizer("") read Path("") (the current directory) and said ".: cannot load tokenizer (Is a directory)"."""
    from hybridlm.errors import DataError
    from hybridlm.train.tokenizer import build_tokenizer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^--tokenizer: '' is neither 'byte' nor an existing tokenizer\.json$"):
        build_tokenizer("", key="--tokenizer")


def test_byte_decode_keeps_every_byte_and_drops_only_the_end_of_document_token():
    """Every id 0..255 is a byte (255, never valid UTF-8, decodes as U+FFFD as any stray byte does); 256, the
    end of document, and ids outside the vocabulary are left out."""
    tok = ByteTokenizer()
    assert tok.decode([104, 255, 105, 256]) == "h\ufffdi"
    assert tok.decode([300, -1, 104]) == "h"
    assert tok.decode(list(range(256))) == bytes(range(256)).decode("utf-8", errors="replace")
    text = "naïve 日本語 ✓"
    assert tok.decode([*tok.encode(text), tok.eos_id]) == text


def test_a_json_file_that_is_no_tokenizer_json_says_so(tmp_path):
    """A tokenizer_config.json given as the tokenizer got only the tokenizers package's parse error ("expected ','
    or '}' at line 1 column 19") for a file that is valid JSON."""
    pytest.importorskip("tokenizers")
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"model_max_length": 2048, "eos_token": "</s>"}))
    with pytest.raises(DataError, match=r"not a tokenizers file \(no \"model\" in it\): pass the folder's tokenizer"):
        build_tokenizer(str(config))
    (tmp_path / "broken.json").write_text("{not json")  # not JSON at all: the parse error alone
    with pytest.raises(DataError) as info:
        build_tokenizer(str(tmp_path / "broken.json"))
    assert "not a tokenizers file" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"type": "x"}, "unknown tokenizer type 'x' (known: byte, hf)"),
        ({"type": None}, "unknown tokenizer type None"),
        ({"type": "byte", "eos_id": 10**30}, f"eos_id of the byte tokenizer must be 256, got {10**30}"),
        ({"type": "byte", "eos_id": "a"}, "eos_id of the byte tokenizer must be 256, got 'a'"),
        ({"type": "byte", "eos_id": -1}, "eos_id of the byte tokenizer must be 256, got -1"),
        ({"type": "byte", "eos_id": True}, "eos_id of the byte tokenizer must be 256, got True"),
        ({"type": "byte", "eos_id": 256.0}, "eos_id of the byte tokenizer must be 256, got 256.0"),
        ({"type": "byte", "vocab_size": 300}, "vocab_size of the byte tokenizer must be 257, got 300"),
    ],
)
def test_a_spec_of_unknown_type_or_contradicting_the_byte_tokenizer_is_refused(tmp_path, spec, says):
    """They loaded silently as the byte tokenizer, or ({"type": "x"}) as a Hugging Face spec missing tokenizer.json."""
    (tmp_path / SPEC_NAME).write_text(json.dumps(spec))
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / SPEC_NAME}: ") and says in str(e.value)


def test_the_specs_hybridlm_writes_still_load(tmp_path):
    """A byte spec as save writes it, or without its ids; a Hugging Face one as saved, converted or without a type."""
    from hybridlm.train.tokenizer import HFTokenizer, converted_spec

    for spec in (ByteTokenizer().files()[SPEC_NAME], json.dumps({"type": "byte"})):
        (tmp_path / SPEC_NAME).write_text(spec)
        assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for name, content in ByteTokenizer().hf_files().items():
        (hf_dir / name).write_text(content, encoding="utf-8")
    hf = HFTokenizer(hf_dir / "tokenizer.json")
    for spec in (hf.files()[SPEC_NAME], converted_spec(hf_dir, 256)[SPEC_NAME], json.dumps({"eos_id": 256})):
        (hf_dir / SPEC_NAME).write_text(spec)
        assert load_tokenizer(hf_dir).eos_id == 256


def test_a_spec_without_a_type_or_no_spec_is_the_folder_s_tokenizer_json(tmp_path):
    """No type, or no spec file, reads the folder's tokenizer.json: a Hugging Face tokenizer, not the byte one (whose
    ids the byte-level tokenizer.json shares, so only the class tells them apart)."""
    from hybridlm.train.tokenizer import HFTokenizer

    for name, content in ByteTokenizer().hf_files().items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    (tmp_path / SPEC_NAME).write_text(json.dumps({"eos_id": 256}))
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_a_spec_nested_past_the_json_parser_adds_no_files_and_names_no_end_token(tmp_path):
    """The JSON-only readers (export files, the saved end id) take a spec nested deeper than json parses as
    unreadable, as they take any unreadable one, instead of raising RecursionError."""
    from hybridlm.train.tokenizer import saved_eos_id

    (tmp_path / SPEC_NAME).write_text("[" * 100_000 + "]" * 100_000)
    assert exported_files(tmp_path) == {}
    assert saved_eos_id(tmp_path) is None
    with pytest.raises(DataError, match="unreadable"):
        load_tokenizer(tmp_path)


def test_a_fifo_tokenizer_file_in_a_model_folder_is_refused_not_waited_on(tmp_path):
    """A FIFO named tokenizer.hybridlm.json or tokenizer.json (a folder from someone else) blocked generate and
    convert --to nemotron-h forever, in the read of the spec or in the tokenizers package's."""
    import os

    from hybridlm.train.tokenizer import saved_eos_id

    with fifos_never_read(tmp_path / SPEC_NAME, tmp_path / "tokenizer.json"):  # (a read would hang the suite)
        os.mkfifo(tmp_path / SPEC_NAME)
        assert saved_eos_id(tmp_path) is None and exported_files(tmp_path) == {}  # convert --to reads these first
        with pytest.raises(DataError, match=r"tokenizer\.hybridlm\.json: not a regular file"):
            load_tokenizer(tmp_path)
        (tmp_path / SPEC_NAME).unlink()
        for spec in ({}, {SPEC_NAME: json.dumps({"type": "hf", "file": "tokenizer.json", "eos_id": 0})}):
            for name, content in spec.items():
                (tmp_path / name).write_text(content)
            os.mkfifo(tmp_path / "tokenizer.json")
            with pytest.raises(DataError, match=r"tokenizer\.json: not a regular file"):
                load_tokenizer(tmp_path)
            (tmp_path / "tokenizer.json").unlink()


def test_a_model_trained_with_a_tokenizer_json_exports_its_end_token_to_transformers_tokenizer(tmp_path):
    """A model trained with a tokenizer.json (no tokenizer_config.json beside it) was exported with config.json's
    eos_token_id but a tokenizer that knew no end token: AutoTokenizer's eos_token and eos_token_id were None."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    from hybridlm.train.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "<|im_end|>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(61)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    trained = HFTokenizer(tmp_path / "tokenizer.json", "</s>")  # as data.eos_token names it
    config = tiny_config("M-*-", vocab_size=64).replace(position_embedding="none")
    save(HybridLM(config, seed=0), tmp_path / "ours", extra_files=trained.files())
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "nemotron-h"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 2
    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (auto.eos_token, auto.eos_token_id) == ("</s>", 2)
    assert auto("w0 w1", add_special_tokens=False)["input_ids"] == trained.encode("w0 w1")
    # Special tokens the folder names itself travel instead, as they are.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "ours" / name).write_text(json.dumps({"eos_token": "<|im_end|>"}))
        assert exported_files(tmp_path / "ours") == {}
        (tmp_path / "ours" / name).unlink()


def test_a_folder_is_refused_naming_its_tokenizer_json(tmp_path):
    """A model folder (what Megatron's --tokenizer-model and Hugging Face take) failed with "cannot load tokenizer
    (Is a directory (os error 21))", not saying to name the tokenizer.json inside."""
    with pytest.raises(DataError, match=r"^data\.tokenizer: .* is a folder; give 'byte' or a tokenizer\.json file$"):
        build_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match=r"is a folder; name its tokenizer\.json: .*tokenizer\.json$"):
        build_tokenizer(str(tmp_path))


def test_a_fifo_named_as_data_tokenizer_is_refused_not_waited_on(tmp_path):
    """``--set data.tokenizer=FIFO`` (or ``prepare --tokenizer FIFO``) blocked in the tokenizers package's read
    forever, and SIGTERM did not end it: the docs say a tokenizer file that is no regular file is refused."""
    import os

    with fifos_never_read(tmp_path / "tokenizer.json"):  # (a read would hang the suite)
        os.mkfifo(tmp_path / "tokenizer.json")
        with pytest.raises(DataError, match=r"data\.tokenizer: .*tokenizer\.json: not a regular file"):
            build_tokenizer(str(tmp_path / "tokenizer.json"))


def test_the_fingerprint_tells_tokenizers_apart_but_not_their_files_spacing(tmp_path):
    """What a checkpoint records of its tokenizer: the same vocabulary saved pretty or compact is one tokenizer; other
    ids, another end of document, or the byte tokenizer, another."""
    tokenizers = pytest.importorskip("tokenizers")
    from hybridlm.train.tokenizer import tokenizer_fingerprint

    def save(vocab, name, pretty):
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tok.save(str(tmp_path / name), pretty=pretty)
        return str(tmp_path / name)

    vocab = {"<|endoftext|>": 0, "</s>": 1, "a": 2, "b": 3}
    pretty, compact = save(vocab, "pretty.json", True), save(vocab, "compact.json", False)
    swapped = save({**vocab, "a": 3, "b": 2}, "swapped.json", True)
    assert (tmp_path / "pretty.json").read_bytes() != (tmp_path / "compact.json").read_bytes()
    one = tokenizer_fingerprint(build_tokenizer(pretty))
    assert tokenizer_fingerprint(build_tokenizer(compact)) == one
    reordered = tmp_path / "reordered.json"  # the same tokenizer, its keys written in another order
    reordered.write_text(json.dumps(dict(reversed(json.loads((tmp_path / "pretty.json").read_text()).items()))))
    assert tokenizer_fingerprint(build_tokenizer(str(reordered))) == one
    others = [build_tokenizer(swapped), build_tokenizer(pretty, eos_token="</s>"), ByteTokenizer()]
    assert len({one, *map(tokenizer_fingerprint, others)}) == 4


def test_a_tokenizer_describes_itself_by_the_file_it_loaded(tmp_path):
    """files() read tokenizer.json again: one replaced during a run (retrained at its path for the next one) was
    exported into the run's model/ beside weights that had never seen its ids."""
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"

    def save(word):
        tokenizers.Tokenizer(tokenizers.models.WordLevel({"<|endoftext|>": 0, word: 1}, unk_token=word)).save(str(path))
        return path.read_bytes()

    first = save("a")
    loaded = build_tokenizer(str(path))
    assert save("b") != first
    assert loaded.files()["tokenizer.json"] == first and loaded.encode("a") == [1]


def test_encode_batch_gives_each_text_the_ids_of_encode(tmp_path):
    """prepare tokenizes a batch at a time: the byte tokenizer's bytes viewed as an array, a tokenizer.json through
    its Rust encode_batch (threads); each text's ids must be those encode gives it (the previous release's path)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from hybridlm.train.tokenizer import HFTokenizer

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(TEXTS * 5, trainer)
    hf.save(str(tmp_path / "bpe.json"))
    texts = [*TEXTS, "</s> inside"]
    assert [ids.tolist() for ids in ByteTokenizer().encode_batch(texts)] == [list(t.encode()) for t in texts]
    tok, called = HFTokenizer(tmp_path / "bpe.json"), []

    class Spy:  # which of the package's methods ran: the fast one where it has it
        def __getattr__(self, name, inner=tok._tok):
            method = getattr(inner, name)  # (AttributeError where the package lacks it, as without the spy)

            def run(*args, **kwargs):
                called.append(name)
                return method(*args, **kwargs)

            return run

    tok._tok = Spy()
    batch = tok.encode_batch(texts)
    assert [ids.tolist() for ids in batch] == [hf.encode(text, add_special_tokens=False).ids for text in texts]
    fast = hasattr(tokenizers.Tokenizer, "encode_batch_fast")
    assert called == ["encode_batch_fast" if fast else "encode_batch"]
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 3}  # id 3 is past the 3 tokens
    word = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.save(str(tmp_path / "gap.json"))
    with pytest.raises(DataError, match=r"token 'b' has id 3, past the vocabulary's 3 tokens"):
        HFTokenizer(tmp_path / "gap.json").encode_batch(["a", "", "a b"])


def test_encode_offsets_give_each_token_the_character_it_starts_at(tmp_path):
    """Conversations are tokenized whole and a token learned by the character it starts at (train/chats.py)."""
    from hybridlm.train.tokenizer import HFTokenizer
    from tests.infer.test_chat_template import tokenizer_json

    ids, starts = ByteTokenizer().encode_offsets(["aé€<x"])[0]
    assert ids.tolist() == list("aé€<x".encode()) and starts.tolist() == [0, 1, 1, 2, 2, 2, 3, 4]
    (tmp_path / "tokenizer.json").write_text(tokenizer_json())
    hf = HFTokenizer(tmp_path / "tokenizer.json", "</s>")
    text = "hé<|im_end|>\nyo"
    (ids, starts), plain = hf.encode_offsets([text])[0], hf.encode_batch([text])[0]
    assert ids.tolist() == plain.tolist() and len(starts) == len(ids)
    end = ids.tolist().index(hf.special_tokens()["<|im_end|>"])
    assert starts[end] == text.index("<|im_end|>") and starts[-1] == text.index("yo") + 1
