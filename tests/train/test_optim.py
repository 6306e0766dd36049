"""AdamW parameter groups and the learning-rate schedules."""

import itertools
import math

import pytest

from hybridlm import HybridLM
from hybridlm.train.config import OptimConfig
from hybridlm.train.optim import build_optimizer, lr_factor
from tests.helpers import tiny_config


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
