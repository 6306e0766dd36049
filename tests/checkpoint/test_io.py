"""checkpoint.io: what every format writes is readable by others, and refusals list every problem."""

import json
import os
import re
import stat

import pytest
import torch

import hybridlm
from hybridlm import CheckpointError, HybridLM
from hybridlm.checkpoint.hf_nemotron import convert_to_nemotron_h
from hybridlm.checkpoint.io import INDEX_NAME, MAX_LISTED, check_fit, dominant_dtype, refuse_meta, write_safetensors
from hybridlm.checkpoint.megatron import convert_to_megatron
from hybridlm.checkpoint.training_state import save_training_state
from tests.helpers import tiny_config


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root):
    """(path, permission bits) of ``root`` and everything under it."""
    out = [(root, stat.S_IMODE(os.stat(root).st_mode))]
    for folder, dirs, files in os.walk(root):
        out += [(os.path.join(folder, n), stat.S_IMODE(os.stat(os.path.join(folder, n)).st_mode)) for n in dirs + files]
    return out


def test_saved_checkpoints_are_readable_by_others(tmp_path, umask_022):
    config = tiny_config(
        "M*-E", position_embedding="none", qk_norm=False, mlp_activation="relu2", moe_router_score="sigmoid"
    )
    model = HybridLM(config, seed=1)
    ours = hybridlm.save(model, tmp_path / "ours", max_shard_size=10_000)  # sharded: several files and an index
    convert_to_nemotron_h(ours, tmp_path / "hf")
    convert_to_megatron(ours, tmp_path / "megatron" / "model.pt")
    save_training_state(tmp_path / "state", model, torch.optim.AdamW(model.parameters()), step=1)
    seen = _modes(tmp_path / "ours") + _modes(tmp_path / "hf") + _modes(tmp_path / "megatron")
    seen += _modes(tmp_path / "state")
    assert len(seen) > 10
    for path, mode in seen:
        want = 0o755 if os.path.isdir(path) else 0o644
        assert mode == want, f"{path}: mode {mode:o}, expected {want:o} under umask 022"
    assert sorted(os.listdir(tmp_path)) == ["hf", "megatron", "ours", "state"], "no temporary folder is left"


def test_check_fit_lists_every_problem():
    tensors = {"a": torch.zeros(2), "b": torch.zeros(3, 1), "x": torch.zeros(1)}
    with pytest.raises(CheckpointError) as err:
        check_fit(tensors, {"a": (2,), "b": (3, 2), "c": (4,)}, "test dict")
    text = str(err.value)
    assert "missing tensors (1): c" in text and "unexpected tensors (1): x" in text
    assert "b: test dict has (3, 1), expected (3, 2)" in text
    check_fit({"a": torch.zeros(2)}, {"a": (2,)}, "test dict")  # a fit passes


def test_every_list_of_names_says_when_it_is_cut_short():
    """One way to list names (io.listed): the first MAX_LISTED, then " ..." where there are more; the refusal of
    integer weights listed 20 of 25 as if they were all."""
    from hybridlm.checkpoint.io import not_floating

    ints = {f"t{i:02d}": torch.zeros(1, dtype=torch.int32) for i in range(MAX_LISTED + 5)}
    (line,) = not_floating(ints)
    assert line.endswith(f"t{MAX_LISTED - 1} (torch.int32) ...") and f"t{MAX_LISTED} " not in line
    (line,) = not_floating(dict(list(ints.items())[:MAX_LISTED]))
    assert line.endswith(f"t{MAX_LISTED - 1} (torch.int32)")


def test_an_index_without_a_weight_map_is_named(tmp_path):
    """The index is read as every JSON file of a checkpoint is (io.read_json): one without a weight_map is refused
    by name, not as "unreadable index ('weight_map')"."""
    from hybridlm.checkpoint.io import weight_files

    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weight_map is not a JSON object"):
        weight_files(tmp_path)
    (tmp_path / INDEX_NAME).write_text("[1]")
    with pytest.raises(CheckpointError, match=r"index\.json: expected a JSON object, got list"):
        weight_files(tmp_path)


