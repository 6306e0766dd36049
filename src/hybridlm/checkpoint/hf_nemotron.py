"""Hugging Face NemotronH (``model_type: nemotron_h``) export and import.

NemotronH is the one Hugging Face family whose block is ours: ``x + mixer(RMSNorm(x))`` with exactly
one mixer of kind Mamba2 (``M``), attention (``*``), MLP (``-``) or MoE (``E``). Our canonical names
are NemotronH's in-memory names, so the two layouts differ only in a few places::

    canonical (hybridlm)                   Hugging Face file (what we write)
    embeddings.weight                      backbone.embeddings.weight
    layers.{i}.{norm,mixer}.…              backbone.layers.{i}.{norm,mixer}.…
    layers.{i}.mixer.experts.up_proj       backbone.layers.{i}.mixer.experts.{e}.up_proj.weight   (one per expert)
      (E, F, H) / down_proj (E, H, F)        (F, H) / …down_proj.weight (H, F)
    (no gate.e_score_correction_bias)      …mixer.gate.e_score_correction_bias = zeros (HF always has one)
    (no shared_experts)                    …mixer.shared_experts.{up,down}_proj.weight = zeros of width 1
    norm_f.weight                          backbone.norm_f.weight
    lm_head.weight (or tied)               lm_head.weight (always; a copy of the embedding when tied)
    mtp.{d}.…                              dropped: Hugging Face NemotronH does not run MTP

What the config must say for the two models to compute the same function (checked by
:func:`check_exportable`): only ``M * - E`` in the main stack, no RoPE and no QK-norm (NemotronH
attention has neither), non-gated relu² (or exact-erf GELU) MLPs and experts, sigmoid routing with
at least two experts per router group (Hugging Face scores a group by its top two experts).

Mamba2's dt clamp: Hugging Face clamps ``dt`` below at ``time_step_min`` in its (prefill) forward.
We write ``time_step_min = mamba_dt_clamp_min``, or 1e-9 when we do not clamp (never 0: older
transformers take its logarithm at load), and on import we clamp at the file's ``time_step_min``.

The file layout written here follows the portable template of the project's NemotronH fact sheet:
``hybrid_override_pattern`` (not ``layers_block_type``, which transformers ≤ 5.12 rejects),
``backbone.`` keys, one key per expert and an explicit ``lm_head.weight``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .io import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    atomic_directory,
    config_says,
    dominant_dtype,
    fit_problems,
    full_cpu,
    meta_shapes,
    read_json,
    weight_files,
    write_safetensors,
)
from .weights import read_config, read_tensors, save_state_dict

logger = logging.getLogger(__name__)

HF_MODEL_TYPE = "nemotron_h"
HF_ARCHITECTURE = "NemotronHForCausalLM"
#: ``time_step_min`` written for a model that does not clamp dt (0 would break transformers 5.6's init).
NO_CLAMP_TIME_STEP_MIN = 1e-9
#: Hugging Face's ``time_step_min`` when config.json leaves it out.
HF_DEFAULT_TIME_STEP_MIN = 1e-3
#: Width of the all-zero shared expert written for MoE layers that have none (HF always builds one).
ZERO_SHARED_EXPERT_SIZE = 1
#: Our MLP activations that Hugging Face's ``ACT2FN[name]`` computes identically
#: (relu2 = relu(x)², gelu = ``torch.nn.functional.gelu``, the exact erf form).
EXPORTABLE_ACTIVATIONS = ("relu2", "gelu")

#: Pattern symbol -> Hugging Face layer type (transformers >= 5.14 names).
LAYER_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
#: Hugging Face layer type (current and legacy names) -> pattern symbol.
SYMBOL_OF_LAYER_TYPE = {t: s for s, t in LAYER_TYPES.items()} | {"mamba": "M", "attention": "*"}
#: Why the other symbols of our pattern language have no NemotronH equivalent.
_UNSUPPORTED_SYMBOLS = {
    "G": "Gated DeltaNet ('G') layers: NemotronH has no such mixer",
    "D": "DeepSeek sparse attention ('D') layers: NemotronH has no such mixer",
    "+": "multi-latent attention ('+') layers: NemotronH has no such mixer",
}

#: Files other than the weights and config.json that travel with a conversion (tokenizer, generation).
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# Hugging Face NemotronHConfig defaults (transformers 5.24) of the fields read on import: a
# config.json that leaves a field out gets these from transformers too.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 21504,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 128,
    "mamba_hidden_act": "silu",
    "use_conv_bias": True,
    "use_bias": False,
    "time_step_min": HF_DEFAULT_TIME_STEP_MIN,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688,
    "moe_latent_size": None,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 0,
}
# Older names NemotronHConfig still reads; like transformers, the old name wins when both are present.
_HF_LEGACY_NAMES = {
    "n_groups": "mamba_n_groups",
    "conv_kernel": "mamba_d_conv",
    "time_step_min": "mamba_dt_min",
    "time_step_max": "mamba_dt_max",
    "time_step_floor": "mamba_dt_init_floor",
    "use_conv_bias": "mamba_conv_bias",
    "chunk_size": "mamba_chunk_size",
    "n_routed_experts": "num_local_experts",
}

#: Hugging Face config key <-> our ModelConfig field, written and read when the pattern uses one of
#: the layer kinds ("": always). Export writes ``resolved_<field>`` where the config has one.
CONFIG_MAP = (
    ("vocab_size", "vocab_size", ""),
    ("hidden_size", "hidden_size", ""),
    ("layer_norm_epsilon", "norm_eps", ""),
    ("initializer_range", "init_std", ""),
    ("num_attention_heads", "num_attention_heads", "*"),
    ("num_key_value_heads", "num_query_groups", "*"),
    ("head_dim", "head_dim", "*"),
    ("intermediate_size", "ffn_hidden_size", "-"),
    ("mlp_hidden_act", "mlp_activation", "-E"),
    ("mamba_num_heads", "mamba_num_heads", "M"),
    ("mamba_head_dim", "mamba_head_dim", "M"),
    ("ssm_state_size", "mamba_state_dim", "M"),
    ("n_groups", "mamba_num_groups", "M"),
    ("conv_kernel", "mamba_conv_kernel", "M"),
    ("chunk_size", "mamba_chunk_size", "M"),
    ("time_step_min", "mamba_dt_clamp_min", "M"),
    ("time_step_max", "mamba_dt_max", "M"),
    ("time_step_floor", "mamba_dt_init_floor", "M"),
    ("n_routed_experts", "moe_num_experts", "E"),
    ("num_experts_per_tok", "moe_top_k", "E"),
    ("moe_intermediate_size", "moe_ffn_hidden_size", "E"),
    ("moe_shared_expert_intermediate_size", "moe_shared_expert_ffn_hidden_size", "E"),
    ("routed_scaling_factor", "moe_routed_scaling", "E"),
    ("n_group", "moe_num_groups", "E"),
    ("topk_group", "moe_topk_groups", "E"),
    ("norm_topk_prob", "moe_norm_topk_prob", "E"),
)
#: Keys our config has no field for, written as NemotronH's defaults (pinned by test_hf_defaults)
#: when the pattern uses one of the layer kinds ("": always). NemotronH never ties its head: a
#: tied model is written with a copied head.
_CONSTANTS: dict[str, dict[str, Any]] = {
    "*": {"attention_bias": False},
    "": {
        "mlp_bias": False,
        "residual_in_fp32": False,
        "rescale_prenorm_residual": True,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
    },
    "M": {"use_conv_bias": True, "use_bias": False, "mamba_hidden_act": "silu"},
    "E": {"n_shared_experts": 1},
}

_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.mixer\.experts\.(\d+)\.(up_proj|down_proj)\.weight$")
_STACKED_EXPERTS = re.compile(r"^layers\.(\d+)\.mixer\.experts\.(up_proj|down_proj)$")


# -- what can be exported --------------------------------------------------------------------------


def export_problems(config: ModelConfig) -> list[str]:
    """Every reason ``config``'s main stack cannot be computed by Hugging Face NemotronH (empty if it can).

    MTP depths are not a problem: they are dropped on export. Only options of layer kinds the
    main pattern uses are looked at, as :class:`ModelConfig` does.
    """
    layers = config.parsed.layers
    used = set(layers)
    problems = [
        _UNSUPPORTED_SYMBOLS.get(s, f"'{s}' layers: not a NemotronH layer kind")
        for s in sorted(used - set(LAYER_TYPES))
    ]
    if "*" in used:
        if config.position_embedding != "none":
            problems.append(
                f"position_embedding={config.position_embedding!r}: NemotronH attention has no position "
                "embedding (no RoPE); only 'none' can be exported"
            )
        if config.qk_norm:
            problems.append("qk_norm=True: NemotronH attention has no query/key RMSNorm")
    if used & {"-", "E"} and config.mlp_activation not in EXPORTABLE_ACTIVATIONS:
        problems.append(
            f"mlp_activation={config.mlp_activation!r}: NemotronH MLPs and experts are non-gated "
            f"down(act(up(x))) with act in {', '.join(EXPORTABLE_ACTIVATIONS)}"
        )
    if "E" in used:
        if config.moe_router_score != "sigmoid":
            problems.append(f"moe_router_score={config.moe_router_score!r}: NemotronH routes with sigmoid scores")
        per_group = config.moe_num_experts // config.moe_num_groups
        if per_group < 2:
            problems.append(
                f"{config.moe_num_experts} expert(s) in {config.moe_num_groups} router group(s) leaves {per_group} "
                "per group: NemotronH scores each group by the sum of its top-2 experts, so every group "
                "needs at least 2 experts"
            )
    return problems


def check_exportable(config: ModelConfig) -> None:
    """Raise :class:`CheckpointError` listing every reason ``config`` cannot be written as NemotronH."""
    problems = export_problems(config)
    if problems:
        raise CheckpointError(
            f"pattern '{config.pattern}' cannot be exported as Hugging Face NemotronH:\n  - " + "\n  - ".join(problems)
        )


# -- export ----------------------------------------------------------------------------------------


def nemotron_h_config(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` of ``config`` as NemotronH (the portable template; see the module docstring).

    Options of layer kinds the main pattern does not use are left out (transformers' defaults
    apply and no layer reads them). ``torch_dtype`` is the weights' dtype name, e.g. "bfloat16".
    """
    c = config
    layers = c.parsed.layers
    used = set(layers)
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "num_hidden_layers": len(layers),
        "hybrid_override_pattern": layers,
    }
    for key, field, kinds in CONFIG_MAP:
        if not kinds or used & set(kinds):
            value = getattr(c, f"resolved_{field}", getattr(c, field))  # e.g. head_dim None -> its value
            hf[key] = float(value) if isinstance(getattr(ModelConfig, field, None), float) else value
    for kinds, constants in _CONSTANTS.items():
        if not kinds or used & set(kinds):
            hf |= constants
    if "M" in used:
        # Unused by the modeling code (the inner width is heads * head_dim); informative only.
        hf["expand"] = c.mamba_d_inner // c.hidden_size if c.mamba_d_inner % c.hidden_size == 0 else 2
        # The run-time lower clamp on dt; see the module docstring for why never 0.
        hf["time_step_min"] = hf["time_step_min"] or NO_CLAMP_TIME_STEP_MIN
    if "E" in used:
        hf["moe_shared_expert_intermediate_size"] = c.moe_shared_expert_ffn_hidden_size or ZERO_SHARED_EXPERT_SIZE
    # transformers 5.24 cannot build a cache for a model without attention layers.
    return hf | {"use_cache": "*" in used, "torch_dtype": torch_dtype}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every main-stack tensor of ``config``'s model (MTP left out: it is
    not exported, and may hold layers that cannot be built)."""
    return meta_shapes(config.replace(pattern=config.parsed.layers))


def _export_moe_defaults(config: ModelConfig, layer: int, tensors: dict[str, torch.Tensor]) -> None:
    """Add the MoE tensors NemotronH always has but ``config`` may lack, as exact no-ops.

    A zero selection bias changes no routing decision, and a zero-weight shared expert adds
    ``down(act(up(x))) = 0`` (down is zero), so the exported model computes ours.
    """
    prefix = f"backbone.layers.{layer}.mixer."
    if not config.moe_router_expert_bias:
        tensors[prefix + "gate.e_score_correction_bias"] = torch.zeros(config.moe_num_experts, dtype=torch.float32)
    if not config.moe_shared_expert_ffn_hidden_size:
        dtype = tensors[prefix + "experts.0.up_proj.weight"].dtype
        H, Fs = config.hidden_size, ZERO_SHARED_EXPERT_SIZE
        tensors[prefix + "shared_experts.up_proj.weight"] = torch.zeros(Fs, H, dtype=dtype)
        tensors[prefix + "shared_experts.down_proj.weight"] = torch.zeros(H, Fs, dtype=dtype)


def export_nemotron_h(
    config: ModelConfig, canonical: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Express a model as Hugging Face NemotronH.

    Args:
        config: the model's config (checked with :func:`check_exportable`).
        canonical: its canonical tensors (see ``hybridlm.checkpoint.canonical``), e.g. from
            ``canonical_state_dict(model)``; ``mtp.*`` tensors may be present and are dropped.

    Returns:
        ``(config.json dict, tensors under Hugging Face file keys)``: contiguous CPU tensors in
        the dtypes they had, no two sharing memory (safetensors refuses that, so per-expert
        slices and the copy of a tied head are cloned).

    Raises:
        CheckpointError: the config is not exportable, or the tensors do not fit it.
    """
    check_exportable(config)
    given = {k: tuple(t.shape) for k, t in canonical.items() if not k.startswith("mtp.")}
    problems = fit_problems(
        given, expected_shapes(config), wrong_shape="{name}: shape {got}, the config implies {want}", counted=False
    )
    if problems:
        raise CheckpointError("the tensors do not fit the config:\n  " + "\n  ".join(problems))
    p = config.parsed
    if p.mtp_depths:
        logger.warning(
            "dropping %d MTP depth(s) ('%s') on export: Hugging Face NemotronH does not run multi-token prediction",
            p.mtp_depths,
            p.mtp_layers,
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, t in canonical.items():
        if name.startswith("mtp."):
            continue
        t = full_cpu(t)  # detached, contiguous, on the CPU (an FSDP DTensor is gathered)
        if _STACKED_EXPERTS.match(name):  # (E, out, in) -> E tensors (out, in)
            tensors |= {hf_key(name, e): t[e].clone() for e in range(t.shape[0])}
        else:
            tensors[hf_key(name)] = t
    if "lm_head.weight" not in tensors:  # tied: Hugging Face needs its own copy
        tensors["lm_head.weight"] = tensors["backbone.embeddings.weight"].clone()
    for i, symbol in enumerate(p.layers):
        if symbol == "E":
            _export_moe_defaults(config, i, tensors)
    return nemotron_h_config(config, str(dominant_dtype(tensors.values())).removeprefix("torch.")), tensors


def _is_nemotron_h_dir(path: Path) -> bool:
    """May :func:`convert_to_nemotron_h` replace ``path``? Only if empty or a NemotronH directory."""
    return config_says(path, "model_type", HF_MODEL_TYPE)


def _aux_files(path: Path) -> dict[str, Path]:
    return {name: path / name for name in AUX_FILES if (path / name).is_file()}


def convert_to_nemotron_h(src: str | Path, dst: str | Path, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Convert hybridlm checkpoint directory ``src`` into a Hugging Face NemotronH directory ``dst``.

    ``dst`` gets config.json and model.safetensors (sharded above ``max_shard_size`` bytes), plus
    the tokenizer and generation files found in ``src``. It is written atomically; an existing
    ``dst`` is replaced only if it is empty or a NemotronH directory. MTP depths are dropped.

    Returns:
        ``dst``, loadable with ``transformers.AutoModelForCausalLM.from_pretrained``.
    """
    src, dst = Path(src), Path(dst)
    config = read_config(src)
    check_exportable(config)  # before reading any weights
    # Checked here for a clear message (atomic_directory checks again, race-free, before replacing).
    if dst.exists() and not _is_nemotron_h_dir(dst):
        raise CheckpointError(
            f"{dst} exists and is neither empty nor a Hugging Face NemotronH directory; refusing to replace it"
        )
    names = [n for n in weight_files(src) if not n.startswith("mtp.")]
    try:
        hf_config, tensors = export_nemotron_h(config, read_tensors(src, names))
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    aux = _aux_files(src)

    def write(tmp: Path) -> None:
        write_safetensors(tmp, tensors, max_shard_size)
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
        for name, file in aux.items():
            shutil.copyfile(file, tmp / name)

    return atomic_directory(dst, write, _is_nemotron_h_dir, "a Hugging Face NemotronH directory")


# -- import ----------------------------------------------------------------------------------------


def _hf_value(hf: Mapping[str, Any], name: str) -> Any:
    legacy = _HF_LEGACY_NAMES.get(name)
    if legacy is not None and legacy in hf:
        return hf[legacy]
    return hf.get(name, _HF_DEFAULTS[name])


def _hf_layers(hf: Mapping[str, Any]) -> str:
    """The pattern symbols of the file's layers (ValueError when none are given or some are unknown).

    ``layers_block_type`` (or its alias ``layer_types``) wins over ``hybrid_override_pattern``, as
    in transformers.
    """
    types = hf.get("layers_block_type", hf.get("layer_types"))
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ValueError(f"layers_block_type must be a list of strings, got {types!r}")
        unknown = sorted({t for t in types if t not in SYMBOL_OF_LAYER_TYPE})
        if unknown:
            raise ValueError(
                f"layers_block_type has unknown layer types {unknown}; known: {', '.join(SYMBOL_OF_LAYER_TYPE)}"
            )
        return "".join(SYMBOL_OF_LAYER_TYPE[t] for t in types)
    pattern = hf.get("hybrid_override_pattern")
    if pattern is None:
        raise ValueError("neither hybrid_override_pattern nor layers_block_type is set")
    if not isinstance(pattern, str):
        raise ValueError(f"hybrid_override_pattern must be a string, got {pattern!r}")
    unknown = sorted(set(pattern) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(
            f"hybrid_override_pattern {pattern!r} has symbols {unknown} that NemotronH does not know "
            f"(it knows {' '.join(LAYER_TYPES)})"
        )
    return pattern


def _hf_problems(hf: Mapping[str, Any], used: set[str]) -> list[str]:
    """Options of a NemotronH config.json that our model does not compute (empty when all are fine)."""
    problems = []
    if "M" in used:
        if _hf_value(hf, "mamba_hidden_act") != "silu":
            problems.append(
                f"mamba_hidden_act={_hf_value(hf, 'mamba_hidden_act')!r}: only 'silu' after the Mamba conv is supported"
            )
        if _hf_value(hf, "use_bias"):
            problems.append("use_bias=true: Mamba in_proj/out_proj biases are not supported")
    if used & {"-", "E"}:
        if _hf_value(hf, "mlp_bias"):
            problems.append("mlp_bias=true: MLP and expert biases are not supported")
        act = _hf_value(hf, "mlp_hidden_act")
        if act not in EXPORTABLE_ACTIVATIONS:
            problems.append(f"mlp_hidden_act={act!r}: supported are {', '.join(EXPORTABLE_ACTIVATIONS)}")
    if "E" in used:
        if _hf_value(hf, "moe_latent_size") is not None:
            problems.append(
                f"moe_latent_size={_hf_value(hf, 'moe_latent_size')}: latent MoE (fc1/fc2_latent_proj) is not supported"
            )
        experts, groups = _hf_value(hf, "n_routed_experts"), _hf_value(hf, "n_group")
        if isinstance(experts, int) and isinstance(groups, int) and groups > 0 and experts // groups < 2:
            problems.append(
                f"n_routed_experts={experts} in n_group={groups} groups: fewer than 2 experts per group, "
                "which Hugging Face NemotronH itself cannot run (it takes the top 2 per group)"
            )
    return problems


def config_from_nemotron_h(hf: Mapping[str, Any], source: str | Path = CONFIG_NAME) -> ModelConfig:
    """The :class:`ModelConfig` that computes what Hugging Face NemotronH computes for config ``hf``.

    Every MoE layer gets a shared expert and a selection bias (NemotronH always has both);
    :func:`import_nemotron_h` drops them again where the weights are exactly zero. Options of
    layer kinds the pattern does not use are left at our defaults.

    Args:
        hf: the parsed config.json.
        source: its path, for error messages.

    Raises:
        CheckpointError: naming ``source`` and every unsupported option.
    """
    if hf.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}, not {HF_MODEL_TYPE!r}")
    try:
        layers = _hf_layers(hf)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    used = set(layers)
    problems = _hf_problems(hf, used)
    if problems:
        raise CheckpointError(f"{source}: this NemotronH model cannot be imported:\n  - " + "\n  - ".join(problems))

    fields: dict[str, Any] = {
        field: _hf_value(hf, key) for key, field, kinds in CONFIG_MAP if not kinds or used & set(kinds)
    }
    fields |= {"pattern": layers, "tie_embeddings": False}  # Hugging Face never ties NemotronH's head
    if "*" in used:
        kv = fields["num_query_groups"]  # null means one KV head per query head
        fields |= {"num_query_groups": fields["num_attention_heads"] if kv is None else kv}
        fields |= {"position_embedding": "none", "qk_norm": False}
    # HF's time_step_min is both the dt-init minimum and the run-time clamp; the clamp is what
    # decides the outputs, so it becomes ours (mamba_dt_clamp_min). Our init minimum keeps its default.
    dt_max = fields.get("mamba_dt_max")
    if isinstance(dt_max, (int, float)) and dt_max < ModelConfig.mamba_dt_min:
        fields["mamba_dt_min"] = dt_max
    if "E" in used:
        fields |= {"moe_router_score": "sigmoid", "moe_router_expert_bias": True}
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{source}: does not describe a valid model: {e}") from None


def _read_hf_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a Hugging Face model is a directory with {CONFIG_NAME})")
    file = path / CONFIG_NAME
    hf = read_json(file, f"{path}: missing {CONFIG_NAME}")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return hf


def _file_key(key: str) -> str | None:
    """Canonical-style name of Hugging Face file key ``key`` (None: an MTP tensor, which HF ignores).

    Strips ``backbone.`` / ``model.`` and reads the singular ``embedding.weight`` of files written
    by transformers 5.3-5.15 as ``embeddings.weight``. Experts keep their per-expert form here.
    """
    for prefix in ("backbone.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    if key.startswith("mtp."):
        return None
    return "embeddings.weight" if key == "embedding.weight" else key


def hf_key(name: str, expert: int | str = "{e}") -> str:
    """The Hugging Face file key of canonical ``name`` (of one ``expert`` for a stacked expert tensor)."""
    stacked = _STACKED_EXPERTS.match(name)
    if stacked:
        return f"backbone.layers.{stacked.group(1)}.mixer.experts.{expert}.{stacked.group(2)}.weight"
    return name if name == "lm_head.weight" else "backbone." + name


class _Reader:
    """Tensors of a NemotronH directory under canonical names, remembering where each came from.

    Attributes:
        where: canonical name -> "file: key" it was read from (for messages).
        problems: what is wrong, one line each (duplicates, incomplete or uneven experts).
        broken: canonical names already covered by a problem (not reported again as missing).
        dropped_mtp: number of MTP tensors left out.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = weight_files(path)  # file key -> shard file name
        self.where: dict[str, str] = {}
        self.problems: list[str] = []
        self.broken: set[str] = set()
        self.dropped_mtp = 0

    def origin(self, key: str) -> str:
        return f"{self.path / self.files[key]}: {key}"

    def read(self, num_experts: int | None) -> dict[str, torch.Tensor]:
        """All non-MTP tensors under canonical names; per-expert tensors stacked to (E, out, in)."""
        keys: dict[str, str] = {}  # canonical-style name -> file key
        for key in self.files:
            name = _file_key(key)
            if name is None:
                self.dropped_mtp += 1
            elif name in keys:
                self.problems.append(f"{self.origin(key)} and {self.origin(keys[name])} are the same tensor")
            else:
                keys[name] = key
        raw = read_tensors(self.path, keys.values())
        out: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, str]] = {}  # stacked canonical name -> expert -> file key
        for name, key in keys.items():
            m = _EXPERT_KEY.match(name)
            if m:
                experts.setdefault(f"layers.{m.group(1)}.mixer.experts.{m.group(3)}", {})[int(m.group(2))] = key
            else:
                out[name] = raw[key]
                self.where[name] = self.origin(key)
        for name, by_expert in sorted(experts.items()):
            if name in out:
                self.problems.append(f"{self.where[name]}: the layer's experts are also stored one per expert")
                self.broken.add(name)
                continue
            stacked = self._stack(name, by_expert, raw, num_experts)
            if stacked is None:
                self.broken.add(name)
            else:
                out[name] = stacked
        return out

    def _stack(
        self, name: str, by_expert: dict[int, str], raw: dict[str, torch.Tensor], num_experts: int | None
    ) -> torch.Tensor | None:
        """Stack per-expert (out, in) tensors into (E, out, in); None (and a problem) if they do not fit."""
        first = by_expert[min(by_expert)]
        file = self.path / self.files[first]
        self.where[name] = f"{file}: {hf_key(name)}"
        count = num_experts if num_experts is not None else max(by_expert) + 1
        missing = sorted(set(range(count)) - set(by_expert))
        extra = sorted(set(by_expert) - set(range(count)))
        if missing:
            self.problems.append(f"{file}: {hf_key(name)}: no tensor for expert(s) {missing}")
        if extra:
            self.problems.append(f"{file}: {hf_key(name)}: expert(s) {extra} beyond n_routed_experts={count}")
        shape = tuple(raw[first].shape)
        uneven = [k for k in by_expert.values() if tuple(raw[k].shape) != shape]
        for k in uneven:
            self.problems.append(f"{self.origin(k)} has shape {tuple(raw[k].shape)}, but {first} has {shape}")
        if missing or extra or uneven:
            return None
        return torch.stack([raw[by_expert[e]] for e in sorted(by_expert)])


