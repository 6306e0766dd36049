"""`hybridlm generate`: prompts from arguments and files, streaming, stop strings, stats."""

import json

import pytest
import torch

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
    device = () if "--device" in argv else ("--device", "cpu")  # compared with the model in this process, on the CPU
    code = main(["generate", *map(str, argv), *device])
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
    # Sampled speculation: seeded, and with a one-token top-p the greedy text; the penalties and bias are taken.
    sampled = ("--prompt", "hi", "--max-new-tokens", 12, "--speculative", "mtp", "--temperature", 0.9, "--seed", 4)
    code, out3, err = run(capsys, path, *sampled, "--repetition-penalty", 1.3, "--logit-bias", '{"5": 1}')
    assert code == 0 and "MTP acceptance" in err
    assert run(capsys, path, *sampled, "--repetition-penalty", 1.3, "--logit-bias", '{"5": 1}')[1] == out3
    assert run(capsys, path, *sampled, "--top-p", 1e-6)[1] == out


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
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_options_are_checked_by_flag_before_anything_is_loaded_or_printed(checkpoint, capsys, tmp_path):
    path, _ = checkpoint
    for argv, says in (
        (["--max-new-tokens", -3], "--max-new-tokens must be >= 0"),
        (["--temperature", "nan"], "--temperature must be >= 0"),
        (["--repetition-penalty", "nan"], "--repetition-penalty must be > 0"),
        (["--device", "banana"], "--device 'banana': not a device"),
        (["--threads", -1], "--threads must be >= 1"),
        (["--stop", ""], "--stop: an empty string"),
        (["--draft-tokens", 2], "--draft-tokens needs --speculative mtp"),
        (["--seed", 2**64], "--seed must be None or an integer in [-2**63, 2**63 - 1]"),
        (["--seed", 2**63 - 1, "--prompt", "y"], "the last batch draws from --seed + 1"),
        (["--eos-token", "</s>"], "--eos-token: the byte tokenizer's end of document is id 256"),
    ):
        code, out, err = run(capsys, path, "--prompt", "x", *argv)
        assert code == 2 and out == "" and says in err and len(err.strip().splitlines()) == 1, (argv, err)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = run(capsys, tmp_path / "run", "--prompt", "x")
    assert code == 2 and "a training run without an exported model yet" in err


def test_greedy_with_a_sampling_temperature_is_refused_and_the_default_still_samples(checkpoint, capsys):
    """--greedy --temperature 0.7 decoded greedily, the temperature silently ignored."""
    path, _ = checkpoint
    code, out, err = run(capsys, path, "--prompt", "x", "--greedy", "--temperature", 0.7)
    assert (
        code == 2
        and out == ""
        and err.strip() == ("error: --greedy and --temperature 0.7 contradict each other: leave one out")
    )
    args = ("--prompt", "ab", "--max-new-tokens", 12)
    _, greedy, _ = run(capsys, path, *args, "--greedy")
    assert run(capsys, path, *args, "--greedy", "--temperature", 0)[1] == greedy
    assert run(capsys, path, *args, "--temperature", 0)[1] == greedy
    assert run(capsys, path, *args)[1] == run(capsys, path, *args, "--temperature", 0.8)[1] != greedy


def test_prompt_files_name_bad_bytes_and_read_standard_input(checkpoint, capsys, tmp_path, monkeypatch):
    import io
    import sys

    path, _ = checkpoint
    (tmp_path / "latin.txt").write_bytes(b"fine\n\xff\xfeabc\n")
    code, _, err = run(capsys, path, "--prompts-file", tmp_path / "latin.txt")
    assert code == 2 and "latin.txt:2: not UTF-8 (byte 0xff" in err
    args = ("--max-new-tokens", 5, "--greedy")
    _, expected, _ = run(capsys, path, "--prompt", "ab", *args)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\n")))
    _, out, _ = run(capsys, path, "--prompts-file", "-", *args)
    assert out == expected


def test_stop_escapes_and_a_random_stream_per_batch(checkpoint, capsys):
    path, model = checkpoint
    tok = ByteTokenizer()
    text = tok.decode(generate(model, tok.encode("x"), 30, eos_id=tok.eos_id))
    cut = text[5]
    escaped = {"\n": r"\n", "\t": r"\t", "\r": r"\r", "\\": "\\\\"}.get(cut, cut)
    _, out, _ = run(capsys, path, "--prompt", "x", "--max-new-tokens", 30, "--greedy", "--stop", escaped)
    assert out == "x" + text[: text.find(cut)] + "\n"
    # Sampling the same prompt three times, one per batch: three draws, not one repeated.
    _, out, _ = run(capsys, path, *("--prompt", "x") * 3, "--max-new-tokens", 12, "--temperature", 1.5)
    samples = out.strip("\n").split("\n\n")
    assert len(samples) == 3 and len(set(samples)) == 3, samples


def test_ctrl_c_prints_what_was_generated_so_far(checkpoint, capsys, monkeypatch):
    from hybridlm.infer import generate as module

    def interrupted(model, prompts, callback=None, **kwargs):
        for token in b"abcd":
            callback(0, token)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "generate", interrupted)
    # The stop string holds back its length - 1 characters while streaming: they are printed too.
    code, out, err = run(capsys, checkpoint[0], "--prompt", "x", "--stop", "zzz")
    assert code == 130 and out == "xabcd\n" and err.strip() == "interrupted"
    code, out, _ = run(capsys, checkpoint[0], "--prompt", "x", "--prompt", "y", "--batch-size", 2)
    assert code == 130 and out == "xabcd\ny\n"


