"""Pipeline stages: keep the blocks a rank runs (names unchanged), drop the rest."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..pattern import PatternStage


def prune_to_stage(model: nn.Module, stage: PatternStage) -> nn.Module:
    """Delete the blocks outside ``stage`` and the parts only the first/last stage needs.

    Blocks keep their global names (``blocks.{b}``), so canonical checkpoints load into a stage
    directly. The last stage keeps the embedding when the head is tied to it or MTP depths need it.
    """
    keep = set(range(stage.block_offset, stage.block_offset + stage.num_blocks))
    for key in list(model.blocks):
        if int(key) not in keep:
            del model.blocks[key]
    needs_embedding = stage.is_first or (stage.is_last and (model.config.tie_embeddings or len(model.mtp) > 0))
    if not needs_embedding:
        model.embeddings = None
    if not stage.is_last:
        model.norm_f = None
        model.lm_head = None
        model.mtp = nn.ModuleList()
    return model


def build_stage(
    config: ModelConfig,
    pp_rank: int,
    pp_size: int,
    vp_stage: int | None = None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The part of ``HybridLM(config)`` that pipeline rank ``pp_rank`` (virtual stage ``vp_stage``) runs.

    Built on the meta device, pruned, then allocated and initialized: weights equal the whole
    model's for the same seed.
    """
    from ..model import HybridLM

    stage = config.parsed.stage(pp_rank, pp_size, vp_stage)
    model = prune_to_stage(HybridLM(config, device="meta"), stage)
    target = torch.device(device) if device is not None else torch.empty(0).device
    if target.type != "meta":
        model.to_empty(device=target)
        model.init_weights(seed)
    return model
