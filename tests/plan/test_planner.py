"""The planner: the planned pattern is the same model with pp x vpp segments, fused groups whole;
costs agree with the model's own counts."""

import dataclasses
import math
import random
import re

import pytest

from hybridlm import ModelConfig
from hybridlm.counting import flops_per_token
from hybridlm.errors import UsageError
from hybridlm.layers import DSA
from hybridlm.model import HybridLM
from hybridlm.pattern import parse
from hybridlm.plan import estimate_costs, plan_pipeline
from hybridlm.plan.balance import brute_force_cuts, segment_costs
from hybridlm.plan.cost import HARDWARE, recompute_bytes, stage_memory
from hybridlm.plan.planner import _count, imbalance
from hybridlm.train.trainable import trainable_names
from tests.helpers import MLA_TINY, random_pattern, tiny_config


def _random_cases(n):
    rng = random.Random(1)
    cases = []
    while len(cases) < n:
        text = random_pattern(rng, max_blocks=9)
        p = parse(text)
        pp = rng.randint(1, 4)
        vpp = rng.randint(1, 3)
        if pp * vpp <= p.num_blocks:
            cases.append((text, pp, vpp))
    return cases


@pytest.mark.parametrize("text, pp, vpp", _random_cases(24))
def test_planned_pattern_is_the_same_model_cut_into_pp_x_vpp_segments(text, pp, vpp):
    config = tiny_config(text)
    plan = plan_pipeline(config, pp, vpp, seq_len=16)
    q, p = plan.pattern, config.parsed
    assert parse(str(q)) == q
    assert len(q.segments) == pp * vpp
    assert all(q.segments)  # no empty stage
    # Same blocks in the same order: a fused group is never split, nothing moves.
    assert q.blocks == p.blocks and q.canonical == p.canonical
    assert (q.mtp, q.mtp_depths) == (p.mtp, p.mtp_depths)  # MTP stays after the last stage
    # The optimum over every layout (brute force) and never worse than the even split.
    c = plan.costs
    best = brute_force_cuts(c.block_times, pp * vpp, c.first_extra_s, c.last_extra_s)
    stage_costs = plan.stage_costs(plan.cuts)
    assert math.isclose(max(stage_costs), max(plan.stage_costs(best)), rel_tol=1e-9)
    assert max(stage_costs) <= max(plan.stage_costs(plan.even_cuts)) * (1 + 1e-12)
    # Each stage is what HybridPattern.stage selects for its rank and virtual stage.
    for s in plan.stages:
        st = q.stage(s.pp_rank, pp, s.vp_stage if vpp > 1 or pp > 1 else None)
        assert (st.block_offset, st.num_blocks) == (s.start, s.stop - s.start)
        assert st.is_first == (s.index == 0) and st.is_last == (s.index == pp * vpp - 1)


def test_user_cuts_are_reported():
    plan = plan_pipeline(tiny_config("M-M-|[*-]M-|M-[*E]M-"), 3, seq_len=16)
    assert plan.user_cuts == (4, 7)
    out = plan.to_json()
    assert len(out["user_stage_costs"]) == 3
    assert math.isclose(max(out["stage_costs"]), min(max(out["stage_costs"]), max(out["user_stage_costs"])))


def test_block_flops_are_the_mixers_flops():
    # No attention, so no causal halving: fwd + bwd = 3 forwards (4 with recomputation).
    config = tiny_config("M-[ME]G-E/M-")
    T = 2 * 24
    fwd = flops_per_token(config, 24)
    layers = sum(v for k, v in fwd.by_kind.items() if k not in ("head", "mtp"))
    costs = estimate_costs(config, 24, 2)
    assert math.isclose(sum(b.flops for b in costs.blocks), 3 * T * layers, rel_tol=1e-12)
    assert math.isclose(costs.head.flops, 3 * T * fwd["head"], rel_tol=1e-12)
    assert math.isclose(sum(m.flops for m in costs.mtp), 3 * T * fwd["mtp"], rel_tol=1e-12)
    again = estimate_costs(config, 24, 2, recompute=True)
    assert math.isclose(sum(b.flops for b in again.blocks), 4 * T * layers, rel_tol=1e-12)
    assert again.head.flops == costs.head.flops  # the head is not checkpointed