def test_prompt_files_drop_a_byte_order_mark_and_refuse_lone_surrogates(checkpoint, capsys, tmp_path):
    path, _ = checkpoint
    args = ("--max-new-tokens", 4, "--greedy")
    _, expected, _ = run(capsys, path, "--prompt", "ab", *args)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfab\n")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "ab"}\n')
    for name in ("bom.txt", "bom.jsonl"):
        code, out, err = run(capsys, path, "--prompts-file", tmp_path / name, *args)
        assert code == 0 and out == expected, (name, err)
    (tmp_path / "lone.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "a\\ud800b"}\n')
    code, out, err = run(capsys, path, "--prompts-file", tmp_path / "lone.jsonl")
    assert code == 2 and out == "" and "lone.jsonl:2: not UTF-8 text" in err


def test_model_dependent_options_are_refused_before_anything_is_printed(checkpoint, capsys, tmp_path, monkeypatch):
    """Options that depend on the model (MTP depths, the tokenizer's ids) are checked against its
    config.json before the weights are read, and nothing reaches stdout."""
    from hybridlm.checkpoint import weights

    path, _ = checkpoint
    no_mtp = tmp_path / "no_mtp"
    save(HybridLM(tiny_config("M*-", vocab_size=257), seed=0), no_mtp, extra_files=ByteTokenizer().files())
    small = tmp_path / "small_vocab"
    save(HybridLM(tiny_config("M*-", vocab_size=256), seed=0), small)
    monkeypatch.setattr(weights, "load", lambda *a, **k: pytest.fail("the weights were read"))
    for argv, says in (
        ([path, "--frequency-penalty", 2.5], "--frequency-penalty must be in [-2.0, 2.0], got 2.5"),
        ([path, "--min-p", 2], "--min-p must be in [0, 1], got 2.0"),
        ([path, "--logit-bias", "{5: 1}"], "--logit-bias {5: 1}: not JSON"),
        ([path, "--logit-bias", "[5]"], "--logit-bias [5]: give a JSON object of token ids to biases"),
        ([path, "--logit-bias", '{"257": 1}'], "--logit-bias: 257 is not a token id (an integer in [0, 257))"),
        ([path, "--logit-bias", '{"-1": 1}'], "--logit-bias: -1 is not a token id"),
        ([path, "--logit-bias", '{"5": "x"}'], "--logit-bias: the bias of token 5 must be a finite number"),
        ([no_mtp, "--greedy", "--speculative", "mtp"], "has no MTP depths"),
        ([path, "--tokenizer", tmp_path / "none.json"], "--tokenizer: "),
        ([small], "no tokenizer.hybridlm.json or tokenizer.json; pass --tokenizer explicitly"),
        (
            [small, "--tokenizer", "byte"],
            "--tokenizer byte has 257 token ids (end of text 256), more than the model's vocabulary of 256",
        ),
    ):
        code, out, err = run(capsys, *argv, "--prompt", "x")
        assert code == 2 and out == "" and says in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_generate_and_convert_take_a_run_and_explain_a_training_checkpoint(tmp_path, capsys):
    """convert refused a run folder that generate takes; a DCP checkpoint was 'not a hybridlm checkpoint'."""
    from hybridlm.cli import main

    run_dir = tmp_path / "run"
    sets = [
        "train.steps=2",
        "train.checkpoint_every=1",
        "data.seq_len=32",
        "train.batch_size=2",
        "model.hidden_size=64",
        "model.num_attention_heads=2",
    ]
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", *(a for s in sets for a in ("--set", s))]) == 0
    assert main(["convert", str(run_dir), str(tmp_path / "mg.pt"), "--to", "megatron"]) == 0
    step = sorted((run_dir / "checkpoints").iterdir())[0]
    capsys.readouterr()
    for argv in (
        ["generate", str(step), "--prompt", "x"],
        ["convert", str(step), str(tmp_path / "hf"), "--to", "nemotron-h"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"is a training-state checkpoint of the run {run_dir} (DCP, not a model folder)" in err, err
        assert f"hybridlm train --resume {run_dir}" in err


def test_more_options_are_refused_by_flag_before_the_model_is_loaded(checkpoint, capsys, monkeypatch):
    from hybridlm.checkpoint import weights

    path, _ = checkpoint
    monkeypatch.setattr(weights, "load", lambda *a, **k: pytest.fail("the weights were read"))
    for argv, says in (
        (["--batch-size", 0], "--batch-size must be >= 1, got 0"),
        (["--greedy", "--speculative", "mtp", "--draft-tokens", 0], "--draft-tokens must be >= 1, got 0"),
        (["--greedy", "--speculative", "mtp", "--no-cache"], "--speculative needs the cache: leave out --no-cache"),
        (["--cuda-graph", "--no-cache"], "--cuda-graph needs the cache: leave out --no-cache"),
        (["--cuda-graph"], "--cuda-graph needs --device cuda"),
        (["--dtype", "int8"], "--dtype must be a floating torch.dtype the model computes in"),
        (["--dtype", "half-ish"], "--dtype"),
        (["--seed", 2**63 - 2, *("--prompt", "y") * 2, "--batch-size", 2], "the last batch draws from --seed + 2"),
    ):
        code, out, err = run(capsys, path, "--prompt", "x", *argv)
        assert code == 2 and out == "" and says in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_the_seed_check_follows_the_batches(checkpoint, capsys):
    """Two prompts in one batch of two draw from --seed itself: the largest seed is taken (no batch at seed + 1)."""
    code, _, err = run(
        capsys, checkpoint[0], *("--prompt", "x") * 2, "--batch-size", 2, "--seed", 2**63 - 1, "--max-new-tokens", 2
    )
    assert code == 0, err
    assert "MTP acceptance" not in err  # reported with --speculative only


def test_prompt_files_skip_blank_lines_and_read_json_lines_anywhere(checkpoint, capsys, tmp_path):
    """Blank lines are no prompts; a line starting with "{" is a JSON record in a text file too, and its
    "prompt" field comes before its "text"."""
    path, _ = checkpoint
    args = ("--max-new-tokens", 4, "--greedy")
    _, expected, _ = run(capsys, path, "--prompt", "ab", *args)
    for body in ("\n\nab\n  \n", '{"prompt": "ab"}\n', '  {"text": "zz", "prompt": "ab"}\n'):
        (tmp_path / "p.txt").write_text(body)
        code, out, err = run(capsys, path, "--prompts-file", tmp_path / "p.txt", *args)
        assert code == 0 and out == expected, (body, out, err)


def test_stop_escapes_name_newline_tab_return_and_backslash():
    from hybridlm.cli.generate import _unescape

    assert _unescape(r"a\nb\tc\rd\\n\q") == "a\nb\tc\rd\\n\\q"


def test_streaming_holds_back_only_what_may_begin_a_stop_string(capsys):
    """While streaming, len(longest stop) - 1 characters wait (they may begin a stop); without stops none do."""
    from hybridlm.infer.completion import Completion

    for stops, want in (([], ["a", "b", "z", "c"]), (["zz", "q"], ["", "a", "b", "z"])):
        row = Completion(ByteTokenizer(), stops, stream=True)
        shown = []
        for ch in "abzc":
            row.add(ord(ch))
            shown.append(capsys.readouterr().out)
        assert shown == want, stops


def test_a_long_stop_string_across_the_settled_text_still_stops():
    """A stop string longer than the settling window: its start lies in text settled before its end arrives."""
    from hybridlm.infer.completion import Completion

    stop = "0123456789abcdefghijklmnop"  # 26 characters, more than WINDOW tokens
    text = "x" * 40 + stop + "tail"
    row = Completion(ByteTokenizer(), [stop], stream=False)
    stopped_at = next((i for i, t in enumerate(text.encode()) if row.add(t)), None)
    assert stopped_at == len("x" * 40 + stop) - 1 and row.text == "x" * 40


def test_prompt_files_end_lines_at_crlf_and_stats_sum_over_batches(checkpoint, capsys, tmp_path):
    path, _ = checkpoint
    args = ("--max-new-tokens", 4, "--greedy")
    _, expected, _ = run(capsys, path, "--prompt", "ab", "--prompt", "cde", *args)
    (tmp_path / "crlf.txt").write_bytes(b"ab\r\ncde\r\n")
    code, out, err = run(capsys, path, "--prompts-file", tmp_path / "crlf.txt", *args)
    assert code == 0 and out == expected, err
    assert "prefill 5 tokens" in err  # both batches of one prompt: 2 + 3


def test_the_first_stop_string_in_the_text_cuts_it():
    from hybridlm.infer.completion import Completion

    row = Completion(ByteTokenizer(), ["b", "xb"], stream=False)  # both end with the same token
    assert [row.add(t) for t in b"axb"] == [False, False, True] and row.text == "a"


def test_output_that_is_not_utf8_settles_too_and_reads_as_the_whole_decode():
    """Bytes that are not UTF-8 never settled (each cut ended in a replacement character), so every token decoded
    the whole completion again. Settled or not, the text is at every token what the whole completion decodes to
    (truncated sequences before ASCII, lone continuation bytes, 0xFF)."""
    from hybridlm.infer.completion import Completion
    from hybridlm.train.tokenizer import ByteTokenizer

    class Counting(ByteTokenizer):
        longest = 0

        def decode(self, ids):
            Counting.longest = max(Counting.longest, len(ids))
            return super().decode(ids)

    for ids in ([0xFF] * 400, [0xE2, 0x82, 0x41, 0x80, 0xF0, 0x9F] * 70, list("€ä日".encode()[1:]) * 60):
        row = Completion(Counting(), ["\n"], stream=False, prompt=[65])
        for i, t in enumerate(ids):
            assert not row.add(t)
            assert row.text == ByteTokenizer().decode(ids[: i + 1]), (
                i
            )  # what the whole completion decodes to, at every token
        assert row.settled > len(ids) - 3 * Completion.WINDOW
    assert Counting.longest <= 2 * Completion.WINDOW + Completion.CONTEXT


def test_the_default_device_is_the_gpu_where_there_is_one(checkpoint, capsys, monkeypatch):
    """generate ran on the CPU by default even on a GPU machine (train's default is auto)."""
    import torch

    from hybridlm import cli
    from hybridlm.cli import device_option

    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert device_option("--device", "auto") == torch.device("cuda" if cuda else "cpu")
    monkeypatch.undo()
    seen = []
    monkeypatch.setattr(cli, "device_option", lambda flag, value: seen.append(value) or torch.device("cpu"))
    path, _ = checkpoint
    assert main(["generate", str(path), "--prompt", "x", "--max-new-tokens", "1"]) == 0
    assert seen == ["auto"]


def test_prompts_are_named_by_their_flag_number_and_jsonl_lines_must_be_records(checkpoint, capsys, tmp_path):
    """A bad --prompt is named by its 1-based number; in a .jsonl file every line is a record, even one that does
    not start with "{" (in a text file that line is a prompt)."""
    path, _ = checkpoint
    code, out, err = run(capsys, path, "--prompt", "fine", "--prompt", "a\ud800b")
    assert code == 2 and out == "" and "--prompt number 2: not UTF-8 text" in err, err
    (tmp_path / "p.jsonl").write_text('{"prompt": "ab"}\n["ab"]\n')
    code, out, err = run(capsys, path, "--prompts-file", tmp_path / "p.jsonl")
    assert code == 2 and out == "" and 'p.jsonl:2: a JSONL record needs a string "prompt" or "text" field' in err
    (tmp_path / "p.jsonl").write_text('{"prompt": "ab"}\n{"prompt": "ab"\n')
    code, out, err = run(capsys, path, "--prompts-file", tmp_path / "p.jsonl")
    assert code == 2 and out == "" and "p.jsonl:2: not a JSON object (" in err, err
    (tmp_path / "p.txt").write_text('["ab"]\n')
    code, out, err = run(capsys, path, "--prompts-file", tmp_path / "p.txt", "--max-new-tokens", 1, "--greedy")
    assert code == 0 and out.startswith('["ab"]'), err


def test_boundary_values_of_the_options_are_accepted(checkpoint, capsys, monkeypatch):
    """--max-new-tokens 0 prints the prompt alone; --threads 1 sets one thread; --speculative mtp with
    --temperature 0 is greedy without --greedy."""
    import torch

    path, _ = checkpoint
    code, out, err = run(capsys, path, "--prompt", "hi", "--max-new-tokens", 0)
    assert code == 0 and out == "hi\n" and "decode 0 tokens" in err, err
    code, out, err = run(capsys, path, "--prompt", "h", "--max-new-tokens", 2, "--greedy")  # one of each: singular
    assert code == 0 and len(out) == 4 and "prefill 1 token at" in err and "decode 1 token at" in err, (out, err)
    threads, before = [], torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    code, _, err = run(capsys, path, "--prompt", "hi", "--max-new-tokens", 2, "--threads", 1)
    assert code == 0 and threads == [1, before], err  # then the caller's setting back
    _, greedy, _ = run(capsys, path, "--prompt", "hi", "--max-new-tokens", 6, "--greedy")
    code, out, err = run(
        capsys, path, "--prompt", "hi", "--max-new-tokens", 6, "--temperature", 0, "--speculative", "mtp"
    )
    assert code == 0 and out == greedy and "MTP acceptance" in err, err


def test_flags_reach_the_generator_with_their_documented_defaults(checkpoint, capsys, monkeypatch):
    """The help's defaults (200 new tokens, seed 0, sampling at 0.8, the cache on) and what the flags change."""
    from hybridlm.infer import generate as module

    calls = []

    def recording(model, prompts, **kwargs):
        calls.append(kwargs)
        return [[] for _ in prompts]

    monkeypatch.setattr(module, "generate", recording)
    assert run(capsys, checkpoint[0], "--prompt", "x")[0] == 0
    assert run(capsys, checkpoint[0], "--prompt", "x", "--no-cache", "--greedy", "--seed", 5)[0] == 0
    first, second = calls
    assert (first["max_new_tokens"], first["seed"], first["temperature"], first["use_cache"]) == (200, 0, 0.8, True)
    assert (second["seed"], second["temperature"], second["use_cache"]) == (5, 0.0, False)


def test_sampling_repeats_without_a_seed(checkpoint, capsys):
    """The default seed is fixed: the same sampling command prints the same text twice."""
    path, _ = checkpoint
    args = ("--prompt", "x", "--max-new-tokens", 16, "--temperature", 1.5)
    assert run(capsys, path, *args)[1] == run(capsys, path, *args)[1]


def test_one_prompt_at_a_time_streams_even_among_several(checkpoint, capsys, monkeypatch):
    """With --batch-size 1 each prompt streams: its text is on stdout as the tokens arrive, not when it is done."""
    from hybridlm.infer import generate as module

    seen = []

    def streaming(model, prompts, callback=None, **kwargs):
        for token in b"ab":
            callback(0, token)
            seen.append(capsys.readouterr().out)
        return [list(b"ab")]

    monkeypatch.setattr(module, "generate", streaming)
    code, _, _ = run(capsys, checkpoint[0], "--prompt", "x", "--prompt", "y")
    assert code == 0 and seen == ["xa", "b", "\n\nya", "b"]  # (the first row's end of line and blank line)


def test_a_cache_too_large_is_a_usage_error_naming_max_new_tokens(checkpoint, capsys):
    """The generator's ValueError (here: the cache cannot be allocated) is the user's error, not a bug."""
    code, out, err = run(capsys, checkpoint[0], "--prompt", "x", "--max-new-tokens", 10**15)
    assert code == 2 and out == "", err
    assert err.startswith("error: cannot allocate the cache for 1 row(s)") and "(max_new_tokens)" in err, err
    assert "may be a bug" not in err


def test_a_completion_after_a_prompt_cut_inside_a_character_keeps_its_own_text():
    """Where the prompt's last ids and the new ones decode together to other text than the prompt's (here the
    prompt ends inside a UTF-8 character that the new byte completes), the new ids are decoded alone: their byte
    is no character by itself, and nothing of it is dropped."""
    from hybridlm.infer.completion import Completion

    euro = list("€".encode())
    row = Completion(ByteTokenizer(), [], stream=False, prompt=euro[:2])
    row.add(euro[2])
    assert row.text == "\ufffd"
    row.add(ord("a"))
    assert row.text == "\ufffda"


def test_a_prompts_file_in_json_lines_is_known_by_either_suffix_in_any_case(checkpoint, capsys, tmp_path):
    """Only a lowercase .jsonl was read as records (corpora take .jsonl and .ndjson in any case): a record line
    not starting with "{" was taken as prompt text."""
    path, _ = checkpoint
    for name in ("p.NDJSON", "p.JSONL", "p.ndjson"):
        (tmp_path / name).write_text('{"prompt": "ab"}\n["ab"]\n')
        code, out, err = run(capsys, path, "--prompts-file", tmp_path / name)
        assert code == 2 and out == "" and f'{name}:2: a JSONL record needs a string "prompt" or "text"' in err, err


def test_a_thread_count_torch_cannot_start_is_refused_by_flag(checkpoint, capsys, monkeypatch):
    """--threads 100000 reached torch.set_num_threads and the process died of a segmentation fault, with no
    message; it is bounded as train.threads is."""
    import torch

    path, _ = checkpoint
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail(f"set_num_threads({n})"))
    code, out, err = run(capsys, path, "--prompt", "x", "--threads", 100000)
    assert (code, out, err) == (2, "", "error: --threads must be at most 4096, got 100000\n")


def test_an_empty_tokenizer_flag_is_refused_not_ignored(checkpoint, capsys):
    """--tokenizer '' (an unset shell variable) silently used the checkpoint's own tokenizer."""
    path, _ = checkpoint
    code, out, err = run(capsys, path, "--prompt", "x", "--tokenizer", "")
    assert (code, out) == (2, "") and err == "error: --tokenizer: '' is neither 'byte' nor an existing tokenizer.json\n"


def test_a_record_whose_read_field_is_no_string_names_that_field(checkpoint, capsys, tmp_path):
    """{"prompt": null, "text": "hi"} was told it "needs a string prompt or text field" while it had one: the
    message now names the field read ("prompt" where both are given) and its value."""
    path, _ = checkpoint
    for record, says in (
        ('{"prompt": null, "text": "hi"}', 'not null in "prompt"'),
        ('{"text": 5}', 'not 5 in "text"'),
        ('{"other": "hi"}', 'a string "prompt" or "text" field\n'),
    ):
        (tmp_path / "p.jsonl").write_text(record + "\n")
        code, out, err = run(capsys, path, "--prompts-file", tmp_path / "p.jsonl")
        assert code == 2 and out == "" and err.endswith(says if says.endswith("\n") else says + "\n"), err


def test_cuda_graph_with_speculative_is_refused_by_flag_before_the_model_is_loaded(checkpoint, capsys, monkeypatch):
    """generate() refuses the pair whatever the device; the CLI let it through on a CUDA device, read the weights,
    then failed with the API's message (no flag named), and on the CPU it asked for --device cuda instead."""
    import torch

    from hybridlm import cli
    from hybridlm.checkpoint import weights

    path, _ = checkpoint
    monkeypatch.setattr(weights, "load", lambda *a, **k: pytest.fail("the weights were read"))
    argv = ("--prompt", "x", "--greedy", "--speculative", "mtp", "--cuda-graph")
    for device in ("cuda", "cpu"):
        monkeypatch.setattr(cli, "device_option", lambda flag, value, device=device: torch.device(device))
        code, out, err = run(capsys, path, *argv, "--device", device)
        assert code == 2 and out == "", err
        assert "--cuda-graph does not work with --speculative mtp" in err and len(err.strip().splitlines()) == 1, err


def test_streaming_never_prints_the_start_of_a_stop_string_ending_in_a_multibyte_character(capsys):
    """A stop string whose last character spans several tokens: while that character was incomplete, its
    replacement character took the held-back place, and the stop's first characters were printed ("b" of
    "bß", the space of " 😀"). What streams is exactly the text, cut before the stop."""
    from hybridlm.infer.completion import Completion

    for stop, text in (("bß", "abßc"), (" 😀", "x 😀y"), ("\n€", "q\n\n€")):
        row = Completion(ByteTokenizer(), [stop], stream=True, heading="> ")
        for t in text.encode():
            if row.add(t):
                break
        row.finish()
        want = text[: text.find(stop)]
        assert row.text == want and capsys.readouterr().out == "> " + want, stop


def test_a_prompts_file_without_a_prompt_is_named(checkpoint, capsys, tmp_path):
    """An empty (or blank) --prompts-file was answered "give a prompt: --prompt TEXT or --prompts-file FILE", as if
    no file had been given."""
    path, _ = checkpoint
    for text in ("", "\n \n\r\n"):
        (tmp_path / "prompts.txt").write_text(text)
        code, out, err = run(capsys, path, "--prompts-file", tmp_path / "prompts.txt")
        assert code == 2 and out == "" and f"error: --prompts-file {tmp_path / 'prompts.txt'}: no prompt in it" in err


def test_no_cache_samples_a_batch_as_the_cached_run_does(checkpoint, capsys):
    """--no-cache is the reference loop: sampling (the default) a batch of prompts gives the cached run's texts."""
    path, _ = checkpoint
    args = (path, "--prompt", "ab", "--prompt", "longer prompt", "--batch-size", 2, "--max-new-tokens", 8)
    _, cached, _ = run(capsys, *args)
    _, reference, _ = run(capsys, *args, "--no-cache")
    assert reference == cached and cached.startswith("ab")


def test_the_end_of_document_token_is_not_printed_where_the_tokenizer_does_not_mark_it_special(
    checkpoint, capsys, monkeypatch, tmp_path
):
    """A tokenizer.json whose end-of-document token is an ordinary token: the text stops before it, as with bytes."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hybridlm.infer import generate as module

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))

    def emitting(model, prompts, callback=None, eos_id=None, **kwargs):
        for row in range(len(prompts)):
            for token in (1, eos_id):
                callback(row, token)
        return [[1, eos_id] for _ in prompts]

    monkeypatch.setattr(module, "generate", emitting)
    for batch in ("1", "2"):
        argv = ("--prompt", "a", "--prompt", "b", "--tokenizer", tmp_path / "tokenizer.json", "--batch-size", batch)
        code, out, _ = run(capsys, checkpoint[0], *argv)
        assert code == 0 and "</s>" not in out and out.split("\n\n")[:2] == ["a b", "b b"], out


def test_a_prompt_the_tokenizer_cannot_encode_is_named_before_anything_is_printed(checkpoint, capsys, tmp_path):
    """The prompts are tokenized before the model loads: the error names the prompt, and no earlier text is printed."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}))  # no unknown token: "zz" cannot be encoded
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "prompts.txt").write_text("a b\na zz\n")
    argv = ("--tokenizer", tmp_path / "tokenizer.json", "--max-new-tokens", 2, "--greedy")
    code, out, err = run(capsys, checkpoint[0], "--prompt", "a", "--prompt", "zz", *argv)
    assert code == 2 and out == "" and err.startswith("error: --prompt number 2: ") and "cannot tokenize" in err, err
    code, out, err = run(capsys, checkpoint[0], "--prompts-file", tmp_path / "prompts.txt", *argv)
    assert code == 2 and out == "" and err.startswith(f"error: {tmp_path / 'prompts.txt'}:2: "), err


def test_an_empty_prompts_file_flag_is_refused_not_ignored(checkpoint, capsys):
    """``--prompts-file ''`` (an unset shell variable) is refused by name, not read as no file at all."""
    for argv in (("--prompts-file", ""), ("--prompt", "x", "--prompts-file", "")):
        code, out, err = run(capsys, checkpoint[0], *argv, "--max-new-tokens", 2)
        assert code == 2 and out == "" and err.startswith("error: --prompts-file: empty"), err


def test_a_model_or_run_folder_is_generated_from_without_the_training_state_reader(
    checkpoint, capsys, tmp_path, monkeypatch
):
    """The DCP reader (hybridlm.checkpoint.safe_dcp) imports torch.distributed.checkpoint, a second or more at
    the start of every `hybridlm generate`: a model folder, or a run's exported model/, never needs it."""
    import shutil
    import sys

    path, model = checkpoint
    run_dir = tmp_path / "run"
    shutil.copytree(path, run_dir / "model")
    tok = ByteTokenizer()
    expected = tok.decode(generate(model, tok.encode("hi"), 5, eos_id=tok.eos_id))
    monkeypatch.setitem(sys.modules, "hybridlm.checkpoint.safe_dcp", None)  # (None: importing it raises ImportError)
    for folder in (path, run_dir):
        code, out, err = run(capsys, folder, "--prompt", "hi", "--max-new-tokens", 5, "--greedy")
        assert code == 0 and out == "hi" + expected + "\n", err


@pytest.mark.parametrize(
    "line", ['{"prompt": "ab", "n": ' + "1" * 5000 + "}", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"]
)
def test_a_jsonl_record_json_cannot_read_is_named_by_its_line(checkpoint, capsys, tmp_path, line):
    """An integer of over 4,300 digits (a ValueError) or nesting past json's parser (a RecursionError) is no
    JSONDecodeError: both are named by the line, not reported as an unexpected error."""
    path, _ = checkpoint
    (tmp_path / "p.jsonl").write_text('{"prompt": "ab"}\n' + line + "\n")
    code, out, err = run(capsys, path, "--prompts-file", tmp_path / "p.jsonl")
    assert code == 2 and out == "" and "p.jsonl:2: not a JSON object (" in err and "unexpected" not in err, err


@pytest.mark.parametrize("batch_size", [1, 2])
def test_nan_logits_exit_2_naming_the_prompt_by_its_flag_after_what_came_before(tmp_path, capsys, batch_size):
    """A checkpoint with a NaN weight printed garbage (token 0 after token 0, greedily) with exit status 0; now what
    was generated before the NaN is printed and the prompt whose logits it reached is named by its flag."""
    path = tmp_path / "model"
    model = HybridLM(tiny_config("M[*-]/[*-]", vocab_size=257), seed=0)
    tok = ByteTokenizer()
    clean = generate(model, tok.encode("x"), 4)
    bad = next(c for c in "yzqw" if tok.encode(c)[-1] not in clean)
    with torch.no_grad():
        model.embeddings.weight[tok.encode(bad)[-1]] = float("nan")
    save(model, path, extra_files=tok.files())
    argv = [path, "--prompt", "x", "--prompt", bad, "--greedy", "--max-new-tokens", 4, "--batch-size", batch_size]
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith("error: --prompt number 2: the logits for new token 1 (position "), err
    # One prompt at a time, the first has its text; in one batch, the first step already fails: the prompts alone.
    assert out.startswith("x" + tok.decode(clean)) if batch_size == 1 else out == f"x\n{bad}\n", out


def _byte_fallback_tokenizer(tmp_path):
    """A tokenizer.json decoded as Llama's and Mistral's are: "▁" for spaces, and characters outside the vocabulary
    as byte tokens (<0xF0>) that the ByteFallback decoder reads a run at a time."""
    tokenizers = pytest.importorskip("tokenizers")
    from hybridlm.train.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "</s>": 1} | {f"<0x{b:02X}>": 2 + b for b in range(256)}
    vocab |= {w: len(vocab) + i for i, w in enumerate(["▁", "a", "b", "▁a"])}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = tokenizers.normalizers.Replace(" ", "▁")
    d = tokenizers.decoders
    tok.decoder = d.Sequence([d.Replace("▁", " "), d.ByteFallback(), d.Fuse(), d.Strip(" ", 1, 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("text", ["a 🙂👍🏽日本語 " * 4, "日本" * 9 + "b a🙂", "ab 👨\u200d👩\u200d👧 " * 3])
def test_a_long_completion_of_byte_fallback_tokens_streams_and_reads_as_its_whole_decode(tmp_path, capsys, text):
    """A ByteFallback decoder reads a run of byte tokens that ends inside a character as a replacement character per
    byte: the settled text took those for output that is not UTF-8 (the completion ended in replacement characters
    where the whole decode has the emoji), and a context cut inside a run made the next emoji's bytes replacement
    characters too, while the streamed text repeated pieces ("日本日本")."""
    from hybridlm.infer.completion import Completion

    tok = _byte_fallback_tokenizer(tmp_path)
    prompt, ids = tok.encode("ab"), tok.encode(text)
    assert len(ids) >= 2 * Completion.WINDOW and tok.decode(prompt + ids) == "ab" + text
    for stream in (False, True):
        row = Completion(tok, [], stream, prompt=prompt, heading="")
        assert not any(row.add(t) for t in ids)
        row.finish()
        assert row.text == text and row.settled > 0
        assert capsys.readouterr().out == (text if stream else "")


def test_a_stop_string_that_is_a_special_token_ends_the_text_where_the_model_picks_it(
    checkpoint, capsys, monkeypatch, tmp_path
):
    """Decoding leaves a tokenizer.json's special tokens out of the text, so `--stop '<|im_end|>'` never matched:
    a chat model went on past the end of its turn to --max-new-tokens."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hybridlm.infer import generate as module

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    stopped = []

    def emitting(model, prompts, callback=None, **kwargs):
        for row in range(len(prompts)):  # (a row ends at the first True)
            stopped.append(next((i for i, token in enumerate((1, 3, 0, 1)) if callback(row, token)), None))
        return [[1, 3, 0, 1] for _ in prompts]

    monkeypatch.setattr(module, "generate", emitting)
    for batch in ("1", "2"):
        stopped.clear()
        argv = ("--prompt", "a", "--prompt", "b", "--tokenizer", tmp_path / "tokenizer.json", "--batch-size", batch)
        code, out, _ = run(capsys, checkpoint[0], *argv, "--stop", "<|im_end|>")
        assert code == 0 and out.split("\n\n")[:2] == ["a b", "b b"] and stopped == [1, 1], out
        stopped.clear()
        code, out, _ = run(capsys, checkpoint[0], *argv)  # without the stop: the text goes on, the token left out
        assert code == 0 and out.split("\n\n")[:2] == ["a b a b", "b b a b"] and stopped == [None, None], out


def _chat_tokenizer(tmp_path):
    """A byte-level tokenizer.json (as Qwen's, GPT-2's) with ChatML's special tokens: ids 0..255 the bytes, 256
    the end of document, 257 '<|im_end|>', 258 '<|im_start|>'."""
    tokenizers = pytest.importorskip("tokenizers")
    from hybridlm.train.tokenizer import HFTokenizer

    (tmp_path / "tokenizer.json").write_text(ByteTokenizer().hf_files()["tokenizer.json"])
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.add_special_tokens(["<|im_end|>", "<|im_start|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer(tmp_path / "tokenizer.json")


def test_a_stop_string_holding_a_special_token_and_more_text_ends_the_text_there(tmp_path, capsys):
    """Decoding leaves special tokens out of the text, so `--stop '<|im_end|>\\n'` (a special token followed by text)
    never matched and a chat model went on past the end of its turn; now the stop is searched with the special
    token's text put back where the model picked it, and the text ends there, streamed or not."""
    from hybridlm.infer.completion import Completion

    tok = _chat_tokenizer(tmp_path)
    special = tok.special_tokens()
    end, start = special["<|im_end|>"], special["<|im_start|>"]
    ids = [*tok.encode("Hi!"), end, *tok.encode("\n"), start, *tok.encode("user")]
    assert tok.decode(ids) == "Hi!\nuser"
    cases = (
        (["<|im_end|>\n"], "Hi!", 4),  # stopped at the newline after the special token
        (["!<|im_end|>"], "Hi", 3),  # text before the special token is cut too
        (["<|im_end|>\n<|im_start|>", "zz"], "Hi!", 5),  # two special tokens
        (["<|im_end|>x"], "Hi!\nuser", None),  # the special token, but other text after it
        (["<|im_start|>\n"], "Hi!\nuser", None),
        (["<|im_end|><|im_start|>"], "Hi!\nuser", None),  # another token between them
    )
    for stops, text, stopped_at in cases:
        for stream in (False, True):
            row = Completion(tok, stops, stream, prompt=tok.encode("Q"), heading="> ", specials=special)
            assert next((i for i, t in enumerate(ids) if row.add(t)), None) == stopped_at, stops
            row.finish()
            assert row.text == text and capsys.readouterr().out == ("> " + text if stream else ""), stops


def test_a_stop_string_holding_a_special_token_matches_its_text_written_out_in_plain_tokens(tmp_path, capsys):
    """A stop string holding a special token's text and more ('<|im_end|>\\n') is a string like any other: where the
    model writes that text out in byte tokens, and picks no special token, it is found there, as '<|im_end|>' is."""
    from hybridlm.infer.completion import Completion

    tok = _chat_tokenizer(tmp_path)
    ids = list(b"Hi<|im_end|>\nuser")  # byte tokens only
    assert tok.decode(ids) == "Hi<|im_end|>\nuser"
    for stops, stopped_at in ((["<|im_end|>\n"], 12), (["<|im_end|>"], 11)):
        for stream in (False, True):
            row = Completion(tok, stops, stream, prompt=tok.encode("Q"), specials=tok.special_tokens())
            assert next((i for i, t in enumerate(ids) if row.add(t)), None) == stopped_at, stops
            row.finish()
            assert row.text == "Hi" and capsys.readouterr().out == ("Hi" if stream else ""), stops


def test_the_cli_stops_at_a_special_token_followed_by_text_streamed_or_batched(tmp_path, capsys, monkeypatch):
    """`--stop '<|im_end|>\\n'` through the command: the text ends before the special token, with one prompt at a
    time (streamed) and in a batch alike; without the stop it runs on, the special tokens left out."""
    from hybridlm.infer import generate as module

    tok = _chat_tokenizer(tmp_path)
    end, start = tok.special_tokens()["<|im_end|>"], tok.special_tokens()["<|im_start|>"]
    reply = [*tok.encode("Hi!"), end, *tok.encode("\n"), start, *tok.encode("user")]
    save(HybridLM(tiny_config("*-", vocab_size=tok.vocab_size), seed=0), tmp_path / "model")

    def emitting(model, prompts, callback=None, **kwargs):
        for row in range(len(prompts)):  # (a row ends at the first True)
            next((t for t in reply if callback(row, t)), None)
        return [reply for _ in prompts]

    monkeypatch.setattr(module, "generate", emitting)
    argv = (tmp_path / "model", "--prompt", "a", "--prompt", "b", "--tokenizer", tmp_path / "tokenizer.json")
    for batch in ("1", "2"):
        code, out, _ = run(capsys, *argv, "--batch-size", batch, "--stop", r"<|im_end|>\n")
        assert code == 0 and out.split("\n\n")[:2] == ["aHi!", "bHi!"], out
        code, out, _ = run(capsys, *argv, "--batch-size", batch)
        assert code == 0 and out.split("\n\n")[:2] == ["aHi!\nuser", "bHi!\nuser"], out


@pytest.mark.parametrize("fails", [False, True])
def test_threads_hold_for_the_command_only_when_main_runs_in_a_callers_process(checkpoint, capsys, monkeypatch, fails):
    """--threads called torch.set_num_threads, process-wide, and left it: a notebook or harness calling main()
    went on with the command's thread count for everything after, also after a command that failed."""
    from hybridlm.infer import generate as module

    path, _ = checkpoint
    before = torch.get_num_threads()
    n = 1 if before > 1 else 2
    seen = []

    def generate_(*args, **kwargs):
        seen.append(torch.get_num_threads())
        if fails:
            raise RuntimeError("out of memory (simulated)")
        return generate(*args, **kwargs)

    monkeypatch.setattr(module, "generate", generate_)
    code, _, err = run(capsys, path, "--prompt", "hi", "--max-new-tokens", 2, "--threads", n)
    assert code == (2 if fails else 0) and seen == [n], err
    assert torch.get_num_threads() == before


def test_dtype_loads_the_checkpoint_in_that_dtype(checkpoint, capsys, monkeypatch):
    """A training run saves float32; --dtype bfloat16 serves it in bf16 (the text of the model cast to bf16), and
    auto keeps the checkpoint's own."""
    from hybridlm.infer import generate as generating

    path, model = checkpoint
    seen = []
    real = generating.generate

    def spying(m, *a, **k):
        seen.append(next(m.parameters()).dtype)
        return real(m, *a, **k)

    monkeypatch.setattr(generating, "generate", spying)
    tok = ByteTokenizer()
    half = HybridLM(model.config, seed=0, dtype=torch.bfloat16)
    half.load_state_dict(model.state_dict())
    for flags, dtype, reference in (([], torch.float32, model), (["--dtype", "bfloat16"], torch.bfloat16, half)):
        code, out, _ = run(capsys, path, "--prompt", "hi", "--max-new-tokens", 8, "--greedy", *flags)
        assert code == 0 and seen.pop() == dtype
        assert out == "hi" + tok.decode(generate(reference.eval(), tok.encode("hi"), 8, eos_id=tok.eos_id)) + "\n"


def test_dtype_auto_keeps_a_bfloat16_checkpoints_dtype(checkpoint, tmp_path, capsys, monkeypatch):
    """The default (auto) is the checkpoint's own dtype: a bf16 checkpoint is not cast to float32."""
    from hybridlm.infer import generate as generating

    _, model = checkpoint
    half = HybridLM(model.config, seed=0, dtype=torch.bfloat16)
    save(half, tmp_path / "half", extra_files=ByteTokenizer().files())
    seen = []
    real = generating.generate
    monkeypatch.setattr(
        generating, "generate", lambda m, *a, **k: seen.append(next(m.parameters()).dtype) or real(m, *a, **k)
    )
    code, _, err = run(capsys, tmp_path / "half", "--prompt", "hi", "--max-new-tokens", 2, "--greedy")
    assert code == 0 and seen == [torch.bfloat16], err


@pytest.mark.gpu
def test_cuda_graph_batches_of_one_shape_replay_one_graph_and_print_the_eager_text_on_gpu(
    checkpoint, capsys, tmp_path, monkeypatch
):
    """``--cuda-graph`` over a prompts file in batches of 2: the two batches of 2 rows share a shape (2 rows, 64
    positions) and capture one graph, the last row its own; the texts are those of eager decoding (float32,
    ``--no-cuda-graph``). Left out on a CUDA device, graphs are on: the same captures, after the first short one that
    checks the step can be captured."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from hybridlm.infer.cuda_graph import DecodeGraphs

    captured = []
    real = DecodeGraphs.capture
    monkeypatch.setattr(DecodeGraphs, "capture", lambda self, cache: captured.append(cache.batch) or real(self, cache))
    path, _ = checkpoint
    (tmp_path / "p.txt").write_text("ab\nlonger prompt\ncd\nefg\nlast\n")
    args = (path, "--prompts-file", tmp_path / "p.txt", "--batch-size", 2, "--max-new-tokens", 8, "--greedy")
    _, eager, err = run(capsys, *args, "--device", "cuda", "--no-cuda-graph")
    assert captured == [] and "CUDA graphs" not in err
    code, graphed, err = run(capsys, *args, "--device", "cuda", "--cuda-graph")
    assert code == 0 and graphed == eager and captured == [2, 1]
    assert "decode steps replayed as CUDA graphs (2 captured)" in err
    captured.clear()
    code, default, err = run(capsys, *args, "--device", "cuda")
    assert code == 0 and default == eager and captured == [1, 2, 1] and "decoding eagerly" not in err
    assert "decode steps replayed as CUDA graphs (2 captured)" in err


def test_cuda_graphs_are_on_by_default_only_where_the_model_runs_on_cuda_and_can_capture(monkeypatch, capsys):
    """``cuda_graph_on``: --cuda-graph / --no-cuda-graph as given; left out, on for a model on CUDA once a short
    capture passed, off (with the reason on stderr) where it fails, and off without a capture on the CPU or where
    another flag rules graphs out (--no-cache, --speculative, which on CUDA says what eager rounds cost). The capture is
    stood in for here (the GPU test above runs it)."""
    from types import SimpleNamespace

    from hybridlm.cli import generate as cli_generate

    tried = []
    reason = [None]
    monkeypatch.setattr(cli_generate, "capture_fails", lambda model: tried.append(model) or reason[0])

    def model_on(kind):
        weight = SimpleNamespace(device=torch.device(kind))
        return SimpleNamespace(parameters=lambda: iter([weight]))

    cuda, cpu = model_on("cuda"), model_on("cpu")
    assert cli_generate.cuda_graph_on(cpu, True) is True and cli_generate.cuda_graph_on(cuda, False) is False
    assert tried == []  # (given: the command checks it, the device and its other flags itself)
    assert cli_generate.cuda_graph_on(cpu, None) is False and tried == []
    assert cli_generate.cuda_graph_on(cuda, None, False, True) is False and tried == []
    assert cli_generate.cuda_graph_on(cuda, None, False, False) is True and tried == [cuda]
    assert capsys.readouterr().err == ""
    reason[0] = "capturing the decode step as a CUDA graph failed; run without cuda_graph (boom)"
    assert cli_generate.cuda_graph_on(cuda, None) is False
    assert capsys.readouterr().err == f"decoding eagerly (no CUDA graphs): {reason[0]}\n"
    # --speculative: graphs ruled out, and on CUDA (only) a note that eager rounds cost more than graphed steps
    assert cli_generate.cuda_graph_on(cpu, None, speculative=True) is False and capsys.readouterr().err == ""
    assert cli_generate.cuda_graph_on(cuda, None, speculative=True) is False and len(tried) == 2
    assert capsys.readouterr().err.startswith("note: --speculative mtp runs its rounds eagerly (no CUDA graphs)")


def test_the_penalties_min_p_and_the_logit_bias_reach_generation(checkpoint, capsys):
    """--frequency-penalty, --presence-penalty, --min-p and --logit-bias: the text is what ``generate`` gives with
    them."""
    path, model = checkpoint
    tok = ByteTokenizer()
    want = tok.decode(generate(model, tok.encode("hi"), 12, eos_id=256, frequency_penalty=-2.0, presence_penalty=-1.0))
    assert want != tok.decode(generate(model, tok.encode("hi"), 12, eos_id=256))
    code, out, _ = run(
        capsys,
        path,
        "--prompt",
        "hi",
        "--max-new-tokens",
        12,
        "--greedy",
        "--frequency-penalty",
        -2,
        "--presence-penalty",
        -1,
    )
    assert code == 0 and out == "hi" + want + "\n"
    sampled = dict(temperature=1.5, seed=2, min_p=0.9)
    want = tok.decode(generate(model, tok.encode("hi"), 12, eos_id=256, **sampled))
    assert want != tok.decode(generate(model, tok.encode("hi"), 12, eos_id=256, temperature=1.5, seed=2))
    flags = ("--temperature", 1.5, "--seed", 2, "--min-p", 0.9)
    code, out, _ = run(capsys, path, "--prompt", "hi", "--max-new-tokens", 12, *flags)
    assert code == 0 and out == "hi" + want + "\n"
    first = generate(model, tok.encode("hi"), 1, eos_id=256)[0]
    want = tok.decode(generate(model, tok.encode("hi"), 12, eos_id=256, logit_bias={first: -100.0}))
    code, out, _ = run(
        capsys, path, "--prompt", "hi", "--max-new-tokens", 12, "--greedy", "--logit-bias", f'{{"{first}": -100}}'
    )
    assert code == 0 and out == "hi" + want + "\n" and first not in tok.encode(out[2:])[:1]
