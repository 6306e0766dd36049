"""Megatron-core ``HybridModel`` state dicts: our canonical layout to and from Megatron's names and packings.

Target: the *plain* (``model.state_dict()``, tensor-parallel size 1, unfused) state dict of
megatron-core 0.19's ``HybridModel`` built with the Transformer Engine ``hybrid_stack_spec``,
``normalization="RMSNorm"`` and ``add_bias_linear=False``. Megatron numbers layers per pattern
symbol exactly as our canonical layout does, so layer ``i`` maps to ``decoder.layers.{i}``; only
the names inside a layer and some packings differ::

    canonical (ours)                          Megatron
    embeddings.weight                         embedding.word_embeddings.weight
    layers.{i}.…                              decoder.layers.{i}.…          (per symbol, below)
    norm_f.weight                             decoder.final_norm.weight
    lm_head.weight (absent when tied)         output_layer.weight (absent when tied)
    mtp.{d}.enorm / hnorm / eh_proj           mtp.layers.{d}.enorm / hnorm / eh_proj
    mtp.{d}.layers.{j}.…                      mtp.layers.{d}.mtp_model_layer.layers.{j}.…
    mtp.{d}.final_norm.weight                 mtp.layers.{d}.final_layernorm.weight

Per symbol, a layer's pre-norm becomes the ``layer_norm_weight`` of the first linear that Transformer
Engine fuses it into (``E`` keeps a separate ``pre_mlp_layernorm``), and:

* ``M`` Mamba2: same names and layouts under ``mixer.``; the conv parameters are ``conv1d_weight`` /
  ``conv1d_bias`` (0.16 called them ``conv1d.weight`` / ``conv1d.bias``; accepted on import).
* ``*`` attention: q/k/v are one ``linear_qkv`` whose rows are grouped per query group as
  ``[q heads of the group | k | v]``; o_proj is ``linear_proj``; QK-norm is ``q_layernorm`` / ``k_layernorm``.
* ``-`` MLP: ``linear_fc1`` = up (SwiGLU: ``cat[gate, up]``, Megatron's GLU takes ``act(first half) *
  second half``), ``linear_fc2`` = down.
* ``E`` MoE: router ``mlp.router.weight`` / ``expert_bias``; experts as Transformer Engine grouped
  linears ``mlp.experts.linear_fc{1,2}.weight{e}`` (import also takes the sequential
  ``mlp.experts.local_experts.{e}.linear_fc{1,2}.weight``); shared expert as an MLP.
* ``G`` Gated DeltaNet: ``self_attention.`` in_proj / conv1d / dt_bias / A_log / out_norm / out_proj;
  see :func:`_gdn_rule` for the in_proj packing.
* ``+`` / ``D`` multi-latent / DeepSeek sparse attention: a separate ``input_layernorm``;
  ``self_attention.linear_q_down_proj`` / ``linear_q_up_proj`` / ``linear_kv_down_proj`` /
  ``linear_kv_up_proj`` / ``linear_proj``; the DSA indexer under ``self_attention.core_attention.indexer.``;
  see :func:`_mla_rules`.

Keys ending in ``_extra_state`` (Transformer Engine's FP8 metadata) carry no weights and are ignored.
Not covered: tensor-parallel shards (merge them first; Megatron's per-rank in_proj slices interleave
the sections), a vocabulary padded beyond ``vocab_size`` (refused as a shape mismatch), LayerNorm
and linear biases (refused as unexpected tensors, with a hint).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .io import MAX_LISTED, check_fit, replace_file
from .io import meta_shapes as canonical_shapes

#: Suffix of the file written next to an exported state dict, holding our ``ModelConfig`` as JSON.
CONFIG_SIDECAR_SUFFIX = ".hybridlm.json"
_SUFFIXES = (".pt", ".safetensors")


# -- per-tensor packings ------------------------------------------------------------------------------
#
# A rule maps a few canonical tensors of one layer to a few Megatron tensors of the same layer.
# Most rules are renames (one to one, the tensor passes through untouched); the others repack
# rows. Every packing below is a pure permutation / concatenation of rows, so export followed by
# import is bitwise the identity.

Pack = Callable[[list[Tensor]], list[Tensor]]


def _same(ts: list[Tensor]) -> list[Tensor]:
    return ts


@dataclass(frozen=True)
class _Rule:
    """``canonical`` tensors (suffixes after the layer prefix) <-> ``megatron`` tensors (suffixes)."""

    canonical: tuple[str, ...]
    megatron: tuple[str, ...]
    to_megatron: Pack = _same
    from_megatron: Pack = _same


def _rename(canonical: str, megatron: str) -> _Rule:
    return _Rule((canonical,), (megatron,))


def _qkv_rule(c: ModelConfig, prefix: str) -> _Rule:
    """q_proj (nq*d, H), k_proj / v_proj (ng*d, H) <-> linear_qkv ((nq + 2 ng) * d, H).

    Megatron's ``SelfAttention.get_query_key_value_tensors`` views the fused output as
    ``(ng, (nq/ng + 2) * d)`` and splits each group into ``[nq/ng * d | d | d]``: the group's
    query heads, then its key head, then its value head. Query head ``h`` belongs to group
    ``h // (nq/ng)``, which is also how our grouped-query attention pairs them.
    """
    ng, d = c.resolved_num_query_groups, c.resolved_head_dim
    per = c.num_attention_heads // ng

    def pack(ts: list[Tensor]) -> list[Tensor]:
        q, k, v = ts
        H = q.shape[-1]
        grouped = torch.cat([q.reshape(ng, per * d, H), k.reshape(ng, d, H), v.reshape(ng, d, H)], dim=1)
        return [grouped.reshape(ng * (per + 2) * d, H)]

    def unpack(ts: list[Tensor]) -> list[Tensor]:
        (qkv,) = ts
        H = qkv.shape[-1]
        q, k, v = qkv.reshape(ng, (per + 2) * d, H).split([per * d, d, d], dim=1)
        return [q.reshape(ng * per * d, H), k.reshape(ng * d, H), v.reshape(ng * d, H)]

    names = tuple(f"{prefix}{n}_proj.weight" for n in "qkv")
    return _Rule(names, ("self_attention.linear_qkv.weight",), pack, unpack)


def _glu_pack(ts: list[Tensor]) -> list[Tensor]:
    """[gate (F, H), up (F, H)] -> [fc1 (2F, H)]: Megatron's GLU applies the activation to the first half."""
    return [torch.cat(ts, dim=-2)]


