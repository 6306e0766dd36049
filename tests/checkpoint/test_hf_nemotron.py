"""Hugging Face NemotronH adapter: exports and imports reproduce transformers' logits, round trips are
lossless, and everything NemotronH cannot express (or a damaged directory) is refused by name.

Every test model has all its parameters redrawn (``perturb``) so that a wrong key, a swapped
projection or a missing clamp changes the logits well beyond the 1e-4 tolerance.
"""

import json
import logging
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, NemotronHConfig, NemotronHForCausalLM
from transformers.activations import ACT2FN

import hybridlm
from hybridlm import HybridLM, ModelConfig
from hybridlm.checkpoint.hf_nemotron import (
    NO_CLAMP_TIME_STEP_MIN,
    check_exportable,
    convert_from_nemotron_h,
    convert_to_nemotron_h,
    export_nemotron_h,
    hf_eos_token_id,
    import_nemotron_h,
)
from hybridlm.checkpoint.weights import canonical_state_dict, read_tensors, save_state_dict
from hybridlm.errors import CheckpointError
from hybridlm.layers.mlp import activate
from tests.helpers import fifos_never_read

LOGGER = "hybridlm.checkpoint.hf_nemotron"
SEQ_LEN = 29  # longer than the Mamba chunk (8) and not a multiple of it: the inter-chunk path runs
TOL = 1e-4  # max |Δlogit| in float32

BASE = dict(
    vocab_size=128,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=8,
    ffn_hidden_size=48,
    mamba_num_heads=4,
    mamba_head_dim=16,
    mamba_state_dim=8,
    mamba_num_groups=2,
    mamba_chunk_size=8,
    moe_num_experts=8,
    moe_top_k=2,
    moe_ffn_hidden_size=24,
    moe_router_score="sigmoid",
)


def config(pattern: str, **overrides) -> ModelConfig:
    return ModelConfig(pattern=pattern, **{**BASE, **overrides})


@torch.no_grad()
def perturb(state: dict[str, torch.Tensor], hidden: int, seed: int) -> None:
    """Redraw every tensor of a state dict in place (works for our names and Hugging Face's alike).

    Norm weights ~ 1 + 0.3 N, D and conv biases random, dt_bias ~ N(-5, 2) so that many dt fall
    below 1e-3 (a wrong dt clamp shows), decisive routers (weight ~ 2/sqrt(H) N, selection
    bias ~ 0.1 N), projections ~ N / sqrt(fan_in).
    """
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(state):
        t = state[name]
        r = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if name.endswith(("norm.weight", "norm_f.weight")):
            t.copy_(1 + 0.3 * r)
        elif name.endswith(".D"):
            t.copy_(1 + 0.5 * r)
        elif name.endswith("conv1d.bias"):
            t.copy_(0.3 * r)
        elif name.endswith("dt_bias"):
            t.copy_(2 * r - 5)
        elif name.endswith("A_log"):
            t.copy_(0.5 * r)
        elif name.endswith("gate.weight"):
            t.copy_(r * 2 / hidden**0.5)
        elif name.endswith("e_score_correction_bias"):
            t.copy_(0.1 * r)
        elif name.endswith("embeddings.weight"):
            t.copy_(r)
        else:
            t.copy_(r / t.shape[-1] ** 0.5)


def random_model(cfg: ModelConfig, seed: int) -> HybridLM:
    model = HybridLM(cfg, seed=seed).eval()
    perturb(model.state_dict(), cfg.hidden_size, seed + 1)
    return model


def token_ids(vocab: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


# -- export: our model -> transformers -------------------------------------------------------------

PARITY = {
    # Fused blocks, router groups (2 groups, best 1), selection bias, scaling 2.5, shared expert.
    "fused-grouped-moe": config(
        "M-[*-]M[*E]",
        moe_router_expert_bias=True,
        moe_routed_scaling=2.5,
        moe_num_groups=2,
        moe_topk_groups=1,
        moe_shared_expert_ffn_hidden_size=16,
    ),
    # No shared expert, no bias (zeros are written), GELU, tied head (copied), dt clamp, MTP (dropped).
    "gelu-tied-clamped-mtp": config(
        "[ME]*-M-/*-",
        mlp_activation="gelu",
        tie_embeddings=True,
        mamba_dt_clamp_min=0.01,
        moe_top_k=3,
        moe_norm_topk_prob=False,
        norm_eps=1e-6,
    ),
    # No attention layer (use_cache false), 4 groups of 2 experts (best 2), written in shards.
    "no-attention-sharded": config(
        "M-ME[ME]",
        moe_router_expert_bias=True,
        moe_num_groups=4,
        moe_topk_groups=2,
        moe_shared_expert_ffn_hidden_size=16,
    ),
    # Zero-centred norms (weights w, scale 1 + w), exported as NemotronH's plain scale.
    "zero-centered-norms": config("M[*E]-M", norm_zero_centered=True, moe_router_expert_bias=True),
}


@pytest.mark.parametrize("case", PARITY)
def test_export_matches_transformers(case, tmp_path, caplog):
    cfg = PARITY[case]
    model = random_model(cfg, seed=3)
    src = hybridlm.save(model, tmp_path / "ours")
    shard = 20_000 if "sharded" in case else 5_000_000_000
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dst = convert_to_nemotron_h(src, tmp_path / "hf", max_shard_size=shard)
    assert ("MTP" in caplog.text) == bool(cfg.parsed.mtp_depths)
    assert (dst / "model.safetensors.index.json").exists() == ("sharded" in case)

    hf_json = json.loads((dst / "config.json").read_text())
    assert hf_json["hybrid_override_pattern"] == cfg.parsed.layers
    assert hf_json["num_hidden_layers"] == cfg.parsed.num_layers
    assert "layers_block_type" not in hf_json
    # The clamp for transformers >= 5.25 (time_step_limit) and for the versions before (time_step_min).
    clamp = cfg.mamba_dt_clamp_min
    assert hf_json.get("time_step_limit") == ([clamp, {"__float__": "Infinity"}] if clamp else None)
    assert hf_json["time_step_min"] == (cfg.mamba_dt_clamp_min or NO_CLAMP_TIME_STEP_MIN)
    assert hf_json["use_cache"] == ("*" in cfg.parsed.layers)

    hf, info = AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True, dtype=torch.float32)
    assert type(hf).__name__ == "NemotronHForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = token_ids(cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids, use_cache=False).logits
    assert theirs.std() > 0.3  # the logits carry signal, so the tolerance below means something
    diff = max_diff(ours, theirs)
    print(f"{case}: export max |Δlogit| = {diff:.3g}")
    assert diff <= TOL, f"{case}: max |Δlogit| {diff:.3g}"


