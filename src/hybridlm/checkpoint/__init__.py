"""Checkpoints: the canonical layout, safetensors weights, DCP training state, and format adapters."""

from .canonical import canonical_name, from_canonical, model_name, to_canonical

__all__ = ["canonical_name", "from_canonical", "model_name", "to_canonical"]
