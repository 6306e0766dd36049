"""ModelConfig: JSON round trip with a schema version, field-named validation errors, presets, which
layers read which field."""

import copy
import dataclasses
import inspect
import json
import os
import pickle
import re

import pytest
import torch

from hybridlm import ConfigError, HybridLM, ModelConfig
from hybridlm.config import FIELD_READERS, PRESETS, SCHEMA_VERSION, unused_fields
from hybridlm.pattern.symbols import LAYER_SYMBOLS
from tests.helpers import fifos_never_read


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip(name, tmp_path):
    cfg = ModelConfig.preset(name)
    d = cfg.to_dict()
    assert d["schema_version"] == SCHEMA_VERSION
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_a_file_whose_name_looks_like_json_is_read_as_a_file(tmp_path, monkeypatch):
    """A relative name starting with '[' or '{' (an export called "[v1].pt") is a file where one exists."""
    cfg = ModelConfig.preset("tiny")
    monkeypatch.chdir(tmp_path)
    for name in ("[v1].json", "{run}.json"):
        cfg.to_json(name)
        assert ModelConfig.from_json(name) == cfg


def test_sizes_beyond_64_bits_are_refused_by_name():
    for field, value in (("hidden_size", 2**64), ("vocab_size", 2**63), ("ffn_hidden_size", 10**30)):
        with pytest.raises(ConfigError, match=f"^{field}: must fit in 64 bits"):
            ModelConfig.preset("tiny", **{field: value})


def test_contract_field_names():
    names = set(ModelConfig.__dataclass_fields__)
    contract = [
        "pattern",
        "vocab_size",
        "hidden_size",
        "norm_eps",
        "norm_zero_centered",
        "tie_embeddings",
        "init_std",
        "mtp_loss_scale",
        "num_attention_heads",
        "num_query_groups",
        "head_dim",
        "position_embedding",
        "rope_theta",
        "rotary_percent",
        "qk_norm",
        "attention_output_gate",
        "ffn_hidden_size",
        "mlp_activation",
        "mamba_num_heads",
        "mamba_head_dim",
        "mamba_state_dim",
        "mamba_num_groups",
        "mamba_conv_kernel",
        "mamba_chunk_size",
        "mamba_dt_min",
        "mamba_dt_max",
        "mamba_dt_init_floor",
        "moe_num_experts",
        "moe_top_k",
        "moe_ffn_hidden_size",
        "moe_shared_expert_ffn_hidden_size",
        "moe_router_score",
        "moe_router_expert_bias",
        "moe_routed_scaling",
        "moe_num_groups",
        "moe_topk_groups",
        "moe_norm_topk_prob",
        "moe_aux_loss_coeff",
        "gdn_num_heads",
        "gdn_num_value_heads",
        "gdn_head_dim",
        "gdn_value_head_dim",
        "gdn_conv_kernel",
    ]
    assert set(contract) <= names
    d = ModelConfig(pattern="M", vocab_size=8, hidden_size=256)
    assert (d.norm_eps, d.tie_embeddings, d.init_std, d.mtp_loss_scale) == (1e-5, False, 0.02, 0.1)
    assert (d.mamba_head_dim, d.mamba_state_dim, d.mamba_num_groups, d.mamba_conv_kernel, d.mamba_chunk_size) == (
        64,
        128,
        8,
        4,
        128,
    )
    assert (d.rotary_percent, d.qk_norm, d.position_embedding) == (1.0, False, "none")
    assert d.attention_output_gate is False
    assert (d.moe_shared_expert_ffn_hidden_size, d.moe_routed_scaling, d.moe_num_groups, d.moe_topk_groups) == (
        0,
        1.0,
        1,
        1,
    )
    assert d.moe_router_expert_bias is False and d.gdn_conv_kernel == 4


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"norm_eps": -1.0}, "norm_eps"),
        ({"pattern": "M*X"}, "pattern"),
        ({"pattern": "[*M]"}, "pattern"),
        ({"pattern": "M*", "num_attention_heads": None}, "num_attention_heads"),
        ({"pattern": "*", "num_attention_heads": 4, "num_query_groups": 3}, "num_query_groups"),
        ({"pattern": "*", "num_attention_heads": 5}, "head_dim"),
        ({"pattern": "*", "num_attention_heads": 4, "position_embedding": "alibi"}, "position_embedding"),
        ({"pattern": "*", "num_attention_heads": 4, "rotary_percent": 0.0}, "rotary_percent"),
        ({"pattern": "-", "mlp_activation": "relu"}, "mlp_activation"),
        ({"pattern": "M", "mamba_num_groups": 3}, "mamba_num_groups"),
        ({"pattern": "M", "mamba_dt_min": 0.5}, "mamba_dt_min"),
        ({"pattern": "E"}, "moe_num_experts"),
        ({"pattern": "E", "moe_num_experts": 4, "moe_top_k": 5}, "moe_top_k"),
        ({"pattern": "E", "moe_num_experts": 4, "moe_num_groups": 3}, "moe_num_groups"),
        ({"pattern": "E", "moe_num_experts": 4, "moe_router_score": "relu"}, "moe_router_score"),
        (
            {"pattern": "E", "moe_num_experts": 8, "moe_num_groups": 4, "moe_topk_groups": 1, "moe_top_k": 3},
            "moe_top_k",
        ),
        ({"pattern": "G", "gdn_num_heads": 3, "gdn_num_value_heads": 4}, "gdn_num_value_heads"),
        ({"tie_embeddings": 1}, "tie_embeddings"),
        # moe_topk_groups above moe_num_groups (top_k still reachable): must be refused, not crash in topk
        (
            {"pattern": "E", "moe_num_experts": 8, "moe_num_groups": 2, "moe_topk_groups": 3, "moe_top_k": 2},
            "moe_topk_groups",
        ),
        # RoPE rotating fewer than 2 channels would silently do nothing
        (
            {"pattern": "*", "num_attention_heads": 4, "position_embedding": "rope", "rotary_percent": 0.01},
            "rotary_percent",
        ),
        # rotary_percent above 1 (checked even without RoPE)
        ({"pattern": "*", "num_attention_heads": 4, "rotary_percent": 1.5}, "rotary_percent"),
        # an E-only pattern whose experts fall back to ffn_hidden_size checks it
        ({"pattern": "E", "moe_num_experts": 4, "ffn_hidden_size": 0}, "ffn_hidden_size"),
        # the rotary frequencies, of attention with RoPE and of MLA
        ({"pattern": "*", "num_attention_heads": 4, "position_embedding": "rope", "rope_type": "ntk"}, "rope_type"),
        ({"pattern": "+", "num_attention_heads": 4, "rope_type": "YaRN"}, "rope_type"),
        (
            {"pattern": "+", "num_attention_heads": 4, "rope_type": "yarn", "yarn_rotary_scaling_factor": 0.5},
            "yarn_rotary_scaling_factor",
        ),
        (
            {"pattern": "D", "num_attention_heads": 4, "rope_type": "yarn", "yarn_original_max_position_embeddings": 0},
            "yarn_original_max_position_embeddings",
        ),
        ({"pattern": "+", "num_attention_heads": 4, "rope_type": "yarn", "yarn_beta_slow": 0.0}, "yarn_beta_slow"),
        ({"pattern": "+", "num_attention_heads": 4, "rope_type": "yarn", "yarn_mscale": -0.1}, "yarn_mscale"),
        ({"pattern": "+", "num_attention_heads": 4, "rope_type": "yarn", "yarn_beta_fast": 0.5}, "yarn_beta_fast"),
        ({"pattern": "+", "num_attention_heads": 4, "rope_type": "yarn", "rope_theta": 1.0}, "rope_theta"),
    ],
)
def test_errors_name_the_field(changes, field):
    base = {"pattern": "M-", "vocab_size": 64, "hidden_size": 256}
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**base, **changes})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