def test_refuse_meta_names_the_tensors_and_says_how_to_give_them_values():
    """The one refusal of tensors without values (saving weights or a training state, loading into a model), which
    three call sites wrote three ways (one said nothing of init_weights, one nothing of to_empty)."""
    real, meta = torch.zeros(2), torch.empty(2, device="meta")
    refuse_meta({"a": real, "step": 3}, "cannot save")  # values everywhere (and a non-tensor entry): passes
    with pytest.raises(CheckpointError, match=r"^cannot save: tensors on the meta device, without values \(b\); "):
        refuse_meta({"a": real, "b": meta}, "cannot save")
    many = {f"t{i}": meta for i in range(MAX_LISTED + 1)}
    with pytest.raises(
        ValueError, match=r"\(all \d+ of them: t0, \.\.\.\); allocate the model with model\.to_empty"
    ) as e:
        refuse_meta(many, "cannot load", ValueError)
    assert type(e.value) is ValueError and "model.init_weights()" in str(e.value)
    with pytest.raises(CheckpointError, match=rf"\(t0, .*, t{MAX_LISTED - 1} \.\.\.\);"):
        refuse_meta({**many, "a": real}, "cannot save")


def test_dominant_dtype_counts_elements():
    ts = [torch.zeros(10, dtype=torch.bfloat16), torch.zeros(3), torch.zeros(100, dtype=torch.int64)]
    assert dominant_dtype(ts) == torch.bfloat16
    assert dominant_dtype([torch.zeros(2, dtype=torch.int32)]) == torch.float32


def test_a_removed_directory_vanishes_before_its_files_are_deleted(tmp_path, monkeypatch):
    """A crash during the deletion (simulated: rmtree dies at once) leaves no visible half folder."""
    from hybridlm.checkpoint import io
    from hybridlm.train.listing import list_checkpoints

    for step in (1, 2):
        (tmp_path / f"step-{step:06d}").mkdir()
        (tmp_path / f"step-{step:06d}" / ".metadata").write_text("x")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        io.remove_directory(tmp_path / "step-000001")
    assert list_checkpoints(tmp_path) == [tmp_path / "step-000002"]
    monkeypatch.undo()
    io.remove_directory(tmp_path / "step-000002")
    io.remove_directory(tmp_path / "step-000002")  # already gone: nothing to do
    assert list_checkpoints(tmp_path) == []