#: Heads FlexAttention takes (at least FLEX_MIN_HEAD_DIM): attention's and MLA's (min(16 + 8, 16)).
WIDE_HEADS = dict(num_attention_heads=2, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)


@pytest.mark.parametrize("pattern", ["*", "+", "D"])
@pytest.mark.parametrize("wide", [True, False])
def test_attention_scores_are_counted_causally(pattern, wide):
    """Attention, MLA and DSA run FlexAttention over packed rows, which skips the key blocks above the diagonal: half
    the scores. With heads narrower than FlexAttention takes they train under a dense mask, which skips nothing. DSA's
    indexer scores half its keys at any head size (its kernel skips the key tiles after the diagonal), and without its
    loss has no backward."""
    config = tiny_config(pattern, **{**(MLA_TINY if pattern in "+D" else {}), **(WIDE_HEADS if wide else {})})
    assert config.resolved_head_dim == (16 if wide else 8)
    L = 64
    per_token = flops_per_token(config, L)[pattern]
    kind = "+" if pattern == "D" else pattern  # (DSA: MLA's attention, then the indexer)
    attention = config.replace(pattern=kind)
    core = flops_per_token(attention, L)[kind] - flops_per_token(attention, 0)[kind]
    indexer = flops_per_token(config, L)[pattern] - flops_per_token(config, 0)[pattern] - core
    assert (indexer > 0) == (pattern == "D")
    forward = per_token - (core / 2 if wide else 0) - indexer / 2
    # without its loss DSA's indexer (projections and scores) has no backward: forward once, backward twice the rest
    no_backward = per_token - flops_per_token(attention, L)[kind] - indexer / 2 if pattern == "D" else 0
    want = L * (3 * forward - 2 * no_backward)
    assert core > 0 and math.isclose(estimate_costs(config, L).blocks[0].flops, want, rel_tol=1e-12)
    if pattern == "D":  # with its loss the indexer has a backward as the rest, and the loss's own work
        with_loss = config.replace(dsa_indexer_loss_coeff=0.5)
        # (its checkpointed chunks score once more and compute two more products a score in the backward; the target
        # runs two causal passes over the attention's logits, in the forward and again in the backward)
        loss = 3 * indexer / 2 + 2 * 2 * DSA.target_flops_per_token(config, L) / 2
        want = 3 * L * forward + L * loss
        assert math.isclose(estimate_costs(with_loss, L).blocks[0].flops, want, rel_tol=1e-12)


@pytest.mark.parametrize("coeff", [0.0, 0.5])
@pytest.mark.parametrize("recompute", [False, True])
def test_dsa_index_scores_are_timed_as_float32_products(coeff, recompute):
    """DSA's index scores are float32 products, run as three TF32 products each (``tf32x3``): the estimate times them
    at a third of the TF32 peak, the rest of the layer at the bf16 one. Each forward scores once (twice under block
    recompute); with the loss the backward scores once more and computes four products a score (two kernels, each
    recomputing the products): two float32 ones (the ReLU's gates) and two TF32 ones (the gradients into q and k,
    which a bf16 model rounds to bf16). On an H100 (bench-1.3b's sizes, 4 x 4096) the float32 backward put a D layer
    at 2.7x MLA's time without the loss and 11.5x with it, measured 2.65x and 16.4x (docs/benchmarks.md, fifty-eighth
    session), where counting the scores at the bf16 peak put it at 1.35x and 2.0x."""
    config = tiny_config("D", **MLA_TINY, dsa_indexer_loss_coeff=coeff)
    L = 64
    h100 = HARDWARE["h100"]
    free = dataclasses.replace(h100, tf32_flops_per_s=math.inf)  # float32 products take no time
    core, no_scores = flops_per_token(config, L)["D"], flops_per_token(config, 0)["D"]
    mla = config.replace(pattern="+")
    scores = L * ((core - no_scores) - (flops_per_token(mla, L)["+"] - flops_per_token(mla, 0)["+"])) / 2
    runs, tf32_runs = (2 if recompute else 1) + (1 + 2 if coeff else 0), 2 if coeff else 0
    t, t_free = (estimate_costs(config, L, recompute=recompute, hardware=hw).blocks[0].time_s for hw in (h100, free))
    assert math.isclose(t - t_free, (runs * 3 + tf32_runs) * scores / 494.7e12, rel_tol=1e-9)
    assert h100.fp32_products_per_s == 494.7e12 / 3 and HARDWARE["a100"].fp32_products_per_s == 156e12 / 3


