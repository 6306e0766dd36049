"""The Megatron-core HybridModel adapter: names, packings, refusals, files, and logits through a round trip.

The functional tests rebuild Megatron's own forward math (read from megatron-core 0.19.2) on the
exported tensors and compare it with our layers, so the packings are checked on numbers, not only
on their own inverse.
"""

from __future__ import annotations

import os
import random
import re

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM, ModelConfig, load, save
from hybridlm.checkpoint.megatron import (
    canonical_shapes,
    config_sidecar,
    convert_from_megatron,
    convert_to_megatron,
    from_megatron,
    load_megatron,
    megatron_keys,
    megatron_shapes,
    save_megatron,
    to_megatron,
)
from hybridlm.checkpoint.weights import canonical_state_dict, read_tensors
from hybridlm.errors import CheckpointError
from hybridlm.layers.attention import attention_reference
from hybridlm.layers.gdn import gdn_reference
from hybridlm.layers.mlp import mlp_reference
from hybridlm.ops.conv import causal_conv1d_reference
from hybridlm.ops.gated_delta import gated_delta_rule_reference, l2_normalize
from tests.helpers import MLA_TINY, assert_rel_close, random_config, random_pattern, tiny_config, unfused

# -- helpers ------------------------------------------------------------------------------------------


def random_canonical(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Distinct random values in every canonical tensor (norm weights too, so a swapped norm shows)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in canonical_shapes(config).items()}


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype, k
        assert torch.equal(actual[k], v), k


def float64_model(config: ModelConfig, seed: int = 0) -> HybridLM:
    """A model with random (not unit) norm weights and a nonzero expert bias, in float64."""
    model = HybridLM(config, seed=seed).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))
    return model


ROUND_TRIP_CONFIGS = [
    tiny_config("M*-EG"),
    tiny_config(
        "[M-][*E]G[GE]|M*/[*-]E/[*-]E",
        mlp_activation="swiglu",
        qk_norm=True,
        position_embedding="rope",
        moe_router_expert_bias=True,
        moe_shared_expert_ffn_hidden_size=16,
        gdn_num_value_heads=4,
        gdn_value_head_dim=6,
        tie_embeddings=True,
    ),
    tiny_config("E-/G", mlp_activation="gelu", moe_shared_expert_ffn_hidden_size=16, num_query_groups=4),
    tiny_config("M[*-]/[*E]", attention_output_gate=True, qk_norm=True, position_embedding="rope"),
    tiny_config("[*E]E/E", moe_shared_expert_ffn_hidden_size=16, moe_shared_expert_gate=True),
    *[random_config(random.Random(s), random_pattern(random.Random(100 + s))) for s in range(6)],
    tiny_config("[+-]M[DE]|+/[D-]", **MLA_TINY),
    tiny_config("D-G+", **MLA_TINY, dsa_indexer_use_sparse_loss=True, tie_embeddings=True),
]


# -- 1. export -> import is the identity ----------------------------------------------------------------


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS, ids=lambda c: c.pattern)
def test_round_trip_is_bitwise_identity(config):
    canonical = random_canonical(config)
    state = to_megatron(config, canonical)
    assert list(state) == megatron_keys(config)
    assert {k: tuple(v.shape) for k, v in state.items()} == megatron_shapes(config)
    assert_bitwise_equal(from_megatron(config, state), canonical)


def test_round_trip_keeps_dtypes_and_model_weights():
    config = ROUND_TRIP_CONFIGS[1]
    model = HybridLM(config, seed=5).cast(torch.bfloat16)  # A_log, D, dt_bias and the router stay float32
    canonical = canonical_state_dict(model)
    assert_bitwise_equal(from_megatron(config, to_megatron(config, canonical)), canonical)


def test_brackets_do_not_change_the_megatron_layout():
    config = ROUND_TRIP_CONFIGS[1]
    flat = config.replace(pattern=unfused(config.pattern).replace("|", ""))
    assert megatron_shapes(config) == megatron_shapes(flat)


def test_tied_embeddings_have_no_output_layer():
    keys = megatron_keys(tiny_config("M-", tie_embeddings=True))
    assert "output_layer.weight" not in keys and "embedding.word_embeddings.weight" in keys


def test_mtp_names_and_shapes():
    config = tiny_config("M-/*E/*E", moe_router_expert_bias=True)
    shapes = megatron_shapes(config)
    H = config.hidden_size
    for d in (0, 1):
        p = f"mtp.layers.{d}."
        assert shapes[p + "eh_proj.weight"] == (H, 2 * H)
        assert shapes[p + "enorm.weight"] == shapes[p + "hnorm.weight"] == shapes[p + "final_layernorm.weight"] == (H,)
        assert p + "mtp_model_layer.layers.0.self_attention.linear_qkv.weight" in shapes
        assert shapes[p + "mtp_model_layer.layers.1.mlp.router.expert_bias"] == (config.moe_num_experts,)
        assert p + "mtp_model_layer.layers.1.mlp.experts.linear_fc2.weight3" in shapes
    assert not any(k.startswith("mtp.layers.2.") for k in shapes)


def test_mtp_depth_input_follows_megatron_names():
    """Megatron's MultiTokenPredictionLayer: ``eh_proj(cat[enorm(embedding), hnorm(hidden)])``. enorm and
    hnorm have one shape, so swapped names kept the round trip bitwise and every shape right."""
    from hybridlm.model import MTPDepth

    config = tiny_config("M-/*-")
    canonical = random_canonical(config, seed=3)
    meg = to_megatron(config, canonical)
    depth = MTPDepth(config)
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):  # canonical names, as the model's
        depth.get_parameter(name).data.copy_(canonical[f"mtp.0.{name}"])
    g = torch.Generator().manual_seed(4)
    emb, hidden = (torch.randn(1, 5, config.hidden_size, generator=g) for _ in range(2))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * w

    p = "mtp.layers.0."
    x = torch.cat([rms(emb, meg[p + "enorm.weight"]), rms(hidden, meg[p + "hnorm.weight"])], -1)
    ours = depth.eh_proj(torch.cat([depth.enorm(emb), depth.hnorm(hidden)], -1))
    torch.testing.assert_close(ours, x @ meg[p + "eh_proj.weight"].T, rtol=1e-5, atol=1e-5)


# -- 2. Megatron's unit-test model "M*-" ---------------------------------------------------------------


