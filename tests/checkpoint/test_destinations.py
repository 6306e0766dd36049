"""Where checkpoints are written and what they replace: one-step swaps, links, the current directory,
foreign files and folders left alone; damaged metadata refused with where and why."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hybridlm
from hybridlm import CheckpointError, HybridLM
from hybridlm.checkpoint import io
from hybridlm.checkpoint.hf_nemotron import convert_from_nemotron_h, convert_to_nemotron_h
from hybridlm.checkpoint.inspect import describe
from hybridlm.checkpoint.megatron import convert_from_megatron, convert_to_megatron, load_megatron
from hybridlm.checkpoint.training_state import load_training_state, save_training_state
from hybridlm.cli import main
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def model():
    return HybridLM(tiny_config("M*-"), seed=0)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_replacing_a_checkpoint_is_one_swap(tmp_path, model, monkeypatch):
    path = hybridlm.save(HybridLM(model.config, seed=1), tmp_path / "ck")
    # With the swap, no rename happens at all: a crash at any moment leaves a whole folder at `ck`.
    monkeypatch.setattr(io.os, "replace", lambda *a: pytest.fail("renamed instead of swapped"))
    hybridlm.save(model, path)
    monkeypatch.undo()
    assert _same(hybridlm.load(path), model)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # the previous folder is gone, nothing hidden is left
    # Where the system cannot swap: two renames, the same result.
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    hybridlm.save(HybridLM(model.config, seed=1), path)
    assert not _same(hybridlm.load(path), model) and sorted(os.listdir(tmp_path)) == ["ck"]


def test_replacing_a_checkpoint_never_deletes_files_it_does_not_write_back(tmp_path, model):
    """A load-then-save onto the same folder lost its tokenizer (and a user's README) with the old folder."""
    path = hybridlm.save(model, tmp_path / "ck", extra_files={"tokenizer.json": "{}"})
    (path / "README.md").write_text("notes")
    with pytest.raises(CheckpointError, match=r"would delete README.md, tokenizer.json, which this write does not"):
        hybridlm.save(hybridlm.load(path), path)
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    (path / "README.md").unlink()
    hybridlm.save(model, path, extra_files={"tokenizer.json": "{}"}, max_shard_size=4096)  # other shards: fine
    assert "tokenizer.json" in os.listdir(path) and len(list(path.glob("*.safetensors"))) > 1
    hf = convert_to_nemotron_h(path, tmp_path / "hf")  # carries the tokenizer: converting back keeps it
    convert_from_nemotron_h(hf, path)
    (hf / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"would delete tokenizer\.json"):
        convert_from_nemotron_h(hf, path)
    assert "tokenizer.json" in os.listdir(path)
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]  # nothing half-written or hidden is left