def test_fields_of_unused_layer_kinds_are_not_checked():
    # No attention in the pattern: attention fields may stay unset.
    ModelConfig(pattern="M-", vocab_size=64, hidden_size=256, num_attention_heads=None)


def test_unknown_keys_and_versions():
    d = ModelConfig.preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        ModelConfig.from_dict({**d, "hiden_size": 3})
    with pytest.raises(ConfigError, match="schema_version"):
        ModelConfig.from_dict({**d, "schema_version": SCHEMA_VERSION + 1})
    missing = dict(d)
    del missing["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig.from_dict(missing)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("nemotron-h-9b")
    with pytest.raises(ConfigError, match="invalid JSON"):
        ModelConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):  # over Python's 4,300-digit integer limit
        ModelConfig.from_json('{"vocab_size": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match="must be finite"):  # an integer no float holds
        ModelConfig.from_dict({**d, "norm_eps": 10**400})
    with pytest.raises(ConfigError, match="field name must be a string"):
        ModelConfig.from_dict({**d, 1: 2})


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "c.json").write_bytes(b'{"pattern": "\xff"}')
    with pytest.raises(ConfigError, match=r"c\.json: not UTF-8 text"):
        ModelConfig.from_json(tmp_path / "c.json")


def test_resolved_sizes():
    c = ModelConfig(pattern="M*-", vocab_size=8, hidden_size=256, num_attention_heads=4)
    assert c.resolved_head_dim == 64 and c.resolved_num_query_groups == 4
    assert c.resolved_ffn_hidden_size == 1024 and c.resolved_mamba_num_heads == 8
    assert c.mamba_d_inner == 512
    assert c.replace(position_embedding="rope", rotary_percent=0.5).rotary_dim == 32