def test_megatron_unit_test_model_keys_and_shapes():
    # tests/unit_tests/models/test_hybrid_model.py: pattern "M*-", h=256, 4 heads, vocab 100; Mamba
    # defaults d_inner=2h=512 (8 heads x 64), ngroups 8, d_state 128, d_conv 4; ffn 4h.
    config = ModelConfig(pattern="M*-", vocab_size=100, hidden_size=256, num_attention_heads=4)
    m, a, f = "decoder.layers.0.mixer.", "decoder.layers.1.self_attention.", "decoder.layers.2.mlp."
    expected = {
        "embedding.word_embeddings.weight": (100, 256),
        m + "in_proj.weight": (3080, 256),  # 2*512 + 2*8*128 + 8
        m + "in_proj.layer_norm_weight": (256,),
        m + "conv1d_weight": (2560, 1, 4),  # 512 + 2*8*128 channels
        m + "conv1d_bias": (2560,),
        m + "dt_bias": (8,),
        m + "A_log": (8,),
        m + "D": (8,),
        m + "norm.weight": (512,),
        m + "out_proj.weight": (256, 512),
        a + "linear_qkv.weight": (768, 256),
        a + "linear_qkv.layer_norm_weight": (256,),
        a + "linear_proj.weight": (256, 256),
        f + "linear_fc1.weight": (1024, 256),
        f + "linear_fc1.layer_norm_weight": (256,),
        f + "linear_fc2.weight": (256, 1024),
        "decoder.final_norm.weight": (256,),
        "output_layer.weight": (100, 256),
    }
    assert megatron_shapes(config) == expected
    assert set(megatron_keys(config)) == set(expected)
    # Megatron's 1,774,872 parameters (LayerNorm, biases) less the 3,328 norm and linear biases.
    assert sum(torch.Size(s).numel() for s in expected.values()) == 1_774_872 - 3_328


# -- 3. packings checked on numbers against Megatron's forward math ---------------------------------------


def test_linear_qkv_rows_are_grouped_per_query_group():
    config = tiny_config("*", num_attention_heads=4, num_query_groups=2, head_dim=8)
    model = float64_model(config)
    attn = model.blocks["0"].layers[0].mixer
    qkv = to_megatron(config, canonical_state_dict(model))["decoder.layers.0.self_attention.linear_qkv.weight"]
    x = torch.randn(3, 5, config.hidden_size, dtype=torch.float64)
    # Megatron: view the output as (groups, (heads per group + 2) * d), split [q heads of the group, k, v].
    ng, per, d = 2, 2, 8
    q, k, v = (x @ qkv.T).view(3, 5, ng, (per + 2) * d).split([per * d, d, d], dim=-1)
    assert_rel_close(q.reshape(3, 5, -1), attn.q_proj(x), 1e-12, "q")
    assert_rel_close(k.reshape(3, 5, -1), attn.k_proj(x), 1e-12, "k")
    assert_rel_close(v.reshape(3, 5, -1), attn.v_proj(x), 1e-12, "v")
    # And the grouping is not the plain [q; k; v] stacking (which would pass with one group).
    assert not torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))


def test_gated_linear_qkv_puts_each_groups_gate_after_its_queries():
    """megatron-core 0.19's ``get_query_key_value_tensors`` with ``attention_output_gate``: each query group's rows
    are ``[its query heads | their gates | k | v]``; the gate, reshaped to (…, heads, d), multiplies the attention
    output before ``linear_proj``. With 2 groups of 2 heads the order is checked head by head."""
    config = tiny_config("*", num_attention_heads=4, num_query_groups=2, head_dim=8, attention_output_gate=True)
    model = float64_model(config)
    attn = model.blocks["0"].layers[0].mixer
    state = to_megatron(config, canonical_state_dict(model))
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((2 * 4 + 2 * 2) * 8, config.hidden_size)
    x = torch.randn(3, 5, config.hidden_size, dtype=torch.float64)
    ng, per, d = 2, 2, 8
    q, gate, k, v = (x @ qkv.T).view(3, 5, ng, (2 * per + 2) * d).split([per * d, per * d, d, d], dim=-1)
    assert_rel_close(q.reshape(3, 5, -1), attn.q_proj(x), 1e-12, "q")
    assert_rel_close(gate.reshape(3, 5, -1), attn.gate_proj(x), 1e-12, "gate")
    assert_rel_close(k.reshape(3, 5, -1), attn.k_proj(x), 1e-12, "k")
    assert_rel_close(v.reshape(3, 5, -1), attn.v_proj(x), 1e-12, "v")
    # Megatron's attention with these tensors: causal GQA, then x * sigmoid(gate), then linear_proj.
    qh, gh = q.reshape(3, 5, 4, d).transpose(1, 2), gate.reshape(3, 5, 4, d)
    kh, vh = (t.reshape(3, 5, ng, d).transpose(1, 2).repeat_interleave(per, 1) for t in (k, v))
    o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
    theirs = (o * gh.sigmoid()).reshape(3, 5, -1) @ state["decoder.layers.0.self_attention.linear_proj.weight"].T
    assert_rel_close(theirs, attention_reference(attn, x, torch.arange(5).expand(3, 5)), 1e-12, "output")
    assert_bitwise_equal(from_megatron(config, state), canonical_state_dict(model))


