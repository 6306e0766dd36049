"""Hugging Face NemotronH (``model_type: nemotron_h``) export and import: a config.json key table and a rule
table on :mod:`hybridlm.checkpoint.adapter` (docs/checkpoints.md, "Hugging Face NemotronH")."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..ops.norm import norm_scale
from ..pattern.symbols import KIND
from . import hf_files
from .adapter import Rule, apply, foreign_shapes, per_expert, rename, zeros
from .hf_files import AUX_FILES, hf_eos_token_id  # noqa: F401 (this module's names before hf_files)
from .io import CONFIG_NAME, errors_at, listed, meta_shapes, refuse_problems, weight_files
from .weights import read_tensors

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

#: Every config.json key we read or write (:data:`~hybridlm.checkpoint.hf_files.Keys`, with transformers 5.24's
#: NemotronHConfig defaults[, then an older name it still reads, which wins as in transformers]). A key without a field
#: is written as its default (pinned by test_hf_defaults) and read where another value would change the outputs
#: (:func:`_hf_problems`).
_KEYS: dict[str, tuple[Any, ...]] = {
    "vocab_size": ("vocab_size", "", 131072),
    "hidden_size": ("hidden_size", "", 4096),
    "layer_norm_epsilon": ("norm_eps", "", 1e-5),
    "initializer_range": ("init_std", "", 0.02),
    "num_attention_heads": ("num_attention_heads", "*", 32),
    "num_key_value_heads": ("num_query_groups", "*", 8),
    "head_dim": ("head_dim", "*", 128),
    "intermediate_size": ("ffn_hidden_size", "-", 21504),
    "mlp_hidden_act": ("mlp_activation", "-E", "relu2"),
    "mamba_num_heads": ("mamba_num_heads", "M", 128),
    "mamba_head_dim": ("mamba_head_dim", "M", 64),
    "ssm_state_size": ("mamba_state_dim", "M", 128),
    "n_groups": ("mamba_num_groups", "M", 8, "mamba_n_groups"),
    "conv_kernel": ("mamba_conv_kernel", "M", 4, "mamba_d_conv"),
    "chunk_size": ("mamba_chunk_size", "M", 128, "mamba_chunk_size"),
    "time_step_min": ("mamba_dt_clamp_min", "M", HF_DEFAULT_TIME_STEP_MIN, "mamba_dt_min"),
    "time_step_max": ("mamba_dt_max", "M", 0.1, "mamba_dt_max"),
    "time_step_floor": ("mamba_dt_init_floor", "M", 1e-4, "mamba_dt_init_floor"),
    "n_routed_experts": ("moe_num_experts", "E", 8, "num_local_experts"),
    "num_experts_per_tok": ("moe_top_k", "E", 2),
    "moe_intermediate_size": ("moe_ffn_hidden_size", "E", 7688),
    "moe_shared_expert_intermediate_size": ("moe_shared_expert_ffn_hidden_size", "E", 7688),
    "routed_scaling_factor": ("moe_routed_scaling", "E", 1.0),
    "n_group": ("moe_num_groups", "E", 1),
    "topk_group": ("moe_topk_groups", "E", 1),
    "norm_topk_prob": ("moe_norm_topk_prob", "E", True),
    "attention_bias": ("", "*", False),
    "mlp_bias": ("", "", False),
    "residual_in_fp32": ("", "", False),
    "rescale_prenorm_residual": ("", "", True),
    "tie_word_embeddings": ("", "", False),  # NemotronH never ties its head: a tied model gets a copy
    "num_nextn_predict_layers": ("", "", 0),
    "use_conv_bias": ("", "M", True, "mamba_conv_bias"),
    "use_bias": ("", "M", False),
    "mamba_hidden_act": ("", "M", "silu"),
    "n_shared_experts": ("", "E", 1),
    "moe_latent_size": (None, "E", None),
}
_HF_DEFAULTS = {key: row[2] for key, row in _KEYS.items()}
_HF_LEGACY_NAMES = {key: row[3] for key, row in _KEYS.items() if len(row) > 3}

#: The options NemotronH computes one way only (:data:`~hybridlm.checkpoint.hf_files.Options`).
_EXPORTABLE = {
    "position_embedding": (
        "*",
        ("none",),
        "NemotronH attention has no position embedding (no RoPE); only 'none' can be exported",
    ),
    "qk_norm": ("*", (False,), "NemotronH attention has no query/key RMSNorm"),
    "attention_output_gate": ("*", (False,), "NemotronH attention has no output gate (gate_proj)"),
    "mlp_activation": (
        "-E",
        EXPORTABLE_ACTIVATIONS,
        f"NemotronH MLPs and experts are non-gated down(act(up(x))) with act in {', '.join(EXPORTABLE_ACTIVATIONS)}",
    ),
    "moe_router_score": ("E", ("sigmoid",), "NemotronH routes with sigmoid scores"),
    "moe_shared_expert_gate": (
        "E",
        (False,),
        "NemotronH adds its shared expert ungated (Qwen3-Next's shared_expert_gate has no place in its MoE)",
    ),
}

_STACKED = re.compile(r"^(layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)$")
#: The canonical names of the main stack's norms that ``norm_zero_centered`` makes zero-centred (the q/k norms
#: are refused by check_exportable): NemotronH's RMSNorm is plain, so their scale 1 + w is what is exported.
_ZERO_CENTERED = re.compile(r"^(layers\.\d+\.norm|norm_f)\.weight$")


# -- export ----------------------------------------------------------------------------------------


def check_exportable(config: ModelConfig) -> None:
    """Raise :class:`CheckpointError` listing every reason why NemotronH cannot compute ``config``'s main stack
    (MTP depths are dropped on export; only options of the layer kinds it uses count)."""
    c, used = config, set(config.parsed.layers)
    problems = []
    for s in sorted(used - set(LAYER_TYPES)):
        at = [str(i) for i, x in enumerate(c.parsed.layers) if x == s]
        problems.append(
            f"{KIND[s]} ('{s}') layers (canonical layer{'s' * (len(at) > 1)} {listed(at)}): NemotronH has no such mixer"
        )
    if "E" in used and c.moe_num_experts // c.moe_num_groups < 2:
        problems.append(
            f"{c.moe_num_experts} expert(s) in {c.moe_num_groups} router group(s) leaves "
            f"{c.moe_num_experts // c.moe_num_groups} per group: NemotronH scores each group by the sum of its "
            "top-2 experts, so every group needs at least 2 experts"
        )
    hf_files.refuse_export(config, "NemotronH", _EXPORTABLE, problems)


def nemotron_h_config(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The NemotronH ``config.json`` of ``config`` (weights in ``torch_dtype``), without the options of layer kinds
    the main pattern does not use (no layer reads them)."""
    c = config
    layers = c.parsed.layers
    used = set(layers)
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "num_hidden_layers": len(layers),
        "hybrid_override_pattern": layers,
    } | hf_files.hf_keys(c, _KEYS, used)
    if "M" in used:
        # Unused by the modeling code (the inner width is heads * head_dim); informative only.
        hf["expand"] = c.mamba_d_inner // c.hidden_size if c.mamba_d_inner % c.hidden_size == 0 else 2
        # The run-time lower clamp on dt: never 0, which older transformers take the logarithm of at load.
        hf["time_step_min"] = hf["time_step_min"] or NO_CLAMP_TIME_STEP_MIN
        if c.mamba_dt_clamp_min > 0:  # transformers >= 5.25 clamps at time_step_limit's lower end instead
            hf["time_step_limit"] = [float(c.mamba_dt_clamp_min), {"__float__": "Infinity"}]  # (its inf in JSON)
    if "E" in used:
        hf["moe_shared_expert_intermediate_size"] = c.moe_shared_expert_ffn_hidden_size or ZERO_SHARED_EXPERT_SIZE
    # transformers 5.24 cannot build a cache for a model without attention layers.
    return hf | {"use_cache": "*" in used, "torch_dtype": torch_dtype}


