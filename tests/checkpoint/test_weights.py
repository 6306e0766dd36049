"""hybridlm.save / hybridlm.load: canonical layout, any fusion, any pipeline split, refusals, atomic writes."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridlm
from hybridlm import CheckpointError, HybridLM
from hybridlm.checkpoint import to_canonical, weights
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


def test_zero_centered_norms_round_trip_storing_w(tmp_path, ids):
    """The stored norm weight is ``w`` (Megatron's and Qwen3-Next's layout), the scale ``1 + w`` being the config's
    business: config.json carries norm_zero_centered, and the model loads back computing bitwise the same."""
    model = HybridLM(tiny_config("M[*-]G/*-", qk_norm=True, norm_zero_centered=True), seed=3)
    with torch.no_grad():
        model.norm_f.weight.fill_(0.25)
    expected = model(ids).logits
    hybridlm.save(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["config"]["norm_zero_centered"] is True
    stored = load_file(tmp_path / "ck" / "model.safetensors")
    assert (stored["norm_f.weight"] == 0.25).all() and (stored["layers.2.norm.weight"] == 0).all()
    assert (stored["layers.1.mixer.q_norm.weight"] == 0).all() and (stored["mtp.0.enorm.weight"] == 0).all()
    loaded = hybridlm.load(tmp_path / "ck")
    assert loaded.config.norm_zero_centered and loaded.norm_f.zero_centered
    assert torch.equal(loaded(ids).logits, expected)


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


def test_the_shared_expert_gate_is_saved_under_its_canonical_name_and_loads_into_any_layout(tmp_path, ids):
    """moe_shared_expert_gate's weight is layers.{i}.mixer.shared_expert_gate.weight (1, hidden) (Qwen3-Next's
    name; Megatron-LM's shared_experts.gate_weight); a load into another fusion gives the same logits, and a model
    whose gate is left out, or whose config lost the field, is refused by name."""
    config = tiny_config("M-[*-][GE]M-/[*E]", moe_shared_expert_ffn_hidden_size=16, moe_shared_expert_gate=True)
    model = HybridLM(config, seed=5)
    expected = model(ids).logits
    hybridlm.save(model, tmp_path / "ck")
    tensors = read_tensors(tmp_path / "ck")
    assert tuple(tensors["layers.5.mixer.shared_expert_gate.weight"].shape) == (1, 32)
    assert "mtp.0.layers.1.mixer.shared_expert_gate.weight" in tensors
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["config"]["moe_shared_expert_gate"] is True
    loaded = hybridlm.load(tmp_path / "ck", pattern="M-*-GEM-/*E")
    assert loaded.config.moe_shared_expert_gate and torch.equal(loaded(ids).logits, expected)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(2\): .*shared_expert_gate\.weight"):
        load_canonical_into(HybridLM(config.replace(moe_shared_expert_gate=False)), tensors)
    with pytest.raises(CheckpointError, match=r"missing tensors \(2\): .*shared_expert_gate\.weight"):
        load_canonical_into(model, {k: v for k, v in tensors.items() if "shared_expert_gate" not in k})


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


def test_load_allocates_the_weights_once_in_their_dtype(tmp_path, monkeypatch):
    """load allocated a bf16 checkpoint's model in float32, then cast it: twice the weights' size on the device while
    it loaded (an 8B bf16 model: 32 GB on the GPU for 16 GB of weights). Now it casts on meta and allocates once."""
    hybridlm.save(HybridLM(tiny_config("M-[*E]"), dtype=torch.bfloat16), tmp_path / "ck")
    from hybridlm import model as model_module

    allocated, allocate = [], model_module.allocate

    def spy(module, *args, **kwargs):
        allocated.append(sum(t.nbytes for t in [*module.parameters(), *module.buffers()]))
        return allocate(module, *args, **kwargs)

    monkeypatch.setattr(model_module, "allocate", spy)
    loaded = hybridlm.load(tmp_path / "ck")
    assert loaded.embeddings.weight.dtype == torch.bfloat16
    assert allocated == [sum(t.nbytes for t in [*loaded.parameters(), *loaded.buffers()])]


def test_float8_weights_are_refused_by_name_and_load_in_a_dtype_named(tmp_path, ids):
    """A checkpoint saved from ``model.to(torch.float8_e4m3fn)`` built a float8 model whose first forward failed
    inside torch ("add_stub" not implemented; the CLI called it a bug in hybridlm); now the load names the file and
    the way out, a dtype."""
    model = HybridLM(tiny_config("M-[*E]"), seed=1)
    hybridlm.save(model.to(torch.float8_e4m3fn), tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"ck: most weights are float8_e4m3fn, a storage format .*dtype=torch"):
        hybridlm.load(tmp_path / "ck")
    with pytest.raises(ValueError, match="computes in"):
        hybridlm.load(tmp_path / "ck", dtype="float8_e4m3fn")
    as16 = hybridlm.load(tmp_path / "ck", dtype=torch.bfloat16)
    assert as16.embeddings.weight.dtype == torch.bfloat16 and torch.isfinite(as16(ids).logits).all()


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


def test_config_json_counts_the_stored_elements_by_dtype(tmp_path):
    """config.json's num_parameters, dtypes and mtp_depths describe what the files hold, counted from them."""
    model = HybridLM(tiny_config("M-[*E]/*-/*-"), seed=1).cast(torch.bfloat16)  # A_log, D, ... stay float32
    path = hybridlm.save(model, tmp_path / "ck")
    meta = json.loads((path / "config.json").read_text())
    stored = load_file(path / "model.safetensors")
    by_dtype = {}
    for t in stored.values():
        name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[t.dtype]
        by_dtype[name] = by_dtype.get(name, 0) + t.numel()
    assert set(by_dtype) == {"bfloat16", "float32"}
    assert meta["dtypes"] == by_dtype
    assert meta["num_parameters"] == sum(t.numel() for t in stored.values())
    assert meta["mtp_depths"] == 2 and meta["mtp_layers"] == list("*-")
    assert meta["canonical"] == "M-*E/*-/*-"  # the pattern without brackets