def _glu_unpack(ts: list[Tensor]) -> list[Tensor]:
    return list(ts[0].chunk(2, dim=-2))


def _mlp_rules(c: ModelConfig, canonical: str, megatron: str) -> list[_Rule]:
    """An MLP's projections (``canonical``: e.g. ``mixer.``; ``megatron``: e.g. ``mlp.``) as fc1 / fc2."""
    fc2 = _rename(f"{canonical}down_proj.weight", f"{megatron}linear_fc2.weight")
    if c.mlp_activation != "swiglu":
        return [_rename(f"{canonical}up_proj.weight", f"{megatron}linear_fc1.weight"), fc2]
    names = (f"{canonical}gate_proj.weight", f"{canonical}up_proj.weight")
    return [_Rule(names, (f"{megatron}linear_fc1.weight",), _glu_pack, _glu_unpack), fc2]


def _expert_rules(c: ModelConfig) -> list[_Rule]:
    """Stacked experts up/gate (E, F, H), down (E, H, F) <-> one (2)F x H / H x F matrix per expert."""
    E = c.moe_num_experts
    fc1 = tuple(f"mlp.experts.linear_fc1.weight{e}" for e in range(E))
    fc2 = tuple(f"mlp.experts.linear_fc2.weight{e}" for e in range(E))
    glu = c.mlp_activation == "swiglu"

    def fc1_pack(ts: list[Tensor]) -> list[Tensor]:
        return [torch.cat([t[e] for t in ts], dim=0) if glu else ts[0][e] for e in range(E)]

    def fc1_unpack(ts: list[Tensor]) -> list[Tensor]:
        if not glu:
            return [torch.stack(ts)]
        gates, ups = zip(*(t.chunk(2, dim=0) for t in ts))
        return [torch.stack(gates), torch.stack(ups)]

    up = ("mixer.experts.gate_proj", "mixer.experts.up_proj") if glu else ("mixer.experts.up_proj",)
    return [
        _Rule(up, fc1, fc1_pack, fc1_unpack),
        _Rule(("mixer.experts.down_proj",), fc2, lambda ts: list(ts[0].unbind(0)), lambda ts: [torch.stack(ts)]),
    ]