def test_mtp_loss_scale_zero_is_accepted():
    """Guards against refusing mtp_loss_scale=0, the documented way to turn the MTP loss off."""
    c = ModelConfig(pattern="M-/-", vocab_size=64, hidden_size=256, mtp_loss_scale=0.0)
    assert c.mtp_loss_scale == 0.0
    with pytest.raises(ConfigError, match="mtp_loss_scale"):
        ModelConfig(pattern="M-/-", vocab_size=64, hidden_size=256, mtp_loss_scale=-0.1)


def test_resolved_default_expert_and_gdn_value_sizes():
    """Guards against default expert / GDN value sizes that ignore the fields they fall back to."""
    c = ModelConfig(pattern="E", vocab_size=8, hidden_size=256, moe_num_experts=4, ffn_hidden_size=96)
    assert c.resolved_moe_ffn_hidden_size == 96
    assert c.replace(moe_ffn_hidden_size=40).resolved_moe_ffn_hidden_size == 40
    g = ModelConfig(pattern="G", vocab_size=8, hidden_size=256, gdn_head_dim=32)
    assert g.resolved_gdn_value_head_dim == 32
    assert g.replace(gdn_value_head_dim=48).resolved_gdn_value_head_dim == 48


def test_presets_live_in_their_own_module():
    import hybridlm.config
    import hybridlm.presets

    assert hybridlm.config.PRESETS is hybridlm.presets.PRESETS
    assert list(PRESETS) == [
        "tiny",
        "nemotron-h-8b",
        "nemotron-3-nano-30b-a3b",
        "qwen3-next-80b-a3b",
        "bench-1.3b",
        "bench-moe-1b",
    ]
    assert ModelConfig.from_preset("bench-moe-1b", vocab_size=64) == ModelConfig(
        **{**PRESETS["bench-moe-1b"], "vocab_size": 64}
    )


def test_the_nemotron_3_nano_preset_is_the_published_model():
    """Routing fields change no parameter count (top_k, routed scaling) or little (KV groups: 0.008B), so the
    count check let them drift; these are the published config's values (shared/reference, hf_hybrid.md)."""
    c = ModelConfig.preset("nemotron-3-nano-30b-a3b")
    assert c.pattern == "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME" and c.hidden_size == 2688
    assert (c.num_attention_heads, c.num_query_groups, c.head_dim) == (32, 2, 128)
    assert (c.mamba_num_heads, c.mamba_head_dim, c.mamba_state_dim, c.mamba_num_groups) == (64, 64, 128, 8)
    assert (c.moe_num_experts, c.moe_top_k, c.moe_ffn_hidden_size, c.moe_shared_expert_ffn_hidden_size) == (
        128,
        6,
        1856,
        3712,
    )
    assert (c.moe_routed_scaling, c.moe_num_groups, c.moe_router_score) == (2.5, 1, "sigmoid")


def test_boundary_values_that_are_valid_are_accepted():
    """Guards against off-by-one refusals: a token may use every expert (top_k = num_experts) and every group
    (topk_groups = num_groups); dt_min may equal dt_max; a zero floor, clamp, shared expert or aux weight is off."""
    base = {"pattern": "M-E", "vocab_size": 64, "hidden_size": 256, "moe_num_experts": 4}
    for changes in (
        {"moe_top_k": 4},
        {"moe_num_groups": 2, "moe_topk_groups": 2, "moe_top_k": 4},
        {"mamba_dt_min": 0.01, "mamba_dt_max": 0.01, "mamba_dt_init_floor": 0.0, "mamba_dt_clamp_min": 0.0},
        {"moe_shared_expert_ffn_hidden_size": 0, "moe_aux_loss_coeff": 0.0},
    ):
        ModelConfig(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"init_std": 0.0}, "init_std"),
        ({"hidden_size": True}, "hidden_size"),
        ({"vocab_size": 2**63}, "vocab_size"),
        ({"pattern": "M", "mamba_dt_min": 0.15, "mamba_dt_max": 0.1}, "mamba_dt_min"),
        ({"pattern": "M", "mamba_dt_init_floor": -1e-4}, "mamba_dt_init_floor"),
        ({"pattern": "M", "mamba_dt_clamp_min": -0.01}, "mamba_dt_clamp_min"),
        ({"pattern": "M", "mamba_head_dim": 48}, "mamba_num_heads"),
        ({"pattern": "G", "gdn_dt_init_floor": -1e-4}, "gdn_dt_init_floor"),
        ({"pattern": "G", "gdn_chunk_size": 0}, "gdn_chunk_size"),
        ({"pattern": "-", "ffn_hidden_size": -8}, "ffn_hidden_size"),
        ({"pattern": "E", "moe_num_experts": 4, "moe_routed_scaling": 0.0}, "moe_routed_scaling"),
        (
            {"pattern": "E", "moe_num_experts": 4, "moe_shared_expert_ffn_hidden_size": -1},
            "moe_shared_expert_ffn_hidden_size",
        ),
        ({"pattern": "E", "moe_num_experts": 4, "moe_aux_loss_coeff": -0.01}, "moe_aux_loss_coeff"),
        ({"pattern": "E", "moe_num_experts": 4, "moe_z_loss_coeff": -0.01}, "moe_z_loss_coeff"),
        ({"pattern": "E", "moe_num_experts": 4, "moe_aux_loss_type": "sinkhorn"}, "moe_aux_loss_type"),
        ({"pattern": "*", "num_attention_heads": 4, "rope_theta": 0.0}, "rope_theta"),
        ({"pattern": "+", "num_attention_heads": 4, "qk_pos_emb_head_dim": 5}, "qk_pos_emb_head_dim"),
        ({"pattern": "D", "num_attention_heads": 4, "q_lora_rank": None}, "q_lora_rank"),
        ({"pattern": "D", "num_attention_heads": 4, "dsa_indexer_head_dim": 63}, "dsa_indexer_head_dim"),
        ({"pattern": "D", "num_attention_heads": 4, "dsa_indexer_loss_coeff": -0.1}, "dsa_indexer_loss_coeff"),
    ],
)
def test_more_invalid_values_are_refused_by_name(changes, field):
    """Guards against dropped or loosened checks the parametrized list above did not exercise: each value
    here builds a model that cannot run, or runs wrongly (a negative loss weight, a dt clamp below 0)."""
    base = {"pattern": "M-", "vocab_size": 64, "hidden_size": 256}
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**base, **changes})
    assert info.value.field == field


