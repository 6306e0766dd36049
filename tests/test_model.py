"""The assembled model: fused equals unfused, packing, MTP, initialization, counting, presets."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hybridlm import HybridLM, ModelConfig
from hybridlm.checkpoint.canonical import to_canonical
from tests.helpers import MLA_TINY, assert_rel_close, random_config, random_pattern, tiny_config, unfused


def canonical_state(model):
    return to_canonical(model.state_dict(), model.config.parsed)


def canonical_grads(model):
    return to_canonical({n: p.grad for n, p in model.named_parameters()}, model.config.parsed)


@pytest.mark.parametrize("seed", range(12))
def test_fused_model_equals_unfused_twin(seed):
    rng = random.Random(seed)
    pattern = random_pattern(rng)
    if "[" not in pattern:
        pattern = "[*-]" + pattern
    config = random_config(rng, pattern)
    twin_config = config.replace(pattern=unfused(pattern))
    fused, twin = HybridLM(config, seed=seed), HybridLM(twin_config, seed=seed)
    fused.train(), twin.train()

    a, b = canonical_state(fused), canonical_state(twin)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{pattern}: weight {k} differs"

    B, L = 2, 19
    ids = torch.randint(0, config.vocab_size, (B, L))
    labels = torch.roll(ids, -1, 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 12, [0] * 19]) if seed % 2 else None
    out_f = fused(ids, labels, doc_ids=doc_ids)
    out_t = twin(ids, labels, doc_ids=doc_ids)
    assert_rel_close(out_f.logits, out_t.logits, 1e-6, f"{pattern} logits")
    assert_rel_close(out_f.loss, out_t.loss, 1e-6, f"{pattern} loss")
    out_f.loss.backward()
    out_t.loss.backward()
    ga, gb = canonical_grads(fused), canonical_grads(twin)
    for k in ga:
        assert ga[k] is not None, f"{pattern}: no gradient for {k}"
        assert_rel_close(ga[k], gb[k], 1e-6, f"{pattern} grad {k}")


@pytest.mark.parametrize("seed", range(6))
def test_fused_mla_model_equals_unfused_twin(seed):
    """The same twin check for patterns of multi-latent (+) and sparse (D) attention, which exclude '*'."""
    rng = random.Random(1000 + seed)
    pattern = ["[+-]", "[+E]", "[D-]", "[DE]"][seed % 4] + random_pattern(rng, sequence="M+D" if seed % 2 else "G+")
    config = random_config(rng, pattern)
    fused, twin = HybridLM(config, seed=seed), HybridLM(config.replace(pattern=unfused(pattern)), seed=seed)
    a, b = canonical_state(fused), canonical_state(twin)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), pattern
    ids = torch.randint(0, config.vocab_size, (2, 19))
    doc_ids = torch.tensor([[0] * 7 + [1] * 12, [0] * 19]) if seed % 3 else None
    out_f, out_t = (
        fused(ids, torch.roll(ids, -1, 1), doc_ids=doc_ids),
        twin(ids, torch.roll(ids, -1, 1), doc_ids=doc_ids),
    )
    assert_rel_close(out_f.logits, out_t.logits, 1e-6, f"{pattern} logits")
    assert_rel_close(out_f.loss, out_t.loss, 1e-6, f"{pattern} loss")
    if "D" in pattern:
        assert out_f.aux_loss is not None and out_f.aux_loss > 0  # the indexer loss is part of the loss
    out_f.loss.backward()
    out_t.loss.backward()
    ga, gb = canonical_grads(fused), canonical_grads(twin)
    for k in ga:
        assert ga[k] is not None, f"{pattern}: no gradient for {k}"
        assert_rel_close(ga[k], gb[k], 1e-6, f"{pattern} grad {k}")


def test_fused_blocks_are_single_modules():
    model = HybridLM(tiny_config("M[*-]|[GE]-"))
    assert [b.symbols for b in model.blocks.values()] == ["M", "*-", "GE", "-"]
    assert [b.fused for b in model.blocks.values()] == [False, True, True, False]
    assert [b.layer_offset for b in model.blocks.values()] == [0, 1, 3, 5]


@pytest.mark.parametrize("pattern", ["M-", "*-", "G-", "[ME]", "[*E]M", "M[G-]*/[*-]"])
def test_packed_rows_equal_separate_documents(pattern):
    config = tiny_config(pattern, position_embedding="rope", moe_router_score="sigmoid")
    model = HybridLM(config, seed=1)
    lengths = [6, 10, 5]
    ids = torch.randint(0, config.vocab_size, (1, sum(lengths)))
    doc_ids = torch.cat([torch.full((n,), 7 * i) for i, n in enumerate(lengths)]).unsqueeze(0)
    packed = model(ids, doc_ids=doc_ids).logits
    cu = torch.tensor([0, 6, 16, 21])
    assert torch.equal(model(ids, cu_seqlens=cu).logits, packed)
    assert torch.equal(model(ids, seq_idx=doc_ids).logits, packed)
    assert torch.equal(model(ids, document_ids=doc_ids).logits, packed)
    if "*" in pattern:
        # Positions restart at each document. RoPE is relative, so positions counted on across the row
        # give the documents the same logits up to rounding (within the tolerance below): only the
        # bits tell the two apart.
        restarted = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        assert torch.equal(model(ids, doc_ids=doc_ids, position_ids=restarted).logits, packed)
        counted_on = torch.arange(sum(lengths)).unsqueeze(0)
        assert not torch.equal(model(ids, doc_ids=doc_ids, position_ids=counted_on).logits, packed)
    start = 0
    for n in lengths:
        alone = model(ids[:, start : start + n]).logits
        assert_rel_close(packed[:, start : start + n], alone, 1e-5, f"document at {start}")
        start += n


@pytest.mark.parametrize("pattern", ["M*G-E/[*-]", "+[DE]/[D-]"])
def test_packed_documents_get_the_logits_and_gradients_they_get_alone(pattern):
    """Every mixer and an MTP depth, in float64, on documents of 1, 2, chunk - 1, chunk, chunk + 1 and 1
    tokens (the chunk is 8: resets inside a chunk, on a chunk's first position and at the row's two ends).
    The summed token losses of the packed row (labels ignored where the next token starts another document,
    as training rows have them) give the logits and every gradient that the documents give alone."""
    from hybridlm.model import head_labels

    config = tiny_config(pattern, position_embedding="rope", **(MLA_TINY if "D" in pattern else {}))
    model = HybridLM(config, seed=1).to(torch.float64)  # .to, not dtype=: the float32-kept tensors too
    lengths = [1, 2, 7, 8, 9, 1]
    ids = torch.randint(0, config.vocab_size, (1, sum(lengths)))
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[:, :-1][docs[:, 1:] != docs[:, :-1]] = -100

    def summed_loss(out, labels, docs):
        targets = head_labels(labels, len(out.mtp_logits), docs)
        ce = torch.nn.functional.cross_entropy
        return sum(
            ce(lg[0], y[0], ignore_index=-100, reduction="sum") for lg, y in zip([out.logits, *out.mtp_logits], targets)
        )

    packed = model(ids, doc_ids=docs)
    summed_loss(packed, labels, docs).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}  # (the DSA indexer's stay None: it has no loss here)
    model.zero_grad(set_to_none=True)
    start = 0
    for n in lengths:
        piece = slice(start, start + n)
        alone = model(ids[:, piece])
        summed_loss(alone, labels[:, piece], None).backward()
        assert_rel_close(packed.logits[:, piece], alone.logits, 1e-12, f"logits of the document at {start}")
        if n > 1:  # depth 1 at a document's last position reads the next document's first token (no target)
            assert_rel_close(packed.mtp_logits[0][:, start : start + n - 1], alone.mtp_logits[0][:, : n - 1], 1e-12)
        start += n
    for name, p in model.named_parameters():
        assert (grads[name] is None) == (p.grad is None), name
        if p.grad is not None:
            assert_rel_close(grads[name], p.grad, 1e-10, f"gradient of {name}")


@pytest.mark.parametrize("pattern", ["MG*E-/[*E]/[*E]", "+DE/[D-]/[D-]"])
def test_each_row_and_position_reads_only_its_own_row_and_earlier_tokens(pattern):
    """Batch invariance and causality, in float64, for every mixer and two MTP depths (no other test covers
    either at the model level: the packed tests keep one row, and documents alone would pass a mixer reading
    ahead). A row in a batch gets what it gets alone; changing token j changes no main-head output before j,
    and MTP depth d, which embeds token t + d at t, no output before j - d, while it changes the one at j - d.
    19 tokens: not a multiple of the chunk (8); the changed positions sit on both sides of a chunk's start."""
    config = tiny_config(pattern, position_embedding="rope", moe_router_score="sigmoid", **MLA_TINY)
    model = HybridLM(config, seed=2, dtype=torch.float64)
    ids = torch.randint(0, config.vocab_size, (3, 19), generator=torch.Generator().manual_seed(0))
    packed = torch.tensor([[0] * 19, [0] * 6 + [1] * 13, [0] * 9 + [1] * 3 + [2] * 7])

    def heads(ids, docs):
        out = model(ids, doc_ids=docs)
        return [out.logits, *out.mtp_logits]  # the main head, then each depth

    with torch.no_grad():
        for docs in (None, packed):  # plain causal rows, then packed rows (masked paths)
            batch = heads(ids, docs)
            assert len(batch) == 3
            for i in range(3):
                alone = heads(ids[i : i + 1], None if docs is None else docs[i : i + 1])
                for d, (got, want) in enumerate(zip(batch, alone)):
                    assert_rel_close(got[i : i + 1], want, 1e-12, f"row {i}, head {d}")
            for j in (1, 8, 9, 18):
                changed = ids.clone()
                changed[:, j] = (changed[:, j] + 1) % config.vocab_size
                for d, (before, after) in enumerate(zip(batch, heads(changed, docs))):
                    if j - d > 0:
                        assert_rel_close(after[:, : j - d], before[:, : j - d], 1e-12, f"head {d} before token {j}")
                    if j - d >= 0:
                        assert (after[:, j - d] - before[:, j - d]).abs().amax(-1).min() > 1e-6, f"head {d} at {j - d}"


