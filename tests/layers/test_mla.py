"""Multi-latent attention (+) and DeepSeek sparse attention (D): references, the indexer and its loss, latent caches
(layer level; the model-level cached decoding tests are in tests/infer/test_cache_mla.py).

MLA's forward/backward against its float64 reference runs in test_mixers.py with the other mixers;
DSA is here because its indexer learns from its auxiliary loss, which that harness does not include.
"""

import copy
import gc
import weakref

import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.errors import ConfigError
from hybridlm.infer.cache import InferenceCache
from hybridlm.layers import DSA, MLA
from hybridlm.layers import dsa as dsa_module
from hybridlm.layers.context import SequenceContext, positions_in_segment
from hybridlm.layers.dsa import dsa_reference, indexer_scores_reference
from hybridlm.layers.mla import causal_document_mask, mla_queries_keys_values_reference, mla_reference
from hybridlm.layers.rope import Yarn, rope_frequencies
from hybridlm.ops.indexer import index_scores, select_topk
from tests.helpers import MLA_TINY, assert_rel_close, hf_rope_parameters, rel_err, tiny_config
from tests.layers.test_mixers import SEQLEN, YARN, context, make
from tests.ops.test_ssd import docs


def dsa_config(**overrides):
    return tiny_config("D", **{**MLA_TINY, "dsa_indexer_loss_coeff": 0.5, **overrides})


