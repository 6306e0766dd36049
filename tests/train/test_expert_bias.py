"""The expert-bias update as an optimizer pre-step hook: counted once per real forward, summed over
micro-batches, applied once per step; auxiliary losses counted once under activation checkpointing."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.layers import MoE
from hybridlm.parallel.execution import apply_activation_checkpointing
from hybridlm.train.optim import ExpertBiasHook
from tests.helpers import MLA_TINY, tiny_config

#: Fused blocks and an MTP depth, each with a MoE layer.
PATTERN = "M-[*E]E/[*E]"
RATE = 0.01


def moe_config(**overrides):
    return tiny_config(PATTERN, moe_router_expert_bias=True, moe_aux_loss_coeff=0.01, **overrides)


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def step(model, batches, skip=False):
    """Forward and backward over ``batches`` (micro-batches of ids), then one SGD step with the hook."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hook = ExpertBiasHook(opt, model, RATE)
    for ids in batches:
        model(ids, torch.roll(ids, -1, 1), return_logits=False).loss.backward()
    counts = [m.tokens_per_expert.clone() for m in moe_layers(model)]
    if skip:
        hook.reset()
    else:
        opt.step()
    hook.remove()
    return counts


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_counts_each_routed_token_once(policy):
    ids = torch.randint(0, 97, (2, 13))
    plain = step(HybridLM(moe_config(), seed=1), [ids], skip=True)
    ac = step(apply_activation_checkpointing(HybridLM(moe_config(), seed=1), policy), [ids], skip=True)
    routed = ids.numel() * moe_config().moe_top_k
    assert len(plain) == 3  # a plain block, a fused block, the MTP depth's fused block
    for a, b in zip(plain, ac):
        assert torch.equal(a, b) and a.sum() == routed


def test_model_itself_counts_nothing_and_eval_is_not_counted():
    model = HybridLM(moe_config(), seed=1)
    ids = torch.randint(0, 97, (2, 9))
    model(ids, ids).loss.backward()  # no hook: the model keeps no training statistics
    assert all(m.tokens_per_expert.sum() == 0 for m in moe_layers(model))
    hook = ExpertBiasHook(torch.optim.SGD(model.parameters(), lr=0.0), model, RATE)
    model.eval()
    with torch.no_grad():
        model(ids)
    assert all(m.tokens_per_expert.sum() == 0 for m in moe_layers(model))
    hook.remove()


def test_bias_update_follows_the_counts_and_resets_them():
    model = HybridLM(moe_config(), seed=3)
    before = [m.gate.e_score_correction_bias.clone() for m in moe_layers(model)]
    counts = step(model, [torch.randint(0, 97, (2, 11))])
    for m, b, c in zip(moe_layers(model), before, counts):
        c = c.double()  # integer counts
        expected = b + RATE * torch.sign(c.mean() - c).float()
        assert torch.equal(m.gate.e_score_correction_bias, expected)
        assert m.tokens_per_expert.sum() == 0


def test_gradient_accumulation_gives_the_one_batch_update():
    ids = torch.randint(0, 97, (4, 11))
    whole, micro = HybridLM(moe_config(), seed=4), HybridLM(moe_config(), seed=4)
    cw = step(whole, [ids])
    cm = step(micro, [ids[:2], ids[2:]])
    for a, b in zip(cw, cm):
        assert torch.equal(a, b) and a.sum() == ids.numel() * 2
    for a, b in zip(moe_layers(whole), moe_layers(micro)):
        assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in moe_layers(whole))


def test_skipped_step_drops_its_counts_and_keeps_the_bias():
    model = HybridLM(moe_config(), seed=5)
    before = [m.gate.e_score_correction_bias.clone() for m in moe_layers(model)]
    step(model, [torch.randint(0, 97, (2, 9))], skip=True)
    for m, b in zip(moe_layers(model), before):
        assert torch.equal(m.gate.e_score_correction_bias, b) and m.tokens_per_expert.sum() == 0


@pytest.mark.parametrize(
    "pattern, overrides",
    [
        (PATTERN, {"moe_aux_loss_coeff": 0.01}),
        ("M-[DE]+/[D-]", {**MLA_TINY, "dsa_indexer_loss_coeff": 0.1}),
    ],
)
def test_aux_loss_and_its_gradient_are_the_same_under_activation_checkpointing(pattern, overrides):
    config = tiny_config(pattern, **overrides)
    ids = torch.randint(0, 97, (2, 13))
    results = []
    for ac in (False, True):
        model = HybridLM(config, seed=6)
        if ac:
            apply_activation_checkpointing(model)
        out = model(ids, torch.roll(ids, -1, 1), return_logits=False)
        params = [p for _, p in model.named_parameters()]
        grads = torch.autograd.grad(out.aux_loss, params, allow_unused=True, retain_graph=True)
        results.append((out.aux_loss.detach(), out.loss.detach(), grads))
    (aux_a, loss_a, ga), (aux_b, loss_b, gb) = results
    assert aux_a > 0 and torch.equal(aux_a, aux_b) and torch.equal(loss_a, loss_b)
    assert any(g is not None and g.abs().sum() > 0 for g in ga)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y))


def test_a_step_without_forwards_does_nothing(monkeypatch):
    """``torch.distributed.checkpoint`` steps the optimizer to create its state: no update, no collective."""
    model = HybridLM(moe_config(), seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hook = ExpertBiasHook(opt, model, RATE)
    for m in moe_layers(model):
        m.tokens_per_expert.fill_(1.0)  # stale counts of no forward this step
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: pytest.fail("a collective was started"))
    opt.step()
    assert all(m.gate.e_score_correction_bias.abs().sum() == 0 for m in moe_layers(model))
    hook.remove()


@pytest.mark.slow
def test_compiled_checkpointed_blocks_count_once_and_keep_the_aux_loss():
    from hybridlm.parallel.execution import compile_blocks

    ids = torch.randint(0, 97, (2, 13))
    eager = HybridLM(moe_config(), seed=8)
    compiled = compile_blocks(apply_activation_checkpointing(HybridLM(moe_config(), seed=8)))
    losses = []
    for model in (eager, compiled):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        hook = ExpertBiasHook(opt, model, RATE)
        out = model(ids, torch.roll(ids, -1, 1), return_logits=False)
        out.loss.backward()
        losses.append(out.aux_loss.detach())
        assert all(m.tokens_per_expert.sum() == ids.numel() * 2 for m in moe_layers(model))
        hook.remove()
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)


def test_counts_stay_exact_in_a_model_moved_to_bfloat16():
    """The counts were a float buffer: ``model.to(torch.bfloat16)`` made them bf16, which stops adding ones at
    256 (and float32 at 2^24)."""
    model = HybridLM(moe_config(), seed=4).to(torch.bfloat16)
    ids = torch.randint(0, 97, (3, 171), generator=torch.Generator().manual_seed(0))
    chosen = {}  # MoE layer -> the experts its router chose, (T, k)
    for m in moe_layers(model):
        m.gate.register_forward_hook(lambda router, args, out, m=m: chosen.__setitem__(m, out[2]))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hook = ExpertBiasHook(opt, model, RATE)
    with torch.no_grad():
        model(ids)
    for m in moe_layers(model):
        expected = torch.bincount(chosen[m].reshape(-1), minlength=m.config.moe_num_experts)
        assert expected.max() > 256 and m.tokens_per_expert.tolist() == expected.tolist()
    hook.remove()