def test_mtp_depth_d_predicts_token_t_plus_1_plus_d():
    """Depth d's logits at t are scored against token t+1+d (labels shifted d further)."""
    config = tiny_config("M-*-/*-/*-", vocab_size=11)
    model = HybridLM(config, seed=0)
    ids = torch.randint(0, 11, (2, 12))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    out = model(ids, labels)
    assert len(out.mtp_logits) == 2 and len(out.mtp_losses) == 2
    ce = torch.nn.functional.cross_entropy
    for d, logits in enumerate(out.mtp_logits, start=1):
        n = 12 - 1 - d  # positions whose token t+1+d exists
        expected = ce(logits[:, :n].reshape(-1, 11), ids[:, 1 + d :].reshape(-1))
        assert_rel_close(out.mtp_losses[d - 1], expected, 1e-6, f"depth {d}")
    total = out.lm_loss + config.mtp_loss_scale * torch.stack(out.mtp_losses).mean()
    assert_rel_close(out.loss, total, 1e-7, "total loss")


def test_mtp_training_lowers_every_depth():
    torch.manual_seed(0)
    config = tiny_config("M-[*-]/[*-]/[*-]", vocab_size=16, mtp_loss_scale=1.0)
    model = HybridLM(config, seed=0)
    cycle = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 7, 8, 0, 11, 13])  # a repeating sequence
    ids = cycle.repeat(4)[None, :48].repeat(4, 1)
    ids = torch.stack([torch.roll(ids[0], -s) for s in range(4)])
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(ids, labels)
    start = [first.lm_loss.item(), *[m.item() for m in first.mtp_losses]]
    for _ in range(30):
        opt.zero_grad()
        model(ids, labels).loss.backward()
        opt.step()
    last = model(ids, labels)
    end = [last.lm_loss.item(), *[m.item() for m in last.mtp_losses]]
    for d, (s, e) in enumerate(zip(start, end)):
        assert e < 0.5 * s, f"depth {d}: loss {s:.3f} -> {e:.3f}"


def test_same_seed_same_canonical_weights_across_brackets_and_pipes():
    base = tiny_config("M-*-G-*E/*-")
    variants = ["M-[*-]G-[*E]/[*-]", "M-|*-G-|*E/*-", "M-[*-]|[G-][*E]/*-"]
    ref = canonical_state(HybridLM(base, seed=3))
    for pattern in variants:
        other = canonical_state(HybridLM(base.replace(pattern=pattern), seed=3))
        assert other.keys() == ref.keys()
        assert all(torch.equal(other[k], ref[k]) for k in ref), pattern
    different = canonical_state(HybridLM(base, seed=4))
    assert not torch.equal(different["layers.0.mixer.in_proj.weight"], ref["layers.0.mixer.in_proj.weight"])


@pytest.mark.parametrize("pattern", ["M[G-]*E/[*-]", "+[DE]"])
def test_a_float64_model_gets_its_seed_s_weights_however_it_is_built(pattern):
    """``HybridLM(seed=s, dtype=torch.float64)`` draws in float32 and casts. Built on meta in float64 and then
    initialized, or under ``torch.set_default_dtype(torch.float64)``, it drew float64 values, which torch draws
    otherwise: every weight was another (0.1 apart), the float32-kept ``A_log`` and ``dt_bias`` too (the
    generator's stream had moved). The number of threads changes nothing either."""
    config = tiny_config(pattern, **MLA_TINY)
    want = HybridLM(config, seed=5, dtype=torch.float64).state_dict()
    on_meta = HybridLM(config, seed=0, device="meta", dtype=torch.float64)
    on_meta.to_empty(device="cpu")
    on_meta.init_weights(5)
    threads, default = torch.get_num_threads(), torch.get_default_dtype()
    try:
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float64)
        by_default = HybridLM(config, seed=5)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(default)
    for name, got in [*on_meta.state_dict().items(), *by_default.state_dict().items()]:
        assert torch.equal(got.double(), want[name].double()), name


def test_output_projection_scaled_by_canonical_layer_count():
    config = tiny_config("[*-][*-][*-][*-]", init_std=0.02, hidden_size=64, ffn_hidden_size=256)
    model = HybridLM(config)
    o = model.blocks["0"].layers[0].mixer.o_proj.weight
    assert abs(o.std().item() - 0.02 / 8**0.5) < 0.0015  # 8 canonical layers, not 4 blocks


@pytest.mark.parametrize("seed", range(4))
def test_flops_match_flop_counter(seed):
    rng = random.Random(100 + seed)
    config = random_config(rng, random_pattern(rng, pipes=False))
    model = HybridLM(config)
    B, L = 2, rng.choice([8, 13, 24])
    ids = torch.randint(0, config.vocab_size, (B, L))
    # The math SDPA backend decomposes into matmuls the counter sees (the fused CPU kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    expected = model.flops_per_token(L) * B * L
    assert_rel_close(
        torch.tensor(float(counter.get_total_flops())), torch.tensor(float(expected)), 1e-9, config.pattern
    )


@pytest.mark.parametrize(
    ("pattern", "overrides"),
    [("M+-[+E]/+-", {}), ("[D-]GD|E", {"dsa_indexer_topk": 3}), ("+D", {"q_lora_rank": 7})],
)
def test_mla_flops_match_flop_counter(pattern, overrides):
    config = tiny_config(pattern, **{**MLA_TINY, **overrides})
    model = HybridLM(config)
    B, L = 2, 13
    ids = torch.randint(0, config.vocab_size, (B, L))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    expected = model.flops_per_token(L) * B * L
    assert_rel_close(torch.tensor(float(counter.get_total_flops())), torch.tensor(float(expected)), 1e-9, pattern)


