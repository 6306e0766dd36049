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

#: Sequence mixers mix information across positions; each may open a fused group.
SEQUENCE_MIXERS = (MAMBA, GDN, ATTENTION, DS_ATTENTION, MLA)
#: Channel mixers act on each position alone; each may close a fused group.
CHANNEL_MIXERS = (MLP, MOE)
#: Every layer symbol, in the order used for display.
LAYER_SYMBOLS = SEQUENCE_MIXERS + CHANNEL_MIXERS

#: Key order of Megatron's ``get_hybrid_layer_counts`` (its symbols sorted by attribute name).
COUNT_ORDER = (ATTENTION, DS_ATTENTION, GDN, MAMBA, MLA, MLP, MOE)

#: Symbols that cannot share a model with ``*`` (Megatron: "Attention and MLA/DSA").
MLA_FAMILY = (DS_ATTENTION, MLA)

#: Human-readable name of each layer symbol.
KIND = {
    MAMBA: "Mamba2",
    GDN: "Gated DeltaNet",
    ATTENTION: "attention",
    DS_ATTENTION: "DeepSeek sparse attention",
    MLA: "multi-latent attention",
    MLP: "MLP",
    MOE: "MoE",
}


def describe_block(block: str) -> str:
    """Readable kind of a block string, e.g. ``'*-'`` -> ``'attention + MLP'``."""
    return " + ".join(KIND[s] for s in block)