def kl_reference(layer, x, pos, seq_idx, sparse: bool) -> torch.Tensor:
    """The indexer loss, one query row at a time, with the layer's detach rules: the indexer sees
    ``x`` and ``c_q`` detached, the target distribution is a constant."""
    b, L, _ = x.shape
    q, k, _, c_q = mla_queries_keys_values_reference(layer, x, pos)
    q, k = q.detach(), k.detach()
    scores = indexer_scores_reference(layer, x.detach(), c_q.detach(), pos)
    allowed = causal_document_mask(L, seq_idx, b)
    valid = select_topk(scores.detach(), allowed, layer.config.dsa_indexer_topk) if sparse else allowed
    rows = []
    for i in range(b):
        for t in range(L):
            keys = valid[i, t].nonzero().flatten()
            logits = torch.einsum("hd,shd->hs", q[i, t], k[i, keys]) / (layer.dn + layer.dr) ** 0.5
            p = logits.softmax(-1).sum(0)
            p = p / p.sum()
            log_pred = scores[i, t, keys].log_softmax(-1)
            rows.append((p * (p.log() - log_pred)).sum())
    return layer.config.dsa_indexer_loss_coeff * torch.stack(rows).mean()


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("sparse_loss", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_dsa_matches_reference(packed, sparse_loss, chunked, monkeypatch):
    """The output, the indexer loss and every gradient against float64 references, the selection and the loss run
    over all queries at once or (``chunked``) over chunks of 4 queries (the last shorter), each chunk of the loss
    checkpointed."""
    config = dsa_config(dsa_indexer_use_sparse_loss=sparse_loss)
    if chunked:  # 4 queries a chunk: batch 2 x 21 keys x 3 heads x 4 bytes each
        monkeypatch.setattr(dsa_module, "INDEXER_CHUNK_BYTES", 4 * 2 * SEQLEN * config.dsa_indexer_n_heads * 4)
        assert len(dsa_module.query_chunks(2, SEQLEN, SEQLEN, config.dsa_indexer_n_heads, 4)) == 6
    layer = make(DSA, config, seed=3)
    b = 2
    seq_idx = docs(b, SEQLEN, seed=5) if packed else None
    ctx, pos = context(config, b, SEQLEN, seq_idx)
    x = torch.randn(b, SEQLEN, config.hidden_size, requires_grad=True)
    aux_losses = []
    y = layer(x, ctx, aux_losses)
    (aux,) = aux_losses

    ref64, ref32 = copy.deepcopy(layer).double(), copy.deepcopy(layer)
    x64, x32 = x.detach().double().requires_grad_(), x.detach().clone().requires_grad_()
    # The reference chooses its own top-k (float64 scores, explicit loops): the selection matches too.
    y64, y32 = dsa_reference(ref64, x64, pos, seq_idx), dsa_reference(ref32, x32, pos, seq_idx)
    aux64, aux32 = (
        kl_reference(ref64, x64, pos, seq_idx, sparse_loss),
        kl_reference(ref32, x32, pos, seq_idx, sparse_loss),
    )

    def check(actual, r64, r32, what):
        assert_rel_close(actual, r64, max(1e-5, 4 * rel_err(r32, r64)), f"{what}")

    check(y, y64, y32, "output")
    check(aux, aux64, aux32, "indexer loss")
    assert aux.item() > 1e-3  # a loss far from zero, so its gradients below are checked on numbers

    g = torch.randn_like(y)
    ((y * g).sum() + aux).backward()
    ((y64 * g.double()).sum() + aux64).backward()
    ((y32 * g).sum() + aux32).backward()
    check(x.grad, x64.grad, x32.grad, "input grad")
    p64, p32 = dict(ref64.named_parameters()), dict(ref32.named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        check(p.grad, p64[name].grad, p32[name].grad, f"grad {name}")


@pytest.mark.parametrize("sparse_loss", [False, True])
def test_the_indexer_loss_keeps_no_products_of_every_query_and_key(sparse_loss):
    """What a DSA layer keeps for its backward with the indexer loss, beyond what it keeps without it, is a few
    tensors a token (the indexer's keys and its norm's statistics, the chunks' inputs) and the keys' mask, not the
    per-head products of every query and key: those are computed again in the backward, chunk by chunk. Counted by
    storage (a chunk's inputs are views). Before, the loss kept 4 bytes a query, key and index head here (eager,
    float32) and 3 compiled on an H100: 13 GiB for one layer of 64 heads at 4 x 4096 (docs/benchmarks.md,
    fifty-fifth session)."""
    b, L, n = 2, 128, 16

    def kept(coeff: float) -> int:
        config = dsa_config(
            dsa_indexer_loss_coeff=coeff, dsa_indexer_use_sparse_loss=sparse_loss, dsa_indexer_n_heads=n
        )
        layer = make(DSA, config, seed=3)
        ctx, _ = context(config, b, L, docs(b, L, seed=5))
        x = torch.randn(b, L, config.hidden_size, requires_grad=True)
        packed = []

        def pack(t):
            packed.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
            return t

        aux = []
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x, ctx, aux)
        gc.collect()  # what a graph nothing reaches saved (the selection's) is gone: only what y and aux keep counts
        params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        alive = {ptr: nbytes for ref, ptr, nbytes in packed if ref() is not None and ptr not in params}
        (y.sum() + sum(aux)).backward()
        assert len(aux) == (coeff > 0)
        return sum(alive.values())

    extra = kept(0.5) - kept(0.0)
    assert 0 < extra < b * L * L * n * 4 / 8, extra  # an eighth of what it kept before


def test_selection_keeps_topk_allowed_keys():
    config = dsa_config()
    layer = make(DSA, config, seed=4)
    seq_idx = docs(2, SEQLEN, seed=5)
    _, pos = context(config, 2, SEQLEN, seq_idx)
    x = torch.randn(2, SEQLEN, config.hidden_size)
    with torch.no_grad():
        _, _, _, c_q = layer.qkv(x, pos)
        allowed = causal_document_mask(SEQLEN, seq_idx, 2)
        scores, selected = layer.select(x, c_q, pos, allowed)
    assert not (selected & ~allowed).any()
    k = config.dsa_indexer_topk
    assert torch.equal(selected.sum(-1), allowed.sum(-1).clamp(max=k))
    assert (allowed.sum(-1) > k).any()  # some queries really choose
    # Every selected key scores at least as high as every allowed key left out.
    low = scores.masked_fill(~selected, float("inf")).min(-1).values
    high = scores.masked_fill(~allowed | selected, float("-inf")).max(-1).values
    assert (low >= high).all()


def test_indexer_stays_float32_under_autocast_and_in_bf16():
    config = dsa_config()
    layer = make(DSA, config, seed=8)
    ctx, pos = context(config, 2, SEQLEN, None)
    x = torch.randn(2, SEQLEN, config.hidden_size)
    ix = layer.indexer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = layer.rope(pos)
        _, _, _, c_q = layer.qkv(x, pos)
        q, w = ix.queries(x, c_q, cos, sin)
        k = ix.keys(x, cos, sin)
        scores = index_scores(q, w, k)
        aux_losses = []
        layer(x, ctx, aux_losses)
    assert q.dtype == w.dtype == k.dtype == scores.dtype == aux_losses[0].dtype == torch.float32
    assert torch.equal(scores, index_scores(q, w, k))  # the same float32 computation as without autocast

    model = HybridLM(tiny_config("D-", **MLA_TINY), dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["blocks.0.layers.0.mixer.indexer.weights_proj.weight"] == torch.float32
    assert dtypes["blocks.0.layers.0.mixer.indexer.wq_b.weight"] == torch.bfloat16
    out = model(torch.randint(0, 97, (1, 9)))
    assert torch.isfinite(out.logits).all()
    cache = InferenceCache.for_model(model, 1, 3)
    model(torch.randint(0, 97, (1, 3)), cache=cache)
    state = cache.state(model.blocks["0"].layers[0].mixer)
    assert state.c_kv.dtype == torch.bfloat16 and state.index_k.dtype == torch.float32


def test_dsa_with_topk_beyond_the_sequence_is_mla():
    config = dsa_config(dsa_indexer_topk=SEQLEN)
    dsa = make(DSA, config, seed=5)
    mla = MLA(config)
    mla.load_state_dict({k: v for k, v in dsa.state_dict().items() if not k.startswith("indexer.")})
    for packed in (False, True):
        seq_idx = docs(2, SEQLEN, seed=6) if packed else None
        ctx, _ = context(config, 2, SEQLEN, seq_idx)
        x = torch.randn(2, SEQLEN, config.hidden_size)
        with torch.no_grad():
            assert_rel_close(dsa(x, ctx), mla(x, ctx), 1e-6, f"packed={packed}")


def test_indexer_and_attention_learn_from_separate_losses():
    config = dsa_config()
    layer = make(DSA, config, seed=6)
    ctx, _ = context(config, 2, SEQLEN, None)
    x = torch.randn(2, SEQLEN, config.hidden_size, requires_grad=True)
    aux_losses = []
    y = layer(x, ctx, aux_losses)
    (aux,) = aux_losses
    indexer = {n for n, _ in layer.named_parameters() if n.startswith("indexer.")}
    grads = torch.autograd.grad(aux, [x, *layer.parameters()], allow_unused=True)
    for name, g in zip(["x", *(n for n, _ in layer.named_parameters())], grads):
        if name in indexer:
            assert g is not None and g.abs().sum() > 0, name
        else:
            assert g is None, f"the indexer loss reaches {name}"
    grads = torch.autograd.grad(y.sum(), list(layer.parameters()), allow_unused=True)
    for (name, _), g in zip(layer.named_parameters(), grads):
        assert (g is None) == (name in indexer), name


def test_indexer_loss_only_when_asked():
    layer = make(DSA, dsa_config(dsa_indexer_loss_coeff=0.0), seed=1)
    ctx, _ = context(layer.config, 1, 9, None)
    aux_losses = []
    layer(torch.randn(1, 9, 32), ctx, aux_losses)
    assert aux_losses == []
    layer = make(DSA, dsa_config(), seed=1)
    ctx, _ = context(layer.config, 1, 9, None)
    with torch.no_grad():
        layer(torch.randn(1, 9, 32), ctx, aux_losses)
    assert aux_losses == []


def test_a_frozen_indexer_computes_no_loss_and_changes_nothing_else():
    """train.trainable may freeze the indexer (every parameter of it) while the layer trains: its loss would reach
    nothing, so it is not computed (its target costs several times the layer's step); the output and every other
    gradient are bitwise those of the layer that computes it. One parameter of the indexer trained: computed."""
    config = dsa_config()
    x = torch.randn(2, SEQLEN, config.hidden_size)
    ctx, _ = context(config, 2, SEQLEN, None)
    runs = {}
    for frozen in ((), ("indexer.",), ("indexer.wq_b.", "indexer.weights_proj.", "indexer.k_norm.")):
        layer = make(DSA, config, seed=6)
        for name, p in layer.named_parameters():
            p.requires_grad_(not name.startswith(frozen))
        aux_losses = []
        y = layer(x, ctx, aux_losses)
        y.square().sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if not n.startswith("indexer.")}
        runs[frozen] = (y, grads, len(aux_losses))
    (y, grads, n), (y_frozen, grads_frozen, n_frozen), (_, _, n_wk) = runs.values()
    assert (n, n_frozen, n_wk) == (1, 0, 1)
    assert torch.equal(y, y_frozen) and grads.keys() == grads_frozen.keys()
    assert all(torch.equal(grads[k], grads_frozen[k]) for k in grads)


def test_dsa_packed_equals_separate_documents():
    config = dsa_config(dsa_indexer_topk=3)
    layer = make(DSA, config, seed=2)
    lengths = [5, 11, 9]
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    x = torch.randn(1, sum(lengths), config.hidden_size)
    ctx, _ = context(config, 1, sum(lengths), seq_idx)
    with torch.no_grad():
        packed = layer(x, ctx)
        start = 0
        for n in lengths:
            alone = layer(x[:, start : start + n], context(config, 1, n, None)[0])
            assert_rel_close(packed[:, start : start + n], alone, 1e-5, f"document at {start}")
            start += n


def test_a_float64_dsa_computes_its_index_scores_and_loss_in_float64():
    """Cast as a float64 model casts it, the indexer computed in float32 whatever the model's dtype: its scores
    and its loss (part of the model's loss) were 1e-7 off their float64 formulas, and its decoding keys float32."""
    config = dsa_config()
    layer = make(DSA, config, seed=3)
    ref64 = copy.deepcopy(layer).double()
    for name, p in layer.named_parameters():
        if name not in DSA.keep_fp32:
            p.data = p.data.double()
    seq_idx = docs(2, SEQLEN, seed=5)
    ctx, pos = context(config, 2, SEQLEN, seq_idx, torch.float64)
    x = torch.randn(2, SEQLEN, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    aux_losses = []
    layer(x, ctx, aux_losses)
    (aux,) = aux_losses
    assert aux.dtype == torch.float64
    assert_rel_close(aux, kl_reference(ref64, x, pos, seq_idx, sparse=False), 1e-12, "indexer loss")
    with torch.no_grad():
        _, _, _, c_q = layer.qkv(x, pos)
        scores, _ = layer.select(x, c_q, pos, causal_document_mask(SEQLEN, seq_idx, 2))
        assert_rel_close(scores, indexer_scores_reference(ref64, x, c_q, pos), 1e-12, "index scores")
    assert layer.init_cache(1, 4, "cpu", torch.float64).index_k.dtype == torch.float64


CACHED = {
    "mla": (MLA, "+", MLA_TINY),
    "mla-full-rank-q": (MLA, "+", {**MLA_TINY, "q_lora_rank": None}),
    "dsa": (DSA, "D", {**MLA_TINY, "dsa_indexer_topk": 4}),
}


@pytest.mark.parametrize("case", list(CACHED))
def test_cached_decoding_equals_full_forward(case):
    """Prefill 7 tokens from an empty cache, then decode one token at a time: the full forward's outputs."""
    cls, symbol, overrides = CACHED[case]
    config = tiny_config(symbol, **overrides)
    layer = make(cls, config, seed=7)
    L, prefill = 15, 7
    x = torch.randn(2, L, config.hidden_size)
    with torch.no_grad():
        full = layer(x, context(config, 2, L, None)[0])
        cache = InferenceCache([layer], 2, L, "cpu", torch.float32)
        outs = []
        for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, L)]:
            ctx = SequenceContext(position_ids=cache.position_ids(end - start), cache=cache)
            outs.append(layer(x[:, start:end], ctx))
            cache.advance(end - start)
    state = cache.state(layer)
    assert state.c_kv.shape == (2, L, config.kv_lora_rank) and state.k_pe.shape == (2, L, config.qk_pos_emb_head_dim)
    assert (state.index_k is not None) == (cls is DSA)
    assert_rel_close(torch.cat(outs, dim=1), full, 1e-5, case)