def megatron_glu_mlp(fc1: torch.Tensor, fc2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Megatron's gated MLP: ``chunk(fc1(x), 2)`` -> ``silu(first) * second`` -> fc2."""
    gate, up = (x @ fc1.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.T


def test_swiglu_fc1_is_gate_then_up():
    config = tiny_config("-E", mlp_activation="swiglu", moe_shared_expert_ffn_hidden_size=16)
    model = float64_model(config)
    state = to_megatron(config, canonical_state_dict(model))
    x = torch.randn(7, config.hidden_size, dtype=torch.float64)
    mlp = model.blocks["0"].layers[0].mixer
    m = "decoder.layers.0.mlp."
    ours = mlp_reference(mlp, x)
    assert_rel_close(megatron_glu_mlp(state[m + "linear_fc1.weight"], state[m + "linear_fc2.weight"], x), ours, 1e-12)
    moe = model.blocks["1"].layers[0].mixer
    m = "decoder.layers.1.mlp."
    for e in range(config.moe_num_experts):
        ex = moe.experts
        ours = (F.silu(x @ ex.gate_proj[e].T) * (x @ ex.up_proj[e].T)) @ ex.down_proj[e].T
        theirs = megatron_glu_mlp(
            state[f"{m}experts.linear_fc1.weight{e}"], state[f"{m}experts.linear_fc2.weight{e}"], x
        )
        assert_rel_close(theirs, ours, 1e-12, f"expert {e}")
    ours = mlp_reference(moe.shared_experts, x)
    theirs = megatron_glu_mlp(
        state[m + "shared_experts.linear_fc1.weight"], state[m + "shared_experts.linear_fc2.weight"], x
    )
    assert_rel_close(theirs, ours, 1e-12, "shared expert")


def test_the_shared_expert_gate_is_megatrons_gate_weight():
    """megatron-core's SharedExpertMLP (moe_shared_expert_gate): output * sigmoid(linear(x, gate_weight)), with
    gate_weight (1, hidden) beside the shared expert's linear_fc1 / linear_fc2; written out here from the exported
    tensors alone, it is our layer's gated shared expert."""
    config = tiny_config("E", moe_shared_expert_ffn_hidden_size=16, moe_shared_expert_gate=True)
    model = float64_model(config)
    state = to_megatron(config, canonical_state_dict(model))
    m = "decoder.layers.0.mlp.shared_experts."
    assert tuple(state[m + "gate_weight"].shape) == (1, config.hidden_size)
    x = torch.randn(7, config.hidden_size, dtype=torch.float64)
    up = x @ state[m + "linear_fc1.weight"].T
    theirs = (F.relu(up) ** 2 @ state[m + "linear_fc2.weight"].T) * torch.sigmoid(F.linear(x, state[m + "gate_weight"]))
    moe = model.blocks["0"].layers[0].mixer
    assert_rel_close(moe.shared(x), theirs, 1e-12)


def megatron_gdn(state: dict[str, torch.Tensor], prefix: str, c: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """Megatron-core 0.19.2's GatedDeltaNet forward (gated_delta_net/gdn.py + common.py), in float64."""
    nk, nv, dk, dv = c.gdn_num_heads, c.gdn_num_value_heads, c.gdn_head_dim, c.gdn_value_head_dim
    b, L, _ = x.shape
    qkvzba = x @ state[prefix + "in_proj.weight"].T
    qkv, gate, beta, alpha = qkvzba.split([2 * nk * dk + nv * dv, nv * dv, nv, nv], dim=-1)
    qkv = causal_conv1d_reference(qkv, state[prefix + "conv1d.weight"], None, None, "silu")
    qk, v = qkv.split([2 * nk * dk, nv * dv], dim=-1)
    q, k = l2_normalize(qk.reshape(b, L, 2 * nk, dk)).split([nk, nk], dim=2)
    q, k = q.repeat_interleave(nv // nk, dim=2), k.repeat_interleave(nv // nk, dim=2)
    g = -state[prefix + "A_log"].exp() * F.softplus(alpha + state[prefix + "dt_bias"])
    o, _ = gated_delta_rule_reference(q, k, v.reshape(b, L, nv, dv), g, beta.sigmoid())
    w = state[prefix + "out_norm.weight"]  # a TENorm: zero-centred under layernorm_zero_centered_gamma
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + c.norm_eps) * (1 + w if c.norm_zero_centered else w)
    o = o * F.silu(gate.reshape(b, L, nv, dv))
    return o.reshape(b, L, nv * dv) @ state[prefix + "out_proj.weight"].T


def test_gdn_in_proj_matches_megatron_forward():
    config = tiny_config("G", gdn_num_heads=2, gdn_num_value_heads=4, gdn_head_dim=8, gdn_value_head_dim=6)
    model = float64_model(config)
    state = to_megatron(config, canonical_state_dict(model))
    x = torch.randn(2, 9, config.hidden_size, dtype=torch.float64)
    ours = gdn_reference(model.blocks["0"].layers[0].mixer, x)
    assert_rel_close(megatron_gdn(state, "decoder.layers.0.self_attention.", config, x), ours, 1e-10, "GDN")


def test_gdn_out_norm_is_zero_centred_in_megatron_under_the_option():
    """Megatron builds GDN's out_norm as a TENorm, zero-centred under layernorm_zero_centered_gamma like every TE
    norm, where ours stays Qwen3-Next's plain gated norm: its Megatron weight is our scale - 1."""
    config = tiny_config("G", norm_zero_centered=True, gdn_num_heads=2, gdn_num_value_heads=4, gdn_value_head_dim=6)
    model = float64_model(config)
    state = to_megatron(config, canonical_state_dict(model))
    ours = model.blocks["0"].layers[0].mixer
    assert torch.equal(state["decoder.layers.0.self_attention.out_norm.weight"], ours.norm.weight - 1)
    x = torch.randn(2, 9, config.hidden_size, dtype=torch.float64)
    assert_rel_close(megatron_gdn(state, "decoder.layers.0.self_attention.", config, x), gdn_reference(ours, x), 1e-10)


@pytest.mark.parametrize("config", [ROUND_TRIP_CONFIGS[1], ROUND_TRIP_CONFIGS[-1]], ids=lambda c: c.pattern)
def test_zero_centred_norms_map_straight_and_the_plain_ones_shift_by_one(config):
    """Our zero-centred norms store w as Megatron does (renames); GDN's gated norm and the DSA indexer's LayerNorm,
    plain in ours and zero-centred in Megatron, are exported as scale - 1, exactly for a scale in [0.5, 2], so
    export then import is bitwise the identity there."""
    config = config.replace(norm_zero_centered=True)
    canonical = random_canonical(config)
    g = torch.Generator().manual_seed(7)
    plain = [k for k in canonical if k.endswith(("mixer.norm.weight", "indexer.k_norm.weight"))]
    assert plain
    for k in plain:
        canonical[k] = 0.5 + 1.5 * torch.rand(canonical[k].shape, generator=g)
    state = to_megatron(config, canonical)
    assert list(state) == megatron_keys(config)
    assert_bitwise_equal(from_megatron(config, state), canonical)
    plain_off = to_megatron(config.replace(norm_zero_centered=False), canonical)
    shifted = {k for k in state if not torch.equal(state[k], plain_off[k])}
    assert shifted == {k for k in state if k.endswith(("out_norm.weight", "indexer.k_norm.weight"))} != set()
    for k in shifted:
        assert torch.equal(state[k], plain_off[k] - 1), k


def test_mla_and_dsa_names_and_shapes():
    config = tiny_config("+D", **MLA_TINY)
    shapes = megatron_shapes(config)
    H, nh, c = config.hidden_size, config.num_attention_heads, config
    qk, v = c.qk_head_dim + c.qk_pos_emb_head_dim, c.v_head_dim
    for i in (0, 1):
        a = f"decoder.layers.{i}.self_attention."
        assert shapes[f"decoder.layers.{i}.input_layernorm.weight"] == (H,)
        assert shapes[a + "linear_q_down_proj.weight"] == (c.q_lora_rank, H)
        assert shapes[a + "linear_q_up_proj.weight"] == (nh * qk, c.q_lora_rank)
        assert shapes[a + "linear_kv_down_proj.weight"] == (c.kv_lora_rank + c.qk_pos_emb_head_dim, H)
        assert shapes[a + "linear_kv_up_proj.weight"] == (nh * (c.qk_head_dim + v), c.kv_lora_rank)
        assert shapes[a + "linear_proj.weight"] == (H, nh * v)
    # MLA fuses its latent norms into the up projections (Transformer Engine); DSA cannot.
    a = "decoder.layers.0.self_attention."
    assert shapes[a + "linear_q_up_proj.layer_norm_weight"] == (c.q_lora_rank,)
    assert shapes[a + "linear_kv_up_proj.layer_norm_weight"] == (c.kv_lora_rank,)
    a = "decoder.layers.1.self_attention."
    assert shapes[a + "q_layernorm.weight"] == (c.q_lora_rank,) and shapes[a + "kv_layernorm.weight"] == (
        c.kv_lora_rank,
    )
    ix, n, d = a + "core_attention.indexer.", c.dsa_indexer_n_heads, c.dsa_indexer_head_dim
    assert shapes[ix + "linear_wq_b.weight"] == (n * d, c.q_lora_rank)
    assert shapes[ix + "linear_wk.weight"] == (d, H)
    assert shapes[ix + "k_norm.weight"] == shapes[ix + "k_norm.bias"] == (d,)
    assert shapes[ix + "linear_weights_proj.weight"] == (n, H)
    assert not any("indexer" in k for k in shapes if k.startswith("decoder.layers.0."))


def test_mla_without_q_compression_is_refused_for_megatron():
    with pytest.raises(CheckpointError, match=r"q_lora_rank.*linear_q_proj"):
        megatron_keys(tiny_config("M+", **{**MLA_TINY, "q_lora_rank": None}))


def megatron_mla(state: dict[str, torch.Tensor], layer: str, config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """``input_layernorm`` + MLASelfAttention of megatron-core 0.19.2 (rope_type "rope", no YaRN) on plain tensors:
    ``get_query_key_value_tensors`` (splits, ``mla_rotary_interleaved`` RoPE), causal softmax, ``linear_proj``."""
    c, a = config, layer + "self_attention."
    nh, dn, dr, dv, kvr = c.num_attention_heads, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim, c.kv_lora_rank
    b, L, _ = x.shape

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    h = rms(x, state[layer + "input_layernorm.weight"])
    q_c = rms(h @ state[a + "linear_q_down_proj.weight"].T, state[a + "linear_q_up_proj.layer_norm_weight"])
    q = (q_c @ state[a + "linear_q_up_proj.weight"].T).view(b, L, nh, dn + dr)
    kv_c, k_pos = (h @ state[a + "linear_kv_down_proj.weight"].T).split([kvr, dr], dim=-1)
    kv_c = rms(kv_c, state[a + "linear_kv_up_proj.layer_norm_weight"])
    k_nope, value = (kv_c @ state[a + "linear_kv_up_proj.weight"].T).view(b, L, nh, dn + dv).split([dn, dv], -1)
    inv = 1.0 / c.rope_theta ** (torch.arange(0, dr, 2, dtype=torch.float64) / dr)
    freqs = torch.arange(L, dtype=torch.float64)[:, None] * inv
    freqs = torch.cat([freqs, freqs], -1)[None, :, None]  # RotaryEmbedding's [f, f] layout

    def rope(t):  # _apply_rotary_pos_emb_bshd with mla_rotary_interleaved=True
        t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)
        half = torch.cat([-t[..., dr // 2 :], t[..., : dr // 2]], dim=-1)
        return t * freqs.cos() + half * freqs.sin()

    query = torch.cat([q[..., :dn], rope(q[..., dn:])], -1)
    key = torch.cat([k_nope, rope(k_pos.unsqueeze(2)).expand(b, L, nh, dr)], -1)
    scores = torch.einsum("bthd,bshd->bhts", query, key) / (dn + dr) ** 0.5
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), value).reshape(b, L, nh * dv)
    return o @ state[a + "linear_proj.weight"].T


def megatron_dsa_index_scores(state: dict[str, torch.Tensor], layer: str, config: ModelConfig, x: torch.Tensor):
    """DSAIndexer.forward_before_topk + _compute_index_scores of megatron-core 0.19.2 (RoPE not interleaved,
    ReLU scoring; the Hadamard rotation is orthogonal and left out) -> (B, L, L) before masking."""
    c, a = config, layer + "self_attention."
    ix, n, d, dr = a + "core_attention.indexer.", c.dsa_indexer_n_heads, c.dsa_indexer_head_dim, c.qk_pos_emb_head_dim
    b, L, _ = x.shape
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * state[layer + "input_layernorm.weight"]
    qr = h @ state[a + "linear_q_down_proj.weight"].T
    qr = qr * torch.rsqrt(qr.pow(2).mean(-1, keepdim=True) + c.norm_eps) * state[a + "q_layernorm.weight"]
    inv = 1.0 / c.rope_theta ** (torch.arange(0, dr, 2, dtype=torch.float64) / dr)
    freqs = torch.arange(L, dtype=torch.float64)[:, None] * inv
    freqs = torch.cat([freqs, freqs], -1)[None, :, None]

    def rope(t):  # x_pe first, x_nope after
        pe, nope = t[..., :dr], t[..., dr:]
        half = torch.cat([-pe[..., dr // 2 :], pe[..., : dr // 2]], dim=-1)
        return torch.cat([pe * freqs.cos() + half * freqs.sin(), nope], -1)

    q = rope((qr @ state[ix + "linear_wq_b.weight"].T).view(b, L, n, d))
    k = F.layer_norm(
        h @ state[ix + "linear_wk.weight"].T, (d,), state[ix + "k_norm.weight"], state[ix + "k_norm.bias"], c.norm_eps
    )
    k = rope(k.unsqueeze(2)).squeeze(2)
    w = (h @ state[ix + "linear_weights_proj.weight"].T) * n**-0.5 * d**-0.5
    return (torch.einsum("bthd,bsd->bths", q, k).relu() * w.unsqueeze(-1)).sum(2)


def test_mla_and_dsa_indexer_match_megatron_forward():
    config = tiny_config("+D", **MLA_TINY)
    model = float64_model(config)
    state = to_megatron(config, canonical_state_dict(model))
    x = torch.randn(2, 9, config.hidden_size, dtype=torch.float64)
    ctx = model.make_context(2, 9, x.device)
    mla, dsa = model.blocks["0"].layers[0], model.blocks["1"].layers[0]
    # Our RoPE angles and the indexer run in float32 by design, hence float32-level tolerances.
    with torch.no_grad():
        ours = mla.mixer(mla.norm(x), ctx)
        assert_rel_close(megatron_mla(state, "decoder.layers.0.", config, x), ours, 1e-6, "MLA")
        h = dsa.norm(x)
        _, _, _, c_q = dsa.mixer.qkv(h, ctx.position_ids)
        ours, _ = dsa.mixer.select(h, c_q, ctx.position_ids, torch.ones(1, 9, 9, dtype=torch.bool))
    assert_rel_close(megatron_dsa_index_scores(state, "decoder.layers.1.", config, x), ours, 1e-6, "DSA indexer")


# -- 4. refusals, aliases and files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_config() -> ModelConfig:
    return tiny_config("M*E", moe_router_expert_bias=True)


@pytest.fixture
def moe_state(moe_config) -> dict[str, torch.Tensor]:
    return to_megatron(moe_config, random_canonical(moe_config))


def test_missing_key_is_refused_by_name(moe_config, moe_state):
    del moe_state["decoder.layers.2.mlp.router.expert_bias"]
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): decoder\.layers\.2\.mlp\.router\.expert_bias"):
        from_megatron(moe_config, moe_state)


def test_unexpected_key_is_refused_by_name_with_a_hint(moe_config, moe_state):
    moe_state["decoder.layers.1.self_attention.linear_qkv.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"(?s)unexpected tensors \(1\): .*linear_qkv\.bias.*disable-bias-linear"):
        from_megatron(moe_config, moe_state)


def test_wrong_shape_is_refused_by_name(moe_config, moe_state):
    name = "decoder.layers.0.mixer.conv1d_weight"
    moe_state[name] = moe_state[name][:, :, :3]
    with pytest.raises(CheckpointError, match=re.escape(name) + r": Megatron state dict has \(\d+, 1, 3\)"):
        from_megatron(moe_config, moe_state)


def test_all_problems_are_listed_together(moe_config, moe_state):
    del moe_state["output_layer.weight"]
    moe_state["decoder.final_norm.bias"] = torch.zeros(1)
    moe_state["embedding.word_embeddings.weight"] = torch.zeros(1, 1)
    with pytest.raises(CheckpointError) as e:
        from_megatron(moe_config, moe_state)
    for name in ("output_layer.weight", "decoder.final_norm.bias", "embedding.word_embeddings.weight", "RMSNorm"):
        assert name in str(e.value)


def test_a_padded_vocabulary_is_named_with_a_hint(moe_config, moe_state):
    """Megatron pads the vocabulary (a multiple of 128 by default): the refusal said only "has (128, 32), expected
    (97, 32)", not why or what to give."""
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        moe_state[name] = torch.cat([moe_state[name], torch.zeros(128 - moe_config.vocab_size, moe_config.hidden_size)])
    with pytest.raises(CheckpointError, match=r"hint: a vocabulary padded to 128 rows .*vocab_size=128, or drop the"):
        from_megatron(moe_config, moe_state)
    padded = from_megatron(moe_config.replace(vocab_size=128), moe_state)  # what the hint says works
    assert torch.equal(padded["embeddings.weight"], moe_state["embedding.word_embeddings.weight"])


def test_incomplete_canonical_state_is_refused(moe_config):
    canonical = random_canonical(moe_config)
    del canonical["layers.1.mixer.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.1\.mixer\.k_proj\.weight"):
        to_megatron(moe_config, canonical)


def test_extra_state_and_old_names_are_accepted(moe_config, moe_state):
    expected = from_megatron(moe_config, moe_state)
    old = {}
    for k, v in moe_state.items():
        k = k.replace("mixer.conv1d_weight", "mixer.conv1d.weight").replace("mixer.conv1d_bias", "mixer.conv1d.bias")
        k = re.sub(r"experts\.(linear_fc[12])\.weight(\d+)$", r"experts.local_experts.\2.\1.weight", k)
        old[k] = v
    assert "decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight" in old
    old["decoder.layers.0.mixer.in_proj._extra_state"] = torch.zeros(0, dtype=torch.uint8)
    old["decoder.layers.2.mlp.experts.linear_fc1._extra_state0"] = torch.zeros(0, dtype=torch.uint8)
    assert_bitwise_equal(from_megatron(moe_config, old), expected)


def test_transformer_engine_extra_state_as_bytes_io_loads(tmp_path, moe_config, moe_state):
    """Transformer Engine pickles a module's _extra_state as an io.BytesIO (empty: as bytes); the safe
    unpickler may build those, and they are ignored like every _extra_state."""
    import io

    for extra in (io.BytesIO(), io.BytesIO(b"fp8 meta")):
        torch.save({"model": {**moe_state, "decoder.layers.0.mixer.in_proj._extra_state": extra}}, tmp_path / "te.pt")
        assert_bitwise_equal(
            from_megatron(moe_config, load_megatron(tmp_path / "te.pt")), from_megatron(moe_config, moe_state)
        )


def test_old_and_new_name_of_one_tensor_is_refused(moe_config, moe_state):
    moe_state["decoder.layers.0.mixer.conv1d.bias"] = moe_state["decoder.layers.0.mixer.conv1d_bias"]
    with pytest.raises(CheckpointError, match=r"both .*conv1d"):
        from_megatron(moe_config, moe_state)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, moe_state, suffix):
    path = save_megatron(moe_state, tmp_path / f"sub/model{suffix}")
    assert_bitwise_equal(load_megatron(path), moe_state)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    if suffix == ".pt":
        assert set(torch.load(path, weights_only=True)) == {"model"}


def test_load_accepts_a_bare_or_wrapped_state_dict(tmp_path, moe_state):
    torch.save(moe_state, tmp_path / "bare.pt")
    assert_bitwise_equal(load_megatron(tmp_path / "bare.pt"), moe_state)
    torch.save({"model": moe_state, "iteration": 7, "checkpoint_version": 3.0}, tmp_path / "wrapped.pt")
    assert_bitwise_equal(load_megatron(tmp_path / "wrapped.pt"), moe_state)


def test_pt_files_are_memory_mapped_and_legacy_ones_still_load(tmp_path, moe_state, monkeypatch):
    """A .pt read whole was a private copy of every weight in RAM (convert --from megatron peaked at 1.8 GB anonymous
    memory for a 1.5 GB file; mapped: 0.4 GB, the rest page cache the system can drop). The legacy (non-zip) format,
    which mmap refuses, is still read."""
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("mmap")) or load(*a, **kw))
    torch.save({"model": moe_state}, tmp_path / "zip.pt")
    torch.save({"model": moe_state}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert_bitwise_equal(load_megatron(tmp_path / name), moe_state)
    assert calls == [True, False]


def test_renamed_tensors_read_from_a_file_are_not_copied(tmp_path, moe_config):
    """safetensors reads each tensor as a view of the file's memory map, and ``apply`` cloned every view: a
    conversion held a second, private copy of the whole checkpoint (convert --to megatron of a 1.5 GB checkpoint:
    1.63 GB anonymous memory, now 0.37). A rename passes the file's tensor through; a block of rows owns its own."""
    save(HybridLM(moe_config), tmp_path / "ckpt")
    canonical = read_tensors(tmp_path / "ckpt")
    assert canonical["embeddings.weight"]._base is not None  # what made apply clone it
    out = to_megatron(moe_config, canonical)
    assert out["embedding.word_embeddings.weight"] is canonical["embeddings.weight"]
    assert out["decoder.layers.0.mixer.in_proj.weight"] is canonical["layers.0.mixer.in_proj.weight"]
    back = from_megatron(moe_config, out)
    assert back["layers.0.mixer.in_proj.weight"] is canonical["layers.0.mixer.in_proj.weight"]
    q = back["layers.1.mixer.q_proj.weight"]  # a block of linear_qkv's rows: its own memory
    assert q._base is None and q.untyped_storage().nbytes() == q.nbytes
    assert_bitwise_equal(back, canonical)
    # A view of part of a larger tensor is still copied: torch.save would write all of that tensor.
    emb = canonical["embeddings.weight"]
    canonical["embeddings.weight"] = torch.cat([emb, emb])[: len(emb)]
    out = to_megatron(moe_config, canonical)["embedding.word_embeddings.weight"]
    assert out._base is None and out.untyped_storage().nbytes() == out.nbytes


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("junk.pt", b"not a pickle at all", "cannot read as a torch.save file"),
        ("junk.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "cannot read safetensors file"),
        ("empty.safetensors", b"", "cannot read safetensors file"),
    ],
)
def test_corrupt_files_are_refused(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_megatron(tmp_path / name)


def test_truncated_file_is_refused(tmp_path, moe_state):
    path = save_megatron(moe_state, tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_megatron(path)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([torch.zeros(1)], "expected a state dict"),
        ({"model": {"a": torch.zeros(1), "b": 3}}, "not tensors: 'b' (int)"),
        ({"model0": {}, "model1": {}}, "virtual pipeline stage"),
    ],
)
def test_pt_files_that_hold_no_state_dict_are_refused(tmp_path, obj, message):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_megatron(tmp_path / "x.pt")


def test_virtual_pipeline_stages_are_named_without_the_other_entries(tmp_path, moe_state):
    """Megatron's own entries beside model0, model1 (iteration, checkpoint_version) were listed as stages too."""
    torch.save({"model0": moe_state, "model1": moe_state, "iteration": 7, "checkpoint_version": 3.0}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=re.escape("one model per virtual pipeline stage (model0, model1);")):
        load_megatron(tmp_path / "x.pt")


def test_from_megatron_refuses_entries_that_are_not_tensors_by_name(moe_config, moe_state, tmp_path):
    """from_megatron(config, torch.load("model.pt")) on a file's {"model": state_dict} crashed with
    "AttributeError: 'dict' object has no attribute 'shape'"; an _extra_state may still hold anything."""
    path = save_megatron(moe_state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"not tensors: 'model' \(dict\) \(load_megatron reads"):
        from_megatron(moe_config, torch.load(path, weights_only=True))
    with pytest.raises(CheckpointError, match=r"not tensors: 0 \(Tensor\)"):
        from_megatron(moe_config, {**moe_state, 0: torch.zeros(1)})
    extra = {**moe_state, "decoder.layers.0.mixer.in_proj._extra_state": None}
    assert_bitwise_equal(from_megatron(moe_config, extra), from_megatron(moe_config, moe_state))


def test_bad_paths_are_refused(tmp_path, moe_state):
    with pytest.raises(CheckpointError, match=r"\.pt or \.safetensors"):
        save_megatron(moe_state, tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="no such file"):
        load_megatron(tmp_path / "absent.pt")
    (tmp_path / "folder.pt").mkdir()  # there, but no file: not "no such file"
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'folder.pt'}: not a file")):
        load_megatron(tmp_path / "folder.pt")


def test_convert_from_megatron_needs_a_config(tmp_path, moe_state):
    path = save_megatron(moe_state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=re.escape(str(config_sidecar(path)))):
        convert_from_megatron(path, tmp_path / "out")


def test_convert_from_megatron_refuses_an_invalid_sidecar_config_by_name(tmp_path, moe_state):
    path = save_megatron(moe_state, tmp_path / "model.pt")
    config_sidecar(path).write_text('{"pattern": "M-", "vocab_size": 0}')
    with pytest.raises(CheckpointError, match=re.escape(f"{config_sidecar(path)}: invalid model config")):
        convert_from_megatron(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_convert_from_megatron_refuses_a_sidecar_that_is_no_regular_file_as_such(tmp_path, moe_state):
    """A FIFO (or a folder) at the sidecar's name was called absent: "place it at <that very name>"."""
    path = save_megatron(moe_state, tmp_path / "model.pt")
    os.mkfifo(config_sidecar(path))
    with pytest.raises(CheckpointError) as err:
        convert_from_megatron(path, tmp_path / "out")
    assert f"{config_sidecar(path)}: invalid model config" in str(err.value)
    assert "not a regular file" in str(err.value) and "place it at" not in str(err.value)
    assert not (tmp_path / "out").exists()


# -- 5. through files, logits unchanged ----------------------------------------------------------------


def test_convert_round_trip_reproduces_logits(tmp_path):
    config = tiny_config(
        "[M-]*E[G-]/[*E]",
        mlp_activation="swiglu",
        qk_norm=True,
        moe_router_expert_bias=True,
        moe_shared_expert_ffn_hidden_size=16,
        gdn_num_value_heads=4,
    )
    model = float64_model(config, seed=3).to(torch.float32).eval()
    save(model, tmp_path / "ours")
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)

    dst = convert_to_megatron(tmp_path / "ours", tmp_path / "megatron.pt")
    assert ModelConfig.from_json(config_sidecar(dst)) == config
    back = convert_from_megatron(dst, tmp_path / "back")  # config from the sidecar
    loaded = load(back).eval()
    with torch.no_grad():
        out = loaded(ids)
    assert torch.equal(out.logits, expected.logits)
    assert len(out.mtp_logits) == 1 and torch.equal(out.mtp_logits[0], expected.mtp_logits[0])

    # The safetensors path, with the config passed explicitly and another fusion of the same model.
    dst = convert_to_megatron(tmp_path / "ours", tmp_path / "megatron.safetensors")
    flat = config.replace(pattern=unfused(config.pattern))
    back = convert_from_megatron(dst, tmp_path / "back-flat", config=flat)
    assert_bitwise_equal(read_tensors(back), read_tensors(tmp_path / "ours"))


def test_a_checkpoint_whose_config_and_weights_disagree_is_named(tmp_path):
    """convert --to megatron said only "canonical state dict does not fit the model", naming no folder."""
    import json

    ck = save(HybridLM(tiny_config("M-*-")), tmp_path / "ck")
    meta = json.loads((ck / "config.json").read_text())
    meta["config"]["hidden_size"] = 64
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(ck))}: canonical state dict does not fit the model"):
        convert_to_megatron(ck, tmp_path / "m.pt")


def test_convert_from_megatron_names_the_file_and_the_config_that_disagree(tmp_path, moe_config, moe_state):
    """A file beside a stale sidecar (or read with the wrong --config) was refused as "Megatron state dict does not
    fit the model", naming neither the file nor where its config came from."""
    path = save_megatron(moe_state, tmp_path / "model.pt", tiny_config("M*-"))
    with pytest.raises(CheckpointError) as err:
        convert_from_megatron(path, tmp_path / "out")
    assert str(err.value).startswith(
        f"{path} (read with the model config of {config_sidecar(path)}): Megatron state dict does not fit the model"
    )
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} \(read with the model config given\): "):
        convert_from_megatron(path, tmp_path / "out", tiny_config("M*-"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pattern", ["M-*-", "*-/M-"])  # MTP depths are exported too: their Mamba layers count
def test_export_warns_of_mamba_options_megatron_does_not_compute(tmp_path, caplog, pattern):
    """A dt clamp (every import of a Nemotron-H has one) or another gated-norm eps was exported without a word."""
    ck = save(HybridLM(tiny_config(pattern, mamba_dt_clamp_min=0.001, norm_eps=1e-6)), tmp_path / "ck")
    with caplog.at_level("WARNING", logger="hybridlm.checkpoint.megatron"):
        convert_to_megatron(ck, tmp_path / "m.pt")
    assert "mamba_dt_clamp_min=0.001 (Megatron does not clamp dt)" in caplog.text
    assert "norm_eps=1e-06 (Megatron's Mamba gated norm uses 1e-5)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hybridlm.checkpoint.megatron"):
        convert_to_megatron(save(HybridLM(tiny_config("M-*-")), tmp_path / "plain"), tmp_path / "p.pt")
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("pattern", "options", "warned"),
    [
        ("-E", dict(moe_router_score="sigmoid", moe_norm_topk_prob=False), "moe_norm_topk_prob=False with moe_top_k=2"),
        ("*-/E", dict(moe_router_expert_bias=True), "moe_router_expert_bias with softmax scores"),  # MTP-only E
        ("-E", dict(moe_top_k=1), "moe_norm_topk_prob=True with moe_top_k=1"),
        (
            "-E",
            dict(moe_router_score="sigmoid", moe_num_groups=2, moe_topk_groups=2),
            "moe_num_groups=2 (Megatron scores an expert group by its best top_k // topk_groups = 1 scores",
        ),
        ("-E", dict(moe_num_groups=2, moe_topk_groups=1), "top_k // topk_groups = 2 logits, hybridlm by its best 2"),
        # What Megatron computes too: softmax (pre-softmax when unnormalized), DeepSeek-V3-style sigmoid routing.
        ("-E", dict(moe_norm_topk_prob=False, moe_num_groups=2, moe_topk_groups=1), None),
        (
            "-E",
            dict(moe_router_score="sigmoid", moe_router_expert_bias=True, moe_num_groups=2, moe_topk_groups=1),
            None,
        ),
        ("-E", dict(moe_router_score="sigmoid", moe_norm_topk_prob=False, moe_top_k=1), None),
    ],
)
def test_export_warns_of_moe_routing_megatron_does_not_compute(tmp_path, caplog, pattern, options, warned):
    """An expert bias under softmax (which Megatron refuses), unnormalized sigmoid weights (which it always
    normalizes) or another expert-group score (its best top_k // topk_groups) were exported without a word."""
    ck = save(HybridLM(tiny_config(pattern, **options)), tmp_path / "ck")
    with caplog.at_level("WARNING", logger="hybridlm.checkpoint.megatron"):
        convert_to_megatron(ck, tmp_path / "m.pt")
    if warned is None:
        assert caplog.text == ""
    else:
        assert "Megatron-core routes its MoE layers otherwise" in caplog.text and warned in caplog.text


