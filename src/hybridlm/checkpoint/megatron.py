"""Megatron-core ``HybridModel`` plain state dicts (TP=1, unfused, RMSNorm, no biases) <-> our canonical layout:
a rule table on :mod:`hybridlm.checkpoint.adapter` (layer ``i`` is ``decoder.layers.{i}``; docs/checkpoints.md).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .adapter import (
    Rule,
    apply,
    concat,
    deinterleave,
    foreign_shapes,
    interleave,
    interleaved,
    normalize,
    per_expert,
    rename,
    to_foreign,
    under,
)
from .io import (
    DEFAULT_MAX_SHARD_SIZE,
    check_fit,
    check_shard_size,
    errors_at,
    full_cpu,
    listed,
    load_safetensors,
    replace_file,
    resolved,
)
from .io import meta_shapes as canonical_shapes  # re-exported: canonical name -> shape of a config
from .weights import check_destination, read_config, read_tensors, save_state_dict

logger = logging.getLogger(__name__)


def _qkv_rule(c: ModelConfig) -> Rule:
    """q_proj (nq*d, H), k_proj / v_proj (ng*d, H) [, gate_proj (nq*d, H)] <-> linear_qkv ((nq + 2 ng) * d, H),
    ((2 nq + 2 ng) * d, H) with the output gate.

    Megatron's ``SelfAttention.get_query_key_value_tensors`` views the fused output as
    ``(ng, (nq/ng + 2) * d)`` and splits each group into ``[nq/ng * d | d | d]``: the group's
    query heads, then its key head, then its value head. Query head ``h`` belongs to group
    ``h // (nq/ng)``, which is also how our grouped-query attention pairs them. With
    ``attention_output_gate`` each group is ``[nq/ng * d | nq/ng * d | d | d]``: the group's query heads,
    their gate heads (in the same head order), then its key and value heads (megatron-core 0.16 to 0.19's
    ``attention.py``; the gate reshaped to (…, nq, d) multiplies the attention output head by head).
    """
    ng, d = c.resolved_num_query_groups, c.resolved_head_dim
    per_group = c.num_attention_heads // ng * d
    parts = ("q", "gate", "k", "v") if c.attention_output_gate else ("q", "k", "v")
    sizes = [per_group if p in ("q", "gate") else d for p in parts]
    return interleaved(tuple(f"mixer.{p}_proj.weight" for p in parts), "self_attention.linear_qkv.weight", ng, sizes)


def _mlp_rules(c: ModelConfig, canonical: str, megatron: str, experts: int = 0) -> list[Rule]:
    """An MLP's projections as fc1 / fc2 (SwiGLU's fc1 is ``[gate; up]``: Megatron's GLU activates the first half);
    with ``experts``, stacked (E, F, H) / (E, H, F) as Transformer Engine's grouped ``weight{e}``, one per expert."""
    w = "" if experts else ".weight"  # our stacked experts are bare parameters (experts.up_proj), not Linears
    up = tuple(f"{canonical}{n}_proj{w}" for n in (("gate", "up") if c.mlp_activation == "swiglu" else ("up",)))
    fc1, fc2 = (f"{megatron}linear_fc{i}.weight" + ("{e}" if experts else "") for i in (1, 2))
    if experts:
        return [per_expert(up, fc1, experts), per_expert((f"{canonical}down_proj",), fc2, experts)]
    return [concat(up, fc1), rename(f"{canonical}down_proj.weight", fc2)]