def test_zero_centered_norms_are_exported_as_their_scale_in_float32(tmp_path):
    """NemotronH's norm is plain: a zero-centred weight w is written as the scale 1 + w the model applies, formed
    in float32 as the model forms it, and kept float32 for a bf16 model, where 1 + w would round (its spacing
    above 1 is 2^-7); the other tensors keep their dtype."""
    cfg = config("M*-", norm_zero_centered=True)
    model = random_model(cfg, seed=3).to(torch.bfloat16)
    with torch.no_grad():
        model.norm_f.weight.fill_(2.0**-10)
    canonical = canonical_state_dict(model)
    _, tensors = export_nemotron_h(cfg, canonical)
    norms = [k for k in tensors if k.endswith("norm.weight") and "mixer" not in k] + ["backbone.norm_f.weight"]
    assert len(norms) == 4
    for k in norms:
        ours = canonical[k.removeprefix("backbone.")]
        assert tensors[k].dtype == torch.float32 and torch.equal(tensors[k], ours.float() + 1), k
    assert (tensors["backbone.norm_f.weight"] == 1 + 2.0**-10).all()
    assert tensors["backbone.layers.0.mixer.norm.weight"].dtype == torch.bfloat16  # the gated norm: plain, as it is


def test_gelu_is_transformers_gelu():
    x = torch.linspace(-6, 6, 1001)
    assert torch.equal(activate(x, "gelu"), ACT2FN["gelu"](x))
    assert torch.equal(activate(x, "relu2"), ACT2FN["relu2"](x))


# -- import: transformers -> our model -------------------------------------------------------------


def transformers_model(seed: int = 0) -> NemotronHForCausalLM:
    """A tiny NemotronH made by transformers itself (with its defaults: before 5.25, dt clamped at 1e-3)."""
    hf_cfg = NemotronHConfig(
        vocab_size=128,
        hidden_size=32,
        hybrid_override_pattern="M*-EM-E",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=8,
        n_groups=2,
        chunk_size=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=16,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
    )
    model = NemotronHForCausalLM(hf_cfg).eval()
    perturb(model.state_dict(), 32, seed)
    return model


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """(transformers model, its save_pretrained directory)."""
    model = transformers_model(seed=21)
    path = tmp_path_factory.mktemp("transformers") / "nemotron"
    model.save_pretrained(path)
    return model, path


def test_import_matches_transformers(hf_saved, tmp_path):
    hf, path = hf_saved
    ours = hybridlm.load(convert_from_nemotron_h(path, tmp_path / "ours"))
    c = ours.config
    assert c.pattern == "M*-EM-E" and not c.tie_embeddings
    # transformers' default: a clamp at time_step_min 1e-3 before 5.25, none (time_step_limit [0, inf]) since.
    old = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 25)
    assert c.mamba_dt_clamp_min == (1e-3 if old else 0.0)
    assert c.moe_router_expert_bias and c.moe_shared_expert_ffn_hidden_size == 16
    ids = token_ids(c.vocab_size)
    with torch.no_grad():
        theirs = hf(ids, use_cache=False).logits
        diff = max_diff(ours(ids).logits, theirs)
        # The clamp matters for these weights: the other choice leaves the tolerance.
        other = HybridLM(c.replace(mamba_dt_clamp_min=0.0 if old else 1e-3), device="meta").to_empty(device="cpu")
        other.load_state_dict(ours.state_dict())
        other_diff = max_diff(other(ids).logits, theirs)
    print(f"import max |Δlogit| = {diff:.3g} (with the other dt clamp: {other_diff:.3g})")
    assert diff <= TOL
    assert other_diff > 10 * TOL


def test_import_accepts_older_layouts(hf_saved, tmp_path, caplog):
    """``model.`` keys, stacked experts, singular ``embedding``, legacy layer names, MTP tensors."""
    hf, path = hf_saved
    reference_config, reference = import_nemotron_h(path)

    state = {k: v.clone() for k, v in hf.state_dict().items()}  # model.*, experts stacked (E, F, H)
    assert "model.layers.3.mixer.experts.up_proj" in state
    state["model.embedding.weight"] = state.pop("model.embeddings.weight")
    state["mtp.layers.0.norm.weight"] = torch.ones(32)
    old = tmp_path / "old"
    old.mkdir()
    save_file(state, old / "model.safetensors", metadata={"format": "pt"})
    hf_json = json.loads((path / "config.json").read_text())
    legacy = {"linear_attention": "mamba", "full_attention": "attention"}
    hf_json["layers_block_type"] = [legacy.get(t, t) for t in hf_json["layers_block_type"]]
    hf_json["num_nextn_predict_layers"] = 1
    (old / "config.json").write_text(json.dumps(hf_json))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg, tensors = import_nemotron_h(old)
    assert "MTP" in caplog.text
    assert cfg == reference_config
    assert tensors.keys() == reference.keys()
    for k in reference:
        assert torch.equal(tensors[k], reference[k]), k


# -- round trip: ours -> NemotronH -> ours ---------------------------------------------------------