def test_every_refused_write_names_its_file(tmp_path):
    """numpy's tofile on a full disk raised "N requested and 0 written" (prepare printed only that), and
    Python's own ENOSPC from a write (metrics.jsonl, a tokenizer file beside the weights) named no file."""
    from hybridlm.checkpoint.io import written
    from hybridlm.train.metrics import Metrics

    def failing(error):
        def write(*args):
            raise error

        return write

    file = tmp_path / "tokens.bin"
    with pytest.raises(CheckpointError, match=r"tokens\.bin: cannot write it, is the disk full\? \(1133296 requested"):
        written(file, failing(OSError("1133296 requested and 0 written")))
    with pytest.raises(OSError, match=r"No space left on device: '.*tokens\.bin'"):
        written(file, failing(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="not a refused write"):  # other errors as they are
        written(file, failing(OSError("not a refused write")))

    metrics = Metrics(tmp_path, 10, 0, enabled=True, progress=False)
    metrics._jsonl.write = failing(OSError(28, "No space left on device"))
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics\.jsonl'"):
        metrics.record(1, {"loss": 1.0}, console=False)


def test_dominant_dtype_is_the_dtype_of_most_elements_not_most_tensors():
    """Many small float32 tensors (norm weights) beside one large bfloat16 matrix: the weights are bfloat16."""
    ts = [torch.zeros(100, dtype=torch.bfloat16), torch.zeros(4), torch.zeros(4), torch.zeros(4)]
    assert dominant_dtype(ts) == torch.bfloat16
    assert dominant_dtype([torch.zeros(4, dtype=torch.bfloat16), torch.zeros(2), torch.zeros(3)]) == torch.float32


def test_safetensors_shards_fill_up_to_the_limit_each(tmp_path):
    """Every shard starts counting its bytes from zero: after the first full shard, every tensor got a file
    of its own."""
    tensors = {name: torch.full((25,), float(i)) for i, name in enumerate("abcdef")}  # 100 bytes each
    write_safetensors(tmp_path, tensors, max_shard_size=250)
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    shards = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert weight_map == dict(zip("abcdef", [s for s in shards for _ in range(2)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_NAME, *shards])


def test_a_file_behind_a_link_is_written_through_it(tmp_path):
    # As a checkpoint folder behind a link: the link stays and points at the new file (a Megatron export,
    # a run's config.toml), and nothing else is left beside either.
    from hybridlm.checkpoint.megatron import load_megatron, save_megatron

    (tmp_path / "real").mkdir()
    state = {"embedding.word_embeddings.weight": torch.arange(6.0).reshape(2, 3)}
    save_megatron({k: v + 1 for k, v in state.items()}, tmp_path / "real" / "model.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "real" / "model.pt")
    save_megatron(state, tmp_path / "link.pt")
    assert (tmp_path / "link.pt").is_symlink()
    assert torch.equal(
        load_megatron(tmp_path / "real" / "model.pt")["embedding.word_embeddings.weight"],
        state["embedding.word_embeddings.weight"],
    )
    assert sorted(os.listdir(tmp_path)) == ["link.pt", "real"] and os.listdir(tmp_path / "real") == ["model.pt"]


def test_written_files_follow_the_umask(tmp_path):
    """Modes are those of a plain open()/mkdir under the process's umask (here 027: no access for others)."""
    old = os.umask(0o027)
    try:
        path = hybridlm.save(HybridLM(tiny_config("M-"), seed=1), tmp_path / "ck", extra_files={"notes.txt": "x"})
    finally:
        os.umask(old)
    seen = _modes(path)
    assert len(seen) == 4  # the folder, config.json, the weights, notes.txt
    for file, mode in seen:
        assert mode == (0o750 if os.path.isdir(file) else 0o640), f"{file}: mode {mode:o}"


def test_remove_leftovers_deletes_exactly_the_names_of_interrupted_writes(tmp_path):
    from hybridlm.checkpoint.io import remove_leftovers

    leftovers = [".ck.tmp-0123abcd", ".ck.old-89abcdef", ".ck.del-00ff00ff", ".step-000002.tmp"]
    kept = [".hidden", "ck.tmp", ".ck.tmp-xyz", ".ck.tmp-0123abcde", "ck", ".ck.bak-0123abcd"]
    for i, name in enumerate(leftovers + kept):
        if i % 2:
            (tmp_path / name).mkdir()
            (tmp_path / name / "inner").write_text("x")
        else:
            (tmp_path / name).write_text("x")
    assert remove_leftovers(tmp_path) == sorted(leftovers)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert remove_leftovers(tmp_path / "nowhere") == []


def test_every_hidden_name_is_one_remove_leftovers_knows(tmp_path):
    """hidden() names what a kill leaves behind; a name remove_leftovers does not know would stay for ever."""
    from hybridlm.checkpoint.io import hidden, remove_leftovers

    names = sorted(hidden(tmp_path / "ck", kind).name for kind in ("tmp", "old", "del"))
    for name in [*names, "ck"]:  # (ck there: its .old copy is removed, not put back)
        (tmp_path / name).mkdir()
    assert remove_leftovers(tmp_path) == names and os.listdir(tmp_path) == ["ck"]
    assert hidden(tmp_path / "ck", "tmp") != hidden(tmp_path / "ck", "tmp")  # (two writers at once: two names)


def test_shards_are_filled_exactly_to_the_limit_and_none_is_empty(tmp_path):
    """A shard may reach max_shard_size exactly; a tensor larger than the limit gets a shard of its own (no
    empty shard before it); the index states the total size."""
    tensors = {name: torch.full((25,), float(i)) for i, name in enumerate("abcd")}  # 100 bytes each
    (tmp_path / "exact").mkdir()
    write_safetensors(tmp_path / "exact", tensors, max_shard_size=200)
    index = json.loads((tmp_path / "exact" / INDEX_NAME).read_text())
    shards = [f"model-{i:05d}-of-00002.safetensors" for i in (1, 2)]
    assert index["weight_map"] == {"a": shards[0], "b": shards[0], "c": shards[1], "d": shards[1]}
    assert index["metadata"]["total_size"] == 400
    (tmp_path / "big").mkdir()
    write_safetensors(tmp_path / "big", {"a": torch.zeros(100), "b": torch.zeros(10)}, max_shard_size=50)
    index = json.loads((tmp_path / "big" / INDEX_NAME).read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == 440


@pytest.mark.parametrize("size", ["5GB", None, 0, -1, float("nan"), True])
def test_a_shard_size_that_is_no_positive_number_of_bytes_is_refused_by_name(tmp_path, size):
    """max_shard_size="5GB", as transformers' save_pretrained takes it, failed inside the sharding with "'>' not
    supported between instances of 'int' and 'str'"; 0 or -1 wrote one tensor per file."""
    with pytest.raises(CheckpointError, match=r"max_shard_size must be a positive number of bytes.*got "):
        hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck", max_shard_size=size)
    assert not (tmp_path / "ck").exists()
    hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck", max_shard_size=2e4)  # a float is a number of bytes
    assert len(list((tmp_path / "ck").glob("model-*.safetensors"))) > 1


def test_config_json_that_is_no_object_is_refused_by_name(tmp_path):
    path = hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck")
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        hybridlm.load(path)


def test_an_existing_empty_folder_is_written_into(tmp_path):
    (tmp_path / "ck").mkdir()
    hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck")
    assert hybridlm.load(tmp_path / "ck").config.pattern == "M-"


def test_the_destination_is_checked_again_just_before_the_swap(tmp_path, monkeypatch):
    """A file that appears in the destination while the weights are written (another process) is not deleted
    with the old folder: the write is refused at the end, and nothing of it is left behind."""
    from hybridlm.checkpoint import io

    path = hybridlm.save(HybridLM(tiny_config("M-"), seed=1), tmp_path / "ck")
    real = io.write_safetensors

    def meanwhile(directory, tensors, max_shard_size):
        real(directory, tensors, max_shard_size)
        (path / "notes.txt").write_text("written meanwhile")

    monkeypatch.setattr(io, "write_safetensors", meanwhile)
    with pytest.raises(CheckpointError, match=r"replacing it would delete notes\.txt"):
        hybridlm.save(HybridLM(tiny_config("M-"), seed=2), path)
    assert (path / "notes.txt").read_text() == "written meanwhile"
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_an_empty_extra_file_name_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"extra file '': must be a file name"):
        hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck", extra_files={"": "junk"})
    assert not (tmp_path / "ck").exists()


def _sharded(tmp_path):
    path = hybridlm.save(HybridLM(tiny_config("M-*-"), seed=1), tmp_path / "ck", max_shard_size=20_000)
    return path, json.loads((path / INDEX_NAME).read_text())


def test_an_index_naming_the_wrong_shard_for_a_tensor_is_refused_by_name(tmp_path):
    path, index = _sharded(tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"{shards[1]}: tensor {name} listed in the index is not in")):
        hybridlm.load(path)


def test_an_index_entry_with_a_backslash_is_refused_as_outside_the_folder(tmp_path):
    """``..\\x.safetensors`` is a path on Windows: refused as such everywhere, not looked up as a file name."""
    path, index = _sharded(tmp_path)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "..\\model-00001-of-00002.safetensors"
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"not a \.safetensors file inside the checkpoint folder"):
        hybridlm.load(path)


def test_check_fit_lists_at_most_twenty_names_per_problem():
    """Twenty names are listed as they are; from the twenty-first on, the first twenty and the count."""
    expected = {f"t{i:02d}": (1,) for i in range(21)}
    with pytest.raises(CheckpointError) as err:
        check_fit({}, dict(list(expected.items())[:20]), "test dict")
    assert str(err.value).endswith("missing tensors (20): " + ", ".join(f"t{i:02d}" for i in range(20)))
    with pytest.raises(CheckpointError) as err:
        check_fit({}, expected, "test dict")
    listed = ", ".join(f"t{i:02d}" for i in range(20))
    assert str(err.value).endswith(f"missing tensors (21): {listed} ... (21 in all)") and "t20" not in str(err.value)


def test_non_contiguous_tensors_are_saved(tmp_path):
    """A transposed view (as a fused layer's slice may be) is written as its values."""
    from hybridlm.checkpoint.weights import canonical_state_dict, read_tensors, save_state_dict

    model = HybridLM(tiny_config("M-"), seed=1)
    tensors = canonical_state_dict(model)
    name = "layers.1.mixer.up_proj.weight"
    tensors[name] = tensors[name].t().contiguous().t()
    assert not tensors[name].is_contiguous()
    path = save_state_dict(tensors, model.config, tmp_path / "ck")
    assert torch.equal(read_tensors(path, [name])[name], model.state_dict()["blocks.1.layers.0.mixer.up_proj.weight"])


def test_a_destination_whose_config_json_is_no_object_is_not_replaced(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="exists and is not a hybridlm checkpoint; refusing to replace it"):
        hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck")
    assert (tmp_path / "ck" / "config.json").read_text() == "[1, 2]"


def test_an_index_entry_that_is_no_safetensors_file_is_refused(tmp_path):
    path, index = _sharded(tmp_path)
    index["weight_map"][next(iter(index["weight_map"]))] = "config.json"
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard 'config\.json' is not a \.safetensors file inside"):
        hybridlm.load(path)


def test_a_leftover_that_is_a_link_is_removed_and_its_target_kept(tmp_path):
    """A pruned checkpoint that was a link to a folder became `.step-N.del-ID -> target`: rmtree refuses links (its
    error ignored), so every resume named it as removed and none removed it."""
    from hybridlm.checkpoint.io import remove_leftovers

    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".step-000001.del-0123abcd").symlink_to(tmp_path / "target")
    assert remove_leftovers(tmp_path / "run") == [".step-000001.del-0123abcd"]
    assert list((tmp_path / "run").iterdir()) == [] and (tmp_path / "target" / "keep.txt").read_text() == "keep"