def test_checkpointed_activations_never_exceed_the_plain_ones():
    """Block-level checkpointing keeps each block's input, plus one block's activations while it is
    recomputed; that block's input is one tensor, not two."""
    for pattern in ("M-M-", "M-[*-]G-E", "*"):
        costs = estimate_costs(tiny_config(pattern), 64)
        n = len(costs.blocks)
        m = stage_memory(costs, 0, n, False, False)
        assert m["act_bytes_ckpt"] <= m["act_bytes"]
        if n > 1:
            assert m["act_bytes_ckpt"] < m["act_bytes"]


@pytest.mark.parametrize("tie", [False, True])
def test_parameters_add_up_to_the_model(tie):
    config = tiny_config("M-[*-]G-[ME]/[*-]/[*-]", tie_embeddings=tie)
    costs = estimate_costs(config, 16)
    total = float(HybridLM(config, device="meta").num_params())
    items = [*costs.blocks, costs.embedding, costs.head, *costs.mtp]
    assert sum(i.params for i in items) == total
    # Over stages, the last stage also holds the embedding (MTP needs it).
    n = len(costs.blocks)
    staged = stage_memory(costs, 0, 3, True, False)["params"] + stage_memory(costs, 3, n, False, True)["params"]
    assert staged == total + costs.shared_embedding_params > total


def test_checkpointing_keeps_less():
    costs = estimate_costs(ModelConfig.preset("nemotron-h-8b"), 4096)
    m = stage_memory(costs, 0, 10, True, False)
    assert m["act_bytes_ckpt"] < m["act_bytes"]
    assert m["state_bytes"] == m["params"] * 18 - 2 * costs.embedding.params  # (the embedding: no bf16 copy)


def test_presets_beat_the_even_split():
    for name in ("nemotron-h-8b", "nemotron-3-nano-30b-a3b"):
        plan = plan_pipeline(ModelConfig.preset(name), 4, seq_len=8192)
        out = plan.to_json()
        assert out["imbalance"] < out["even_split_imbalance"]
        assert len(out["block_costs"]) == 52
        total = sum(out["block_costs"]) + out["first_stage_extra_cost"] + out["last_stage_extra_cost"]
        assert math.isclose(sum(out["stage_costs"]), total, rel_tol=1e-9)
        c = plan.costs
        seg = segment_costs(c.block_times, plan.cuts, c.first_extra_s, c.last_extra_s)
        assert out["stage_costs"] == pytest.approx([t * 1e3 for t in seg])


def test_measured_times_replace_the_estimate():
    config = tiny_config("M-[*-]M-[*-]")
    plan = plan_pipeline(config, 2, seq_len=16, measure="cpu")
    assert plan.costs.source == "measured on cpu"
    t = plan.costs.block_times
    assert all(x > 0 for x in t)
    assert len(t) == 6 and t[0] == t[3] and t[1] == t[4] and t[2] == t[5]  # one timing per block kind


def test_measured_times_with_frozen_parameters_keep_the_estimates_share(monkeypatch):
    """Measurement trains every parameter of a block kind; with train.trainable each block's measured time is scaled
    by the estimate's share of it that the block runs: the frozen first block (no backward) costs its forward, the
    block that trains the measurement whole, rather than every block of a kind one time."""
    from hybridlm.plan import measure

    monkeypatch.setattr(measure, "measure_times", lambda *a, **k: {"M": 1.0, "-": 0.5, "embedding": 0.1, "head": 0.2})
    config = tiny_config("M-M-")
    names = trainable_names(HybridLM(config, device="meta"), config.parsed, "layers.2.*")
    plan = plan_pipeline(config, 2, seq_len=16, measure="cpu", trainable=names)
    everything, some = estimate_costs(config, 16), estimate_costs(config, 16, trainable=names)
    t = plan.costs.block_times
    share = [a.time_s / b.time_s for a, b in zip(some.blocks, everything.blocks)]
    assert t == pytest.approx([1.0 * share[0], 0.5 * share[1], 1.0, 0.5 * share[3]])
    assert share[0] < 0.5 and share[1] < 0.5 and share[2] == 1.0 and share[3] < 1.0
    assert plan_pipeline(config, 2, seq_len=16, measure="cpu").costs.block_times == [1.0, 0.5, 1.0, 0.5]