ROUND_TRIP = {
    # Everything NemotronH carries, written in shards, with a tokenizer file along.
    "full": (
        config(
            "M-[*-]M[*E]",
            moe_router_expert_bias=True,
            moe_routed_scaling=2.5,
            moe_num_groups=2,
            moe_topk_groups=1,
            moe_shared_expert_ffn_hidden_size=16,
            mamba_dt_clamp_min=1e-4,
            mamba_dt_max=0.05,
            mamba_dt_init_floor=2e-4,
            init_std=0.01,
            norm_eps=1e-6,
        ),
        dict(pattern="M-*-M*E"),
    ),
    # What NemotronH cannot carry comes back as its exact equivalent: brackets -> canonical layers,
    # tied head -> a copy, MTP -> dropped (no clamp comes back as none: time_step_min 1e-9 is read only from files
    # of transformers 5.x before 5.25, whose clamp it was).
    "bare": (
        config("[ME]*-M-/*-", mlp_activation="gelu", tie_embeddings=True),
        dict(pattern="ME*-M-", tie_embeddings=False),
    ),
}


@pytest.mark.parametrize("case", ROUND_TRIP)
def test_round_trip(case, tmp_path):
    cfg, changes = ROUND_TRIP[case]
    model = random_model(cfg, seed=7)
    canonical = canonical_state_dict(model)

    hf_json, hf_tensors = export_nemotron_h(cfg, canonical)
    moe = cfg.parsed.layers.index("E")
    assert f"backbone.layers.{moe}.mixer.experts.7.down_proj.weight" in hf_tensors
    assert f"backbone.layers.{moe}.mixer.experts.down_proj" not in hf_tensors
    assert f"backbone.layers.{moe}.mixer.gate.e_score_correction_bias" in hf_tensors
    assert f"backbone.layers.{moe}.mixer.shared_experts.up_proj.weight" in hf_tensors
    assert "lm_head.weight" in hf_tensors and not any(k.startswith("backbone.mtp") for k in hf_tensors)
    assert hf_json["moe_shared_expert_intermediate_size"] == (cfg.moe_shared_expert_ffn_hidden_size or 1)

    src = hybridlm.save(model, tmp_path / "ours", extra_files={"tokenizer.json": "{}"})
    dst = convert_to_nemotron_h(src, tmp_path / "hf", max_shard_size=30_000)
    assert (dst / "tokenizer.json").exists() and (dst / "model.safetensors.index.json").exists()
    back_cfg, back = import_nemotron_h(dst)

    expected = {k: v for k, v in canonical.items() if not k.startswith("mtp.")}
    if cfg.tie_embeddings:
        expected["lm_head.weight"] = canonical["embeddings.weight"]
    assert back_cfg == cfg.replace(**changes)
    assert back.keys() == expected.keys()
    for k in expected:
        assert torch.equal(back[k], expected[k]), k

    reloaded = hybridlm.load(convert_from_nemotron_h(dst, tmp_path / "back"))
    assert (tmp_path / "back" / "tokenizer.json").exists()
    ids = token_ids(cfg.vocab_size)
    with torch.no_grad():
        assert max_diff(reloaded(ids).logits, model(ids).logits) <= 1e-6


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, overrides, reason",
    [
        ("M-G-", {}, "Gated DeltaNet ('G')"),
        ("MD-", {}, "DeepSeek sparse attention ('D')"),
        ("M+-", {}, "multi-latent attention ('+')"),
        ("M-", {"mlp_activation": "swiglu"}, "mlp_activation='swiglu'"),
        ("ME", {"mlp_activation": "swiglu"}, "non-gated"),
        ("ME", {"moe_router_score": "softmax"}, "moe_router_score='softmax'"),
        ("M*", {"position_embedding": "rope"}, "no RoPE"),
        ("M*", {"qk_norm": True}, "qk_norm=True"),
        ("M*", {"attention_output_gate": True}, "attention_output_gate=True: NemotronH attention has no output gate"),
        ("ME", {"moe_num_experts": 4, "moe_num_groups": 4, "moe_top_k": 1}, "at least 2 experts"),
        ("E", {"moe_num_experts": 1, "moe_top_k": 1}, "at least 2 experts"),
        ("ME", {"moe_shared_expert_ffn_hidden_size": 16, "moe_shared_expert_gate": True}, "moe_shared_expert_gate"),
    ],
)
def test_export_refuses(pattern, overrides, reason):
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        check_exportable(config(pattern, **overrides))


def test_export_lists_every_reason_and_writes_nothing(tmp_path):
    cfg = config("M-G*E", mlp_activation="swiglu", moe_router_score="softmax", qk_norm=True, position_embedding="rope")
    with pytest.raises(CheckpointError) as err:
        check_exportable(cfg)
    for reason in ("Gated DeltaNet", "swiglu", "softmax", "RoPE", "qk_norm"):
        assert reason in str(err.value)
    src = hybridlm.save(HybridLM(cfg), tmp_path / "ours")
    with pytest.raises(CheckpointError, match="Gated DeltaNet"):
        convert_to_nemotron_h(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_to_replace_another_folder_naming_the_format(tmp_path):
    """The refusal names the format as people write it (NemotronH), not its model_type (nemotron_h)."""
    src = hybridlm.save(HybridLM(config("M-*E")), tmp_path / "ours")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"hf exists and is not a Hugging Face NemotronH directory"):
        convert_to_nemotron_h(src, tmp_path / "hf")
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"


def test_export_allows_what_it_can_express():
    check_exportable(config("M-*E/G-", mlp_activation="gelu"))  # MTP depths may hold anything: dropped
    check_exportable(config("M-E/D-"))
    check_exportable(config("M*", mlp_activation="swiglu", qk_norm=False))  # no MLP: activation unused
    check_exportable(config("M-E/*-", attention_output_gate=True))  # gated attention in the dropped MTP depth only


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    model = random_model(config("M*-E", moe_shared_expert_ffn_hidden_size=16, moe_router_expert_bias=True), seed=11)
    return convert_to_nemotron_h(hybridlm.save(model, root / "ours"), root / "hf")


def _damage_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _truncate(path):
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


