"""The NemotronH exporter's hard-coded values are pinned to the installed transformers' defaults.

``nemotron_h_config`` writes some keys as constants (our config has no field for them) and the
importer fills keys a file leaves out from ``_HF_DEFAULTS``. Both must say what
``NemotronHConfig()`` says, so a transformers release that changes a default fails here.
"""

import pytest
from transformers import NemotronHConfig, NemotronHForCausalLM

from hybridlm import ModelConfig
from hybridlm.checkpoint import hf_nemotron as hf

HF = NemotronHConfig()

# Two exportable configs that differ in every field the exporter reads: the keys whose values are
# the same in both exports are the exporter's constants.
A = ModelConfig(
    pattern="M*-E",
    vocab_size=96,
    hidden_size=64,
    norm_eps=1e-5,
    init_std=0.02,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=16,
    ffn_hidden_size=48,
    mlp_activation="relu2",
    mamba_num_heads=4,
    mamba_head_dim=32,
    mamba_state_dim=8,
    mamba_num_groups=2,
    mamba_conv_kernel=4,
    mamba_chunk_size=8,
    mamba_dt_max=0.1,
    mamba_dt_init_floor=1e-4,
    moe_num_experts=8,
    moe_top_k=2,
    moe_ffn_hidden_size=24,
    moe_shared_expert_ffn_hidden_size=0,
    moe_router_score="sigmoid",
    moe_routed_scaling=1.0,
    moe_norm_topk_prob=True,
)
B = A.replace(
    pattern="E-*M-",
    vocab_size=128,
    hidden_size=32,
    norm_eps=1e-6,
    init_std=0.01,
    num_attention_heads=2,
    num_query_groups=1,
    head_dim=8,
    ffn_hidden_size=40,
    mlp_activation="gelu",
    mamba_num_heads=2,
    mamba_head_dim=16,
    mamba_state_dim=16,
    mamba_num_groups=1,
    mamba_conv_kernel=3,
    mamba_chunk_size=16,
    mamba_dt_max=0.2,
    mamba_dt_init_floor=2e-4,
    mamba_dt_clamp_min=1e-3,
    moe_num_experts=4,
    moe_top_k=1,
    moe_ffn_hidden_size=12,
    moe_shared_expert_ffn_hidden_size=16,
    moe_routed_scaling=2.5,
    moe_num_groups=2,
    moe_topk_groups=2,
    moe_norm_topk_prob=False,
)

#: Constants written on purpose with a value other than NemotronHConfig()'s, and why.
INTENTIONAL = {
    # NemotronHConfig() leaves it None; AutoModelForCausalLM needs the class name to load the folder.
    "architectures": [NemotronHForCausalLM.__name__],
}


def _constants() -> dict[str, object]:
    a, b = hf.nemotron_h_config(A, "float32"), hf.nemotron_h_config(B, "bfloat16")
    assert a.keys() | {"time_step_limit"} == b.keys()  # written for a model with a dt clamp (B) only
    return {k: a[k] for k in a if a[k] == b[k]}


def test_the_exporters_constants_are_the_ones_listed_here():
    # A constant added to the exporter must be added here (and so be checked below).
    assert set(_constants()) == {
        "architectures",
        "model_type",
        "attention_bias",
        "mlp_bias",
        "use_conv_bias",
        "use_bias",
        "mamba_hidden_act",
        "residual_in_fp32",
        "rescale_prenorm_residual",
        "tie_word_embeddings",
        "use_cache",
        "n_shared_experts",
        "num_nextn_predict_layers",
    }


@pytest.mark.parametrize("key", sorted(_constants()))
def test_exported_constant_is_transformers_default(key):
    value = _constants()[key]
    if key in INTENTIONAL:
        assert value == INTENTIONAL[key] and getattr(HF, key) != value
    else:
        assert getattr(HF, key) == value, f"{key}: we write {value!r}, NemotronHConfig() has {getattr(HF, key)!r}"


def test_values_that_differ_from_transformers_on_purpose():
    assert HF.model_type == hf.HF_MODEL_TYPE
    # time_step_min is a run-time clamp in transformers: an unclamped model is written with a tiny
    # positive value (never 0), which is not the default, so the file always states it.
    assert HF.time_step_min == hf.HF_DEFAULT_TIME_STEP_MIN
    assert 0 < hf.NO_CLAMP_TIME_STEP_MIN < HF.time_step_min
    assert hf.nemotron_h_config(A)["time_step_min"] == hf.NO_CLAMP_TIME_STEP_MIN
    # transformers cannot build a cache for a model without attention; with attention we keep its default.
    assert HF.use_cache is True
    assert hf.nemotron_h_config(A.replace(pattern="M-"))["use_cache"] is False
    # A MoE layer without a shared expert gets an all-zero one of width 1 (transformers always builds one).
    assert HF.n_shared_experts == 1 and hf.nemotron_h_config(A)["moe_shared_expert_intermediate_size"] == 1
    # "expand" is informative only; when hidden_size does not divide the inner width we write transformers' 2.
    assert HF.expand == 2 and hf.nemotron_h_config(A.replace(mamba_num_heads=3, mamba_num_groups=1))["expand"] == 2


@pytest.mark.parametrize("key", sorted(hf._HF_DEFAULTS))
def test_import_defaults_are_transformers_defaults(key):
    assert getattr(HF, key) == hf._HF_DEFAULTS[key], f"{key}: NemotronHConfig() has {getattr(HF, key)!r}"


def test_float_options_are_written_as_floats_like_transformers_defaults():
    """Options our config holds as a whole number (moe_routed_scaling=2) are written with the type of
    NemotronHConfig()'s value (2.0), as its JSON would hold them."""
    cfg = hf.nemotron_h_config(B.replace(moe_routed_scaling=2, norm_eps=1, mamba_dt_max=1))
    for key in ("routed_scaling_factor", "layer_norm_epsilon", "time_step_max"):
        assert type(cfg[key]) is type(getattr(HF, key)) is float, key
    assert (cfg["routed_scaling_factor"], cfg["layer_norm_epsilon"], cfg["time_step_max"]) == (2.0, 1.0, 1.0)
