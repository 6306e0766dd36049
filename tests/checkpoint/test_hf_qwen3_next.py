"""Hugging Face Qwen3-Next import and export: a tiny random ``Qwen3NextForCausalLM`` saved by transformers converts
into a model whose float64 logits are transformers' to rounding, with any brackets, and back into the same file; its
MTP head, which transformers skips, into an MTP depth whose logits are those of a float64 Qwen3-Next MTP written
here; a model of ours exports to transformers' logits; what either side cannot compute is refused by name.

Every parameter is redrawn (norms included, which transformers starts at 0), so that a wrong key, a swapped half of
q_proj or a norm read as ``w`` instead of ``1 + w`` changes the logits at O(1), far above the 1e-10 tolerance.
"""

import json
import logging

import pytest
import torch

mq = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM, modeling_rope_utils  # noqa: E402

import hybridlm  # noqa: E402
from hybridlm.checkpoint.hf_qwen3_next import convert_from_qwen3_next, import_qwen3_next  # noqa: E402
from hybridlm.errors import CheckpointError  # noqa: E402
from tests.helpers import hf_in_float64, rel_err  # noqa: E402

TOL = 1e-10
#: A small model of ours that Qwen3-Next computes (with a pattern of (G | *, E | -) pairs): its options.
OURS = dict(vocab_size=64, hidden_size=32, norm_zero_centered=True, num_attention_heads=4, head_dim=8)
OURS |= dict(position_embedding="rope", qk_norm=True, attention_output_gate=True, mlp_activation="swiglu")
OURS |= dict(moe_num_experts=4, moe_ffn_hidden_size=8, moe_shared_expert_ffn_hidden_size=8)
OURS |= dict(moe_shared_expert_gate=True, ffn_hidden_size=8, gdn_num_heads=2, gdn_head_dim=8)
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=6,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=12,
    intermediate_size=24,
    mlp_only_layers=[1],  # a dense MLP after the first attention layer
    full_attention_interval=2,
    norm_topk_prob=False,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
)


#: Qwen3-Next's long-context setting (its model card's YaRN keys) at this size: a ramp partly kept, partly divided.
YARN_KEYS = {"rope_type": "yarn", "rope_theta": 50.0, "partial_rotary_factor": 1.0, "factor": 4.0}
YARN_KEYS |= {"original_max_position_embeddings": 64, "beta_fast": 8.0}


def saved(tmp_path, **overrides):
    """A tiny float64 Qwen3NextForCausalLM, every parameter redrawn, saved by save_pretrained; (model, folder)."""
    torch.manual_seed(0)
    hcfg = Qwen3NextConfig(**{**TINY, **overrides})
    hcfg._experts_implementation = "eager"  # the per-expert loop: torch's grouped_mm has no float64
    with hf_in_float64(mq, modeling_rope_utils):  # RoPE's inverse frequencies are computed at construction
        theirs = Qwen3NextForCausalLM(hcfg).double().eval()
    with torch.no_grad():
        for p in theirs.parameters():  # float32 values: load keeps A_log, dt_bias and the router in float32
            p.copy_(torch.randn(p.shape, dtype=torch.float32) * 0.3)
    theirs.save_pretrained(tmp_path / "hf")
    return theirs, tmp_path / "hf"


@pytest.mark.parametrize("tie", [False, True])
def test_import_matches_transformers_logits_fused_or_not(tmp_path, tie):
    theirs, hf = saved(tmp_path, tie_word_embeddings=tie)
    out = convert_from_qwen3_next(hf, tmp_path / "ours")
    assert json.loads((out / "config.json").read_text())["config"]["pattern"] == "GE*-GE*E"
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), hf_in_float64(mq, modeling_rope_utils):
        expected = theirs(ids).logits
    for pattern in (None, "[GE][*-][GE][*E]"):
        ours = hybridlm.load(out, pattern=pattern, dtype=torch.float64).eval()
        with torch.no_grad():
            assert rel_err(ours(ids).logits, expected) < TOL, pattern