TENSOR_DAMAGE = {
    "truncated": (_truncate, r"model\.safetensors: cannot read safetensors file"),
    "garbage": (lambda p: (p / "model.safetensors").write_bytes(b"not safetensors"), "cannot read safetensors"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "no model.safetensors"),
    "missing tensor": (
        lambda p: _damage_tensors(p, lambda t: t.pop("backbone.layers.0.mixer.A_log")),
        "missing tensors: backbone.layers.0.mixer.A_log",
    ),
    "missing head": (
        lambda p: _damage_tensors(p, lambda t: t.pop("lm_head.weight")),
        "missing tensors: lm_head.weight",
    ),
    "missing expert": (
        lambda p: _damage_tensors(p, lambda t: t.pop("backbone.layers.3.mixer.experts.5.up_proj.weight")),
        r"experts.{e}.up_proj.weight: no tensor for expert(s) [5]",
    ),
    "wrong shape": (
        lambda p: _damage_tensors(
            p, lambda t: t.update({"backbone.layers.1.mixer.q_proj.weight": torch.zeros(16, 32)})
        ),
        "backbone.layers.1.mixer.q_proj.weight has shape (16, 32), but config.json implies (32, 32)",
    ),
    "unknown tensor": (
        lambda p: _damage_tensors(p, lambda t: t.update({"backbone.layers.0.mixer.extra.weight": torch.zeros(2)})),
        "unexpected tensor",
    ),
    "integer weights": (
        lambda p: _damage_tensors(
            p, lambda t: t.update({"backbone.layers.0.mixer.in_proj.weight": torch.zeros(228, 32, dtype=torch.int32)})
        ),
        "not floating point: backbone.layers.0.mixer.in_proj.weight (torch.int32)",
    ),
    "stacked and per expert": (
        lambda p: _damage_tensors(
            p,
            lambda t: t.update(
                {
                    "backbone.layers.3.mixer.experts.up_proj": torch.stack(
                        [t[f"backbone.layers.3.mixer.experts.{e}.up_proj.weight"] for e in range(8)]
                    )
                }
            ),
        ),
        r"has both .*experts\.0\.up_proj\.weight and .*experts\.up_proj\[0\] \(the same tensor\)",
    ),
}


@pytest.mark.parametrize("case", TENSOR_DAMAGE)
def test_import_refuses_damaged_weights(case, exported, tmp_path):
    damage, message = TENSOR_DAMAGE[case]
    path = shutil.copytree(exported, tmp_path / "hf")
    damage(path)
    with pytest.raises(CheckpointError) as err:
        import_nemotron_h(path)
    assert message in str(err.value) or re.search(message, str(err.value)), str(err.value)
    assert str(path) in str(err.value)


def test_import_fills_a_missing_conv_bias_with_zeros(exported, tmp_path):
    path = shutil.copytree(exported, tmp_path / "hf")
    _damage_tensors(path, lambda t: t.pop("backbone.layers.0.mixer.conv1d.bias"))
    hf_json = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(hf_json | {"use_conv_bias": False}))
    _, reference = import_nemotron_h(exported)
    _, tensors = import_nemotron_h(path)
    assert tensors.keys() == reference.keys()
    bias = tensors.pop("layers.0.mixer.conv1d.bias")
    assert bias.shape == reference.pop("layers.0.mixer.conv1d.bias").shape and not bias.any()
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)


def test_import_refuses_a_conv_bias_its_config_turns_off(exported, tmp_path):
    """transformers builds no conv bias then and ignores the file's: we would compute another model."""
    path = shutil.copytree(exported, tmp_path / "hf")
    hf_json = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(hf_json | {"use_conv_bias": False}))
    with pytest.raises(CheckpointError, match=r"conv1d\.bias: a conv bias, but config.json sets use_conv_bias false"):
        import_nemotron_h(path)


CONFIG_DAMAGE = {
    "latent moe": ({"moe_latent_size": 8}, "moe_latent_size=8"),
    "mamba act": ({"mamba_hidden_act": "relu"}, "mamba_hidden_act='relu'"),
    "mamba bias": ({"use_bias": True}, "use_bias=true"),
    "mlp bias": ({"mlp_bias": True}, "mlp_bias=true"),
    "mlp act": ({"mlp_hidden_act": "silu"}, "mlp_hidden_act='silu'"),
    "unknown layer": ({"hybrid_override_pattern": "M*-G"}, "symbols ['G']"),
    "unknown type": ({"layers_block_type": ["mamba", "linear_attention", "gdn"]}, "unknown layer types ['gdn']"),
    "other model": ({"model_type": "llama"}, "model_type is 'llama'"),
    "bad value": ({"ssm_state_size": 0}, "mamba_state_dim: must be positive"),
}


@pytest.mark.parametrize("case", CONFIG_DAMAGE)
def test_import_refuses_unsupported_config(case, exported, tmp_path):
    changes, message = CONFIG_DAMAGE[case]
    path = shutil.copytree(exported, tmp_path / "hf")
    hf_json = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(hf_json | changes))
    with pytest.raises(CheckpointError) as err:
        import_nemotron_h(path)
    assert message in str(err.value) and str(path / "config.json") in str(err.value), str(err.value)


def test_convert_replaces_only_nemotron_h_directories(exported, tmp_path):
    src = tmp_path / "ours"
    shutil.copytree(exported.parent / "ours", src)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        convert_to_nemotron_h(src, other)
    with pytest.raises(CheckpointError, match="refusing to replace"):
        convert_to_nemotron_h(src, src)  # the source itself
    assert (other / "notes.txt").read_text() == "keep me"
    dst = tmp_path / "hf"
    for _ in range(2):  # the second conversion replaces the first
        convert_to_nemotron_h(src, dst)
    assert json.loads((dst / "config.json").read_text())["model_type"] == "nemotron_h"


def test_convert_refuses_the_destination_before_reading_weights(exported, tmp_path, monkeypatch):
    """A multi-gigabyte source is not read only to be refused at the end."""
    import hybridlm.checkpoint.hf_nemotron as hf_module

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")

    def no_reading(*args, **kwargs):
        raise AssertionError("weights read before the destination was checked")

    monkeypatch.setattr(hf_module, "read_tensors", no_reading)
    with pytest.raises(CheckpointError, match="refusing to replace"):
        convert_to_nemotron_h(exported.parent / "ours", other)


