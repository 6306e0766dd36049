"""``*`` with RoPE, partial RoPE, QK-norm and grouped-query heads against transformers' attention modules.

tests/checkpoint/test_hf_nemotron.py covers attention without position embedding or QK-norm
(NemotronH's). Here the options NemotronH lacks meet the transformers modules that compute them, holding
our weights under the same names: Qwen3Attention (per-head RMSNorm on queries and keys, full rotate-half
RoPE, head_dim independent of hidden/heads) and StableLmAttention (``partial_rotary_factor``: the
first ``int(head_dim * factor)`` channels of each head rotate, rotate-half within them, frequencies
over the rotated width; docs/model.md's ``rotary_percent``), each also with YaRN's frequencies (rope_type "yarn",
which transformers' modeling_rope_utils computes, cos/sin factor included). Both sides run in float64
(:func:`hf_in_float64`), so they agree to rounding where a convention slip (interleaved pairs, which
channels rotate, the frequency base, norm before or after RoPE, the KV-group order) shows at O(1).
"""

import pytest
import torch

mq = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
ms = pytest.importorskip("transformers.models.stablelm.modeling_stablelm")
from transformers import Qwen3Config, StableLmConfig, modeling_rope_utils  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from hybridlm.infer.cache import InferenceCache  # noqa: E402
from hybridlm.layers import Attention, SequenceContext  # noqa: E402
from hybridlm.layers.rope import Yarn, rope_cos_sin  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_same_gradients,
    hf_cache_kwarg,
    hf_in_float64,
    hf_rope_parameters,
    rel_err,
    tiny_config,
)
from tests.layers.test_mixers import (  # noqa: E402
    YARN,
    context,
    make,
)

TOL = 1e-12
# our overrides of tiny_config("*") (hidden 32, 4 heads), and which transformers module computes them.
VARIANTS = {
    "qwen3-gqa-wide-heads": ("qwen3", {"qk_norm": True, "num_query_groups": 2, "head_dim": 12}),
    "qwen3-one-kv-head": ("qwen3", {"qk_norm": True, "num_query_groups": 1, "head_dim": 6, "rope_theta": 500.0}),
    "stablelm-three-quarters": ("stablelm", {"num_query_groups": 2, "rotary_percent": 0.75}),  # 6 of 8 rotate
    "stablelm-quarter-mha": ("stablelm", {"num_query_groups": 4, "rotary_percent": 0.25, "rope_theta": 1000.0}),
    # YaRN (transformers' rope_utils computes the frequencies and the cos/sin factor): a ramp across the channels
    "qwen3-yarn": ("qwen3", {"qk_norm": True, "num_query_groups": 2, "head_dim": 12, "rope_theta": 50.0, **YARN}),
    "stablelm-yarn-partial-unrounded": (
        "stablelm",
        {"num_query_groups": 2, "rotary_percent": 0.5, "rope_theta": 500.0, **YARN}
        | {"yarn_rotary_scaling_factor": 8.0, "yarn_original_max_position_embeddings": 320, "yarn_beta_slow": 0.5}
        | {"yarn_mscale": 0.8, "yarn_mscale_all_dim": 0.6, "yarn_correction_range_round_to_int": False},
    ),
}


def pair(variant: str, seed: int = 1):
    """(our config, transformers config, our layer, theirs holding our weights, their RoPE module), float64.

    Call inside :func:`hf_in_float64`: the RoPE module computes its frequencies when built."""
    kind, overrides = VARIANTS[variant]
    cfg = tiny_config("*", position_embedding="rope", **overrides)
    ours = make(Attention, cfg, seed=seed).double()
    common = dict(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.resolved_num_query_groups,
        num_hidden_layers=1,
        attn_implementation="eager",  # their softmax, not SDPA's: an oracle independent of ours
    )
    if kind == "qwen3":
        rope = hf_rope_parameters(cfg)
        hcfg = Qwen3Config(head_dim=cfg.resolved_head_dim, rms_norm_eps=cfg.norm_eps, rope_parameters=rope, **common)
        theirs, rotary = mq.Qwen3Attention(hcfg, 0), mq.Qwen3RotaryEmbedding(hcfg)
    else:
        rope = hf_rope_parameters(cfg, partial_rotary_factor=cfg.rotary_percent)
        hcfg = StableLmConfig(rope_parameters=rope, **common)
        theirs, rotary = ms.StableLmAttention(hcfg, 0), ms.StableLmRotaryEmbedding(hcfg)
    theirs.double().load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    return cfg, hcfg, ours, theirs, rotary