def test_a_link_is_written_through_and_the_current_directory_is_refused(tmp_path, model, monkeypatch):
    target = hybridlm.save(HybridLM(model.config, seed=1), tmp_path / "target")
    (tmp_path / "link").symlink_to(target)
    hybridlm.save(model, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and _same(hybridlm.load(target), model)
    assert sorted(os.listdir(tmp_path)) == ["link", "target"]
    monkeypatch.chdir(target)
    with pytest.raises(CheckpointError, match="current directory"):
        hybridlm.save(model, ".")
    assert _same(hybridlm.load(target), model)


def test_save_training_state_replaces_only_a_training_state(tmp_path, model):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for victim in ("thesis", "file"):
        with pytest.raises(CheckpointError, match="is not a training state; refusing"):
            save_training_state(tmp_path / victim, model, step=1)
    assert (tmp_path / "thesis" / "thesis.tex").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
    save_training_state(tmp_path / "state", model, step=1)
    save_training_state(tmp_path / "state", model, step=2)  # its own kind: replaced
    assert json.loads((tmp_path / "state" / "trainer_state.json").read_text())["step"] == 2


def test_damaged_trainer_state_fields_are_refused(tmp_path, model):
    save_training_state(tmp_path / "s", model, step=3)
    file = tmp_path / "s" / "trainer_state.json"
    good = json.loads(file.read_text())
    for step in ("three", -5, True):
        file.write_text(json.dumps(good | {"step": step}))
        with pytest.raises(CheckpointError, match="step must be a non-negative integer"):
            load_training_state(tmp_path / "s", HybridLM(model.config, seed=1))


def test_convert_to_megatron_replaces_only_its_own_export(tmp_path, model):
    ck = hybridlm.save(model, tmp_path / "ck")
    weights = (ck / "model.safetensors").read_bytes()
    (tmp_path / "notes.pt").write_text("precious")
    (tmp_path / "dir.pt").mkdir()
    for dst in (ck / "model.safetensors", tmp_path / "notes.pt", tmp_path / "dir.pt"):
        with pytest.raises(CheckpointError, match=r"is not a Megatron export of hybridlm .*refusing to replace"):
            convert_to_megatron(ck, dst)
    assert (ck / "model.safetensors").read_bytes() == weights and (tmp_path / "notes.pt").read_text() == "precious"
    out = convert_to_megatron(ck, tmp_path / "m.pt")
    assert convert_to_megatron(ck, out) == out  # its own export: replaced
    assert load_megatron(out).keys()


def test_an_interrupted_megatron_export_can_be_rerun(tmp_path, model, monkeypatch):
    from hybridlm.checkpoint import megatron

    ck = hybridlm.save(model, tmp_path / "ck")

    def interrupted(obj, file):
        Path(file).write_bytes(b"half")  # the weights half written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(megatron.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_to_megatron(ck, tmp_path / "m.pt")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # nothing half written is left
    assert load_megatron(convert_to_megatron(ck, tmp_path / "m.pt")).keys()


def test_a_failed_megatron_export_leaves_the_previous_pair(tmp_path, model, monkeypatch, capsys):
    """The config beside a Megatron export and its weights are both written before either replaces a file:
    a write that fails (here a full disk) leaves the previous export whole, not new config beside old weights."""
    from hybridlm.checkpoint import megatron

    ck = hybridlm.save(model, tmp_path / "ck")
    out = convert_to_megatron(ck, tmp_path / "m.pt")
    before = {f: (tmp_path / f).read_bytes() for f in ("m.pt", "m.pt.hybridlm.json")}
    other = hybridlm.save(HybridLM(tiny_config("M*-", mlp_activation="gelu"), seed=1), tmp_path / "other")

    def disk_full(obj, file):
        Path(file).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6016 vs 5910")

    monkeypatch.setattr(megatron.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"m\.pt: cannot write it, is the disk full\? \(\[enforce fail"):
        convert_to_megatron(other, out)
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(tmp_path)) == ["ck", "m.pt", "m.pt.hybridlm.json", "other"]

    def no_space(*args, **kwargs):  # what safetensors raises: no OSError, the error number in its message
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", no_space)
    assert main(["convert", str(ck), str(tmp_path / "hf"), "--to", "nemotron-h"]) == 2
    assert "error: no space left on device (" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ck", "m.pt", "m.pt.hybridlm.json", "other"]


def test_a_conversion_never_writes_over_its_own_source(tmp_path, model):
    """A destination that holds the source would be replaced by a folder without it: each of these deleted
    the source before (the destinations are of the kind each conversion may replace)."""
    ck = hybridlm.save(model, tmp_path / "ck")
    inner_hf = convert_to_nemotron_h(ck, ck / "hf")  # a NemotronH export kept inside the checkpoint folder
    hf = convert_to_nemotron_h(ck, tmp_path / "hf")
    inner_ck = hybridlm.save(model, hf / "ck")  # a checkpoint kept inside a NemotronH folder
    exported = convert_to_megatron(ck, ck / "model.pt")  # a Megatron export inside the checkpoint folder
    for convert in (
        lambda: convert_from_nemotron_h(inner_hf, ck),
        lambda: convert_to_nemotron_h(inner_ck, hf),
        lambda: convert_from_megatron(exported, ck),
    ):
        with pytest.raises(CheckpointError, match=r"is the source .* or holds it, which writing there would delete"):
            convert()
    assert all(p.exists() for p in (inner_hf / "config.json", inner_ck / "config.json", exported))
    assert _same(hybridlm.load(ck), model)


