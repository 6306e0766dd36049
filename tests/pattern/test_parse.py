"""parse(): Megatron-LM 0.19 conformance (reference sheet §4.1, §4.3) and the bracket rules (§4.2)."""

import pytest

from hybridlm.pattern import PatternError, parse


def megatron_parse(text):
    """Our result in the shape of Megatron's ``parse_hybrid_pattern``: (main, mtp, depths)."""
    p = parse(text)
    return p.main, p.mtp, p.mtp_depths


# -- main-only patterns ---------------------------------------------------------------------------

MAIN_ONLY = [
    "M*M*",
    "MMMM",
    "*M*M",
    "MM-*",
    "E",
    "GGG*GGG*",
    "GEGEGE*E",
    "MDMD",
    "DM",
    "M+M+",
    "+M",
    "M*|M*",
    "M-M-|M-M*-",
    "M|M|M|M",
    "D+",
    "|",
    "M||M",
    "M*|",
    "",
    "[*-]M[*-]M",
    "[*-]M|[*-]M",
]


@pytest.mark.parametrize("text", MAIN_ONLY)
def test_main_only(text):
    assert megatron_parse(text) == (text, None, 0)


def test_none_is_empty():
    assert megatron_parse(None) == ("", None, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("M*M*/MM", ("M*M*", "MM", 1)),
        ("MMMM/*M", ("MMMM", "*M", 1)),
        ("M/M", ("M", "M", 1)),
        ("M*M*/MM/MM", ("M*M*", "MM", 2)),
        ("M*M*/MM/MM/MM", ("M*M*", "MM", 3)),
        ("MMMM/*M/*M/*M", ("MMMM", "*M", 3)),
        ("M*/*/*/*", ("M*", "*", 3)),
        ("M/M/M/M/M", ("M", "M", 4)),
        ("M-M-|M-M*-/MM/MM", ("M-M-|M-M*-", "MM", 2)),
        ("/MM/MM", ("", "MM", 2)),
        ("M*M*/", ("M*M*", None, 0)),
        ("/", ("", None, 0)),
        ("//", ("", None, 0)),
        ("M*M*//", ("M*M*", None, 0)),
        ("M*M*M*M*/MMM/MMM", ("M*M*M*M*", "MMM", 2)),
        ("MM-MM-/*M/*M", ("MM-MM-", "*M", 2)),
        ("*****/M/M/M/M", ("*****", "M", 4)),
        ("MEME/MM/MM", ("MEME", "MM", 2)),
        ("GEGEGE*E/GG/GG", ("GEGEGE*E", "GG", 2)),
        ("MDMD/MD/MD", ("MDMD", "MD", 2)),
        ("M+M+/M+/M+", ("M+M+", "M+", 2)),
        ("|/M", ("|", "M", 1)),
        ("M*M*/[*-]/[*-]", ("M*M*", "[*-]", 2)),
        ("[*-]/[M-]", ("[*-]", "[M-]", 1)),
    ],
)
def test_mtp(text, expected):
    assert megatron_parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("M*M*/MM/M*", "All MTP patterns must be identical"),
        ("M*M*/MM/MM/M", "All MTP patterns must be identical"),
        ("MMMM/*M/M*", "All MTP patterns must be identical"),
        ("M*M*/MM/", "pattern 2 is ''"),
        ("M*M*/MM/Ma", "All MTP patterns must be identical"),  # identity is checked before symbols
        ("M*M*/[*-]/*-", "All MTP patterns must be identical"),
        ("M*X*", "not a valid layer symbol"),
        ("MaMM", "not a valid layer symbol"),
        ("M*M*1", "not a valid layer symbol"),
        ("M*M*/MX", "not a valid layer symbol"),
        ("M*M*/Ma/Ma", "not a valid layer symbol"),
        ("M*M*/M|M/M|M", "not a valid layer symbol"),
        (" M", "not a valid layer symbol"),
        ("m", "not a valid layer symbol"),
        ("M*D", "Not supported to have both Attention and MLA/DSA in one model"),
        ("M*+", "Not supported to have both Attention and MLA/DSA in one model"),
        ("M*DM", "Not supported to have both Attention and MLA/DSA"),
        ("M*+M", "Not supported to have both Attention and MLA/DSA"),
        ("[*-]D", "Not supported to have both Attention and MLA/DSA"),
        # Deviation (c): the rule spans main and MTP together (Megatron 0.19 accepts these).
        ("M*/D", "Not supported to have both Attention and MLA/DSA"),
        ("MD/*", "Not supported to have both Attention and MLA/DSA"),
        ("M+/[*-]", "Not supported to have both Attention and MLA/DSA"),
    ],
)
def test_rejected(text, message):
    with pytest.raises(PatternError, match=None) as info:
        parse(text)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("M*X*", 2, "'X' is not a valid layer symbol"),
        (" M", 0, "' ' is not a valid layer symbol"),
        ("m", 0, "'m' is not a valid layer symbol"),
        ("M*M*/MX", 6, "In MTP pattern, 'X'"),
        ("M*M*/M|M/M|M", 6, "In MTP pattern, '|'"),
        ("M*M*/MM/M*", 9, "pattern 2 is 'M*'"),
        ("M*M*/MM/", 7, "pattern 2 is ''"),
        ("M*D", 2, "Attention and MLA/DSA"),
        ("M*/D", 3, "Attention and MLA/DSA"),
        ("DM*", 2, "Attention and MLA/DSA"),
    ],
)
def test_error_position(text, position, message):
    with pytest.raises(PatternError) as info:
        parse(text)
    err = info.value
    assert err.position == position
    assert message in err.rule
    lines = str(err).splitlines()
    assert any(text in line for line in lines), "the message quotes the pattern"
    # The caret sits in the column of the offending character.
    quoted = next(line for line in lines if line.startswith("  pattern: "))
    caret = lines[lines.index(quoted) + 1]
    assert caret.rstrip().endswith("^")
    assert len(caret.rstrip()) - 1 == quoted.index(f"'{text}'") + 1 + position