@pytest.mark.parametrize("recompute", [False, True])
def test_measured_blocks_recompute_as_training_does_mtp_depths_too(recompute, monkeypatch):
    from hybridlm import model as model_module
    from hybridlm.plan.measure import measure_times

    seen, forward = {}, model_module.Block.forward

    def spy(block, x, ctx):
        seen[block.symbols] = block.activation_checkpointing
        return forward(block, x, ctx)

    monkeypatch.setattr(model_module.Block, "forward", spy)
    measure_times(tiny_config("M-/[*-]"), 16, recompute=recompute, repeats=1)
    assert seen == {"M": recompute, "-": recompute, "*-": recompute}  # "*-": the MTP depth's block


def test_bad_requests():
    config = tiny_config("M-M-")
    with pytest.raises(UsageError, match="cannot place 6 pipeline stages"):
        plan_pipeline(config, 3, 2)
    with pytest.raises(UsageError, match="--pp must be a positive integer"):
        plan_pipeline(config, 0)
    with pytest.raises(UsageError, match="--hardware 'tpu'"):
        plan_pipeline(config, 2, hardware="tpu")


@pytest.mark.gpu
def test_measured_on_cuda():
    plan = plan_pipeline(ModelConfig.preset("tiny"), 2, seq_len=256, measure="cuda")
    assert plan.costs.source == "measured on cuda" and all(t > 0 for t in plan.costs.block_times)


def test_rank_costs_sum_each_ranks_interleaved_segments():
    """Guards against rank_costs taking segments r * vpp + v instead of Megatron's v * pp + r."""
    plan = plan_pipeline(tiny_config("M-[*-]G-E[ME]"), 2, 2, seq_len=16)
    seg = plan.stage_costs(plan.cuts)
    assert len(set(seg)) == 4
    want = [seg[0] + seg[2], seg[1] + seg[3]]
    assert plan.rank_costs(plan.cuts) == pytest.approx(want, rel=1e-12)
    assert plan.rank_costs((1, 2, 3)) == pytest.approx(
        [sum(plan.stage_costs((1, 2, 3))[i] for i in (r, r + 2)) for r in range(2)], rel=1e-12
    )
    assert [s.pp_rank for s in plan.stages] == [0, 1, 0, 1]


def test_planned_last_stage_holds_the_head_and_mtp():
    """Guards against the planned last stage's memory leaving out the head, MTP depths and shared embedding."""
    config = tiny_config("M-[*-]G-/[*-]")
    plan = plan_pipeline(config, 2, seq_len=16)
    c = plan.costs
    last = plan.stages[-1]
    assert last.memory == stage_memory(c, last.start, last.stop, False, True)
    blocks = sum(b.params for b in c.blocks[last.start : last.stop])
    assert last.memory["params"] == blocks + c.head.params + sum(m.params for m in c.mtp) + c.embedding.params
    total = float(HybridLM(config, device="meta").num_params())
    assert sum(s.memory["params"] for s in plan.stages) == total + c.shared_embedding_params