def _gdn_rule(c: ModelConfig) -> Rule:
    """Qwen3-Next's in_proj_qkvz (nk*(2dk + 2r*dv), H) + in_proj_ba (2nv, H) <-> Megatron's in_proj
    ((2nk*dk + 2nv*dv + 2nv), H), r = nv/nk.

    Qwen3-Next interleaves per key head h: ``[q_h | k_h | v_h (r*dv) | z_h (r*dv)]`` and ``[b_h (r) | a_h (r)]``;
    megatron-core 0.19.2 (``ssm/gated_delta_net/gdn.py``) splits its output flat:
    ``[q (nk*dk) | k | v (nv*dv) | z | beta (nv) | alpha (nv)]``, each head-major. Both give value head
    ``h*r + j`` to key head ``h`` and run the conv over the flat ``[q | k | v]``, so only these rows move
    (docs/checkpoints.md has the sources and the third-party layouts this is not).
    """
    nk, nv = c.resolved_gdn_num_heads, c.resolved_gdn_num_value_heads
    dk, dv, r = c.gdn_head_dim, c.resolved_gdn_value_head_dim, nv // nk

    def pack(ts: list[Tensor]) -> list[Tensor]:
        qkvz, ba = ts
        return [torch.cat(deinterleave(qkvz, nk, [dk, dk, r * dv, r * dv]) + deinterleave(ba, nk, [r, r]))]

    def unpack(ts: list[Tensor]) -> list[Tensor]:
        q, k, v, z, b, a = ts[0].split([nk * dk, nk * dk, nv * dv, nv * dv, nv, nv])
        return [interleave([q, k, v, z], nk), interleave([b, a], nk)]

    names = ("mixer.in_proj_qkvz.weight", "mixer.in_proj_ba.weight")
    return Rule(names, ("self_attention.in_proj.weight",), pack, unpack)


def _plain_norm(c: ModelConfig, canonical: str, foreign: str) -> Rule:
    """A norm weight that is the scale itself in our model (Gated DeltaNet's gated norm, the DSA indexer's
    LayerNorm) <-> Megatron's, which under ``layernorm_zero_centered_gamma`` is zero-centred like every norm
    Transformer Engine builds (``TENorm`` passes the option to each): it stores ``scale - 1``.

    Computed in float64, then cast back to the tensor's dtype: export is exact for a scale in [0.5, 2] (their
    difference from 1 is a float of the same format, Sterbenz), so export then import is the identity there;
    import rounds ``1 + w`` once to the file's dtype (a bf16 file: 2^-8 relative), where Transformer Engine adds
    in float32. The other norms are zero-centred in our model too (``norm_zero_centered``): plain renames.
    """
    if not c.norm_zero_centered:
        return rename(canonical, foreign)

    def shift(by: float):
        return lambda ts: [(ts[0].double() + by).to(ts[0].dtype)]

    return Rule((canonical,), (foreign,), shift(-1.0), shift(1.0))


def _layer_rules(symbol: str, c: ModelConfig) -> list[Rule]:
    """The rules of one layer of kind ``symbol`` (names after ``layers.{i}.``); the pre-norm becomes the
    ``layer_norm_weight`` of the first linear Transformer Engine fuses it into."""
    if symbol == "M":
        return [
            rename("norm.weight", "mixer.in_proj.layer_norm_weight"),
            rename("mixer.in_proj.weight"),
            # megatron-core 0.19 holds the conv parameters directly (0.16: an nn.Conv1d submodule).
            rename("mixer.conv1d.weight", "mixer.conv1d_weight"),
            rename("mixer.conv1d.bias", "mixer.conv1d_bias"),
            *(rename(f"mixer.{n}") for n in ("dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")),
        ]
    a = "self_attention."
    if symbol == "*":
        norms = (rename(f"mixer.{n}_norm.weight", f"{a}{n}_layernorm.weight") for n in "qk")
        return [
            rename("norm.weight", f"{a}linear_qkv.layer_norm_weight"),
            _qkv_rule(c),
            rename("mixer.o_proj.weight", f"{a}linear_proj.weight"),
            *(norms if c.qk_norm else ()),
        ]
    if symbol == "-":
        return [rename("norm.weight", "mlp.linear_fc1.layer_norm_weight"), *_mlp_rules(c, "mixer.", "mlp.")]
    if symbol == "E":
        rules = [rename("norm.weight", "pre_mlp_layernorm.weight"), rename("mixer.gate.weight", "mlp.router.weight")]
        if c.moe_router_expert_bias:
            rules.append(rename("mixer.gate.e_score_correction_bias", "mlp.router.expert_bias"))
        rules += _mlp_rules(c, "mixer.experts.", "mlp.experts.", c.moe_num_experts)
        if c.moe_shared_expert_ffn_hidden_size:
            rules += _mlp_rules(c, "mixer.shared_experts.", "mlp.shared_experts.")
        if c.moe_shared_expert_gate:  # (1, H) on both sides (megatron-core SharedExpertMLP.gate_weight)
            rules.append(rename("mixer.shared_expert_gate.weight", "mlp.shared_experts.gate_weight"))
        return rules
    if symbol == "G":
        return [
            rename("norm.weight", f"{a}in_proj.layer_norm_weight"),
            _gdn_rule(c),
            *(rename(f"mixer.{n}", a + n) for n in ("conv1d.weight", "dt_bias", "A_log", "out_proj.weight")),
            _plain_norm(c, "mixer.norm.weight", f"{a}out_norm.weight"),
        ]
    if symbol in ("+", "D"):
        return _mla_rules(c, sparse=symbol == "D")
    raise CheckpointError(f"layer kind '{symbol}' has no Megatron HybridModel mapping")