def _gdn_rule(c: ModelConfig) -> _Rule:
    """Qwen3-Next's in_proj_qkvz + in_proj_ba <-> Megatron's single GatedDeltaNet ``in_proj``.

    Source: megatron-core 0.19.2 (PyPI wheel), ``megatron/core/ssm/gated_delta_net/gdn.py``
    (``GatedDeltaNet._setup_variant_attrs`` and ``forward``) and ``common.py`` (``_GDNBase``,
    ``_prepare_input_for_gated_delta_rule``); the same layout as ``megatron/core/ssm/gated_delta_net.py``
    of earlier releases. Megatron splits the in_proj output *flat*, not per key head::

        in_proj rows = [q (nk*dk) | k (nk*dk) | v (nv*dv) | z (nv*dv) | beta (nv) | alpha (nv)]

    each section head-major (q/k reshape to (nk, dk), v/z to (nv, dv)); ``conv1d`` (an ``nn.Conv1d``,
    no bias by default) runs over ``[q | k | v]`` in that flat order; q/k heads are repeated
    (``repeat_interleave``) to the value heads. Qwen3-Next instead interleaves per key head:
    in_proj_qkvz rows = for each key head h: ``[q_h (dk) | k_h (dk) | v_h (r*dv) | z_h (r*dv)]`` and
    in_proj_ba rows = for each h: ``[b_h (r) | a_h (r)]`` with r = nv/nk. Both give value head
    ``h*r + j`` to key head ``h``, and our conv already runs over the flat ``[q | k | v]``, so conv1d,
    dt_bias, A_log, out_norm and out_proj need no reordering; only the in_proj rows are regrouped.
    (Some third-party Megatron patches, e.g. ModelScope's for Qwen3-Next, override the forward to
    use the Qwen3-Next interleaving inside Megatron's ``in_proj``; their checkpoints are not this layout.)
    """
    nk, nv = c.resolved_gdn_num_heads, c.resolved_gdn_num_value_heads
    dk, dv, r = c.gdn_head_dim, c.resolved_gdn_value_head_dim, nv // nk
    qkvz_sections = [dk, dk, r * dv, r * dv]

    def pack(ts: list[Tensor]) -> list[Tensor]:
        qkvz, ba = ts
        H = qkvz.shape[-1]
        q, k, v, z = qkvz.reshape(nk, sum(qkvz_sections), H).split(qkvz_sections, dim=1)
        b, a = ba.reshape(nk, 2 * r, H).split([r, r], dim=1)
        return [torch.cat([t.reshape(-1, H) for t in (q, k, v, z, b, a)], dim=0)]

    def unpack(ts: list[Tensor]) -> list[Tensor]:
        (w,) = ts
        H = w.shape[-1]
        q, k, v, z, b, a = w.split([nk * dk, nk * dk, nv * dv, nv * dv, nv, nv], dim=0)
        per_head = [t.reshape(nk, -1, H) for t in (q, k, v, z, b, a)]
        qkvz = torch.cat(per_head[:4], dim=1).reshape(-1, H)
        ba = torch.cat(per_head[4:], dim=1).reshape(-1, H)
        return [qkvz, ba]

    names = ("mixer.in_proj_qkvz.weight", "mixer.in_proj_ba.weight")
    return _Rule(names, ("self_attention.in_proj.weight",), pack, unpack)