def test_rank_peak_memory_takes_the_mean_virtual_stage():
    """Guards against the interleaved peak multiplying the in-flight count by the sum, not the mean, of a
    rank's virtual stages' activations."""
    plan = plan_pipeline(tiny_config("M-[*-]G-E[ME]"), 2, 2, seq_len=16)
    ranks = plan.rank_memory()
    for r, m in enumerate(ranks):
        a, b = plan.stages[r].memory, plan.stages[r + 2].memory
        assert m["state_bytes"] == a["state_bytes"] + b["state_bytes"]
        n = 2 * (2 - r - 1) + (2 - 1) * 2 + 1  # interleaved 1F1B: 5 on rank 0, 3 on rank 1
        work = b["work_bytes"]  # the loss's logits chunk: the last stage's, on rank 1
        assert (work > 0) == (r == 1) and work == plan.costs.work_bytes * (r == 1)
        assert math.isclose(m["peak_bytes"], m["state_bytes"] + n * (a["act_bytes"] + b["act_bytes"]) / 2 + work)
        # Checkpointed: n micro-batches' inputs at the mean, one block recomputed (the rank's largest) once, or the
        # logits chunk, whichever is larger (one is live in a backward, the other in a forward).
        again = [recompute_bytes(plan.costs, s.start, s.stop) for s in (plan.stages[r], plan.stages[r + 2])]
        ckpt = (a["act_bytes_ckpt"] - again[0] + b["act_bytes_ckpt"] - again[1]) / 2
        assert math.isclose(m["peak_bytes_ckpt"], m["state_bytes"] + n * ckpt + max(*again, work))


def test_a_step_of_one_micro_batch_has_no_gradients_at_its_peak():
    """Gradients set to None before a step of one micro-batch are made as the backward frees activations: its
    peak (the end of the forward) lacks the fp32 gradients, 4 bytes a parameter (the state stays the same); the
    loss's logits chunk (4,096 tokens of bf16 logits at most) and its bf16 weight and input are the last stage's."""
    config = tiny_config("M-[*-]G-/*-", vocab_size=1000)
    plan = plan_pipeline(config, 1, seq_len=4096, micro_batch_size=2)
    H = config.hidden_size
    assert plan.costs.work_bytes == (4096 * 1000 + 1000 * H + 2 * 4096 * H) * 2  # logits chunk, weight, input
    params = float(HybridLM(config, device="meta").num_params())
    held, one = plan.rank_memory()[0], plan.rank_memory(grads_at_peak=False)[0]
    assert held["state_bytes"] == one["state_bytes"]
    for key in ("peak_bytes", "peak_bytes_ckpt"):
        assert math.isclose(held[key] - one[key], 4 * params)


def test_imbalance_is_the_slowest_stage_over_the_mean():
    """Guards against imbalance dividing by the fastest stage instead of the mean (docs: slowest / mean)."""
    assert imbalance([1.0, 2.0, 3.0]) == 1.5
    assert imbalance([2.0, 2.0]) == 1.0
    assert imbalance([0.0, 0.0]) == 1.0
    plan = plan_pipeline(tiny_config("M-[*-]G-E[ME]"), 3, seq_len=16)
    out = plan.to_json()
    seg = out["stage_costs"]
    assert math.isclose(out["imbalance"], max(seg) * len(seg) / sum(seg), rel_tol=1e-9)


def test_the_summary_claims_a_gain_only_where_the_plan_beats_the_even_split():
    """A model whose even split is already the best ("M-M-" cut in two) is reported as fast as it, not "1.000x
    faster"; a preset the planner rebalances states its gain."""
    even = plan_pipeline(tiny_config("M-M-"), 2, seq_len=16)
    assert max(even.stage_costs(even.cuts)) == max(even.stage_costs(even.even_cuts))
    assert (
        even.render().splitlines()[-1]
        == "slowest stage vs the even split: as fast (the even split is already balanced)"
    )
    better = plan_pipeline(ModelConfig.preset("nemotron-h-8b"), 4, seq_len=8192)
    assert re.fullmatch(r"slowest stage vs the even split: 1\.\d{3}x faster", better.render().splitlines()[-1])


@pytest.mark.parametrize("pattern, tie", [("M-M-", True), ("M-M-/-", False)])
def test_one_rank_holding_the_first_and_last_segment_holds_the_embedding_once(pattern, tie):
    """pp 1 x vpp 2: the one rank holds the embedding (segment 0) and the tied head / MTP depths (the last
    segment); the embedding those share is one tensor on that rank, so its state counts it once."""
    config = tiny_config(pattern, tie_embeddings=tie)
    plan = plan_pipeline(config, 1, 2, seq_len=16)
    total = float(HybridLM(config, device="meta").num_params())
    assert plan.costs.shared_embedding_params > 0
    uncopied = plan.costs.embedding.params + plan.costs.head.params  # no bf16 copy kept: 16 bytes, not 18
    assert plan.rank_memory()[0]["state_bytes"] == total * plan.costs.state_bytes_per_param - 2 * uncopied


