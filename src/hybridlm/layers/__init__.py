"""Mixers (one per file), norms and RoPE; a registry from pattern symbol to mixer class.

A mixer is an ``nn.Module`` with ``forward(x, ctx) -> (B, L, hidden)``,
``init_weights(generator, std, out_std)``, a static ``flops_per_token(config, seq_len)`` and a
``keep_fp32`` tuple of parameter names that stay float32 when the model is cast. A mixer that
keeps state across decoded tokens also has ``init_cache(batch, max_len, device, dtype)`` and
continues from ``ctx.cache`` in ``forward`` (the protocol is in ``layers/cache.py``). What else a new
mixer touches is listed in docs/design.md, "Adding a mixer".
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .context import SequenceContext
from .dsa import DSA
from .gdn import GatedDeltaNet
from .mamba2 import Mamba2Mixer
from .mla import MLA
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm

MIXERS: dict[str, type[nn.Module]] = {
    "M": Mamba2Mixer,
    "G": GatedDeltaNet,
    "*": Attention,
    "+": MLA,
    "D": DSA,
    "-": MLP,
    "E": MoE,
}

#: The methods every mixer class has besides ``forward`` (the interface in this module's docstring).
_INTERFACE = ("init_weights", "flops_per_token")

#: Symbols the pattern language accepts but no mixer implements yet (symbol -> kind).
_NOT_YET: dict[str, str] = {}


def mixer_class(symbol: str) -> type[nn.Module]:
    """The mixer class of pattern symbol ``symbol`` (one character, e.g. ``"M"``); ValueError, listing the symbols
    that have one, for any other; NotImplementedError for one the pattern language accepts but no mixer
    implements yet; TypeError for a registered class without ``init_weights`` or ``flops_per_token``."""
    if symbol in _NOT_YET:
        raise NotImplementedError(
            f"'{symbol}' ({_NOT_YET[symbol]}) layers are not implemented yet; the pattern language accepts them "
            "so that Megatron-LM patterns parse, but a model with them cannot be built"
        )
    if symbol not in MIXERS:
        raise ValueError(f"no mixer for pattern symbol {symbol!r}; the mixers' symbols are {' '.join(MIXERS)}")
    cls = MIXERS[symbol]
    # Checked here, where every model build asks: a missing one failed later, as a bare AttributeError (at the
    # trainer's FLOP count, after the corpus was read, for flops_per_token).
    missing = [name for name in _INTERFACE if not callable(getattr(cls, name, None))]
    if missing:
        raise TypeError(
            f"mixer {cls.__name__} (pattern symbol {symbol!r}) has no {' and no '.join(missing)}: every mixer has "
            "forward(x, ctx), init_weights(generator, std, out_std) and a static flops_per_token(config, seq_len) "
            "(hybridlm.layers; docs/design.md, 'Adding a mixer')"
        )
    return cls


def build_mixer(symbol: str, config: ModelConfig) -> nn.Module:
    """A mixer of pattern symbol ``symbol`` for ``config`` (refused as :func:`mixer_class` refuses)."""
    return mixer_class(symbol)(config)


__all__ = [
    "DSA",
    "MIXERS",
    "MLA",
    "MLP",
    "Attention",
    "GatedDeltaNet",
    "Mamba2Mixer",
    "MoE",
    "RMSNorm",
    "SequenceContext",
    "build_mixer",
    "mixer_class",
]