def test_canonical_pattern_in_config_json_has_no_brackets_or_pipes(tmp_path):
    path = hybridlm.save(HybridLM(tiny_config(LAYOUTS[2])), tmp_path / "ck")
    meta = json.loads((path / "config.json").read_text())
    assert meta["pattern"] == LAYOUTS[2]
    assert meta["canonical"] == LAYOUTS[2].replace("[", "").replace("]", "").replace("|", "")


def test_a_config_json_without_the_model_config_says_so(tmp_path):
    """A config.json whose "config" key is missing was refused as "invalid model config: 'config'" (a bare KeyError)."""
    path = hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck")
    meta = json.loads((path / "config.json").read_text())
    del meta["config"]
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid model config: config: expected a JSON object"):
        hybridlm.load(path)


def test_a_file_is_refused_as_a_checkpoint_by_saying_it_must_be_a_directory(tmp_path):
    """A safetensors file given where the checkpoint directory is expected is named as such, not "unreadable"."""
    path = hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: a checkpoint is a directory"):
        hybridlm.load(path / "model.safetensors")


@pytest.mark.parametrize(
    ("model_type", "name", "flag"),
    [("nemotron_h", "NemotronH", "nemotron-h"), ("qwen3_next", "Qwen3-Next", "qwen3-next")],
)
def test_a_hugging_face_directory_is_refused_with_the_convert_command(tmp_path, model_type, name, flag):
    """Loading a Hugging Face folder of a format convert reads says how to convert it (a Qwen3-Next folder was
    only "not a hybridlm checkpoint"); another foreign folder, or a model_type of no string, gets no such hint."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": model_type}))
    said = rf"not a hybridlm checkpoint \(this is a Hugging Face {name} directory: use `hybridlm convert SRC DST --from {flag}`\)"
    with pytest.raises(CheckpointError, match=said):
        hybridlm.load(tmp_path / "hf")
    for other, model_type in (("other", "llama"), ("odd", ["qwen3_next"])):
        (tmp_path / other).mkdir()
        (tmp_path / other / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(CheckpointError) as info:
            hybridlm.load(tmp_path / other)
        assert str(info.value).endswith("not a hybridlm checkpoint") and "hybridlm convert" not in str(info.value)


def _flip_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # the last tensor's data: the file still parses
    file.write_bytes(bytes(data))


def test_read_tensors_verifies_by_default_and_only_the_files_it_reads(tmp_path):
    """read_tensors checks each file it reads against config.json, and only those: a damaged shard whose
    tensors were not asked for does not stop reading the others."""
    path = hybridlm.save(HybridLM(tiny_config("M-*-E"), seed=5), tmp_path / "ck", max_shard_size=20_000)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    _flip_last_byte(path / shards[-1])
    with pytest.raises(CheckpointError, match=re.escape(f"{shards[-1]}: checksum mismatch")):
        read_tensors(path)
    intact = [k for k, v in weight_map.items() if v == shards[0]]
    expected = load_file(path / shards[0])
    got = read_tensors(path, intact)
    assert set(got) == set(intact) and all(torch.equal(got[k], expected[k]) for k in intact)
    assert len(read_tensors(path, verify=False)) == len(weight_map)


@pytest.mark.parametrize(
    ("sums", "message"),
    [
        ({}, r"model\.safetensors has no checksum in config\.json"),
        ({"model-00001-of-00002.safetensors": "0" * 64}, r"model\.safetensors has no checksum in config\.json"),
        ("0" * 64, r"config\.json: sha256 is not a JSON object"),
        (["model.safetensors"], r"config\.json: sha256 is not a JSON object"),
    ],
)
def test_a_checksum_table_without_the_file_or_no_table_is_refused(tmp_path, sums, message):
    """An empty or foreign checksum table, or one that is no JSON object, is refused by name (only an absent
    table means an older, unverified checkpoint)."""
    path = hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck")
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(meta | {"sha256": sums}))
    with pytest.raises(CheckpointError, match=message):
        hybridlm.load(path)


def test_an_unparsable_pattern_is_refused_as_the_pattern(tmp_path):
    path = hybridlm.save(HybridLM(tiny_config("M-")), tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"^pattern: "):
        hybridlm.load(path, pattern="M-Q")


def test_load_canonical_into_a_whole_model_refuses_unexpected_tensors():
    """Only a pipeline stage takes the subset it holds; a whole model refuses a tensor it has no place for."""
    model = HybridLM(tiny_config("M-*-"), seed=2)
    tensors = weights.canonical_state_dict(model) | {"layers.9.mixer.extra": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): layers\.9\.mixer\.extra"):
        load_canonical_into(HybridLM(tiny_config("M-*-"), seed=3), tensors)


def test_loading_zeroes_the_expert_token_counts():
    """tokens_per_expert is not saved: a load leaves it zero, whatever the model had counted before."""
    model = HybridLM(tiny_config("M-E", moe_router_expert_bias=True), seed=2)
    tensors = weights.canonical_state_dict(model)
    target = HybridLM(tiny_config("M-E", moe_router_expert_bias=True), seed=3)
    counts = [b for n, b in target.named_buffers() if n.endswith("tokens_per_expert")]
    assert counts
    for b in counts:
        b.fill_(5)
    load_canonical_into(target, tensors)
    assert all(int(b.abs().sum()) == 0 for b in counts)


def test_only_a_hybridlm_can_be_saved(tmp_path):
    """Another module is refused by its type, before anything is written."""
    with pytest.raises(TypeError, match="expected a HybridLM, got Linear"):
        hybridlm.save(torch.nn.Linear(2, 2), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_a_torch_compiled_model_saves_as_the_model_it_compiled(tmp_path, ids):
    """``hybridlm.save(torch.compile(model))`` was refused ("expected a HybridLM, got OptimizedModule")
    though the wrapper runs the model it holds: it saves that model's weights and config."""
    model = HybridLM(tiny_config("M-[*-]/*-"), seed=1)
    hybridlm.save(torch.compile(model), tmp_path / "ck")  # lazy: nothing is compiled
    loaded = hybridlm.load(tmp_path / "ck")
    assert loaded.config == model.config
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_load_as_float64_casts_all_but_the_float32_parameters(tmp_path, ids):
    """dtype=torch.float64 gives float64 weights (A_log stays float32), like dtype=torch.bfloat16 gives bfloat16."""
    model = HybridLM(tiny_config("M-[*E]"), seed=4)
    hybridlm.save(model, tmp_path / "ck")
    loaded = hybridlm.load(tmp_path / "ck", dtype=torch.float64)
    mixer = loaded.blocks["0"].layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.float64 and mixer.A_log.dtype == torch.float32
    assert loaded.embeddings.weight.dtype == torch.float64
    assert torch.equal(loaded.embeddings.weight, model.embeddings.weight.double())