def _layer_rules(symbol: str, c: ModelConfig) -> list[_Rule]:
    """The rules of one canonical layer of kind ``symbol`` (suffixes after ``layers.{i}.``)."""
    if symbol == "M":
        rules = [
            _rename("norm.weight", "mixer.in_proj.layer_norm_weight"),
            _rename("mixer.in_proj.weight", "mixer.in_proj.weight"),
            # megatron-core 0.19 holds the conv parameters directly (0.16: an nn.Conv1d submodule).
            _rename("mixer.conv1d.weight", "mixer.conv1d_weight"),
            _rename("mixer.conv1d.bias", "mixer.conv1d_bias"),
        ]
        names = ("dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")
        return rules + [_rename(f"mixer.{n}", f"mixer.{n}") for n in names]
    if symbol == "*":
        rules = [
            _rename("norm.weight", "self_attention.linear_qkv.layer_norm_weight"),
            _qkv_rule(c, "mixer."),
            _rename("mixer.o_proj.weight", "self_attention.linear_proj.weight"),
        ]
        if c.qk_norm:
            rules += [
                _rename("mixer.q_norm.weight", "self_attention.q_layernorm.weight"),
                _rename("mixer.k_norm.weight", "self_attention.k_layernorm.weight"),
            ]
        return rules
    if symbol == "-":
        return [_rename("norm.weight", "mlp.linear_fc1.layer_norm_weight"), *_mlp_rules(c, "mixer.", "mlp.")]
    if symbol == "E":
        rules = [_rename("norm.weight", "pre_mlp_layernorm.weight"), _rename("mixer.gate.weight", "mlp.router.weight")]
        if c.moe_router_expert_bias:
            rules.append(_rename("mixer.gate.e_score_correction_bias", "mlp.router.expert_bias"))
        rules += _expert_rules(c)
        if c.moe_shared_expert_ffn_hidden_size:
            rules += _mlp_rules(c, "mixer.shared_experts.", "mlp.shared_experts.")
        return rules
    if symbol == "G":
        rules = [_rename("norm.weight", "self_attention.in_proj.layer_norm_weight"), _gdn_rule(c)]
        rules.append(_rename("mixer.conv1d.weight", "self_attention.conv1d.weight"))
        rules += [_rename(f"mixer.{n}", f"self_attention.{n}") for n in ("dt_bias", "A_log", "out_proj.weight")]
        rules.append(_rename("mixer.norm.weight", "self_attention.out_norm.weight"))
        return rules
    if symbol in ("+", "D"):
        return _mla_rules(c, sparse=symbol == "D")
    raise CheckpointError(f"layer kind '{symbol}' has no Megatron HybridModel mapping")


def _mla_rules(c: ModelConfig, sparse: bool) -> list[_Rule]:
    """Multi-latent attention (``+``: ``MLASelfAttention``) and DSA (``D``: ``AbsorbedMLASelfAttention``
    with a ``DSAttention`` core), as megatron-core 0.19.2's ``hybrid_stack_spec`` builds them with
    ``qk_layernorm=True`` (DeepSeek's latent norms).

    Every tensor is a rename: Megatron splits ``linear_kv_down_proj`` into ``[kv latent | RoPE key]``,
    ``linear_q_up_proj`` per head into ``[no-RoPE | RoPE]`` and ``linear_kv_up_proj`` per head into
    ``[k | v]``, as we do, and rotates the RoPE channels as adjacent pairs
    (``mla_rotary_interleaved``), as we do. The latent norms are fused into the up projections
    (``layer_norm_weight``) for ``+`` and stand alone (``q_layernorm`` / ``kv_layernorm``) for ``D``,
    where Megatron forbids the fusion. The DSA indexer's key norm is a LayerNorm (weight and bias).
    """
    if c.q_lora_rank is None:
        raise CheckpointError(
            "an MLA layer without q_lora_rank has no Megatron equivalent: with its latent norms on "
            "(qk_layernorm), Megatron's linear_q_proj carries a norm of its own that hybridlm's q_proj has not"
        )
    a = "self_attention."
    fused = not sparse
    rules = [
        _rename("norm.weight", "input_layernorm.weight"),
        _rename("mixer.q_a_proj.weight", f"{a}linear_q_down_proj.weight"),
        _rename(
            "mixer.q_a_layernorm.weight",
            f"{a}linear_q_up_proj.layer_norm_weight" if fused else f"{a}q_layernorm.weight",
        ),
        _rename("mixer.q_b_proj.weight", f"{a}linear_q_up_proj.weight"),
        _rename("mixer.kv_a_proj_with_mqa.weight", f"{a}linear_kv_down_proj.weight"),
        _rename(
            "mixer.kv_a_layernorm.weight",
            f"{a}linear_kv_up_proj.layer_norm_weight" if fused else f"{a}kv_layernorm.weight",
        ),
        _rename("mixer.kv_b_proj.weight", f"{a}linear_kv_up_proj.weight"),
        _rename("mixer.o_proj.weight", f"{a}linear_proj.weight"),
    ]
    if sparse:
        ix = f"{a}core_attention.indexer."
        rules += [
            _rename("mixer.indexer.wq_b.weight", f"{ix}linear_wq_b.weight"),
            _rename("mixer.indexer.wk.weight", f"{ix}linear_wk.weight"),
            _rename("mixer.indexer.k_norm.weight", f"{ix}k_norm.weight"),
            _rename("mixer.indexer.k_norm.bias", f"{ix}k_norm.bias"),
            _rename("mixer.indexer.weights_proj.weight", f"{ix}linear_weights_proj.weight"),
        ]
    return rules