def test_num_params_per_kind():
    model = HybridLM(tiny_config("M-[*E]G/[*-]"))
    n = model.num_params()
    assert float(n) == sum(p.numel() for p in model.parameters())
    assert set(n.by_kind) == {"embeddings", "M", "-", "*", "E", "G", "norm_f", "head", "mtp"}
    tied = HybridLM(tiny_config("M-", tie_embeddings=True))
    assert float(tied.num_params()) == sum(p.numel() for p in tied.parameters())
    assert float(tied.num_params(exclude_embeddings=True)) == float(tied.num_params()) - 97 * 32


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["MG*", "MG+D"]))
def test_num_params_per_kind_equals_the_parameters_of_its_layers(seed, sequence):
    """Every layer kind (M, G, *, +, D, -, E with or without shared experts), MTP depths, tied or untied
    embeddings: each part of num_params is the sum of numel of the parameters under that part's names."""
    rng = random.Random(seed)
    config = random_config(rng, random_pattern(rng, sequence=sequence))
    model = HybridLM(config, device="meta")
    want: dict[str, int] = {}
    for name, t in model.named_parameters():  # (a tied weight is listed once, under the embedding)
        parts = name.split(".")
        kind = parts[0] if parts[0] != "lm_head" else "head"
        if kind == "blocks":
            kind = model.blocks[parts[1]].layers[int(parts[3])].symbol
        want[kind] = want.get(kind, 0) + t.numel()
    n = model.num_params()
    assert n.by_kind == want and float(n) == sum(p.numel() for p in model.parameters())


def test_a_model_built_on_meta_initializes_from_its_own_seed():
    """``device="meta"``: call init_weights after to_empty, the docstring says; init_weights() drew from seed 0
    whatever seed the model was built with, so a seed-5 model came out with seed 0's weights."""
    config = tiny_config("M[*-]/[*E]")
    want = HybridLM(config, seed=5).state_dict()
    model = HybridLM(config, seed=5, device="meta").to_empty(device="cpu")
    model.init_weights()
    for name, t in model.state_dict().items():
        assert torch.equal(t, want[name]), name
    model.init_weights(0)  # an explicit seed still wins
    assert torch.equal(model.state_dict()["embeddings.weight"], HybridLM(config, seed=0).embeddings.weight)


@pytest.mark.parametrize(
    ("name", "billions"),
    [("nemotron-h-8b", 8.10), ("nemotron-3-nano-30b-a3b", 31.58), ("bench-1.3b", 1.2518), ("tiny", None)],
)
def test_presets_build_on_meta(name, billions):
    model = HybridLM(ModelConfig.preset(name), device="meta")
    assert next(model.parameters()).device.type == "meta"
    if billions:
        assert abs(float(model.num_params()) / 1e9 - billions) < 0.01


def test_every_layer_symbol_builds():
    for pattern in ("M-G*E", "M+D-E"):
        model = HybridLM(tiny_config(pattern, **MLA_TINY), device="meta")
        assert "".join(b.symbols for b in model.blocks.values()) == pattern
    n = HybridLM(tiny_config("+-D/+", **MLA_TINY)).num_params()
    assert {"+", "D", "mtp"} <= set(n.by_kind) and float(n) == sum(
        p.numel() for p in HybridLM(tiny_config("+-D/+", **MLA_TINY)).parameters()
    )


def test_cast_keeps_sensitive_parameters_fp32():
    model = HybridLM(tiny_config("M[*E]G", moe_router_expert_bias=True), dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in [*model.named_parameters(), *model.named_buffers()]}
    assert dtypes["blocks.0.layers.0.mixer.A_log"] == torch.float32
    assert dtypes["blocks.1.layers.1.mixer.gate.e_score_correction_bias"] == torch.float32
    assert dtypes["blocks.0.layers.0.mixer.in_proj.weight"] == torch.bfloat16
    out = model(torch.randint(0, 97, (1, 9)))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("before", [torch.bfloat16, torch.float64])
def test_cast_brings_sensitive_parameters_back_to_fp32_after_to(before):
    """``cast`` after ``.to(bf16)`` (what the expert bias's TypeError says to use instead) or ``.double()``
    puts A_log, the router and the expert bias in float32 again; leaving them alone kept them bf16 or float64,
    and the expert bias then refused its update again."""
    model = HybridLM(tiny_config("ME", moe_router_expert_bias=True), seed=0).to(before).cast(torch.bfloat16)
    keep = model.fp32_parameter_names()
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}
    assert keep and {n for n, d in dtypes.items() if d == torch.float32} == keep
    moe = model.blocks["1"].layers[0].mixer
    moe.tokens_per_expert[0] += 1
    moe.update_expert_bias(1e-3)  # no TypeError: the bias is float32 again
    assert moe.gate.e_score_correction_bias[1:].eq(1e-3).all()


@pytest.mark.parametrize("L", [5, 8, 16, 21])
def test_mamba2_flops_below_a_chunk_match_flop_counter(L):
    """A sequence shorter than a chunk is one chunk of its own length, in the count as in the op.
    (At L = 1 the op's einsums over chunks of one position are products the counter does not see.)"""
    config = tiny_config("M-M", mamba_chunk_size=16)
    model = HybridLM(config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, config.vocab_size, (2, L)))
    assert_rel_close(
        torch.tensor(float(counter.get_total_flops())), torch.tensor(float(model.flops_per_token(L) * 2 * L)), 1e-9, L
    )
    assert model.flops_per_token(0) > 0  # the projections alone
    for bad in (-1, 2.5, "8"):
        with pytest.raises(ValueError, match="seq_len must be an integer >= 0"):
            model.flops_per_token(bad)


def test_malformed_inputs_are_refused_by_name():
    model = HybridLM(tiny_config("M*-"), seed=0)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 8))
    for kwargs, says in (
        (dict(input_ids=ids[0]), r"input_ids must be \(B, L\) integer token ids"),
        (dict(input_ids=ids.float()), "input_ids must be"),
        (dict(input_ids=ids + V), rf"token ids must be in \[0, {V}\)"),
        (dict(input_ids=ids, labels=ids[:1]), r"labels must be \(2, 8\) int64"),
        (dict(input_ids=ids, labels=ids.int()), "labels must be"),
        (dict(input_ids=ids, labels=torch.full_like(ids, -1)), "-1 is neither a token id"),
        (dict(input_ids=ids, logits_to_keep=-3), "logits_to_keep must be an int >= 0"),
        (dict(input_ids=ids, logits_to_keep=True), "logits_to_keep must be an int >= 0"),
        (dict(input_ids=ids, position_ids=torch.zeros(2, 1, dtype=torch.long)), r"position_ids must be \(2, 8\)"),
        (dict(input_ids=ids, position_ids=torch.arange(8.0).expand(2, 8)), "integer positions, got .* torch.float32"),
    ):
        for return_logits in (True, False):
            with pytest.raises(ValueError, match=says):
                model(**kwargs, return_logits=return_logits)
    labels = ids.clone()
    labels[:, -1] = -100  # the ignore index stays allowed
    assert torch.isfinite(model(ids, labels=labels, return_logits=False).loss)


def test_position_ids_of_one_row_serve_every_row():
    model = HybridLM(tiny_config("M*-", position_embedding="rope"), seed=0)
    ids = torch.randint(0, 97, (2, 8))
    shifted = torch.arange(0, 16, 2)  # spread out: attention sees other distances
    want = model(ids, position_ids=shifted.expand(2, 8)).logits
    assert torch.equal(model(ids, position_ids=shifted[None]).logits, want)
    assert not torch.equal(model(ids).logits, want)  # the positions reach attention's RoPE


