"""The cost model against hand-computed values from its documented formulas: bytes moved per
block, experts read at small micro-batches, stage memory and the 1F1B in-flight counts."""

import math

import pytest
import torch

from hybridlm.checkpoint.canonical import canonical_name
from hybridlm.model import HybridLM
from hybridlm.plan import estimate_costs
from hybridlm.plan.cost import in_flight, stage_memory
from hybridlm.train.trainable import freeze_others, trainable_names
from tests.helpers import MLA_TINY, tiny_config


def _weight_bytes(item):
    """Weight traffic of one unit without recomputation: all of its bytes less the activations'
    (written + read in the forward, twice that in the backward: 6 x the saved bytes)."""
    return item.bytes - 6 * item.act_bytes


def test_bytes_count_bf16_weight_reads_and_fp32_gradient_traffic():
    """Guards against the backward's fp32 gradient read+write being dropped from the bytes."""
    costs = estimate_costs(tiny_config("-"), 16)
    (block,) = costs.blocks
    # Weights read once in the forward and twice in the backward (bf16), fp32 gradients read and
    # written once: 2 + 2 * 2 + 2 * 4 = 14 bytes per parameter.
    assert math.isclose(_weight_bytes(block), 14 * block.params, rel_tol=1e-12)


def test_only_experts_that_receive_tokens_are_read():
    """Guards against the idle-expert count ignoring top_k (T * top_k experts receive tokens)."""
    config = tiny_config("E")
    E, k = config.moe_num_experts, config.moe_top_k
    assert k > 1 and k < E
    assert config.mlp_activation == "relu2"
    per_expert = config.hidden_size * config.resolved_moe_ffn_hidden_size * 2  # up and down projections
    # One token routes to top_k experts: E - top_k of them stay idle and are not read.
    (one,) = estimate_costs(config, 1).blocks
    want = one.params - (E - k) * per_expert
    assert math.isclose(_weight_bytes(one) / 14, want, rel_tol=1e-12)
    # Two tokens already reach (up to) every expert.
    (two,) = estimate_costs(config, 2).blocks
    assert math.isclose(_weight_bytes(two) / 14, two.params, rel_tol=1e-12)


def test_one_checkpointed_block_holds_all_its_activations_while_recomputed():
    """Guards against checkpointed memory leaving out the recomputed block's own activations."""
    costs = estimate_costs(tiny_config("M-[*-]G"), 64)
    for i, b in enumerate(costs.blocks):
        m = stage_memory(costs, i, i + 1, False, False)
        assert m["act_bytes_ckpt"] == m["act_bytes"] == b.act_bytes
    # Several blocks: every input, plus the largest block's activations beyond its input.
    m = stage_memory(costs, 0, len(costs.blocks), False, False)
    want = sum(b.ckpt_bytes for b in costs.blocks) + max(b.act_bytes - b.ckpt_bytes for b in costs.blocks)
    assert math.isclose(m["act_bytes_ckpt"], want, rel_tol=1e-12)


@pytest.mark.parametrize("pp", [1, 2, 4, 8])
def test_in_flight_without_interleaving_is_pp_minus_rank(pp):
    """Guards against an off-by-one in the 1F1B in-flight count (the last rank holds one micro-batch)."""
    assert [in_flight(r, pp, 1) for r in range(pp)] == list(range(pp, 0, -1))


def test_in_flight_with_interleaving():
    """Guards against counting vpp * pp instead of (vpp - 1) * pp warmup chunks when interleaved."""
    # 2 (pp - rank - 1) + (vpp - 1) pp + 1
    assert [in_flight(r, 4, 2) for r in range(4)] == [11, 9, 7, 5]
    assert [in_flight(r, 2, 3) for r in range(2)] == [7, 5]
    assert [in_flight(r, 1, 2) for r in range(1)] == [2]


@pytest.mark.parametrize("pattern, tie", [("M-[*-]", True), ("M-[*-]/[*-]", False)])
def test_single_stage_holds_the_embedding_once(pattern, tie):
    """Guards against a stage that is both first and last counting the shared embedding twice."""
    config = tiny_config(pattern, tie_embeddings=tie)
    costs = estimate_costs(config, 16)
    assert costs.shared_embedding_params == costs.embedding.params > 0
    total = float(HybridLM(config, device="meta").num_params())
    m = stage_memory(costs, 0, len(costs.blocks), True, True)
    assert m["params"] == total
    # 18 bytes a parameter, 16 for the embedding's and the head's (no bf16 copy kept: a gather, the chunked loss)
    assert m["state_bytes"] == total * 18 - 2 * (costs.embedding.params + costs.head.params)


