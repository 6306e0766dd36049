"""The layer-pattern language (pure Python, no torch).

A pattern such as ``'M-M-[*-]M-|M-[*E]M-/*-/*-'`` is the whole architecture: one symbol per
canonical layer, ``|`` between pipeline segments, ``/`` before each multi-token-prediction depth,
and ``[XY]`` fusing a sequence mixer and the channel mixer after it into one block.
"""

from . import symbols
from .errors import PatternError, RatioError
from .parser import HybridPattern, parse
from .ratios import pattern_from_ratios
from .stage import PatternStage

__all__ = [
    "HybridPattern",
    "PatternError",
    "PatternStage",
    "RatioError",
    "parse",
    "pattern_from_ratios",
    "symbols",
]