def test_canonical_names_see_through_compile_and_activation_checkpointing_wrappers():
    """torch.compile's ``_orig_mod.`` and activation checkpointing's ``_checkpoint_wrapped_module.`` in a name
    do not change its canonical name."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from hybridlm.checkpoint.canonical import to_canonical

    model = HybridLM(tiny_config("M-[*-]/*-"), seed=1)
    expected = set(weights.canonical_state_dict(model))
    p = model.config.parsed
    compiled = torch.compile(model)  # lazy: nothing is compiled until it runs
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert set(to_canonical(compiled.state_dict(), p)) == expected
    plain = {k for k, _ in model.named_parameters()}
    model.blocks["2"] = checkpoint_wrapper(model.blocks["2"])
    names = dict(model.named_parameters())
    assert "blocks.2._checkpoint_wrapped_module.layers.0.mixer.q_proj.weight" in names
    assert set(to_canonical(names, p)) == set(to_canonical(dict.fromkeys(plain), p))


def test_canonical_names_of_ten_and_more_mtp_depths_and_of_unknown_layers():
    """Depth numbers of two digits are renamed like one-digit ones (both ways); a layer the pattern does not
    have is a KeyError naming the pattern."""
    from hybridlm.checkpoint.canonical import canonical_name, model_name

    pattern = "M-" + "/[*-]" * 11
    for d in (3, 10):
        ours, canonical = f"mtp.{d}.blocks.0.layers.1.mixer.up_proj.weight", f"mtp.{d}.layers.1.mixer.up_proj.weight"
        assert canonical_name(ours, pattern) == canonical and model_name(canonical, pattern) == ours
    with pytest.raises(KeyError, match="pattern 'M-' has no such layer"):
        canonical_name("blocks.7.layers.0.mixer.in_proj.weight", "M-")


def test_a_tensor_that_is_not_floating_point_is_refused_by_name(tmp_path):
    """An integer norm weight of the right shape was cast into the model without a word (its values truncated)."""
    hybridlm.save(HybridLM(tiny_config("M-*")), tmp_path / "ck")
    _rewrite(tmp_path / "ck", lambda t: t.update({"layers.1.norm.weight": torch.ones(32, dtype=torch.int64)}))
    with pytest.raises(CheckpointError, match=r"not floating point: layers\.1\.norm\.weight \(torch\.int64\)"):
        hybridlm.load(tmp_path / "ck", verify=False)


def test_tensors_on_the_meta_device_are_refused_by_name_before_anything_is_written(tmp_path):
    """A model built on meta (or with a parameter left there) failed in the copy to the host with torch's
    "Cannot copy out of meta tensor; no data!", naming no tensor."""
    says = r"^cannot save the weights: tensors on the meta device, without values \({}\); allocate .*init_weights\(\)"
    with pytest.raises(CheckpointError, match=says.format(r"all \d+ of them: embeddings\.weight, \.\.\.")):
        hybridlm.save(HybridLM(tiny_config("M-*"), device="meta"), tmp_path / "ck")
    model = HybridLM(tiny_config("M-*"))
    model.norm_f.weight = torch.nn.Parameter(torch.empty(32, device="meta"))
    with pytest.raises(CheckpointError, match=says.format(r"norm_f\.weight")):
        hybridlm.save(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_weights_that_no_longer_fit_the_config_are_refused_at_save(tmp_path):
    """A config replaced after the model was built, a resized embedding or a stage missing from gathered tensors
    was saved without a word, as a checkpoint that load then refused: now save refuses, listing what differs."""
    model = HybridLM(tiny_config("M-*"), seed=1)
    model.embeddings = torch.nn.Embedding(120, 32)  # resized, config.vocab_size still 97
    with pytest.raises(CheckpointError, match=r"embeddings\.weight: the state dict has \(120, 32\), expected \(97, 32"):
        hybridlm.save(model, tmp_path / "ck")
    model = HybridLM(tiny_config("M-*"), seed=1)
    model.config = model.config.replace(tie_embeddings=True)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): lm_head\.weight\n.*replaced"):
        hybridlm.save(model, tmp_path / "ck")
    stage = build_stage(tiny_config("M-|*-"), 0, 2)  # the first stage's tensors alone
    with pytest.raises(CheckpointError, match=r"missing tensors \(\d+\): layers\.2\.norm\.weight"):
        weights.save_state_dict(to_canonical(stage.state_dict(), "M-|*-"), stage.config, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_load_canonical_into_refuses_a_meta_model_and_loads_a_compiled_one(tmp_path):
    """Into a model on the meta device torch's copy did nothing (a warning), so a stage built on meta and loaded
    before ``to_empty`` kept uninitialized memory; into ``torch.compile(model)``, or a model with a block replaced by
    ``torch.compile(block)``, the strict load wanted names with "_orig_mod." and listed every tensor as missing."""
    source = HybridLM(tiny_config("M-|*-"), seed=3)
    hybridlm.save(source, tmp_path / "ck")
    tensors = read_tensors(tmp_path / "ck")
    says = r"^cannot load checkpoint into the model: tensors on the meta device, without values \(all \d+ of them: "
    with pytest.raises(CheckpointError, match=says + r"layers\.2\.norm\.weight, \.\.\.\); allocate .*to_empty\("):
        load_canonical_into(build_stage(source.config, 1, 2, device="meta"), tensors)
    target = HybridLM(source.config, seed=4)
    target.blocks["2"] = torch.compile(target.blocks["2"])  # lazy: nothing is compiled
    load_canonical_into(torch.compile(target), tensors)
    loaded = weights.canonical_state_dict(target)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], t) for k, t in tensors.items())


def test_a_stage_refuses_tensors_no_model_of_its_config_holds(tmp_path, ids):
    """A stage skipped every tensor it did not hold: built from a tied config, the last stage skipped an untied
    checkpoint's lm_head.weight and computed the logits with the embedding, silently (a whole model refused it);
    only the other stages' tensors are skipped now."""
    hybridlm.save(HybridLM(tiny_config("M-*-/*-"), seed=3), tmp_path / "ck")
    tensors = read_tensors(tmp_path / "ck")
    for config, unexpected in [
        (tiny_config("M-|*-/*-", tie_embeddings=True), r"unexpected tensors \(1\): lm_head\.weight"),
        (tiny_config("M-|*-"), r"unexpected tensors \(12\): mtp\.0\.eh_proj\.weight"),
    ]:
        with pytest.raises(CheckpointError, match=unexpected):
            load_canonical_into(build_stage(config, 1, 2), tensors)
    load_canonical_into(build_stage(tiny_config("M-|*-/*-"), 1, 2), tensors)  # stage 0's tensors skipped


