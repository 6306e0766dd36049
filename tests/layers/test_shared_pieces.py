"""Pieces two mixers share (causal conv, dt initialization), and GDN reading its own dt fields."""

import math

import pytest
import torch

from hybridlm import ConfigError, ModelConfig
from hybridlm.layers import gdn as gdn_module
from hybridlm.layers.gdn import GatedDeltaNet
from hybridlm.layers.init import dt_bias_init

BASE = dict(pattern="G", vocab_size=32, hidden_size=64, gdn_num_heads=2, gdn_num_value_heads=4, gdn_head_dim=16)


def _init(cfg: ModelConfig, seed: int = 5) -> dict[str, torch.Tensor]:
    layer = GatedDeltaNet(cfg)
    layer.init_weights(torch.Generator().manual_seed(seed), 0.02, 0.01)
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def test_gdn_init_is_bitwise_what_it_was_with_the_mamba_fields(monkeypatch):
    cfg = ModelConfig(**BASE)
    new = _init(cfg)

    def as_before(n, dt_min, dt_max, floor, gen, device):  # GDN used to pass the mamba_dt_* fields
        return dt_bias_init(n, cfg.mamba_dt_min, cfg.mamba_dt_max, cfg.mamba_dt_init_floor, gen, device)

    monkeypatch.setattr(gdn_module, "dt_bias_init", as_before)
    old = _init(cfg)
    assert new.keys() == old.keys()
    for k in new:
        assert torch.equal(new[k], old[k]), k


def test_gdn_dt_init_reads_its_own_fields():
    base = _init(ModelConfig(**BASE))
    # The Mamba fields no longer move GDN's initialization ...
    other_mamba = _init(ModelConfig(**BASE, mamba_dt_min=0.01, mamba_dt_max=0.5, mamba_dt_init_floor=0.02))
    assert all(torch.equal(base[k], other_mamba[k]) for k in base)
    # ... its own do: a one-point range gives softplus(dt_bias) == that point for every head.
    fixed = _init(ModelConfig(**BASE, gdn_dt_min=0.05, gdn_dt_max=0.05))
    torch.testing.assert_close(torch.nn.functional.softplus(fixed["dt_bias"]), torch.full((4,), 0.05))
    floored = _init(ModelConfig(**BASE, gdn_dt_min=0.01, gdn_dt_max=0.02, gdn_dt_init_floor=0.03))
    torch.testing.assert_close(torch.nn.functional.softplus(floored["dt_bias"]), torch.full((4,), 0.03))
    assert math.isclose(ModelConfig.gdn_dt_min, ModelConfig.mamba_dt_min)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"gdn_dt_min": 0.0}, "gdn_dt_min"),
        ({"gdn_dt_max": -1.0}, "gdn_dt_max"),
        ({"gdn_dt_min": 0.5}, "gdn_dt_min"),
        ({"gdn_dt_init_floor": -1e-4}, "gdn_dt_init_floor"),
        ({"pattern": "M", "mamba_num_groups": 1, "mamba_dt_init_floor": -1e-4}, "mamba_dt_init_floor"),
        ({"pattern": "M", "mamba_num_groups": 1, "mamba_dt_clamp_min": -1.0}, "mamba_dt_clamp_min"),
    ],
)
def test_dt_fields_are_validated_by_name(changes, field):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**BASE, **changes})
    assert info.value.field == field


def test_dt_fields_of_an_unused_mixer_are_not_checked():
    ModelConfig(**{**BASE, "pattern": "M", "mamba_num_groups": 1, "gdn_dt_min": -1.0})
    ModelConfig(**{**BASE, "mamba_dt_min": -1.0})


def _mamba_init(**fields) -> dict[str, torch.Tensor]:
    from hybridlm.layers.mamba2 import Mamba2Mixer

    cfg = ModelConfig(pattern="M", vocab_size=32, hidden_size=64, mamba_head_dim=4, mamba_num_groups=1, **fields)
    layer = Mamba2Mixer(cfg)
    layer.init_weights(torch.Generator().manual_seed(5), 0.02, 0.01)
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def test_mamba2_init_reads_its_dt_fields_draws_a_in_1_to_16_and_sets_d_and_the_norm_to_1():
    """Mamba2's dt from the mamba_dt_* fields (a one-point range gives softplus(dt_bias) that point; a range below
    the floor, the floor; the default range spread over [dt_min, dt_max]), A = exp(A_log) ~ U(1, 16) per head,
    D and the gated norm's weight 1."""
    w = _mamba_init()
    assert w["dt_bias"].numel() == 32  # 2 * 64 / 4 heads
    dt = torch.nn.functional.softplus(w["dt_bias"].double())
    assert dt.min().item() >= 0.001 * (1 - 1e-5) and dt.max().item() <= 0.1 * (1 + 1e-5)
    assert dt.max().item() > 0.03 and dt.min().item() < 0.003  # log-uniform over two decades
    a = w["A_log"].double().exp()
    assert a.min().item() >= 1 - 1e-5 and a.max().item() <= 16 + 1e-4
    assert a.max().item() > 12 and a.min().item() < 4
    assert torch.equal(w["D"], torch.ones(32)) and torch.equal(w["norm.weight"], torch.ones(128))
    fixed = _mamba_init(mamba_dt_min=0.05, mamba_dt_max=0.05)
    torch.testing.assert_close(torch.nn.functional.softplus(fixed["dt_bias"]), torch.full((32,), 0.05))
    floored = _mamba_init(mamba_dt_min=0.01, mamba_dt_max=0.02, mamba_dt_init_floor=0.03)
    torch.testing.assert_close(torch.nn.functional.softplus(floored["dt_bias"]), torch.full((32,), 0.03))