def test_import_passes_the_files_tensors_through_without_copying(exported, monkeypatch):
    """Every tensor safetensors reads is a view of the file's memory map, and the adapter cloned them all:
    convert --from nemotron-h held a private copy of the whole checkpoint (1.66 GB anonymous memory for 1.5 GB of
    weights, now 0.37 GB). Renamed tensors are now the file's own; the experts, restacked, are new."""
    import hybridlm.checkpoint.hf_nemotron as hf_module

    read = {}
    monkeypatch.setattr(hf_module, "read_tensors", lambda *a, **kw: read.setdefault("t", read_tensors(*a, **kw)))
    _, tensors = import_nemotron_h(exported)
    for ours, theirs in (
        ("embeddings.weight", "embeddings"),
        ("layers.1.mixer.q_proj.weight", "layers.1.mixer.q_proj"),
    ):
        assert tensors[ours] is read["t"][f"backbone.{theirs}.weight"]
    experts = tensors["layers.3.mixer.experts.up_proj"]
    assert experts._base is None and experts.untyped_storage().nbytes() == experts.nbytes


def _with_config(exported, tmp_path, edit):
    path = shutil.copytree(exported, tmp_path / "hf")
    hf_json = json.loads((path / "config.json").read_text())
    edit(hf_json)
    (path / "config.json").write_text(json.dumps(hf_json))
    return path


def test_import_reads_legacy_key_names_and_they_win_as_in_transformers(exported, tmp_path):
    reference_config, reference = import_nemotron_h(exported)

    def legacy(hf):  # the current name with a wrong value beside the legacy name with the right one
        hf["mamba_d_conv"], hf["conv_kernel"] = hf["conv_kernel"], hf["conv_kernel"] + 3
        hf["num_local_experts"], hf["n_routed_experts"] = hf["n_routed_experts"], 2

    cfg, tensors = import_nemotron_h(_with_config(exported, tmp_path, legacy))
    assert cfg == reference_config
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)


def test_import_lowers_the_init_minimum_of_dt_below_a_small_maximum(exported, tmp_path):
    small = ModelConfig.mamba_dt_min / 2  # NemotronH's time_step_max below our default init minimum
    cfg, _ = import_nemotron_h(_with_config(exported, tmp_path, lambda hf: hf.update(time_step_max=small)))
    assert (cfg.mamba_dt_max, cfg.mamba_dt_min) == (small, small)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layers_block_type": "M*-E"}, "layers_block_type must be a list of strings"),
        (
            {"layers_block_type": None, "hybrid_override_pattern": ["M", "*"]},
            "hybrid_override_pattern must be a string",
        ),
        ({"layers_block_type": None, "hybrid_override_pattern": None}, "neither hybrid_override_pattern nor"),
        ({"n_group": 8}, "n_routed_experts=8 in n_group=8 groups: fewer than 2 experts per group"),
    ],
)
def test_import_refuses_malformed_layer_lists_and_groups(exported, tmp_path, changes, message):
    def edit(hf):
        hf.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del hf[key]

    with pytest.raises(CheckpointError, match=re.escape(message)):
        import_nemotron_h(_with_config(exported, tmp_path, edit))


def test_convert_writes_the_end_of_document_id_transformers_generation_stops_at(exported, tmp_path):
    """Without it transformers fell back to NemotronHConfig's eos_token_id 2, some other token of a vocabulary."""
    from transformers import GenerationConfig

    from hybridlm.cli import main
    from hybridlm.train.tokenizer import ByteTokenizer

    src = tmp_path / "ours"
    shutil.copytree(exported.parent / "ours", src)
    (src / "tokenizer.json").write_text("{}")  # a tokenizer without our spec (converted from NemotronH): not read
    assert main(["convert", str(src), str(tmp_path / "plain"), "--to", "nemotron-h"]) == 0
    assert "eos_token_id" not in json.loads((tmp_path / "plain" / "config.json").read_text())  # no recorded id: none
    for name, content in ByteTokenizer().files().items():
        (src / name).write_text(content)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "nemotron-h"]) == 0
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["eos_token_id"] == 256
    assert GenerationConfig.from_model_config(NemotronHConfig(**hf)).eos_token_id == 256


