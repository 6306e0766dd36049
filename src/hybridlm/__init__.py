"""hybridlm: hybrid language models from one layer-pattern string.

``hybridlm.pattern`` and ``hybridlm.config`` are pure Python; everything that needs torch is
imported lazily on first use, so ``import hybridlm.pattern`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .pattern import HybridPattern, PatternError, parse, pattern_from_ratios

if TYPE_CHECKING:  # what type checkers see (py.typed is shipped): through __getattr__ alone every lazy name was Any
    from .checkpoint.weights import load as load
    from .checkpoint.weights import save as save
    from .config import ModelConfig as ModelConfig
    from .errors import CheckpointError as CheckpointError
    from .errors import ConfigError as ConfigError
    from .infer.generate import generate as generate
    from .model import HybridLM as HybridLM
    from .model import ModelOutput as ModelOutput

__version__ = "0.1.0"

# Public names that live in modules importing torch: name -> module.
_LAZY = {
    "ModelConfig": "hybridlm.config",
    "ConfigError": "hybridlm.errors",
    "HybridLM": "hybridlm.model",
    "ModelOutput": "hybridlm.model",
    "save": "hybridlm.checkpoint.weights",
    "load": "hybridlm.checkpoint.weights",
    "CheckpointError": "hybridlm.errors",
    "generate": "hybridlm.infer.generate",
}

__all__ = ["HybridPattern", "PatternError", "__version__", "parse", "pattern_from_ratios", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hybridlm' has no attribute {name!r}")