def test_a_float64_model_computes_its_logits_and_loss_in_float64():
    """The head and the loss keep a float64 model's precision (they were cast to float32)."""
    model = HybridLM(tiny_config("M*-/*-"), seed=0, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits.dtype == out.mtp_logits[0].dtype == out.loss.dtype == torch.float64
    fused = model(ids, labels=ids, return_logits=False).loss
    torch.testing.assert_close(fused, out.loss, rtol=1e-12, atol=0)


def test_seed_is_an_integer_of_any_type_and_dtype_a_floating_one():
    import numpy as np

    config = tiny_config("M*-")
    ref = HybridLM(config, seed=3).state_dict()
    for seed in (np.int64(3), torch.tensor(3)):
        assert all(torch.equal(ref[k], v) for k, v in HybridLM(config, seed=seed).state_dict().items())
    for seed in (1.5, "3", True, None):
        with pytest.raises(ValueError, match="seed must be an integer"):
            HybridLM(config, seed=seed)
    assert HybridLM(config, dtype="bfloat16").embeddings.weight.dtype == torch.bfloat16
    for dtype in (torch.int8, "cuda"):
        with pytest.raises(ValueError, match=r"floating torch\.dtype"):
            HybridLM(config, dtype=dtype)


def test_a_float8_dtype_is_refused_by_name_not_at_the_first_forward():
    """float8 is floating but a storage format: the model was built in it, then its first forward failed inside
    torch ("add_stub" not implemented for 'Float8_e4m3fn'); cast and load refused nothing either."""
    model = HybridLM(tiny_config("M*-"), seed=0)
    for dtype in (torch.float8_e4m3fn, "float8_e5m2"):
        with pytest.raises(ValueError, match=r"dtype must be a floating torch\.dtype the model computes in \("):
            HybridLM(tiny_config("M*-"), dtype=dtype)
        with pytest.raises(ValueError, match=r"dtype must be a floating torch\.dtype the model computes in \("):
            model.cast(dtype)
    assert model.embeddings.weight.dtype == torch.float32  # nothing was cast
    for dtype in ("float16", "half", torch.float64):
        assert HybridLM(tiny_config("M*-"), dtype=dtype).embeddings.weight.is_floating_point()


def test_an_empty_sequence_runs_through_every_mixer():
    model = HybridLM(ModelConfig.preset("tiny"), seed=0)
    empty = torch.zeros(2, 0, dtype=torch.long)
    out = model(empty, labels=empty)
    assert out.logits.shape == (2, 0, model.config.vocab_size) and float(out.loss.detach()) == 0.0


@pytest.mark.parametrize("shape", [(0, 8), (2, 0)])
def test_an_empty_batch_has_zero_auxiliary_losses(shape):
    """MoE's balancing loss and DSA's indexer loss over no tokens are 0 (they were 0 / 0 = NaN, which the
    trainer counts as a failed step)."""
    for config in (
        tiny_config("M-*E", moe_aux_loss_coeff=0.01),
        tiny_config("D-", dsa_indexer_loss_coeff=0.1, **MLA_TINY),
    ):
        ids = torch.zeros(shape, dtype=torch.long)
        out = HybridLM(config, seed=0)(ids, labels=ids)
        assert float(out.aux_loss.detach()) == 0.0 and float(out.loss.detach()) == 0.0, config.pattern


def test_rows_of_no_positions_take_cu_seqlens_as_they_take_doc_ids():
    """(2, 0) inputs with cu_seqlens [0, 0] raised an IndexError on the rows' first position; doc_ids ran."""
    model = HybridLM(tiny_config("M*-/*-"), seed=0)
    ids = torch.zeros(2, 0, dtype=torch.long)
    out = model(ids, labels=ids, cu_seqlens=torch.tensor([0, 0]))
    assert out.logits.shape == (2, 0, 97) and out.loss.item() == 0.0


def test_logits_to_keep_cuts_the_mtp_logits_too():
    model = HybridLM(tiny_config("M-*-/*-/*-"), seed=0)
    ids = torch.randint(0, 97, (2, 9))
    full, cut = model(ids), model(ids, logits_to_keep=3)
    assert cut.logits.shape[1] == 3 and [t.shape[1] for t in cut.mtp_logits] == [3, 3]
    for a, b in zip(full.mtp_logits, cut.mtp_logits):  # the head on fewer rows: float32 rounding apart
        torch.testing.assert_close(b, a[:, -3:], rtol=1e-5, atol=1e-6)


def test_cu_seqlens_may_end_in_empty_documents_and_a_forward_needs_an_input():
    model = HybridLM(tiny_config("M*-"), seed=0)
    ids = torch.randint(0, 97, (2, 10))
    want = model(ids, cu_seqlens=torch.tensor([0, 20])).logits
    for cu in ([0, 20, 20], [0, 10, 20, 20]):
        expected = want if cu[1] == 20 else model(ids, cu_seqlens=torch.tensor([0, 10, 20])).logits
        assert torch.equal(model(ids, cu_seqlens=torch.tensor(cu)).logits, expected), cu
    with pytest.raises(ValueError, match="forward needs input_ids"):
        model()


def test_counts_survive_copy_and_pickle():
    import copy
    import pickle

    model = HybridLM(tiny_config("M*E"), seed=0)
    for count in (model.num_params(), model.flops_per_token(16)):
        for again in (copy.deepcopy({"n": count})["n"], pickle.loads(pickle.dumps(count))):
            assert float(again) == float(count) and again.by_kind == count.by_kind


def test_shift_labels_stop_at_document_ends():
    """An MTP depth's targets are the labels ``shift`` further on, never across a document end: a mask
    compared one position off and no test passed documents to it."""
    from hybridlm.model import IGNORE_INDEX, shift_labels

    labels = torch.arange(10, 20).unsqueeze(0)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    x = IGNORE_INDEX
    assert shift_labels(labels, 1, docs).tolist() == [[11, 12, x, 14, 15, 16, x, 18, 19, x]]
    assert shift_labels(labels, 2, docs).tolist() == [[12, x, x, 15, 16, x, x, 19, x, x]]
    assert shift_labels(labels, 2, None).tolist() == [[12, 13, 14, 15, 16, 17, 18, 19, x, x]]
    assert shift_labels(labels, 10, docs).tolist() == [[x] * 10]


def test_label_counts_count_each_heads_labels():
    from hybridlm.model import label_counts

    labels = torch.arange(10, 20).unsqueeze(0)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])  # the depths' labels: test_shift_labels_stop_at_document_ends
    assert label_counts(labels, 2, docs).tolist() == [[10, 7, 4]]
    assert label_counts(labels, 0).tolist() == [[10]]