def test_convert_from_keeps_the_end_of_document_id_the_config_names(exported, tmp_path):
    """The import wrote no tokenizer spec, so generation stopped at the first usual name (here id 1), not at
    config.json's eos_token_id; a second export then lost the id too."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hybridlm.cli import main
    from hybridlm.train.tokenizer import load_tokenizer

    hf = shutil.copytree(exported, tmp_path / "hf")
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(125)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))
    for eos, file in ((2, "config.json"), (3, "generation_config.json")):  # either alone
        data = json.loads((hf / "config.json").read_text())
        data.pop("eos_token_id", None)
        (hf / "config.json").write_text(json.dumps(data | ({"eos_token_id": eos} if file == "config.json" else {})))
        if file == "generation_config.json":
            (hf / file).write_text(json.dumps({"eos_token_id": [eos, 0]}))
        back = tmp_path / f"back{eos}"
        assert main(["convert", str(hf), str(back), "--from", "nemotron-h"]) == 0
        assert load_tokenizer(back).eos_id == eos
        assert main(["convert", str(back), str(tmp_path / f"again{eos}"), "--to", "nemotron-h"]) == 0
        assert json.loads((tmp_path / f"again{eos}" / "config.json").read_text())["eos_token_id"] == eos


def test_export_judges_attention_options_only_where_there_is_attention():
    """RoPE is refused for attention layers ('*'), whatever else the pattern holds, and ignored without them."""
    with pytest.raises(CheckpointError, match="no RoPE"):
        check_exportable(config("*-", position_embedding="rope"))
    check_exportable(config("M-", position_embedding="rope"))  # no attention layer reads it


def test_export_writes_the_missing_selection_bias_in_float32_like_a_real_one():
    """A bfloat16 model without a selection bias gets a zero one of the dtype a model with one exports (float32)."""
    with_bias = HybridLM(config("ME", moe_router_expert_bias=True), seed=1).cast(torch.bfloat16)
    without = HybridLM(config("ME"), seed=1).cast(torch.bfloat16)
    name = "backbone.layers.1.mixer.gate.e_score_correction_bias"
    _, real = export_nemotron_h(with_bias.config, canonical_state_dict(with_bias))
    _, filled = export_nemotron_h(without.config, canonical_state_dict(without))
    assert real[name].dtype == torch.float32
    assert filled[name].dtype == real[name].dtype and not filled[name].any()
    assert filled["backbone.layers.1.mixer.experts.0.up_proj.weight"].dtype == torch.bfloat16


def test_convert_states_the_weights_dtype_and_carries_the_tokenizer_and_generation_files(tmp_path):
    """config.json's torch_dtype is the dtype the written weights mostly hold; the tokenizer and generation
    files of the source travel both ways, byte for byte."""
    model = HybridLM(config("M*-"), seed=2).cast(torch.bfloat16)
    aux = {"tokenizer.json": '{"model": {}}', "generation_config.json": '{"eos_token_id": 3}'}
    ours = hybridlm.save(model, tmp_path / "ours", extra_files=aux)
    hf = convert_to_nemotron_h(ours, tmp_path / "hf")
    written = load_file(hf / "model.safetensors")
    counts = {}
    for t in written.values():
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    assert max(counts, key=counts.get) == torch.bfloat16
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = convert_from_nemotron_h(hf, tmp_path / "back")
    for folder in (hf, back):
        assert {name: (folder / name).read_text() for name in aux} == aux, folder


def test_import_reads_the_layer_types_alias(exported, tmp_path):
    """``layer_types`` (the alias transformers also reads) names the layers when no other key does."""
    reference_config, reference = import_nemotron_h(exported)
    names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}

    def alias(hf):
        hf["layer_types"] = [names[s] for s in hf.pop("hybrid_override_pattern")]

    cfg, tensors = import_nemotron_h(_with_config(exported, tmp_path, alias))
    assert cfg == reference_config and cfg.pattern == "M*-E"
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)


def test_import_refuses_zero_router_groups_as_an_invalid_model(exported, tmp_path):
    """n_group=0 is refused as a config error naming the file, not a division by zero."""
    path = _with_config(exported, tmp_path, lambda hf: hf.update(n_group=0))
    with pytest.raises(CheckpointError, match=r"config\.json: does not describe a valid model"):
        import_nemotron_h(path)


@pytest.mark.parametrize(
    "config_json, generation_json, expected",
    [
        ({"eos_token_id": 0}, None, 0),  # id 0 is a token like any other
        ({"eos_token_id": [7, 0]}, None, 7),  # the first of a list
        ({"eos_token_id": True}, None, None),  # a JSON boolean is no token id
        ({"eos_token_id": -1}, {"eos_token_id": 5}, 5),  # no valid id in config.json: generation's
        ({}, {"eos_token_id": [4, 9]}, 4),
        ({"eos_token_id": 6}, {"eos_token_id": 4}, 4),  # generation_config.json's wins, as in transformers
        ({"eos_token_id": 6}, {"do_sample": True}, 6),  # one without an id: config.json's
        ({}, None, None),
    ],
)
def test_hf_eos_token_id_reads_generation_config_then_config_json(tmp_path, config_json, generation_json, expected):
    """config.json's id won over generation_config.json's, where transformers' generate stops: a chat model whose
    config.json names its end of text and generation_config.json its end of turn ran on past every turn."""
    from hybridlm.checkpoint.hf_nemotron import hf_eos_token_id

    (tmp_path / "config.json").write_text(json.dumps(config_json))
    if generation_json is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_json))
    assert hf_eos_token_id(tmp_path) == expected


def test_import_fills_a_missing_conv_bias_in_the_weights_dtype(tmp_path):
    """The zero conv bias of a bfloat16 file is bfloat16 too: the imported weights keep one dtype."""
    model = HybridLM(config("M-"), seed=3).cast(torch.bfloat16)
    hf = convert_to_nemotron_h(hybridlm.save(model, tmp_path / "ours"), tmp_path / "hf")
    _damage_tensors(hf, lambda t: t.pop("backbone.layers.0.mixer.conv1d.bias"))
    hf_json = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(hf_json | {"use_conv_bias": False}))
    _, tensors = import_nemotron_h(hf)
    bias, weight = tensors["layers.0.mixer.conv1d.bias"], tensors["layers.0.mixer.conv1d.weight"]
    assert weight.dtype == bias.dtype == torch.bfloat16 and not bias.any()


def test_import_keeps_selection_biases_that_are_zero_in_only_some_layers(tmp_path):
    """Only biases (and shared experts) that are zero in every MoE layer are dropped: a zero bias in one layer
    beside a trained one in another comes back as saved."""
    model = random_model(config("ME-E", moe_router_expert_bias=True, moe_shared_expert_ffn_hidden_size=16), seed=4)
    with torch.no_grad():
        model.get_buffer("blocks.1.layers.0.mixer.gate.e_score_correction_bias").zero_()
        model.get_parameter("blocks.1.layers.0.mixer.shared_experts.down_proj.weight").zero_()
    saved = canonical_state_dict(model)
    cfg, tensors = import_nemotron_h(convert_to_nemotron_h(hybridlm.save(model, tmp_path / "ours"), tmp_path / "hf"))
    assert cfg.moe_router_expert_bias and cfg.moe_shared_expert_ffn_hidden_size == 16
    assert tensors.keys() == saved.keys() and all(torch.equal(tensors[k], saved[k]) for k in saved)


def test_convert_from_extra_files_win_over_the_sources_files(exported, tmp_path):
    """An extra file (the CLI's tokenizer spec) replaces a source file of the same name; other files travel."""
    src = shutil.copytree(exported, tmp_path / "hf")
    (src / "generation_config.json").write_text('{"eos_token_id": 1}')
    (src / "tokenizer_config.json").write_text('{"from": "source"}')
    dst = convert_from_nemotron_h(src, tmp_path / "ours", extra_files={"tokenizer_config.json": '{"from": "extra"}'})
    assert (dst / "tokenizer_config.json").read_text() == '{"from": "extra"}'
    assert (dst / "generation_config.json").read_text() == '{"eos_token_id": 1}'


def test_import_of_a_hybridlm_checkpoint_says_to_convert_it_with_to(exported):
    """`convert CKPT DST --from nemotron-h` on one of ours said only "model_type is None, not 'nemotron_h'"."""
    with pytest.raises(
        CheckpointError, match=r"model_type is None, .*this is a hybridlm checkpoint: .*--to nemotron-h"
    ):
        import_nemotron_h(exported.parent / "ours")


def test_import_of_a_pickled_folder_says_to_save_it_as_safetensors(exported, tmp_path):
    """An older folder with pytorch_model.bin said only "no model.safetensors and no model.safetensors.index.json"."""
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(exported / "config.json", path)
    (path / "pytorch_model.bin").write_bytes(b"")  # never opened
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is a pickle, which is not read: .*save_pretrained"):
        import_nemotron_h(path)


def test_import_of_a_file_says_a_model_is_a_directory(exported):
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a directory \(a Hugging Face model is"):
        import_nemotron_h(exported / "model.safetensors")


def test_import_warns_of_mtp_layers_the_config_announces_without_tensors(exported, tmp_path, caplog):
    """num_nextn_predict_layers > 0 alone is enough to say the MTP layers are not run (their tensors may be
    elsewhere); a file without either says nothing."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        import_nemotron_h(exported)
    assert "MTP" not in caplog.text
    path = _with_config(exported, tmp_path, lambda hf: hf.update(num_nextn_predict_layers=1))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        import_nemotron_h(path)
    assert "dropping the MTP layers (0 tensors)" in caplog.text


def test_import_warning_of_mtp_tensors_names_one(exported, tmp_path, caplog):
    """The one MTP warning of hf_files, as the Qwen3-Next import gives it: how many tensors are dropped, one of them,
    and that nothing runs them."""
    path = shutil.copytree(exported, tmp_path / "hf")
    state = load_file(path / "model.safetensors")
    save_file(state | {"mtp.layers.0.eh_proj.weight": torch.zeros(2, 2)}, path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        import_nemotron_h(path)
    assert (
        "dropping the MTP layers (1 tensors, e.g. mtp.layers.0.eh_proj.weight): Hugging Face NemotronH" in caplog.text
    )


def test_exported_experts_are_copies_not_views_of_the_stack():
    """Each exported expert matrix owns its memory: writing to it leaves the model's stacked experts alone,
    and it does not keep the whole (E, F, H) stack alive."""
    model = HybridLM(config("ME"), seed=1)
    canonical = canonical_state_dict(model)
    stack = canonical["layers.1.mixer.experts.up_proj"].clone()
    _, tensors = export_nemotron_h(model.config, canonical)
    expert = tensors["backbone.layers.1.mixer.experts.3.up_proj.weight"]
    assert torch.equal(expert, stack[3])
    assert expert.untyped_storage().nbytes() == expert.nbytes
    expert.add_(1.0)
    assert torch.equal(canonical["layers.1.mixer.experts.up_proj"], stack)


def test_a_shared_expert_width_of_zero_is_intermediate_size_as_transformers_builds_it(tmp_path):
    """transformers builds NemotronH's shared expert with ``moe_shared_expert_intermediate_size or
    intermediate_size``; the import read 0 as "no shared expert" and refused the folder's tensors as unexpected
    (and, without them, stopped on a bare KeyError)."""
    hf_config = NemotronHConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=4, hybrid_override_pattern="M*-E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=16,
        ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=24, moe_shared_expert_intermediate_size=0,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = NemotronHForCausalLM(hf_config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    cfg, tensors = import_nemotron_h(tmp_path / "hf")
    assert cfg.moe_shared_expert_ffn_hidden_size == 48
    ours = hybridlm.load(save_state_dict(tensors, cfg, tmp_path / "ours"))
    ids = token_ids(128)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, theirs(ids).logits) < 1e-5
    state = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({k: t for k, t in state.items() if ".shared_experts." not in k}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: .*shared_experts\.down_proj\.weight"):
        import_nemotron_h(tmp_path / "hf")


def test_an_end_of_text_id_outside_the_vocabulary_is_not_saved(tmp_path, caplog):
    """config.json's eos_token_id 1000 of 257 ids was saved in the converted folder's tokenizer spec, so that every
    `generate` on it failed ("eos_id must be a token id below 257"): it is passed over, with a warning."""
    from hybridlm.checkpoint.hf_nemotron import hf_eos_token_id

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 257, "eos_token_id": [1000, 3]}))
    with caplog.at_level(logging.WARNING):
        assert hf_eos_token_id(tmp_path) is None
    assert "eos_token_id 1000 is outside the vocabulary of 257; not saved" in caplog.text
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 256}))
    assert hf_eos_token_id(tmp_path) == 256


def test_an_end_of_turn_id_at_the_vocabulary_s_size_gives_way_to_config_json_s(tmp_path, caplog):
    """generation_config.json's id, read first, is passed over at vocab_size already (ids are below it), and
    config.json's own id is then the one kept: one file's bad id does not lose the other's good one."""
    from hybridlm.checkpoint.hf_nemotron import hf_eos_token_id

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 257, "eos_token_id": 3}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 257}))
    with caplog.at_level(logging.WARNING):
        assert hf_eos_token_id(tmp_path) == 3
    assert "eos_token_id 257 is outside the vocabulary of 257; not saved" in caplog.text


