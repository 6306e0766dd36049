"""`hybridlm convert`: options given where they do nothing are refused, a run directory is read as its exported
model, and --config says why a file is not a model config."""

import json
import os

import pytest

import hybridlm
from hybridlm import HybridLM
from hybridlm.cli import main
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import fifos_never_read, tiny_config


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A byte-tokenized checkpoint that NemotronH and Megatron names both hold."""
    path = tmp_path_factory.mktemp("ck") / "ck"
    config = tiny_config("M-*-", vocab_size=257).replace(position_embedding="none")
    return hybridlm.save(HybridLM(config, seed=0), path, extra_files=ByteTokenizer().files())


@pytest.mark.parametrize("to", ["nemotron-h", "megatron"])
def test_convert_to_refuses_config_and_writes_nothing(byte_model, tmp_path, capsys, to):
    """--config only says which model a Megatron file holds: with --to it would be silently ignored."""
    dst = tmp_path / ("out.pt" if to == "megatron" else "out")
    assert main(["convert", str(byte_model), str(dst), "--to", to, "--config", str(byte_model)]) == 2
    assert "error: --config is only used with --from megatron" in capsys.readouterr().err
    assert not dst.exists()


def test_convert_to_takes_a_run_directory_as_its_exported_model(byte_model, tmp_path, capsys):
    """With --to, SRC may be a training run: its model/ is converted (as generate and inspect read it)."""
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(byte_model, run / "model")
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "nemotron-h"]) == 0
    assert f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    back = hybridlm.load(convert_back(tmp_path / "hf", tmp_path / "back"))
    original = hybridlm.load(byte_model)
    assert all(back.state_dict()[k].equal(v) for k, v in original.state_dict().items())
    # A run that has not exported its model yet is named as such, not as a folder without config.json.
    shutil.rmtree(run / "model")
    assert main(["convert", str(run), str(tmp_path / "hf2"), "--to", "nemotron-h"]) == 2
    err = capsys.readouterr().err
    assert f"error: src {run} is a training run without an exported model yet" in err
    assert not (tmp_path / "hf2").exists()


def convert_back(hf, dst):
    from hybridlm.checkpoint.hf_nemotron import convert_from_nemotron_h

    return convert_from_nemotron_h(hf, dst)


def test_megatron_config_says_why_a_file_is_not_a_model_config(byte_model, tmp_path, capsys):
    """A ConfigError's own words, other errors with their type: both after the --config path."""
    pt = tmp_path / "m.pt"
    assert main(["convert", str(byte_model), str(pt), "--to", "megatron"]) == 0
    capsys.readouterr()
    cases = {
        "garbage.json": ("{garbage", "(JSONDecodeError: Expecting property name"),
        "misspelt.json": (json.dumps({"pattern": "M-", "hidden_sizee": 3}), "(hidden_sizee: unknown ModelConfig field"),
        "wrapped.json": (
            json.dumps({"format": "hybridlm", "config": {"pattern": "M-", "hidden_sizee": 3}}),
            "(hidden_sizee: unknown ModelConfig field",
        ),
        "list.json": ("[1, 2]", "(config: expected a JSON object, got list)"),
    }
    for name, (text, reason) in cases.items():
        (tmp_path / name).write_text(text)
        argv = ["convert", str(pt), str(tmp_path / "back"), "--from", "megatron", "--config", str(tmp_path / name)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --config {tmp_path / name}: not a model config {reason}"), err
    assert not (tmp_path / "back").exists()


def test_a_training_state_outside_a_run_names_no_run(byte_model, tmp_path, capsys, monkeypatch):
    """A DCP state not in a run's checkpoints/ (copied out, or written by save_training_state) was called "a
    training-state checkpoint of the run" two folders up, with "hybridlm train --resume" of that folder as advice."""
    from hybridlm.checkpoint.training_state import save_training_state

    state = save_training_state(tmp_path / "saved" / "state", hybridlm.load(byte_model), step=0)
    for argv in (
        ["generate", str(state), "--prompt", "x"],
        ["convert", str(state), str(tmp_path / "hf"), "--to", "nemotron-h"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{state} is a training-state checkpoint (DCP, not a model folder) outside a run's checkpoints/" in err
        assert "of the run" not in err and f"--resume {tmp_path}" not in err, err
    assert not (tmp_path / "hf").exists()
    # Named from inside a run's checkpoints/, it is that run's (not the run of ".", the folder two names up).
    save_training_state(tmp_path / "run" / "checkpoints" / "step-000001", hybridlm.load(byte_model), step=1)
    monkeypatch.chdir(tmp_path / "run" / "checkpoints")
    assert main(["generate", "step-000001", "--prompt", "x"]) == 2
    assert f"a training-state checkpoint of the run {tmp_path / 'run'} (DCP" in capsys.readouterr().err


def test_convert_writes_shards_of_the_size_given(byte_model, tmp_path, capsys):
    """--max-shard-size (bytes or with a unit, as save_pretrained reads "5GB") splits every directory a conversion
    writes; the weights read back the same. --to megatron writes one file and refuses it; a bad size is named."""
    import safetensors.torch

    def shards(folder):
        return len(list(folder.glob("model-*.safetensors")))

    sizes = dict(safetensors.torch.load_file(byte_model / "model.safetensors"))
    total = sum(t.nbytes for t in sizes.values())
    assert total > 40_000  # else one shard could hold everything
    assert (
        main(["convert", str(byte_model), str(tmp_path / "hf"), "--to", "nemotron-h", "--max-shard-size", "20KB"]) == 0
    )
    assert shards(tmp_path / "hf") > 1
    argv = ["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--from", "nemotron-h"]
    assert main([*argv, "--max-shard-size", "19.5KiB"]) == 0
    assert shards(tmp_path / "back") > 1
    assert main(["convert", str(byte_model), str(tmp_path / "m.pt"), "--to", "megatron"]) == 0
    assert (
        main(
            [
                "convert",
                str(tmp_path / "m.pt"),
                str(tmp_path / "mback"),
                "--from",
                "megatron",
                "--max-shard-size",
                "2e4",
            ]
        )
        == 0
    )
    assert shards(tmp_path / "mback") > 1
    original = hybridlm.load(byte_model).state_dict()
    for folder in ("back", "mback"):
        assert all(hybridlm.load(tmp_path / folder).state_dict()[k].equal(v) for k, v in original.items())
    capsys.readouterr()
    assert (
        main(["convert", str(byte_model), str(tmp_path / "m2.pt"), "--to", "megatron", "--max-shard-size", "5GB"]) == 2
    )
    assert "--max-shard-size is not used with --to megatron" in capsys.readouterr().err
    assert not (tmp_path / "m2.pt").exists()
    with pytest.raises(SystemExit):
        main(["convert", str(byte_model), str(tmp_path / "hf2"), "--to", "nemotron-h", "--max-shard-size", "5XB"])
    assert "'5XB' is not a size" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, size", [("5GB", 5 * 10**9), ("5e9", 5 * 10**9), ("512MiB", 2**29), ("1.5 gb", 15 * 10**8), ("100", 100)]
)
def test_shard_sizes_are_read_as_save_pretrained_reads_them(text, size):
    from hybridlm.cli import byte_size

    assert byte_size(text) == size


@pytest.mark.parametrize("text", ["0", "-5", "0.5", "5XB", "GB", "inf", "nan", "1e400", ""])
def test_a_shard_size_that_is_not_one_is_named(text):
    import argparse

    from hybridlm.cli import byte_size

    with pytest.raises(argparse.ArgumentTypeError, match=f"{text!r} is not a size: give bytes"):
        byte_size(text)


def test_convert_from_megatron_refuses_a_fifo_as_its_config(tmp_path, capsys):
    """``convert --from megatron --config FIFO`` waited forever for a writer: refused now (status 2), by name."""
    os.mkfifo(tmp_path / "config.json")
    argv = ["convert", str(tmp_path / "m.pt"), str(tmp_path / "out"), "--from", "megatron"]
    with fifos_never_read(tmp_path / "config.json"):  # (a read would hang the suite)
        assert main([*argv, "--config", str(tmp_path / "config.json")]) == 2
    assert "--config " in (err := capsys.readouterr().err) and "config.json: not a regular file" in err


def test_convert_qwen3_next_keeps_the_tokenizer_and_its_end_of_text_id(tmp_path):
    """`--from qwen3-next` writes the canonical model with the folder's tokenizer.json and a spec naming
    generation_config.json's eos_token_id; `--to qwen3-next` writes that id back into config.json."""
    pytest.importorskip("transformers.models.qwen3_next")
    from hybridlm.train.tokenizer import SPEC_NAME
    from tests.checkpoint.test_hf_qwen3_next import saved

    _, hf = saved(tmp_path)
    (hf / "tokenizer.json").write_text("{}")
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert main(["convert", str(hf), str(tmp_path / "ours"), "--from", "qwen3-next"]) == 0
    assert json.loads((tmp_path / "ours" / SPEC_NAME).read_text())["eos_id"] == 7
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == "{}"
    assert hybridlm.load(tmp_path / "ours").config.pattern == "GE*-GE*E"
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "qwen3-next"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == 7
    assert (tmp_path / "back" / "tokenizer.json").read_text() == "{}"


@pytest.mark.parametrize(
    "nbytes, text",
    [(0, "0 bytes"), (1023, "1,023 bytes"), (1536, "1.50 KiB"), (3 * 2**20, "3.00 MiB"), (1.9e9, "1.77 GiB")],
)
def test_binary_size_names_the_largest_unit_that_keeps_a_number_of_at_least_one(nbytes, text):
    """serve's start-up line: a tiny model's prefix cache of a few MiB read "0.00 GiB"."""
    from hybridlm.cli import binary_size

    assert binary_size(nbytes) == text