def _mla_rules(c: ModelConfig, sparse: bool) -> list[Rule]:
    """Multi-latent (``+``) and DeepSeek sparse attention (``D``) as megatron-core 0.19.2's ``hybrid_stack_spec``
    builds them with ``qk_layernorm=True``: renames only (Megatron splits and rotates the latents as we do).

    The latent norms fuse into the up projections for ``+`` and stand alone for ``D``, where Megatron
    forbids the fusion; the DSA indexer's key norm is a LayerNorm (weight and bias).
    """
    if c.q_lora_rank is None:
        raise CheckpointError(
            "an MLA layer without q_lora_rank has no Megatron equivalent: with its latent norms on "
            "(qk_layernorm), Megatron's linear_q_proj carries a norm of its own that hybridlm's q_proj has not"
        )
    a = "self_attention."
    norm = "{}_layernorm.weight" if sparse else "linear_{}_up_proj.layer_norm_weight"
    names = {
        "q_a_proj.weight": "linear_q_down_proj.weight",
        "q_a_layernorm.weight": norm.format("q"),
        "q_b_proj.weight": "linear_q_up_proj.weight",
        "kv_a_proj_with_mqa.weight": "linear_kv_down_proj.weight",
        "kv_a_layernorm.weight": norm.format("kv"),
        "kv_b_proj.weight": "linear_kv_up_proj.weight",
        "o_proj.weight": "linear_proj.weight",
    }
    if sparse:
        ix = "core_attention.indexer."
        names |= {
            "indexer.wq_b.weight": ix + "linear_wq_b.weight",
            "indexer.wk.weight": ix + "linear_wk.weight",
            "indexer.k_norm.weight": ix + "k_norm.weight",
            "indexer.k_norm.bias": ix + "k_norm.bias",
            "indexer.weights_proj.weight": ix + "linear_weights_proj.weight",
        }
    plain = ("indexer.k_norm.weight",)  # a LayerNorm of ours, zero-centred in Megatron under the option
    rules = [
        (_plain_norm(c, f"mixer.{k}", a + v) if k in plain else rename(f"mixer.{k}", a + v)) for k, v in names.items()
    ]
    return [rename("norm.weight", "input_layernorm.weight"), *rules]


def _model_rules(c: ModelConfig) -> list[Rule]:
    """Every rule of the model (full names), in Megatron's module order."""
    p = c.parsed
    rules = [rename("embeddings.weight", "embedding.word_embeddings.weight")]
    for i, s in enumerate(p.layers):
        rules += under(f"layers.{i}.", f"decoder.layers.{i}.", _layer_rules(s, c))
    rules.append(rename("norm_f.weight", "decoder.final_norm.weight"))
    if not c.tie_embeddings:
        rules.append(rename("lm_head.weight", "output_layer.weight"))
    for d in range(p.mtp_depths):
        ours, theirs = f"mtp.{d}.", f"mtp.layers.{d}."
        rules += under(ours, theirs, [rename(f"{n}.weight") for n in ("enorm", "hnorm", "eh_proj")])
        for j, s in enumerate(p.mtp_layers):
            rules += under(f"{ours}layers.{j}.", f"{theirs}mtp_model_layer.layers.{j}.", _layer_rules(s, c))
        rules += under(ours, theirs, [rename("final_norm.weight", "final_layernorm.weight")])
    return rules