@pytest.mark.parametrize("coeff", [0.0, 0.5])
def test_dsa_indexer_without_its_loss_keeps_no_gradient_or_optimizer_state(coeff):
    """Without ``dsa_indexer_loss_coeff`` a training step leaves DSA's indexer weights without a gradient and AdamW
    without state for them, and the plan counts their weights only (12 bytes a parameter less than 18)."""
    config = tiny_config("D-", **MLA_TINY, dsa_indexer_loss_coeff=coeff)
    model = HybridLM(config, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, config.vocab_size, (2, 12))
    model(ids, torch.roll(ids, -1, 1)).loss.backward()
    opt.step()
    indexer = {n: p for n, p in model.named_parameters() if ".indexer." in n}
    assert indexer and all((p.grad is None) == (coeff == 0) for p in indexer.values())
    assert all((p in opt.state) == (coeff > 0) for p in indexer.values())
    costs = estimate_costs(config, 12)
    m = stage_memory(costs, 0, len(costs.blocks), True, True)
    total, n_indexer = model.num_params(), sum(p.numel() for p in indexer.values())
    uncopied = 2 * (costs.embedding.params + costs.head.params)  # (no bf16 copy: see the test above)
    assert m["state_bytes"] == 18 * total - uncopied - (12 * n_indexer if coeff == 0 else 0)


@pytest.mark.parametrize("pattern", ["*", "embeddings.weight", "layers.1.*", "mtp.0.*", "*.indexer.*"])
def test_frozen_parameters_hold_no_gradient_or_optimizer_state(pattern):
    """train.trainable's frozen parameters are counted as what they are after a training step: weights only (12 bytes
    a parameter less than 18; a frozen embedding keeps its 4 bytes of fp32 weights). Checked against a step of the
    model frozen so: the parameters AdamW holds state for, with a tied embedding and an MTP depth, on every stage."""
    config = tiny_config("D-|[+-]/+-", **MLA_TINY, dsa_indexer_loss_coeff=0.5, tie_embeddings=True)
    model = HybridLM(config, seed=0)
    names = trainable_names(model, config.parsed, pattern)
    freeze_others(model, config.parsed, names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, config.vocab_size, (2, 12))
    model(ids, torch.roll(ids, -1, 1)).loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    stateless = sum(p.numel() for p in params.values() if p not in opt.state)
    assert stateless == sum(p.numel() for n, p in params.items() if canonical_name(n, config.parsed) not in names)
    costs = estimate_costs(config, 12, trainable=names)
    whole = stage_memory(costs, 0, len(costs.blocks), True, True)
    uncopied = 2 * (costs.embedding.params + costs.head.params)  # (no bf16 copy: see above)
    assert whole["state_bytes"] == 18 * model.num_params() - uncopied - 12 * stateless, pattern
    split = ((0, 1, True, False), (1, len(costs.blocks), False, True))
    stages = [stage_memory(costs, *args) for args in split]
    everything = [stage_memory(estimate_costs(config, 12), *args) for args in split]
    frozen_embedding = 12 * costs.embedding.params if pattern not in ("*", "embeddings.weight") else 0  # (two copies)
    saved = sum(a["state_bytes"] - b["state_bytes"] for a, b in zip(everything, stages))
    assert saved == 12 * stateless + frozen_embedding, pattern


_SETTINGS = [None, "layers.4.*", "layers.[34].*", "layers.0.*", "embeddings.weight", "norm_f.*", "mtp.*",
             "mtp.0.layers.0.*", "mtp.1.*"]  # fmt: skip