def test_schema_version_below_one_is_refused():
    d = ModelConfig.preset("tiny").to_dict()
    for version in (0, -1, "1", 1.0, True):
        with pytest.raises(ConfigError, match="schema_version"):
            ModelConfig.from_dict({**d, "schema_version": version})


def test_resolved_rotary_and_gdn_sizes():
    """Guards against an odd rotary width (RoPE rotates channel pairs) and GDN defaults: heads =
    hidden_size / gdn_head_dim but at least one, value heads = gdn_num_heads."""
    c = ModelConfig(pattern="*", vocab_size=8, hidden_size=40, num_attention_heads=4, position_embedding="rope")
    assert c.resolved_head_dim == 10 and c.replace(rotary_percent=0.5).rotary_dim == 4
    assert c.replace(rotary_percent=0.75).rotary_dim == 6
    g = ModelConfig(pattern="G", vocab_size=8, hidden_size=64, gdn_head_dim=128)
    assert g.resolved_gdn_num_heads == 1 and g.resolved_gdn_num_value_heads == 1
    g = g.replace(hidden_size=256, gdn_head_dim=32)
    assert g.resolved_gdn_num_heads == 8 and g.resolved_gdn_num_value_heads == 8
    assert g.replace(gdn_num_heads=2).resolved_gdn_num_value_heads == 2


def test_moe_presets_route_as_published():
    """Routing fields the parameter count does not see. Nemotron-3 Nano's router (hf_hybrid.md 2.5.5) has the
    selection-only ``e_score_correction_bias`` and renormalizes its top-k weights; bench-moe-1b is, as
    docs/model.md states, 64 experts top-6 with a 2048-wide shared expert, 3.93B parameters."""
    c = ModelConfig.preset("nemotron-3-nano-30b-a3b")
    assert c.moe_router_expert_bias is True and c.moe_norm_topk_prob is True and c.moe_topk_groups == 1
    b = ModelConfig.preset("bench-moe-1b")
    assert (b.moe_num_experts, b.moe_top_k, b.moe_shared_expert_ffn_hidden_size) == (64, 6, 2048)
    assert (b.moe_router_score, b.moe_router_expert_bias, b.moe_routed_scaling) == ("sigmoid", True, 2.5)


# -- which layers read which field (FIELD_READERS, unused_fields) ------------------------------------

