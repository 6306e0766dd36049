"""Cached decoding of multi-latent attention (+) and DeepSeek sparse attention (D) against the no-cache forward.

The checks are those of test_cache.py, run on patterns with ``+`` and ``D`` (alone, next to M/G, fused,
with MTP depths; ``*`` cannot share a model with them); model_for gives them the tiny latent sizes of
MLA_TINY, whose indexer keeps 5 keys, fewer than most prompts here have, so the selection matters.
"""

import pytest
import torch

from hybridlm import HybridLM, generate
from hybridlm.infer.cache import InferenceCache
from hybridlm.layers import DSA, MLA
from hybridlm.layers import dsa as dsa_module
from hybridlm.layers.mla import LatentCache
from tests.infer import test_cache as base
from tests.infer.test_cache import PROMPTS, model_for

PATTERNS = ["+", "D", "M+G-", "GD-M", "[+-]", "[DE]M", "M+/[+-]", "G[DE]/[D-]/[D-]"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cached_greedy_equals_the_no_cache_loop(pattern):
    base.test_cached_greedy_equals_the_no_cache_loop(pattern)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_then_steps_gives_the_full_forward_logits(pattern, static):
    base.test_prefill_then_steps_gives_the_full_forward_logits(pattern, static)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_dsa_prefill_and_steps_in_chunks_of_queries_give_the_full_forward_logits(static, monkeypatch):
    """The indexer's selection run over chunks of one query (``INDEXER_CHUNK_BYTES`` smaller than one query's
    products), in the full forward, the prefill and the decode steps alike: the logits stay the full forward's."""
    monkeypatch.setattr(dsa_module, "INDEXER_CHUNK_BYTES", 1)
    assert len(dsa_module.query_chunks(2, 5, 7, 3, 4)) == 5
    base.test_prefill_then_steps_gives_the_full_forward_logits("GD-M", static)


@pytest.mark.parametrize("pattern", ["+", "[DE]M", "G[DE]/[D-]/[D-]"])
@pytest.mark.parametrize("padded", [False, True])
def test_an_eager_decode_step_reads_only_the_positions_written(pattern, padded):
    base.test_an_eager_decode_step_reads_only_the_positions_written(pattern, padded)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chunked_prefill_equals_one_shot_prefill(pattern):
    base.test_chunked_prefill_equals_one_shot_prefill(pattern)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_batch_of_different_lengths_gives_each_prompt_its_own_tokens(pattern):
    base.test_a_batch_of_different_lengths_gives_each_prompt_its_own_tokens(pattern)


@pytest.mark.parametrize("pattern", ["+", "[DE]M"])
def test_padding_never_reaches_logits(pattern):
    base.test_padding_never_reaches_states_or_logits(pattern)


@pytest.mark.parametrize("pattern", ["M+/[+-]", "[+E]/+/+", "G[DE]/[D-]/[D-]"])
def test_speculative_greedy_equals_plain_greedy(pattern):
    base.test_speculative_greedy_equals_plain_greedy(pattern)


@pytest.mark.parametrize("latent", [True, False])
@pytest.mark.parametrize("pattern", ["+", "D"])
def test_latent_and_expanded_attention_give_the_same_logits(pattern, latent, monkeypatch):
    """Prefill and verification chunks may attend in either form (decode steps always in the latent one)."""
    model = model_for(pattern)
    monkeypatch.setattr(MLA, "latent_is_cheaper", lambda self, L, S: latent)
    widths, attend_latent = [], MLA.attend_latent
    monkeypatch.setattr(
        MLA, "attend_latent", lambda self, q, *a: widths.append(q.shape[1]) or attend_latent(self, q, *a)
    )
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(2))
    cache = InferenceCache.for_model(model, 2, 19)
    got = [model(ids[:, i : i + 4], cache=cache).logits for i in (0, 4, 8, 12)] + [
        model(ids[:, 16:], cache=cache).logits
    ]
    # Every window (4 or 3 tokens) took the form asked for: the latent one in each window, or never.
    assert widths == ([4, 4, 4, 4, 3] if latent else []), widths
    torch.testing.assert_close(torch.cat(got, 1), model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pattern", ["+", "D"])
def test_latent_decoding_of_a_float64_model_is_float64_exact(pattern):
    """The latent path's softmax ran in float32 whatever the model's dtype: 4e-7 off the float64 forward."""
    model = model_for(pattern).double()
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    cache = InferenceCache.for_model(model, 2, 13)
    with torch.no_grad():
        got = torch.cat([model(ids[:, i : i + 1], cache=cache).logits for i in range(13)], 1)
        torch.testing.assert_close(got, model(ids).logits, rtol=0, atol=1e-12)


def test_the_cost_rule_picks_latent_attention_for_few_queries_over_many_keys():
    layer = model_for("+").blocks["0"].layers[0].mixer
    assert layer.latent_is_cheaper(1, 64) and layer.latent_is_cheaper(4, 64)
    assert not layer.latent_is_cheaper(64, 64)


def test_tied_index_scores_keep_the_earliest_keys_when_cached():
    """An indexer whose scores are all 0 ties every key: each query keeps its first top-k keys, cached or not,
    and with left padding the earliest *real* keys."""
    model = model_for("D-")
    layer = model.blocks["0"].layers[0].mixer
    with torch.no_grad():
        layer.indexer.weights_proj.weight.zero_()
    ids = torch.tensor([PROMPTS[2]])
    cache = InferenceCache.for_model(model, 1, ids.shape[1])
    steps = [model(ids[:, :9], cache=cache).logits] + [
        model(ids[:, t : t + 1], cache=cache).logits for t in range(9, 23)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids).logits, rtol=0, atol=1e-5)
    rows = [PROMPTS[0], PROMPTS[2]]
    full = [model(torch.tensor([r])).logits[0, -1] for r in rows]
    ids, valid = base.left_pad(rows, "cpu")
    cache = InferenceCache.for_model(model, 2, ids.shape[1])
    cache.set_padding(valid)
    logits = base.prefill(model, ids, cache, chunk_size=1)  # padding and prompt through the step path
    torch.testing.assert_close(logits, torch.stack(full), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", [MLA, DSA])
def test_the_cache_holds_only_the_latent(cls):
    """Per token and layer: kv_lora_rank + qk_pos_emb_head_dim values (+ the indexer key for D),
    not a KV cache's heads * (qk_head_dim + qk_pos_emb_head_dim + v_head_dim)."""
    model = HybridLM(model_for("+" if cls is MLA else "D").config, seed=1, dtype=torch.bfloat16).eval()
    c, layer = model.config, model.blocks["0"].layers[0].mixer
    cache = InferenceCache.for_model(model, 3, 11)
    state = cache.state(layer)
    assert isinstance(state, LatentCache) and state.snapshot() is None
    assert state.c_kv.shape == (3, 11, c.kv_lora_rank) and state.k_pe.shape == (3, 11, c.qk_pos_emb_head_dim)
    assert state.c_kv.dtype == state.k_pe.dtype == torch.bfloat16
    if cls is DSA:
        assert state.index_k.shape == (3, 11, c.dsa_indexer_head_dim) and state.index_k.dtype == torch.float32
    else:
        assert state.index_k is None
    per_token = c.kv_lora_rank + c.qk_pos_emb_head_dim
    assert sum(t.shape[-1] for t in (state.c_kv, state.k_pe)) == per_token
    assert per_token < c.num_attention_heads * (c.qk_head_dim + c.qk_pos_emb_head_dim + c.v_head_dim)
    out = model(torch.randint(0, 97, (3, 5)), cache=cache)
    assert torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="index_k"):
        state.write(cache, state.c_kv[:, :2], state.k_pe[:, :2], None if cls is DSA else state.c_kv[:, :2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_decode_on_gpu(dtype, monkeypatch):
    model = HybridLM(model_for("M[+-]G[DE]").config, seed=1, device="cuda", dtype=dtype).eval()
    graphed = generate(model, PROMPTS, max_new_tokens=16, cuda_graph=True)
    if dtype == torch.float32:  # eager attends over the positions written only: the same tokens
        assert generate(model, PROMPTS, max_new_tokens=16) == graphed
    monkeypatch.setattr(InferenceCache, "static", True)
    assert generate(model, PROMPTS, max_new_tokens=16) == graphed  # same kernels, replayed: bitwise the same
