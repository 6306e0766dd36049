"""checkpoint.io: what every format writes is readable by others, and refusals list every problem."""

import json
import os
import stat

import pytest
import torch

import hybridlm
from hybridlm import CheckpointError, HybridLM
from hybridlm.checkpoint.hf_nemotron import convert_to_nemotron_h
from hybridlm.checkpoint.io import INDEX_NAME, check_fit, dominant_dtype, write_safetensors
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