def test_replacing_a_checkpoint_keeps_safetensors_files_it_did_not_write(tmp_path):
    """Every *.safetensors counted as the old weights: an adapter's file beside them was deleted without a word."""
    path = hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck", max_shard_size=1000)
    (path / "adapter.safetensors").write_bytes(b"mine")
    with pytest.raises(CheckpointError, match=r"replacing it would delete adapter\.safetensors"):
        hybridlm.save(HybridLM(tiny_config("M-")), path)
    assert (path / "adapter.safetensors").read_bytes() == b"mine"
    (path / "adapter.safetensors").unlink()
    hybridlm.save(HybridLM(tiny_config("M-")), path)  # its own shards are replaced by one file
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_fit_problems_lists_at_most_max_listed_mis_shaped_tensors():
    """Missing and unexpected names stopped at MAX_LISTED; the shape mismatches (31 in a NemotronH import of
    another width) were all listed, on one line once the CLI joins them."""
    from hybridlm.checkpoint.io import MAX_LISTED, fit_problems

    n = MAX_LISTED + 5
    (line,) = fit_problems({f"t{i}": (1,) for i in range(n)}, {f"t{i}": (2,) for i in range(n)})
    assert line.count("expected (2,)") == MAX_LISTED and line.endswith(f"... ({n} in all)")


