"""How blocks execute: activation checkpointing, torch.compile and FSDP2 sharding, applied per block.

A fused ``[XY]`` block is one unit for each of them: recomputed as a whole, compiled as one graph
and sharded as one FSDP group. Order (as torchtitan): checkpointing, then compile, then FSDP.
"""

from __future__ import annotations

import torch
from torch import nn


def _all_blocks(model: nn.Module):
    yield from model.blocks.values()
    for depth in model.mtp:
        yield from depth.blocks.values()


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every block in the backward pass instead of storing its activations."""
    for block in _all_blocks(model):
        block.activation_checkpointing = True
    return model


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """``torch.compile`` each block in place (parameter names are unchanged)."""
    for block in _all_blocks(model):
        block.compile(**options)
    return model


def apply_fsdp(model: nn.Module, mesh=None, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard parameters over the data-parallel processes with FSDP2, one group per block.

    Args:
        mesh: a 1-D device mesh (default: all processes).
        param_dtype: compute dtype of gathered parameters (e.g. bfloat16); gradients are reduced
            in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for block in _all_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
