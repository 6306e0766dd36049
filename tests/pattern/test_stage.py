"""HybridPattern.stage(): Megatron-LM's select_pipeline_segment (sheet §1.7, §4.1-§4.3) with our deviations."""

import logging

import pytest

from hybridlm.pattern import PatternError, parse


def select(main, pp_rank=0, pp_size=1, vp_stage=None, first=None, last=None):
    """Megatron's (layer_type_list, layer_offset), where the offset counts blocks."""
    st = parse(main).stage(pp_rank, pp_size, vp_stage, first, last)
    return list(st.blocks), st.block_offset


def test_single_segment_single_rank():
    assert select("M*M*") == (["M", "*", "M", "*"], 0)
    assert select("") == ([], 0)


@pytest.mark.parametrize(
    ("main", "vp", "expected"),
    [
        ("M-M-|M-M*-", 0, (["M", "-", "M", "-"], 0)),
        ("M-M-|M-M*-", 1, (["M", "-", "M", "*", "-"], 4)),
        ("||M*", 0, ([], 0)),
        ("||M*", 2, (["M", "*"], 0)),
        ("[*-]M|M*", 1, (["M", "*"], 2)),
        ("[*-][ME]|M", 1, (["M"], 2)),
    ],
)
def test_virtual_segments_one_rank(main, vp, expected):
    assert select(main, vp_stage=vp) == expected


@pytest.mark.parametrize("vp", range(4))
def test_four_even_segments(vp):
    blocks, offset = select("MM|M*|M-|ME", vp_stage=vp)
    assert len(blocks) == 2 and offset == 2 * vp


def test_uneven_segments():
    got = [select("MMM|M|MMMMM", vp_stage=v) for v in range(3)]
    assert [len(b) for b, _ in got] == [3, 1, 5]
    assert [o for _, o in got] == [0, 3, 4]


def test_interleaved_ranks():
    # vp_stage * pp_size + pp_rank: rank 0 gets segments 0 and 2, rank 1 gets 1 and 3.
    p = "M*|M-|**|--"
    assert select(p, 1, 2, 1) == (["-", "-"], 6)
    assert select(p, 0, 2, 1) == (["*", "*"], 4)
    assert select(p, 1, 2, 0) == (["M", "-"], 2)
    assert select("|", 1, 2) == ([], 0)
    assert select("", 0, 2) == ([], 0)


def test_layer_offset_counts_canonical_layers():
    st = parse("M[*-]|[*E]M|M-").stage(0, 1, vp_stage=1)
    assert st.blocks == ("*E", "M")
    assert st.block_offset == 2
    assert st.layer_offset == 3
    assert st.layers == "*EM" and st.num_layers == 3 and st.num_blocks == 2
    assert not st.is_first and not st.is_last


def test_first_and_last_flags():
    p = parse("M*|M-|**|--")
    flags = {(r, v): (st.is_first, st.is_last) for r in range(2) for v in range(2) for st in [p.stage(r, 2, v)]}
    assert flags == {(0, 0): (True, False), (1, 0): (False, False), (0, 1): (False, False), (1, 1): (False, True)}


def test_deviation_one_rank_gets_whole_model():
    """Megatron builds only segment 0 here; we build the whole model."""
    st = parse("M*|M-").stage(0, 1)
    assert st.blocks == ("M", "*", "M", "-") and st.block_offset == 0 and st.layer_offset == 0
    assert st.is_first and st.is_last and st.segment is None