def assert_refused_everywhere(model, replaced: str, says: str, tmp_path) -> None:
    """``model``, whose config was replaced by one of pattern ``replaced``: save, load and the training state
    refuse it with ``says``."""
    from hybridlm.checkpoint.training_state import save_training_state

    with pytest.raises(CheckpointError, match=says):
        hybridlm.save(model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match=says):
        load_canonical_into(model, weights.canonical_state_dict(HybridLM(tiny_config(replaced))))
    with pytest.raises(CheckpointError, match=says):
        save_training_state(tmp_path / "state", model)


def test_a_config_replaced_with_other_brackets_is_refused_saying_what_differs(tmp_path):
    """A config whose pattern only fuses otherwise, put on a built model: save called the model "a pipeline stage"
    (the block count differs) or failed with a bare KeyError from canonical_name (an MTP depth); loading into it
    and saving its training state raised the KeyError. Now each names the model's blocks and the config's."""
    for built, replaced, first in [
        ("M-*-", "[M-]*-", r"blocks\.0: model 'M', config '\[M-\]'"),
        ("[M-][*-]", "M-*-", r"blocks\.0: model '\[M-\]', config 'M'"),
        ("M-*-/M-", "M-*-/[M-]", r"mtp\.0\.blocks\.0: model 'M', config '\[M-\]'"),
    ]:
        model = HybridLM(tiny_config(built))
        model.config = tiny_config(replaced)
        says = rf"model's blocks are '{re.escape(built)}', the config's pattern is '{re.escape(replaced)}'.*{first}"
        assert_refused_everywhere(model, replaced, says, tmp_path)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "state").exists()
    for stage in (build_stage(tiny_config("M-|*-/M-"), 0, 2), build_stage(tiny_config("M-|*-/M-"), 1, 2)):
        weights.check_built(stage)  # a pipeline stage holds some blocks of its config: no difference