def megatron_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor (no ``_extra_state``) in the Megatron state dict of ``config``, in module order."""
    return foreign_shapes(_model_rules(config), canonical_shapes(config))


def megatron_keys(config: ModelConfig) -> list[str]:
    return list(megatron_shapes(config))


#: (an unexpected name's ending, why a Megatron state dict has it): the usual recipe mismatches.
_HINTS = (
    (r"(layer_norm_bias|norm\.bias)$", "norm biases: the Megatron model used LayerNorm; hybridlm models use RMSNorm"),
    (r"(linear_\w+|_proj)\.bias\d*$", "linear biases: the Megatron model was trained without --disable-bias-linear"),
    (r"position_embeddings\.weight$", "learned absolute position embeddings: hybridlm supports 'none' or 'rope'"),
    (
        r"^module\.",
        "names under 'module.': the state dict of a wrapped model (DistributedDataParallel, Float16Module); "
        "save the unwrapped model's (Megatron's unwrap_model) or strip the prefix",
    ),
)

#: Names that older or alternative Megatron builds use for a tensor, -> the 0.19 TE name.
_ALIASES = (
    (re.compile(r"^(.*\.mixer)\.conv1d\.(weight|bias)$"), r"\1.conv1d_\2"),  # Mamba, megatron-core 0.16
    (re.compile(r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.weight$"), r"\1.\3.weight\2"),
)


def _is_extra_state(name: str) -> bool:
    """Transformer Engine's FP8 metadata entries (``…._extra_state``; grouped linears add an index): no weights."""
    return name.rsplit(".", 1)[-1].startswith("_extra_state")


def _not_tensors(state: Mapping[Any, Any]) -> list[str]:
    """The entries of ``state`` that are not a tensor under a name (an ``_extra_state`` may hold anything)."""
    return [
        f"{k!r} ({type(v).__name__})"
        for k, v in state.items()
        if not (isinstance(k, str) and (isinstance(v, Tensor) or _is_extra_state(k)))
    ]