@pytest.mark.parametrize(
    "written, clamp",
    [
        ({"transformers_version": "5.24.0"}, 0.002),  # the native versions before 5.25 clamped at time_step_min
        ({"transformers_version": "5.25.0"}, 0.0),  # since 5.25 (#48989) at time_step_limit's lower end: none
        ({"transformers_version": "5.25.0", "time_step_limit": [3e-4, {"__float__": "Infinity"}]}, 3e-4),
        ({"time_step_limit": [3e-4, float("inf")]}, 3e-4),  # no version: NVIDIA's remote code, or ours
        ({"transformers_version": "4.48.3"}, 0.0),  # remote code, which has always used time_step_limit
    ],
)
def test_the_dt_clamp_is_read_as_the_writing_transformers_applied_it(written, clamp):
    """transformers 5.25 moved NemotronH's run-time dt clamp from time_step_min to time_step_limit: a file is read
    with the clamp of the version that wrote it (CI caught the change: every clamped parity test failed)."""
    from hybridlm.checkpoint.hf_nemotron import config_from_nemotron_h, nemotron_h_config

    hf = nemotron_h_config(config("M-*-")) | {"time_step_min": 0.002} | written
    assert config_from_nemotron_h(hf).mamba_dt_clamp_min == clamp
    with pytest.raises(CheckpointError, match=r"time_step_limit must be \[lower, Infinity\] \(no upper dt limit\)"):
        config_from_nemotron_h(hf | {"transformers_version": "5.25.0", "time_step_limit": [0.0, 5.0]})