@pytest.mark.parametrize(
    ("main", "kwargs", "message"),
    [
        ("MX|M*", {}, "not a valid layer symbol"),
        ("M*|M*", {"vp_stage": 5}, "out of range"),
        ("M*|M-", {"pp_rank": 1, "pp_size": 2, "vp_stage": 1}, "out of range"),
        ("M*|M*", {"first": 1}, "Cannot specify"),
        ("M*|M*", {"last": 1}, "Cannot specify"),
        ("M|M|M", {"pp_size": 2}, "evenly divisible"),
        ("M*M*M*", {"pp_size": 4}, "evenly divisible"),
        ("M*M*M*M*M", {"pp_size": 4, "first": 2}, "Middle layers"),
        ("M*M*", {"pp_size": 2, "vp_stage": 0}, "Virtual pipeline parallelism"),
        ("M*", {"pp_rank": 2, "pp_size": 2}, "pp_rank"),
        ("M*", {"pp_size": 0}, "pp_size"),
        ("M*", {"pp_rank": -1, "pp_size": 2}, "pp_rank"),
    ],
)
def test_stage_errors(main, kwargs, message):
    args = {"pp_rank": 0, "pp_size": 1, **kwargs}
    with pytest.raises(PatternError) as info:
        select(main, args["pp_rank"], args["pp_size"], args.get("vp_stage"), args.get("first"), args.get("last"))
    assert message in str(info.value)


def test_auto_split_even():
    assert select("M*M-", 0, 2) == (["M", "*"], 0)
    assert select("M*M-", 1, 2) == (["M", "-"], 2)
    for r in range(4):
        blocks, offset = select("M*M*M*M*", r, 4)
        assert len(blocks) == 2 and offset == 2 * r


def test_auto_split_concatenates_to_whole():
    p = parse("M*M*M*")
    got, n = [], 0
    for r in range(3):
        st = p.stage(r, 3)
        assert st.block_offset == n
        got += st.blocks
        n += st.num_blocks
    assert tuple(got) == p.blocks


@pytest.mark.parametrize(
    ("main", "pp", "first", "last", "lens", "offsets"),
    [
        ("M*M*M*", 4, 3, None, [3, 1, 1, 1], [0, 3, 4, 5]),
        ("M*M*M*", 4, None, 3, [1, 1, 1, 3], [0, 1, 2, 3]),
        ("M*M*M*M*", 4, 1, 1, [1, 3, 3, 1], [0, 1, 4, 7]),
        ("M*M-", 2, 3, None, [3, 1], [0, 3]),
        ("M*M-M*", 3, 2, 2, [2, 2, 2], [0, 2, 4]),
        ("M*M-M", 2, 2, 3, [2, 3], [0, 2]),
    ],
)
def test_auto_split_first_last(main, pp, first, last, lens, offsets):
    got = [select(main, r, pp, None, first, last) for r in range(pp)]
    assert [len(b) for b, _ in got] == lens
    assert [o for _, o in got] == offsets


@pytest.mark.parametrize(
    ("main", "pp", "first", "last"),
    [
        ("M*M-M", 2, 2, 2),  # Megatron silently drops block 2
        ("M*M-M", 2, 3, 3),  # ... or duplicates one
        ("M*M", 2, 4, None),  # more than there are
        ("M*M-M", 3, 3, 3),
    ],
)
def test_deviation_first_last_must_tile(main, pp, first, last):
    with pytest.raises(PatternError, match="dropped or duplicated"):
        select(main, 0, pp, None, first, last)


def test_auto_split_counts_fused_group_once():
    assert select("[*-]M[*-]M", 1, 2) == (["*-", "M"], 2)
    assert select("[*-]M[*-]M", 0, 2, None, 1) == (["*-"], 0)
    assert select("[*-]M[*-]M", 1, 2, None, 1) == (["M", "*-", "M"], 1)
    st = parse("[*-]M[*-]M").stage(1, 2, None, 1)
    assert st.layer_offset == 2


def test_auto_split_logs_deprecation(caplog):
    with caplog.at_level(logging.WARNING, logger="hybridlm.pattern"):
        parse("M*M*").stage(0, 2)
    assert any("DEPRECATION" in r.getMessage() for r in caplog.records)


def test_one_rank_holds_the_whole_model_as_no_segment_and_refuses_stage_sizes():
    """A one-segment pattern at pp 1 said segment 0 where 'M-|M-' said None (the whole model); stage sizes for
    one rank were dropped without a word (the CLI refuses them)."""
    for main in ("M-M-", "M-|M-"):
        st = parse(main).stage(0, 1)
        assert st.segment is None and st.is_first and st.is_last and st.num_blocks == 4
    assert parse("M-M-").stage(0, 1, 0).segment == 0  # a virtual stage asked for by index is that segment
    for kwargs in ({"first_stage_layers": 99}, {"last_stage_layers": 1}):
        with pytest.raises(PatternError, match="with pp_size 1 the one stage holds every block"):
            parse("M-M-").stage(0, 1, **kwargs)