def _rules(
    c: ModelConfig, dtype: torch.dtype | None = None, source: object = "the model config"
) -> tuple[list[Rule], dict[str, tuple[int, ...]]]:
    """The rules and canonical shapes of ``c``'s main stack (MTP is not exported): ``backbone.`` + name, one
    tensor per expert, always a head. On export (``dtype`` given) a missing selection bias or shared expert,
    which NemotronH always has, is written as exact no-ops: a zero bias changes no routing decision, and a
    zero down projection adds ``down(act(up(x))) = 0``."""
    shapes = meta_shapes(c.replace(pattern=c.parsed.layers), source)
    rules = []
    for name in shapes:
        stacked = _STACKED.match(name)
        if stacked:
            rules.append(per_expert((name,), f"backbone.{stacked[1]}.{{e}}.{stacked[2]}.weight", c.moe_num_experts))
        elif c.norm_zero_centered and _ZERO_CENTERED.match(name):
            rules.append(_scale_rule(name))
        else:
            rules.append(rename(name, name if name == "lm_head.weight" else "backbone." + name))
    if c.tie_embeddings:  # a copy: safetensors refuses two names for one tensor
        rules.append(Rule(("embeddings.weight",), ("lm_head.weight",), lambda ts: [ts[0].clone()]))
    for i in (i for i, s in enumerate(c.parsed.layers) if s == "E" and dtype is not None):
        p, H, Fs = f"backbone.layers.{i}.mixer.", c.hidden_size, ZERO_SHARED_EXPERT_SIZE
        if not c.moe_router_expert_bias:
            rules.append(zeros(p + "gate.e_score_correction_bias", (c.moe_num_experts,), torch.float32))
        if not c.moe_shared_expert_ffn_hidden_size:
            rules.append(zeros(p + "shared_experts.up_proj.weight", (Fs, H), dtype))
            rules.append(zeros(p + "shared_experts.down_proj.weight", (H, Fs), dtype))
    return rules, shapes