@pytest.mark.parametrize(
    "pattern, tied", [(s, False) for s in [*_SETTINGS, "lm_head.weight"]] + [(s, True) for s in _SETTINGS]
)  # (a tied model has no lm_head: its embedding is the head's matrix)
def test_frozen_parameters_cost_the_products_autograd_runs(pattern, tied):
    """A frozen layer computes no weight gradient, one before the first that trains (the embedding frozen) no
    backward at all, a frozen head matrix no dW and a head no gradient reaches no dh: the estimate's FLOPs of a step
    against the FLOPs torch counts running it (``FlopCounterMode``), on MLP layers, whose products the estimate
    counts exactly. Within 0.5 %: the first layer that trains is counted with its input's gradient (a bound)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = tiny_config("-----/-/-", vocab_size=512, tie_embeddings=tied)
    model = HybridLM(config, seed=0)
    names = None if pattern is None else trainable_names(model, config.parsed, pattern)
    if names is not None:
        freeze_others(model, config.parsed, names)
    B, L = 2, 48
    ids = torch.randint(0, config.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(ids, torch.roll(ids, -1, 1)).loss.backward()
    costs = estimate_costs(config, L, B, trainable=names)
    estimated = sum(item.flops for item in (*costs.blocks, costs.head, *costs.mtp))
    assert math.isclose(estimated, counter.get_total_flops(), rel_tol=5e-3), (estimated, counter.get_total_flops())


@pytest.mark.parametrize("pattern", ["*.indexer.*", "layers.2.*", "layers.3.*"])
def test_the_indexer_warm_up_costs_its_own_backward_alone(pattern):
    """DeepSeek-V3.2's dense warm-up trains the indexers alone (``*.indexer.*``): their inputs are read detached, so
    only their own loss has a backward, and the model around them runs its forward only. The estimate's share of the
    step that trains everything against the share torch counts (``FlopCounterMode``; DSA's products are not counted
    exactly, so the shares, not the FLOPs, are compared): counting the model's backward from the first indexer on, it
    said 0.79 where 0.47 ran."""
    from torch.utils.flop_counter import FlopCounterMode

    config = tiny_config("D-D-", **MLA_TINY, vocab_size=512, dsa_indexer_loss_coeff=0.5)
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    shares = []
    for setting in (None, pattern):
        model = HybridLM(config, seed=0)
        names = None if setting is None else trainable_names(model, config.parsed, setting)
        if names is not None:
            freeze_others(model, config.parsed, names)
        with FlopCounterMode(display=False) as counter:
            model(ids, torch.roll(ids, -1, 1)).loss.backward()
        costs = estimate_costs(config, 64, 2, trainable=names)
        shares.append((counter.get_total_flops(), sum(i.flops for i in (*costs.blocks, costs.head))))
    measured, estimated = (shares[1][i] / shares[0][i] for i in range(2))
    assert abs(estimated - measured) < 0.03, (estimated, measured)


def test_blocks_no_gradient_reaches_keep_nothing():
    """Blocks before the first that trains keep nothing for a backward that never runs, as measured
    (``measure.saved_bytes``); the estimate counts none of their activations or recomputation, nor the head's dW when
    its matrix is frozen."""
    from hybridlm.plan.measure import saved_bytes

    config = tiny_config("M-*-G-", vocab_size=512)
    model = HybridLM(config, seed=0)
    names = trainable_names(model, config.parsed, "layers.[34].*")  # (an MLP and Gated DeltaNet, blocks 3 and 4)
    freeze_others(model, config.parsed, names)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes(model, ids)
    costs, whole = estimate_costs(config, 16, 2, recompute=True, trainable=names), estimate_costs(config, 16, 2)
    assert measured[:3] == [0, 0, 0] and all(measured[3:]), measured  # (the last, frozen, passes a gradient on)
    assert [(b.act_bytes, b.ckpt_bytes) for b in costs.blocks[:3]] == [(0, 0)] * 3
    assert all(b.act_bytes for b in costs.blocks[3:])
    first = estimate_costs(config, 16, 2, recompute=False, trainable=names).blocks[0]  # (recomputation not run)
    assert costs.blocks[0].time_s == first.time_s < whole.blocks[0].time_s / 2
    assert whole.head.act_bytes - costs.head.act_bytes == config.vocab_size * config.hidden_size * 4  # (no fp32 dW)


def test_last_stage_holds_the_head_and_mtp():
    """Guards against the last stage's memory missing the head, the MTP depths and the shared embedding."""
    costs = estimate_costs(tiny_config("M-[*-]/[*-]"), 16)
    n = len(costs.blocks)
    inner, last = stage_memory(costs, 1, n, False, False), stage_memory(costs, 1, n, False, True)
    extra = [costs.head, *costs.mtp]
    assert last["params"] == inner["params"] + sum(m.params for m in extra) + costs.shared_embedding_params
    assert last["act_bytes"] == inner["act_bytes"] + sum(m.act_bytes for m in extra)
    assert last["act_bytes_ckpt"] == inner["act_bytes_ckpt"] + sum(m.ckpt_bytes for m in extra)