def to_megatron(config: ModelConfig, canonical: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our canonical state dict -> Megatron's plain one, same dtypes; CheckpointError listing what does not fit."""
    return to_foreign(_model_rules(config), canonical, canonical_shapes(config))


def from_megatron(config: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`to_megatron`, ignoring ``_extra_state``, accepting :data:`_ALIASES`' older names, and
    listing missing, unexpected or mis-shaped tensors by the name given."""
    if bad := _not_tensors(state):  # e.g. a file's {"model": state_dict} (a dict has no shape: an AttributeError)
        raise CheckpointError(
            "Megatron state dict: these entries are not tensors: " + listed(bad) + " "
            "(load_megatron reads the state dict out of a torch.save file's {'model': state_dict})"
        )
    weights = {k: t for k, t in state.items() if not _is_extra_state(k)}
    state, given = normalize(weights, _ALIASES, "Megatron state dict")
    rules = _model_rules(config)
    expected = foreign_shapes(rules, canonical_shapes(config))
    unexpected = [given[k] for k in state if k not in expected]
    hint = "".join(f"\n  hint: {why}" for end, why in _HINTS if any(re.search(end, k) for k in unexpected))
    emb = state.get("embedding.word_embeddings.weight")
    if emb is not None and emb.ndim == 2 and emb.shape[0] > config.vocab_size and emb.shape[1] == config.hidden_size:
        hint += (  # Megatron's default pads to a multiple of 128 (times the tensor-parallel size)
            f"\n  hint: a vocabulary padded to {emb.shape[0]} rows (Megatron's --make-vocab-size-divisible-by): "
            f"give the config vocab_size={emb.shape[0]}, or drop the rows past {config.vocab_size} first"
        )
    hint += _layout_hints(config, state, expected)
    check_fit(state, expected, "Megatron state dict", hint, show=lambda k: given.get(k, k))
    return apply(rules, state, export=False)


def _layout_hints(config: ModelConfig, state: Mapping[str, Tensor], expected: Mapping[str, Any]) -> str:
    """What to set where the file's head or MTP depths are not the config's: Megatron's command line ties the
    output layer unless told not to, and names the depths in flags (mtp_num_layers) where we read the pattern."""
    hint = ""
    head = "output_layer.weight"
    # Only where the file holds the embedding and the final norm: a pipeline stage's file lacks the others.
    whole = "embedding.word_embeddings.weight" in state and "decoder.final_norm.weight" in state
    if whole and (head in state) != (head in expected):
        hint += (
            "\n  hint: the Megatron model ties its output layer to the embedding (Megatron's default, without "
            "--untie-embeddings-and-output-weights): give the config tie_embeddings=true"
            if head not in state
            else "\n  hint: the Megatron model has an output layer of its own (--untie-embeddings-and-output-weights): "
            "give the config tie_embeddings=false"
        )
    depths = {int(m[1]) for k in state if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
    ours = config.parsed.mtp_depths
    if whole and len(depths) != ours:
        hint += (
            f"\n  hint: the file holds {len(depths)} MTP depth(s) where the config's pattern has {ours}: "
            "the pattern takes one '/' part per depth (Megatron's mtp_num_layers), e.g. 'MAIN/*-/*-' for two"
        )
    return hint


def _routing_differences(c: ModelConfig) -> list[str]:
    """Router options that no setting of megatron-core 0.19's TopKRouter computes (``moe_utils.
    topk_routing_with_score_function``): it takes an expert bias with sigmoid scores only, normalizes the top-k
    sigmoid weights exactly when top_k > 1 and top-1 softmax weights never, and scores an expert group by its best
    top_k // topk_groups logits (softmax, normalized) or scores, where we take the best two scores."""
    sigmoid, k, norm = c.moe_router_score == "sigmoid", c.moe_top_k, c.moe_norm_topk_prob
    out = []
    if c.moe_router_expert_bias and not sigmoid:
        out.append("moe_router_expert_bias with softmax scores (Megatron takes an expert bias with sigmoid only)")
    if norm != (k > 1) and (sigmoid or k == 1):
        out.append(
            f"moe_norm_topk_prob={norm} with moe_top_k={k} (Megatron normalizes the top-k weights of sigmoid "
            "routing exactly when top_k > 1, and the weight of top-1 softmax routing never)"
        )
    if c.moe_num_groups > 1:
        ours, theirs = min(2, c.moe_num_experts // c.moe_num_groups), k // c.moe_topk_groups
        on_logits = not sigmoid and norm  # Megatron's softmax without --moe-router-pre-softmax picks on the logits
        if on_logits or theirs != ours:
            out.append(
                f"moe_num_groups={c.moe_num_groups} (Megatron scores an expert group by its best "
                f"top_k // topk_groups = {theirs} {'logits' if on_logits else 'scores'}, hybridlm by its best {ours} scores)"
            )
    return out


def _suffix(path: Path) -> str:
    if path.suffix not in (".pt", ".safetensors"):
        raise CheckpointError(f"{path}: a Megatron state dict file must end in .pt or .safetensors")
    return path.suffix


def save_megatron(state: Mapping[str, Tensor], path: str | Path, config: ModelConfig | None = None) -> Path:
    """Write ``state`` atomically: ``.pt`` as ``torch.save({"model": state})``, or ``.safetensors``; with
    ``config``, also its JSON at :func:`config_sidecar` (both written before either replaces a file, the config
    renamed first). Returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: full_cpu(v) for k, v in state.items()}
    if _suffix(path) == ".pt":
        weights = (path, lambda tmp: torch.save({"model": tensors}, tmp))
    else:
        weights = (path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if config is None:
        replace_file(*weights)
    else:
        replace_file(config_sidecar(path), lambda tmp: tmp.write_text(config.to_json()), weights)
    return path


def _as_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """The state dict inside what ``torch.load`` returned: ``{"model": sd}`` or a bare ``sd``."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and (stages := [str(k) for k in obj if re.fullmatch(r"model\d+", str(k))]):
        raise CheckpointError(
            f"{path}: holds one model per virtual pipeline stage ({', '.join(stages)}); "
            "merge them into one unsplit state dict first"
        )
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")
    if bad := _not_tensors(obj):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors (or {{'model': state_dict}}); these entries are not tensors: "
            + listed(bad)
        )
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _source(path: Path) -> str:
    """The suffix of Megatron state-dict file ``path``, after refusing a path that names no such file."""
    kind = _suffix(path)
    if not path.is_file():  # (a folder named model.pt exists: "no such file" sent the user looking for a typo)
        raise CheckpointError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    return kind


def _is_zip(path: Path) -> bool:
    """Whether ``path`` starts as torch.save's zip format does, the one ``torch.load(mmap=True)`` can map: the
    weights then stay in the page cache, which the system can drop, instead of a private copy in RAM (a file
    of the legacy format, which mmap refuses, is read whole)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_megatron(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.pt`` (``{"model": sd}`` or a bare ``sd``, with ``torch.load(weights_only=True)``: no arbitrary
    pickled objects) or ``.safetensors`` Megatron state dict onto the CPU."""
    path = Path(path)
    if _source(path) == ".safetensors":
        return load_safetensors(path)
    try:
        # Transformer Engine stores a module's _extra_state (FP8 metadata, ignored here) as an io.BytesIO:
        # rebuilding one from its bytes runs no code, so the safe unpickler may make it.
        with torch.serialization.safe_globals([io.BytesIO, bytes]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read as a torch.save file of tensors ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}). "
            "Megatron's own model_optim_rng.pt also pickles its training arguments; extract the weights with "
            "torch.save({'model': ckpt['model']}, 'model.pt') in an environment with megatron-core"
        ) from None
    return _as_state_dict(obj, path)