def test_the_params_column_tells_small_stages_apart():
    """A tiny model's stages hold tens of thousands of parameters: '0.0M' / '0.1M' for all of them hid them."""
    plan = plan_pipeline(tiny_config("M-M-[*E]M-"), 2, seq_len=16)
    rows = [line.split() for line in plan.render().splitlines() if re.match(r"^[01]\s+[01]\s+0\s+\d+-\d+", line)]
    assert len(rows) == 2
    shown = [r[6] for r in rows]
    for s, text in zip(plan.stages, shown):
        assert not text.startswith("0."), shown
        assert math.isclose(float(text.rstrip("KMB")) * {"K": 1e3, "M": 1e6, "B": 1e9}[text[-1]],
                            s.memory["params"], rel_tol=0.005)  # fmt: skip


@pytest.mark.parametrize(
    "n, shown",
    [(999, "1.0K"), (999_949, "999.9K"), (999_999, "1.0M"), (1_000_000, "1.0M"), (999_999_999, "1.00B")],
)
def test_a_count_just_below_a_unit_reads_in_that_unit(n, shown):
    """The unit was chosen on the exact count, then rounded: 999,999 parameters read "1000.0K"."""
    assert _count(n) == shown


def test_a_checkpointed_rank_recomputes_one_block_at_a_time_not_one_per_micro_batch_in_flight():
    """Guards against the checkpointed 1F1B peak counting the recomputed block's activations once per micro-batch
    in flight (pp - rank of them): only the micro-batch in its backward recomputes (7 GiB too many on rank 0 of
    nemotron-h-8b at pp 8, 8k tokens)."""
    plan = plan_pipeline(tiny_config("M-M-[*-]G-M-E-"), 4, seq_len=32)
    c = plan.costs
    for r, m in enumerate(plan.rank_memory()):
        blocks = c.blocks[plan.stages[r].start : plan.stages[r].stop]
        inputs = sum(b.ckpt_bytes for b in blocks)  # kept by every micro-batch in flight
        if r == 3:
            inputs += c.head.ckpt_bytes
        largest = max(b.act_bytes - b.ckpt_bytes for b in blocks)  # held by the one in its backward
        assert math.isclose(m["peak_bytes_ckpt"], m["state_bytes"] + (4 - r) * inputs + largest, rel_tol=1e-12)


def test_measured_head_runs_the_loss_training_runs(monkeypatch):
    """Guards against --measure timing the head and the MTP depth through full (B, L, V) float32 logits and
    cross entropy, where training runs the chunked head_loss (another kernel, another time, and memory that
    at 8k tokens of a 131k vocabulary per micro-batch row can fail where training fits)."""
    from hybridlm import model as model_module
    from hybridlm.plan.measure import measure_times

    calls, head_loss = [], model_module.HybridLM.head_loss

    def spy(model, h, labels):
        calls.append(tuple(h.shape))
        return head_loss(model, h, labels)

    monkeypatch.setattr(model_module.HybridLM, "head_loss", spy)
    monkeypatch.setattr(model_module.HybridLM, "head", lambda *a: pytest.fail("full logits timed"))
    measure_times(tiny_config("M-/[*-]"), 16, repeats=1)
    assert len(calls) == 2 * 2  # head and MTP depth: a warm-up and one timed call each


