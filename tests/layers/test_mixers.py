"""Each mixer against its float64 reference (reference ops, no chunking), forward and backward."""

import copy
import re

import pytest
import torch

from hybridlm.layers import MLA, MLP, Attention, GatedDeltaNet, Mamba2Mixer, MoE, SequenceContext
from hybridlm.layers.attention import attention_reference
from hybridlm.layers.context import positions_in_segment
from hybridlm.layers.gdn import gdn_reference
from hybridlm.layers.mamba2 import mamba2_reference
from hybridlm.layers.mla import mla_reference
from hybridlm.layers.mlp import mlp_reference
from hybridlm.layers.moe import moe_reference
from hybridlm.layers.rope import Yarn, rope_cos_sin
from tests.helpers import MLA_TINY, assert_rel_close, rel_err, tiny_config
from tests.ops.test_ssd import docs

SEQLEN = 21  # longer than the chunk size (8) and not a multiple of it


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Random, decisive parameters: unit-ish norm weights, larger projections, spread-out routers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if (leaf in ("weight",) and p.dim() == 1) or leaf in ("D",):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif leaf in ("dt_bias", "A_log"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 2 / p.shape[1] ** 0.5)
            elif leaf == "bias":
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def make(cls, config, seed=0):
    layer = cls(config)
    layer.init_weights(None, 0.02, 0.01)  # allocate real values (the constructor leaves them empty)
    perturb(layer, seed)
    return layer


def context(config, b, seqlen, seq_idx, dtype=torch.float32):
    pos = positions_in_segment(seq_idx) if seq_idx is not None else torch.arange(seqlen).expand(b, seqlen)
    ctx = SequenceContext(position_ids=pos, seq_idx=seq_idx)
    if config.rotary_dim:
        ctx.rope = rope_cos_sin(pos, config.rotary_dim, config.rope_theta, dtype, Yarn.of(config))
    return ctx, pos


#: YaRN settings whose ramp is neither all kept nor all divided at these sizes (test_rope.py prints it).
YARN = dict(
    rope_type="yarn", yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=64, yarn_beta_fast=8.0
)

CASES = {
    "mamba2": (Mamba2Mixer, "M", {}),
    "mamba2-dt-clamp": (Mamba2Mixer, "M", {"mamba_dt_clamp_min": 0.05}),
    "attention": (Attention, "*", {}),
    "attention-rope-qknorm": (Attention, "*", {"position_embedding": "rope", "rotary_percent": 0.5, "qk_norm": True}),
    "attention-mha": (Attention, "*", {"num_query_groups": 4, "position_embedding": "rope"}),
    "attention-gate": (
        Attention,
        "*",
        {"attention_output_gate": True, "position_embedding": "rope", "rotary_percent": 0.5, "qk_norm": True},
    ),
    "mlp-relu2": (MLP, "-", {}),
    "mlp-gelu": (MLP, "-", {"mlp_activation": "gelu"}),
    "mlp-swiglu": (MLP, "-", {"mlp_activation": "swiglu"}),
    "moe-softmax": (MoE, "E", {"moe_shared_expert_ffn_hidden_size": 16}),
    "moe-sigmoid-groups": (
        MoE,
        "E",
        {
            "moe_router_score": "sigmoid",
            "moe_router_expert_bias": True,
            "moe_num_groups": 2,
            "moe_topk_groups": 1,
            "moe_routed_scaling": 2.5,
        },
    ),
    "moe-swiglu-unnormalized": (
        MoE,
        "E",
        {"mlp_activation": "swiglu", "moe_norm_topk_prob": False, "moe_num_experts": 6, "moe_top_k": 3},
    ),
    "moe-shared-gate": (
        MoE,
        "E",
        {"mlp_activation": "swiglu", "moe_shared_expert_ffn_hidden_size": 16, "moe_shared_expert_gate": True},
    ),
    "gdn": (GatedDeltaNet, "G", {}),
    "mla": (MLA, "+", MLA_TINY),
    "mla-full-rank-q": (MLA, "+", {**MLA_TINY, "q_lora_rank": None, "rope_theta": 500.0}),
    # YaRN: a ramp over the channels (kept, blended, divided by the factor), cos/sin and MLA's softmax rescaled
    "attention-yarn": (Attention, "*", {"position_embedding": "rope", "rope_theta": 50.0, **YARN}),
    "mla-yarn": (MLA, "+", {**MLA_TINY, "rope_theta": 50.0, **YARN, "yarn_mscale": 0.8, "yarn_mscale_all_dim": 0.6}),
    "gdn-more-value-heads": (GatedDeltaNet, "G", {"gdn_num_value_heads": 4, "gdn_value_head_dim": 6}),
}