def test_per_head_shares_add_rows_up_to_the_whole_batch():
    """Each row's loss, each head weighted by the row's share of that head's labels, adds up to the whole batch's
    loss and gradient. Weighting every head by the main head's share (how the trainer once accumulated
    micro-batches) did not: the MTP depths have fewer labels, fewest in rows with many document ends."""
    from hybridlm.model import IGNORE_INDEX, combine_losses, label_counts

    model = HybridLM(tiny_config("M*/*/*", mtp_loss_scale=1.0), seed=0)
    g = torch.Generator().manual_seed(0)
    B, L = 4, 24
    ids = torch.randint(0, 97, (B, L + 1), generator=g)
    docs = torch.stack([torch.arange(L + 1) // n for n in (2, 3, 8, 24)])  # documents of 2, 3, 8 and 24 tokens
    labels = ids[:, 1:].masked_fill(docs[:, 1:] != docs[:, :-1], IGNORE_INDEX)
    ids, docs = ids[:, :-1], docs[:, :-1]
    model(ids, labels, doc_ids=docs).loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    counts = label_counts(labels, 2, docs)
    assert counts[0, 2] == 0 and counts[3, 2] == L - 3  # the last depth: no labels in row 0
    shares = counts / counts.sum(0)
    total = 0.0
    for r in range(B):
        out = model(ids[r : r + 1], labels[r : r + 1], doc_ids=docs[r : r + 1])
        loss = combine_losses(out.lm_loss, out.mtp_losses, out.aux_loss, 1.0, shares[r])
        loss.backward()
        total += loss.item()
    whole_loss = model(ids, labels, doc_ids=docs).loss.item()
    assert total == pytest.approx(whole_loss, rel=1e-6)
    for n, p in model.named_parameters():
        assert_rel_close(p.grad, whole[n], 1e-5, n)


def test_an_moe_layer_in_an_mtp_depth_reports_its_balancing_loss():
    """Guards against dropping the MTP depths' auxiliary losses (MoE inside MTP got no balancing loss)."""
    model = HybridLM(tiny_config("M-/E", moe_aux_loss_coeff=0.01), seed=0)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    expected = out.lm_loss + model.config.mtp_loss_scale * torch.stack(out.mtp_losses).mean() + out.aux_loss
    torch.testing.assert_close(out.loss, expected)


def test_each_layer_kind_is_initialized_as_documented():
    """Guards against wrong init scales: embeddings/eh_proj std, out_proj/down_proj out_std, conv bound, A_log range."""
    std = 0.02
    config = tiny_config(
        "G-G-/-", hidden_size=64, ffn_hidden_size=256, gdn_num_heads=4, gdn_num_value_heads=32, init_std=std
    )
    model = HybridLM(config, seed=0)
    out_std = std / config.parsed.num_layers**0.5  # 4 canonical layers: half of std

    def assert_std(w, expected, what):
        assert abs(w.float().std().item() / expected - 1) < 0.15, f"{what}: std {w.std().item():.4g} != {expected:.4g}"

    assert_std(model.embeddings.weight, std, "embeddings")
    assert_std(model.mtp[0].eh_proj.weight, std, "eh_proj")
    gdn, mlp = model.blocks["0"].layers[0].mixer, model.blocks["1"].layers[0].mixer
    assert_std(gdn.in_proj_qkvz.weight, std, "gdn in_proj_qkvz")
    assert_std(gdn.out_proj.weight, out_std, "gdn out_proj")
    assert_std(mlp.up_proj.weight, std, "mlp up_proj")
    assert_std(mlp.down_proj.weight, out_std, "mlp down_proj")
    assert_std(model.mtp[0].blocks["0"].layers[0].mixer.down_proj.weight, out_std, "mtp mlp down_proj")
    # The causal conv: nn.Conv1d's default, U(-1/sqrt(K), 1/sqrt(K)).
    conv = gdn.conv1d.weight
    bound = 1 / conv.shape[-1] ** 0.5
    assert 0.9 * bound < conv.abs().max().item() <= bound
    # A = exp(A_log) ~ U(1, 16) per value head.
    a = gdn.A_log.float().exp()
    assert a.min().item() >= 1 - 1e-5 and a.max().item() <= 16 + 1e-4
    assert a.max().item() > 8 and a.min().item() < 4


def test_mla_and_swiglu_projections_are_initialized_as_documented():
    """MLA's input projections (q_a, q_b, kv_a, kv_b) and a SwiGLU MLP's gate and up draw from init_std; the
    output projections (MLA's o_proj, the MLP's down_proj) from std / sqrt(canonical layers); norms 1."""
    std = 0.02
    mla = {**MLA_TINY, "q_lora_rank": 64, "kv_lora_rank": 64, "qk_head_dim": 32, "v_head_dim": 32}
    config = tiny_config("+-", hidden_size=128, ffn_hidden_size=256, mlp_activation="swiglu", init_std=std, **mla)
    model = HybridLM(config, seed=0)
    out_std = std / config.parsed.num_layers**0.5  # 2 canonical layers
    attn, mlp = model.blocks["0"].layers[0].mixer, model.blocks["1"].layers[0].mixer
    expected = {
        "q_a_proj": (attn.q_a_proj.weight, std),
        "q_b_proj": (attn.q_b_proj.weight, std),
        "kv_a_proj_with_mqa": (attn.kv_a_proj_with_mqa.weight, std),
        "kv_b_proj": (attn.kv_b_proj.weight, std),
        "o_proj": (attn.o_proj.weight, out_std),
        "gate_proj": (mlp.gate_proj.weight, std),
        "up_proj": (mlp.up_proj.weight, std),
        "down_proj": (mlp.down_proj.weight, out_std),
    }
    for what, (w, want) in expected.items():
        assert w.numel() >= 4096, what
        assert abs(w.float().std().item() / want - 1) < 0.1, f"{what}: std {w.std().item():.4g} != {want:.4g}"
    for norm in (attn.q_a_layernorm, attn.kv_a_layernorm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_mamba_conv_weight_and_bias_are_uniform_on_both_sides_of_zero():
    """Mamba2's conv weight and bias: nn.Conv1d's default U(-1/sqrt(K), 1/sqrt(K)), each reaching near both ends
    (the GDN conv of the test above has no bias)."""
    model = HybridLM(tiny_config("M", hidden_size=64), seed=0)
    conv = model.blocks["0"].layers[0].mixer.conv1d
    bound = 1 / conv.weight.shape[-1] ** 0.5
    for what, t in (("weight", conv.weight), ("bias", conv.bias)):
        assert t.numel() >= 64, what
        assert -bound <= t.min().item() < -0.8 * bound and 0.8 * bound < t.max().item() <= bound, what


def test_a_tied_bf16_model_returns_float32_logits():
    """Guards against the tied head (embedding weight) returning bf16 logits from a bf16 model."""
    model = HybridLM(tiny_config("M-/-", tie_embeddings=True), seed=0, dtype=torch.bfloat16)
    assert model.lm_head is None and model.embeddings.weight.dtype == torch.bfloat16
    out = model(torch.randint(0, 97, (1, 9)))
    assert out.logits.dtype == out.mtp_logits[0].dtype == torch.float32
    assert torch.isfinite(out.logits).all()


def _randomize(model, seed):
    """Decisive random parameters: norm weights around 1, projections of unit-ish gain, a spread-out router."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[-1] ** 0.5)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _mlp(mixer, x):
    return (x @ mixer.up_proj.weight.T).clamp(min=0).pow(2) @ mixer.down_proj.weight.T


@pytest.mark.parametrize("tie", [False, True])
def test_model_with_mtp_equals_a_float64_reference_written_out(tie):
    """The whole forward written out in float64 for an attention/MoE/MLP model with two MTP depths (Megatron's MTP:
    depth d embeds the tokens rolled d left, ``eh_proj(cat[enorm(emb), hnorm(h_prev)])`` with h_prev the
    previous depth's normed output, then its layers and ``final_layernorm``; its targets the labels d further
    on, never across a document end), a large norm_eps so every norm's epsilon shows, and the total loss
    ``lm + mtp_loss_scale * mean(mtp)``. Fused-vs-unfused twins and loss-only MTP checks let the depth's input
    shift, its chaining, its norms, its concatenation order and the fused seam's epsilon drift unseen."""
    import copy

    from hybridlm.layers.attention import attention_reference
    from hybridlm.layers.moe import moe_reference

    config = tiny_config("[*E]-/-/-", norm_eps=0.5, mtp_loss_scale=0.3, tie_embeddings=tie, moe_router_score="sigmoid")
    model = HybridLM(config, seed=0, dtype=torch.float64)
    _randomize(model, 1)
    gen = torch.Generator().manual_seed(2)
    B, L, eps = 2, 11, config.norm_eps
    ids = torch.randint(0, config.vocab_size, (B, L), generator=gen)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    out = model(ids, labels, doc_ids=doc_ids)

    E = model.embeddings.weight
    W = E if tie else model.lm_head.weight

    def layers(x, blocks):
        for block in blocks.values():
            for layer in block.layers:
                normed = _rms(x, layer.norm.weight, eps)
                if layer.symbol == "*":
                    x = x + attention_reference(layer.mixer, normed, torch.arange(L).expand(B, L), doc_ids)
                elif layer.symbol == "E":
                    x = x + moe_reference(copy.deepcopy(layer.mixer).double(), normed)  # its router is kept float32
                else:
                    x = x + _mlp(layer.mixer, normed)
        return x

    h = _rms(layers(E[ids], model.blocks), model.norm_f.weight, eps)
    logits, hiddens = [h @ W.T], h
    for d, depth in enumerate(model.mtp, start=1):
        emb = E[torch.roll(ids, -d, 1)]
        x = torch.cat([_rms(emb, depth.enorm.weight, eps), _rms(hiddens, depth.hnorm.weight, eps)], -1)
        hiddens = _rms(layers(x @ depth.eh_proj.weight.T, depth.blocks), depth.final_norm.weight, eps)
        logits.append(hiddens @ W.T)
    ce = torch.nn.functional.cross_entropy
    losses = []
    for d, lg in enumerate(logits):
        target = torch.full_like(labels, -100)
        target[:, : L - d] = labels[:, d:]
        if d:
            target[:, : L - d][doc_ids[:, d:] != doc_ids[:, : L - d]] = -100
        losses.append(ce(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), ignore_index=-100))
    total = losses[0] + config.mtp_loss_scale * torch.stack(losses[1:]).mean()

    # The router weight is stored in float32 (the reference casts it up as the model does); 1e-6 leaves room.
    assert_rel_close(out.logits, logits[0], 1e-6, "logits")
    for d in (1, 2):
        assert_rel_close(out.mtp_logits[d - 1], logits[d], 1e-6, f"depth {d} logits")
        assert_rel_close(out.mtp_losses[d - 1], losses[d], 1e-6, f"depth {d} loss")
    assert_rel_close(out.loss, total, 1e-6, "total loss")
    chunked = model(ids, labels, doc_ids=doc_ids, return_logits=False)
    assert chunked.logits is None and chunked.mtp_logits == []
    assert_rel_close(chunked.loss, total, 1e-6, "chunked loss")


def test_a_token_or_label_equal_to_the_vocab_size_is_refused():
    """The first id past the vocabulary (an off-by-one tokenizer) is refused like any other: the checks were
    only tried with ids far beyond it."""
    model = HybridLM(tiny_config("M-"), seed=0)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="token ids must be in"):
        model(ids + torch.tensor([0, 0, 0, 97]))
    with pytest.raises(ValueError, match="97 is neither a token id"):
        model(ids, labels=ids + torch.tensor([0, 0, 97, 0]))
    model(ids + 96, labels=ids + 96)  # the last id is fine


def test_labels_with_logits_to_keep_are_refused_and_return_logits_false_returns_none():
    model = HybridLM(tiny_config("M-/-"), seed=0)
    ids = torch.randint(0, 97, (2, 6))
    for return_logits in (True, False):
        with pytest.raises(ValueError, match="labels need the logits of every position"):
            model(ids, ids, logits_to_keep=2, return_logits=return_logits)
    out = model(ids, ids, return_logits=False)
    assert out.logits is None and out.mtp_logits == [] and torch.isfinite(out.loss)


def test_return_logits_false_without_labels_makes_no_logits():
    """``return_logits=False`` leaves the logits None also without labels (the flag was ignored there: the whole
    (B, L, V) logits of every head were computed for a caller after the hidden states alone), cached or not."""
    from hybridlm.infer.cache import InferenceCache

    model = HybridLM(tiny_config("M*-/-"), seed=0)
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids, return_logits=False)
    assert out.logits is None and out.mtp_logits == []
    torch.testing.assert_close(out.hidden_states, model(ids).hidden_states, rtol=0, atol=0)
    cache = InferenceCache.for_model(model, 2, 6)
    out = model(ids, cache=cache, return_logits=False)
    assert out.logits is None and cache.offset == 6