# -- brackets (PR #4463, §1.11 / §4.2) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("[*-M*", 0, "unmatched '['"),
        ("[", 0, "unmatched '['"),
        ("[M", 0, "unmatched '['"),
        ("*-]M*", 2, "unmatched ']' at position 2"),
        ("]", 0, "unmatched ']' at position 0"),
        ("M]", 1, "unmatched ']' at position 1"),
        ("[[*-]]M", 1, "nested '[' at position 1"),
        ("[]M*", 1, "empty fusion group '[]' at position 1"),
        ("[*]M*", 2, "contains only 1 layer"),
        ("[*|M]", 2, "pipe '|' at position 2 appears inside a fusion group"),
        ("[*/M]", 2, "MTP separator '/' at position 2 appears inside"),
        ("M*/[*|-]", 5, "pipe '|' at position 5"),
        ("M*M*/[*-]/[*-", 10, "unmatched '['"),
    ],
)
def test_bracket_syntax(text, position, message):
    with pytest.raises(PatternError) as info:
        parse(text)
    assert message in str(info.value)
    assert info.value.position == position


@pytest.mark.parametrize(
    ("text", "position", "what"),
    [
        ("[M*-]M", 3, "holds 3 layers"),
        ("[*-*-]", 3, "holds 4 layers"),
        ("[-*]", 1, "starts with '-'"),
        ("[-E]", 1, "starts with '-'"),
        ("[*M]", 2, "ends with 'M'"),
        ("[MM]", 2, "ends with 'M'"),
        ("M-/[E-]", 4, "starts with 'E'"),
        ("M[*-]|[GG]", 8, "ends with 'G'"),
    ],
)
def test_group_semantics_checked_at_parse_time(text, position, what):
    """Megatron accepts these at parse time and fails later; we reject them up front."""
    with pytest.raises(PatternError) as info:
        parse(text)
    assert "a fused group must be a sequence mixer followed by a channel mixer" in str(info.value)
    assert what in str(info.value)
    assert info.value.position == position


