"""``G`` against transformers' Qwen3NextGatedDeltaNet (its plain-torch fallbacks), weights loaded by name.

docs/model.md calls our Gated DeltaNet Qwen3-Next's, parameter names included: a Qwen3-Next
``linear_attn`` state dict must load as it is and give the same outputs, full sequence, cached
decoding and packed documents alike. transformers computes the rule and the gated norm in float32
whatever the model's dtype; :func:`hf_in_float64` lifts that so the two agree to rounding (1e-10 in
float64), where a layout slip (head grouping, norm order, scale, conv channels) would show at O(1).
"""

import pytest
import torch

mq = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
from transformers import Qwen3NextConfig  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from hybridlm.infer.cache import InferenceCache  # noqa: E402
from hybridlm.layers import GatedDeltaNet, SequenceContext  # noqa: E402
from hybridlm.layers.context import segment_ids  # noqa: E402
from tests.helpers import assert_same_gradients, hf_cache_kwarg, hf_in_float64, rel_err, tiny_config  # noqa: E402
from tests.layers.test_mixers import context, make  # noqa: E402

TOL = 1e-10
# (qk heads, value heads, head dim, value head dim, conv kernel, chunk size). Qwen3-Next itself has
# 16 qk heads and 32 value heads: value head h*r + j reads qk head h (r = value / qk heads).
VARIANTS = {
    "equal-heads": (2, 2, 8, 8, 4, 8),
    "qwen3next-like": (2, 4, 8, 6, 4, 8),
    "three-values-per-key": (1, 3, 8, 4, 2, 16),
    "conv3-chunk5": (2, 4, 6, 10, 3, 5),
}


def pair(variant: str, seed: int = 3):
    """(our config, transformers config, our layer, theirs holding our weights), float64."""
    nk, nv, dk, dv, K, chunk = VARIANTS[variant]
    cfg = tiny_config(
        "G",
        gdn_num_heads=nk,
        gdn_num_value_heads=nv,
        gdn_head_dim=dk,
        gdn_value_head_dim=dv,
        gdn_conv_kernel=K,
        gdn_chunk_size=chunk,
    )
    ours = make(GatedDeltaNet, cfg, seed=seed).double()
    hcfg = Qwen3NextConfig(
        hidden_size=cfg.hidden_size,
        linear_num_key_heads=nk,
        linear_num_value_heads=nv,
        linear_key_head_dim=dk,
        linear_value_head_dim=dv,
        linear_conv_kernel_dim=K,
        rms_norm_eps=cfg.norm_eps,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=16,
    )
    theirs = mq.Qwen3NextGatedDeltaNet(hcfg, 0).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes: no conversion
    return cfg, hcfg, ours, theirs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_sequence_matches_qwen3next(variant):
    """70 positions: several of our chunks and two of theirs (64), neither length a multiple; forward, and
    backward to the input and every parameter."""
    cfg, _, ours, theirs = pair(variant)
    L = 70
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
    w = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    with hf_in_float64(mq):
        expected = theirs(x_theirs)
    actual = ours(x_ours, context(cfg, 2, L, None)[0])
    assert rel_err(actual, expected) < TOL, variant
    (actual * w).sum().backward()
    (expected * w).sum().backward()
    assert_same_gradients(variant, ours, theirs, x_ours, x_theirs, TOL)


@pytest.mark.skipif(
    not hasattr(DynamicCache, "get_recurrent_state"), reason="transformers < 5.25 keeps the GDN state in another cache"
)
@pytest.mark.parametrize("variant", ["qwen3next-like", "three-values-per-key"])
def test_cached_decoding_matches_qwen3next_cache(variant):
    """A one-token prefill (shorter than the conv), a window of 10, then single steps, each side with its
    own cache: the same outputs and the same recurrent state."""
    cfg, hcfg, ours, theirs = pair(variant, seed=4)
    L = 16
    x = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cache, hf_cache = InferenceCache([ours], 2, L, "cpu", torch.float64), DynamicCache(config=hcfg)
    actual, expected = [], []
    with torch.no_grad(), hf_in_float64(mq):
        for start, end in [(0, 1), (1, 11)] + [(t, t + 1) for t in range(11, L)]:
            ctx = SequenceContext(position_ids=cache.position_ids(end - start), cache=cache)
            actual.append(ours(x[:, start:end], ctx))
            cache.advance(end - start)
            expected.append(theirs(x[:, start:end], **hf_cache_kwarg(theirs, hf_cache)))
    assert rel_err(torch.cat(actual, 1), torch.cat(expected, 1)) < TOL
    state, hf_state = cache.state(ours).recurrent, hf_cache.get_recurrent_state(0)
    assert rel_err(state, hf_state) < TOL


def test_packed_documents_match_qwen3next_documents_alone():
    """cu_seqlens over two rows: documents of 8 (ending on a chunk boundary), 1 and 13, then 3 and 19;
    each must get what Qwen3-Next gives it alone (conv taps and state restart at its start)."""
    cfg, _, ours, theirs = pair("qwen3next-like", seed=5)
    L = 22
    x = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, 8, 9, 22, 25, 44])
    seq_idx = segment_ids(2, L, x.device, cu_seqlens=cu)
    flat = x.reshape(2 * L, -1)
    with torch.no_grad(), hf_in_float64(mq):
        packed = ours(x, context(cfg, 2, L, seq_idx)[0]).reshape(2 * L, -1)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = theirs(flat[None, start:end])[0]
            assert rel_err(packed[start:end], alone) < TOL, f"document [{start}, {end})"