def test_output_projections_scaled_by_the_main_stack_layer_count():
    """out_std = init_std / sqrt(canonical layers of the main stack) (Megatron's scaled init), tight enough to tell
    n from n + 1 layers; the MTP depths' layers do not count. The output head is N(0, init_std), not scaled."""
    from hybridlm.layers import MLP

    for pattern, n in (("-", 1), ("[*-]", 2), ("*-/-", 2), ("*-*-*", 5)):
        config = tiny_config(pattern, hidden_size=64, ffn_hidden_size=256, vocab_size=512, init_std=0.05)
        model = HybridLM(config, seed=0)
        down = next(m for m in model.modules() if isinstance(m, MLP)).down_proj.weight
        assert abs(down.std().item() / (0.05 / n**0.5) - 1) < 0.04, pattern
        assert abs(model.lm_head.weight.std().item() / 0.05 - 1) < 0.04, pattern


def test_attention_only_in_the_mtp_depths_gets_rope():
    """RoPE reaches an attention layer that lives only in an MTP depth (its cos/sin were made only when the
    main stack had attention)."""
    model = HybridLM(tiny_config("M-/*-", position_embedding="rope"), seed=0)
    ids = torch.randint(0, 97, (2, 8))
    plain, spread = model(ids), model(ids, position_ids=torch.arange(0, 16, 2)[None])
    assert torch.equal(plain.logits, spread.logits)  # no attention in the main stack
    assert not torch.allclose(plain.mtp_logits[0], spread.mtp_logits[0])


def test_each_mtp_depth_draws_its_own_weights():
    """Each depth's layers come from generators of their own, not the main stack's nor another depth's."""
    model = HybridLM(tiny_config("*-*-/*-/*-"), seed=0)
    main = model.blocks["2"].layers[0].mixer.o_proj.weight
    first, second = (depth.blocks["0"].layers[0].mixer.o_proj.weight for depth in model.mtp)
    assert not torch.equal(first, second) and not torch.equal(first, main) and not torch.equal(second, main)


def test_reset_buffers_zeroes_the_expert_counts():
    """What a model allocated on meta and loaded (``to_empty`` leaves garbage) relies on."""
    model = HybridLM(tiny_config("M-E/E"), seed=0)
    counts = [b for n, b in model.named_buffers() if n.endswith("tokens_per_expert")]
    assert len(counts) == 2
    for b in counts:
        b.fill_(5)
    model.reset_buffers()
    assert all(int(b.abs().sum()) == 0 for b in counts)


def test_a_tied_head_trains_the_embedding_through_the_chunked_loss_too():
    """The chunked loss (``return_logits=False``, the trainer's path) gives a tied model the same gradients as
    the loss on materialized logits, the embedding's through the head included."""
    model = HybridLM(tiny_config("M-/-", tie_embeddings=True), seed=0, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 7))
    grads = []
    for return_logits in (True, False):
        model.zero_grad()
        model(ids, torch.roll(ids, -1, 1), return_logits=return_logits).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-12, msg=name)


def test_the_moe_benchmark_preset_has_its_documented_size():
    """docs/model.md: bench-moe-1b has 3.93B parameters; the count was checked for the other presets only."""
    model = HybridLM(ModelConfig.preset("bench-moe-1b"), device="meta")
    assert abs(float(model.num_params()) / 1e9 - 3.93) < 0.01


def test_inputs_that_are_not_tensors_and_misshaped_hidden_states_are_refused_by_name():
    """A list or numpy array of ids (or labels, positions, document ids) failed with an AttributeError naming
    no argument, and hidden states of the wrong width inside the first norm; each is now refused by name."""
    import numpy as np

    model = HybridLM(tiny_config("M*-/-"), seed=0)
    ids = torch.randint(0, 97, (2, 5))
    rows = ids.tolist()
    for kwargs, says in (
        (dict(input_ids=rows), "input_ids must be a torch.Tensor, got list"),
        (dict(input_ids=np.array(rows)), "input_ids must be a torch.Tensor, got ndarray"),
        (dict(input_ids=ids, labels=rows), "labels must be a torch.Tensor"),
        (dict(input_ids=ids, position_ids=[list(range(5))]), "position_ids must be a torch.Tensor"),
        (dict(input_ids=ids, doc_ids=[[0, 0, 1, 1, 1]] * 2), "doc_ids must be a torch.Tensor"),
        (dict(input_ids=ids, seq_idx=[[0, 0, 1, 1, 1]] * 2), "seq_idx must be a torch.Tensor"),
        (dict(input_ids=ids, cu_seqlens=[0, 5, 10]), "cu_seqlens must be a torch.Tensor"),
        (dict(hidden_states=torch.randn(2, 5)), r"hidden_states must be \(B, L, 32\)"),
        (dict(input_ids=ids, hidden_states=torch.randn(2, 5, 7)), r"hidden_states must be \(B, L, 32\)"),
    ):
        with pytest.raises(ValueError, match=says):
            model(**kwargs)
    assert model(ids, hidden_states=model.embeddings(ids)).logits.shape == (2, 5, 97)