@pytest.mark.parametrize("seq", ["M", "G", "*", "D", "+"])
@pytest.mark.parametrize("chan", ["-", "E"])
def test_every_legal_group(seq, chan):
    p = parse(f"M[{seq}{chan}]")
    assert p.blocks == ("M", seq + chan)
    assert p.layers == "M" + seq + chan


@pytest.mark.parametrize(
    ("text", "blocks"),
    [
        ("[*-]M*", ("*-", "M", "*")),
        ("[*-]M[*-]M", ("*-", "M", "*-", "M")),
        ("M*-M", ("M", "*", "-", "M")),
        ("[ME][GE][D-]", ("ME", "GE", "D-")),
        ("[*-][ME]", ("*-", "ME")),
    ],
)
def test_blocks(text, blocks):
    assert parse(text).blocks == blocks


def test_structure_of_a_full_pattern():
    p = parse("M-M-[*-]M-|M-[*E]M-/*-/*-")
    assert p.text == "M-M-[*-]M-|M-[*E]M-/*-/*-"
    assert p.main == "M-M-[*-]M-|M-[*E]M-"
    assert p.mtp == "*-"
    assert p.mtp_depths == 2
    assert p.blocks == ("M", "-", "M", "-", "*-", "M", "-", "M", "-", "*E", "M", "-")
    assert p.segments == (("M", "-", "M", "-", "*-", "M", "-"), ("M", "-", "*E", "M", "-"))
    assert p.layers == "M-M-*-M-M-*EM-"
    assert isinstance(p.layers, str)
    assert p.num_blocks == 12 and p.num_layers == 14 and p.num_fused == 2
    assert p.block_layer_offsets[4:6] == (4, 6)
    assert p.canonical == "M-M-*-M-M-*EM-/*-/*-"
    assert str(p) == "M-M-[*-]M-|M-[*E]M-/*-/*-"


# -- counting -------------------------------------------------------------------------------------

ZERO = dict.fromkeys("*DGM+-E", 0)


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("M*M*", {"*": 2, "M": 2}),
        ("MG*-E", {"M": 1, "G": 1, "*": 1, "-": 1, "E": 1}),
        ("MGD-E", {"M": 1, "G": 1, "D": 1, "-": 1, "E": 1}),
        ("MG+-E", {"M": 1, "G": 1, "+": 1, "-": 1, "E": 1}),
        ("M*|M*", {"*": 2, "M": 2}),
        ("M-M-|M-M*-", {"*": 1, "M": 4, "-": 4}),
        ("M*M*/MM/MM", {"*": 2, "M": 6}),
        ("M-M-|M-M*-/MM/MM", {"*": 1, "M": 8, "-": 4}),
        ("MEME", {"M": 2, "E": 2}),
        ("MMMM/*M/*M/*M", {"*": 3, "M": 7}),
        ("GMGM", {"G": 2, "M": 2}),
        ("G*GM*", {"*": 2, "G": 2, "M": 1}),
        ("DMDM", {"D": 2, "M": 2}),
        ("+M+M", {"+": 2, "M": 2}),
        ("", {}),
        ("[*-]M*/[*-]/[*-]", {"*": 4, "M": 1, "-": 3}),
        ("[*-]M[*-]M", {"*": 2, "-": 2, "M": 2}),
    ],
)
def test_layer_counts(text, counts):
    got = parse(text).layer_counts()
    assert got == {**ZERO, **counts}
    assert list(got) == ["*", "D", "G", "M", "+", "-", "E"]


def test_every_layer_kind_has_a_name_and_a_count():
    """Each kind is written once (``symbols._SEQUENCE_KINDS`` or ``_CHANNEL_KINDS``): one left out of ``KIND``
    failed ``hybridlm pattern`` with a bare KeyError, one left out of ``COUNT_ORDER`` went uncounted."""
    from hybridlm.pattern import symbols as S

    assert list(S.KIND) == list(S.LAYER_SYMBOLS) == [*S.SEQUENCE_MIXERS, *S.CHANNEL_MIXERS]
    assert sorted(S.COUNT_ORDER) == sorted(S.LAYER_SYMBOLS)
    assert S.COUNT_ORDER[:7] == ("*", "D", "G", "M", "+", "-", "E")  # Megatron's, in its order