def _model_rules(c: ModelConfig) -> list[tuple[str, str, list[_Rule]]]:
    """Every rule of the model as (canonical prefix, Megatron prefix, rules), in Megatron's module order."""
    p = c.parsed
    groups = [("", "", [_rename("embeddings.weight", "embedding.word_embeddings.weight")])]
    groups += [(f"layers.{i}.", f"decoder.layers.{i}.", _layer_rules(s, c)) for i, s in enumerate(p.layers)]
    groups.append(("", "", [_rename("norm_f.weight", "decoder.final_norm.weight")]))
    if not c.tie_embeddings:
        groups.append(("", "", [_rename("lm_head.weight", "output_layer.weight")]))
    for d in range(p.mtp_depths):
        ours, theirs = f"mtp.{d}.", f"mtp.layers.{d}."
        norms = [_rename(f"{n}.weight", f"{n}.weight") for n in ("enorm", "hnorm", "eh_proj")]
        groups.append((ours, theirs, norms))
        for j, s in enumerate(p.mtp_layers):
            groups.append((f"{ours}layers.{j}.", f"{theirs}mtp_model_layer.layers.{j}.", _layer_rules(s, c)))
        groups.append((ours, theirs, [_rename("final_norm.weight", "final_layernorm.weight")]))
    return groups


def _apply(c: ModelConfig, tensors: Mapping[str, Tensor], to_megatron: bool) -> dict[str, Tensor]:
    """Run every rule in one direction over a complete, checked state dict."""
    out: dict[str, Tensor] = {}
    for ours, theirs, rules in _model_rules(c):
        for rule in rules:
            canonical = [ours + n for n in rule.canonical]
            megatron = [theirs + n for n in rule.megatron]
            if to_megatron:
                src, dst, fn = canonical, megatron, rule.to_megatron
            else:
                src, dst, fn = megatron, canonical, rule.from_megatron
            for name, t in zip(dst, fn([tensors[k] for k in src]), strict=True):
                out[name] = _owned(t)
    return out


def _owned(t: Tensor) -> Tensor:
    """``t`` with storage of its own when it is a view (a split row block or one expert of a stack).

    A view would keep the whole source tensor alive and make safetensors refuse the file (tensors
    sharing memory); ``clone`` copies values exactly.
    """
    return t.clone() if t._base is not None else t


# -- expected names and shapes ------------------------------------------------------------------------


