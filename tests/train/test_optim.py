"""AdamW parameter groups and the learning-rate schedules."""

import itertools
import math

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.checkpoint.canonical import canonical_name, to_canonical
from hybridlm.checkpoint.megatron import to_megatron
from hybridlm.train.config import OptimConfig
from hybridlm.train.optim import build_optimizer, lr_factor, qk_norm_names, qk_norm_symbols
from tests.helpers import MLA_TINY, tiny_config


def test_no_weight_decay_on_norms_biases_and_ssm_scalars():
    model = HybridLM(tiny_config("M[*-]G"))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    kept = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[1]["weight_decay"] == 0.0
    for n in kept:
        assert n.endswith(("norm.weight", ".bias", "A_log", ".D", "dt_bias", "norm_f.weight")), n
    assert any(n.endswith("conv1d.bias") for n in kept) and any(n.endswith("A_log") for n in kept)
    assert all(n.endswith("weight") or n.endswith(("up_proj", "down_proj")) for n in decayed)
    assert "blocks.0.layers.0.mixer.in_proj.weight" in decayed and "embeddings.weight" in decayed
    assert len(decayed) + len(kept) == len(list(model.parameters()))


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup
    if schedule == "constant":
        assert all(x == 1.0 for x in f[10:])
    elif schedule == "cosine":
        assert all(a >= b for a, b in itertools.pairwise(f[10:])) and f[99] == pytest.approx(0.1, abs=1e-3)
    else:
        assert all(x == 1.0 for x in f[10:80]) and f[99] == pytest.approx(0.1)
        assert all(a > b for a, b in itertools.pairwise(f[80:]))


def test_every_one_dimensional_weight_is_left_undecayed():
    """Norm weights are kept out of weight decay by their shape (1-D), whatever their name: decaying them
    pulled every RMSNorm scale towards 0."""
    model = HybridLM(tiny_config("M[*-]G"))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    flat = {n for n, p in model.named_parameters() if p.dim() < 2}
    assert "norm_f.weight" in flat and any(n.endswith("norm.weight") and n != "norm_f.weight" for n in flat)
    assert flat <= kept, sorted(flat - kept)


def test_wsd_decays_linearly_from_its_first_decay_step_to_the_floor_at_the_last():
    """WSD over the last ``decay_fraction`` of the steps: step 80 of 100 (decay_fraction 0.2) is already below
    optim.lr and step 99 is at the floor; cosine reaches its floor one step after the last."""
    cfg = OptimConfig(schedule="wsd", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_factor(79, 100, cfg) == 1.0
    for s in range(80, 100):
        assert lr_factor(s, 100, cfg) == pytest.approx(1.0 - 0.9 * (s - 79) / 20, rel=1e-12), s
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    for s in (10, 40, 99, 100):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
        assert lr_factor(s, 100, cfg) == pytest.approx(want, rel=1e-12), s


#: (pattern, config fields, the symbols holding them, the parameters optim.apply_wd_to_qk_layernorm decays): attention's q/k norms (main stack
#: and MTP depth, fused or not), DSA's query latent norm; not MLA's latent norms, DSA's kv latent norm or its indexer's
#: k_norm (Megatron's names for them match no "q_layernorm." / "k_layernorm.").
QK_CASES = [
    (
        "M[*-]G/*-",
        {"qk_norm": True},
        ["*"],
        {
            "blocks.1.layers.0.mixer.q_norm.weight",
            "blocks.1.layers.0.mixer.k_norm.weight",
            "mtp.0.blocks.0.layers.0.mixer.q_norm.weight",
            "mtp.0.blocks.0.layers.0.mixer.k_norm.weight",
        },
    ),
    ("[*E]*-", {}, [], set()),  # qk_norm off: attention has no q/k norms
    (
        "+-[DE]/D-",
        MLA_TINY,
        ["D"],
        {"blocks.2.layers.0.mixer.q_a_layernorm.weight", "mtp.0.blocks.0.layers.0.mixer.q_a_layernorm.weight"},
    ),
    ("+-M", MLA_TINY, [], set()),
]


def _groups(model, cfg):
    """(decayed names, undecayed names) of the optimizer :func:`build_optimizer` makes for ``model``."""
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    split = {True: set(), False: set()}
    for g in opt.param_groups:
        split[g["weight_decay"] > 0] |= {names[id(p)] for p in g["params"]}
    return split[True], split[False]


@pytest.mark.parametrize("pattern, fields, symbols, expected", QK_CASES)
def test_apply_wd_to_qk_layernorm_moves_exactly_the_qk_norm_weights_into_the_decayed_group(
    pattern, fields, symbols, expected
):
    model = HybridLM(tiny_config(pattern, **fields))
    assert qk_norm_names(model) == expected and qk_norm_symbols(model.config) == symbols
    decayed, kept = _groups(model, OptimConfig(weight_decay=0.1))
    assert not expected & decayed and expected <= kept  # off (the default): no 1-D parameter is decayed
    decayed_on, kept_on = _groups(model, OptimConfig(weight_decay=0.1, apply_wd_to_qk_layernorm=True))
    assert decayed_on == decayed | expected and kept_on == kept - expected


def test_the_decayed_qk_norms_are_those_megatrons_name_match_finds_in_the_megatron_export():
    """Megatron-LM decays a 1-D parameter or bias under apply_wd_to_qk_layernorm where its name holds
    "q_layernorm." or "k_layernorm." (megatron/core/optimizer get_standard_config_overrides): applied to the
    names the Megatron export gives our tensors, it finds exactly ours."""
    for pattern, fields, _, _ in QK_CASES:
        config = tiny_config(pattern, **fields)
        model = HybridLM(config)
        canonical = to_canonical(model.state_dict(), config.parsed)
        ids = {}  # each 1-D tensor filled with a number of its own, found again on the Megatron side
        for i, (name, t) in enumerate(canonical.items()):
            if t.dim() == 1:
                canonical[name] = torch.full_like(t, i + 2)
                ids[i + 2] = name
        megatron = to_megatron(config, canonical)
        matched = {
            ids[int(t[0])]
            for name, t in megatron.items()
            if (t.dim() == 1 or name.endswith(".bias")) and ("q_layernorm." in name or "k_layernorm." in name)
        }
        assert matched == {canonical_name(n, config.parsed) for n in qk_norm_names(model)}, pattern


def test_an_optimizer_step_decays_the_qk_norm_weights_by_lr_wd_w_and_no_other_norm():
    """Zero gradients: AdamW's update is then its decay alone, w - lr * wd * w, on the decayed parameters."""
    model = HybridLM(tiny_config("[*-]M/*-", qk_norm=True, norm_zero_centered=True))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)  # zero-centred norms start at 0, which decay leaves at 0
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.1, 0.2
    build_optimizer(model, OptimConfig(lr=lr, weight_decay=wd, apply_wd_to_qk_layernorm=True)).step()
    qk = qk_norm_names(model)
    assert len(qk) == 4
    for n, p in model.named_parameters():
        if n in qk:
            torch.testing.assert_close(p.detach(), before[n] - lr * wd * before[n])
        elif p.dim() == 1:  # every other norm weight, and the biases
            assert torch.equal(p.detach(), before[n]), n