#: Small sizes that every layer kind accepts, with the fields that matter only under another field's
#: value switched on (RoPE, the indexer's loss), so that each field is read where its readers are.
_READERS_BASE = dict(
    vocab_size=61, hidden_size=32, num_attention_heads=4, num_query_groups=2, position_embedding="rope",
    ffn_hidden_size=48, mamba_num_heads=4, mamba_head_dim=16, mamba_state_dim=8, mamba_num_groups=2,
    mamba_chunk_size=8, moe_num_experts=4, moe_num_groups=2, moe_topk_groups=1, moe_aux_loss_coeff=0.01,
    moe_shared_expert_ffn_hidden_size=8,
    gdn_num_heads=2, gdn_head_dim=8, gdn_chunk_size=8, q_lora_rank=16, kv_lora_rank=16, qk_head_dim=8,
    qk_pos_emb_head_dim=4, v_head_dim=8, dsa_indexer_n_heads=2, dsa_indexer_head_dim=8, dsa_indexer_topk=4,
    dsa_indexer_loss_coeff=0.1, rope_type="yarn", yarn_rotary_scaling_factor=4.0,
    yarn_original_max_position_embeddings=20000, yarn_beta_slow=0.25,  # each yarn_* value below moves a frequency
)  # fmt: skip
#: A valid other value of each field with readers.
_OTHER_VALUE = dict(
    mtp_loss_scale=0.5, num_attention_heads=2, rope_theta=500.0, num_query_groups=4, head_dim=4,
    position_embedding="none", rotary_percent=0.5, qk_norm=True, attention_output_gate=True, ffn_hidden_size=40, mlp_activation="swiglu",
    q_lora_rank=8, kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=2, v_head_dim=4,
    mamba_num_heads=2, mamba_head_dim=8, mamba_state_dim=4, mamba_num_groups=1, mamba_conv_kernel=3,
    mamba_chunk_size=4, mamba_dt_min=0.01, mamba_dt_max=0.05, mamba_dt_init_floor=0.09, mamba_dt_clamp_min=0.05,
    moe_num_experts=8, moe_top_k=1, moe_ffn_hidden_size=24, moe_shared_expert_ffn_hidden_size=16,
    moe_shared_expert_gate=True, moe_router_score="sigmoid", moe_router_expert_bias=True, moe_routed_scaling=2.0, moe_num_groups=1,
    moe_topk_groups=2, moe_norm_topk_prob=False, moe_aux_loss_coeff=0.1, moe_aux_loss_type="seq_aux_loss",
    moe_z_loss_coeff=0.1,
    gdn_num_heads=4, gdn_num_value_heads=4, gdn_head_dim=4, gdn_value_head_dim=4, gdn_conv_kernel=3,
    gdn_chunk_size=4, gdn_dt_min=0.01, gdn_dt_max=0.05, gdn_dt_init_floor=0.09,
    dsa_indexer_n_heads=4, dsa_indexer_head_dim=4, dsa_indexer_topk=2, dsa_indexer_loss_coeff=0.5,
    dsa_indexer_use_sparse_loss=True, rope_type="rope", yarn_rotary_scaling_factor=2.0,
    yarn_original_max_position_embeddings=100000, yarn_beta_fast=8.0, yarn_beta_slow=0.5, yarn_mscale=2.0,
    yarn_mscale_all_dim=0.5, yarn_correction_range_round_to_int=False,
)  # fmt: skip
#: One pattern per layer kind ("/": MTP depths, here of MLP layers).
_KIND_PATTERNS = {**{s: s for s in LAYER_SYMBOLS}, "/": "-/-"}  # a new layer kind is checked too


def _what_it_computes(**fields) -> tuple:
    """Parameter names, shapes and values at seed 0; the logits (MTP depths' too), the training-mode loss and its
    auxiliary part on fixed tokens (at initialization the router losses' types differ in it alone: by 1e-9 of 4)."""
    model = HybridLM(ModelConfig(**{**_READERS_BASE, **fields}), seed=0)
    tokens = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(tokens, tokens, return_logits=True)
    state = model.state_dict()
    aux = torch.zeros(()) if out.aux_loss is None else out.aux_loss
    return sorted((k, tuple(v.shape)) for k, v in state.items()), state, out.logits, out.loss, aux, *out.mtp_logits


def _computes_the_same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1]) and all(map(torch.equal, a[2:], b[2:]))


def test_every_field_is_read_by_every_model_or_listed_with_its_readers():
    """A new field must say which layers read it, or the trainer's "has no effect" notes miss it."""
    general = {"pattern", "vocab_size", "hidden_size", "norm_eps", "norm_zero_centered", "tie_embeddings", "init_std"}
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert names - general == set(FIELD_READERS) and set(_OTHER_VALUE) == set(FIELD_READERS)


@pytest.mark.parametrize("name", sorted(FIELD_READERS))
def test_a_field_changes_nothing_without_its_readers_and_something_with_them(name):
    """The map's claims, on models: every layer kind the map leaves out computes bitwise the same
    with the field changed (so the trainer's note is true), and every kind it names computes
    something else (so the map names no reader that ignores the field)."""
    for kind, pattern in _KIND_PATTERNS.items():
        other = {name: _OTHER_VALUE[name]}
        same = _computes_the_same(_what_it_computes(pattern=pattern), _what_it_computes(pattern=pattern, **other))
        read = bool(set(pattern) & set(FIELD_READERS[name]))
        assert same != read, (name, kind)
        assert (name in unused_fields(ModelConfig(**_READERS_BASE, pattern=pattern), [name])) != read