def _fill_conv_bias(config: ModelConfig, tensors: dict[str, torch.Tensor], where: dict[str, str]) -> None:
    """``use_conv_bias: false`` files have no conv bias; ours always has one, so add exact zeros."""
    for i, symbol in enumerate(config.parsed.layers):
        weight, bias = f"layers.{i}.mixer.conv1d.weight", f"layers.{i}.mixer.conv1d.bias"
        if symbol == "M" and weight in tensors and bias not in tensors:
            tensors[bias] = torch.zeros(tensors[weight].shape[0], dtype=tensors[weight].dtype)
            where[bias] = "(zeros: use_conv_bias is false)"


def _check_fit(config: ModelConfig, tensors: dict[str, torch.Tensor], reader: _Reader) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    where = reader.where

    def show(k: str) -> str:
        if k not in where:
            return hf_key(k)
        return where[k] + (" (stacked over the experts)" if _STACKED_EXPERTS.match(k) else "")

    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    problems = list(reader.problems)
    problems += fit_problems(
        shapes,
        expected_shapes(config),
        show=show,
        wrong_shape="{name} has shape {got}, but " + CONFIG_NAME + " implies {want}",
        skip=reader.broken,
        counted=False,
    )
    if problems:
        raise CheckpointError(f"{reader.path}: cannot import this NemotronH model:\n  - " + "\n  - ".join(problems))