def reference(layer, x, pos, seq_idx):
    if isinstance(layer, Mamba2Mixer):
        return mamba2_reference(layer, x, seq_idx)
    if isinstance(layer, Attention):
        return attention_reference(layer, x, pos, seq_idx)
    if isinstance(layer, MLA):
        return mla_reference(layer, x, pos, seq_idx)
    if isinstance(layer, GatedDeltaNet):
        return gdn_reference(layer, x, seq_idx)
    if isinstance(layer, MoE):
        return moe_reference(layer, x)
    return mlp_reference(layer, x)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_mixer_matches_reference(case, packed):
    cls, symbol, overrides = CASES[case]
    config = tiny_config(symbol, **overrides)
    layer = make(cls, config, seed=len(case))
    b = 2
    seq_idx = docs(b, SEQLEN, seed=5) if packed else None
    ctx, pos = context(config, b, SEQLEN, seq_idx)
    x = torch.randn(b, SEQLEN, config.hidden_size, requires_grad=True)
    y = layer(x, ctx)

    # The float64 reference is the truth. The same reference run in float32 shows how much
    # float32 rounding alone costs for these inputs: a kernel may be off by 1e-5 relative, or by
    # a few times the float32 reference's own error where cancellation makes that larger.
    ref64, ref32 = copy.deepcopy(layer).double(), copy.deepcopy(layer)
    x64 = x.detach().double().requires_grad_()
    x32 = x.detach().clone().requires_grad_()
    y64, y32 = reference(ref64, x64, pos, seq_idx), reference(ref32, x32, pos, seq_idx)

    def check(actual, r64, r32, what):
        tol = max(1e-5, 4 * rel_err(r32, r64))
        assert_rel_close(actual, r64, tol, f"{case} {what}")

    check(y, y64, y32, "output")
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    y32.backward(g)
    check(x.grad, x64.grad, x32.grad, "input grad")
    p64, p32 = dict(ref64.named_parameters()), dict(ref32.named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{case}: no gradient for {name}"
        check(p.grad, p64[name].grad, p32[name].grad, f"grad {name}")


@pytest.mark.parametrize(
    "case", ["mamba2", "attention-rope-qknorm", "attention-gate", "gdn", "moe-softmax", "mlp-relu2", "mla"]
)
def test_packed_equals_separate_documents(case):
    """A packed row gives each document exactly what it gets alone (positions restart too)."""
    cls, symbol, overrides = CASES[case]
    config = tiny_config(symbol, **overrides)
    layer = make(cls, config, seed=1)
    lengths = [5, 11, 9]
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    x = torch.randn(1, sum(lengths), config.hidden_size)
    ctx, _ = context(config, 1, sum(lengths), seq_idx)
    # RoPE is relative: positions counted on across the row would pass the comparison below too.
    assert torch.equal(ctx.position_ids, torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0))
    packed = layer(x, ctx)
    start = 0
    for n in lengths:
        ctx_alone, _ = context(config, 1, n, None)
        alone = layer(x[:, start : start + n], ctx_alone)
        assert_rel_close(packed[:, start : start + n], alone, 1e-5, f"{case} document at {start}")
        start += n


@pytest.mark.parametrize(
    "case", ["mamba2", "mamba2-dt-clamp", "gdn", "gdn-more-value-heads", "attention-gate", "attention-yarn", "mla-yarn"]
)
def test_cached_decoding_equals_full_forward(case):
    """Prefill 6 tokens (chunked scan), a window of 3 (Mamba2's stepped window), then single steps: the
    full forward's outputs. With ``mamba_dt_clamp_min`` the cached path must clamp dt as training does; with
    ``attention_output_gate`` every window must gate its own positions."""
    from hybridlm.infer.cache import InferenceCache

    cls, symbol, overrides = CASES[case]
    config = tiny_config(symbol, **overrides)
    layer = make(cls, config, seed=len(case))
    L = 13
    x = torch.randn(2, L, config.hidden_size)
    with torch.no_grad():
        full = layer(x, context(config, 2, L, None)[0])
        cache = InferenceCache([layer], 2, L, "cpu", torch.float32)
        outs = []
        for start, end in [(0, 6), (6, 9)] + [(t, t + 1) for t in range(9, L)]:
            ctx = SequenceContext(position_ids=cache.position_ids(end - start), cache=cache)
            if config.rotary_dim:
                ctx.rope = rope_cos_sin(ctx.position_ids, config.rotary_dim, config.rope_theta, yarn=Yarn.of(config))
            outs.append(layer(x[:, start:end], ctx))
            cache.advance(end - start)
    assert_rel_close(torch.cat(outs, dim=1), full, 1e-5, case)


@pytest.mark.parametrize("case", ["attention-rope-qknorm", "attention-gate", "mamba2", "gdn", "mla"])
def test_left_padded_prefill_in_one_window_equals_the_row_alone(case):
    """A prefill window that starts at offset 0 and holds padding and real tokens together: the padded
    row's real positions get what the row gets alone, and the padding reaches no state or output."""
    from hybridlm.infer.cache import InferenceCache

    cls, symbol, overrides = CASES[case]
    config = tiny_config(symbol, **overrides)
    layer = make(cls, config, seed=2)
    pad, L = 3, 9
    x = torch.randn(2, L + 1, config.hidden_size)
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[0, :pad] = False

    def run(cache, x):
        pos = cache.position_ids(x.shape[1])
        ctx = SequenceContext(position_ids=pos, cache=cache)
        if config.rotary_dim:
            ctx.rope = rope_cos_sin(pos, config.rotary_dim, config.rope_theta, yarn=Yarn.of(config))
        out = layer(x, ctx)
        cache.advance(x.shape[1])
        return out

    with torch.no_grad():
        alone = InferenceCache([layer], 1, L + 1, "cpu", torch.float32)
        ref = torch.cat([run(alone, x[:1, pad:L]), run(alone, x[:1, L:])], dim=1)
        cache = InferenceCache([layer], 2, L + 1, "cpu", torch.float32)
        cache.set_padding(valid)
        out = torch.cat([run(cache, x[:, :L]), run(cache, x[:, L:])], dim=1)  # the prefill, then one step
    assert_rel_close(out[:1, pad:], ref, 1e-5, case)