def test_convert_from_megatron_without_a_config_says_what_to_pass(tmp_path, moe_state):
    """No sidecar and no config: the refusal says that the architecture is missing, not that a config is invalid."""
    path = save_megatron(moe_state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as err:
        convert_from_megatron(path, tmp_path / "out")
    assert "does not describe its architecture; pass the model config" in str(err.value)
    assert "invalid model config" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_convert_from_megatron_checks_its_config_before_reading_the_weights(tmp_path, moe_state, monkeypatch):
    """A missing or invalid sidecar config was refused only after the whole weights file (often many GB) was read."""
    path = save_megatron(moe_state, tmp_path / "model.pt")

    def no_read(*args, **kwargs):
        raise AssertionError("the weights were read before the config was checked")

    monkeypatch.setattr(torch, "load", no_read)
    with pytest.raises(CheckpointError, match="does not describe its architecture"):
        convert_from_megatron(path, tmp_path / "out")
    config_sidecar(path).write_text('{"pattern": "M-", "vocab_size": 0}')
    with pytest.raises(CheckpointError, match="invalid model config"):
        convert_from_megatron(path, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such file"):  # a missing file is still named as such
        convert_from_megatron(tmp_path / "absent.pt", tmp_path / "out")


def test_hints_come_from_the_unexpected_names_only(moe_state, moe_config):
    """DSA's indexer key norm is a LayerNorm with a bias, a tensor of the model: a refusal for another reason
    gives no "LayerNorm" hint; an unexpected grouped expert bias (``linear_fc1.bias3``) gives the bias hint."""
    config = tiny_config("D-", **MLA_TINY)
    state = to_megatron(config, random_canonical(config))
    assert "decoder.layers.0.self_attention.core_attention.indexer.k_norm.bias" in state
    del state["decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(CheckpointError) as err:
        from_megatron(config, state)
    assert "missing tensors (1): decoder.layers.1.mlp.linear_fc2.weight" in str(err.value)
    assert "hint:" not in str(err.value)
    moe_state["decoder.layers.2.mlp.experts.linear_fc1.bias3"] = torch.zeros(24)
    with pytest.raises(CheckpointError, match=r"hint: linear biases: the Megatron model was trained without"):
        from_megatron(moe_config, moe_state)


def test_a_tensor_that_is_not_floating_point_is_refused_by_the_name_given(moe_config, moe_state):
    """One rule and one line (``checkpoint.io.not_floating``) for a load, an inspect and both imports; the name is
    the one given (here megatron-core's older conv1d name), not the alias it stands for."""
    weight = moe_state.pop("decoder.layers.0.mixer.conv1d_weight")
    moe_state["decoder.layers.0.mixer.conv1d.weight"] = weight.to(torch.int64)
    with pytest.raises(CheckpointError) as err:
        from_megatron(moe_config, moe_state)
    assert (
        str(err.value) == "Megatron state dict: not floating point: decoder.layers.0.mixer.conv1d.weight (torch.int64)"
    )


@pytest.mark.parametrize("odd", ["meta", "sparse"])
def test_a_tensor_without_dense_data_is_refused_by_name(moe_config, moe_state, odd):
    """A torch.save file may hold a meta tensor (a model saved before its weights existed) or a sparse one: they
    failed deep inside torch ("unexpected NotImplementedError: Cannot copy out of meta tensor; no data!")."""
    name = next(k for k in moe_state if "word_embeddings" in k)
    t = moe_state[name]
    moe_state[name] = t.to("meta") if odd == "meta" else t.to_sparse()
    shown = "a meta tensor" if odd == "meta" else "torch.sparse_coo"
    with pytest.raises(
        CheckpointError, match=re.escape(f"weights must be dense tensors with data, not: {name} ({shown})")
    ):
        from_megatron(moe_config, moe_state)


def test_renamed_tensors_carry_the_values_of_their_own_names():
    """Tensors that only change name hold the canonical tensor of that name. Mamba's dt_bias, A_log and D (and
    GDN's dt_bias and A_log) share one shape, so a swap passed every shape check and the round trip."""
    config = tiny_config("M*-G")
    canonical = random_canonical(config)
    state = to_megatron(config, canonical)
    m, a, f, g = (
        f"decoder.layers.{i}.{n}." for i, n in enumerate(("mixer", "self_attention", "mlp", "self_attention"))
    )
    pairs = {m + n: f"layers.0.mixer.{n}" for n in ("dt_bias", "A_log", "D", "in_proj.weight", "norm.weight")}
    pairs |= {m + "out_proj.weight": "layers.0.mixer.out_proj.weight", m + "conv1d_bias": "layers.0.mixer.conv1d.bias"}
    pairs |= {
        m + "conv1d_weight": "layers.0.mixer.conv1d.weight",
        m + "in_proj.layer_norm_weight": "layers.0.norm.weight",
    }
    pairs |= {
        a + "linear_proj.weight": "layers.1.mixer.o_proj.weight",
        a + "linear_qkv.layer_norm_weight": "layers.1.norm.weight",
    }
    pairs |= {
        f + "linear_fc2.weight": "layers.2.mixer.down_proj.weight",
        f + "linear_fc1.weight": "layers.2.mixer.up_proj.weight",
    }
    pairs |= {
        f + "linear_fc1.layer_norm_weight": "layers.2.norm.weight",
        g + "in_proj.layer_norm_weight": "layers.3.norm.weight",
    }
    pairs |= {g + n: f"layers.3.mixer.{n}" for n in ("dt_bias", "A_log", "conv1d.weight", "out_proj.weight")}
    pairs |= {g + "out_norm.weight": "layers.3.mixer.norm.weight", "decoder.final_norm.weight": "norm_f.weight"}
    for theirs, ours in pairs.items():
        assert torch.equal(state[theirs].reshape(canonical[ours].shape), canonical[ours]), (theirs, ours)


def test_no_padded_vocabulary_hint_for_an_embedding_of_another_hidden_size(moe_config, moe_state):
    """More rows and another width is another model, not a padded vocabulary: vocab_size=128 would not fit either."""
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        moe_state[name] = torch.zeros(128, 2 * moe_config.hidden_size)
    with pytest.raises(CheckpointError, match=r"embedding\.word_embeddings\.weight") as info:
        from_megatron(moe_config, moe_state)
    assert "padded" not in str(info.value)


def test_export_takes_groups_of_one_expert_as_megatron_scores_them(tmp_path, caplog):
    """4 experts in 4 groups: hybridlm scores a group by its best min(2, 1) = 1 score, as Megatron's top_k //
    topk_groups = 1 does: nothing to warn of."""
    options = dict(moe_router_score="sigmoid", moe_num_experts=4, moe_num_groups=4, moe_topk_groups=2)
    ck = save(HybridLM(tiny_config("-E", **options)), tmp_path / "ck")
    with caplog.at_level("WARNING", logger="hybridlm.checkpoint.megatron"):
        convert_to_megatron(ck, tmp_path / "m.pt")
    assert caplog.text == ""


def test_an_embedding_of_one_dimension_is_refused_by_its_shape(moe_config, moe_state):
    """The padded-vocabulary hint reads two dimensions: a 1-D embedding is named as mis-shaped, not an IndexError."""
    moe_state["embedding.word_embeddings.weight"] = torch.zeros(128)
    with pytest.raises(CheckpointError, match=r"embedding\.word_embeddings\.weight") as info:
        from_megatron(moe_config, moe_state)
    assert "padded" not in str(info.value)


def test_a_safetensors_export_says_it_holds_pytorch_tensors_and_takes_any_strides(tmp_path):
    """``{"format": "pt"}`` is the metadata Hugging Face's loaders look for; a transposed (non-contiguous)
    tensor, which safetensors refuses, is written as its values."""
    from safetensors import safe_open

    w = torch.arange(6.0).view(2, 3)
    path = save_megatron({"w": w.t()}, tmp_path / "m.safetensors")
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert torch.equal(load_megatron(path)["w"], w.t())


def test_load_megatron_returns_tensors_only_and_reads_a_tensor_named_model_as_a_bare_entry(tmp_path, moe_state):
    """Transformer Engine's ``_extra_state`` entries (a BytesIO each) are left out of what ``load_megatron`` returns;
    a bare state dict whose entry "model" is a tensor is no ``{"model": state_dict}`` wrapper."""
    import io

    torch.save(
        {"model": {**moe_state, "decoder.layers.0.mixer.in_proj._extra_state": io.BytesIO(b"fp8")}}, tmp_path / "te.pt"
    )
    assert set(load_megatron(tmp_path / "te.pt")) == set(moe_state)
    torch.save({"model": torch.ones(2), "w": torch.zeros(3)}, tmp_path / "bare.pt")
    assert sorted(load_megatron(tmp_path / "bare.pt")) == ["model", "w"]


def test_export_of_a_model_without_mamba_layers_says_nothing_of_the_mamba_norm_eps(tmp_path, caplog):
    """``norm_eps`` differs from Megatron's only in its Mamba gated norm: a model without one exports silently."""
    ck = save(HybridLM(tiny_config("*-", norm_eps=1e-6, mamba_dt_clamp_min=0.001)), tmp_path / "ck")
    with caplog.at_level("WARNING", logger="hybridlm.checkpoint.megatron"):
        convert_to_megatron(ck, tmp_path / "m.pt")
    assert caplog.text == ""


def test_convert_to_megatron_reads_a_damaged_checkpoint_only_unverified(tmp_path):
    ck = save(HybridLM(tiny_config("M*-"), seed=0), tmp_path / "ck")
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last weight: the file still parses
    (ck / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        convert_to_megatron(ck, tmp_path / "m.pt")
    assert convert_to_megatron(ck, tmp_path / "m.pt", verify=False).is_file()


def test_a_config_given_to_convert_from_megatron_wins_over_the_sidecar(tmp_path, moe_config, moe_state):
    path = save_megatron(moe_state, tmp_path / "model.pt")
    config_sidecar(path).write_text('{"pattern": "M-", "vocab_size": 0}')  # invalid: it must not be read
    out = convert_from_megatron(path, tmp_path / "out", moe_config)
    assert_bitwise_equal(read_tensors(out), from_megatron(moe_config, moe_state))


def test_a_head_or_mtp_depths_the_config_lacks_say_which_setting_to_give():
    """A Megatron model trained with its command line's default tied output layer (or another number of MTP
    depths) was refused listing tensors, without saying that tie_embeddings or the pattern's '/' parts decide."""
    untied = tiny_config("M*-/*-")
    state = to_megatron(untied, random_canonical(untied))
    tied_state = {k: v for k, v in state.items() if k != "output_layer.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): output_layer\.weight(?s:.*)tie_embeddings=true"):
        from_megatron(untied, tied_state)
    with pytest.raises(
        CheckpointError, match=r"unexpected tensors \(1\): output_layer\.weight(?s:.*)tie_embeddings=false"
    ):
        from_megatron(untied.replace(tie_embeddings=True), state)
    for pattern, depths in (("M*-", 0), ("M*-/*-/*-", 2)):
        with pytest.raises(CheckpointError, match=rf"holds 1 MTP depth\(s\) where the config's pattern has {depths}"):
            from_megatron(untied.replace(pattern=pattern), state)
    # A pipeline stage's file (no embedding) gets no such hint: its head and depths are on another stage.
    stage = {k: v for k, v in tied_state.items() if not k.startswith(("embedding.", "mtp."))}
    with pytest.raises(CheckpointError) as err:
        from_megatron(untied, stage)
    assert "hint" not in str(err.value)


def test_a_wrapped_models_state_dict_is_named_as_such(moe_config, moe_state):
    """`torch.save(model.state_dict())` of a DDP / Float16Module-wrapped Megatron model (names under 'module.')
    was refused listing every tensor as missing and unexpected, with nothing to say why."""
    wrapped = {f"module.module.{k}": v for k, v in moe_state.items()}
    with pytest.raises(CheckpointError, match=r"hint: names under 'module\.': the state dict of a wrapped model"):
        from_megatron(moe_config, wrapped)