def _drop_zero_moe_extras(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    """Drop the selection biases and shared experts if they are zero in every MoE layer.

    Exact: a zero bias changes no choice, and a shared expert with a zero down projection adds
    zero. This is how our own exports of models without them come back unchanged.
    """
    moe = [i for i, s in enumerate(config.parsed.layers) if s == "E"]
    if not moe:
        return config
    biases = [f"layers.{i}.mixer.gate.e_score_correction_bias" for i in moe]
    if all(not tensors[k].any() for k in biases):
        for k in biases:
            del tensors[k]
        config = config.replace(moe_router_expert_bias=False)
    downs = [f"layers.{i}.mixer.shared_experts.down_proj.weight" for i in moe]
    if all(not tensors[k].any() for k in downs):
        for i in moe:
            del tensors[f"layers.{i}.mixer.shared_experts.up_proj.weight"]
            del tensors[f"layers.{i}.mixer.shared_experts.down_proj.weight"]
        config = config.replace(moe_shared_expert_ffn_hidden_size=0)
    return config


def import_nemotron_h(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face NemotronH directory as our config and canonical tensors.

    Accepts what transformers accepts: ``backbone.`` or ``model.`` keys, per-expert
    (``experts.{e}.up_proj.weight``) or stacked (``experts.up_proj``, (E, F, H)) experts,
    ``hybrid_override_pattern`` or ``layers_block_type`` (current or legacy names), legacy
    ``mamba_*`` config names; plus the singular ``embedding.weight`` of older files. MTP
    tensors are dropped (Hugging Face does not run them). The model clamps dt at the file's
    ``time_step_min``, as Hugging Face's forward does (``time_step_limit`` is ignored, as
    transformers 5.15-5.24 ignore it), and never ties its head. Selection biases and shared
    experts that are zero in every MoE layer are dropped (exactly: they change nothing), so our
    own exports come back as they were. ``n_shared_experts`` is ignored: transformers always
    builds exactly one shared expert, whose weights must be in the file.

    Args:
        path: the directory (config.json plus model.safetensors or an index and shards).

    Returns:
        ``(config, canonical tensors)`` in the file's dtypes, ready for ``save_state_dict``.

    Raises:
        CheckpointError: an unreadable or unsupported directory; the message names the file and
            each offending option or tensor.
    """
    path = Path(path)
    hf = _read_hf_config(path)
    config = config_from_nemotron_h(hf, path / CONFIG_NAME)
    reader = _Reader(path)
    tensors = reader.read(config.moe_num_experts if "E" in config.parsed.layers else None)
    if reader.dropped_mtp or (
        isinstance(hf.get("num_nextn_predict_layers"), int) and hf["num_nextn_predict_layers"] > 0
    ):
        logger.warning(
            "%s: dropping the MTP layers (%d tensors): Hugging Face NemotronH does not run them",
            path,
            reader.dropped_mtp,
        )
    if "M" in config.parsed.layers and not _hf_value(hf, "use_conv_bias"):
        _fill_conv_bias(config, tensors, reader.where)
    _check_fit(config, tensors, reader)
    return _drop_zero_moe_extras(config, tensors), tensors


def convert_from_nemotron_h(src: str | Path, dst: str | Path, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Convert Hugging Face NemotronH directory ``src`` into hybridlm checkpoint directory ``dst``.

    The tokenizer and generation files of ``src`` are copied along. ``dst`` is written
    atomically and replaces only an empty directory or a hybridlm checkpoint.
    """
    src = Path(src)
    config, tensors = import_nemotron_h(src)
    return save_state_dict(tensors, config, dst, max_shard_size=max_shard_size, extra_files=_aux_files(src))