def test_fields_read_only_under_another_fields_value():
    """Attention rotates by rope_theta, rotary_percent, rope_type and YaRN's settings only with RoPE, by YaRN's only
    with rope_type = "yarn"; the experts read
    ffn_hidden_size only while moe_ffn_hidden_size is unset."""
    no_rope = dict(pattern="*-", position_embedding="none")
    for name in ("rope_theta", "rotary_percent"):
        assert _computes_the_same(
            _what_it_computes(**no_rope), _what_it_computes(**no_rope, **{name: _OTHER_VALUE[name]})
        )
        why = unused_fields(ModelConfig(**{**_READERS_BASE, **no_rope}), [name])[name]
        assert why == "attention ('*') rotates nothing with position_embedding = 'none'"
    yarn = [n for n in _OTHER_VALUE if n.startswith("yarn_")]
    for name in ["rope_type", *yarn]:
        assert _computes_the_same(
            _what_it_computes(**no_rope), _what_it_computes(**no_rope, **{name: _OTHER_VALUE[name]})
        )
        why = unused_fields(ModelConfig(**{**_READERS_BASE, **no_rope}), [name])[name]
        assert why == "attention ('*') rotates nothing with position_embedding = 'none'"
    for pattern in ("*-", "+D"):  # every kind that rotates, with the plain frequencies
        plain = dict(pattern=pattern, rope_type="rope")
        for name in yarn:
            other = {name: _OTHER_VALUE[name]}
            assert _computes_the_same(_what_it_computes(**plain), _what_it_computes(**plain, **other))
            why = unused_fields(ModelConfig(**{**_READERS_BASE, **plain}), [name])[name]
            assert why == "the rotary frequencies are YaRN's only with rope_type = 'yarn'"
    sized = dict(pattern="E", moe_ffn_hidden_size=24)
    assert _computes_the_same(_what_it_computes(**sized), _what_it_computes(**sized, ffn_hidden_size=40))
    assert unused_fields(ModelConfig(**{**_READERS_BASE, **sized}), ["ffn_hidden_size"]) == {
        "ffn_hidden_size": "the MoE experts are sized by moe_ffn_hidden_size"
    }
    assert unused_fields(ModelConfig(**{**_READERS_BASE, **sized, "pattern": "E-"}), ["ffn_hidden_size"]) == {}


def test_unused_fields_say_which_layers_are_missing():
    cfg = ModelConfig(**{**_READERS_BASE, "pattern": "M-"})
    assert unused_fields(
        cfg, ["hidden_size", "mamba_head_dim", "moe_top_k", "num_attention_heads", "mtp_loss_scale"]
    ) == {
        "moe_top_k": "the pattern has no MoE ('E') layers",
        "num_attention_heads": "the pattern has no attention ('*'), multi-latent attention ('+') or DeepSeek sparse "
        "attention ('D') layers",
        "mtp_loss_scale": "the pattern has no MTP depths",
    }


def test_the_sparse_indexer_loss_is_noted_without_the_indexer_loss():
    """dsa_indexer_use_sparse_loss picks the keys of the indexer's KL loss, which is not computed with
    dsa_indexer_loss_coeff = 0: a run setting it trained as if it were unset, without a note."""
    off = dict(pattern="D", dsa_indexer_loss_coeff=0.0)
    assert _computes_the_same(_what_it_computes(**off), _what_it_computes(**off, dsa_indexer_use_sparse_loss=True))
    assert unused_fields(ModelConfig(**{**_READERS_BASE, **off}), ["dsa_indexer_use_sparse_loss"]) == {
        "dsa_indexer_use_sparse_loss": "the indexer loss is not computed with dsa_indexer_loss_coeff = 0"
    }
    assert unused_fields(ModelConfig(**{**_READERS_BASE, "pattern": "D"}), ["dsa_indexer_use_sparse_loss"]) == {}


def test_the_balancing_loss_type_is_noted_without_the_balancing_loss():
    """moe_aux_loss_type picks how the balancing loss averages, and the loss is not computed with
    moe_aux_loss_coeff = 0: a run setting only the type trains as without it, and is told so."""
    off = dict(pattern="E", moe_aux_loss_coeff=0.0)
    assert _computes_the_same(_what_it_computes(**off), _what_it_computes(**off, moe_aux_loss_type="seq_aux_loss"))
    assert unused_fields(ModelConfig(**{**_READERS_BASE, **off}), ["moe_aux_loss_type"]) == {
        "moe_aux_loss_type": "the balancing loss is not computed with moe_aux_loss_coeff = 0"
    }
    assert unused_fields(ModelConfig(**{**_READERS_BASE, "pattern": "E"}), ["moe_aux_loss_type"]) == {}


@pytest.mark.parametrize("field", ["mamba_dt_clamp_min", "mamba_dt_init_floor", "gdn_dt_init_floor"])
def test_a_dt_bound_beyond_float32_is_refused_and_the_largest_float32_runs(field):
    """dt_bias and the step sizes are float32 tensors: a floor or clamp above float32's range was accepted, then
    failed inside torch ("value cannot be converted to type float without overflow") when the model was built
    (the init floor) or at its first forward (the clamp). Refused by name now; the largest float32 still runs."""
    base = {"pattern": "MG", "vocab_size": 16, "hidden_size": 16, "mamba_head_dim": 8, "mamba_num_groups": 1}
    base |= {"gdn_head_dim": 8, "mamba_state_dim": 4}
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**base, field: 1e39})
    assert info.value.field == field and "float32" in str(info.value)
    model = HybridLM(ModelConfig(**{**base, field: torch.finfo(torch.float32).max}), seed=0)
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 16)