@pytest.mark.parametrize("seed", range(8))
def test_stage_and_rank_parameters_are_those_of_the_built_stages(seed):
    """Each planned stage's parameters, and each rank's state, are what the pipeline builds for that stage and
    rank (MTP and a tied head keep the embedding on the last stage; one rank with both ends holds it once)."""
    from hybridlm.parallel.pipeline import build_pipeline_model, build_stage
    from tests.helpers import random_config

    rng = random.Random(seed)
    config = random_config(rng, random_pattern(rng, max_blocks=8, pipes=False, sequence=rng.choice(["MG*", "MG+D"])))
    n = config.parsed.num_blocks
    pp = rng.randint(1, min(n, 3))
    vpp = rng.randint(1, n // pp)
    plan = plan_pipeline(config, pp, vpp, seq_len=16)
    planned = config.replace(pattern=str(plan.pattern))
    for s in plan.stages:
        stage = build_stage(planned, s.pp_rank, pp, s.vp_stage if pp * vpp > 1 else None, device="meta")
        assert s.memory["params"] == sum(t.numel() for t in stage.parameters())
    uncopied = ("embeddings.weight", "norm_f.weight", "lm_head.weight")  # no bf16 copy kept: 16 bytes, not 18
    for r, m in enumerate(plan.rank_memory()):
        rank, _ = build_pipeline_model(planned, r, pp)
        params = dict(rank.named_parameters())
        # DSA's indexer without its loss gets no gradient and no optimizer state: 6 bytes, not 18
        gradless = (
            sum(t.numel() for k, t in params.items() if ".indexer." in k) if not config.dsa_indexer_loss_coeff else 0
        )
        assert (
            m["state_bytes"]
            == 18 * sum(t.numel() for t in params.values())
            - 2 * sum(params[k].numel() for k in uncopied if k in params)
            - 12 * gradless
        )


def test_measured_blocks_see_document_ids_as_training_gives_them(monkeypatch):
    """Guards against --measure timing every block without document ids, which training always passes: MLA
    then took the plain causal kernel instead of its dense document mask, attention SDPA instead of FlexAttention
    on CUDA, and the planner balanced times of kernels that training does not run."""
    from hybridlm import model as model_module
    from hybridlm.plan.measure import measure_times

    seen, forward = [], model_module.Block.forward

    def spy(block, x, ctx):
        seen.append(ctx.seq_idx is not None and ctx.attention_mask() is not None)
        return forward(block, x, ctx)

    monkeypatch.setattr(model_module.Block, "forward", spy)
    measure_times(tiny_config("M+-/[+-]", **MLA_TINY), 16, repeats=1)
    assert seen and all(seen)


def test_measure_refuses_a_micro_batch_of_exactly_2_63_elements(monkeypatch):
    """The largest tensor holds 2**63 - 1 elements: 1 x 2**58 tokens of hidden size 32 (2**63) is one too many."""
    import hybridlm.plan.measure as measure

    def measured(*args, **kwargs):
        raise AssertionError("measured a micro-batch no tensor holds")

    monkeypatch.setattr(measure, "measure_times", measured)
    config = tiny_config("M-M-")
    assert config.hidden_size == 32
    with pytest.raises(UsageError, match=r"^--measure: micro-batches of 1 x 288230376151711744 tokens"):
        plan_pipeline(config, 2, seq_len=2**58, measure="cpu")


def test_an_even_split_megatron_refuses_is_labelled_as_rounded():
    """5 blocks over 2 stages: Megatron's split by block count refuses it, but the plan compared with an "even
    split" without a word, as if Megatron could run it."""
    rounded = plan_pipeline(tiny_config("M-|M-M"), 2, seq_len=16).render()  # its own '|' is compared too
    assert "even split (rounded)" in rounded
    assert "5 blocks do not divide into 2 stages, which Megatron's split by block count refuses" in rounded
    even = plan_pipeline(tiny_config("M-M-"), 2, seq_len=16).render()
    assert "rounded" not in even and "refuses" not in even


def test_float8_moves_the_cut_toward_the_head_which_stays_in_bf16():
    """bench-1.3b on two ranks: float8 speeds the blocks' linear layers, not the head (output projection and loss),
    so the last stage, which holds the head, takes fewer blocks than without."""
    config = ModelConfig.preset("bench-1.3b")
    plain = plan_pipeline(config, 2, seq_len=4096, micro_batch_size=4)
    f8 = plan_pipeline(config, 2, seq_len=4096, micro_batch_size=4, float8="tensorwise")
    assert f8.to_json()["float8"] == "tensorwise" and plain.to_json()["float8"] == "none"
    assert f8.cuts[0] > plain.cuts[0]
    assert max(f8.stage_costs(f8.cuts)) < max(plain.stage_costs(plain.cuts))
    assert "float8 tensorwise" in f8.render().splitlines()[0] and "float8" not in plain.render().splitlines()[0]


def test_float8_measured_times_come_from_torchaos_layers(monkeypatch):
    pytest.importorskip("torchao")
    from hybridlm.plan import measure

    swapped, real = [], measure.apply_float8

    def recording(model, recipe, auto_filter=False):
        swapped.append((recipe, real(model, recipe, auto_filter)))
        return swapped[-1][1]

    monkeypatch.setattr(measure, "apply_float8", recording)
    config = tiny_config("M-[*-]M-[*-]")
    plan = plan_pipeline(config, 2, seq_len=16, measure="cpu", float8="rowwise")
    assert plan.costs.source == "measured on cpu" and plan.costs.float8 == "rowwise"
    assert all(t > 0 for t in plan.costs.block_times)
    ((recipe, names),) = swapped
    assert recipe == "rowwise" and any(".mixer.q_proj" in n for n in names)
    # Measured times, estimated memory: float8's (what compiled float8 blocks keep), whatever --hardware's roofline.
    estimated = plan_pipeline(config, 2, seq_len=16, float8="rowwise")
    for hardware in ("h100", "a100"):
        measured = plan_pipeline(config, 2, seq_len=16, measure="cpu", float8="rowwise", hardware=hardware)
        assert measured.rank_memory() == estimated.rank_memory() != plan_pipeline(config, 2, seq_len=16).rank_memory()


def test_float8_auto_filter_keeps_the_small_layers_at_the_bf16_peak():
    """train.float8_auto_filter: rowwise leaves bench-1.3b's out-projections, MLP down-projections and QKV in bf16,
    so its blocks' estimate falls between bf16's and every layer's in float8; said in the JSON and the header."""
    config = ModelConfig.preset("bench-1.3b")
    runs = {
        name: plan_pipeline(config, 2, seq_len=4096, micro_batch_size=4, **kwargs)
        for name, kwargs in (
            ("bf16", {}),
            ("all", dict(float8="rowwise")),
            ("filtered", dict(float8="rowwise", float8_auto_filter=True)),
        )
    }
    total = {name: sum(p.costs.block_times) for name, p in runs.items()}
    assert total["all"] < total["filtered"] < total["bf16"]
    assert (
        runs["filtered"].to_json()["float8_auto_filter"] is True
        and runs["all"].to_json()["float8_auto_filter"] is False
    )
    assert "float8 rowwise (small layers left out)" in runs["filtered"].render().splitlines()[0]
    # Without float8 the filter means nothing, and is not reported.
    plain = plan_pipeline(config, 2, seq_len=4096, micro_batch_size=4, float8_auto_filter=True)
    assert plain.to_json()["float8_auto_filter"] is False and plain.costs.block_times == runs["bf16"].costs.block_times


def test_float8_auto_filter_refuses_a_model_whose_layers_are_all_too_small():
    with pytest.raises(UsageError, match=r"--float8 tensorwise: every linear layer in the blocks is too small .*"):
        plan_pipeline(tiny_config("M-*-"), 2, seq_len=16, float8="tensorwise", float8_auto_filter=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(float8="fp8"), "--float8 'fp8' is not one of none, tensorwise, rowwise"),
        (
            dict(float8="tensorwise", hardware="a100"),
            "the A100 SXM 80GB has no float8 matmuls; estimate for h100 or h200",
        ),
    ],
)
def test_float8_plans_that_cannot_be_made_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        plan_pipeline(tiny_config("M-*-"), 2, seq_len=16, **kwargs)


def test_float8_with_no_linear_layer_to_convert_is_refused_as_training_refuses_it():
    config = tiny_config("M-", hidden_size=24, mamba_num_groups=1)
    with pytest.raises(UsageError, match="no linear layer in the blocks has both dimensions multiples of 16"):
        plan_pipeline(config, 1, seq_len=16, float8="tensorwise")


def test_float8_measurement_without_torchao_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(UsageError, match=r"--float8 tensorwise: float8 training needs torchao .*pip install torchao"):
        plan_pipeline(tiny_config("M-*-"), 2, seq_len=16, measure="cpu", float8="tensorwise")