# -- configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["M*+", "[*-]D", "M*-/D-", "+-/*-", "[+E]|*"])
def test_attention_with_mla_in_one_pattern_is_an_error(pattern):
    with pytest.raises(ConfigError, match=r"^pattern: .*MLA/DSA"):
        tiny_config(pattern, **MLA_TINY)


@pytest.mark.parametrize(
    ("pattern", "overrides", "field"),
    [
        ("D", {"q_lora_rank": None}, "q_lora_rank"),
        ("+", {"qk_pos_emb_head_dim": 3}, "qk_pos_emb_head_dim"),
        ("+", {"kv_lora_rank": 0}, "kv_lora_rank"),
        ("+", {"num_attention_heads": None}, "num_attention_heads"),
        ("D", {"dsa_indexer_head_dim": 2}, "dsa_indexer_head_dim"),
        ("D", {"dsa_indexer_topk": 0}, "dsa_indexer_topk"),
        ("D", {"dsa_indexer_loss_coeff": -1.0}, "dsa_indexer_loss_coeff"),
    ],
)
def test_bad_mla_fields_are_refused_by_name(pattern, overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        tiny_config(pattern, **{**MLA_TINY, **overrides})


def test_mla_fields_round_trip_through_json():
    config = tiny_config("[+-]D", **MLA_TINY, dsa_indexer_use_sparse_loss=True)
    assert ModelConfig.from_json(config.to_json()) == config
    # Fields of layer kinds the pattern does not use are not validated.
    tiny_config("M-", q_lora_rank=None, dsa_indexer_topk=0)


# -- parity with Hugging Face DeepSeek-V3 (+) and DeepSeek-V3.2 (D) ---------------------------------------


def hf_deepseek_attention(config: ModelConfig, layer: MLA):
    """transformers' ``DeepseekV3Attention`` (for ``+``) or ``DeepseekV32Attention`` (for ``D``) holding the
    float64 ``layer``'s weights, which carry Hugging Face's names, and a function of position_ids (B, L)
    giving its (cos, sin).

    Two pieces of it compute in float32 whatever the model's dtype, so a float64 comparison replaces them
    with the same formulas in float64: the RMSNorms (``q_a_layernorm``, ``kv_a_layernorm``) and the RoPE
    angles (the float64 frequencies are checked against its float32 ``inv_freq``). Attention runs through SDPA:
    the eager path takes its softmax in float32.
    """
    sparse = isinstance(layer, DSA)
    name = "deepseek_v32" if sparse else "deepseek_v3"
    module = pytest.importorskip(f"transformers.models.{name}.modeling_{name}")
    c = config
    kwargs = dict(
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_head_dim,
        qk_rope_head_dim=c.qk_pos_emb_head_dim,
        v_head_dim=c.v_head_dim,
        rope_parameters=hf_rope_parameters(c),
    )
    if sparse:
        kwargs.update(
            index_topk=c.dsa_indexer_topk, index_head_dim=c.dsa_indexer_head_dim, index_n_heads=c.dsa_indexer_n_heads
        )
        hcfg = module.DeepseekV32Config(**kwargs)
    else:
        hcfg = module.DeepseekV3Config(**kwargs, rope_interleave=True)  # DeepSeek's (and our) layout
    hcfg._attn_implementation = "sdpa"
    hf = (module.DeepseekV32Attention if sparse else module.DeepseekV3Attention)(hcfg, 0).double()
    hf.load_state_dict(layer.state_dict(), strict=True)
    for norm in (m for m in hf.modules() if type(m).__name__.endswith("RMSNorm")):
        assert norm.variance_epsilon == c.norm_eps  # Hugging Face fixes the latent norms' eps at 1e-6: pass that

        def rms(h, n=norm):
            return n.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + n.variance_epsilon)

        norm.forward = rms
    dr = c.qk_pos_emb_head_dim
    # YaRN's too (transformers computes them in float32, and its cos/sin factor in Python floats)
    inv_freq, _ = rope_frequencies(dr, c.rope_theta, Yarn.of(c), torch.float64)
    rotary = (module.DeepseekV32RotaryEmbedding if sparse else module.DeepseekV3RotaryEmbedding)(hcfg)
    torch.testing.assert_close(inv_freq.float(), rotary.inv_freq)

    def cos_sin(pos):  # Hugging Face's rotary forward, in float64
        freqs = pos[..., None].double() * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling

    return hf, cos_sin