@pytest.mark.parametrize("prefix", ["mamba", "gdn"])
def test_a_dt_range_beyond_float32_is_refused_and_its_ends_run(prefix):
    """dt_bias is drawn in float32: a dt_max above float32's range was accepted and made dt_bias inf (a NaN
    loss for Mamba2), a dt_min and floor that round to 0 made it -inf; the largest float32 as both ends made
    it inf too. Refused by name now, and the ends of float32's range build finite models."""
    base = {"pattern": "MG", "vocab_size": 16, "hidden_size": 16, "mamba_head_dim": 8, "mamba_num_groups": 1}
    base |= {"gdn_head_dim": 8, "mamba_state_dim": 4}
    lo, hi, floor = f"{prefix}_dt_min", f"{prefix}_dt_max", f"{prefix}_dt_init_floor"
    for changes, field in (({hi: 1e39}, hi), ({lo: 1e-60, hi: 1e-50, floor: 1e-60}, lo)):
        with pytest.raises(ConfigError) as info:
            ModelConfig(**{**base, **changes})
        assert info.value.field == field and "float32" in str(info.value)
    big, tiny = torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny
    for changes in ({lo: big, hi: big}, {lo: tiny, hi: tiny, floor: 0.0}):
        model = HybridLM(ModelConfig(**{**base, **changes}), seed=0)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert torch.isfinite(model(torch.zeros(1, 3, dtype=torch.long)).logits).all()


def test_from_json_reads_bytes_as_json_text():
    """Bytes (a file read in binary, an HTTP body) were taken for a path: "cannot read b'{...}'"."""
    config = ModelConfig(pattern="M-", vocab_size=16, hidden_size=16, mamba_head_dim=8, mamba_num_groups=1)
    assert ModelConfig.from_json(config.to_json().encode()) == config
    assert ModelConfig.from_json(bytearray(config.to_json().encode())) == config
    with pytest.raises(ConfigError, match=r"^config: not UTF-8 text \(invalid start byte at byte 0\)$"):
        ModelConfig.from_json(b"\xff{}")


@pytest.mark.parametrize(
    "megatron, ours",
    [
        ("moe_router_topk", "moe_top_k"),  # was "did you mean 'moe_router_score'?"
        ("moe_router_group_topk", "moe_topk_groups"),  # was 'moe_router_score' too
        ("rotary_base", "rope_theta"),  # was 'rotary_percent'
        ("mtp_num_layers", "'/'"),  # was 'moe_num_experts'
        ("hybrid_override_pattern", "'pattern'"),  # was no hint at all
        ("num_layers", "'pattern'"),
        ("layernorm_zero_centered_gamma", "'norm_zero_centered'"),
        ("apply_layernorm_1p", "'norm_zero_centered'"),  # its command-line name (--apply-layernorm-1p)
        ("apply_wd_to_qk_layernorm", "optim.apply_wd_to_qk_layernorm"),  # an optimizer setting: was no hint
        ("moe_router_load_balancing_type", "'moe_aux_loss_type'"),  # was 'moe_router_score'
        ("rotary_scaling_factor", "'yarn_rotary_scaling_factor'"),  # MLA's YaRN factor
        ("beta_fast", "'yarn_beta_fast'"),
        ("mscale_all_dim", "'yarn_mscale_all_dim'"),
    ],
)
def test_a_megatron_name_points_at_the_field_that_replaces_it(megatron, ours):
    """A Megatron-LM user's names got the closest spelling as a hint, which for these pointed at another option."""
    d = ModelConfig.preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="Megatron-LM name") as info:
        ModelConfig.from_dict({**d, megatron: 2})
    assert info.value.field == megatron and ours in str(info.value) and "did you mean" not in str(info.value)
    with pytest.raises(ConfigError, match="Megatron-LM name"):
        ModelConfig.preset("tiny").replace(**{megatron: 2})


@pytest.mark.parametrize(
    "keyword, says",
    [
        ("moe_router_topk", r"\(a Megatron-LM name\): hybridlm's is 'moe_top_k'"),
        ("hiden_size", r"did you mean 'hidden_size'"),
        ("no_such_thing_at_all", r"unknown ModelConfig field$"),
    ],
)
def test_constructing_with_an_unknown_keyword_names_the_field_to_use(keyword, says):
    """``ModelConfig(moe_router_topk=2)`` raised Python's bare "unexpected keyword argument", without the hint
    from_dict, replace and ``--set`` give; still a TypeError, as Python's was."""
    d = ModelConfig.preset("tiny").to_dict()
    del d["schema_version"]
    with pytest.raises(ConfigError, match=rf"^{keyword}: .*{says}") as info:
        ModelConfig(**d, **{keyword: 2})
    assert isinstance(info.value, TypeError) and info.value.field == keyword
    with pytest.raises(ConfigError, match=rf"^{keyword}: .*{says}"):
        dataclasses.replace(ModelConfig.preset("tiny"), **{keyword: 2})