@pytest.mark.parametrize(
    "rope",
    [
        YARN_KEYS,
        YARN_KEYS | {"mscale": 0.8, "mscale_all_dim": 0.6, "truncate": False, "beta_slow": 0.5},  # cos/sin rescaled
    ],
)
def test_yarn_imports_to_transformers_logits_and_exports_back(tmp_path, rope):
    """A Qwen3-Next with YaRN (transformers computes its frequencies and cos/sin factor): our model of its file gives
    its logits at positions past the original context, and exports a config.json transformers reads as the same
    rope (its attention_factor written out) with the same logits."""
    from hybridlm.checkpoint.hf_qwen3_next import convert_to_qwen3_next

    theirs, hf = saved(tmp_path, rope_parameters=dict(rope))
    out = convert_from_qwen3_next(hf, tmp_path / "ours")
    config = hybridlm.load(out).config
    assert (config.rope_type, config.yarn_rotary_scaling_factor) == ("yarn", 4.0)
    ids = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(1))  # 80 > 64, the original length
    with torch.no_grad(), hf_in_float64(mq, modeling_rope_utils):
        expected = theirs(ids).logits
    ours = hybridlm.load(out, dtype=torch.float64).eval()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, expected) < TOL
    back = convert_to_qwen3_next(out, tmp_path / "back")
    with hf_in_float64(mq, modeling_rope_utils):
        again = Qwen3NextForCausalLM.from_pretrained(back, dtype=torch.float64, attn_implementation="eager").eval()
        again.config._experts_implementation = "eager"
        with torch.no_grad():
            assert rel_err(again(ids).logits, expected) < TOL
    written = json.loads((back / "config.json").read_text())["rope_parameters"]
    assert written["rope_type"] == "yarn" and written["attention_factor"] == again.model.rotary_emb.attention_scaling
    assert convert_from_qwen3_next(back, tmp_path / "again") and hybridlm.load(tmp_path / "again").config == config


def test_yarn_keys_read_as_transformers_reads_them():
    """rope_scaling (older files) as rope_parameters; a factor left out is max_position_embeddings over
    original_max_position_embeddings (transformers' _compute_yarn_parameters); mscale counts only beside
    mscale_all_dim, and beta_fast / beta_slow given as 0 or null are 32 / 1."""
    from hybridlm.checkpoint.hf_qwen3_next import config_from_qwen3_next

    base = json.loads(Qwen3NextConfig(**{k: v for k, v in TINY.items() if k != "attn_implementation"}).to_json_string())
    del base["rope_parameters"]
    rope = {
        "rope_type": "yarn",
        "original_max_position_embeddings": 64,
        "mscale": 0.5,
        "beta_fast": 0,
        "beta_slow": None,
    }
    c = config_from_qwen3_next(base | {"rope_scaling": rope, "max_position_embeddings": 256, "rope_theta": 50.0})
    assert (c.rope_type, c.yarn_rotary_scaling_factor, c.yarn_original_max_position_embeddings) == ("yarn", 4.0, 64)
    assert (c.yarn_mscale, c.yarn_mscale_all_dim, c.yarn_beta_fast, c.yarn_beta_slow) == (1.0, 0.0, 32.0, 1.0)
    assert c.rope_theta == 50.0


