"""pattern_from_ratios: Megatron-LM's output strings (sheet §1.6, §4.1)."""

import itertools

import pytest

from hybridlm.pattern import PatternError, parse, pattern_from_ratios

CASES = [
    ((8, 0, 0), "MMMMMMMM"),
    ((1, 0, 0), "M"),
    ((1, 1, 0), "*"),
    ((10, 0.3, 0), "MM*MM*M*MM"),
    ((10, 0.3, 0.3), "M-*MM*-*M-"),
    ((10, 0.5, 0), "M*M*M**M*M"),
    ((4, 0.5, 0), "M**M"),
    ((5, 0.5, 0), "M*M*M"),
    ((3, 0.5, 0), "*M*"),
    ((9, 0.1, 0), "MMMM*MMMM"),
    ((16, 0.125, 0), "MMMMM*MMMM*MMMMM"),
    ((10, 0.2, 0.2), "MMM*-M*MM-"),
    ((12, 0.25, 0.25), "MM*-MM*-M*M-"),
    ((4, 0.25, 0.25), "MM*-"),
    ((10, 0, 0.5), "M-M-M-M-M-"),
    ((10, 0, 1), "----------"),
    ((10, 1, 0), "**********"),
    ((6, 0.5, 0.5), "-*-**-"),
    ((48, 0.08, 0.5), "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"),
    ((56, 0.08, 0.5), "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"),
]


@pytest.mark.parametrize(("args", "expected"), CASES)
def test_reference_outputs(args, expected):
    assert pattern_from_ratios(*args) == expected
    assert parse(expected).layers == expected


def test_counts_and_spacing():
    p = pattern_from_ratios(10, 0.3, 0.3)
    assert (p.count("*"), p.count("-"), p.count("M")) == (3, 3, 4)
    p = pattern_from_ratios(10, 0.5)
    stars = [i for i, c in enumerate(p) if c == "*"]
    assert all(b - a in (1, 2, 3) for a, b in itertools.pairwise(stars))


@pytest.mark.parametrize("args", [(0, 0, 0), (4, 0.6, 0.6), (-1, 0, 0), (4, 1.5, 0), (4, -0.1, 0), (2.0, 0, 0)])
def test_bad_arguments(args):
    # Megatron asserts; ours is both an AssertionError and a ValueError.
    with pytest.raises(AssertionError):
        pattern_from_ratios(*args)
    with pytest.raises(PatternError):
        pattern_from_ratios(*args)


def test_mlp_quota_of_exactly_one_half_keeps_the_mamba_layer():
    """Megatron places an MLP only where the quota is *below* one half: 3 layers, 2 MLPs give a Mamba:MLP
    ratio of 0.5, so the first Mamba stays (quota 0.5), then -0.5 and 0.0 place MLPs."""
    assert pattern_from_ratios(3, 0, 2 / 3) == "M--"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((True, 0, 0), "num_layers must be a positive integer, got True"),
        ((4, True, 0), "attention_ratio must be a number in [0, 1], got True"),
        ((4, 0, False), "mlp_ratio must be a number in [0, 1], got False"),
        ((4, 0.25, 1.5), "mlp_ratio must be a number in [0, 1], got 1.5"),
        ((4, -0.5, 0.25), "attention_ratio must be a number in [0, 1], got -0.5"),
    ],
)
def test_bad_arguments_are_named(args, message):
    """A bool is no count or ratio (Megatron's asserts would take True as 1); the message names the argument."""
    with pytest.raises(PatternError) as info:
        pattern_from_ratios(*args)
    assert info.value.rule == message