def test_replace_file_refuses_a_folder_in_a_files_place_before_writing(tmp_path):
    """A folder where the Megatron export's sidecar goes failed at the rename, as "Is a directory" naming the
    temporary file, after the weights were written."""
    from hybridlm.checkpoint.io import replace_file

    (tmp_path / "m.pt.hybridlm.json").mkdir()
    calls = []
    with pytest.raises(CheckpointError, match=r"m\.pt\.hybridlm\.json: a folder, where a file is written"):
        replace_file(tmp_path / "m.pt", calls.append, (tmp_path / "m.pt.hybridlm.json", calls.append))
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt.hybridlm.json"]


def test_a_refused_flush_names_its_file(tmp_path, monkeypatch):
    """os.fsync's error names no file: a checkpoint save whose flush before the rename failed (EIO, or ENOSPC on
    some file systems) ended with only "error: Input/output error"."""
    import errno

    from hybridlm.checkpoint.io import commit_directory
    from hybridlm.cli import _error

    tmp = tmp_path / ".step-000002.tmp"
    tmp.mkdir()
    (tmp / "trainer_state.json").write_text("{}")

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError) as e:
        commit_directory(tmp, tmp_path / "step-000002")
    assert _error(e.value) == f"Input/output error ({tmp / 'trainer_state.json'})"
    assert not (tmp_path / "step-000002").exists()