def test_init_parts_run_one_by_one_outside_no_grad_give_the_models_weights():
    """Each part of ``init_parts`` is callable on its own, in any order: the embedding's, the head's and the
    MTP depths' parts filled leaf parameters in place under autograd and raised a RuntimeError."""
    config = tiny_config("M-[*E]/-")
    want = HybridLM(config, seed=3).state_dict()
    model = HybridLM(config, device="meta")
    model.to_empty(device="cpu")
    for _, init in reversed(model.init_parts(3)):
        init()
    model.reset_buffers()
    got = model.state_dict()
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_rope_angles_are_float32_and_float64_in_a_float64_model():
    """The angles are float32 as Hugging Face computes them (bf16 autocast included); a float64 model's were
    float32 too, 2e-8 off its float64 reference."""
    for dtype, want in ((None, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        model = HybridLM(tiny_config("M*-", position_embedding="rope"), seed=0, dtype=dtype)
        cos, sin = model.make_context(2, 5, torch.device("cpu")).rope
        assert cos.dtype == sin.dtype == want


def test_a_float64_model_builds_no_flex_block_mask(monkeypatch):
    """Packed float64 rows skip FlexAttention (causal_attention asks use_flex with q's dtype), but make_context
    asked without a dtype: on CUDA it compiled and built a block mask every forward that no layer used. A
    stand-in for CUDA's answer (use_flex is true there except for float64) checks what make_context asks."""
    import hybridlm.model as model_module

    asked = []
    monkeypatch.setattr(model_module, "use_flex", lambda seq_idx, head_dim, dtype=None: asked.append(dtype) or False)
    ids, docs = torch.randint(0, 97, (2, 6)), torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    for dtype, want in ((None, torch.float32), (torch.float64, torch.float64)):
        asked.clear()
        HybridLM(tiny_config("M*-"), seed=0, dtype=dtype)(ids, doc_ids=docs)
        assert asked == [want]


def test_hidden_states_of_another_shape_than_the_input_ids_are_refused_by_name():
    """A pipeline stage after the first takes hidden states and the input ids (for the MTP depths and the
    labels): ids of another (B, L) failed as a size mismatch inside torch.cat or the loss, naming neither."""
    model = HybridLM(tiny_config("M*-/-"), seed=0)
    ids = torch.randint(0, 97, (2, 5))
    for hidden in (torch.randn(2, 4, 32), torch.randn(3, 5, 32)):
        with pytest.raises(ValueError, match=r"hidden_states \(.*\) and input_ids \(2, 5\) must have the same"):
            model(ids, hidden_states=hidden)


def test_combine_losses_weighs_each_head_by_its_share_and_the_aux_loss_by_the_main_heads():
    """``lm * s0 + scale * mean_d(mtp_d * s_d) + aux * s0`` (without shares: ``lm + scale * mean + aux``). The
    auxiliary loss under the main head's share is what keeps micro-batches of one step from each adding it whole
    (the per-head test above has no MoE, so no auxiliary loss)."""
    from hybridlm.model import combine_losses

    lm, m1, m2, aux = (torch.tensor(v, dtype=torch.float64) for v in (2.0, 3.0, 5.0, 7.0))
    shares = torch.tensor([0.25, 0.5, 0.125], dtype=torch.float64)
    got = combine_losses(lm, [m1, m2], aux, 0.3, shares)
    assert got.item() == pytest.approx(2.0 * 0.25 + 0.3 * (3.0 * 0.5 + 5.0 * 0.125) / 2 + 7.0 * 0.25, rel=1e-12)
    assert combine_losses(lm, [m1, m2], aux, 0.3).item() == pytest.approx(2.0 + 0.3 * 4.0 + 7.0, rel=1e-12)
    assert combine_losses(lm, [], aux, 0.3, shares[:1]).item() == pytest.approx((2.0 + 7.0) * 0.25, rel=1e-12)


def test_segment_ids_number_each_rows_documents_from_0():
    """cu_seqlens over the flattened rows: a boundary at a row start starts no second document there (each
    row counts from 0, as doc_ids give)."""
    from hybridlm.layers.context import segment_ids

    cu = torch.tensor([0, 2, 4, 5, 8])  # the boundary at 4 is row 1's start
    assert segment_ids(2, 4, torch.device("cpu"), cu_seqlens=cu).tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    docs = torch.tensor([[7, 7, 3, 9], [1, 2, 2, 2]])
    assert segment_ids(2, 4, torch.device("cpu"), doc_ids=docs).tolist() == [[0, 0, 1, 2], [0, 1, 1, 1]]


def test_segment_ids_refuse_boundaries_that_do_not_fit_the_input():
    """A (1, L) doc_ids for 2 rows would broadcast row 0's documents over both; cu_seqlens that do not rise from 0
    to batch * seqlen would cut documents where none start; both given, one would be ignored."""
    from hybridlm.layers.context import segment_ids

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"doc_ids has shape \(1, 4\), expected \(2, 4\)"):
        segment_ids(2, 4, cpu, doc_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="pass doc_ids or cu_seqlens, not both"):
        segment_ids(2, 4, cpu, doc_ids=torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 8]))
    for cu in ([], [1, 4, 8], [0, 4, 6], [0, 5, 3, 8]):
        with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to batch\*seqlen=8, got "):
            segment_ids(2, 4, cpu, cu_seqlens=torch.tensor(cu, dtype=torch.long))


@pytest.mark.parametrize("L", [2, 5, 8, 21])
def test_gdn_flops_below_a_chunk_match_flop_counter(L):
    """The chunked gated delta rule runs a sequence shorter than a chunk as one chunk of its own length, as the
    SSD does; its count padded every sequence to a whole gdn_chunk_size (at L = 2 of 8: 6.8x the scan's work)."""
    config = tiny_config("G-G", gdn_chunk_size=8, gdn_num_value_heads=4, gdn_value_head_dim=6)
    model = HybridLM(config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, config.vocab_size, (2, L)))
    assert_rel_close(
        torch.tensor(float(counter.get_total_flops())), torch.tensor(float(model.flops_per_token(L) * 2 * L)), 1e-9, L
    )


def test_a_config_that_is_not_a_model_config_is_refused_by_name():
    """A preset name or a config dict, as other libraries take them, failed with "AttributeError: 'str' object
    has no attribute 'parsed'", naming neither the argument nor what it should be."""
    for config in ("tiny", ModelConfig.preset("tiny").to_dict(), None):
        with pytest.raises(ValueError, match="config must be a ModelConfig"):
            HybridLM(config, device="meta")


