"""The rotary frequencies: plain, and YaRN's against transformers' ``_compute_yarn_parameters`` bit for bit in
float32 (the frequencies and the cos/sin factor), in float64 to float64 rounding of the same formula."""

import math

import pytest
import torch

from hybridlm.layers.rope import Yarn, rope_cos_sin, rope_frequencies, softmax_factor, yarn_mscale
from tests.helpers import MLA_TINY, tiny_config

rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
from transformers import Qwen3NextConfig  # noqa: E402

#: (head_dim, partial_rotary_factor, rope_theta, rope_parameters' YaRN keys): Qwen3-Next's published long-context
#: setting, DeepSeek-V3's, and small ones whose ramps are partly fractional.
SETTINGS = {
    "qwen3-next-1m": (256, 0.25, 1e7, {"factor": 4.0, "original_max_position_embeddings": 262144}),
    "deepseek-v3": (
        64,
        1.0,
        10000.0,
        {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}
        | {"mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    "unrounded": (
        128,
        0.5,
        500.0,
        {"factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 16, "beta_slow": 2}
        | {"mscale": 0.707, "mscale_all_dim": 0.5, "truncate": False},
    ),
    "tiny": (8, 1.0, 10000.0, {"factor": 3.0, "original_max_position_embeddings": 64}),
}


def ours(head_dim: int, partial: float, theta: float, keys: dict) -> tuple[int, Yarn]:
    """(rotated channels, our YaRN settings) for transformers' keys, read as it reads them."""
    both = keys.get("mscale") and keys.get("mscale_all_dim")
    yarn = Yarn(
        keys["factor"],
        keys["original_max_position_embeddings"],
        keys.get("beta_fast") or 32.0,
        keys.get("beta_slow") or 1.0,
        keys["mscale"] if both else 1.0,
        keys["mscale_all_dim"] if both else 0.0,
        keys.get("truncate", True),
    )
    return int(head_dim * partial), yarn


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_yarn_frequencies_and_cos_sin_factor_are_transformers_bits(setting):
    head_dim, partial, theta, keys = SETTINGS[setting]
    params = {"rope_type": "yarn", "rope_theta": theta, "partial_rotary_factor": partial, **keys}
    hf_config = Qwen3NextConfig(head_dim=head_dim, rope_parameters=params)
    inv_freq, factor = rope_utils.ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    dim, yarn = ours(head_dim, partial, theta, keys)
    mine, amplitude = rope_frequencies(dim, theta, yarn)
    assert mine.dtype == torch.float32 and torch.equal(mine, inv_freq)
    assert amplitude == factor
    # float64 (a float64 model's): the same formula, rounded once more finely
    fine, _ = rope_frequencies(dim, theta, yarn, torch.float64)
    torch.testing.assert_close(fine.float(), inv_freq, rtol=3e-7, atol=0)
    # Some frequency is kept and some divided by the factor: each setting exercises the ramp.
    plain, _ = rope_frequencies(dim, theta, None, torch.float64)
    ratio = fine / plain
    assert math.isclose(ratio[0].item(), 1.0) and math.isclose(ratio[-1].item(), 1 / keys["factor"])


def test_cos_and_sin_carry_the_factor_and_a_plain_rope_is_unchanged():
    pos = torch.arange(11).expand(2, 11)
    yarn = Yarn(4.0, 64, 32.0, 1.0, 1.0, 0.0, True)  # the fields' defaults (cos and sin times 0.1 ln(4) + 1)
    cos, sin = rope_cos_sin(pos, 8, 500.0, yarn=yarn)
    inv, amplitude = rope_frequencies(8, 500.0, yarn)
    angles = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    assert amplitude == yarn_mscale(4.0, 1.0) == 0.1 * math.log(4.0) + 1
    assert torch.equal(cos, angles.cos() * amplitude) and torch.equal(sin, angles.sin() * amplitude)
    plain_cos, _ = rope_cos_sin(pos, 8, 500.0)
    expected = 1.0 / 500.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    assert torch.equal(plain_cos, torch.cat([pos[..., None] * expected] * 2, dim=-1).cos())


def test_mla_softmax_factor_is_deepseeks_mscale_all_dim_squared():
    plain = tiny_config("+", **MLA_TINY)
    assert softmax_factor(plain) == 1.0
    yarn = plain.replace(rope_type="yarn", yarn_rotary_scaling_factor=40.0, yarn_mscale_all_dim=0.707)
    assert softmax_factor(yarn) == (0.1 * 0.707 * math.log(40.0) + 1) ** 2
    assert softmax_factor(yarn.replace(yarn_rotary_scaling_factor=1.0)) == 1.0  # m(s, a) = 1 for s <= 1