def test_a_leftover_that_cannot_be_removed_is_not_named_as_removed(tmp_path, monkeypatch):
    """rmtree's errors are ignored, so a leftover it could not delete (a read-only parent, another user's file) was
    logged as removed at every resume."""
    from hybridlm.checkpoint import io

    (tmp_path / ".step-000002.tmp").mkdir()
    (tmp_path / ".step-000003.del-0123abcd").mkdir()
    real = io.shutil.rmtree
    monkeypatch.setattr(io.shutil, "rmtree", lambda p, **kw: None if p.name == ".step-000002.tmp" else real(p, **kw))
    assert io.remove_leftovers(tmp_path) == [".step-000003.del-0123abcd"]
    assert (tmp_path / ".step-000002.tmp").is_dir()


def test_a_bad_shard_size_is_refused_before_any_weight_is_gathered_or_read(tmp_path, monkeypatch):
    """save() gathered (a collective under FSDP) and copied every weight to the host, and the conversions read
    every source file, before a bad max_shard_size was refused."""
    from hybridlm.checkpoint import hf_nemotron, megatron, weights

    path = hybridlm.save(HybridLM(tiny_config("M-*-", vocab_size=257)), tmp_path / "ck")
    (path / "model.safetensors").write_bytes(b"damaged")  # read by any conversion that gets that far
    monkeypatch.setattr(weights, "canonical_state_dict", lambda model: pytest.fail("gathered before the check"))
    cases = [
        lambda: hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "out", max_shard_size="5GB"),
        lambda: hf_nemotron.convert_to_nemotron_h(path, tmp_path / "hf", max_shard_size=0),
        lambda: hf_nemotron.convert_from_nemotron_h(path, tmp_path / "back", max_shard_size=-1),
        lambda: megatron.convert_from_megatron(path / "model.safetensors", tmp_path / "m", max_shard_size=None),
    ]
    for case in cases:
        with pytest.raises(CheckpointError, match="max_shard_size must be a positive number of bytes"):
            case()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
