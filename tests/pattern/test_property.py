"""Property tests: parse never raises anything but PatternError; valid patterns round-trip."""

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.pattern import PatternError, parse

ALPHABET = "MG*D+-E|/[]X "


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=24))
def test_parse_returns_or_raises_pattern_error(text):
    try:
        p = parse(text)
    except PatternError as e:
        assert e.pattern == text
        assert e.position is None or 0 <= e.position < len(text)
        return
    assert parse(str(p)) == p


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=16))
def test_arbitrary_unicode(text):
    with contextlib.suppress(PatternError):
        parse(text)


# Generated valid patterns: segments of blocks, optional MTP depths.
SEQ_NO_STAR = st.sampled_from("MGD+")
block = st.one_of(
    st.sampled_from(["M", "G", "*", "-", "E", "M", "-"]),
    st.builds(lambda s, c: f"[{s}{c}]", st.sampled_from("MG*"), st.sampled_from("-E")),
)
segment = st.lists(block, max_size=6).map("".join)
main = st.lists(segment, min_size=1, max_size=4).map("|".join)
mtp = st.lists(block, min_size=1, max_size=3).map("".join)


@st.composite
def valid_patterns(draw):
    text = draw(main)
    depths = draw(st.integers(0, 3))
    if depths:
        text += ("/" + draw(mtp)) * depths
    return text


@settings(max_examples=300, deadline=None)
@given(valid_patterns())
def test_valid_patterns_round_trip(text):
    p = parse(text)
    q = parse(str(p))
    assert q == p
    assert (q.blocks, q.segments, q.layers, q.mtp_blocks) == (p.blocks, p.segments, p.layers, p.mtp_blocks)
    # Canonical layers: brackets and pipes removed; a group counts twice.
    assert p.layers == p.main.replace("[", "").replace("]", "").replace("|", "")
    assert sum(p.layer_counts().values()) == p.num_layers + p.mtp_depths * len(p.mtp_layers)
    assert p.num_blocks == p.num_layers - p.num_fused


@settings(max_examples=200, deadline=None)
@given(valid_patterns(), st.integers(1, 4))
def test_stages_tile_the_main_stack(text, pp_size):
    p = parse(text)
    n_seg = len(p.segments)
    if n_seg == 1:
        if p.num_blocks % pp_size:
            return
        plan = [(r, None) for r in range(pp_size)]
    else:
        if n_seg % pp_size:
            return
        plan = [(r, v) for v in range(n_seg // pp_size) for r in range(pp_size)]
    stages = sorted(
        (
            p.stage(
                r,
                pp_size,
                v,
            )
            for r, v in plan
        ),
        key=lambda s: s.block_offset,
    )
    blocks = tuple(b for s in stages for b in s.blocks)
    assert blocks == p.blocks
    for s in stages:
        assert s.layer_offset == len("".join(p.blocks[: s.block_offset]))