@pytest.mark.parametrize("pattern", ["M-", "M-/[*-]/[*-]"])
def test_the_head_keeps_what_the_chunked_loss_saves_not_the_logits(pattern):
    """Guards against the head's (and each MTP depth's) activations counting (T, V) bf16 and fp32 logits
    and log-probs (5V per token: 10 GiB at 8k tokens of a 131k vocabulary), which training's chunked
    linear cross entropy never keeps: it saves dh (T, H) and an fp32 dW (V, H)."""
    import torch

    config = tiny_config(pattern, vocab_size=1000)
    B, L = 2, 24
    T, H, V = B * L, config.hidden_size, config.vocab_size  # 48, 32, 1000: no two products alike
    # What training's head saves for its backward: no tensor of T x V elements.
    model = HybridLM(config)
    h = torch.randn(B, L, H, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model.head_loss(model.norm_f(h), torch.randint(0, V, (B, L)))
    assert T * H in saved and max(saved) == V * H < T * V
    costs = estimate_costs(config, L, B)
    kept = 2 * H * T * 2 + H * T * 2 + V * H * 4  # input and normed input, dh (bf16); dW (fp32)
    assert costs.head.act_bytes == costs.head.ckpt_bytes == kept
    for depth in costs.mtp:  # each depth runs the shared head through the same loss: less than bf16 logits beside it
        assert depth.act_bytes - kept < T * V * 2


def test_a_mixer_the_cost_model_has_no_estimate_for_is_refused_naming_where_to_add_one(monkeypatch):
    """A mixer registered without a case in the cost model failed with a bare ``AssertionError: R``."""
    from hybridlm.layers import MIXERS, MLP
    from hybridlm.plan import cost

    monkeypatch.setitem(MIXERS, "R", MLP)  # a newly registered mixer (any class)
    with pytest.raises(NotImplementedError, match=r"no activation-memory estimate for 'R' layers \(MLP\).*_saved"):
        cost._saved_elements(tiny_config("M"), "R", 64)


def test_gated_attention_saves_its_gate_and_gated_output():
    """The output gate's projection and the gated output (o_proj's input) are two more (heads * head_dim) tensors
    per token; its FLOPs are one more projection."""
    from hybridlm.layers import Attention
    from hybridlm.plan import cost

    plain = tiny_config("*", num_attention_heads=4, head_dim=6)
    gated = plain.replace(attention_output_gate=True)
    assert cost._saved_elements(gated, "*", 64) - cost._saved_elements(plain, "*", 64) == 2 * 4 * 6
    extra = Attention.flops_per_token(gated, 16) - Attention.flops_per_token(plain, 16)
    assert extra == 2 * plain.hidden_size * 4 * 6


@pytest.mark.parametrize("wide", [True, False])
def test_a_dense_mask_is_kept_only_where_packed_rows_take_one(wide):
    """Attention's and MLA's packed rows take FlexAttention (heads of at least FLEX_MIN_HEAD_DIM), which keeps no mask;
    DSA's keeps its selection for FlexAttention's mask_mod (a byte, half an element, a key). Narrower heads take SDPA
    under the dense mask, and SDPA keeps it as a bf16 bias (a value per key a token). (Their FLOPs:
    tests/plan/test_planner.py::test_attention_scores_are_counted_causally.)"""
    from hybridlm.plan import cost

    L = 256
    heads = dict(num_attention_heads=2, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16) if wide else {}
    for s, flex in (("*", 0), ("+", 0), ("D", L / 2)):
        c = tiny_config(s, **{**MLA_TINY, **heads})
        assert cost._saved_elements(c, s, L) == cost._saved_elements(c, s, 0) + (flex if wide else L), s


def test_the_shared_expert_gate_saves_the_shared_output_and_one_gate_per_token():
    """The gated product's backward keeps the shared expert's output (H per token) and the sigmoid (1 per token):
    measured as the new tensors an MoE layer saves (beyond the weight) when its gate is on."""
    import torch

    from hybridlm.layers.moe import MoE
    from hybridlm.plan import cost

    config = tiny_config("E", moe_shared_expert_ffn_hidden_size=16, moe_shared_expert_gate=True)
    x = torch.randn(2, 5, config.hidden_size, requires_grad=True)

    def saved_elements(c):
        layer = MoE(c)
        layer.init_weights(torch.Generator().manual_seed(0), 0.02, 0.01)
        weights = {p.data_ptr() for p in layer.parameters()}
        saved = {}  # storage -> elements: a tensor saved by two operations counts once

        def pack(t):
            saved[t.data_ptr()] = t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sum(n for ptr, n in saved.items() if ptr not in weights)

    ungated = config.replace(moe_shared_expert_gate=False)
    assert saved_elements(config) - saved_elements(ungated) == 10 * (config.hidden_size + 1)
    assert cost._saved_elements(config, "E", 64) - cost._saved_elements(ungated, "E", 64) == config.hidden_size + 1


def test_float8_runs_the_converted_layers_matmuls_at_the_float8_peak():
    """With train.float8 the FLOPs of the layers ops.float8 converts go at the float8 peak (twice bf16's on an H100),
    everything else as before: an MLP block's compute halves, Mamba2's scan and the head do not move."""
    from hybridlm.ops.float8 import float8_linears
    from hybridlm.plan.cost import HARDWARE, _param_counts

    config = tiny_config("M-*-", hidden_size=4096, ffn_hidden_size=16384, mamba_head_dim=64)
    bf16 = estimate_costs(config, 4096, 4)
    f8 = estimate_costs(config, 4096, 4, float8="tensorwise")
    assert f8.float8 == "tensorwise" and bf16.float8 == "none"
    hw = HARDWARE["h100"]
    assert hw.float8_flops_per_s == 2 * hw.flops_per_s + 1e12  # the data sheet's 1,979 against 989 TFLOP/s
    # The counted weights are those of the converted layers, layer by layer.
    model = HybridLM(config, device="meta")
    converted = float8_linears(model)
    counts = _param_counts(config)
    for i, block in enumerate(counts["float8"]):
        for j, layer in enumerate(block):
            mine = [model.get_submodule(k) for k in converted if k.startswith(f"blocks.{i}.layers.{j}.")]
            assert layer.weights == sum(m.weight.numel() for m in mine) > 0, (i, j)
            assert (layer.inputs, layer.outputs) == (
                sum(m.in_features for m in mine),
                sum(m.out_features for m in mine),
            )
            assert {model.get_submodule(f"blocks.{i}.layers.{j}.mixer.{k}") for k in layer.names} == set(mine)
    mlp_bf16, mlp_f8 = bf16.blocks[1], f8.blocks[1]
    assert mlp_bf16.flops == mlp_f8.flops  # the same work, faster (and fewer bytes saved: see the next test)
    # No bf16 copy of a converted weight: 2 bytes fewer of state for each.
    converted_weights = sum(layer.weights for block in counts["float8"] for layer in block)
    state = [stage_memory(x, 0, 4, True, True)["state_bytes"] for x in (bf16, f8)]
    assert state[0] - state[1] == 2 * converted_weights == 2 * sum(b.float8_params for b in f8.blocks)
    # Compute-bound at this size, in bf16 and in float8: all of an MLP's FLOPs are its two linear layers'. Float8 adds
    # its casts, memory-bound kernels of their own: the forward reads each bf16 input twice (scale, cast) and writes
    # it in one byte, and the fp32 weights likewise (and a transposed copy); the backward casts the output gradients
    # and the inputs again.
    H, F, T = 4096, 16384, 4 * 4096
    casts = 5 * T * (H + F) + 10 * 2 * H * F + 5 * T * 2 * (H + F)
    assert mlp_bf16.time_s == pytest.approx(mlp_bf16.flops / hw.flops_per_s)
    assert mlp_f8.time_s == pytest.approx(mlp_bf16.flops / hw.float8_flops_per_s + casts / hw.bytes_per_s)
    assert f8.head == bf16.head and f8.embedding == bf16.embedding
    # bench-1.3b's Mamba2 layer: its projections convert, its scan (the rest of flops_per_token) stays in bf16.
    from hybridlm import ModelConfig

    bench = ModelConfig.preset("bench-1.3b")
    assert bench.parsed.blocks[0] == "M"
    mamba = [estimate_costs(bench, 4096, 4, float8=f).blocks[0].time_s for f in ("none", "tensorwise")]
    assert 0.55 < mamba[1] / mamba[0] < 0.95
    # The whole step at 4 x 4096: tensorwise float8 measured 1.10-1.11x bf16's speed on an H100 (docs/benchmarks.md,
    # fifty-first and fifty-second sessions); without the casts the estimate said 1.37x.
    step = [estimate_costs(bench, 4096, 4, float8=f) for f in ("none", "tensorwise")]
    total = [sum(x.block_times) + x.first_extra_s + x.last_extra_s for x in step]
    assert 1.05 < total[0] / total[1] < 1.2


def test_what_compiled_float8_blocks_no_longer_save_is_what_the_plan_counts():
    """Per block, the bytes a compiled block saves for its backward in bf16 but not with float8 layers, measured
    (tensors packed while the block runs, its parameters left out) against the plan's: its activations
    (``plan.cost._float8_unsaved``) plus the bf16 weight copies autocast keeps and float8 does not. The MLP's
    normed input and activation and attention's normed input are recomputed, as the plan counts, up to the few
    float32 scales float8 saves. Mamba2's and Gated DeltaNet's gated norm output: on the CPU the plain-torch norm is
    recomputed too, so half of it more than the plan counts, which counts the float8 copy the GPU's Triton norm (a
    kernel the partitioner cannot rerun) leaves."""
    import torch

    pytest.importorskip("torchao")
    from hybridlm.ops.float8 import apply_float8
    from hybridlm.parallel.execution import compile_blocks
    from hybridlm.plan.cost import BF16
    from hybridlm.plan.measure import saved_bytes

    config = tiny_config("-*MG", hidden_size=64, ffn_hidden_size=256, mamba_num_heads=8, mamba_head_dim=16,
                         gdn_head_dim=32, vocab_size=128)  # fmt: skip
    B, L = 2, 64
    ids = torch.randint(0, 128, (B, L), generator=torch.Generator().manual_seed(0))

    def saved(recipe: str) -> list[int]:
        torch._dynamo.reset()
        model = HybridLM(config, seed=0)
        if recipe != "none":
            apply_float8(model, recipe)
        return saved_bytes(compile_blocks(model), ids)

    T = B * L
    c = config  # the gated norm outputs' widths: half of it in elements, at two bytes each
    gated_half = {"M": c.resolved_mamba_num_heads * c.mamba_head_dim,
                  "G": c.resolved_gdn_num_value_heads * c.resolved_gdn_value_head_dim}  # fmt: skip
    bf16, bf16_saved = estimate_costs(config, L, B), saved("none")
    for recipe in ("tensorwise", "rowwise"):
        f8 = estimate_costs(config, L, B, float8=recipe)
        planned = [a.act_bytes - b.act_bytes + BF16 * b.float8_params for a, b in zip(bf16.blocks, f8.blocks)]
        measured = [a - b for a, b in zip(bf16_saved, saved(recipe))]
        for block, got, want in zip(config.parsed.blocks, measured, planned):
            scales = 4 * 4 * 4  # float32 scales: at most four per float8 layer here
            want += gated_half.get(block, 0) * T
            assert want - scales <= got <= want and want > 0, (recipe, block, got, want)


def test_float8_needs_hardware_with_a_float8_peak():
    with pytest.raises(ValueError, match=r"the A100 SXM 80GB has no float8 matmuls"):
        estimate_costs(tiny_config("-"), 16, hardware="a100", float8="tensorwise")


def test_frozen_layers_after_a_trained_one_keep_what_the_plan_counts():
    """A layer a gradient passes through keeps no tensor that only its frozen linear layers' weight gradients read:
    per block, what a compiled block keeps less frozen than training, measured, against what the plan counts less.
    First every layer after the first frozen; then each with only some of its linear layers frozen (the MLP's down
    projection: its activation goes, its normed input stays; attention's q, k, v and gate: the normed input goes,
    the gated output stays; the experts' down projection: their activation). MoE: the CPU's partitioner keeps no
    float32 copy of the router's input even training (it recomputes it from the normed input), which the plan counts,
    so frozen it is missing from the measure too. Before the plan counted what a frozen layer keeps training."""
    from hybridlm.parallel.execution import compile_blocks
    from hybridlm.plan.cost import BF16
    from hybridlm.plan.measure import saved_bytes

    config = tiny_config("--*MGE", hidden_size=64, ffn_hidden_size=256, mamba_num_heads=8, mamba_head_dim=16,
                         gdn_head_dim=32, vocab_size=128, attention_output_gate=True)  # fmt: skip
    B, L = 2, 64
    ids = torch.randint(0, 128, (B, L), generator=torch.Generator().manual_seed(0))
    model = HybridLM(config, device="meta")
    names = [canonical_name(n, config.parsed) for n, _ in model.named_parameters()]
    frozen_linears = {  # (a part frozen in each layer after the first)
        "layers.1.": ("down_proj",),
        "layers.2.": ("q_proj", "k_proj", "v_proj", "gate_proj"),
        "layers.5.": ("experts.down_proj",),
    }

    def partly(name: str) -> bool:
        layer = next((k for k in frozen_linears if name.startswith(k)), None)
        return layer is None or not any(name.startswith(f"{layer}mixer.{m}") for m in frozen_linears[layer])

    router = 2 * config.hidden_size * B * L * BF16  # (the CPU does not keep it)
    everything = estimate_costs(config, L, B)
    trained = None
    cases = [
        (None, ""),
        ({n for n in names if n.startswith("layers.0.")}, "-*MGE"),  # (the blocks after the first, wholly frozen)
        ({n for n in names if partly(n)}, "-*E"),
    ]
    for trainable, frozen in cases:
        torch._dynamo.reset()
        model = HybridLM(config, seed=0)
        freeze_others(model, config.parsed, trainable)
        measured = saved_bytes(compile_blocks(model), ids)
        if trainable is None:
            trained = measured
            continue
        costs = estimate_costs(config, L, B, trainable=trainable)
        for i, block in enumerate(config.parsed.blocks[1:], 1):
            planned = everything.blocks[i].act_bytes - costs.blocks[i].act_bytes
            if block == "E" and "layers.5.mixer.gate.weight" not in trainable:
                planned -= router
            assert trained[i] - measured[i] == planned, (frozen, block, trained[i], measured[i], planned)
            assert (planned > 0) == (block in frozen), (frozen, block, planned)


def test_a_frozen_indexer_costs_as_much_with_its_loss_as_without():
    """A DSA layer whose indexer is frozen computes no indexer loss (``layers.dsa.DSA.indexer_trains``): what the
    layer keeps for its backward is the same with the loss on as off, measured, and the plan counts the layer the
    same, in FLOPs, time and memory. Before, the frozen indexer's loss ran and kept its chunks' tensors."""
    from hybridlm.plan.measure import saved_bytes

    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    kept, planned = [], []
    for coeff in (0.0, 0.5):
        config = tiny_config("-D", **MLA_TINY, vocab_size=512, dsa_indexer_loss_coeff=coeff)
        model = HybridLM(config, seed=0)
        names = trainable_names(model, config.parsed, "layers.0.*")
        freeze_others(model, config.parsed, names)
        kept.append(saved_bytes(model, ids)[1])
        block = estimate_costs(config, 64, 2, trainable=names).blocks[1]
        planned.append((block.flops, block.time_s, block.act_bytes))
    assert kept[0] == kept[1] > 0 and planned[0] == planned[1], (kept, planned)


def test_a_compiled_mlp_block_keeps_what_the_plan_counts():
    """The bytes a compiled MLP block keeps for its backward under bf16 autocast (its fp32 input, normed input, the
    norm's fp32 rstd, up projection output and activation, the bf16 weight copies) are the plan's to the element:
    the plain-torch path the CPU runs keeps what the GPU's does for this block. Guards against the fp32 input being
    counted as bf16 (13 % too little here)."""
    import torch

    from hybridlm.parallel.execution import compile_blocks
    from hybridlm.plan.cost import BF16
    from hybridlm.plan.measure import saved_bytes

    config = tiny_config("-", hidden_size=64, ffn_hidden_size=256, vocab_size=128)
    B, L = 2, 64
    ids = torch.randint(0, 128, (B, L), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    (got,) = saved_bytes(compile_blocks(HybridLM(config, seed=0)), ids)
    (block,) = estimate_costs(config, L, B).blocks
    assert got == block.act_bytes + BF16 * (block.params - config.hidden_size)  # (the norm weight: no bf16 copy)


@pytest.mark.gpu
def test_compiled_gpu_blocks_keep_what_the_plan_counts():
    """Per block kind (Mamba2, MLP, attention, MLA, DSA with and without its indexer loss; the Triton kernels training
    runs), the bytes a compiled block keeps for its backward under bf16 autocast, its rows cut into documents as
    training's are, against the plan's count (``plan.cost._saved_elements`` plus the bf16 weight copies), at half
    bench-1.3b's width. bench-1.3b itself on an H100 (docs/benchmarks.md): MLP and attention to the MiB, Mamba2
    0.6 % more than counted, DSA without its loss as MLA without documents (the indexer's weight copies, which the
    plan counts, left out here), DSA with its loss 1 % less. MLA's documents take FlexAttention and keep no mask,
    DSA's top-k mask is kept as a bf16 bias (a value per key a token): a count that mixes the two up fails here."""
    import torch

    from hybridlm import ModelConfig
    from hybridlm.parallel.execution import compile_blocks
    from hybridlm.plan.cost import BF16
    from hybridlm.plan.measure import saved_bytes

    half = dict(hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=8, num_query_groups=2, mamba_num_heads=32,
                vocab_size=32768)  # fmt: skip
    B, L = 2, 2048
    ids = torch.randint(0, half["vocab_size"], (B, L), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    doc_ids = (torch.arange(L, device="cuda") * 4 // L).expand(B, L)  # four documents a row
    for pattern, fields in (("M-*", {}), ("+-D", {}), ("D", {"dsa_indexer_loss_coeff": 0.01})):
        config = ModelConfig.preset("bench-1.3b").replace(pattern=pattern, **half, **fields)
        torch._dynamo.reset()
        model = HybridLM(config, seed=0, device="cuda")
        measured = saved_bytes(compile_blocks(model), ids, doc_ids)
        for kind, got, block, cost in zip(
            config.parsed.blocks, measured, model.blocks.values(), estimate_costs(config, L, B).blocks
        ):
            copied = cost.params
            if kind == "D" and config.dsa_indexer_loss_coeff == 0:  # (no backward: autocast's copies are not kept)
                copied -= sum(p.numel() for p in block.layers[0].mixer.indexer.parameters())
            want = cost.act_bytes + BF16 * copied
            assert abs(want / got - 1) < 0.02, (pattern, kind, got, want)


@pytest.mark.gpu
def test_compiled_gpu_frozen_blocks_keep_what_the_plan_counts():
    """After a trained MLP, each block frozen (MLP, Mamba2, attention, MLA, DSA; the Triton kernels training runs)
    keeps less than training by what the plan counts less (``plan.cost._unsaved``: the inputs only frozen linear
    layers read), within 2 % of what the block keeps training, at half bench-1.3b's width. The gated norms' and the
    attention kernels' backward read their inputs and outputs, not what the projections after them read."""
    from hybridlm import ModelConfig
    from hybridlm.parallel.execution import compile_blocks
    from hybridlm.plan.measure import saved_bytes

    half = dict(hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=8, num_query_groups=2, mamba_num_heads=32,
                vocab_size=32768)  # fmt: skip
    B, L = 2, 2048
    ids = torch.randint(0, half["vocab_size"], (B, L), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    doc_ids = (torch.arange(L, device="cuda") * 4 // L).expand(B, L)  # four documents a row
    for pattern in ("--M*", "-+D"):  # (attention and MLA in one model are refused, as Megatron refuses them)
        config = ModelConfig.preset("bench-1.3b").replace(pattern=pattern, **half)
        first = {canonical_name(n, config.parsed) for n, _ in HybridLM(config, device="meta").named_parameters()}
        first = {n for n in first if n.startswith("layers.0.")}
        measured = {}
        for trainable in (None, first):
            torch._dynamo.reset()
            model = HybridLM(config, seed=0, device="cuda")
            freeze_others(model, config.parsed, trainable)
            measured[trainable is None] = saved_bytes(compile_blocks(model), ids, doc_ids)
        trained, frozen = measured[True], measured[False]
        everything, costs = estimate_costs(config, L, B), estimate_costs(config, L, B, trainable=first)
        for i, kind in enumerate(config.parsed.blocks[1:], 1):
            planned = everything.blocks[i].act_bytes - costs.blocks[i].act_bytes
            got = trained[i] - frozen[i]
            assert planned > 0 and abs(got - planned) < 0.02 * trained[i], (kind, trained[i], frozen[i], planned)