def test_building_and_loading_a_model_imports_neither_dynamo_nor_sympy(tmp_path):
    """Building on meta ran two of torch's Python references: nn.Embedding's default normal_ (its first call
    imports torch._dynamo) and to_empty's empty_like (it imports sympy), seconds at the start of every process
    that builds or loads a model (`hybridlm generate`) for values that are never used."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, hybridlm; "
        f"config = hybridlm.ModelConfig.from_dict({tiny_config('M[*-]/[*-]', vocab_size=257).to_dict()!r}); "
        f"hybridlm.save(hybridlm.HybridLM(config, seed=0), {str(tmp_path / 'ck')!r}); "
        f"hybridlm.load({str(tmp_path / 'ck')!r}); "
        "late = [m for m in ('torch._dynamo', 'sympy') if m in sys.modules]; "
        "assert not late, late"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_dtype_name_may_carry_torch_s_prefix():
    """str(torch.bfloat16) is "torch.bfloat16": that name is taken as well as "bfloat16", by the model and cast."""
    model = HybridLM(tiny_config("M-"), dtype="torch.bfloat16")
    assert model.embeddings.weight.dtype == torch.bfloat16
    assert model.cast("torch.float64").embeddings.weight.dtype == torch.float64


def test_cast_leaves_integer_buffers_integer():
    """The MoE's tokens_per_expert counts stay int64: in bfloat16 a count past 256 would round (the expert-bias
    update reads them)."""
    model = HybridLM(tiny_config("-E", moe_router_expert_bias=True)).cast(torch.bfloat16)
    counts = [t for name, t in model.named_buffers() if name.endswith("tokens_per_expert")]
    assert counts and all(t.dtype == torch.int64 for t in counts)
    assert model.embeddings.weight.dtype == torch.bfloat16


def test_gated_attention_counts_its_gate_projection():
    """One (heads * head_dim, hidden) gate_proj per attention layer, in num_params and flops_per_token, which
    the flop counter confirms; fused and unfused gated models compute bitwise the same."""
    config = tiny_config("M[*-]/[*-]", attention_output_gate=True, position_embedding="rope", head_dim=6)
    plain = HybridLM(config.replace(attention_output_gate=False), device="meta")
    model = HybridLM(config, seed=2)
    gate = 4 * 6 * config.hidden_size
    assert model.num_params().by_kind["*"] - plain.num_params().by_kind["*"] == gate
    assert float(model.num_params()) - float(plain.num_params()) == 2 * gate  # the MTP depth's layer too
    assert model.flops_per_token(13) - plain.flops_per_token(13) == 2 * 2 * gate
    ids = torch.randint(0, config.vocab_size, (2, 13))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    assert counter.get_total_flops() == model.flops_per_token(13) * 2 * 13
    twin = HybridLM(config.replace(pattern=unfused(config.pattern)), seed=2)
    labels = torch.roll(ids, -1, 1)
    out, out_twin = model(ids, labels), twin(ids, labels)
    assert torch.equal(out.logits, out_twin.logits) and torch.equal(out.loss, out_twin.loss)
    out.loss.backward()
    out_twin.loss.backward()
    ga, gb = canonical_grads(model), canonical_grads(twin)
    assert "layers.1.mixer.gate_proj.weight" in ga
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k


# -- the shared expert's gate and active parameters -----------------------------------------------------

#: Sizes small enough to count by hand: hidden 4, vocabulary 10, MLP 6, 4 experts of 3 (top-1), a shared expert of 2.
_COUNTED = dict(
    vocab_size=10, hidden_size=4, ffn_hidden_size=6, moe_num_experts=4, moe_top_k=1, moe_ffn_hidden_size=3,
    moe_shared_expert_ffn_hidden_size=2,
)  # fmt: skip


@pytest.mark.parametrize("gate", [False, True])
def test_active_params_count_an_moe_layers_top_k_experts_by_hand(gate):
    """ "30B-A3B": the parameters one token uses. By hand, relu² (up and down only), gate: a (1, 4) weight:
    E = norm 4 + router 4·4 + experts 4 × (up 3·4 + down 4·3) + shared (2·4 + 4·2) + gate 4 = 136 (132 ungated),
    of which a token uses one expert of the four: 136 - 3 × 24 = 64; '-' = 4 + 6·4 + 4·6 = 52; embedding and head
    10·4 = 40 each, norm_f 4; an MTP depth = enorm 4 + hnorm 4 + eh_proj 4·8 + its E layer + final_norm 4."""
    g = 4 if gate else 0
    model = HybridLM(ModelConfig(pattern="E-/E", moe_shared_expert_gate=gate, **_COUNTED), device="meta")
    total, active = model.num_params(), model.num_params(active=True)
    assert total.by_kind == {"embeddings": 40, "E": 132 + g, "-": 52, "norm_f": 4, "head": 40, "mtp": 44 + 132 + g}
    assert active.by_kind == {"embeddings": 40, "E": 60 + g, "-": 52, "norm_f": 4, "head": 40, "mtp": 44 + 60 + g}
    assert float(total) == sum(p.numel() for p in model.parameters()) == 444 + 2 * g
    assert float(active) == 300 + 2 * g
    assert float(model.num_params(exclude_embeddings=True, active=True)) == 260 + 2 * g
    assert model.num_params(active=False).by_kind == total.by_kind  # the default: everything, as before
    dense = HybridLM(ModelConfig(pattern="-*", num_attention_heads=2, **_COUNTED), device="meta")
    assert dense.num_params(active=True).by_kind == dense.num_params().by_kind  # no MoE: every parameter is active


def test_a_model_with_a_shared_expert_gate_fused_equals_its_unfused_twin_bitwise():
    """[ME] and ME hold the same canonical weights, gate included, and compute the same logits and gradients to the
    bit (a fused block runs its two layers exactly as two blocks do)."""
    config = tiny_config("[ME]E/[*E]", moe_shared_expert_ffn_hidden_size=16, moe_shared_expert_gate=True)
    fused, twin = HybridLM(config, seed=3), HybridLM(config.replace(pattern="MEE/*E"), seed=3)
    a, b = canonical_state(fused), canonical_state(twin)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(k.endswith("mixer.shared_expert_gate.weight") for k in a) == 3
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    out_f, out_t = fused(ids, torch.roll(ids, -1, 1)), twin(ids, torch.roll(ids, -1, 1))
    assert torch.equal(out_f.logits, out_t.logits) and torch.equal(out_f.loss, out_t.loss)
    out_f.loss.backward(), out_t.loss.backward()
    ga, gb = canonical_grads(fused), canonical_grads(twin)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_a_shared_expert_gates_flops_match_the_flop_counter():
    """The gate adds 2·hidden FLOPs per token and MoE layer (its (hidden -> 1) projection)."""
    config = tiny_config("M[*E]E/E", moe_shared_expert_ffn_hidden_size=16, moe_shared_expert_gate=True)
    model = HybridLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    expected = model.flops_per_token(9)
    assert counter.get_total_flops() == float(expected) * 2 * 9
    ungated = HybridLM(config.replace(moe_shared_expert_gate=False)).flops_per_token(9)
    assert (
        expected["E"] - ungated["E"] == 2 * 2 * config.hidden_size
        and expected["mtp"] - ungated["mtp"] == 2 * config.hidden_size
    )


# -- zero-centred norm weights (norm_zero_centered) ------------------------------------------------


@pytest.mark.parametrize(
    "pattern, overrides",
    [("M[*-]GE/*-", {"qk_norm": True, "position_embedding": "rope"}), ("[+-]MD/+-", MLA_TINY)],
    ids=["attention-qk-norm", "mla-dsa"],
)
def test_zero_centered_norms_compute_the_plain_model_whose_norm_weights_are_one_plus_w(pattern, overrides):
    """Bitwise in float32: the zero-centred norm forms ``1 + w`` in float32 (rounded once) and multiplies as the
    plain norm multiplies its float32 weight, here that same float32 number. Every pre-norm (the fused block's
    seam too), the final norms, the MTP norms, attention's q/k and MLA's latent norms are zero-centred and start
    at 0; the gated norms of Mamba2 and Gated DeltaNet stay plain and start at 1."""
    from hybridlm.layers import RMSNorm

    zc = HybridLM(tiny_config(pattern, norm_zero_centered=True, **overrides), seed=0).eval()
    plain = HybridLM(tiny_config(pattern, **overrides), seed=0).eval()
    norms = sorted(n for n, m in zc.named_modules() if isinstance(m, RMSNorm))
    assert all(zc.get_submodule(n).zero_centered for n in norms)
    kinds = {n.rsplit(".", 1)[-1] for n in norms}
    assert {"norm", "norm_f", "enorm", "hnorm", "final_norm"} <= kinds
    assert kinds & {"q_norm", "k_norm"} == {"q_norm", "k_norm"} or kinds >= {"q_a_layernorm", "kv_a_layernorm"}
    state = zc.state_dict()
    assert all((state[f"{n}.weight"] == 0).all() for n in norms)
    gated = [k for k in state if k.endswith("mixer.norm.weight")]  # Mamba2's and GDN's gated norms
    assert gated and all((state[k] == 1).all() for k in gated)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in norms:
            state[f"{n}.weight"].normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
        plain.load_state_dict({k: v + 1 if k[: -len(".weight")] in norms else v for k, v in state.items()})
        a, b = zc(ids, labels=ids), plain(ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert all(map(torch.equal, a.mtp_logits, b.mtp_logits))
    # ... and not a model that ignores the option: the stored zero-centred weights as plain ones differ.
    with torch.no_grad():
        plain.load_state_dict(state)
        assert not torch.equal(plain(ids).logits, a.logits)


def test_packed_rows_build_the_block_mask_for_mla_too(monkeypatch):
    """MLA attends through causal_attention as "*" does, so make_context asks use_flex for "+" too (with the smaller
    of its query/key and value heads) and builds the block mask once; DSA attends under its selection's dense mask
    and asks nothing. A stand-in for CUDA's answer, as above."""
    import hybridlm.model as model_module

    asked, answer = [], False
    monkeypatch.setattr(
        model_module, "use_flex", lambda seq_idx, head_dim, dtype=None: asked.append(head_dim) or answer
    )
    monkeypatch.setattr(model_module, "document_block_mask", lambda seq_idx: "block mask")
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    for pattern, want in (("+-", [5]), ("D-", []), ("*-", [8]), ("M-", [])):  # MLA_TINY: min(6 + 4, 5)
        model = HybridLM(tiny_config(pattern, **MLA_TINY), seed=0)
        for answer in (False, True):
            asked.clear()
            ctx = model.make_context(2, 6, torch.device("cpu"), doc_ids=docs)
            assert asked == (want if not answer else want[:1]), (pattern, answer)
            assert ctx.block_mask == ("block mask" if want and answer else None), (pattern, answer)