def config_sidecar(path: str | Path) -> Path:
    """Where our config JSON lives next to an exported Megatron file."""
    return Path(f"{path}.hybridlm.json")


def convert_to_megatron(src: str | Path, dst: str | Path, verify: bool = True) -> Path:
    """Convert hybridlm checkpoint directory ``src`` (checked against its SHA-256 unless not ``verify``) to
    Megatron state-dict file ``dst`` (.pt or .safetensors), with our config at ``<dst>.hybridlm.json`` for
    :func:`convert_from_megatron`. An existing ``dst`` is replaced only if it is such an export. Returns ``dst``."""
    dst = Path(dst)
    _suffix(dst)
    resolved(dst)  # before any work: a file where a folder must be, a link loop
    if dst.exists() and not (dst.is_file() and config_sidecar(dst).is_file()):
        raise CheckpointError(
            f"{dst} exists and is not a Megatron export of hybridlm (no {config_sidecar(dst).name} beside it); "
            "refusing to replace it"
        )
    config = read_config(src)
    differ = []  # the names map exactly, but these options have no Megatron counterpart
    mamba = "M" in config.parsed.layers + config.parsed.mtp_layers  # MTP depths are exported too
    if mamba and config.mamba_dt_clamp_min > 0:
        differ.append(f"mamba_dt_clamp_min={config.mamba_dt_clamp_min} (Megatron does not clamp dt)")
    if mamba and config.norm_eps != 1e-5:
        differ.append(f"norm_eps={config.norm_eps} (Megatron's Mamba gated norm uses 1e-5)")
    if differ:
        logger.warning("%s: Megatron-core computes its Mamba layers otherwise: %s", src, "; ".join(differ))
    if "E" in config.parsed.layers + config.parsed.mtp_layers and (routing := _routing_differences(config)):
        logger.warning("%s: Megatron-core routes its MoE layers otherwise: %s", src, "; ".join(routing))
    canonical = read_tensors(src, verify=verify)
    with errors_at(src):  # its config.json and weights disagree: say which folder
        tensors = to_megatron(config, canonical)
    # The sidecar is renamed first: an interrupted export leaves a file this command may replace when rerun.
    return save_megatron(tensors, dst, config)


def convert_from_megatron(
    src: str | Path, dst: str | Path, config: ModelConfig | None = None, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
) -> Path:
    """Convert Megatron state-dict file ``src`` (see :func:`load_megatron`) to hybridlm checkpoint directory ``dst``
    (replaced atomically if it is one; weights sharded above ``max_shard_size`` bytes), with ``config`` or else
    the one at ``<src>.hybridlm.json``. Returns ``dst``."""
    check_shard_size(max_shard_size)
    check_destination(dst, src)
    _source(Path(src))
    # The config before the weights: a missing or invalid one is refused without reading a file of many GB first.
    sidecar = config_sidecar(src)
    # exists, not is_file: a FIFO or a folder there is refused by from_json as what it is, not called absent
    if config is None and not sidecar.exists():
        raise CheckpointError(
            f"{src}: a Megatron state dict does not describe its architecture; pass the model config "
            f"(a hybridlm ModelConfig JSON) or place it at {sidecar}"
        )
    given = "the model config given" if config is not None else f"the model config of {sidecar}"
    with errors_at(f"{sidecar}: invalid model config", ConfigError):
        config = config if config is not None else ModelConfig.from_json(sidecar)
    state = load_megatron(src)
    with errors_at(f"{src} (read with {given})"):  # the file and the config disagree: say which file, and whose config
        canonical = from_megatron(config, state)
    return save_state_dict(canonical, config, dst, max_shard_size=max_shard_size)