def with_mtp(hf, layers=(0,)):
    """Adds an MTP head to folder ``hf`` under Qwen3-Next's names, every tensor drawn: ``mtp.fc``, its three norms
    and per index in ``layers`` a decoder layer shaped as layer 3 (full attention, then a MoE, as layer 0's
    channel mixer is); returns every tensor of the file."""
    from safetensors.torch import load_file, save_file

    state = load_file(hf / "model.safetensors")
    g = torch.Generator().manual_seed(2)

    def draw(shape, dtype=torch.float64):
        return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.3).to(dtype)

    mtp = {"mtp.fc.weight": draw((32, 64))}
    mtp |= {f"mtp.{n}.weight": draw((32,)) for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    for i in layers:
        p = "model.layers.3."
        mtp |= {f"mtp.layers.{i}." + k[len(p) :]: draw(t.shape, t.dtype) for k, t in state.items() if k.startswith(p)}
    save_file(state | mtp, hf / "model.safetensors")
    return state | mtp


def test_stacked_experts_and_mtp_tensors_it_cannot_map(tmp_path, caplog):
    """A file holding transformers' in-memory expert stacks (gate_up_proj, down_proj) reads as the per-expert one,
    and MTP tensors that are not one MTP layer (a head without its layer, or two layers sharing one fc) are dropped
    with a warning saying why."""
    from safetensors.torch import load_file, save_file

    _, hf = saved(tmp_path)
    config, reference = import_qwen3_next(hf)
    state = load_file(hf / "model.safetensors")
    for i in (0, 2, 3):
        p = f"model.layers.{i}.mlp.experts."
        gate_up = [
            torch.cat([state.pop(f"{p}{e}.gate_proj.weight"), state.pop(f"{p}{e}.up_proj.weight")]) for e in range(4)
        ]
        state[p + "gate_up_proj"] = torch.stack(gate_up)
        state[p + "down_proj"] = torch.stack([state.pop(f"{p}{e}.down_proj.weight") for e in range(4)])
    state["mtp.fc.weight"] = torch.zeros(32, 64, dtype=torch.float64)
    save_file(state, hf / "model.safetensors")
    # config.json names the head, as the published ones do: the tensors found are said to be dropped, and why.
    hf_config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**hf_config, "num_nextn_predict_layers": 1}))
    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint.hf_files"):  # its one MTP warning
        again, tensors = import_qwen3_next(hf)
    assert "dropping the MTP layers (1 tensors, e.g. mtp.fc.weight): they hold no MTP decoder layer" in caplog.text
    assert again == config and tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)
    with_mtp(hf, layers=(0, 1))
    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint.hf_files"):
        assert import_qwen3_next(hf)[0] == config
    assert "2 MTP layers share one mtp.fc and its norms" in caplog.text


def test_an_mtp_head_config_json_names_but_no_file_holds_is_warned_of(tmp_path, caplog):
    """A folder transformers loaded and saved again (ours exported, say) keeps num_nextn_predict_layers = 1 but
    loses the mtp.* tensors (its model has no MTP head): it imported without an MTP depth and without a word, and
    --speculative mtp then said only that the model has no MTP depths."""
    _, hf = saved(tmp_path, num_nextn_predict_layers=1)
    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint.hf_qwen3_next"):
        config, _ = import_qwen3_next(hf)
    assert "/" not in config.pattern
    assert "config.json names num_nextn_predict_layers=1, but no weight file holds an mtp.* tensor" in caplog.text
    caplog.clear()
    with_mtp(hf)  # the head present: read, and nothing to warn of
    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint.hf_qwen3_next"):
        assert import_qwen3_next(hf)[0].pattern.endswith("/*E") and caplog.text == ""


