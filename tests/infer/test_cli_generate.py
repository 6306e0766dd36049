"""`hybridlm generate`: prompts from arguments and files, streaming, stop strings, stats."""

import json

import pytest

from hybridlm import HybridLM, generate, save
from hybridlm.cli import main
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model = HybridLM(tiny_config("M[*-]/[*-]", vocab_size=257), seed=0)
    save(model, path, extra_files=ByteTokenizer().files())
    return path, model


def run(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_one_prompt_streams_the_greedy_text_and_reports_speed(checkpoint, capsys):
    path, model = checkpoint
    tok = ByteTokenizer()
    expected = tok.decode(generate(model, tok.encode("hi"), 12, eos_id=tok.eos_id))
    code, out, err = run(capsys, path, "--prompt", "hi", "--max-new-tokens", 12, "--greedy")
    assert code == 0 and out == "hi" + expected + "\n"
    assert "prefill 2 tokens" in err and "decode 11 tokens" in err and "tok/s" in err
    code, out2, err = run(capsys, path, "--prompt", "hi", "--max-new-tokens", 12, "--greedy", "--speculative", "mtp")
    assert out2 == out and "MTP acceptance" in err


def test_prompts_file_lines_and_jsonl_batched_match_one_at_a_time(checkpoint, capsys, tmp_path):
    path, _ = checkpoint
    (tmp_path / "p.txt").write_text("ab\nlonger prompt\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "ab"}) + "\n" + json.dumps({"text": "longer prompt"}))
    args = ("--max-new-tokens", 6, "--greedy")
    _, lines, _ = run(capsys, path, "--prompts-file", tmp_path / "p.txt", *args)
    _, batched, _ = run(capsys, path, "--prompts-file", tmp_path / "p.jsonl", "--batch-size", 2, *args)
    assert lines == batched and lines.startswith("ab") and "\n\nlonger prompt" in lines


def test_stop_string_cuts_the_text(checkpoint, capsys):
    path, model = checkpoint
    tok = ByteTokenizer()
    text = tok.decode(generate(model, tok.encode("x"), 10, eos_id=tok.eos_id))
    stop = text[3:5]
    _, out, _ = run(capsys, path, "--prompt", "x", "--max-new-tokens", 10, "--greedy", "--stop", stop)
    assert out == "x" + text[: text.find(stop)] + "\n"


def test_bad_input_exits_2_with_one_line(checkpoint, capsys, tmp_path):
    path, _ = checkpoint
    (tmp_path / "bad.jsonl").write_text('{"title": "no prompt"}\n')
    for argv in (
        [path],
        [path, "--prompts-file", tmp_path / "missing.txt"],
        [path, "--prompts-file", tmp_path / "bad.jsonl"],
        [path, "--prompt", "a", "--top-p", "0"],
        [path, "--prompt", "a", "--speculative", "mtp", "--temperature", "1"],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