def _scale_rule(name: str) -> Rule:
    """A zero-centred norm weight ``w`` -> NemotronH's plain weight, the scale ``1 + w`` our model applies.

    Exported as :func:`~hybridlm.ops.norm.norm_scale` computes it: in float32, float64 for a float64 ``w``. So a
    float32 or float64 export holds exactly the model's scale, and a bf16 or fp16 model's norm weights are
    written as float32 (a few KB): ``1 + w`` rounded to bf16, whose spacing above 1 is 2^-7, would lose most of
    a trained ``w``; transformers casts them to the dtype it loads the model in.
    """
    return Rule((name,), ("backbone." + name,), lambda ts: [norm_scale(ts[0], True)], lambda ts: [ts[0] - 1])


def export_nemotron_h(
    config: ModelConfig, canonical: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, tensors under NemotronH's keys) of a model's canonical tensors (``mtp.*`` dropped), as
    contiguous CPU tensors in their dtypes; CheckpointError when :func:`check_exportable` refuses or they do not fit.
    """
    return hf_files.export_hf(config, canonical, check_exportable, "Hugging Face NemotronH", _rules, nemotron_h_config)


def convert_to_nemotron_h(src: str | Path, dst: str | Path, **options: Any) -> Path:
    """Convert hybridlm checkpoint directory ``src`` into a Hugging Face NemotronH directory ``dst``, which
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads: config.json, model.safetensors and the tokenizer
    and generation files of ``src``; MTP depths are dropped. Written atomically; an existing ``dst`` is replaced
    only if empty or a NemotronH directory. The keyword ``options`` (``max_shard_size``, ``verify``,
    ``eos_token_id``, ``extra_files``) are :func:`~hybridlm.checkpoint.hf_files.convert_to_hf`'s."""
    return hf_files.convert_to_hf(
        Path(src), dst, HF_MODEL_TYPE, "NemotronH", check_exportable, export_nemotron_h, **options
    )


# -- import ----------------------------------------------------------------------------------------


def _hf_value(hf: Mapping[str, Any], name: str) -> Any:
    legacy = _HF_LEGACY_NAMES.get(name)
    if legacy is not None and legacy in hf:
        return hf[legacy]
    return hf.get(name, _HF_DEFAULTS[name])


def _hf_layers(hf: Mapping[str, Any], source: str | Path) -> str:
    """The pattern symbols of the file's layers; ``layers_block_type`` (alias ``layer_types``) wins over
    ``hybrid_override_pattern``, as in transformers."""
    types = hf.get("layers_block_type", hf.get("layer_types"))
    if types is not None:  # a list of layer types (current or legacy names)
        return hf_files.layer_symbols(types, "layers_block_type", SYMBOL_OF_LAYER_TYPE, source)
    if (types := hf.get("hybrid_override_pattern")) is not None:  # a string of pattern symbols
        return hf_files.layer_symbols(types, "hybrid_override_pattern", {s: s for s in LAYER_TYPES}, source, "symbols")
    raise CheckpointError(f"{source}: neither hybrid_override_pattern nor layers_block_type is set")


def _dt_clamp(hf: Mapping[str, Any], source: str | Path) -> Any:
    """The lower clamp on Mamba's dt that transformers applies to config.json ``hf``: ``time_step_limit``'s lower
    end since 5.25 (and in NVIDIA's remote code); the native versions before it clamped at ``time_step_min``,
    which a file they wrote (``transformers_version``) is read with, so that it computes as it did for its author."""
    version = re.match(r"(\d+)\.(\d+)", str(hf.get("transformers_version", "")))
    if version and (5, 0) <= (int(version[1]), int(version[2])) < (5, 25):
        return _hf_value(hf, "time_step_min")
    key = "mamba_dt_limit" if "mamba_dt_limit" in hf else "time_step_limit"  # the legacy name first, as transformers
    limit = hf.get(key, [0.0, "inf"])
    try:
        lower, upper = (v.get("__float__") if isinstance(v, dict) else v for v in limit)
        if float(upper) != float("inf"):
            raise ValueError
    except (TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{source}: {key} must be [lower, Infinity] (no upper dt limit), got {limit}") from None
    return lower


def _hf_problems(hf: Mapping[str, Any], used: set[str]) -> list[str]:
    """Options of a NemotronH config.json that our model does not compute (empty when all are fine)."""
    act, mamba_act, latent = (_hf_value(hf, k) for k in ("mlp_hidden_act", "mamba_hidden_act", "moe_latent_size"))
    experts, groups = _hf_value(hf, "n_routed_experts"), _hf_value(hf, "n_group")
    problems = []
    if "M" in used and mamba_act != "silu":
        problems.append(f"mamba_hidden_act={mamba_act!r}: only 'silu' after the Mamba conv is supported")
    if "M" in used and _hf_value(hf, "use_bias"):
        problems.append("use_bias=true: Mamba in_proj/out_proj biases are not supported")
    if used & {"-", "E"} and _hf_value(hf, "mlp_bias"):
        problems.append("mlp_bias=true: MLP and expert biases are not supported")
    if used & {"-", "E"} and act not in EXPORTABLE_ACTIVATIONS:
        problems.append(f"mlp_hidden_act={act!r}: supported are {', '.join(EXPORTABLE_ACTIVATIONS)}")
    if "E" in used and latent is not None:
        problems.append(f"moe_latent_size={latent}: latent MoE (fc1/fc2_latent_proj) is not supported")
    if "E" in used and isinstance(experts, int) and isinstance(groups, int) and groups > 0 and experts // groups < 2:
        problems.append(
            f"n_routed_experts={experts} in n_group={groups} groups: fewer than 2 experts per group, "
            "which Hugging Face NemotronH itself cannot run (it takes the top 2 per group)"
        )
    return problems


def config_from_nemotron_h(hf: Mapping[str, Any], source: str | Path = CONFIG_NAME) -> ModelConfig:
    """The :class:`ModelConfig` computing what NemotronH computes for config.json ``hf`` (read from ``source``,
    which errors name), with a shared expert and selection bias in every MoE layer, as NemotronH has."""
    hf_files.check_model_type(hf, HF_MODEL_TYPE, source, "nemotron-h")
    layers = _hf_layers(hf, source)
    used = set(layers)
    refuse_problems(f"{source}: this NemotronH model cannot be imported", _hf_problems(hf, used))
    fields = hf_files.fields_from_hf(_KEYS, lambda key: _hf_value(hf, key), used)
    fields |= {"pattern": layers, "tie_embeddings": False}  # Hugging Face never ties NemotronH's head
    if "*" in used:
        kv = fields["num_query_groups"]  # null means one KV head per query head
        fields |= {"num_query_groups": fields["num_attention_heads"] if kv is None else kv}
        fields |= {"position_embedding": "none", "qk_norm": False}
    # The run-time clamp decides the outputs (HF's time_step_min is also the dt-init minimum, which ours
    # is not: it keeps its default).
    if "M" in used:
        fields["mamba_dt_clamp_min"] = _dt_clamp(hf, source)
    dt_max = fields.get("mamba_dt_max")
    if isinstance(dt_max, (int, float)) and dt_max < ModelConfig.mamba_dt_min:
        fields["mamba_dt_min"] = dt_max
    if "E" in used:
        fields |= {"moe_router_score": "sigmoid", "moe_router_expert_bias": True}
        # transformers builds a shared expert of width 0 (or null) as one of intermediate_size, as it computes.
        shared = fields["moe_shared_expert_ffn_hidden_size"] or _hf_value(hf, "intermediate_size")
        fields["moe_shared_expert_ffn_hidden_size"] = shared
    with errors_at(f"{source}: does not describe a valid model", ConfigError, TypeError):
        return ModelConfig(**fields)


#: Other spellings of the file keys transformers reads, -> the keys we write.
_ALIASES = (
    (re.compile(r"^model\."), "backbone."),
    (re.compile(r"^backbone\.embedding\.weight$"), "backbone.embeddings.weight"),  # transformers 5.3-5.15
    (re.compile(r"\.experts\.(up_proj|down_proj)\[(\d+)\]$"), r".experts.\2.\1.weight"),  # see _read_weights
)
_MTP = re.compile(r"^(backbone\.|model\.)?mtp\.")


def _read_weights(path: Path, hf: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The non-MTP tensors of directory ``path`` under the keys we write, and where each was read ({key: "file: key"}).

    Stacked experts (E, out, in) (transformers' in-memory layout) are read as ``…experts.up_proj[e]``,
    which the aliases rename to the per-expert key, so the per-expert rules read both layouts.
    """
    files, experts = weight_files(path), _hf_value(hf, "n_routed_experts")
    declared = isinstance(hf.get("num_nextn_predict_layers"), int) and hf["num_nextn_predict_layers"] > 0
    why = "Hugging Face NemotronH does not run them, and their import is not written yet"
    mtp = hf_files.mtp_names(path, files, _MTP, why, declared)

    def unstack(key: str, t: torch.Tensor) -> list[tuple[str, int, torch.Tensor]]:
        # Split only into config.json's experts: a (10**8, 0, 0) tensor, a few bytes, became 10**8 views (many GB).
        stacked = t.dim() > 0 and len(t) == experts and re.search(r"\.experts\.(up|down)_proj$", key)
        return [(f"{key}[{e}]", e, t[e]) for e in range(len(t))] if stacked else []

    return hf_files.as_read(
        path, files, read_tensors(path, [k for k in files if k not in mtp], verify=False), unstack, _ALIASES
    )


def _drop_zero_moe_extras(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    """Drop the selection biases, then the shared experts, if zero in every MoE layer (exact, see :func:`_rules`),
    so that our own exports of models without them come back unchanged."""
    moe = [f"layers.{i}.mixer." for i, s in enumerate(config.parsed.layers) if s == "E"]
    for field, off, names in (  # names[0] decides: the bias, or the shared expert's down projection
        ("moe_router_expert_bias", False, ("gate.e_score_correction_bias",)),
        ("moe_shared_expert_ffn_hidden_size", 0, ("shared_experts.down_proj.weight", "shared_experts.up_proj.weight")),
    ):
        if moe and not any(tensors[p + names[0]].any() for p in moe):
            for p in moe:
                for n in names:
                    del tensors[p + n]
            config = config.replace(**{field: off})
    return config


def import_nemotron_h(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our config and canonical tensors (in the file's dtypes) of a NemotronH directory, as transformers reads it
    (``model.`` keys, stacked experts, ``layers_block_type``, legacy names; also ``embedding.weight``), without
    MTP tensors and all-zero selection biases and shared experts. CheckpointError names the file and each
    offending option or tensor."""
    path = Path(path)
    hf = hf_files.hf_config(path)
    config = config_from_nemotron_h(hf, path / CONFIG_NAME)
    state, where = _read_weights(path, hf)
    problems = []
    if not _hf_value(hf, "use_conv_bias"):  # no conv bias in the file; ours is exact zeros
        for i in (i for i, s in enumerate(config.parsed.layers) if s == "M"):
            w, b = (f"backbone.layers.{i}.mixer.conv1d.{n}" for n in ("weight", "bias"))
            if b in state:  # transformers builds no bias and ignores this one: we would compute another model
                problems.append(f"{where[b]}: a conv bias, but {CONFIG_NAME} sets use_conv_bias false")
            elif w in state:
                state[b] = torch.zeros(state[w].shape[0], dtype=state[w].dtype)
    rules, shapes = _rules(config, source=path / CONFIG_NAME)
    hf_files.check_import(path, "NemotronH", state, where, foreign_shapes(rules, shapes), problems)
    tensors = apply(rules, state, export=False)
    return _drop_zero_moe_extras(config, tensors), tensors


def convert_from_nemotron_h(src: str | Path, dst: str | Path, **options: Any) -> Path:
    """Convert NemotronH directory ``src``, with its tokenizer and generation files, into hybridlm checkpoint ``dst``
    (written atomically; replaces only an empty directory or a hybridlm checkpoint); the keyword ``options``
    (``max_shard_size``, ``extra_files``) are :func:`~hybridlm.checkpoint.hf_files.convert_from_hf`'s."""
    return hf_files.convert_from_hf(Path(src), dst, import_nemotron_h, **options)
