"""No file a user may receive runs code when loaded: crafted pickles in every load path, flipped
bytes, index entries outside the folder."""

import json
import os
import pathlib
import pickle
import re
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

import hybridlm
from hybridlm import CheckpointError, HybridLM
from hybridlm.checkpoint.inspect import describe
from hybridlm.checkpoint.safe_dcp import read_dcp_metadata
from hybridlm.checkpoint.training_state import (
    RNG_STATE,
    TRAINER_STATE,
    _canonical_states,
    load_training_state,
    save_training_state,
)
from hybridlm.cli import main
from tests.helpers import tiny_config


class Payload:
    """Unpickling this creates ``marker``: the proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def make(seed=0):
    model = HybridLM(tiny_config("M-*-"), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 16))
    model(ids, ids).loss.backward()
    opt.step()
    return model, opt


@pytest.fixture
def state(tmp_path):
    model, opt = make()
    save_training_state(tmp_path / "s", model, opt, step=1)
    return tmp_path / "s"


def refused_everywhere(path, marker, capsys):
    model, opt = make(seed=1)
    with pytest.raises(CheckpointError):
        load_training_state(path, model, opt)
    with pytest.raises(CheckpointError):
        describe(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists(), "a load ran code from the checkpoint"


def test_crafted_metadata_pickle(state, tmp_path, capsys):
    assert describe(state)["kind"] == "DCP training state"  # the genuine folder is read
    marker = tmp_path / "pwned"
    (state / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    refused_everywhere(state, marker, capsys)


def test_object_planted_inside_genuine_metadata(state, tmp_path, capsys):
    marker = tmp_path / "pwned"
    meta = read_dcp_metadata(state)
    meta.planner_data = {"x": Payload(marker)}
    (state / ".metadata").write_bytes(pickle.dumps(meta))
    refused_everywhere(state, marker, capsys)
    with pytest.raises(CheckpointError, match="is not part of DCP metadata"):
        read_dcp_metadata(state)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as meant
def test_object_planted_in_an_optimizer_entry(state, tmp_path):
    """DCP stores non-tensors with torch.save and loads them with weights_only=False: never asked for."""
    marker = tmp_path / "pwned"
    model, opt = make()
    states = _canonical_states(model, opt, "cannot save a training state")
    key = next(k for k in states["optim"] if k.endswith(".exp_avg"))
    states["optim"][key] = Payload(marker)
    states["optim"]["param_groups.extra.lr"] = Payload(marker)
    evil = tmp_path / "evil"
    dcp.save(states, checkpoint_id=str(evil))
    for name in (TRAINER_STATE, RNG_STATE):
        shutil.copy(state / name, evil / name)
    fresh, fresh_opt = make(seed=1)
    with pytest.raises(CheckpointError, match="pickled object, which hybridlm never loads"):
        load_training_state(evil, fresh, fresh_opt)
    assert not marker.exists()


def test_trainer_state_is_json_and_a_planted_pickle_is_ignored(state, tmp_path):
    marker = tmp_path / "pwned"
    assert json.loads((state / TRAINER_STATE).read_text())["step"] == 1
    (state / TRAINER_STATE).unlink()
    torch.save({"step": Payload(marker)}, state / "trainer_state.pt")  # the old file name
    model, opt = make(seed=1)
    with pytest.raises(CheckpointError, match=r"missing trainer_state\.json"):
        load_training_state(state, model, opt)
    assert not marker.exists()


def test_storage_entry_outside_the_folder_is_refused(state):
    meta = read_dcp_metadata(state)
    info = next(iter(meta.storage_data.values()))
    info.relative_path = "../elsewhere/__0_0.distcp"
    (state / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match="points outside the folder"):
        read_dcp_metadata(state)


# -- published weights: checksums and index entries ------------------------------------------------


def test_flipped_data_byte_is_refused_unless_verify_is_off(tmp_path):
    path = tmp_path / "ck"
    model = HybridLM(tiny_config("M-*-"))
    hybridlm.save(model, path)
    assert "model.safetensors" in json.loads((path / "config.json").read_text())["sha256"]
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor's data: the file still parses
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        hybridlm.load(path)
    loaded = hybridlm.load(path, verify=False)
    differ = [k for k, v in loaded.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert len(differ) == 1  # the flipped bit, loaded on request


def test_a_damaged_checksum_entry_names_config_json_not_the_weights(tmp_path):
    path = hybridlm.save(HybridLM(tiny_config("M-"), seed=0), tmp_path / "ck")
    meta = json.loads((path / "config.json").read_text())
    for entry in (12345, "abc", None):
        (path / "config.json").write_text(json.dumps(meta | {"sha256": {"model.safetensors": entry}}))
        with pytest.raises(
            CheckpointError, match=r"config\.json: sha256 of model\.safetensors is no SHA-256 hex digest"
        ):
            hybridlm.load(path)


def test_sharded_checkpoint_checksums_and_outside_index_entries(tmp_path):
    path = tmp_path / "ck"
    hybridlm.save(HybridLM(tiny_config("M-*-")), path, max_shard_size=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(json.loads((path / "config.json").read_text())["sha256"]) == shards
    hybridlm.load(path)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(path / shards[0], other / shards[0])
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = f"../other/{shards[0]}"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    for load in (hybridlm.load, describe):
        with pytest.raises(CheckpointError, match=r"not a \.safetensors file inside the checkpoint folder"):
            load(path)


def test_a_weight_file_that_is_no_regular_file_is_refused_not_waited_on(tmp_path, capsys):
    """A FIFO named model.safetensors in a folder from someone else blocked load and inspect forever."""
    ck = hybridlm.save(HybridLM(tiny_config("M-"), seed=0), tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    os.mkfifo(ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a regular file"):
        hybridlm.load(ck)
    assert main(["inspect", str(ck)]) == 2 and "not a regular file" in capsys.readouterr().err
    for name in ("config.json", "model.safetensors.index.json"):  # the JSON files read before the weights
        ck = hybridlm.save(HybridLM(tiny_config("M-"), seed=0), tmp_path / name, max_shard_size=1000)
        (ck / name).unlink()
        os.mkfifo(ck / name)
        with pytest.raises(CheckpointError, match=f"{name}: not a regular file"):
            hybridlm.load(ck)


@pytest.mark.parametrize("rel", ["..", "", "sub/__0_0.distcp", "/tmp/__0_0.distcp"])
def test_storage_entries_must_be_bare_file_names(state, rel):
    """Only a file name inside the folder: the parent directory itself, an empty name, a subfolder or an
    absolute path are refused."""
    meta = read_dcp_metadata(state)
    next(iter(meta.storage_data.values())).relative_path = rel
    (state / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=re.escape(f"points outside the folder ({rel!r})")):
        read_dcp_metadata(state)


@pytest.mark.parametrize("protocol", [3, pickle.DEFAULT_PROTOCOL])
def test_metadata_may_hold_sets_and_ordered_dicts(state, protocol):
    """Plain containers that other torch versions put into DCP metadata are read, also as an older pickle
    protocol (3) writes them, by class name (builtins.set); they run no code."""
    from collections import OrderedDict

    meta = read_dcp_metadata(state)
    meta.planner_data = OrderedDict(a=frozenset({1, 2}), b={3})
    (state / ".metadata").write_bytes(pickle.dumps(meta, protocol=protocol))
    assert read_dcp_metadata(state).planner_data == OrderedDict(a=frozenset({1, 2}), b={3})


def test_storage_transforms_and_odd_metadata_are_refused_by_name(state):
    """Compressed (transformed) storage, and a Metadata whose entries are no dict, are refused as such."""
    meta = read_dcp_metadata(state)
    next(iter(meta.storage_data.values())).transform_descriptors = ["zstd"]
    (state / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=r"storage transforms are not supported \(\['zstd'\]\)"):
        read_dcp_metadata(state)
    for info in meta.storage_data.values():
        info.transform_descriptors = None
    meta.state_dict_metadata = None
    (state / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=r"\.metadata: not DCP metadata"):
        read_dcp_metadata(state)


def test_per_rank_metadata_is_refused(state):
    from hybridlm.checkpoint.safe_dcp import SafeFileSystemReader

    reader = SafeFileSystemReader(str(state))
    assert reader.read_metadata().state_dict_metadata  # the one shared .metadata is read
    with pytest.raises(CheckpointError, match="per-rank DCP metadata is not supported"):
        reader.read_metadata(rank=1)


def test_an_unreadable_metadata_file_is_called_unreadable(state):
    """An OS error (here a link loop) is reported as unreadable, not as a refused (crafted) file."""
    (state / ".metadata").unlink()
    (state / ".metadata").symlink_to(state / ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable \(Too many levels of symbolic links\)"):
        read_dcp_metadata(state)


@pytest.mark.parametrize("module, name", [("builtins", "int"), ("numpy", "float32"), ("torch", "load")])
def test_only_torch_dtypes_are_taken_by_a_dtype_name(state, module, name):
    """The dtype exception of the allow-list is torch's own dtypes: another module's attribute of a dtype's
    name (int, float32), or a torch function, is refused."""
    (state / ".metadata").write_bytes(f"c{module}\n{name}\n.".encode())
    with pytest.raises(CheckpointError, match=re.escape(f"'{module}.{name}' is not part of DCP metadata")):
        read_dcp_metadata(state)
    (state / ".metadata").write_bytes(b"ctorch\nfloat32\n.")
    with pytest.raises(CheckpointError, match="not DCP metadata"):  # read, then refused as no Metadata
        read_dcp_metadata(state)


def test_a_config_describing_a_tensor_past_torchs_sizes_is_refused_naming_config_json(tmp_path, capsys):
    """An edited hidden_size=10**12 makes q_proj 10**12 x 10**12, which torch refuses even on the meta device: load,
    inspect and both conversions stopped in nn.Linear with "unexpected RuntimeError: Storage size calculation
    overflowed", naming no file."""
    from hybridlm.checkpoint.hf_nemotron import convert_to_nemotron_h, import_nemotron_h

    ck = hybridlm.save(HybridLM(tiny_config("M-*-"), seed=0), tmp_path / "ck")
    hf = convert_to_nemotron_h(ck, tmp_path / "hf")
    for path, edit in ((ck, lambda c: c["config"]), (hf, lambda c: c)):
        meta = json.loads((path / "config.json").read_text())
        edit(meta).update(hidden_size=10**12)  # (NemotronH's config.json gives head_dim: its MLP)
        (path / "config.json").write_text(json.dumps(meta | ({"intermediate_size": 10**12} if path == hf else {})))
    said = r"config\.json: describes a tensor larger than torch can hold \(."  # (then torch's words, which may change)
    for load in (hybridlm.load, describe):
        with pytest.raises(CheckpointError, match=said):
            load(ck)
    with pytest.raises(CheckpointError, match=said):
        import_nemotron_h(hf)
    assert main(["inspect", str(ck)]) == 2 and "unexpected" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda m, k: setattr(m.state_dict_metadata[k], "size", "abc"), f"entry {'model.embeddings.weight'!r}"),
        (lambda m, k: m.state_dict_metadata.__setitem__(5, m.state_dict_metadata.pop(k)), "entry 5"),
        (lambda m, k: setattr(m, "storage_data", [1]), "storage map"),
    ],
    ids=["size", "name", "storage"],
)
def test_allowed_classes_in_the_wrong_places_are_refused_as_no_dcp_metadata(state, capsys, damage, said):
    """A crafted .metadata of allowed classes only, put where DCP puts others (a string for a tensor's size, an int
    for a name, a list for the storage map), failed in inspect and a load's checks with AttributeError."""
    meta = read_dcp_metadata(state)
    damage(meta, "model.embeddings.weight")
    (state / ".metadata").write_bytes(pickle.dumps(meta))
    refused = rf"\.metadata: not DCP metadata \(malformed {re.escape(said)}\)"
    model, opt = make(seed=1)
    for load in (describe, lambda p: load_training_state(p, model, opt)):
        with pytest.raises(CheckpointError, match=refused):
            load(state)
    assert main(["inspect", str(state)]) == 2 and "unexpected" not in capsys.readouterr().err