def test_the_keyword_check_keeps_the_dataclass_behaviour():
    config = ModelConfig.preset("tiny")
    assert pickle.loads(pickle.dumps(config)) == config == copy.deepcopy(config) == copy.copy(config)
    assert dataclasses.replace(config, hidden_size=96) == config.replace(hidden_size=96) != config
    assert list(inspect.signature(ModelConfig).parameters) == [f.name for f in dataclasses.fields(ModelConfig)]
    with pytest.raises(TypeError, match="multiple values for argument 'pattern'"):  # Python's own, as before
        ModelConfig("M", 97, 32, pattern="M")
    error = pickle.loads(pickle.dumps(ConfigError("x", "y")))
    assert str(error) == "x: y"


def test_a_config_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """``ModelConfig.from_json`` of a FIFO (``<(...)``, given as a path or a string) blocked forever in its read
    (``convert --from megatron --config`` and a Megatron checkpoint's sidecar read it so)."""
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with fifos_never_read(fifo):  # (a read would hang the suite, not fail the test)
        for given in (fifo, str(fifo)):
            with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(fifo))}: not a regular file$"):
                ModelConfig.from_json(given)


@pytest.mark.parametrize(
    "hf, ours",
    [
        ("num_experts_per_tok", "'moe_top_k'"),  # was "did you mean 'moe_num_experts'?"
        ("num_key_value_heads", "'num_query_groups'"),  # was 'gdn_num_value_heads'
        ("mamba_expand", "'mamba_num_heads'"),  # was 'mamba_head_dim'
        ("hidden_act", "'mlp_activation'"),  # was 'hidden_size'
        ("full_attention_interval", "'pattern'"),  # was 'num_attention_heads'
        ("num_hidden_layers", "'pattern'"),  # was 'ffn_hidden_size'
        ("intermediate_size", "'ffn_hidden_size'"),  # was no hint at all
        ("partial_rotary_factor", "'rotary_percent'"),
        ("attn_layer_period", "'pattern'"),
        ("num_nextn_predict_layers", "'/'"),
    ],
)
def test_a_hugging_face_name_points_at_the_field_that_replaces_it(hf, ours):
    """A Qwen3-Next or Jamba user's config.json names got the closest spelling as a hint, which for these pointed
    at another option (or there was none)."""
    d = ModelConfig.preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="Hugging Face name") as info:
        ModelConfig.from_dict({**d, hf: 2})
    assert info.value.field == hf and ours in str(info.value) and "did you mean" not in str(info.value)
    with pytest.raises(ConfigError, match="Hugging Face name"):
        ModelConfig.preset("tiny").replace(**{hf: 2})


def test_the_hugging_face_names_are_no_field_of_ours():
    from hybridlm.config import HF_NAMES, MEGATRON_NAMES

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert not (set(HF_NAMES) & names) and not (set(HF_NAMES) & set(MEGATRON_NAMES))


def test_attention_output_gate_is_a_bool_read_by_attention_only():
    """Megatron's name (TransformerConfig.attention_output_gate), so no hint is needed for it; a non-bool is
    refused by name, and a pattern without '*' notes it as unused."""
    base = dict(vocab_size=16, hidden_size=16, num_attention_heads=2)
    assert ModelConfig(pattern="*", attention_output_gate=True, **base).attention_output_gate is True
    with pytest.raises(ConfigError, match=r"^attention_output_gate: expected bool, got 1"):
        ModelConfig(pattern="*", attention_output_gate=1, **base)
    assert unused_fields(ModelConfig(pattern="G-", **base), ["attention_output_gate"]) == {
        "attention_output_gate": "the pattern has no attention ('*') layers"
    }


def test_a_shared_expert_gate_without_a_shared_expert_is_refused_where_the_pattern_has_moe():
    """moe_shared_expert_gate scales the shared expert: with none (width 0) it would gate nothing."""
    with pytest.raises(ConfigError, match=r"^moe_shared_expert_gate: .*moe_shared_expert_ffn_hidden_size"):
        ModelConfig.preset("tiny").replace(moe_shared_expert_ffn_hidden_size=0, moe_shared_expert_gate=True)
    with pytest.raises(ConfigError, match=r"^moe_shared_expert_gate: expected bool"):
        ModelConfig.preset("tiny").replace(moe_shared_expert_gate=1)
    config = ModelConfig.preset("tiny", pattern="*-", moe_shared_expert_ffn_hidden_size=0, moe_shared_expert_gate=True)
    assert FIELD_READERS["moe_shared_expert_gate"] == "E" and "moe_shared_expert_gate" in unused_fields(
        config, ["moe_shared_expert_gate"]
    )
    assert ModelConfig.from_dict(ModelConfig.preset("tiny").to_dict() | {"moe_shared_expert_gate": True}) == (
        ModelConfig.preset("tiny", moe_shared_expert_gate=True)
    )