@pytest.mark.parametrize(
    ("replaced", "first"),
    [("M-*-/M-/M-", r"mtp: model 1 depths, config 2"), ("M-*-/M--", r"mtp\.0\.blocks\.2: model 'none', config '-'")],
)
def test_a_config_replaced_with_more_mtp_layers_is_refused_saying_what_differs(tmp_path, replaced, first):
    """A config naming a depth, or a depth's block, more than the model holds: every block the model has matches,
    so only what it lacks tells that the config is not the model's (save, load and the training state say so)."""
    model = HybridLM(tiny_config("M-*-/M-"))
    model.config = tiny_config(replaced)
    says = (
        rf"model's blocks are 'M-\*-/M-', the config's pattern is '{re.escape(replaced)}' \(first difference: {first}\)"
    )
    assert_refused_everywhere(model, replaced, says, tmp_path)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "state").exists()


def test_gated_attention_round_trips_under_its_canonical_name(tmp_path, ids):
    """``attention_output_gate`` adds ``layers.{i}.mixer.gate_proj.weight`` (heads * head_dim, hidden) to each
    attention layer, main stack and MTP alike; save and load (fused or not) give the same logits bitwise."""
    model = HybridLM(tiny_config(LAYOUTS[0], position_embedding="rope", attention_output_gate=True), seed=3)
    expected = model(ids).logits
    hybridlm.save(model, tmp_path / "g")
    shapes = {k: tuple(t.shape) for k, t in load_file(tmp_path / "g" / "model.safetensors").items()}
    assert shapes["layers.2.mixer.gate_proj.weight"] == shapes["mtp.0.layers.0.mixer.gate_proj.weight"] == (32, 32)
    assert sorted(k for k in shapes if "gate_proj" in k) == [
        "layers.2.mixer.gate_proj.weight",
        "mtp.0.layers.0.mixer.gate_proj.weight",
    ]
    for layout in (LAYOUTS[0], LAYOUTS[1]):
        assert torch.equal(hybridlm.load(tmp_path / "g", pattern=layout)(ids).logits, expected), layout
