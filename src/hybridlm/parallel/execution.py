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


#: Recomputation policies a block can get: keep nothing, or keep the outputs of the matmuls and
#: attention kernels (the expensive, compute-bound ops) and recompute the rest (norms, activations,
#: the conv and the scans, which are memory-bound and cheap to redo).
AC_POLICIES = ("none", "full", "selective")


def parse_ac_policy(spec: str, default: str) -> dict[str, str]:
    """``"M=selective,*=full"`` -> {symbol: policy}; ``"selective"`` alone applies to every kind.

    A block's kind is its first symbol (the sequence mixer of a fused group). Kinds not named get
    ``default``. Raises ValueError naming the bad entry.
    """
    from ..pattern.symbols import LAYER_SYMBOLS as ALL_SYMBOLS

    out: dict[str, str] = {}
    spec = spec.strip()
    if not spec:
        return out
    if "=" not in spec:
        if spec not in AC_POLICIES:
            raise ValueError(f"{spec!r} is not one of {', '.join(AC_POLICIES)}")
        return {s: spec for s in ALL_SYMBOLS}
    for entry in spec.split(","):
        kind, _, policy = (x.strip() for x in entry.partition("="))
        if kind not in ALL_SYMBOLS:
            raise ValueError(f"{entry.strip()!r}: {kind!r} is not a layer symbol ({' '.join(ALL_SYMBOLS)})")
        if policy not in AC_POLICIES:
            raise ValueError(f"{entry.strip()!r}: {policy!r} is not one of {', '.join(AC_POLICIES)}")
        out[kind] = policy
    return out


def _save_matmuls_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_flash_attention_forward",
    )
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_context():
    """``context_fn`` for ``torch.utils.checkpoint``: save matmul / attention outputs, recompute the rest."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_matmuls_policy())


def apply_activation_checkpointing(model: nn.Module, policy: str = "full") -> nn.Module:
    """Recompute blocks in the backward pass instead of storing their activations.

    Args:
        policy: ``"full"`` (recompute every block whole), ``"selective"`` (keep matmul and
            attention outputs, recompute the rest), ``"none"``, or per block kind, e.g.
            ``"M=selective,*=full,-=none"`` (kinds not named are recomputed whole). A fused
            block is one unit; its kind is its sequence mixer's symbol.
    """
    per_kind = parse_ac_policy(policy, "full")
    for block in _all_blocks(model):
        chosen = per_kind.get(block.symbols[0], "full")
        block.activation_checkpointing = chosen != "none"
        block.checkpoint_context_fn = selective_context if chosen == "selective" else None
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
