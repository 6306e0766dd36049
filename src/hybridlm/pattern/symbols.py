"""The symbols of the layer-pattern language.

One character is one canonical layer; a few characters structure the pattern. The names follow
Megatron-LM's ``Symbols`` class so that the two code bases read alike.
"""

from __future__ import annotations

MAMBA = "M"
GDN = "G"
ATTENTION = "*"
DS_ATTENTION = "D"
MLA = "+"
MLP = "-"
MOE = "E"

PIPE = "|"
MTP_SEPARATOR = "/"
FUSION_START = "["
FUSION_END = "]"

# Every layer kind is written once, in one of the two tables below (symbol -> human-readable kind); the
# tuples and KIND are derived from them, so a new kind cannot be left out of one of them
# (docs/design.md, "Adding a mixer").

#: Sequence mixers mix information across positions; each may open a fused group.
_SEQUENCE_KINDS = {
    MAMBA: "Mamba2",
    GDN: "Gated DeltaNet",
    ATTENTION: "attention",
    DS_ATTENTION: "DeepSeek sparse attention",
    MLA: "multi-latent attention",
}
#: Channel mixers act on each position alone; each may close a fused group.
_CHANNEL_KINDS = {MLP: "MLP", MOE: "MoE"}

SEQUENCE_MIXERS = tuple(_SEQUENCE_KINDS)
CHANNEL_MIXERS = tuple(_CHANNEL_KINDS)
#: Every layer symbol, in the order used for display.
LAYER_SYMBOLS = SEQUENCE_MIXERS + CHANNEL_MIXERS
#: Human-readable name of each layer symbol.
KIND = {**_SEQUENCE_KINDS, **_CHANNEL_KINDS}

#: Key order of Megatron's ``get_hybrid_layer_counts`` (its symbols sorted by attribute name), then any layer
#: symbol of ours that Megatron lacks, so that every kind is counted.
_MEGATRON_COUNT_ORDER = (ATTENTION, DS_ATTENTION, GDN, MAMBA, MLA, MLP, MOE)
COUNT_ORDER = _MEGATRON_COUNT_ORDER + tuple(s for s in LAYER_SYMBOLS if s not in _MEGATRON_COUNT_ORDER)

#: Symbols that cannot share a model with ``*`` (Megatron: "Attention and MLA/DSA").
MLA_FAMILY = (DS_ATTENTION, MLA)


def describe_block(block: str) -> str:
    """Readable kind of a block string, e.g. ``'*-'`` -> ``'attention + MLP'``."""
    return " + ".join(KIND[s] for s in block)
