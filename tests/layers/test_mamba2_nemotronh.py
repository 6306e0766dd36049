"""``M`` against transformers' NemotronHMamba2Mixer (its plain-torch path), weights loaded by name.

docs/model.md computes our Mamba2 "as Megatron-LM and Hugging Face NemotronH compute it", parameter
names included. tests/checkpoint/test_hf_nemotron.py compares whole models in float32 without a cache;
here the layer alone meets transformers' mixer in float64 (:func:`hf_in_float64`: its scan, conv and
gated norm upcast with ``torch.float32``), forward and backward, packed documents (which transformers'
torch path cannot mask, so each document runs alone there) and cached decoding against its cache.
"""

import pytest
import torch

mn = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
from transformers import NemotronHConfig  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from hybridlm.checkpoint.hf_nemotron import NO_CLAMP_TIME_STEP_MIN  # noqa: E402
from hybridlm.infer.cache import InferenceCache  # noqa: E402
from hybridlm.layers import Mamba2Mixer, SequenceContext  # noqa: E402
from hybridlm.layers.context import segment_ids  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_same_gradients,
    hf_cache_kwarg,
    hf_in_float64,
    rel_err,
    tiny_config,
    with_imported_models,
)
from tests.layers.test_mixers import context, make  # noqa: E402

TOL = 1e-12
# (heads, head dim, state, groups, chunk, conv kernel, dt clamp)
VARIANTS = {
    "two-groups": (4, 8, 8, 2, 8, 4, 0.0),
    "odd-sizes": (6, 4, 5, 3, 5, 3, 0.0),
    "one-group-clamped": (4, 8, 8, 1, 16, 2, 0.05),  # many dt of these weights fall below 0.05
}


def pair(variant: str, seed: int = 1):
    """(our config, transformers config, our layer, theirs holding our weights), float64."""
    heads, hd, n, groups, chunk, k, clamp = VARIANTS[variant]
    cfg = tiny_config(
        "M",
        mamba_num_heads=heads,
        mamba_head_dim=hd,
        mamba_state_dim=n,
        mamba_num_groups=groups,
        mamba_chunk_size=chunk,
        mamba_conv_kernel=k,
        mamba_dt_clamp_min=clamp,
    )
    ours = make(Mamba2Mixer, cfg, seed=seed).double()
    hcfg = NemotronHConfig(
        hidden_size=cfg.hidden_size,
        mamba_num_heads=heads,
        mamba_head_dim=hd,
        ssm_state_size=n,
        n_groups=groups,
        chunk_size=chunk,
        conv_kernel=k,
        time_step_limit=(clamp, float("inf")),  # the clamp since transformers 5.25; before, time_step_min:
        time_step_min=clamp or NO_CLAMP_TIME_STEP_MIN,  # (as the exporter writes it, 1e-9 for none)
        layer_norm_epsilon=cfg.norm_eps,
        num_hidden_layers=1,
        layers_block_type=["mamba"],
    )
    theirs = mn.NemotronHMamba2Mixer(hcfg, 0).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes: no conversion
    return cfg, hcfg, ours, theirs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_sequence_matches_nemotronh(variant):
    """21 positions (several chunks, not a multiple): forward, and backward to the input and every parameter."""
    cfg, _, ours, theirs = pair(variant)
    L = 21
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
    w = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    with hf_in_float64(*with_imported_models(mn)):
        expected = theirs(x_theirs)
        (expected * w).sum().backward()
    actual = ours(x_ours, context(cfg, 2, L, None)[0])
    assert rel_err(actual, expected) < TOL, variant
    (actual * w).sum().backward()
    assert_same_gradients(variant, ours, theirs, x_ours, x_theirs, TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_documents_match_each_document_alone_in_nemotronh(variant):
    """Documents of one chunk, 1 and 12 positions in one row: each gets, forward and backward, what
    transformers gives it alone (conv taps and SSM state restart at its start)."""
    cfg, _, ours, theirs = pair(variant, seed=2)
    chunk = cfg.mamba_chunk_size
    lengths = [chunk, 1, 12]
    L = sum(lengths)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
    w = torch.randn(1, L, cfg.hidden_size, dtype=torch.float64, generator=gen)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    actual = ours(x_ours, context(cfg, 1, L, segment_ids(1, L, "cpu", doc_ids))[0])
    start, expected = 0, []
    with hf_in_float64(*with_imported_models(mn)):
        for n in lengths:
            expected.append(theirs(x_theirs[:, start : start + n]))
            start += n
        expected = torch.cat(expected, 1)
        (expected * w).sum().backward()
    assert rel_err(actual, expected) < TOL, variant
    (actual * w).sum().backward()
    assert_same_gradients(variant, ours, theirs, x_ours, x_theirs, TOL)


# transformers' one-token step leaves out its dt clamp (time_step_limit), which its chunked scan applies:
# with a clamp its decoding departs from its own full forward, so only unclamped variants compare.
@pytest.mark.parametrize("variant", ["two-groups", "odd-sizes"])
@pytest.mark.skipif(
    not hasattr(DynamicCache, "get_recurrent_state"),
    reason="transformers < 5.25 keeps the Mamba2 state in another cache",
)
def test_cached_decoding_matches_nemotronh_cache(variant):
    """A prefill of 6, a window of 3 (our stepped window), one of 9 (our chunked scan from a state), then
    single steps, each side with its own cache: the same outputs, SSM state and conv inputs."""
    cfg, hcfg, ours, theirs = pair(variant, seed=3)
    L = 21
    x = torch.randn(2, L, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cache, hf_cache = InferenceCache([ours], 2, L, "cpu", torch.float64), DynamicCache(config=hcfg)
    actual, expected = [], []
    with torch.no_grad(), hf_in_float64(*with_imported_models(mn)):
        for start, end in [(0, 6), (6, 9), (9, 18)] + [(t, t + 1) for t in range(18, L)]:
            ctx = SequenceContext(position_ids=cache.position_ids(end - start), cache=cache)
            actual.append(ours(x[:, start:end], ctx))
            cache.advance(end - start)
            expected.append(theirs(x[:, start:end], **hf_cache_kwarg(theirs, hf_cache)))
    assert rel_err(torch.cat(actual, 1), torch.cat(expected, 1)) < TOL, variant
    state = cache.state(ours)
    assert rel_err(state.recurrent, hf_cache.get_recurrent_state(0)) < TOL, f"{variant}: SSM state"
    K1 = state.conv.shape[1]  # ours keeps the last K-1 conv inputs (B, K-1, C); theirs (B, C, K)
    assert rel_err(state.conv, hf_cache.get_conv_state(0)[..., -K1:].transpose(1, 2)) < TOL, f"{variant}: conv"