def test_a_write_error_that_is_no_system_refusal_is_raised_as_it_is(tmp_path, model, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug in the writer")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(ValueError, match=r"^a bug in the writer$"):
        hybridlm.save(model, tmp_path / "ck")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("version", ["1", 1.0, True, 0, -5, None])
def test_format_version_must_be_a_positive_integer(tmp_path, model, version):
    ck = hybridlm.save(model, tmp_path / "ck")
    meta = json.loads((ck / "config.json").read_text())
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version must be a positive integer"):
        hybridlm.load(ck)
    meta["format_version"] = 2
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 2 is newer than this hybridlm reads"):
        hybridlm.load(ck)


def test_deeply_nested_json_is_unreadable_not_a_crash(tmp_path, model, capsys):
    ck = hybridlm.save(model, tmp_path / "ck")
    (ck / "config.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable"):
        hybridlm.load(ck)
    assert main(["inspect", str(ck)]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_load_checks_dtype_and_device(tmp_path, model):
    ck = hybridlm.save(model, tmp_path / "ck")
    assert next(hybridlm.load(ck, dtype="bfloat16").embeddings.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"floating torch\.dtype"):
        hybridlm.load(ck, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"floating torch\.dtype"):
        hybridlm.load(ck, dtype="cuda")
    with pytest.raises(CheckpointError, match="device 'meta' holds no weights"):
        hybridlm.load(ck, device="meta")


def test_inspect_counts_bytes_of_every_dtype_and_says_what_a_path_is(tmp_path, capsys):
    tensors = {"u16": torch.zeros(1000, dtype=torch.uint16), "u32": torch.zeros(1000, dtype=torch.uint32)}
    save_file(tensors | {"f": torch.zeros(10)}, tmp_path / "x.safetensors")
    assert describe(tmp_path / "x.safetensors")["bytes"] == 2000 + 4000 + 40
    torch.save({"model": {"w": torch.zeros(3)}}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        describe(tmp_path / "m.pt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="a training run: inspect its model/"):
        describe(tmp_path / "run")


def test_convert_cli_takes_a_checkpoint_as_megatron_config_and_no_verify(tmp_path, model, capsys):
    config = tiny_config(
        "M*-", position_embedding="none", qk_norm=False, mlp_activation="relu2", moe_router_score="sigmoid"
    )
    ck = hybridlm.save(HybridLM(config, seed=0), tmp_path / "ck")
    assert main(["convert", str(ck), str(tmp_path / "m.pt"), "--to", "megatron"]) == 0
    for given in (ck, ck / "config.json"):
        out = tmp_path / f"back-{given.name}"
        assert main(["convert", str(tmp_path / "m.pt"), str(out), "--from", "megatron", "--config", str(given)]) == 0
        assert _same(hybridlm.load(out), hybridlm.load(ck))
    assert main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "x"), "--from", "megatron", "--config", "nope"]) == 2
    assert "--config nope: not a model config" in capsys.readouterr().err
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last weight
    (ck / "model.safetensors").write_bytes(bytes(data))
    assert main(["convert", str(ck), str(tmp_path / "hf"), "--to", "nemotron-h"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and err.count(str(ck / "model.safetensors")) == 1 and "convert --to" in err
    assert main(["convert", str(ck), str(tmp_path / "hf"), "--to", "nemotron-h", "--no-verify"]) == 0
    convert_to_nemotron_h(ck, tmp_path / "hf2", verify=False)


def test_no_verify_is_refused_with_every_from(tmp_path, model, capsys):
    ck = hybridlm.save(model, tmp_path / "ck")
    out = convert_to_megatron(ck, tmp_path / "m.pt")
    for src, kind in ((out, "megatron"), (ck, "nemotron-h")):
        assert main(["convert", str(src), str(tmp_path / "back"), "--from", kind, "--no-verify"]) == 2
        assert "--no-verify is only used with --to" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


def test_a_destination_under_a_file_is_named(tmp_path, model):
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(CheckpointError, match=r"afile is a file, not a folder"):
        hybridlm.save(model, tmp_path / "afile" / "ck")
    assert (tmp_path / "afile").read_text() == "keep"
    ck = hybridlm.save(model, tmp_path / "ck")
    with pytest.raises(
        CheckpointError, match=r"^\S*afile/m\.pt: \S*afile is a file, not a folder"
    ):  # was "File exists"
        convert_to_megatron(ck, tmp_path / "afile" / "m.pt")


def test_a_link_loop_as_destination_is_named(tmp_path, model, capsys):
    """It was "unexpected RuntimeError: Symlink loop ... (this may be a bug in hybridlm)"."""
    ck = hybridlm.save(model, tmp_path / "ck")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for argv in (["--to", "nemotron-h"], ["--to", "megatron"]):
        dst = tmp_path / ("a" if argv[1] == "nemotron-h" else "a/m.pt")
        assert main(["convert", str(ck), str(dst), *argv]) == 2
        assert f"error: {dst}: cannot resolve it" in capsys.readouterr().err


def test_a_megatron_export_interrupted_between_its_renames_can_be_rerun(tmp_path, model, monkeypatch):
    """The config beside the weights is renamed into place first: an interruption before the weights' rename
    leaves no weights file without its config, which a rerun would refuse to replace."""
    from hybridlm.checkpoint import io

    ck = hybridlm.save(model, tmp_path / "ck")
    real, calls = io.os.replace, []

    def interrupted_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        convert_to_megatron(ck, tmp_path / "m.pt")
    monkeypatch.undo()
    assert not (tmp_path / "m.pt").exists()
    assert load_megatron(convert_to_megatron(ck, tmp_path / "m.pt")).keys()
    assert sorted(os.listdir(tmp_path)) == ["ck", "m.pt", "m.pt.hybridlm.json"]


@pytest.mark.parametrize("kind", ["another kind of folder", "a checkpoint with a file of its user's"])
def test_a_conversion_into_hybridlm_refuses_its_destination_before_reading_weights(tmp_path, model, monkeypatch, kind):
    """The refusal came only after the source's weights were read and converted (minutes for a large model)."""
    from hybridlm.checkpoint import hf_nemotron, megatron

    ck = hybridlm.save(model, tmp_path / "ck")
    hf, pt = convert_to_nemotron_h(ck, tmp_path / "hf"), convert_to_megatron(ck, tmp_path / "model.pt")
    dst = tmp_path / "dst"
    if kind == "another kind of folder":
        dst.mkdir()
        kept = dst / "data.txt"
        message = "exists and is not a hybridlm checkpoint"
    else:
        kept = hybridlm.save(model, dst) / "notes.md"
        message = "replacing it would delete notes.md"

    kept.write_text("kept")

    def unread(*args, **kwargs):
        raise AssertionError("weights read before the destination was checked")

    monkeypatch.setattr(hf_nemotron, "import_nemotron_h", unread)
    monkeypatch.setattr(megatron, "load_megatron", unread)
    for convert in (lambda: convert_from_nemotron_h(hf, dst), lambda: convert_from_megatron(pt, dst, model.config)):
        with pytest.raises(CheckpointError, match=message):
            convert()
    assert kept.read_text() == "kept"
