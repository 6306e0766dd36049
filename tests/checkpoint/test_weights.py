"""hybridlm.save / hybridlm.load: canonical layout, any fusion, any pipeline split, refusals, atomic writes."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridlm
from hybridlm import CheckpointError, HybridLM
from hybridlm.checkpoint import weights
from hybridlm.checkpoint.weights import load_canonical_into, read_tensors
from hybridlm.parallel.pipeline import build_stage
from tests.helpers import MLA_TINY, tiny_config

LAYOUTS = ["M-[*-][GE]M-/[*-]", "M-*-GEM-/*-", "M-|[*-]GE|M-/*-", "[M-]*-[GE][M-]/*-"]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))


def test_layout_on_disk(tmp_path):
    model = HybridLM(tiny_config(LAYOUTS[0], moe_router_expert_bias=True), seed=2)
    hybridlm.save(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["format"] == "hybridlm" and meta["format_version"] == 1
    assert meta["pattern"] == LAYOUTS[0]
    assert meta["canonical_layers"] == list("M-*-GEM-") and meta["mtp_layers"] == list("*-")
    assert meta["config"]["hidden_size"] == 32
    names = set(load_file(tmp_path / "ck" / "model.safetensors"))
    # One entry per canonical layer, numbered as if nothing were fused.
    assert "layers.2.mixer.q_proj.weight" in names and "layers.3.mixer.up_proj.weight" in names
    assert "layers.5.mixer.gate.e_score_correction_bias" in names
    assert "mtp.0.layers.1.mixer.down_proj.weight" in names and "mtp.0.eh_proj.weight" in names
    assert {"embeddings.weight", "norm_f.weight", "lm_head.weight"} <= names
    assert not any(n.startswith("blocks.") or "tokens_per_expert" in n for n in names)
    stored = sum(t.numel() for t in load_file(tmp_path / "ck" / "model.safetensors").values())
    assert stored == float(model.num_params()) + 4  # + the expert-bias buffer (4 experts)


@pytest.mark.parametrize("saved", LAYOUTS)
def test_round_trip_into_every_layout(saved, tmp_path, ids):
    model = HybridLM(tiny_config(saved, position_embedding="rope"), seed=3)
    expected = model(ids).logits
    hybridlm.save(model, tmp_path / "a")
    for layout in LAYOUTS:
        loaded = hybridlm.load(tmp_path / "a", pattern=layout)
        assert loaded.config.pattern == layout
        assert torch.equal(loaded(ids).logits, expected), f"saved {saved}, loaded as {layout}"
        # ... and back again: save under the new layout, load under the original.
        hybridlm.save(loaded, tmp_path / "b")
        again = hybridlm.load(tmp_path / "b", pattern=saved)
        assert torch.equal(again(ids).logits, expected)


def test_load_into_pipeline_stages(tmp_path, ids):
    config = tiny_config("M-[*-]|GE|M-/[*-]")
    model = HybridLM(config, seed=4)
    hybridlm.save(model, tmp_path / "ck")
    tensors = read_tensors(tmp_path / "ck")
    for pp_size, layout in [(1, "M-[*-]|GE|M-/[*-]"), (3, "M-[*-]|GE|M-/[*-]"), (2, "M-*-G|E|M-|/*-")]:
        cfg = config.replace(pattern=layout)
        n_seg = len(cfg.parsed.segments)
        stages = [(r, v) for v in range(n_seg // pp_size if n_seg > pp_size else 1) for r in range(pp_size)]
        if pp_size == 1:
            stages = [(0, v) for v in range(n_seg)]
        h = None
        for rank, vp in stages:
            stage = build_stage(cfg, rank, pp_size, vp if (n_seg > pp_size or pp_size == 1) else None, seed=99)
            load_canonical_into(stage, tensors)
            out = stage(ids, hidden_states=h)
            h = out.hidden_states
        assert torch.equal(out.logits, model(ids).logits), layout


def test_mla_and_dsa_round_trip_through_layouts_and_stages(tmp_path, ids):
    """Canonical names under layers.{i}.mixer.*; any fusion of + and D, and a pipeline split, load the same weights."""
    config = tiny_config("[+-]D|[DE]+/[D-]", **MLA_TINY)
    model = HybridLM(config, seed=6)
    expected = model(ids).logits
    hybridlm.save(model, tmp_path / "ck")
    names = set(read_tensors(tmp_path / "ck"))
    assert {"layers.0.mixer.kv_a_proj_with_mqa.weight", "layers.2.mixer.indexer.wq_b.weight"} <= names
    assert "mtp.0.layers.0.mixer.indexer.k_norm.bias" in names and "layers.5.mixer.q_b_proj.weight" in names
    loaded = hybridlm.load(tmp_path / "ck", pattern="+-DDE+/D-")
    assert torch.equal(loaded(ids).logits, expected)
    h = None
    for rank in range(2):
        stage = build_stage(config, rank, 2, seed=99)
        load_canonical_into(stage, read_tensors(tmp_path / "ck"))
        out = stage(ids, hidden_states=h)
        h = out.hidden_states
    assert torch.equal(out.logits, expected)


def test_sharded_save(tmp_path, ids):
    model = HybridLM(tiny_config("M-*-E"), seed=5)
    hybridlm.save(model, tmp_path / "ck", max_shard_size=20_000)
    files = sorted(os.listdir(tmp_path / "ck"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert torch.equal(hybridlm.load(tmp_path / "ck")(ids).logits, model(ids).logits)
    os.remove(tmp_path / "ck" / shards[1])
    with pytest.raises(CheckpointError, match="missing"):
        hybridlm.load(tmp_path / "ck")


def test_crash_during_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, ids):
    old = HybridLM(tiny_config("M-*-"), seed=6)
    hybridlm.save(old, tmp_path / "ck")
    new = HybridLM(tiny_config("M-*-"), seed=7)
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        hybridlm.save(new, tmp_path / "ck", max_shard_size=10_000)
    monkeypatch.undo()
    assert torch.equal(hybridlm.load(tmp_path / "ck")(ids).logits, old(ids).logits)
    assert os.listdir(tmp_path) == ["ck"], "temporary directories are cleaned up"


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a hybridlm checkpoint"):
        hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("M-*-GEMM/*-", "layer 7: checkpoint has '-', pattern has 'M'"),
        ("M-*-GEM/*-", "checkpoint has 8 layers, pattern has 7"),
        ("M-*-GEM-", "checkpoint has 1 MTP depth(s), pattern has 0"),
        ("M-*-GEM-/*E", "MTP layer 1: checkpoint has '-', pattern has 'E'"),
        ("M-*-GEM-/*-/*-", "checkpoint has 1 MTP depth(s), pattern has 2"),
        ("M-*[-G]EM-/*-", "a fused group must be a sequence mixer followed by a channel mixer"),
    ],
)
def test_wrong_pattern_is_refused_with_the_differences(pattern, message, tmp_path):
    hybridlm.save(HybridLM(tiny_config(LAYOUTS[0])), tmp_path / "ck")
    with pytest.raises(CheckpointError) as info:
        hybridlm.load(tmp_path / "ck", pattern=pattern)
    assert message in str(info.value)


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    hybridlm.save(HybridLM(tiny_config("M-*-")), tmp_path / "ck")
    _rewrite(tmp_path / "ck", lambda t: t.pop("layers.2.mixer.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): layers\.2\.mixer\.k_proj\.weight"):
        hybridlm.load(tmp_path / "ck")
    hybridlm.save(HybridLM(tiny_config("M-*-")), tmp_path / "ck")
    _rewrite(tmp_path / "ck", lambda t: t.update({"layers.9.mixer.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): layers\.9\.mixer\.extra"):
        hybridlm.load(tmp_path / "ck")
    hybridlm.save(HybridLM(tiny_config("M-*-")), tmp_path / "ck")
    _rewrite(tmp_path / "ck", lambda t: t.update({"layers.1.mixer.up_proj.weight": torch.zeros(40, 32)}))
    with pytest.raises(
        CheckpointError, match=r"layers\.1\.mixer\.up_proj\.weight: .* has \(40, 32\), model has \(48, 32\)"
    ):
        hybridlm.load(tmp_path / "ck")


def test_an_edited_size_is_refused_before_the_model_is_allocated(tmp_path):
    """vocab_size = 10**13 in config.json: load asked the allocator for 1.28 PB before comparing shapes."""
    path = hybridlm.save(HybridLM(tiny_config("M-*-")), tmp_path / "ck")
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["vocab_size"] = 10**13
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"embeddings\.weight: .* has \(97, 32\), model has \(10000000000000, 32\)"
    ):
        hybridlm.load(path, verify=False)


def test_damaged_files_are_refused(tmp_path):
    path = tmp_path / "ck"
    hybridlm.save(HybridLM(tiny_config("M-")), path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        hybridlm.load(path)
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        hybridlm.load(path)
    (path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable"):
        hybridlm.load(path)
    (path / "config.json").write_text(json.dumps({"format": "hybridlm", "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer"):
        hybridlm.load(path)
    os.remove(path / "config.json")
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        hybridlm.load(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        hybridlm.load(tmp_path / "nowhere")


def test_dtypes(tmp_path, ids):
    model = HybridLM(tiny_config("M-[*E]"), dtype=torch.bfloat16)
    hybridlm.save(model, tmp_path / "ck")
    loaded = hybridlm.load(tmp_path / "ck")
    assert loaded.blocks["0"].layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    assert loaded.blocks["0"].layers[0].mixer.A_log.dtype == torch.float32
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    as32 = hybridlm.load(tmp_path / "ck", dtype=torch.float32)
    assert as32.blocks["0"].layers[0].mixer.in_proj.weight.dtype == torch.float32


def test_tied_embeddings(tmp_path, ids):
    model = HybridLM(tiny_config("M-*", tie_embeddings=True), seed=8)
    hybridlm.save(model, tmp_path / "ck")
    assert "lm_head.weight" not in load_file(tmp_path / "ck" / "model.safetensors")
    assert torch.equal(hybridlm.load(tmp_path / "ck")(ids).logits, model(ids).logits)


def test_a_stage_cannot_be_saved_as_a_whole_model(tmp_path):
    stage = build_stage(tiny_config("M-|*-"), 0, 2)
    with pytest.raises(CheckpointError, match="pipeline stage"):
        hybridlm.save(stage, tmp_path / "ck")


def test_extra_files(tmp_path):
    hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck", extra_files={"tokenizer.json": "{}"})
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == "{}"
    assert weights.read_config(tmp_path / "ck").pattern == "M-"


@pytest.mark.parametrize(
    "name", ["config.json", "model.safetensors", "model.safetensors.index.json", "../out.txt", ".."]
)
def test_extra_files_may_not_replace_the_weights_or_leave_the_folder(tmp_path, name):
    """They replaced config.json or the weights (the checkpoint no longer loaded) or wrote outside the folder."""
    with pytest.raises(CheckpointError, match=re.escape(f"extra file {name!r}: must be a file name other than")):
        hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck", extra_files={name: "junk"})
    assert not (tmp_path / "ck").exists() and not (tmp_path / "out.txt").exists()