def rms(x, w, eps=1e-6):
    """Qwen3-Next's RMSNorm, whose stored w is zero-centred: x / rms(x) · (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def mtp_reference(t, ids, h):
    """Qwen3-Next's MTP logits (B, L-1, V) at positions 0..L-2, in float64, from the file's tensors ``t`` under their
    Hugging Face names, as vLLM's and SGLang's Qwen3-Next MTP compute them for TINY: position i joins
    ``pre_fc_norm_embedding`` of token i+1's embedding with ``pre_fc_norm_hidden`` of the main model's output h
    (B, L, H) (after model.norm) at i, in that order, through ``fc``; one decoder layer (gated attention with q/k
    norms and partial RoPE at position i, then a softmax top-2 MoE with a gated shared expert), ``mtp.norm``, and
    the main model's lm_head. Every norm scales by 1 + w."""
    F = torch.nn.functional
    heads, groups, d, rot, theta, top_k = 4, 2, 8, 4, 500.0, 2
    w = {k.removeprefix("mtp.layers.0."): v for k, v in t.items() if k.startswith("mtp.layers.0.")}
    e = rms(t["model.embed_tokens.weight"][ids[:, 1:]], t["mtp.pre_fc_norm_embedding.weight"])
    x = F.linear(torch.cat([e, rms(h[:, :-1], t["mtp.pre_fc_norm_hidden.weight"])], -1), t["mtp.fc.weight"])
    B, L, _ = x.shape
    a = rms(x, w["input_layernorm.weight"])
    q_gate = F.linear(a, w["self_attn.q_proj.weight"]).view(B, L, heads, 2 * d)  # [q_h | gate_h] per head
    q = rms(q_gate[..., :d], w["self_attn.q_norm.weight"]).transpose(1, 2)
    k = rms(F.linear(a, w["self_attn.k_proj.weight"]).view(B, L, groups, d), w["self_attn.k_norm.weight"])
    v = F.linear(a, w["self_attn.v_proj.weight"]).view(B, L, groups, d).transpose(1, 2)
    angle = torch.arange(L, dtype=torch.float64)[:, None] / theta ** (
        torch.arange(0, rot, 2, dtype=torch.float64) / rot
    )
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def rope(z):  # NeoX halves of the first rot channels
        z1, z2 = z[..., : rot // 2], z[..., rot // 2 : rot]
        return torch.cat([z[..., :rot] * cos + torch.cat([-z2, z1], -1) * sin, z[..., rot:]], -1)

    q, k = rope(q), rope(k.transpose(1, 2)).repeat_interleave(heads // groups, 1)
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    p = ((q @ k.transpose(-1, -2)) / d**0.5 + causal).softmax(-1)
    o = (p @ v.repeat_interleave(heads // groups, 1)).transpose(1, 2).reshape(B, L, heads * d)
    x = x + F.linear(o * torch.sigmoid(q_gate[..., d:].reshape(B, L, heads * d)), w["self_attn.o_proj.weight"])
    m = rms(x, w["post_attention_layernorm.weight"])

    def swiglu(p):
        return F.linear(
            F.silu(F.linear(m, w[p + "gate_proj.weight"])) * F.linear(m, w[p + "up_proj.weight"]),
            w[p + "down_proj.weight"],
        )

    top, chosen = F.linear(m, w["mlp.gate.weight"]).softmax(-1).topk(top_k)  # norm_topk_prob=False
    y = sum((top * (chosen == e)).sum(-1, keepdim=True) * swiglu(f"mlp.experts.{e}.") for e in range(4))
    y = y + torch.sigmoid(F.linear(m, w["mlp.shared_expert_gate.weight"])) * swiglu("mlp.shared_expert.")
    return F.linear(rms(x + y, t["mtp.norm.weight"]), t["lm_head.weight"])


def test_the_mtp_head_imports_as_one_depth_computing_qwen3_next_mtp(tmp_path):
    """A file with Qwen3-Next's MTP head imports with one MTP depth ``/*E``, whose float64 logits are those of
    Qwen3-Next's MTP (:func:`mtp_reference`, on transformers' main-model output) to rounding, fused or not; the
    main logits stay transformers'."""
    theirs, hf = saved(tmp_path)
    tensors = with_mtp(hf)
    out = convert_from_qwen3_next(hf, tmp_path / "ours")
    assert json.loads((out / "config.json").read_text())["config"]["pattern"] == "GE*-GE*E/*E"
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), hf_in_float64(mq, modeling_rope_utils):
        main = theirs(ids).logits
        expected = mtp_reference(tensors, ids, theirs.model(ids).last_hidden_state)
    for pattern in (None, "[GE][*-][GE][*E]/[*E]"):
        ours = hybridlm.load(out, pattern=pattern, dtype=torch.float64).eval()
        with torch.no_grad():
            got = ours(ids)
        assert rel_err(got.logits, main) < TOL, pattern
        assert rel_err(got.mtp_logits[0][:, :-1], expected) < TOL, pattern  # the last position reads no token


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu': Qwen3-Next applies it"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope'"),
        (
            {"rope_parameters": YARN_KEYS | {"attention_factor": 1.5}},
            r"attention_factor=1.5 is not m\(factor, mscale\) / m\(factor, mscale_all_dim\)",
        ),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.375}}, "odd 3"),
        (
            {"layer_types": ["linear_attention", "sliding_attention"] * 2},
            r"unknown layer types \['sliding_attention'\]",
        ),
        ({"layer_types": ["linear_attention"]}, "lists 1 layers, but num_hidden_layers is 4"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer, got 0"),
        ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0: a zero-width shared expert"),
        ({"model_type": "qwen3_moe"}, "model_type is 'qwen3_moe', not 'qwen3_next'"),
    ],
)
def test_refuses_what_it_cannot_compute_by_key(tmp_path, edit, message):
    _, hf = saved(tmp_path)
    data = json.loads((hf / "config.json").read_text()) | edit
    (hf / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message) as e:
        convert_from_qwen3_next(hf, tmp_path / "ours")
    assert str(hf / "config.json") in str(e.value)
    assert not (tmp_path / "ours").exists()