@pytest.mark.parametrize(
    ("text", "layers", "blocks"),
    [
        ("M*M*", 4, 4),
        ("MMMM", 4, 4),
        ("M", 1, 1),
        ("M-M-|M-M*-", 9, 9),
        ("M-M-|M-M*-|M-M-|M-M*-", 18, 18),
        ("||M", 1, 1),
        ("M|M", 2, 2),
        ("M*M*/MM/MM", 4, 4),
        ("M-M-|M-M*-/MM/MM", 9, 9),
        ("", 0, 0),
        # A fused group is one block and two canonical layers.
        ("[*-]M[*-]M", 6, 4),
        ("[*-]M|[*-]M", 6, 4),
        ("[*-]M*/[*-]/[*-]", 4, 3),
    ],
)
def test_layer_and_block_totals(text, layers, blocks):
    p = parse(text)
    assert p.num_layers == len(p.layers) == layers
    assert p.num_blocks == len(p.blocks) == blocks


@pytest.mark.parametrize(
    ("text", "n"), [("M*M*", 1), ("M-M-|M-M*-", 2), ("M|M|M|M", 4), ("||M", 3), ("M-M-|M-M*-/MM/MM", 2)]
)
def test_segment_count(text, n):
    assert len(parse(text).segments) == n


def test_equality_uses_structure():
    assert parse("M*//") == parse("M*") == parse("M*/")
    assert parse("M*/-/-") != parse("M*/-")
    assert parse("[*-]M") != parse("*-M")
    assert hash(parse("M*//")) == hash(parse("M*"))
    assert str(parse("M*M*//")) == "M*M*"


@pytest.mark.parametrize("bad", [3, 2.5, b"M*", ["M"]])
def test_non_string_input(bad):
    with pytest.raises(PatternError):
        parse(bad)


def test_control_characters_keep_the_caret_aligned():
    with pytest.raises(PatternError) as info:
        parse("M\t*")
    assert info.value.position == 1
    assert "'\\t' is not a valid layer symbol" in str(info.value)


def test_differences_ignore_brackets_and_pipes_only():
    assert parse("M-[*-]|M-/*-").differences(parse("[M-]*-M-/[*-]")) == []
    diffs = parse("M-*-/*-").differences(parse("M-G-E/*-/*-"))
    assert diffs == [
        "layer 2: checkpoint has '*', pattern has 'G'",
        "checkpoint has 4 layers, pattern has 5",
        "checkpoint has 1 MTP depth(s), pattern has 2",
    ]


def test_differences_with_mtp_on_one_side_only_name_the_depths_alone():
    """Against a pattern without MTP, only the number of depths differs: there are no MTP layers to compare."""
    assert parse("M-").differences(parse("M-/*-")) == ["checkpoint has 0 MTP depth(s), pattern has 1"]
    assert parse("M-/*-/*-").differences(parse("M-")) == ["checkpoint has 2 MTP depth(s), pattern has 0"]


def test_an_invalid_symbol_lists_the_structure_allowed_where_it_stands():
    """The main pattern may hold '[ ]' and '|'; an MTP part only '[ ]'."""
    with pytest.raises(PatternError) as info:
        parse("M*x")
    assert info.value.rule.startswith("In main pattern, 'x' is not a valid layer symbol")
    assert info.value.rule.endswith("Valid symbols are: M G * D + - E [ ] |")
    with pytest.raises(PatternError) as info:
        parse("M*/Mx")
    assert info.value.rule.startswith("In MTP pattern, 'x' is not a valid layer symbol")
    assert info.value.rule.endswith("Valid symbols are: M G * D + - E [ ]")


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("M/M/MMM", 5),  # depth 2 runs on past depth 1: the first character beyond it
        ("M-/M-/M-*-", 8),
        ("M/MM/M", 5),  # depth 2 stops short of depth 1: its last character
        ("M/*M/*-", 6),  # the first differing character
    ],
)
def test_mtp_depth_mismatch_points_where_the_depth_departs(text, position):
    with pytest.raises(PatternError, match="All MTP patterns must be identical") as info:
        parse(text)
    assert info.value.position == position