@pytest.mark.parametrize(
    "case",
    ["mamba2", "mamba2-dt-clamp", "gdn", "gdn-more-value-heads", "attention-rope-qknorm", "attention-gate", "mla"],
)
def test_a_float64_mixer_equals_its_float64_reference(case):
    """Cast as a float64 model casts it (``keep_fp32`` parameters stay float32), a mixer computes in float64 end
    to end: a recurrent one's dt / gates, conv, scan and norms ran in float32 (1e-7 off the reference), and
    attention's and MLA's RoPE angles and rotation did (2e-8 off)."""
    cls, symbol, overrides = CASES[case]
    config = tiny_config(symbol, **overrides)
    layer = make(cls, config, seed=len(case))
    ref64 = copy.deepcopy(layer).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name not in cls.keep_fp32:
                p.data = p.data.double()
    seq_idx = docs(2, SEQLEN, seed=7)
    ctx, pos = context(config, 2, SEQLEN, seq_idx, torch.float64)  # as a float64 HybridLM makes it
    x = torch.randn(2, SEQLEN, config.hidden_size, dtype=torch.float64)
    y = layer(x, ctx)
    assert y.dtype == torch.float64
    assert_rel_close(y, reference(ref64, x, pos, seq_idx), 1e-12, case)


@pytest.mark.parametrize("symbol", ["X", "[", "M-", ""])
def test_an_unknown_symbol_is_refused_naming_the_mixers_symbols(symbol):
    """A direct caller of mixer_class / build_mixer got a bare KeyError (the model refuses such patterns earlier)."""
    from hybridlm.layers import build_mixer, mixer_class

    says = rf"no mixer for pattern symbol {re.escape(repr(symbol))}; the mixers' symbols are M G \* \+ D - E"
    with pytest.raises(ValueError, match=says):
        mixer_class(symbol)
    with pytest.raises(ValueError, match=says):
        build_mixer(symbol, tiny_config("M"))


def test_a_registered_mixer_without_the_interface_is_refused_when_a_model_is_built(monkeypatch):
    """A mixer class registered without ``flops_per_token`` built and ran, and failed later as a bare
    AttributeError (the trainer counts FLOPs after reading the corpus)."""
    from hybridlm import HybridLM
    from hybridlm.layers import MIXERS

    class NoFlops(MLP):
        flops_per_token = None

    monkeypatch.setitem(MIXERS, "-", NoFlops)
    with pytest.raises(TypeError, match=r"^mixer NoFlops \(pattern symbol '-'\) has no flops_per_token: every mixer"):
        HybridLM(tiny_config("M-"), device="meta")


def test_the_output_gate_is_gate_proj_drawn_after_the_ungated_layers_weights():
    """``attention_output_gate`` adds one (heads * head_dim, hidden) ``gate_proj`` and changes nothing else: q, k,
    v and o draw what the ungated layer draws from the same generator, and the gate multiplies each output channel
    by its own sigmoid (a gate of +40 everywhere, sigmoid 1 in float32, gives the ungated output bitwise)."""
    config = tiny_config("*", position_embedding="rope", head_dim=6)
    gated_config = config.replace(attention_output_gate=True)
    plain, gated = Attention(config), Attention(gated_config)
    plain.init_weights(torch.Generator().manual_seed(3), 0.02, 0.01)
    gated.init_weights(torch.Generator().manual_seed(3), 0.02, 0.01)
    shapes = {n: tuple(p.shape) for n, p in gated.named_parameters()}
    assert shapes == {**{n: tuple(p.shape) for n, p in plain.named_parameters()}, "gate_proj.weight": (4 * 6, 32)}
    for name, p in plain.named_parameters():
        assert torch.equal(p, gated.get_parameter(name)), name
    assert gated.gate_proj.weight.std() > 0.01  # drawn, not left empty
    x = torch.randn(2, 7, config.hidden_size)
    ctx, _ = context(config, 2, 7, None)
    with torch.no_grad():
        assert not torch.allclose(gated(x, ctx), plain(x, ctx))
        gated.gate_proj.weight.zero_()  # sigmoid(0): half of every channel
        torch.testing.assert_close(gated(x, ctx), plain(x, ctx) / 2, rtol=1e-6, atol=0)
        ones = torch.zeros(4 * 6, 32)
        ones[:, 0] = 40.0
        gated.gate_proj.weight.copy_(ones)
        x[..., 0] = 1.0
        assert torch.equal(gated(x, ctx), plain(x, ctx))