def megatron_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the Megatron state dict of a model with ``config``, in module order."""
    meta = {k: torch.empty(s, device="meta") for k, s in canonical_shapes(config).items()}
    return {k: tuple(v.shape) for k, v in _apply(config, meta, to_megatron=True).items()}


def megatron_keys(config: ModelConfig) -> list[str]:
    """The Megatron state-dict key set of a model with ``config`` (no ``_extra_state``), in module order."""
    return list(megatron_shapes(config))


# -- checking -----------------------------------------------------------------------------------------


def _unexpected_hint(unexpected: list[str]) -> str:
    """Why a Megatron state dict may carry tensors we do not have (the usual recipe mismatches)."""
    hints = []
    if any(re.search(r"(layer_norm_bias|norm\.bias)$", k) for k in unexpected):
        hints.append("norm biases: the Megatron model used LayerNorm; hybridlm models use RMSNorm")
    if any(re.search(r"(linear_\w+|_proj)\.bias\d*$", k) for k in unexpected):
        hints.append("linear biases: the Megatron model was trained without --disable-bias-linear")
    if any(k.endswith("position_embeddings.weight") for k in unexpected):
        hints.append("learned absolute position embeddings: hybridlm supports 'none' or 'rope'")
    return "".join(f"\n  hint: {h}" for h in hints)


#: Names that older or alternative Megatron builds use for a tensor, -> the 0.19 TE name.
_ALIASES = (
    (re.compile(r"^(.*\.mixer)\.conv1d\.(weight|bias)$"), r"\1.conv1d_\2"),  # Mamba, megatron-core 0.16
    (re.compile(r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.weight$"), r"\1.\3.weight\2"),
)


def _is_extra_state(name: str) -> bool:
    """Transformer Engine's FP8 metadata entries (``…._extra_state``; grouped linears add an index): no weights."""
    return name.rsplit(".", 1)[-1].startswith("_extra_state")


