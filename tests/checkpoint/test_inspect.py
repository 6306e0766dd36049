"""``hybridlm inspect``: what it reports for each kind of checkpoint, counted from the files' headers."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridlm
from hybridlm import CheckpointError, HybridLM, ModelConfig
from hybridlm.checkpoint.hf_nemotron import convert_to_nemotron_h, import_nemotron_h
from hybridlm.checkpoint.inspect import _human, describe, render
from hybridlm.checkpoint.weights import canonical_state_dict
from hybridlm.cli import main
from tests.helpers import tiny_config

PATTERN = "M-[*-]"


def tiny() -> HybridLM:
    return HybridLM(ModelConfig.preset("tiny").replace(pattern=PATTERN), seed=0)


def test_a_hybridlm_checkpoint_one_file_or_sharded(tmp_path, capsys):
    model = tiny()
    state = canonical_state_dict(model)
    numel, nbytes = sum(t.numel() for t in state.values()), sum(t.nbytes for t in state.values())
    for name, shard in (("one", 5_000_000_000), ("sharded", 20_000)):
        info = describe(hybridlm.save(model, tmp_path / name, max_shard_size=shard))
        assert info["kind"] == "hybridlm checkpoint"
        assert info["pattern"] == PATTERN
        assert (info["tensors"], info["parameters"], info["bytes"]) == (len(state), numel, nbytes)
        assert info["dtypes"] == {"float32": numel}
        assert (len(info["files"]) > 1) == (name == "sharded")
    assert main(["inspect", str(tmp_path / "sharded")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hybridlm checkpoint: {tmp_path / 'sharded'}")
    assert f"parameters   {numel:,} ({_human(numel)})" in out
    assert f"{len(info['files'])} file(s)" in out and f"pattern      {PATTERN}" in out


def test_a_hugging_face_directory(tmp_path):
    src = hybridlm.save(tiny(), tmp_path / "ours")
    info = describe(convert_to_nemotron_h(src, tmp_path / "hf"))
    assert info["kind"] == "Hugging Face nemotron_h"
    assert info["pattern"] == PATTERN.replace("[", "").replace("]", "")  # NemotronH has no fusion
    assert info["config"]["model_type"] == "nemotron_h"
    assert render(info).startswith(f"Hugging Face nemotron_h: {tmp_path / 'hf'}")


def test_a_hugging_face_directory_with_a_tensor_that_is_not_floating_point_is_refused_as_import_refuses_it(
    tmp_path, capsys
):
    """Only its config was read: an integer tensor passed inspect, exit 0, while the import refused it. MTP layers,
    which the import drops, are not looked at."""
    hf = convert_to_nemotron_h(hybridlm.save(tiny(), tmp_path / "ours"), tmp_path / "hf")
    file, name = hf / "model.safetensors", "backbone.layers.0.mixer.in_proj.weight"
    tensors = load_file(file)
    save_file(tensors | {"mtp.layers.0.norm.weight": torch.zeros(2, dtype=torch.int32)}, file)
    assert describe(hf)["kind"] == "Hugging Face nemotron_h" and import_nemotron_h(hf)
    save_file(tensors | {name: tensors[name].to(torch.int32)}, file)
    assert main(["inspect", str(hf)]) == 2
    message = f"{hf}: not floating point: {name} (torch.int32)"
    assert message in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=re.escape(message)):
        import_nemotron_h(hf)


def test_a_hugging_face_directory_with_layer_type_names(tmp_path):
    """transformers' save_pretrained writes the layer types as names (layers_block_type): shown as symbols."""
    import json

    hf = convert_to_nemotron_h(hybridlm.save(tiny(), tmp_path / "ours"), tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    names = {"M": "mamba", "-": "mlp", "*": "attention"}
    cfg["layers_block_type"] = [names[s] for s in cfg.pop("hybrid_override_pattern")]
    (hf / "config.json").write_text(json.dumps(cfg))
    assert describe(hf)["pattern"] == PATTERN.replace("[", "").replace("]", "")


def test_a_qwen3_next_directory_shows_the_pattern_its_import_writes(tmp_path):
    """Qwen3-Next's config.json has layer types and dense-layer lists, not symbols: shown as our canonical pattern."""
    pytest.importorskip("transformers.models.qwen3_next")
    from hybridlm.checkpoint.hf_qwen3_next import convert_to_qwen3_next
    from tests.checkpoint.test_hf_qwen3_next import saved, with_mtp

    _, hf = saved(tmp_path)
    assert describe(hf)["pattern"] == "GE*-GE*E"
    tensors = with_mtp(hf)  # an MTP head, which the import reads as one MTP depth
    assert describe(hf)["pattern"] == "GE*-GE*E/*E"
    save_file(tensors | {"mtp.norm.weight": tensors["mtp.norm.weight"].to(torch.int64)}, hf / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{hf}: not floating point: mtp.norm.weight")):
        describe(hf)  # as the import refuses it
    config = tiny_config("[GE][*-]", norm_zero_centered=True, position_embedding="rope", qk_norm=True)
    config = config.replace(attention_output_gate=True, mlp_activation="swiglu", moe_router_score="softmax")
    config = config.replace(moe_shared_expert_ffn_hidden_size=8, moe_shared_expert_gate=True)
    info = describe(convert_to_qwen3_next(hybridlm.save(HybridLM(config), tmp_path / "ours"), tmp_path / "out"))
    assert (info["kind"], info["pattern"]) == ("Hugging Face qwen3_next", "GE*-")


def test_a_safetensors_file_of_mixed_dtypes(tmp_path):
    file = tmp_path / "w.safetensors"
    tensors = {
        "a": torch.zeros(3, 5, dtype=torch.bfloat16),
        "b": torch.zeros(7),
        "c": torch.zeros(2, 2, dtype=torch.int64),
    }
    save_file(tensors, file)
    info = describe(file)
    assert info["kind"] == "safetensors file" and info["files"] == ["w.safetensors"]
    assert info["dtypes"] == {"bfloat16": 15, "float32": 7, "int64": 4}
    assert (info["tensors"], info["parameters"], info["bytes"]) == (3, 26, 15 * 2 + 7 * 4 + 4 * 8)
    assert "dtypes       bfloat16 15, float32 7, int64 4" in render(info)


def test_human_sizes():
    assert [_human(n) for n in (0, 999, 1000, 20172, 5_300_000, 2.5e9, 1e15)] == [
        "0",
        "999",
        "1.0K",
        "20.2K",
        "5.3M",
        "2.5G",
        "1.0P",
    ]


def test_a_dcp_training_state_shows_its_step_and_model(tmp_path, capsys):
    from hybridlm.checkpoint.training_state import save_training_state

    model = tiny()
    save_training_state(tmp_path / "state", model, step=7)
    info = describe(tmp_path / "state")
    assert (info["kind"], info["step"], info["pattern"]) == ("DCP training state", 7, PATTERN)
    assert info["tensors"] == len(canonical_state_dict(model))
    assert main(["inspect", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert "step         7" in out and f"pattern      {PATTERN}" in out and "hidden_size=" in out


def test_a_training_run_shows_its_exported_model_as_generate_and_convert_read_it(tmp_path, capsys):
    """inspect refused a run folder that generate and convert take (its model/)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["inspect", str(run)]) == 2  # no model exported yet: says where to look
    assert "a training run: inspect its model/ or one of its checkpoints/" in capsys.readouterr().err
    hybridlm.save(tiny(), run / "model")
    assert main(["inspect", str(run)]) == 0
    assert capsys.readouterr().out.startswith(f"hybridlm checkpoint: {run / 'model'}\npattern      {PATTERN}")


def test_a_damaged_training_state_is_refused_by_name(tmp_path, capsys):
    """Without .metadata it was shown as a directory of one tensor (rng.safetensors's), exit 0; a truncated or
    deleted data file passed unnoticed."""
    from hybridlm.checkpoint.training_state import save_training_state

    state = save_training_state(tmp_path / "state", tiny(), step=7)
    data = state / "__0_0.distcp"
    whole = data.read_bytes()
    data.write_bytes(whole[:100])
    assert main(["inspect", str(state)]) == 2
    assert f"a damaged training state: __0_0.distcp holds 100 of {len(whole):,} bytes" in capsys.readouterr().err
    data.unlink()
    assert main(["inspect", str(state)]) == 2
    assert "__0_0.distcp is missing" in capsys.readouterr().err
    data.write_bytes(whole)
    (state / ".metadata").unlink()
    assert main(["inspect", str(state)]) == 2
    assert "no DCP .metadata" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["config"].update(pattern="M---"), "does not fit the model: missing tensors"),
        (lambda m: m.update(format_version=99), "format_version 99 is newer than this hybridlm reads"),
        (lambda m: m.pop("config"), "invalid model config"),
    ],
)
def test_a_checkpoint_load_refuses_is_refused(tmp_path, capsys, edit, message):
    """inspect showed the top-level pattern and exit 0 for a config.json that load refuses."""
    path = hybridlm.save(tiny(), tmp_path / "ck")
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))
    assert main(["inspect", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_dtypes_without_a_torch_name_are_shown_by_their_safetensors_code_in_lower_case(tmp_path):
    """float8_e8m0fnu (no entry in the table of torch names) is counted as "f8_e8m0", like "bfloat16"; uint16 and
    uint32 have entries (the fit check needs them, as not floating point)."""
    file = tmp_path / "w.safetensors"
    tensors = {"a": torch.zeros(6, dtype=torch.uint16), "b": torch.zeros(2, 2, dtype=torch.uint32)}
    save_file(tensors | {"c": torch.zeros(3, dtype=torch.float8_e8m0fnu)}, file)
    info = describe(file)
    assert info["dtypes"] == {"uint16": 6, "uint32": 4, "f8_e8m0": 3}
    assert "dtypes       f8_e8m0 3, uint16 6, uint32 4" in render(info)


def test_a_training_state_one_byte_short_is_refused_whatever_the_order_of_its_entries(tmp_path):
    """Each data file must reach the end of its furthest entry: one byte short is damage, even when that entry
    is not the last one listed in .metadata."""
    import pickle

    from hybridlm.checkpoint.safe_dcp import read_dcp_metadata
    from hybridlm.checkpoint.training_state import save_training_state

    state = save_training_state(tmp_path / "state", tiny(), step=7)
    meta = read_dcp_metadata(state)
    entries = sorted(meta.storage_data.items(), key=lambda kv: -(kv[1].offset + kv[1].length))  # furthest first
    meta.storage_data = dict(entries)
    (state / ".metadata").write_bytes(pickle.dumps(meta))
    name, end = entries[0][1].relative_path, entries[0][1].offset + entries[0][1].length
    assert describe(state)["kind"] == "DCP training state"
    data = (state / name).read_bytes()
    assert len(data) == end
    (state / name).write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match=f"{name} holds {end - 1:,} of {end:,} bytes"):
        describe(state)


def test_a_damaged_safetensors_file_is_called_unreadable(tmp_path):
    """A .safetensors name is taken at its word: garbage in it is a file that cannot be read."""
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"w\.safetensors: cannot read safetensors file"):
        describe(tmp_path / "w.safetensors")


def _config_line(text: str) -> dict[str, str]:
    config_line = next(line for line in text.splitlines() if line.startswith("config "))
    return dict(item.split("=", 1) for item in config_line.removeprefix("config").strip().split(", "))


def test_render_shows_step_zero_and_only_the_options_that_are_set(tmp_path):
    """A state saved at step 0 shows "step 0"; the config line leaves out options that are off (False, 0,
    None), those no layer of the pattern reads, and the schema version."""
    from hybridlm.checkpoint.training_state import save_training_state
    from hybridlm.config import unused_fields

    model = tiny()
    text = render(describe(save_training_state(tmp_path / "state", model, step=0)))
    assert "\nstep         0\n" in text
    shown = _config_line(text)
    saved = model.config.to_dict()
    unread = unused_fields(model.config, saved)
    assert "schema_version" in saved and "schema_version" not in shown and "moe_num_experts" in unread
    assert shown == {
        k: str(v) for k, v in saved.items() if k not in ("schema_version", "pattern") and v and k not in unread
    }


def test_the_config_line_leaves_out_the_options_of_kinds_the_pattern_lacks(tmp_path):
    """A Qwen3-Next-like checkpoint (G, *, E, an MTP depth) listed Mamba2's state size, MLA's ranks and DSA's top-k
    (their defaults, in every config.json) as if the model had those layers."""
    config = ModelConfig.preset("tiny").replace(pattern="[GE][*E]/[*E]", position_embedding="rope")
    shown = _config_line(render(describe(hybridlm.save(HybridLM(config, seed=0), tmp_path / "ckpt"))))
    assert {"gdn_head_dim", "moe_num_experts", "num_attention_heads", "rope_theta", "mtp_loss_scale"} <= set(shown)
    assert not [k for k in shown if k.startswith(("mamba_", "dsa_")) or k in ("q_lora_rank", "kv_lora_rank")]
    assert "ffn_hidden_size" not in shown  # the experts are sized by moe_ffn_hidden_size, and there is no '-'


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as meant
def test_a_dcp_folder_counts_tensors_and_other_entries_apart(tmp_path):
    """entries counts every entry of .metadata, tensors only the tensors (a pickled value is an entry)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.zeros(3, 2), "v": torch.zeros(4), "note": "text"}, checkpoint_id=str(tmp_path / "dcp"))
    info = describe(tmp_path / "dcp")
    assert (info["kind"], info["tensors"], info["elements"], info["entries"]) == ("DCP training state", 2, 10, 3)


def test_a_run_folder_without_checkpoints_shows_its_model_as_generate_reads_it(tmp_path, capsys):
    """A run folder whose checkpoints/ is gone (pruned, or only model/ copied) was 'no safetensors files found',
    while generate and convert read its model/."""
    run = tmp_path / "run"
    hybridlm.save(tiny(), run / "model")
    assert main(["inspect", str(run)]) == 0
    assert capsys.readouterr().out.startswith(f"hybridlm checkpoint: {run / 'model'}\npattern      {PATTERN}")


def test_a_checkpoint_with_a_tensor_that_is_not_floating_point_is_refused_as_load_refuses_it(tmp_path, capsys):
    """The header's shapes were checked with float32 stand-ins: an integer tensor passed inspect, exit 0."""
    path = hybridlm.save(tiny(), tmp_path / "ck")
    file = path / "model.safetensors"
    tensors = {k: t.to(torch.int64) if k == "embeddings.weight" else t for k, t in load_file(file).items()}
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"not floating point: embeddings\.weight \(torch\.int64\)"):
        hybridlm.load(path, verify=False)
    assert main(["inspect", str(path)]) == 2
    assert "not floating point: embeddings.weight (torch.int64)" in capsys.readouterr().err


def test_a_header_shape_torch_cannot_hold_is_listed_in_a_file_and_refused_by_name_in_a_checkpoint(tmp_path, capsys):
    """A zero-element tensor whose other dimensions overflow torch's strides is valid safetensors: stand-in meta
    tensors were built for every file (only the checkpoint kinds use them), and torch's RuntimeError escaped
    inspect of a plain safetensors file; in a checkpoint it is refused by name, as a CheckpointError."""
    import struct

    def write(file, header):
        raw = json.dumps(header).encode()
        file.write_bytes(struct.pack("<Q", len(raw) + -len(raw) % 8) + raw + b" " * (-len(raw) % 8))

    odd = {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}
    write(tmp_path / "w.safetensors", {"w": odd})
    info = describe(tmp_path / "w.safetensors")
    assert (info["kind"], info["tensors"], info["parameters"]) == ("safetensors file", 1, 0)
    path = hybridlm.save(tiny(), tmp_path / "ck")
    (path / "model.safetensors").unlink()
    write(path / "model.safetensors", {"embeddings.weight": odd})
    with pytest.raises(CheckpointError, match=r"embeddings\.weight has shape \[0, 1099511627776, 1099511627776\]"):
        describe(path)


@pytest.mark.parametrize("edit", ["unlisted", "other shard", "not in its shard"])
def test_a_sharded_checkpoint_whose_index_load_refuses_is_refused(tmp_path, edit):
    """inspect read every tensor of the shards, load only those the index lists, each from the shard it names: a
    tensor left out of the index, or listed under another shard, passed inspect while load refused the checkpoint."""
    path = hybridlm.save(tiny(), tmp_path / "ck", max_shard_size=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weights = index["weight_map"]
    name = next(k for k, f in weights.items() if list(weights.values()).count(f) > 1)  # its shard holds others too
    if edit == "unlisted":
        del weights[name]
    elif edit == "other shard":
        weights[name] = next(f for f in weights.values() if f != weights[name])
    else:
        weights["extra.weight"] = weights[name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError):
        hybridlm.load(path)
    with pytest.raises(CheckpointError, match=rf"missing tensors \(1\): {re.escape(name)}|does not contain tensor"):
        describe(path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as meant
def test_a_folder_of_training_states_or_of_something_else_says_what_inspect_reads(tmp_path):
    """A run's checkpoints/ folder and a prepared token folder were 'no safetensors files found' and nothing more."""
    import torch.distributed.checkpoint as dcp

    for step in ("step-000001", "step-000002"):
        dcp.save({"w": torch.zeros(2)}, checkpoint_id=str(tmp_path / "checkpoints" / step))
    with pytest.raises(
        CheckpointError, match=re.escape(f"inspect one of them, such as {tmp_path}/checkpoints/step-000002")
    ):
        describe(tmp_path / "checkpoints")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "meta.json").write_text("{}")
    with pytest.raises(
        CheckpointError, match=re.escape("no safetensors files found (inspect reads safetensors files, hybridlm")
    ):
        describe(tmp_path / "tokens")


def test_a_folder_of_other_folders_is_not_called_a_folder_of_training_states(tmp_path):
    """Only folders holding a DCP .metadata count as training states; others leave the generic answer."""
    (tmp_path / "runs" / "notes").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=re.escape("no safetensors files found (inspect reads")):
        describe(tmp_path / "runs")


def test_a_checkpoint_with_moe_layers_shows_its_active_parameters(tmp_path, capsys):
    """ "30B-A3B": beside the total, what one token uses. By hand (hidden 4, vocabulary 10): embedding and head 40
    each, norm_f 4, '-' 4 + 6·4 + 4·6 = 52, E = norm 4 + router 4·4 + 4 experts × 24 + shared 16 + gate 4 = 136 of
    which a token uses 1 expert of 4 (3 × 24 = 72 idle): 272 in the file, 200 active. No MoE layer, no count."""
    config = ModelConfig(
        pattern="E-", vocab_size=10, hidden_size=4, ffn_hidden_size=6, moe_num_experts=4, moe_top_k=1,
        moe_ffn_hidden_size=3, moe_shared_expert_ffn_hidden_size=2, moe_shared_expert_gate=True,
    )  # fmt: skip
    path = hybridlm.save(HybridLM(config, seed=0), tmp_path / "moe")
    info = describe(path)
    assert (info["parameters"], info["active_parameters"]) == (272, 200)
    assert main(["inspect", str(path)]) == 0
    assert "parameters   272 (272), active 200 (200)\n" in capsys.readouterr().out
    dense = describe(hybridlm.save(tiny(), tmp_path / "dense"))
    assert "active_parameters" not in dense and ", active" not in render(dense)


def test_names_lists_every_tensor_by_its_canonical_name_and_shape(tmp_path, capsys):
    """``--names``: a checkpoint's tensors by name (the canonical names train.trainable's patterns match, whatever the
    brackets), shape and dtype; a training state's by its entries' names and shapes; none without the flag."""
    model = tiny()
    state = canonical_state_dict(model)
    info = describe(hybridlm.save(model, tmp_path / "ckpt"), names=True)
    assert info["names"] == {k: {"shape": list(t.shape), "dtype": "F32"} for k, t in state.items()}
    assert "names" not in describe(tmp_path / "ckpt")
    assert main(["inspect", str(tmp_path / "ckpt"), "--names"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  layers\.2\.mixer\.q_proj\.weight +\(\d+, \d+\)  F32$", out, re.M), out
    assert out.splitlines().index("names") == len(out.splitlines()) - len(state) - 1
    from hybridlm.checkpoint.training_state import save_training_state

    save_training_state(tmp_path / "state", model, step=1)
    names = describe(tmp_path / "state", names=True)["names"]
    assert names["model.layers.2.mixer.q_proj.weight"] == {"shape": list(state["layers.2.mixer.q_proj.weight"].shape)}
