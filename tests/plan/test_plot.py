"""The layout picture's colours (the picture itself is drawn by tests/test_cli_plan.py)."""

import pytest

from hybridlm.pattern import parse


def test_a_kind_without_a_colour_is_drawn_in_a_spare_colour_no_other_kind_has(monkeypatch, tmp_path):
    """A layer kind added without a COLORS entry failed the plot with a bare ``KeyError: 'G'``."""
    pytest.importorskip("matplotlib")
    from hybridlm.plan import plot

    monkeypatch.delitem(plot.COLORS, "G")
    monkeypatch.delitem(plot.COLORS, "E")
    assert plot.plot_pattern(parse("G[ME]"), tmp_path / "p.svg").stat().st_size > 0
    spare = {plot.color("G"), plot.color("E")}
    assert len(spare) == 2 and spare.isdisjoint(plot.COLORS.values())
