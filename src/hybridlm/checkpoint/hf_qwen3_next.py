"""Hugging Face Qwen3-Next (``model_type: qwen3_next``, transformers' ``Qwen3NextForCausalLM``) import and export:
a config.json key table and a rule table on :mod:`hybridlm.checkpoint.adapter` (docs/checkpoints.md, "Hugging Face
Qwen3-Next").

A Qwen3-Next decoder layer is two of our canonical layers: its sequence mixer (Gated DeltaNet ``G`` or gated
attention ``*``) then its channel mixer (a routed MoE ``E``, or a dense SwiGLU MLP ``-``), each with its pre-norm::

    model.layers.{i}.input_layernorm / linear_attn.* | self_attn.*    layers.{2i}.norm / layers.{2i}.mixer.*
    model.layers.{i}.post_attention_layernorm / mlp.*                  layers.{2i+1}.norm / layers.{2i+1}.mixer.*

Every norm but GDN's gated one stores a zero-centred ``w`` (scale ``1 + w``), as ours does with
``norm_zero_centered``: they are taken as stored.

The published checkpoints also hold a one-layer MTP head, ``mtp.*``, which transformers skips and vLLM / SGLang
run for speculative decoding; it computes what our MTP depth computes (docs/checkpoints.md), one depth ``/*E``::

    mtp.fc / pre_fc_norm_embedding / pre_fc_norm_hidden / norm            mtp.0.eh_proj / enorm / hnorm / final_norm
    mtp.layers.0.*  (a full-attention decoder layer, as above)           mtp.0.layers.{0,1}.*
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..layers.rope import Yarn, yarn_mscale
from . import hf_files
from .adapter import Rule, apply, foreign_shapes, interleaved, per_expert, rename
from .io import CONFIG_NAME, errors_at, listed, meta_shapes, refuse_problems, weight_files
from .weights import read_tensors

logger = logging.getLogger(__name__)

HF_MODEL_TYPE = "qwen3_next"
HF_ARCHITECTURE = "Qwen3NextForCausalLM"
#: Hugging Face layer type -> our sequence mixer's pattern symbol.
SYMBOL_OF_LAYER_TYPE = {"linear_attention": "G", "full_attention": "*"}
LAYER_TYPES = {s: t for t, s in SYMBOL_OF_LAYER_TYPE.items()}

#: By the layer kind that reads them ("": every model), config.json key -> (our field, the default of transformers
#: 5.25's Qwen3NextConfig, which a key left out takes).
_KEYS_OF_KIND: dict[str, dict[str, tuple[str, Any]]] = {
    "": {
        "vocab_size": ("vocab_size", 151936),
        "hidden_size": ("hidden_size", 2048),
        "rms_norm_eps": ("norm_eps", 1e-6),
        "initializer_range": ("init_std", 0.02),
        "tie_word_embeddings": ("tie_embeddings", False),
    },
    "*": {
        "num_attention_heads": ("num_attention_heads", 16),
        "num_key_value_heads": ("num_query_groups", 2),
        "head_dim": ("head_dim", 256),
    },
    "-": {"intermediate_size": ("ffn_hidden_size", 5632)},
    "G": {
        "linear_num_key_heads": ("gdn_num_heads", 16),
        "linear_num_value_heads": ("gdn_num_value_heads", 32),
        "linear_key_head_dim": ("gdn_head_dim", 128),
        "linear_value_head_dim": ("gdn_value_head_dim", 128),
        "linear_conv_kernel_dim": ("gdn_conv_kernel", 4),
    },
    "E": {
        "num_experts": ("moe_num_experts", 512),
        "num_experts_per_tok": ("moe_top_k", 10),
        "moe_intermediate_size": ("moe_ffn_hidden_size", 512),
        "shared_expert_intermediate_size": ("moe_shared_expert_ffn_hidden_size", 512),
        "norm_topk_prob": ("moe_norm_topk_prob", True),
    },
}
#: The same, flat (:data:`~hybridlm.checkpoint.hf_files.Keys`): config.json key -> (our field, the layer kind that
#: reads it, the default).
_KEYS = {key: (field, kind, default) for kind, keys in _KEYS_OF_KIND.items() for key, (field, default) in keys.items()}
#: Defaults of the keys read only to decide the layout or to refuse what we do not compute.
_OTHER_DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 48,
    "full_attention_interval": 4,
    "decoder_sparse_step": 1,
    "hidden_act": "silu",
    "attention_bias": False,
    "partial_rotary_factor": 0.25,
    "rope_theta": 10000.0,
    "max_position_embeddings": 32768,
}

#: The options Qwen3-Next computes one way only (:data:`~hybridlm.checkpoint.hf_files.Options`).
_EXPORTABLE = {
    "norm_zero_centered": ("", (True,), "Qwen3-Next's norms store w and scale by 1 + w"),
    "position_embedding": ("*", ("rope",), "Qwen3-Next attention always uses RoPE"),
    "qk_norm": ("*", (True,), "Qwen3-Next attention always has query/key RMSNorms"),
    "attention_output_gate": ("*", (True,), "Qwen3-Next attention always has the output gate"),
    "mlp_activation": ("-E", ("swiglu",), "Qwen3-Next MLPs and experts are SwiGLU"),
    "moe_router_score": ("E", ("softmax",), "Qwen3-Next routes with softmax scores"),
    "moe_router_expert_bias": ("E", (False,), "Qwen3-Next's router has no selection bias"),
    "moe_routed_scaling": ("E", (1.0,), "Qwen3-Next does not scale routed outputs"),
    "moe_num_groups": ("E", (1,), "Qwen3-Next has no group-limited routing"),
}

#: A canonical layer's tensor: (``mtp.0.`` in the first MTP depth, else None; its index; the mixer's tensor, None: the norm).
_LAYER = re.compile(r"^(mtp\.0\.)?layers\.(\d+)\.(?:norm\.weight|mixer\.(.+))$")
_TOP = {
    "embeddings.weight": "model.embed_tokens.weight",
    "norm_f.weight": "model.norm.weight",
    # vLLM's Qwen3NextMultiTokenPredictor: fc(cat([pre_fc_norm_embedding(embed), pre_fc_norm_hidden(hidden)])).
    "mtp.0.eh_proj.weight": "mtp.fc.weight",
    "mtp.0.enorm.weight": "mtp.pre_fc_norm_embedding.weight",
    "mtp.0.hnorm.weight": "mtp.pre_fc_norm_hidden.weight",
    "mtp.0.final_norm.weight": "mtp.norm.weight",
}
_MTP = re.compile(r"^(model\.)?mtp\.")
_MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.")
#: transformers' in-memory expert stacks, (E, 2F, H) ``[gate; up]`` and (E, H, F), which a file may hold instead of
#: the per-expert matrices its save_pretrained writes.
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _value(hf: Mapping[str, Any], key: str) -> Any:
    return hf.get(key, _KEYS[key][2] if key in _KEYS else _OTHER_DEFAULTS[key])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _count(hf: Mapping[str, Any], key: str, source: str | Path, least: int = 1) -> int:
    """config.json ``hf``'s ``key`` (or its default); CheckpointError naming ``source`` unless an integer of at least
    ``least`` (1 or 0)."""
    n = _value(hf, key)
    if not _is_int(n) or n < least:
        raise CheckpointError(f"{source}: {key} must be a {'positive' if least else 'non-negative'} integer, got {n!r}")
    return n


def _layers(hf: Mapping[str, Any], source: str | Path, mtp: bool = False) -> str:
    """The canonical pattern of config.json ``hf``: per decoder layer its sequence mixer (``layer_types``, else every
    ``full_attention_interval``-th layer attention, as transformers derives it), then ``E`` where transformers builds
    a sparse MoE block (not in ``mlp_only_layers``, ``num_experts`` > 0, layer + 1 a multiple of
    ``decoder_sparse_step``), else ``-``. ``mtp``: then the one MTP depth vLLM builds, a full-attention decoder
    layer whose channel mixer is layer 0's (vLLM reads the index 0 from its name, ``mtp.layers.0``)."""
    n = _count(hf, "num_hidden_layers", source)
    types = hf.get("layer_types")
    if types is None:
        interval = _count(hf, "full_attention_interval", source)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)]
    mixers = hf_files.layer_symbols(types, "layer_types", SYMBOL_OF_LAYER_TYPE, source)
    if len(types) != n:
        raise CheckpointError(f"{source}: layer_types lists {len(types)} layers, but num_hidden_layers is {n}")
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(_is_int(i) for i in dense):
        raise CheckpointError(f"{source}: mlp_only_layers must be a list of layer indices, got {dense!r}")
    step, experts = _count(hf, "decoder_sparse_step", source), _count(hf, "num_experts", source, least=0)
    sparse = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)]
    pattern = "".join(s + ("E" if moe else "-") for s, moe in zip(mixers, sparse))
    return pattern + (f"/*{pattern[1]}" if mtp else "")