def test_the_dt_clamp_is_read_from_the_legacy_name_mamba_dt_limit_as_transformers_reads_it():
    """transformers (5.25) takes time_step_limit from ``mamba_dt_limit`` where a file has it; the import ignored
    that name and computed without the clamp that transformers applies."""
    from hybridlm.checkpoint.hf_nemotron import config_from_nemotron_h, nemotron_h_config

    hf = nemotron_h_config(config("M-*-")) | {"transformers_version": "5.25.0", "time_step_limit": [0.0, float("inf")]}
    hf["mamba_dt_limit"] = [3e-4, float("inf")]
    assert NemotronHConfig(**hf).time_step_limit[0] == 3e-4  # the legacy name wins in transformers
    assert config_from_nemotron_h(hf).mamba_dt_clamp_min == 3e-4
    with pytest.raises(CheckpointError, match=r"mamba_dt_limit must be \[lower, Infinity\]"):  # the key it read
        config_from_nemotron_h(hf | {"mamba_dt_limit": [0.0, 5.0]})


def test_a_null_num_key_value_heads_imports_as_one_kv_head_per_query_head():
    """``num_key_value_heads: null`` means num_attention_heads (multi-head attention, not one shared KV head), as
    NemotronHConfig's ``__post_init__`` sets it (transformers 5.25's typed fields refuse the null itself)."""
    from hybridlm.checkpoint.hf_nemotron import config_from_nemotron_h, nemotron_h_config

    hf = nemotron_h_config(config("M-*-")) | {"num_key_value_heads": None}
    assert hf["num_attention_heads"] == 4
    assert config_from_nemotron_h(hf).resolved_num_query_groups == 4


def test_an_export_refusal_names_the_layers_of_each_kind_it_cannot_hold():
    """It named the kind alone ("Gated DeltaNet ('G') layers"), leaving the user to count a long pattern."""
    with pytest.raises(CheckpointError) as err:
        check_exportable(config("M-G-M-G-D-/G-"))  # (the MTP depth is dropped: not listed)
    assert "Gated DeltaNet ('G') layers (canonical layers 2, 6): NemotronH has no such mixer" in str(err.value)
    assert "DeepSeek sparse attention ('D') layers (canonical layer 8):" in str(err.value)


def test_hf_eos_token_id_passes_over_json_nested_past_the_parser(tmp_path):
    """Nesting deeper than json parses raises RecursionError (no ValueError): passed over as other unreadable files,
    not "unexpected RecursionError" from convert --from nemotron-h."""
    from hybridlm.checkpoint.hf_nemotron import hf_eos_token_id

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "config.json").write_text(deep)
    (tmp_path / "generation_config.json").write_text(deep)
    assert hf_eos_token_id(tmp_path) is None
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert hf_eos_token_id(tmp_path) == 3


def test_the_end_of_document_id_is_read_past_a_fifo_not_waited_on(exported, tmp_path):
    """convert --from nemotron-h reads the id before the import: a FIFO named generation_config.json (a folder from
    someone else) blocked it forever; one named config.json too, which the import then refuses by name."""
    import os

    hf = shutil.copytree(exported, tmp_path / "hf")
    data = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(data | {"eos_token_id": 5}))
    with fifos_never_read(hf / "generation_config.json", hf / "config.json"):  # (a read would hang the suite)
        os.mkfifo(hf / "generation_config.json")
        assert hf_eos_token_id(hf) == 5
        (hf / "config.json").unlink()
        os.mkfifo(hf / "config.json")
        assert hf_eos_token_id(hf) is None
        with pytest.raises(CheckpointError, match=r"config\.json: not a regular file"):
            import_nemotron_h(hf)


def test_import_splits_stacked_experts_only_into_config_jsons_experts(exported, tmp_path):
    """A stacked tensor of 10**5 zero-size experts (a few bytes) was split into a view per expert: 10**8 of them took
    minutes and many GB before the refusal, which then named views, not the tensor in the file."""
    hf = shutil.copytree(exported, tmp_path / "hf")
    _damage_tensors(hf, lambda t: t.update({"backbone.layers.3.mixer.experts.up_proj": torch.zeros(10**5, 0, 0)}))
    with pytest.raises(CheckpointError) as err:
        import_nemotron_h(hf)
    assert re.search(r"unexpected tensors: \S+: backbone\.layers\.3\.mixer\.experts\.up_proj$", str(err.value), re.M)


#: The older config.json names transformers' NemotronHConfig still reads (and prefers), with a value other than
#: its default for each.
OLDER_NAMES = {
    "n_groups": ("mamba_n_groups", 2),
    "conv_kernel": ("mamba_d_conv", 3),
    "chunk_size": ("mamba_chunk_size", 64),
    "time_step_min": ("mamba_dt_min", 0.002),
    "time_step_max": ("mamba_dt_max", 0.2),
    "time_step_floor": ("mamba_dt_init_floor", 2e-4),
    "n_routed_experts": ("num_local_experts", 16),
    "use_conv_bias": ("mamba_conv_bias", False),
}


@pytest.mark.parametrize("key", sorted(OLDER_NAMES))
def test_an_older_key_name_is_read_as_transformers_reads_it(key):
    """A config.json written under an older name (``mamba_n_groups``) read as the default: another model."""
    from hybridlm.checkpoint.hf_nemotron import _hf_value

    older, value = OLDER_NAMES[key]
    assert getattr(NemotronHConfig(**{older: value}), key) == value  # (transformers reads it so)
    assert _hf_value({older: value}, key) == value