def _normalize_names(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop ``_extra_state`` entries and rename aliases; returns (state, {0.19 name: name given})."""
    out: dict[str, Tensor] = {}
    given: dict[str, str] = {}
    for name, t in state.items():
        if _is_extra_state(name):
            continue
        target = name
        for pattern, repl in _ALIASES:
            target = pattern.sub(repl, target)
        if target in out:
            raise CheckpointError(f"Megatron state dict has both {given[target]} and {name} (the same tensor)")
        out[target] = t
        given[target] = name
    return out, given


# -- the conversion -----------------------------------------------------------------------------------


def to_megatron(config: ModelConfig, canonical: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our canonical state dict -> Megatron-core ``HybridModel``'s plain (unfused, TP=1) state dict.

    Args:
        config: the model's architecture (brackets in its pattern do not matter).
        canonical: canonical name -> tensor, e.g. from :func:`hybridlm.checkpoint.weights.read_tensors`.

    Returns:
        Megatron name -> tensor, same dtypes; renamed tensors are passed through, repacked ones are new.

    Raises:
        CheckpointError: ``canonical`` is not exactly the tensor set of ``config`` (listed by name).
    """
    check_fit(canonical, canonical_shapes(config), "canonical state dict")
    return _apply(config, canonical, to_megatron=True)


def from_megatron(config: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Megatron-core ``HybridModel``'s plain state dict -> our canonical state dict (inverse of :func:`to_megatron`).

    ``_extra_state`` entries are ignored; megatron-core 0.16's ``mixer.conv1d.weight/.bias`` and the
    sequential-experts names ``mlp.experts.local_experts.{e}.linear_fc{1,2}.weight`` are accepted.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped tensors, each listed by Megatron name.
    """
    state, given = _normalize_names(state)
    expected = megatron_shapes(config)
    unexpected = sorted(k for k in state if k not in expected)
    # Report a tensor by the name it was given (an alias stays recognizable to the user).
    shown = {given[k]: t for k, t in state.items()}
    shown_expected = {given.get(k, k): s for k, s in expected.items()}
    check_fit(shown, shown_expected, "Megatron state dict", _unexpected_hint([given[k] for k in unexpected]))
    return _apply(config, state, to_megatron=False)


# -- files ------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    if path.suffix not in _SUFFIXES:
        raise CheckpointError(f"{path}: a Megatron state dict file must end in .pt or .safetensors")
    return path.suffix


def save_megatron(state: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write a Megatron state dict: ``.pt`` as ``torch.save({"model": state})``, ``.safetensors`` as a safetensors file.

    Both are written to a temporary file and renamed into place. Returns ``path``.
    """
    path = Path(path)
    kind = _suffix(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if kind == ".pt":
        replace_file(path, lambda tmp: torch.save({"model": tensors}, tmp))
    else:
        from safetensors.torch import save_file

        replace_file(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return path


def _as_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """The state dict inside what ``torch.load`` returned: ``{"model": sd}`` or a bare ``sd``."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and any(re.fullmatch(r"model\d+", str(k)) for k in obj):
        raise CheckpointError(
            f"{path}: holds one model per virtual pipeline stage ({', '.join(sorted(map(str, obj)))}); "
            "merge them into one unsplit state dict first"
        )
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in obj.items()
        if not (isinstance(k, str) and (isinstance(v, Tensor) or _is_extra_state(k)))
    ]
    if bad:
        raise CheckpointError(
            f"{path}: expected a state dict of tensors (or {{'model': state_dict}}); these entries are not tensors: "
            + ", ".join(bad[:MAX_LISTED])
        )
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def load_megatron(path: str | Path) -> dict[str, Tensor]:
    """Read a Megatron state dict from a ``.pt`` (``{"model": sd}`` or a bare ``sd``) or ``.safetensors`` file.

    ``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers only,
    no arbitrary pickled objects. Returns name -> tensor on the CPU.
    """
    path = Path(path)
    kind = _suffix(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if kind == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read as a torch.save file of tensors ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}). "
            "Megatron's own model_optim_rng.pt also pickles its training arguments; extract the weights with "
            "torch.save({'model': ckpt['model']}, 'model.pt') in an environment with megatron-core"
        ) from None
    return _as_state_dict(obj, path)


def config_sidecar(path: str | Path) -> Path:
    """Where our config JSON lives next to an exported Megatron file: ``<path>.hybridlm.json``."""
    return Path(str(path) + CONFIG_SIDECAR_SUFFIX)


def convert_to_megatron(src: str | Path, dst: str | Path) -> Path:
    """Convert the hybridlm checkpoint directory ``src`` to a Megatron state-dict file ``dst`` (.pt or .safetensors).

    Also writes our config to ``<dst>.hybridlm.json`` so that :func:`convert_from_megatron` needs no
    config argument. Returns ``dst``.
    """
    from .weights import read_config, read_tensors

    dst = Path(dst)
    _suffix(dst)
    config = read_config(src)
    save_megatron(to_megatron(config, read_tensors(src)), dst)
    replace_file(config_sidecar(dst), lambda tmp: tmp.write_text(config.to_json()))
    return dst


def _sidecar_config(src: Path) -> ModelConfig:
    sidecar = config_sidecar(src)
    if not sidecar.is_file():
        raise CheckpointError(
            f"{src}: a Megatron state dict does not describe its architecture; pass the model config "
            f"(a hybridlm ModelConfig JSON) or place it at {sidecar}"
        )
    try:
        return ModelConfig.from_json(sidecar)
    except ConfigError as e:
        raise CheckpointError(f"{sidecar}: invalid model config: {e}") from None


def convert_from_megatron(src: str | Path, dst: str | Path, config: ModelConfig | None = None) -> Path:
    """Convert the Megatron state-dict file ``src`` to a hybridlm checkpoint directory ``dst``.

    Args:
        src: a ``.pt`` or ``.safetensors`` file (see :func:`load_megatron`).
        dst: the checkpoint directory to write (replaced atomically if it is a hybridlm checkpoint).
        config: the architecture; default: read from ``<src>.hybridlm.json``.

    Returns:
        ``dst``.
    """
    from .weights import save_state_dict

    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    config = config if config is not None else _sidecar_config(src)
    canonical = from_megatron(config, load_megatron(src))
    return save_state_dict(canonical, config, dst)


__all__ = [
    "CONFIG_SIDECAR_SUFFIX",
    "canonical_shapes",
    "config_sidecar",
    "convert_from_megatron",
    "convert_to_megatron",
    "from_megatron",
    "load_megatron",
    "megatron_keys",
    "megatron_shapes",
    "save_megatron",
    "to_megatron",
]