def test_refuses_a_missing_or_misshaped_tensor_naming_its_file(tmp_path):
    from safetensors.torch import load_file, save_file

    _, hf = saved(tmp_path)
    state = load_file(hf / "model.safetensors")
    del state["model.layers.1.self_attn.k_norm.weight"]
    state["model.layers.0.linear_attn.A_log"] = torch.zeros(3, dtype=torch.float64)
    save_file(state, hf / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.1\.self_attn\.k_norm\.weight") as e:
        import_qwen3_next(hf)
    assert "model.layers.0.linear_attn.A_log has shape (3,), but config.json implies (4,)" in str(e.value)


def test_the_published_80b_config_json_translates():
    """Qwen3-Next-80B-A3B's config.json (transformers 4.57's: no layer_types, top-level rope_theta and
    partial_rotary_factor, rope_scaling null): attention every 4th layer, each followed by a MoE layer, 64 of 256
    head channels rotated, and the model card's 80B parameters (its MTP head, read from the weights, aside)."""
    from hybridlm import HybridLM, ModelConfig
    from hybridlm.checkpoint.hf_qwen3_next import config_from_qwen3_next
    from hybridlm.counting import num_params

    hf = {
        "model_type": "qwen3_next", "hidden_act": "silu", "hidden_size": 2048, "vocab_size": 151936,
        "num_hidden_layers": 48, "full_attention_interval": 4, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "partial_rotary_factor": 0.25,
        "rope_theta": 10000000, "rope_scaling": None, "rms_norm_eps": 1e-06, "intermediate_size": 5120,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_value_head_dim": 128, "num_experts": 512, "num_experts_per_tok": 10,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
        "tie_word_embeddings": False, "attention_bias": False,
    }  # fmt: skip
    c = config_from_qwen3_next(hf)
    assert c.pattern == "GEGEGE*E" * 12
    assert (c.rotary_dim, c.rope_theta, c.moe_top_k, c.norm_eps) == (64, 10000000, 10, 1e-6)
    assert c.norm_zero_centered and c.attention_output_gate and c.moe_shared_expert_gate and not c.tie_embeddings
    assert 79e9 < num_params(HybridLM(c, device="meta")) < 80e9
    assert c == ModelConfig.preset("qwen3-next-80b-a3b")  # the preset is this model's shapes


def test_the_defaults_of_left_out_keys_are_transformers():
    """A key config.json leaves out is read as the installed transformers' Qwen3NextConfig() default, so a release
    that changes one fails here (not in a model computing something else)."""
    from hybridlm.checkpoint import hf_qwen3_next as q

    hf = Qwen3NextConfig()
    for key, (_, _, default) in q._KEYS.items():
        assert getattr(hf, key) == default, key
    plain = ("num_hidden_layers", "decoder_sparse_step", "hidden_act", "attention_bias", "max_position_embeddings")
    assert {k: getattr(hf, k) for k in plain} == {k: q._OTHER_DEFAULTS[k] for k in plain}
    rope = ("partial_rotary_factor", "rope_theta")
    assert {k: hf.rope_parameters[k] for k in rope} == {k: q._OTHER_DEFAULTS[k] for k in rope}
    n = q._OTHER_DEFAULTS["full_attention_interval"]
    assert hf.layer_types[:n] == ["linear_attention"] * (n - 1) + ["full_attention"]


def test_an_experts_missing_matrix_is_one_line_naming_the_experts(tmp_path):
    """As for NemotronH (the one import check of hf_files): a matrix missing from some experts is one line naming
    them, not a line per expert's tensor."""
    from safetensors.torch import load_file, save_file

    _, hf = saved(tmp_path)
    state = load_file(hf / "model.safetensors")
    for e in (1, 3):
        del state[f"model.layers.2.mlp.experts.{e}.up_proj.weight"]
    save_file(state, hf / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot import this Qwen3-Next model") as e:
        import_qwen3_next(hf)
    assert r"model.layers.2.mlp.experts.{e}.up_proj.weight: no tensor for expert(s) [1, 3]" in str(e.value)
    assert "missing tensors" not in str(e.value)


def test_a_hybridlm_checkpoint_is_told_how_to_become_a_qwen3_next_one(tmp_path):
    from hybridlm.checkpoint.hf_qwen3_next import config_from_qwen3_next

    with pytest.raises(CheckpointError, match=r"`hybridlm convert SRC DST --to qwen3-next` writes one"):
        config_from_qwen3_next({"format": "hybridlm", "format_version": 1}, tmp_path / "config.json")


# -- export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mtp", [False, True])
def test_import_then_export_gives_back_transformers_file(tmp_path, mtp):
    """Qwen3-Next -> hybridlm -> Qwen3-Next is bitwise the file save_pretrained wrote (with an MTP head, which
    config.json names for vLLM as num_nextn_predict_layers), and transformers loads it with no missing or unexpected
    keys (it skips mtp.*)."""
    from safetensors.torch import load_file

    from hybridlm.checkpoint.hf_qwen3_next import convert_to_qwen3_next

    _, hf = saved(tmp_path)
    if mtp:
        with_mtp(hf)
    convert_from_qwen3_next(hf, tmp_path / "ours")
    back = convert_to_qwen3_next(tmp_path / "ours", tmp_path / "back")
    original, written = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    assert json.loads((back / "config.json").read_text()).get("num_nextn_predict_layers") == (1 if mtp else None)
    _, info = Qwen3NextForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_export_writes_the_mtp_depth_qwen3_next_computes(tmp_path, caplog):
    """Of two MTP depths '*E' after a MoE layer 0, the first is written (Qwen3-Next's MTP layers share one fc), as
    it was; a depth whose layer is not attention then layer 0's channel mixer is dropped; each with a warning."""
    from hybridlm import HybridLM, ModelConfig
    from hybridlm.checkpoint.canonical import to_canonical
    from hybridlm.checkpoint.hf_qwen3_next import export_qwen3_next

    config = ModelConfig(pattern="GE*-/*E/*E", **OURS)
    canonical = to_canonical(HybridLM(config, seed=0).state_dict(), config.parsed)
    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint.hf_files"):
        hf, tensors = export_qwen3_next(config, canonical)
    assert "dropping 1 MTP depth(s) ('*E') on export: Qwen3-Next's MTP layers share one mtp.fc" in caplog.text
    assert hf["num_nextn_predict_layers"] == 1 and torch.equal(
        tensors["mtp.fc.weight"], canonical["mtp.0.eh_proj.weight"]
    )
    assert torch.equal(tensors["mtp.layers.0.mlp.gate.weight"], canonical["mtp.0.layers.1.mixer.gate.weight"])
    assert not any(k.startswith("mtp.layers.1.") for k in tensors)
    dense = ModelConfig(pattern="G-*E/*E", **OURS)
    canonical = to_canonical(HybridLM(dense, seed=0).state_dict(), dense.parsed)
    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint.hf_files"):
        hf, tensors = export_qwen3_next(dense, canonical)
    assert (
        "dropping 1 MTP depth(s) ('*E') on export: Qwen3-Next's MTP layer is full attention then layer 0's"
        in caplog.text
    )
    assert "num_nextn_predict_layers" not in hf and not any(k.startswith("mtp.") for k in tensors)
    # A main stack without attention reads no attention option: the MTP layer's attention is checked on its own.
    ungated = ModelConfig(pattern="GEGE/*E", **OURS | {"attention_output_gate": False})
    canonical = to_canonical(HybridLM(ungated, seed=0).state_dict(), ungated.parsed)
    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint.hf_files"):
        hf, tensors = export_qwen3_next(ungated, canonical)
    assert "('*E') on export: Qwen3-Next does not compute its layer: attention_output_gate=False" in caplog.text
    assert "num_nextn_predict_layers" not in hf and not any(k.startswith("mtp.") for k in tensors)


def test_a_fused_model_of_ours_exports_to_transformers_logits(tmp_path):
    """A model built here (fused, no tied head, dense layers between MoE ones) exported: transformers' float64
    logits are ours to rounding."""
    from hybridlm import HybridLM, ModelConfig
    from hybridlm.checkpoint.hf_qwen3_next import convert_to_qwen3_next

    config = ModelConfig(
        pattern="[G-][*E]G-/*E",  # the MTP depth stays behind: layer 0's channel mixer is a dense MLP
        **OURS
        | dict(num_query_groups=1, rotary_percent=0.5, rope_theta=300.0, ffn_hidden_size=20)
        | dict(moe_ffn_hidden_size=12, gdn_num_value_heads=4, gdn_value_head_dim=4),
    )
    ours = HybridLM(config, seed=0, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in ours.parameters():  # norms off their zero init; float32 values, as the A_log / router keep
            p.copy_(torch.randn(p.shape, dtype=torch.float32) * 0.3)
    out = convert_to_qwen3_next(hybridlm.save(ours, tmp_path / "ours"), tmp_path / "hf")
    with hf_in_float64(mq, modeling_rope_utils):
        theirs = Qwen3NextForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation="eager").eval()
    theirs.config._experts_implementation = "eager"
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), hf_in_float64(mq, modeling_rope_utils):
        expected = theirs(ids).logits
    with torch.no_grad():
        assert rel_err(ours(ids).logits, expected) < TOL


def test_export_refuses_what_qwen3_next_cannot_compute_with_every_reason(tmp_path):
    from hybridlm import ModelConfig
    from hybridlm.checkpoint.hf_qwen3_next import check_exportable

    config = ModelConfig(pattern="-G*E", vocab_size=64, hidden_size=32, num_attention_heads=4, moe_num_experts=4)
    with pytest.raises(CheckpointError) as e:
        check_exportable(config)
    for reason in (
        "canonical layers 0-1 '-G' are not such a pair",
        "norm_zero_centered=False",
        "position_embedding='none'",
        "qk_norm=False",
        "attention_output_gate=False",
        "mlp_activation='relu2'",
        "set moe_shared_expert_ffn_hidden_size > 0 and moe_shared_expert_gate=True",
    ):
        assert reason in str(e.value), reason


def test_float_options_are_written_as_floats_like_transformers_defaults():
    """As for NemotronH (one key-table writer, hf_files.hf_keys): a float option our config holds as a whole number
    (norm_eps=1) is written as Qwen3NextConfig() holds it (1.0)."""
    from hybridlm import ModelConfig
    from hybridlm.checkpoint.hf_qwen3_next import qwen3_next_config

    config = ModelConfig(pattern="G-", vocab_size=64, hidden_size=32, norm_zero_centered=True, norm_eps=1, init_std=1)
    hf = qwen3_next_config(config)
    assert (hf["rms_norm_eps"], hf["initializer_range"]) == (1.0, 1.0)
    assert type(hf["rms_norm_eps"]) is type(hf["initializer_range"]) is type(Qwen3NextConfig().rms_norm_eps) is float
