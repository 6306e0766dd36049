"""Tokens routed to each expert in one step (``ExpertLoad``): the counts behind the expert-bias update and the
``moe_load_imbalance`` metric; exact against hand counts, once under activation checkpointing, summed over
micro-batches."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.layers import MoE
from hybridlm.parallel.execution import apply_activation_checkpointing
from hybridlm.pattern import parse
from hybridlm.train.expert_load import ExpertLoad, layer_key, moe_layer_keys
from tests.helpers import tiny_config

#: Token v's two experts (top_k = 2 of 4): expert 0 takes 3 tokens, 1 and 2 two, 3 one.
CHOICES = [(0, 1), (0, 2), (0, 3), (1, 2)]


def steered_model() -> HybridLM:
    """One MoE layer whose router sends token v to the experts of CHOICES[v]: its logits are the first 4 channels
    of the normed embedding (the norm scales a row, keeping its order), 3 and 2 at the chosen experts, -1 else."""
    model = HybridLM(tiny_config("E", moe_router_score="sigmoid"), seed=0)
    moe = model.blocks["0"].layers[0].mixer
    with torch.no_grad():
        model.embeddings.weight.zero_()
        for v, (a, b) in enumerate(CHOICES):
            model.embeddings.weight[v, :4] = -1.0
            model.embeddings.weight[v, a], model.embeddings.weight[v, b] = 3.0, 2.0
        moe.gate.weight.zero_()
        moe.gate.weight[:, :4] = torch.eye(4)
    return model


def test_imbalance_is_the_largest_count_over_the_mean_counted_by_hand():
    model = steered_model()
    load = ExpertLoad(model)
    ids = torch.tensor([[0, 1, 2, 3]])
    model(ids, ids).loss.backward()
    assert load.keys == ["layer_0"] and load.pending
    assert load.layers[0].tokens_per_expert.tolist() == [3, 2, 2, 1]
    assert load.imbalance().tolist() == [1.5]  # 3 / mean(3, 2, 2, 1)
    load.reset()
    model(torch.tensor([[0, 0, 0, 0]]), ids).loss.backward()  # experts 0 and 1 only: 4 / (8 / 4)
    assert load.imbalance().tolist() == [2.0]
    load.remove()


def test_counts_are_the_routers_top_k_choices_in_every_moe_layer():
    """Fused blocks and an MTP depth: each layer's counts are what its router chose, top_k per input token."""
    model = HybridLM(tiny_config("M-[*E]E/[*E]"), seed=2)
    chosen: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, MoE):
            m.gate.register_forward_hook(lambda r, a, out, m=m: chosen.__setitem__(id(m), out[2]))
    load = ExpertLoad(model)
    ids = torch.randint(0, 97, (2, 13))
    model(ids, torch.roll(ids, -1, 1)).loss.backward()
    assert load.keys == ["layer_3", "layer_4", "mtp_0_layer_1"]
    for m, ratio in zip(load.layers, load.imbalance().tolist()):
        counts = torch.bincount(chosen[id(m)].reshape(-1), minlength=4)
        assert torch.equal(m.tokens_per_expert, counts) and counts.sum() == ids.numel() * 2
        assert ratio == (counts.max() / counts.double().mean()).item() and ratio > 1.0
    load.remove()


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_and_micro_batches_give_the_same_imbalance(policy):
    ids = torch.randint(0, 97, (4, 11))
    results = []
    for ac, parts in ((False, [ids]), (True, [ids]), (False, [ids[:2], ids[2:]])):
        model = HybridLM(tiny_config("M-[*E]E/[*E]"), seed=3)
        if ac:
            apply_activation_checkpointing(model, policy)
        load = ExpertLoad(model)
        for part in parts:
            model(part, torch.roll(part, -1, 1)).loss.backward()
        results.append(load.imbalance())
        load.remove()
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_evaluation_is_not_counted_and_a_step_without_forwards_reduces_nothing(monkeypatch):
    model = HybridLM(tiny_config("E-"), seed=4)
    load = ExpertLoad(model)
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 9)))
    assert not load.pending and load.layers[0].tokens_per_expert.sum() == 0
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: pytest.fail("a collective was started"))
    load.reduce()
    load.remove()


def test_a_model_without_moe_layers_has_none():
    model = HybridLM(tiny_config("M-*"), seed=5)
    load = ExpertLoad(model)
    assert load.layers == [] and load.keys == [] and load.imbalance().numel() == 0
    assert moe_layer_keys(parse("M-*")) == []


def test_layer_keys_are_canonical_whatever_the_wrappers():
    p = parse("[ME]-E|E/[*E]/[*E]")
    assert moe_layer_keys(p) == ["layer_1", "layer_3", "layer_4", "mtp_0_layer_1", "mtp_1_layer_1"]
    assert layer_key("blocks.2.layers.0.mixer", p) == "layer_3"
    assert layer_key("blocks.0._checkpoint_wrapped_module.layers.1.mixer", p) == "layer_1"
    assert layer_key("mtp.1.blocks.0.layers.1.mixer", p) == "mtp_1_layer_1"


def test_compiled_blocks_count_inside_their_graph(monkeypatch):
    """The counting hook is traced into a compiled block's graph. It was ``torch.compiler.disable``d, which split
    the graph at every router: on an H200 the trainer of a small MoE model (``M-[*E]M-M-[*E]``, CUDA graphs) ran at
    140–180k tokens/s against 205–225k without the hook. Under activation checkpointing torch's checkpoint region
    refuses the buffer update and runs as before; the eager hook skips the recomputation then (tested above)."""
    from torch._dynamo.utils import counters

    from hybridlm.layers.moe import Experts

    # The sync-free expert path, as grouped_mm is on CUDA (the CPU loop needs the counts on the host: its own break).
    monkeypatch.setattr(Experts, "forward", lambda self, xs, counts: self.dense(xs, counts))
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    counts = []
    for compiled in (False, True):
        model = HybridLM(tiny_config("M-[*E]E", moe_router_expert_bias=True), seed=8)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            for block in model.blocks.values():
                block.compile(backend="eager")  # dynamo's graphs, no code generation: the breaks are the same
        load = ExpertLoad(model)
        for _ in range(2):  # two micro-batches add up
            model(ids, torch.roll(ids, -1, 1), return_logits=False).loss.backward()
        counts.append([m.tokens_per_expert.tolist() for m in load.layers])
        load.remove()
    assert not counters["graph_break"], list(counters["graph_break"])
    assert counts[0] == counts[1] and [sum(c) for c in counts[1]] == [2 * ids.numel() * 2] * 2
