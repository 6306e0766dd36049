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


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` each block in place (parameter names are unchanged).

    On CPU, inductor's vectorized C++ code for the chunked SSD backward corrupts the heap now and
    then in torch 2.13 ("double free or corruption" with sequence lengths that need padding), so
    CPU blocks are compiled with scalar C++ code (``cpp.simdlen = 1``) unless the caller passes
    its own ``options``. GPU code generation is unaffected.
    """
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and "options" not in compile_kwargs:
        compile_kwargs = {**compile_kwargs, "options": {"cpp.simdlen": 1}}
    for block in _all_blocks(model):
        block.compile(**compile_kwargs)
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
