"""``ModelConfig``: every architectural choice of a hybrid model, as one dataclass (pure Python).

The pattern string lays out the layers; the fields below size them. A field that only matters
for a layer kind the pattern does not use is ignored (and not validated);
:data:`FIELD_READERS` says which layers read which field. ``None`` defaults are
resolved by the ``resolved_*`` properties, never rewritten, so a saved config reads as written.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from .errors import ConfigError, UnknownFieldError
from .pattern import HybridPattern, PatternError, parse
from .pattern.symbols import KIND
from .presets import PRESETS  # re-exported: ``from hybridlm.config import PRESETS``

#: Version of the JSON layout written by :meth:`ModelConfig.to_dict`.
SCHEMA_VERSION = 1

MLP_ACTIVATIONS = ("relu2", "swiglu", "gelu")
POSITION_EMBEDDINGS = ("none", "rope")
#: ``rope_type``: the rotary frequencies, as Megatron-LM's MLA ``rope_type`` names them.
ROPE_TYPES = ("rope", "yarn")
ROUTER_SCORES = ("softmax", "sigmoid")
#: ``moe_aux_loss_type``: Megatron-LM's ``moe_router_load_balancing_type`` values that hybridlm computes.
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
#: The largest finite float32 (torch.finfo(torch.float32).max; this module imports no torch).
FLOAT32_MAX = 3.4028234663852886e38
#: The smallest normal float32 (torch.finfo(torch.float32).tiny).
FLOAT32_TINY = 1.1754943508222875e-38
#: Field-name prefixes of the fields only one layer kind reads (see :data:`FIELD_READERS`).
_PREFIX_READERS = (("mamba_", "M"), ("moe_", "E"), ("gdn_", "G"), ("dsa_", "D"), ("yarn_", "*+D"))

_C = TypeVar("_C", bound=type)


def refuse_unknown_keywords(refuse: Callable[[dict[str, Any]], None]) -> Callable[[_C], _C]:
    """Class decorator, placed above ``@dataclass``: the generated ``__init__`` first hands the keywords that name
    no field to ``refuse``, which raises in hybridlm's words (:class:`~hybridlm.errors.UnknownFieldError`, naming the
    field a Megatron-LM name stands for, else the closest one). Python's own "unexpected keyword argument
    'moe_router_topk'" said neither. Only the check is added: ``dataclasses.replace`` (which calls ``__init__``),
    copy, pickle (which does not) and equality are the dataclass's own, and ``inspect.signature`` sees the fields."""

    def decorate(cls: _C) -> _C:
        init: Callable[..., None] = cls.__dict__["__init__"]  # the one @dataclass generated
        names = frozenset(f.name for f in fields(cls))

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if not names.issuperset(kwargs):
                refuse({k: v for k, v in kwargs.items() if k not in names})
            init(self, *args, **kwargs)  # (a refuse that returned: Python's TypeError, still a refusal)

        setattr(cls, "__init__", __init__)  # noqa: B010 (mypy refuses assigning to a method)
        return cls

    return decorate