@pytest.mark.parametrize(
    ("main", "kwargs", "message"),
    [
        ("M-|M-", {"vp_stage": -1}, "vp_stage must be an integer >= 0, got -1"),
        ("M-|M-", {"pp_size": 2, "vp_stage": 1.0}, "vp_stage must be an integer >= 0, got 1.0"),
        ("M-M-", {"pp_size": True}, "pp_size must be an integer >= 1, got True"),
        ("M-M-", {"pp_rank": False, "pp_size": 2}, "pp_rank must be an integer >= 0, got False"),
        ("M-M-", {"pp_size": 2, "first_stage_layers": -2}, "first_stage_layers must be an integer >= 0, got -2"),
        ("M-M-", {"pp_size": 2, "last_stage_layers": -1}, "last_stage_layers must be an integer >= 0, got -1"),
    ],
)
def test_stage_arguments_are_checked_by_name(main, kwargs, message):
    """A negative or non-integer argument (a bool too) is refused by name: a negative vp_stage would select a
    segment counted from the end, a negative stage size would slice blocks off the far end."""
    args = {"pp_rank": 0, "pp_size": 1, **kwargs}
    with pytest.raises(PatternError) as info:
        parse(main).stage(**args)
    assert message in info.value.rule and info.value.position is None


def test_a_virtual_stage_just_past_the_last_segment_is_out_of_range():
    """Segment index == number of segments is one past the end: a PatternError, not an IndexError."""
    with pytest.raises(PatternError, match=r"Pipeline segment index 2 .* out of range for 2 segments"):
        parse("M*|M-").stage(0, 1, vp_stage=2)
    with pytest.raises(PatternError, match=r"Pipeline segment index 2 .* out of range for 2 segments"):
        parse("M*|M-").stage(0, 2, vp_stage=1)


@pytest.mark.parametrize(
    ("main", "pp", "first", "last"),
    [("M*M-", 2, None, None), ("M*M*M*", 3, None, None), ("M*M*M*M*", 4, 1, 1), ("M*M*M*", 3, 2, None)],
)
def test_auto_split_flags_mark_the_first_and_last_rank(main, pp, first, last):
    p = parse(main)
    flags = [(st.is_first, st.is_last) for st in (p.stage(r, pp, None, first, last) for r in range(pp))]
    assert flags == [(r == 0, r == pp - 1) for r in range(pp)]


def test_auto_split_warns_about_fused_groups_only_when_there_are_some(caplog):
    fused = "counts a fused block as one block"
    with caplog.at_level(logging.WARNING, logger="hybridlm.pattern"):
        parse("[*-]M[*-]M").stage(0, 2)
    assert any(fused in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hybridlm.pattern"):
        parse("M*-M*-").stage(0, 2)
    assert [r.getMessage() for r in caplog.records if "DEPRECATION" in r.getMessage()]
    assert not any(fused in r.getMessage() for r in caplog.records)


def test_the_pipeline_plan_warns_about_an_automatic_split_once(caplog):
    """The table selects every rank's stage; the deprecation is logged once, not once per rank."""
    from hybridlm.pattern.table import pipeline_plan

    with caplog.at_level(logging.WARNING, logger="hybridlm.pattern"):
        plan = pipeline_plan(parse("M*M*M*M*"), 4)
    assert [start for _, _, start, _ in plan] == [0, 2, 4, 6]
    assert sum("DEPRECATION" in r.getMessage() for r in caplog.records) == 1


def test_stage_sizes_with_pipes_point_at_the_first_pipe():
    with pytest.raises(PatternError, match="Cannot specify") as info:
        parse("M*M|M*|M").stage(0, 3, 0, first_stage_layers=1)
    assert info.value.position == 3  # the first '|'