DEEPSEEK = {
    "mla": (MLA, "+", MLA_TINY),
    "mla-full-rank-q": (MLA, "+", {**MLA_TINY, "q_lora_rank": None}),
    # Eight index heads: with three, ReLU often zeroes every head's score of a key, and such ties at 0
    # are broken differently (see below).
    "dsa": (DSA, "D", {**MLA_TINY, "dsa_indexer_n_heads": 8, "dsa_indexer_topk": 4}),
    "dsa-dense": (DSA, "D", {**MLA_TINY, "dsa_indexer_n_heads": 8, "dsa_indexer_topk": 64}),
    # DeepSeek-V3's YaRN (mscale = mscale_all_dim: cos/sin as they are, the softmax scale times m(s, 0.707)^2)
    "mla-yarn-deepseek": (MLA, "+", {**MLA_TINY, **YARN, "yarn_mscale": 0.707, "yarn_mscale_all_dim": 0.707}),
    # ... and with cos/sin rescaled too
    "dsa-yarn": (
        DSA,
        "D",
        {**MLA_TINY, "dsa_indexer_n_heads": 8, "dsa_indexer_topk": 4, **YARN, "yarn_mscale": 1.0}
        | {"yarn_mscale_all_dim": 0.5},
    ),
}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", list(DEEPSEEK))
def test_mla_and_dsa_match_hugging_face_deepseek(case, packed, monkeypatch):
    """Our float64 layer against transformers' DeepSeek-V3 MLA / DeepSeek-V3.2 DSA holding the same weights:
    projections, latent norms, interleaved RoPE on the decoupled channels, the 1/sqrt(dn + dr) softmax scale,
    and for D the lightning indexer's scores (float32 in theirs: rotate-half RoPE, ReLU, head weights, scale),
    its top-k and attention over the selected keys. Packed documents are given to Hugging Face as a
    block-causal mask with positions restarting per document."""
    cls, symbol, overrides = DEEPSEEK[case]
    config = tiny_config(symbol, **{**overrides, "norm_eps": 1e-6, "rope_theta": 50.0})
    layer = make(cls, config, seed=11).double()
    hf, cos_sin = hf_deepseek_attention(config, layer)
    b, L = 2, 13
    seq_idx = docs(b, L, seed=12) if packed else None
    ctx, pos = context(config, b, L, seq_idx, torch.float64)
    allowed = causal_document_mask(L, seq_idx, b)
    x = torch.randn(b, L, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        ours = layer(x, ctx)
        theirs, _ = hf(x, cos_sin(pos), allowed.unsqueeze(1), position_ids=pos)
        if cls is DSA:
            c_q = layer.q_a_layernorm(layer.q_a_proj(x))
            scores, selected = layer.select(x, c_q, pos, allowed)
            # Its indexer returns the top-k indices only: catch the scores it ranks (-inf where not allowed).
            ranked, real_topk = [], torch.Tensor.topk
            monkeypatch.setattr(torch.Tensor, "topk", lambda t, *a, **k: ranked.append(t) or real_topk(t, *a, **k))
            top = hf.indexer(x, c_q, cos_sin(pos), allowed, pos).long()
            monkeypatch.undo()
            assert_rel_close(scores.masked_fill(~allowed, 0.0), ranked[-1].masked_fill(~allowed, 0.0), 1e-6, "I(t, s)")
            hf_selected = torch.zeros_like(allowed).scatter_(-1, top, True) & allowed
            # Ties (ReLU zeros every head for a key: I = 0) are broken differently: Hugging Face's topk
            # is not stable. None here between the k-th kept and the best left-out key of any query.
            kept = scores.masked_fill(~selected, float("inf")).min(-1).values
            left = scores.masked_fill(~allowed | selected, float("-inf")).max(-1).values
            assert (kept > left).all()
            assert torch.equal(selected, hf_selected)
            if config.dsa_indexer_topk < L:
                assert (allowed.sum(-1) > config.dsa_indexer_topk).any()  # some queries really choose
    assert_rel_close(ours, theirs, 1e-12, case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["mla", "dsa", "dsa-chunked"])
def test_mla_and_dsa_in_bf16_on_gpu_at_4096_tokens_match_float64(case, monkeypatch):
    """A bf16 MLA or DSA layer on CUDA over 4096 tokens of four packed documents against the float64 reference: the
    output, DSA's indexer loss and the gradients, each within twice the error of the same reference run in bf16
    (fed the same bf16 inputs and weights). Both attend through FlexAttention (the dispatch records it), MLA under the
    documents' block mask, DSA under its selection's; DSA selects and takes its loss over the whole sequence at once
    or (``dsa-chunked``) in 8 chunks of 512 queries."""
    from hybridlm.ops.dispatch import paths_used, reset_paths

    b, L, n = 1, 4096, 8
    config = tiny_config(
        "D" if case.startswith("dsa") else "+",
        hidden_size=256,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_head_dim=32,
        qk_pos_emb_head_dim=16,
        v_head_dim=32,
        dsa_indexer_n_heads=n,
        dsa_indexer_head_dim=32,
        dsa_indexer_topk=256,
        dsa_indexer_loss_coeff=0.5 if case.startswith("dsa") else 0.0,
    )
    if case == "dsa-chunked":
        monkeypatch.setattr(dsa_module, "INDEXER_CHUNK_BYTES", L // 8 * b * L * n * 4)
    assert len(dsa_module.query_chunks(b, L, L, n, 4)) == (8 if case == "dsa-chunked" else 1)
    cls = DSA if case.startswith("dsa") else MLA
    layer = make(cls, config, seed=3).cuda()
    for name, p in layer.named_parameters():  # as HybridLM casts: the indexer's weights_proj and norm stay float32
        if name not in cls.keep_fp32:
            p.data = p.data.to(torch.bfloat16)
    seq_idx = docs(b, L, seed=5).cuda()
    ctx = SequenceContext(position_ids=positions_in_segment(seq_idx), seq_idx=seq_idx)  # (MLA makes its own rope)
    x = torch.randn(b, L, config.hidden_size, device="cuda").to(torch.bfloat16).requires_grad_()
    aux = []
    reset_paths()
    y = layer(x, ctx, aux) if cls is DSA else layer(x, ctx)
    assert paths_used()["attention"] == ("flex" if cls is MLA else "flex_selection")

    refs = {dt: copy.deepcopy(layer).to(dt) for dt in (torch.float64, torch.bfloat16)}
    xs = {dt: x.detach().to(dt).requires_grad_() for dt in refs}
    pos = ctx.position_ids
    if cls is MLA:
        outs = {dt: mla_reference(refs[dt], xs[dt], pos, seq_idx) for dt in refs}
        losses = dict.fromkeys(refs, 0.0)
    else:
        outs = {dt: dsa_reference(refs[dt], xs[dt], pos, seq_idx) for dt in refs}
        losses = {dt: kl_reference(refs[dt], xs[dt], pos, seq_idx, sparse=False) for dt in refs}
    g = torch.randn_like(y)
    ((y * g).sum() + sum(aux)).backward()
    for dt in refs:
        ((outs[dt] * g.to(dt)).sum() + losses[dt]).backward()

    def check(actual, r64, r16, what):
        assert_rel_close(actual.double(), r64, max(1e-4, 2 * rel_err(r16.double(), r64)), what)

    f64, b16 = torch.float64, torch.bfloat16
    check(y, outs[f64], outs[b16], "output")
    if cls is DSA:
        check(aux[0], losses[f64], losses[b16], "indexer loss")
    check(x.grad, xs[f64].grad, xs[b16].grad, "input grad")
    p64, p16 = dict(refs[f64].named_parameters()), dict(refs[b16].named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        check(p.grad, p64[name].grad, p16[name].grad, f"grad {name}")