def theirs_forward(theirs, rotary, x, positions, start: int = 0, cache=None):
    """Their layer on x (B, n, hidden) at ``positions`` (B, n), after ``start`` cached positions."""
    n = x.shape[1]
    allowed = torch.ones(n, start + n, dtype=torch.bool).tril(start)
    mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, float("-inf"))[None, None]
    return theirs(x, position_embeddings=rotary(x, positions), attention_mask=mask, **hf_cache_kwarg(theirs, cache))[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_sequence_matches_transformers(variant):
    """Forward, and backward to the input and every parameter."""
    L = 13
    gen = torch.Generator().manual_seed(0)
    with hf_in_float64(mq, ms, modeling_rope_utils):
        cfg, _, ours, theirs, rotary = pair(variant)
        x = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
        w = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = theirs_forward(theirs, rotary, x_theirs, torch.arange(L).expand(2, L))
        actual = ours(x_ours, context(cfg, 2, L, None, torch.float64)[0])
        assert rel_err(actual, expected) < TOL, variant
        (actual * w).sum().backward()
        (expected * w).sum().backward()
    assert_same_gradients(variant, ours, theirs, x_ours, x_theirs, TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_documents_match_each_document_alone_in_transformers(variant):
    """Documents of 4, 1 and 8 in one row: each gets what transformers gives it alone. RoPE is relative,
    so positions counted on across the row would pass that too: they are checked to restart at 0."""
    lengths = [4, 1, 8]
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    with torch.no_grad(), hf_in_float64(mq, ms, modeling_rope_utils):
        cfg, _, ours, theirs, rotary = pair(variant, seed=2)
        x = torch.randn(
            1, sum(lengths), cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        ctx, pos = context(cfg, 1, sum(lengths), seq_idx, torch.float64)
        assert pos.tolist() == [[0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5, 6, 7]]
        actual = ours(x, ctx)
        start = 0
        for n in lengths:
            expected = theirs_forward(theirs, rotary, x[:, start : start + n], torch.arange(n)[None])
            assert rel_err(actual[:, start : start + n], expected) < TOL, f"{variant}: document at {start}"
            start += n


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_matches_transformers_dynamic_cache(variant, static):
    """A prefill of 5, a window of 3 after it (queries over cached and new keys), then single steps, each
    side with its own cache (ours preallocated, theirs a DynamicCache): the same outputs and cached keys.
    ``static``: our steps attend over the whole buffer, masked by the device-side offset (CUDA graphs)."""
    L = 11
    with torch.no_grad(), hf_in_float64(mq, ms, modeling_rope_utils):
        cfg, hcfg, ours, theirs, rotary = pair(variant, seed=3)
        x = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        cache, hf_cache = InferenceCache([ours], 2, L, "cpu", torch.float64), DynamicCache(config=hcfg)
        cache.static = static
        actual, expected = [], []
        for start, end in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, L)]:
            pos = cache.position_ids(end - start)
            rope = rope_cos_sin(pos, cfg.rotary_dim, cfg.rope_theta, torch.float64, Yarn.of(cfg))
            actual.append(ours(x[:, start:end], SequenceContext(position_ids=pos, rope=rope, cache=cache)))
            cache.advance(end - start)
            expected.append(theirs_forward(theirs, rotary, x[:, start:end], pos, start, hf_cache))
    assert rel_err(torch.cat(actual, 1), torch.cat(expected, 1)) < TOL, variant
    assert rel_err(cache.state(ours).k, hf_cache.layers[0].keys) < TOL, f"{variant}: cached (rotated) keys"


def test_gated_attention_matches_qwen3_next():
    """``attention_output_gate`` against transformers' ``Qwen3NextAttention``: its q_proj rows are ``[q_h | gate_h]``
    per head h (our q_proj and gate_proj, interleaved head by head), its q/k norms scale by ``1 + w`` (our weight
    minus 1), partial rotate-half RoPE: forward, backward and cached decoding agree in float64."""
    mn = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    from transformers import Qwen3NextConfig

    from hybridlm.checkpoint.adapter import interleave

    overrides = {"qk_norm": True, "num_query_groups": 2, "head_dim": 8, "rotary_percent": 0.5, "rope_theta": 500.0}
    L = 11
    gen = torch.Generator().manual_seed(0)
    with hf_in_float64(mn):
        cfg = tiny_config("*", position_embedding="rope", attention_output_gate=True, **overrides)
        ours = make(Attention, cfg, seed=4).double()
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_percent}
        hcfg = Qwen3NextConfig(
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.resolved_num_query_groups,
            head_dim=cfg.resolved_head_dim,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters=rope,
            num_hidden_layers=1,
            layer_types=["full_attention"],
            attn_implementation="eager",
        )
        theirs, rotary = mn.Qwen3NextAttention(hcfg, 0).double(), mn.Qwen3NextRotaryEmbedding(hcfg)
        state = {k: v for k, v in ours.state_dict().items() if k != "gate_proj.weight"}
        state["q_proj.weight"] = interleave([ours.q_proj.weight, ours.gate_proj.weight], cfg.num_attention_heads)
        state |= {f"{n}_norm.weight": getattr(ours, f"{n}_norm").weight - 1 for n in "qk"}
        theirs.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
        x = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = theirs_forward(theirs, rotary, x_theirs, torch.arange(L).expand(2, L))
        actual = ours(x_ours, context(cfg, 2, L, None, torch.float64)[0])
        assert rel_err(actual, expected) < TOL
        w = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
        (actual * w).sum().backward()
        (expected * w).sum().backward()
        assert rel_err(x_ours.grad, x_theirs.grad) < TOL
        their_q = theirs.q_proj.weight.grad.view(cfg.num_attention_heads, 2, 8, -1)
        assert rel_err(ours.q_proj.weight.grad, their_q[:, 0].reshape(-1, cfg.hidden_size)) < TOL
        assert rel_err(ours.gate_proj.weight.grad, their_q[:, 1].reshape(-1, cfg.hidden_size)) < TOL
        with torch.no_grad():  # cached decoding: a prefill of 5, then single steps, each side with its own cache
            cache, hf_cache = InferenceCache([ours], 2, L, "cpu", torch.float64), DynamicCache(config=hcfg)
            steps = []
            for start, end in [(0, 5)] + [(t, t + 1) for t in range(5, L)]:
                pos = cache.position_ids(end - start)
                ctx = SequenceContext(position_ids=pos, cache=cache)
                ctx.rope = rope_cos_sin(pos, cfg.rotary_dim, cfg.rope_theta, torch.float64)
                steps.append(
                    (ours(x[:, start:end], ctx), theirs_forward(theirs, rotary, x[:, start:end], pos, start, hf_cache))
                )
                cache.advance(end - start)
        assert rel_err(torch.cat([a for a, _ in steps], 1), torch.cat([b for _, b in steps], 1)) < TOL