def _rope(hf: Mapping[str, Any]) -> tuple[str | None, Any, Any, Mapping[str, Any]]:
    """(rope type, rope_theta, partial_rotary_factor, all the parameters) as transformers reads them:
    ``rope_parameters`` (5.x), else the top-level keys and ``rope_scaling`` of older files."""
    params = hf.get("rope_parameters")
    if not isinstance(params, Mapping):
        params = dict(hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", _value(hf, "rope_theta"))
    return kind, theta, params.get("partial_rotary_factor", _value(hf, "partial_rotary_factor")), params


def _yarn_fields(hf: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(our ``yarn_*`` fields, problems) of YaRN ``params`` as transformers computes them (``_compute_yarn_parameters``):
    ``factor`` None is max_position_embeddings / original_max_position_embeddings; mscale and mscale_all_dim count
    only both set, else the cos/sin factor is ``0.1 ln(factor) + 1``; an explicit ``attention_factor`` is taken where
    some reading of them gives it exactly."""
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if original is None:
        original = _value(hf, "max_position_embeddings")
    factor = params.get("factor")
    if factor is None and isinstance(original, (int, float)) and original:
        factor = _value(hf, "max_position_embeddings") / original
    fields = {
        "rope_type": "yarn",
        "yarn_rotary_scaling_factor": factor,
        "yarn_original_max_position_embeddings": original,
        "yarn_beta_fast": params.get("beta_fast") or 32.0,
        "yarn_beta_slow": params.get("beta_slow") or 1.0,
        "yarn_correction_range_round_to_int": params.get("truncate", True),
    }
    mscale, all_dim = params.get("mscale"), params.get("mscale_all_dim")
    readings = [(mscale, all_dim) if mscale and all_dim else (1.0, 0.0), (mscale, all_dim)]
    wanted = params.get("attention_factor")
    for m, d in readings if wanted is not None else readings[:1]:
        if not all(isinstance(v, (int, float)) for v in (m, d, factor)):
            continue
        if wanted is None or yarn_mscale(factor, m) / yarn_mscale(factor, d) == wanted:
            return fields | {"yarn_mscale": m, "yarn_mscale_all_dim": d}, []
    if wanted is None:  # not numbers: ModelConfig says which
        return fields | {"yarn_mscale": mscale, "yarn_mscale_all_dim": all_dim}, []
    return fields, [
        f"rope_parameters' attention_factor={wanted!r} is not m(factor, mscale) / m(factor, mscale_all_dim), "
        "the YaRN cos/sin factor that hybridlm computes"
    ]


def _problems(hf: Mapping[str, Any], used: set[str]) -> list[str]:
    """Options of a Qwen3-Next config.json that our model does not compute (empty when all are fine)."""
    problems = []
    act = _value(hf, "hidden_act")
    if act != "silu":
        problems.append(
            f"hidden_act={act!r}: Qwen3-Next applies it in its MLPs, experts and Gated DeltaNet conv; only 'silu' "
            "(SwiGLU, the conv's SiLU) is supported"
        )
    if "*" in used and _value(hf, "attention_bias"):
        problems.append("attention_bias=true: attention q/k/v/o biases are not supported")
    kind, _, factor, params = _rope(hf)
    if "*" in used and kind not in ("default", "yarn"):
        problems.append(
            f"rope type {kind!r} (rope_parameters / rope_scaling): only the default RoPE and 'yarn' are supported"
        )
    if "*" in used and kind == "yarn":
        problems += _yarn_fields(hf, params)[1]
    head_dim = _value(hf, "head_dim")
    if "*" in used and isinstance(factor, (int, float)) and _is_int(head_dim) and int(head_dim * factor) % 2:
        problems.append(
            f"partial_rotary_factor={factor} of head_dim={head_dim} rotates an odd {int(head_dim * factor)} "
            "channels, which RoPE cannot pair"
        )
    shared = _value(hf, "shared_expert_intermediate_size")
    if "E" in used and shared == 0:
        problems.append(
            "shared_expert_intermediate_size=0: a zero-width shared expert with a shared_expert_gate is not "
            "supported (our gate needs a shared expert)"
        )
    return problems


def config_from_qwen3_next(hf: Mapping[str, Any], source: str | Path = CONFIG_NAME, mtp: bool = False) -> ModelConfig:
    """The :class:`ModelConfig` computing what Qwen3-Next computes for config.json ``hf`` (read from ``source``,
    which errors name): the canonical (unfused) pattern, gated attention with partial RoPE and q/k norms,
    zero-centred norms, SwiGLU MLPs and experts, softmax routing and a gated shared expert in every MoE layer;
    ``mtp``: with Qwen3-Next's MTP head as one MTP depth (:func:`_layers`), ``/*E`` where layer 0 is a MoE."""
    hf_files.check_model_type(hf, HF_MODEL_TYPE, source, "qwen3-next")
    pattern = _layers(hf, source, mtp)
    refuse_problems(f"{source}: this Qwen3-Next model cannot be imported", _problems(hf, used := set(pattern) - {"/"}))
    fields = hf_files.fields_from_hf(_KEYS, lambda key: _value(hf, key), used)
    fields |= {"pattern": pattern, "norm_zero_centered": True, "mlp_activation": "swiglu"}
    if "*" in used:
        kind, theta, factor, params = _rope(hf)
        fields |= {"position_embedding": "rope", "rope_theta": theta, "rotary_percent": factor}
        if kind == "yarn":
            fields |= _yarn_fields(hf, params)[0]
        fields |= {"qk_norm": True, "attention_output_gate": True}
    if "E" in used:
        fields |= {"moe_router_score": "softmax", "moe_shared_expert_gate": True}
    with errors_at(f"{source}: does not describe a valid model", ConfigError, TypeError):
        return ModelConfig(**fields)


def _rules(
    c: ModelConfig, dtype: torch.dtype | None = None, source: object = "the model config", mtp: int | None = None
) -> tuple[list[Rule], dict[str, tuple[int, ...]]]:
    """The rules and canonical shapes of ``c``'s main stack and its first ``mtp`` MTP depths (0 or 1; None: all of
    them), each an unfused pattern of (sequence mixer, channel mixer) pairs: q_proj holds ``[q_h | gate_h]`` per head
    h (our q_proj and gate_proj), experts one matrix each (the same in every ``dtype``: Qwen3-Next has no tensor for
    us to fill)."""
    layers, mtp_layers = c.parsed.layers, c.parsed.mtp_layers
    depths = c.parsed.mtp_depths if mtp is None else mtp
    shapes = meta_shapes(c.replace(pattern=layers + ("/" + mtp_layers) * depths), source)
    heads, d = c.num_attention_heads, c.resolved_head_dim
    rules = []
    for name in shapes:
        m = _LAYER.match(name)
        if m is None:
            rules.append(rename(name, _TOP.get(name, name)))  # lm_head.weight keeps its name
            continue
        i, second = divmod(int(m[2]), 2)
        p = f"{'mtp' if m[1] else 'model'}.layers.{i}."
        rest, symbol = m[3], (mtp_layers if m[1] else layers)[int(m[2])]
        if rest is None:
            rules.append(rename(name, p + ("post_attention_layernorm" if second else "input_layernorm") + ".weight"))
        elif symbol == "G":
            rules.append(rename(name, p + "linear_attn." + rest))
        elif symbol == "*" and rest == "q_proj.weight":  # with gate_proj: [q_h | gate_h] per head h
            q = (name, name.replace("q_proj", "gate_proj"))
            rules.append(interleaved(q, p + "self_attn.q_proj.weight", heads, [d, d]))
        elif symbol == "*" and rest != "gate_proj.weight":
            rules.append(rename(name, p + "self_attn." + rest))
        elif rest.startswith("experts."):
            rules.append(per_expert((name,), f"{p}mlp.experts.{{e}}.{rest.split('.')[1]}.weight", c.moe_num_experts))
        elif symbol in "E-":
            rules.append(rename(name, p + "mlp." + rest.replace("shared_experts.", "shared_expert.")))
    return rules, shapes


def _has_mtp(path: Path, files: Mapping[str, str], named: object = None) -> bool:
    """Whether the tensors ``files`` names (of directory ``path``) hold the one-layer MTP head this module maps
    (``mtp.layers.0.*``, the published checkpoints' head); other MTP tensors are left out, with a warning, as is a
    head config.json names (``named``: its ``num_nextn_predict_layers``) that no file holds."""
    layers = {int(m[1]) for k in files if (m := _MTP_LAYER.match(k))}
    if layers == {0}:
        return True
    if _is_int(named) and named > 0 and not any(_MTP.match(k) for k in files):
        # (a folder transformers saved again: its model has no MTP head)
        logger.warning(
            "%s: %s names num_nextn_predict_layers=%d, but no weight file holds an mtp.* tensor (transformers' "
            "save_pretrained leaves the MTP head out): read without an MTP depth",
            path,
            CONFIG_NAME,
            named,
        )
        return False
    why = (
        f"{len(layers)} MTP layers share one mtp.fc and its norms, where each of our MTP depths has its own"
        if len(layers) > 1
        else "they hold no MTP decoder layer (mtp.layers.0.*)"
    )
    hf_files.mtp_names(path, files, _MTP, why)  # a warning where there are any
    return False


def _read_weights(
    path: Path, files: Mapping[str, str], config: ModelConfig
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors ``files`` names (of directory ``path``) that ``config`` reads, under the per-expert keys the rules
    read, and where each was read ({key: "file: key"}). MTP tensors where ``config`` has no MTP depth and, in a
    tied model, a stored ``lm_head.weight`` (transformers ties it to the embedding) are left out."""
    skip = set() if config.parsed.mtp_depths else {k for k in files if _MTP.match(k)}
    if config.tie_embeddings and "lm_head.weight" in files:
        skip.add("lm_head.weight")
        logger.warning("%s: tie_word_embeddings is true: lm_head.weight is not read (the head is the embedding)", path)
    E, F = config.moe_num_experts, config.moe_ffn_hidden_size

    def unstack(key: str, t: torch.Tensor) -> list[tuple[str, int, torch.Tensor]]:
        stacked = _STACKED.match(key)
        if not (stacked and t.dim() == 3 and len(t) == E):  # split only into config.json's experts
            return []
        parts = ("gate_proj", "up_proj") if stacked[2] == "gate_up_proj" else ("down_proj",)
        return [
            (f"{stacked[1]}.{e}.{n}.weight", e, part)
            for e in range(E)
            for n, part in zip(parts, t[e].split(F) if len(parts) > 1 else (t[e],))
        ]

    return hf_files.as_read(path, files, read_tensors(path, [k for k in files if k not in skip], verify=False), unstack)


def import_qwen3_next(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our config and canonical tensors (in the file's dtypes) of a Qwen3-Next directory, as transformers reads it
    (per-expert or stacked experts), with its MTP head as one MTP depth where it holds one (``mtp.layers.0.*``).
    CheckpointError names the file and each offending option or tensor."""
    path = Path(path)
    files = weight_files(path)
    hf = hf_files.hf_config(path)
    config = config_from_qwen3_next(
        hf, path / CONFIG_NAME, mtp=_has_mtp(path, files, hf.get("num_nextn_predict_layers"))
    )
    state, where = _read_weights(path, files, config)
    rules, shapes = _rules(config, source=path / CONFIG_NAME)
    hf_files.check_import(path, "Qwen3-Next", state, where, foreign_shapes(rules, shapes))
    return config, apply(rules, state, export=False)


def convert_from_qwen3_next(src: str | Path, dst: str | Path, **options: Any) -> Path:
    """Convert Qwen3-Next directory ``src`` into hybridlm checkpoint ``dst``, as
    :func:`~hybridlm.checkpoint.hf_nemotron.convert_from_nemotron_h` does for NemotronH: the same keyword
    ``options``, the same files. The pattern written is the canonical, unfused one; ``hybridlm.load(dst,
    pattern=...)`` takes any brackets."""
    return hf_files.convert_from_hf(Path(src), dst, import_qwen3_next, **options)


# -- export ----------------------------------------------------------------------------------------


def check_exportable(config: ModelConfig) -> None:
    """Raise :class:`CheckpointError` listing every reason why Qwen3-Next cannot compute ``config``'s main stack
    (only options of the layer kinds it uses count; MTP depths it cannot write are dropped: :func:`_mtp_kept`)."""
    c, layers = config, config.parsed.layers
    used = set(layers)
    problems = []
    pairs = [layers[i : i + 2] for i in range(0, len(layers), 2)]
    odd = [
        f"{2 * k}-{2 * k + 1} '{p}'" for k, p in enumerate(pairs) if len(p) < 2 or p[0] not in "G*" or p[1] not in "E-"
    ]
    if odd:
        problems.append(
            "a Qwen3-Next decoder layer is a sequence mixer (G or *) then a channel mixer (E or -); canonical layers "
            f"{listed(odd)} are not such a pair"
        )
    rotated = int(c.resolved_head_dim * c.rotary_percent)
    if "*" in used and c.position_embedding == "rope" and rotated != c.rotary_dim:
        problems.append(
            f"rotary_percent={c.rotary_percent} of head_dim={c.resolved_head_dim}: transformers would rotate "
            f"{rotated} channels, an odd number (we rotate {c.rotary_dim})"
        )
    if "E" in used and not (c.moe_shared_expert_ffn_hidden_size and c.moe_shared_expert_gate):
        problems.append(
            "Qwen3-Next's MoE always has a shared expert with a shared_expert_gate: set "
            "moe_shared_expert_ffn_hidden_size > 0 and moe_shared_expert_gate=True"
        )
    hf_files.refuse_export(config, "Qwen3-Next", _EXPORTABLE, problems)


def _mtp_kept(config: ModelConfig) -> tuple[int, str]:
    """(MTP depths of exportable ``config`` written to Qwen3-Next, 0 or 1; why the others are dropped).

    Qwen3-Next's MTP head (vLLM's Qwen3NextMultiTokenPredictor) is our first depth when its layers are a decoder
    layer Qwen3-Next computes: full attention, then layer 0's channel mixer (vLLM reads the index 0 from the name
    ``mtp.layers.0``). Its layers share one ``fc`` and its norms, so a second depth of ours has no place."""
    p = config.parsed
    if not p.mtp_depths:
        return 0, ""
    if p.mtp_layers != (want := "*" + p.layers[1:2]):
        return 0, f"Qwen3-Next's MTP layer is full attention then layer 0's channel mixer, '{want}'"
    try:
        check_exportable(config.replace(pattern=p.layers + p.mtp_layers))  # the MTP layer as one more decoder layer
    except CheckpointError as e:
        return 0, "Qwen3-Next does not compute its layer: " + "; ".join(r.strip(" -") for r in str(e).splitlines()[1:])
    return 1, "Qwen3-Next's MTP layers share one mtp.fc and its norms, so only the first depth is written"


def qwen3_next_config(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The Qwen3-Next ``config.json`` of ``config`` (weights in ``torch_dtype``); keys of layer kinds the pattern
    does not use are Qwen3NextConfig's defaults (no layer reads them). With an MTP depth written
    (:func:`_mtp_kept`), ``num_nextn_predict_layers`` is 1: vLLM's ``qwen3_next_mtp`` reads it."""
    c, layers = config, config.parsed.layers
    mtp = _mtp_kept(config)[0]
    used = set(layers) | set(config.parsed.mtp_layers if mtp else "")
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "num_hidden_layers": len(layers) // 2,
        "layer_types": [LAYER_TYPES[s] for s in layers[::2]],
        "mlp_only_layers": [k for k, s in enumerate(layers[1::2]) if s == "-"] if "E" in used else [],
        "decoder_sparse_step": 1,
    }
    hf |= {k: v for k, v in _OTHER_DEFAULTS.items() if k in ("hidden_act", "attention_bias")}
    hf |= hf_files.hf_keys(c, _KEYS, used, every=True)
    if "E" not in used:
        hf["num_experts"] = 0  # every channel mixer is a dense MLP
    if "*" in used:
        hf["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": float(c.rope_theta),
            "partial_rotary_factor": c.rotary_percent,
        }
        if (yarn := Yarn.of(c)) is not None:
            # attention_factor written out: transformers reads mscale and mscale_all_dim only when both are set.
            hf["rope_parameters"] |= {
                "rope_type": "yarn",
                "factor": float(yarn.factor),  # floats, as transformers holds them (a run file's 4 is an int)
                "original_max_position_embeddings": yarn.original_max_position_embeddings,
                "beta_fast": float(yarn.beta_fast),
                "beta_slow": float(yarn.beta_slow),
                "mscale": float(yarn.mscale),
                "mscale_all_dim": float(yarn.mscale_all_dim),
                "attention_factor": yarn.amplitude(),
                "truncate": yarn.round_to_int,
            }
            hf["max_position_embeddings"] = round(yarn.factor * yarn.original_max_position_embeddings)
    if mtp:
        hf["num_nextn_predict_layers"] = mtp
    # transformers 5.25 cannot build a cache for a model without attention layers.
    return hf | {"use_cache": "*" in layers, "torch_dtype": torch_dtype}


def export_qwen3_next(
    config: ModelConfig, canonical: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, tensors under Qwen3-Next's keys) of a model's canonical tensors: see
    :func:`~hybridlm.checkpoint.hf_files.export_hf`."""
    mtp = _mtp_kept(config)
    return hf_files.export_hf(
        config,
        canonical,
        check_exportable,
        "transformers' Qwen3NextForCausalLM",
        lambda c, dtype: _rules(c, dtype, mtp=mtp[0]),
        qwen3_next_config,
        mtp,
    )


def convert_to_qwen3_next(src: str | Path, dst: str | Path, **options: Any) -> Path:
    """Convert hybridlm checkpoint directory ``src`` into a Hugging Face Qwen3-Next directory ``dst``, which
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads, as
    :func:`~hybridlm.checkpoint.hf_nemotron.convert_to_nemotron_h` does for NemotronH: the same keyword
    ``options`` (``max_shard_size``, ``verify``, ``eos_token_id``, ``extra_files``), the same files, and the MTP
    head where :func:`_mtp_kept` writes one (the MTP depths it cannot write are dropped with a warning)."""
    options["mtp_depths"] = lambda config: _mtp_kept(config)[0]  # the MTP depths it reads
    return hf_files.convert_to_hf(
        Path(src), dst, HF_MODEL_TYPE, "Qwen3-Next", check_exportable, export_qwen3_next, **options
    )