@refuse_unknown_keywords(lambda unknown: check_field_names(unknown, "ModelConfig"))
@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`hybridlm.HybridLM`. Field names are a stable contract."""

    # -- general ---------------------------------------------------------------------------
    pattern: str  #: layer pattern, e.g. "M-M-[*-]M-|M-[*E]M-/*-/*-"
    vocab_size: int
    hidden_size: int
    norm_eps: float = 1e-5  #: epsilon of every RMSNorm (block norms, final norm, gated norms)
    #: zero-centred norm weights: the pre-norms, final norms, MTP norms, attention's q/k and MLA's latent norms
    #: store w (initialized to 0) and scale by 1 + w (Megatron: layernorm_zero_centered_gamma; Qwen3-Next); the
    #: gated norms of Mamba2 and Gated DeltaNet stay plain
    norm_zero_centered: bool = False
    tie_embeddings: bool = False  #: share the input embedding with the output head
    init_std: float = 0.02  #: std of normal initializations; output projections get init_std/sqrt(layers)
    mtp_loss_scale: float = 0.1  #: weight of the mean MTP loss in the total loss

    # -- attention (*) ---------------------------------------------------------------------
    num_attention_heads: int | None = None
    num_query_groups: int | None = None  #: key/value heads (GQA); None = num_attention_heads
    head_dim: int | None = None  #: None = hidden_size / num_attention_heads
    position_embedding: str = "none"  #: "none" (NemotronH) or "rope"
    rope_theta: float = 10000.0
    rotary_percent: float = 1.0  #: fraction of head_dim that is rotated
    #: the rotary frequencies of every layer that rotates ('*' with position_embedding = "rope", '+', 'D'): "rope",
    #: or "yarn" (YaRN context extension by the yarn_* fields; Megatron: position_embedding_type / MLA rope_type
    #: "yarn"; Hugging Face: rope_parameters' rope_type "yarn")
    rope_type: str = "rope"
    #: YaRN's extension factor s: the slow frequencies are divided by it (HF: factor; Megatron MLA:
    #: rotary_scaling_factor)
    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096  #: the context length trained before the extension
    #: frequencies that turn more than yarn_beta_fast times over that length are kept, those turning fewer than
    #: yarn_beta_slow times are divided by s, a linear ramp between
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    #: cos and sin are scaled by m(s, yarn_mscale) / m(s, yarn_mscale_all_dim), m(s, a) = 0.1 a ln(s) + 1 (1 for
    #: s <= 1); 1.0 and 0.0: the YaRN paper's 0.1 ln(s) + 1
    yarn_mscale: float = 1.0
    #: also MLA's softmax scale ('+', 'D') is multiplied by m(s, yarn_mscale_all_dim)^2 (DeepSeek-V3)
    yarn_mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True  #: the ramp's ends rounded out to whole channels (HF: truncate)
    qk_norm: bool = False  #: RMSNorm on each query and key head
    #: Qwen3-Next's gated attention (Megatron's attention_output_gate): a per-head, per-channel gate projected from
    #: the layer input, the attention output times sigmoid(gate) before o_proj (a gate_proj beside q_proj)
    attention_output_gate: bool = False

    # -- MLP (-) -----------------------------------------------------------------------------
    ffn_hidden_size: int | None = None  #: None = 4 * hidden_size
    mlp_activation: str = "relu2"  #: "relu2" (relu(x)^2), "swiglu" or "gelu"

    # -- Mamba2 (M) --------------------------------------------------------------------------
    mamba_num_heads: int | None = None  #: None = 2 * hidden_size / mamba_head_dim (expand 2)
    mamba_head_dim: int = 64
    mamba_state_dim: int = 128
    mamba_num_groups: int = 8  #: B/C groups; the gated RMSNorm is computed per group too
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_dt_clamp_min: float = 0.0  #: lower clamp on dt at run time (0 = none; HF NemotronH: time_step_min)

    # -- MoE (E) -----------------------------------------------------------------------------
    moe_num_experts: int | None = None
    moe_top_k: int = 2
    moe_ffn_hidden_size: int | None = None  #: None = ffn_hidden_size
    moe_shared_expert_ffn_hidden_size: int = 0  #: 0 = no shared expert
    moe_shared_expert_gate: bool = False  #: scale the shared expert per token by sigmoid(x W), W (1, hidden)
    moe_router_score: str = "softmax"  #: "softmax" or "sigmoid"
    moe_router_expert_bias: bool = False  #: a per-expert bias that affects selection only
    moe_routed_scaling: float = 1.0
    moe_num_groups: int = 1  #: expert groups for group-limited routing
    moe_topk_groups: int = 1  #: groups a token may route to
    moe_norm_topk_prob: bool = True  #: renormalize the top-k weights to sum to 1
    moe_aux_loss_coeff: float = 0.0  #: load-balancing loss weight
    #: balance over the micro-batch ("aux_loss"), per sequence ("seq_aux_loss") or with the routed-token shares of
    #: every data-parallel rank's micro-batches of the step so far ("global_aux_loss", as Megatron-LM counts them)
    moe_aux_loss_type: str = "aux_loss"
    moe_z_loss_coeff: float = 0.0  #: router z-loss weight (ST-MoE: mean logsumexp(router logits)^2)

    # -- Gated DeltaNet (G) ------------------------------------------------------------------
    gdn_num_heads: int | None = None  #: query/key heads; None = hidden_size // gdn_head_dim, at least 1
    gdn_num_value_heads: int | None = None  #: None = gdn_num_heads
    gdn_head_dim: int = 128
    gdn_value_head_dim: int | None = None  #: None = gdn_head_dim
    gdn_conv_kernel: int = 4
    gdn_chunk_size: int = 64  #: positions per chunk of the chunked gated delta rule
    gdn_dt_min: float = 0.001  #: dt_bias init: softplus(dt_bias) log-uniform in [gdn_dt_min, gdn_dt_max]
    gdn_dt_max: float = 0.1
    gdn_dt_init_floor: float = 1e-4  #: lower clamp of that initial dt

    # -- multi-latent attention (+) and DeepSeek sparse attention (D) -------------------------
    # Megatron's MLATransformerConfig / TransformerConfig names. Both use num_attention_heads,
    # rope_theta (Megatron: rotary_base), rope_type and the yarn_* fields for their decoupled RoPE.
    q_lora_rank: int | None = 512  #: rank of the compressed query; None = a full-rank q projection
    kv_lora_rank: int = 512  #: rank of the compressed key/value latent (what the decoding cache keeps)
    qk_head_dim: int = 128  #: per-head query/key channels without RoPE (DeepSeek: qk_nope_head_dim)
    qk_pos_emb_head_dim: int = 64  #: per-head RoPE channels, the key part shared by all heads (qk_rope_head_dim)
    v_head_dim: int = 128
    dsa_indexer_n_heads: int = 64  #: lightning-indexer heads (D)
    dsa_indexer_head_dim: int = 128  #: lightning-indexer head size; its first qk_pos_emb_head_dim channels get RoPE
    dsa_indexer_topk: int = 2048  #: keys each query attends to (D)
    dsa_indexer_loss_coeff: float = 0.0  #: weight of the indexer's KL loss (0 = not computed)
    dsa_indexer_use_sparse_loss: bool = False  #: KL over the selected keys only (the sparse stage), not all

    def __post_init__(self) -> None:
        _check_types(self)
        _validate(self)

    # -- the parsed pattern and resolved sizes -------------------------------------------------

    @cached_property
    def parsed(self) -> HybridPattern:
        return parse(self.pattern)

    @property
    def symbols(self) -> set[str]:
        """Layer symbols used anywhere in the model (main stack and MTP)."""
        return set(self.parsed.layers) | set(self.parsed.mtp_layers)

    @property
    def resolved_num_query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads or 0

    @property
    def resolved_head_dim(self) -> int:
        if self.head_dim is not None:
            return self.head_dim
        return self.hidden_size // self.num_attention_heads if self.num_attention_heads else 0

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head (0 without RoPE); always even."""
        if self.position_embedding != "rope":
            return 0
        return int(self.resolved_head_dim * self.rotary_percent) // 2 * 2

    @property
    def resolved_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def resolved_mamba_num_heads(self) -> int:
        return self.mamba_num_heads or 2 * self.hidden_size // self.mamba_head_dim

    @property
    def mamba_d_inner(self) -> int:
        return self.resolved_mamba_num_heads * self.mamba_head_dim

    @property
    def resolved_moe_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.resolved_ffn_hidden_size

    @property
    def resolved_gdn_num_heads(self) -> int:
        return self.gdn_num_heads or max(1, self.hidden_size // self.gdn_head_dim)

    @property
    def resolved_gdn_num_value_heads(self) -> int:
        return self.gdn_num_value_heads or self.resolved_gdn_num_heads

    @property
    def resolved_gdn_value_head_dim(self) -> int:
        return self.gdn_value_head_dim or self.gdn_head_dim

    # -- construction helpers ------------------------------------------------------------------

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again; an unknown name is refused by ``__init__``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named configuration (see :data:`PRESETS`), optionally with fields overridden."""
        if not isinstance(name, str) or name not in PRESETS:
            hint = difflib.get_close_matches(name, PRESETS, n=1) if isinstance(name, str) else []
            raise ConfigError(
                "preset",
                f"unknown preset {name!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; known presets: {', '.join(PRESETS)}",
            )
        return cls(**{**PRESETS[name], **overrides})

    from_preset = preset  # the same, under the name other libraries use

    # -- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field (``None`` kept as ``null``) plus ``schema_version``."""
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for f in fields(self):
            d[f.name] = getattr(self, f.name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys and newer schema versions are refused."""
        if not isinstance(d, dict):
            raise ConfigError("config", f"expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("schema_version", SCHEMA_VERSION)
        if type(version) is not int or version > SCHEMA_VERSION or version < 1:
            raise ConfigError(
                "schema_version", f"this hybridlm reads config schema versions 1..{SCHEMA_VERSION}, got {version!r}"
            )
        check_field_names(d, "ModelConfig")
        missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ConfigError(missing[0], "required field is missing")
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | bytes | Path) -> ModelConfig:
        """Read a config from a JSON string (or UTF-8 bytes) or a ``.json`` file path (a Path, or a string naming a
        file)."""
        if isinstance(text_or_path, (bytes, bytearray)):  # a file's or a response's content (str() made a path of it)
            try:
                text_or_path = bytes(text_or_path).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError("config", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        text = str(text_or_path)
        json_like = text.lstrip().startswith(("{", "[")) or text.strip().isdigit()
        if isinstance(text_or_path, Path) or not json_like or _is_file(text):  # a file named "[v1].json" too
            if is_special_file(text_or_path):
                raise ConfigError("config", f"{text_or_path}: not a regular file")
            try:
                text = Path(text_or_path).read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError("config", f"cannot read {text_or_path}: {e.strerror}") from None
            except UnicodeDecodeError as e:
                raise ConfigError("config", f"{text_or_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer of over 4,300 digits
            raise ConfigError("config", f"invalid JSON: {e}") from None
        return cls.from_dict(d)


# -- which layers read which field ---------------------------------------------------------------

#: The layer symbols whose layers read each field that not every model reads ("/": the MTP depths).
#: The general fields (``vocab_size`` ... ``init_std``) are read by every model and left out. A
#: field a run sets that none of its layers reads changes nothing; :func:`unused_fields` names it
#: so that the trainer can say so. ``tests/test_config.py`` checks every entry against the models.
FIELD_READERS: dict[str, str] = {
    "mtp_loss_scale": "/",
    **dict.fromkeys(("num_attention_heads", "rope_theta", "rope_type"), "*+D"),
    **dict.fromkeys(
        ("num_query_groups", "head_dim", "position_embedding", "rotary_percent", "qk_norm", "attention_output_gate"),
        "*",
    ),
    **dict.fromkeys(("ffn_hidden_size", "mlp_activation"), "-E"),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"), "+D"),
    **{f.name: s for f in fields(ModelConfig) for p, s in _PREFIX_READERS if f.name.startswith(p)},
}


#: The fields only initialization or the training loss reads: trained weights compute the same function whatever
#: they are, so a resumed run may change them (a smaller moe_aux_loss_coeff; the DSA indexer's sparse loss stage
#: after its dense one). Any other field must be the checkpoint's.
TRAINING_ONLY_FIELDS = frozenset(
    (
        "init_std",
        "mtp_loss_scale",
        "mamba_dt_min",
        "mamba_dt_max",
        "mamba_dt_init_floor",
        "moe_aux_loss_coeff",
        "moe_aux_loss_type",
        "moe_z_loss_coeff",
        "gdn_dt_min",
        "gdn_dt_max",
        "gdn_dt_init_floor",
        "dsa_indexer_loss_coeff",
        "dsa_indexer_use_sparse_loss",
    )
)


def unused_fields(cfg: ModelConfig, names: Iterable[str]) -> dict[str, str]:
    """Of the fields ``names`` (those a user set), the ones no layer of ``cfg`` reads, each with why.

    Some fields are read only under another field's value: attention ('*') rotates with
    ``rope_theta``, ``rotary_percent``, ``rope_type`` and the ``yarn_*`` fields only when
    ``position_embedding = "rope"``, the ``yarn_*`` fields are read only with ``rope_type = "yarn"``, the MoE
    experts size themselves by ``ffn_hidden_size`` only while ``moe_ffn_hidden_size`` is unset,
    DSA reads ``dsa_indexer_use_sparse_loss`` only for its indexer loss
    (``dsa_indexer_loss_coeff > 0``), and MoE ``moe_aux_loss_type`` only for its balancing loss
    (``moe_aux_loss_coeff > 0``).
    """
    used = cfg.symbols | ({"/"} if cfg.parsed.mtp_depths else set())
    out = {}
    for name in names:
        readers = FIELD_READERS.get(name)
        if not readers:
            continue
        if not used & set(readers):
            kinds = [KIND[s] + f" ('{s}')" for s in readers if s != "/"]
            kinds = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else "".join(kinds)
            out[name] = f"the pattern has no {kinds} layers" if kinds else "the pattern has no MTP depths"
        elif (
            (name in ("rope_theta", "rotary_percent", "rope_type") or name.startswith("yarn_"))
            and cfg.position_embedding != "rope"
            and used & set(readers) == {"*"}
        ):
            out[name] = "attention ('*') rotates nothing with position_embedding = 'none'"
        elif name.startswith("yarn_") and cfg.rope_type != "yarn":
            out[name] = "the rotary frequencies are YaRN's only with rope_type = 'yarn'"
        elif name == "ffn_hidden_size" and cfg.moe_ffn_hidden_size is not None and "-" not in used:
            out[name] = "the MoE experts are sized by moe_ffn_hidden_size"
        elif name == "dsa_indexer_use_sparse_loss" and cfg.dsa_indexer_loss_coeff == 0:
            out[name] = "the indexer loss is not computed with dsa_indexer_loss_coeff = 0"
        elif name == "moe_aux_loss_type" and cfg.moe_aux_loss_coeff == 0:
            out[name] = "the balancing loss is not computed with moe_aux_loss_coeff = 0"
    return out


# -- validation ------------------------------------------------------------------------------------


def is_finite(value: int | float) -> bool:
    """Whether a number is finite as a float (an integer too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


#: Megatron-LM's names (arguments and TransformerConfig fields) for what ModelConfig calls otherwise or takes
#: from the pattern: the closest spelling points elsewhere (moe_router_topk -> moe_router_score, mtp_num_layers
#: -> moe_num_experts, rotary_base -> rotary_percent) or nowhere (hybrid_override_pattern, num_layers).
MEGATRON_NAMES = {
    **dict.fromkeys(("hybrid_layer_pattern", "hybrid_override_pattern"), "the layer pattern is 'pattern'"),
    "num_layers": "the number of layers follows from 'pattern' (one per symbol; a fused group holds two)",
    **dict.fromkeys(
        ("mtp_num_layers", "mtp_hybrid_override_pattern"),
        "MTP depths are the pattern's '/' parts: 'pattern': 'M-M*-/*-/*-' has two depths of '*-'",
    ),
    **dict.fromkeys(
        ("hybrid_attention_ratio", "hybrid_mlp_ratio"),
        "give 'pattern', e.g. from hybridlm.pattern_from_ratios(num_layers, attention_ratio, mlp_ratio)",
    ),
    "mtp_loss_scaling_factor": "hybridlm's is 'mtp_loss_scale'",
    "num_moe_experts": "hybridlm's is 'moe_num_experts'",
    "moe_router_topk": "hybridlm's is 'moe_top_k'",
    "moe_router_score_function": "hybridlm's is 'moe_router_score'",
    "moe_router_enable_expert_bias": "hybridlm's is 'moe_router_expert_bias'",
    "moe_router_topk_scaling_factor": "hybridlm's is 'moe_routed_scaling'",
    "moe_router_num_groups": "hybridlm's is 'moe_num_groups'",
    "moe_router_group_topk": "hybridlm's is 'moe_topk_groups'",
    "moe_router_pre_softmax": "hybridlm's is 'moe_norm_topk_prob' = false (with 'moe_router_score' softmax)",
    "moe_shared_expert_intermediate_size": "hybridlm's is 'moe_shared_expert_ffn_hidden_size'",
    "moe_router_bias_update_rate": "a training setting in hybridlm: optim.moe_expert_bias_rate",
    "moe_router_load_balancing_type": "hybridlm's is 'moe_aux_loss_type' ('aux_loss', 'seq_aux_loss' or 'global_aux_loss')",
    "apply_wd_to_qk_layernorm": "a training setting in hybridlm: optim.apply_wd_to_qk_layernorm",
    "kv_channels": "hybridlm's is 'head_dim'",
    "rotary_base": "hybridlm's is 'rope_theta'",
    "position_embedding_type": "hybridlm's is 'position_embedding' ('none' or 'rope'); YaRN is 'rope_type' = 'yarn'",
    "rotary_scaling_factor": "hybridlm's is 'yarn_rotary_scaling_factor' (with 'rope_type' = 'yarn')",
    **{
        name: f"hybridlm's is 'yarn_{name}' (with 'rope_type' = 'yarn')"
        for name in ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    },
    "layernorm_epsilon": "hybridlm's is 'norm_eps'",
    **dict.fromkeys(("layernorm_zero_centered_gamma", "apply_layernorm_1p"), "hybridlm's is 'norm_zero_centered'"),
    "init_method_std": "hybridlm's is 'init_std'",
    "qk_layernorm": "hybridlm's is 'qk_norm'",
    **dict.fromkeys(
        ("share_embeddings_and_output_weights", "untie_embeddings_and_output_weights"), "hybridlm's is 'tie_embeddings'"
    ),
    **dict.fromkeys(
        ("squared_relu", "swiglu", "gated_linear_unit"), "hybridlm's is 'mlp_activation' ('relu2', 'swiglu' or 'gelu')"
    ),
    "padded_vocab_size": "hybridlm's is 'vocab_size'",
    # Gated DeltaNet: Megatron's TransformerConfig takes Qwen3-Next's names.
    "linear_num_key_heads": "hybridlm's is 'gdn_num_heads'",
    "linear_num_value_heads": "hybridlm's is 'gdn_num_value_heads'",
    "linear_key_head_dim": "hybridlm's is 'gdn_head_dim'",
    "linear_value_head_dim": "hybridlm's is 'gdn_value_head_dim'",
    "linear_conv_kernel_dim": "hybridlm's is 'gdn_conv_kernel'",
    **dict.fromkeys(
        ("seq_length", "max_position_embeddings"),
        "the sequence length is not part of the model (hybridlm train: data.seq_len; YaRN's pretrained length is "
        "'yarn_original_max_position_embeddings')",
    ),
}


_PLACED_BY_PATTERN = (
    "the pattern places every layer, one symbol each: 'pattern': 'GEGEGE*E' makes every fourth sequence mixer "
    "attention, each followed by an MoE"
)

#: Hugging Face config.json names (Qwen3-Next, Jamba, NemotronH, Llama-style attention) for what ModelConfig calls
#: otherwise or takes from the pattern, where the closest spelling pointed elsewhere (num_experts_per_tok ->
#: moe_num_experts, num_key_value_heads -> gdn_num_value_heads, mamba_expand -> mamba_head_dim) or nowhere
#: (intermediate_size, partial_rotary_factor, attn_layer_period). A name Megatron-LM shares is in MEGATRON_NAMES.
HF_NAMES = {
    "num_hidden_layers": MEGATRON_NAMES["num_layers"],
    **dict.fromkeys(
        (
            "layer_types",
            "full_attention_interval",
            "decoder_sparse_step",
            "mlp_only_layers",
            "attn_layer_period",
            "attn_layer_offset",
            "expert_layer_period",
            "expert_layer_offset",
        ),
        _PLACED_BY_PATTERN,
    ),
    "num_nextn_predict_layers": MEGATRON_NAMES["mtp_num_layers"],
    "intermediate_size": "hybridlm's is 'ffn_hidden_size'",
    "hidden_act": "hybridlm's is 'mlp_activation' ('relu2', 'swiglu' or 'gelu'; a gated 'silu' MLP is 'swiglu')",
    "num_key_value_heads": "hybridlm's is 'num_query_groups' (attention's key/value heads)",
    "partial_rotary_factor": "hybridlm's is 'rotary_percent' (with position_embedding = 'rope')",
    **dict.fromkeys(
        ("rope_scaling", "rope_parameters"),
        "hybridlm's are 'rope_theta', 'rotary_percent', 'rope_type' ('rope' or 'yarn') and the 'yarn_*' fields "
        "(factor: 'yarn_rotary_scaling_factor', truncate: 'yarn_correction_range_round_to_int')",
    ),
    "rms_norm_eps": "hybridlm's is 'norm_eps'",
    "layer_norm_epsilon": "hybridlm's is 'norm_eps'",
    "initializer_range": "hybridlm's is 'init_std'",
    "tie_word_embeddings": "hybridlm's is 'tie_embeddings'",
    **dict.fromkeys(("num_experts", "n_routed_experts"), "hybridlm's is 'moe_num_experts'"),
    "num_experts_per_tok": "hybridlm's is 'moe_top_k'",
    "moe_intermediate_size": "hybridlm's is 'moe_ffn_hidden_size'",
    "shared_expert_intermediate_size": "hybridlm's is 'moe_shared_expert_ffn_hidden_size'",
    "norm_topk_prob": "hybridlm's is 'moe_norm_topk_prob'",
    "router_aux_loss_coef": "hybridlm's is 'moe_aux_loss_coeff'",
    "routed_scaling_factor": "hybridlm's is 'moe_routed_scaling'",
    "mamba_d_state": "hybridlm's is 'mamba_state_dim'",
    "ssm_state_size": "hybridlm's is 'mamba_state_dim'",
    "mamba_d_conv": "hybridlm's is 'mamba_conv_kernel'",
    "conv_kernel": "hybridlm's is 'mamba_conv_kernel'",
    "n_groups": "hybridlm's is 'mamba_num_groups'",
    "mamba_expand": "Mamba2's width is 'mamba_num_heads' x 'mamba_head_dim' (default: 2 x hidden_size, expand 2)",
    "mamba_dt_rank": "Mamba2 ('M') has one dt per head, no low-rank dt projection (Jamba's Mamba is Mamba1)",
}


def check_field_names(values: dict[str, Any], what: str = "ModelConfig") -> None:
    """Refuse keys of ``values`` that are not ModelConfig fields (naming the field a Megatron-LM or Hugging Face
    name stands for, else suggesting the closest one)."""
    names = [f.name for f in fields(ModelConfig)]
    for key in values:
        if not isinstance(key, str):
            raise ConfigError(str(key), f"a {what} field name must be a string, got {key!r}")
        if key in MEGATRON_NAMES:
            raise UnknownFieldError(key, f"unknown {what} field (a Megatron-LM name): {MEGATRON_NAMES[key]}")
        if key in HF_NAMES:
            raise UnknownFieldError(key, f"unknown {what} field (a Hugging Face name): {HF_NAMES[key]}")
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            raise UnknownFieldError(key, f"unknown {what} field" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _check_types(cfg: ModelConfig) -> None:
    hints = get_type_hints(ModelConfig)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        allowed = get_args(hints[f.name]) if get_origin(hints[f.name]) is not None else (hints[f.name],)
        if value is None and type(None) in allowed:
            continue
        ok = False
        for t in allowed:
            if t is bool:
                ok |= isinstance(value, bool)
            elif t is int:
                ok |= isinstance(value, int) and not isinstance(value, bool)
            elif t is float:
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            elif t is str:
                ok |= isinstance(value, str)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f.name, f"expected {names}, got {value!r} ({type(value).__name__})")
        if float in allowed and isinstance(value, (int, float)) and not is_finite(value):
            raise ConfigError(f.name, f"must be finite, got {value!r}")
        if float not in allowed and isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ConfigError(f.name, f"must fit in 64 bits, got {value}")  # a tensor size or a seed


def _positive(cfg: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(name, f"must be positive, got {value}")


def _dt_bound(cfg: ModelConfig, name: str) -> None:
    """A lower bound on dt (``*_dt_init_floor``, ``mamba_dt_clamp_min``): at least 0, and a float32 (dt_bias
    and the step sizes are float32 tensors, which torch refuses to clamp at a bound they cannot hold)."""
    value = getattr(cfg, name)
    if value < 0:
        raise ConfigError(name, f"must be >= 0, got {value}")
    if value > FLOAT32_MAX:
        raise ConfigError(name, f"must be at most {FLOAT32_MAX:.7g} (the largest float32), got {value}")


def _dt_init_range(cfg: ModelConfig, prefix: str) -> None:
    """``{prefix}_dt_min``, ``{prefix}_dt_max``, ``{prefix}_dt_init_floor``: the dt range a mixer's init draws from."""
    lo, hi, floor = (f"{prefix}_dt_min", f"{prefix}_dt_max", f"{prefix}_dt_init_floor")
    _positive(cfg, lo, hi)
    if getattr(cfg, lo) > getattr(cfg, hi):
        raise ConfigError(lo, f"{getattr(cfg, lo)} is larger than {hi} ({getattr(cfg, hi)})")
    _dt_bound(cfg, floor)
    # The draw is float32: a dt beyond its range made dt_bias inf (a NaN loss), one that rounds to 0 made it -inf.
    if getattr(cfg, hi) > FLOAT32_MAX:
        raise ConfigError(hi, f"must be at most {FLOAT32_MAX:.7g} (the largest float32), got {getattr(cfg, hi)}")
    if max(getattr(cfg, lo), getattr(cfg, floor)) < FLOAT32_TINY:
        raise ConfigError(
            lo,
            f"{getattr(cfg, lo)} and {floor} ({getattr(cfg, floor)}) are both below {FLOAT32_TINY:.7g} (the smallest "
            "normal float32): an initial dt would round to 0 and its dt_bias to -inf",
        )


def _choice(cfg: ModelConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(repr, choices))}, got {getattr(cfg, name)!r}")


def _validate(cfg: ModelConfig) -> None:
    try:
        p = parse(cfg.pattern)
    except PatternError as e:
        raise ConfigError("pattern", str(e)) from None
    if not p.layers:  # Megatron's parser takes it; a model of no layers is an empty or mistyped string
        raise ConfigError("pattern", f"{cfg.pattern!r} has no layers in its main stack")
    used = set(p.layers) | set(p.mtp_layers)
    _positive(cfg, "vocab_size", "hidden_size", "norm_eps", "init_std")
    if cfg.mtp_loss_scale < 0:
        raise ConfigError("mtp_loss_scale", f"must be >= 0, got {cfg.mtp_loss_scale}")

    if "*" in used:
        if cfg.num_attention_heads is None:
            raise ConfigError("num_attention_heads", "required: the pattern has attention ('*') layers")
        _positive(cfg, "num_attention_heads", "num_query_groups", "head_dim", "rope_theta")
        if cfg.num_attention_heads % cfg.resolved_num_query_groups:
            raise ConfigError(
                "num_query_groups",
                f"{cfg.resolved_num_query_groups} must divide num_attention_heads ({cfg.num_attention_heads})",
            )
        if cfg.head_dim is None and cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(
                "head_dim",
                f"not set, and hidden_size ({cfg.hidden_size}) is not divisible by num_attention_heads "
                f"({cfg.num_attention_heads}); set head_dim",
            )
        _choice(cfg, "position_embedding", POSITION_EMBEDDINGS)
        if not 0.0 < cfg.rotary_percent <= 1.0:
            raise ConfigError("rotary_percent", f"must be in (0, 1], got {cfg.rotary_percent}")
        if cfg.position_embedding == "rope" and cfg.rotary_dim < 2:
            raise ConfigError("rotary_percent", f"rotates fewer than 2 of the {cfg.resolved_head_dim} head channels")

    if "-" in used or ("E" in used and cfg.moe_ffn_hidden_size is None):
        _positive(cfg, "ffn_hidden_size")
    if used & {"-", "E"}:
        _choice(cfg, "mlp_activation", MLP_ACTIVATIONS)

    if "M" in used:
        _positive(
            cfg,
            "mamba_num_heads",
            "mamba_head_dim",
            "mamba_state_dim",
            "mamba_num_groups",
            "mamba_conv_kernel",
            "mamba_chunk_size",
        )
        if cfg.mamba_num_heads is None and (2 * cfg.hidden_size) % cfg.mamba_head_dim:
            raise ConfigError(
                "mamba_num_heads",
                f"not set, and 2 * hidden_size ({2 * cfg.hidden_size}) is not divisible by mamba_head_dim "
                f"({cfg.mamba_head_dim}); set mamba_num_heads",
            )
        if cfg.resolved_mamba_num_heads % cfg.mamba_num_groups:
            raise ConfigError(
                "mamba_num_groups",
                f"{cfg.mamba_num_groups} must divide the number of Mamba heads ({cfg.resolved_mamba_num_heads})",
            )
        _dt_init_range(cfg, "mamba")
        _dt_bound(cfg, "mamba_dt_clamp_min")

    if "E" in used:
        if cfg.moe_num_experts is None:
            raise ConfigError("moe_num_experts", "required: the pattern has MoE ('E') layers")
        _positive(
            cfg,
            "moe_num_experts",
            "moe_top_k",
            "moe_ffn_hidden_size",
            "moe_num_groups",
            "moe_topk_groups",
            "moe_routed_scaling",
        )
        _choice(cfg, "moe_router_score", ROUTER_SCORES)
        if cfg.moe_aux_loss_type not in AUX_LOSS_TYPES:
            raise ConfigError(
                "moe_aux_loss_type",
                f"must be one of {', '.join(map(repr, AUX_LOSS_TYPES))}, got {cfg.moe_aux_loss_type!r} (no balancing "
                "loss: moe_aux_loss_coeff = 0; Megatron-LM's 'sinkhorn' is not built)",
            )
        if cfg.moe_top_k > cfg.moe_num_experts:
            raise ConfigError("moe_top_k", f"{cfg.moe_top_k} exceeds moe_num_experts ({cfg.moe_num_experts})")
        if cfg.moe_num_experts % cfg.moe_num_groups:
            raise ConfigError(
                "moe_num_groups", f"{cfg.moe_num_groups} must divide moe_num_experts ({cfg.moe_num_experts})"
            )
        if cfg.moe_topk_groups > cfg.moe_num_groups:
            raise ConfigError("moe_topk_groups", f"{cfg.moe_topk_groups} exceeds moe_num_groups ({cfg.moe_num_groups})")
        reachable = cfg.moe_topk_groups * (cfg.moe_num_experts // cfg.moe_num_groups)
        if cfg.moe_top_k > reachable:
            raise ConfigError(
                "moe_top_k",
                f"{cfg.moe_top_k} exceeds the {reachable} experts in the moe_topk_groups={cfg.moe_topk_groups} "
                "groups a token may use",
            )
        for name in ("moe_shared_expert_ffn_hidden_size", "moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if getattr(cfg, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(cfg, name)}")
        if cfg.moe_shared_expert_gate and not cfg.moe_shared_expert_ffn_hidden_size:
            raise ConfigError(
                "moe_shared_expert_gate",
                "gates the shared expert, and there is none (moe_shared_expert_ffn_hidden_size = 0): set "
                "moe_shared_expert_ffn_hidden_size (Qwen3-Next's shared_expert_intermediate_size), or leave the gate off",
            )

    if used & {"+", "D"} or ("*" in used and cfg.position_embedding == "rope"):
        _validate_rope_type(cfg)
    if used & {"+", "D"}:
        _validate_mla(cfg, "D" in used)

    if "G" in used:
        _positive(
            cfg,
            "gdn_num_heads",
            "gdn_num_value_heads",
            "gdn_head_dim",
            "gdn_value_head_dim",
            "gdn_conv_kernel",
            "gdn_chunk_size",
        )
        _dt_init_range(cfg, "gdn")
        if cfg.resolved_gdn_num_value_heads % cfg.resolved_gdn_num_heads:
            raise ConfigError(
                "gdn_num_value_heads",
                f"{cfg.resolved_gdn_num_value_heads} must be a multiple of gdn_num_heads "
                f"({cfg.resolved_gdn_num_heads})",
            )


def _validate_rope_type(cfg: ModelConfig) -> None:
    """``rope_type`` and, for YaRN, the ``yarn_*`` fields (a model with a layer that rotates)."""
    _choice(cfg, "rope_type", ROPE_TYPES)
    if cfg.rope_type != "yarn":
        return
    if cfg.yarn_rotary_scaling_factor < 1:
        raise ConfigError(
            "yarn_rotary_scaling_factor",
            f"must be >= 1 (YaRN extends the context by this factor), got {cfg.yarn_rotary_scaling_factor}",
        )
    _positive(cfg, "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow")
    if cfg.yarn_beta_fast < cfg.yarn_beta_slow:  # (transformers warns; its ramp would run backwards)
        raise ConfigError(
            "yarn_beta_fast",
            f"{cfg.yarn_beta_fast} is below yarn_beta_slow ({cfg.yarn_beta_slow}): the frequencies turning more than "
            "yarn_beta_fast times are kept, those turning fewer than yarn_beta_slow times are divided",
        )
    if cfg.rope_theta <= 1:
        raise ConfigError(
            "rope_theta", f"must be above 1 with YaRN (its ramp divides by log(rope_theta)), got {cfg.rope_theta}"
        )
    for name in ("yarn_mscale", "yarn_mscale_all_dim"):
        if getattr(cfg, name) < 0:
            raise ConfigError(name, f"must be >= 0, got {getattr(cfg, name)}")


def _validate_mla(cfg: ModelConfig, sparse: bool) -> None:
    """Multi-latent attention (``+``) and DeepSeek sparse attention (``D``, ``sparse``)."""
    if cfg.num_attention_heads is None:
        raise ConfigError("num_attention_heads", "required: the pattern has MLA ('+') or DSA ('D') layers")
    _positive(
        cfg,
        "num_attention_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_head_dim",
        "qk_pos_emb_head_dim",
        "v_head_dim",
        "rope_theta",
    )
    if cfg.qk_pos_emb_head_dim % 2:
        raise ConfigError(
            "qk_pos_emb_head_dim", f"must be even (RoPE rotates channel pairs), got {cfg.qk_pos_emb_head_dim}"
        )
    if not sparse:
        return
    _positive(cfg, "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk")
    if cfg.q_lora_rank is None:
        raise ConfigError("q_lora_rank", "required by DSA ('D') layers: the indexer reads the compressed query")
    if cfg.dsa_indexer_head_dim < cfg.qk_pos_emb_head_dim:
        raise ConfigError(
            "dsa_indexer_head_dim",
            f"{cfg.dsa_indexer_head_dim} is smaller than qk_pos_emb_head_dim ({cfg.qk_pos_emb_head_dim}), "
            "the indexer's RoPE channels",
        )
    if cfg.dsa_indexer_loss_coeff < 0:
        raise ConfigError("dsa_indexer_loss_coeff", f"must be >= 0, got {cfg.dsa_indexer_loss_coeff}")


def is_special_file(path: str | Path) -> bool:
    """Whether ``path`` names something other than a regular file or a folder: a FIFO (``--config <(...)``), a
    device or a socket, whose read blocks for a writer or never ends. False where nothing is there, or the system
    refuses the name: the read that follows says why."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # (ValueError: a name holding NUL)
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # a name too long for the system, or holding NUL: JSON text, not a file
        return False
