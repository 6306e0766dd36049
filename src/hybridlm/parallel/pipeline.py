"""Pipeline stages: keep the blocks a rank runs (names unchanged), drop the rest."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..model import HybridLM, allocate, combine_losses
from ..pattern import PatternStage
from ..pattern.stage import select_stage


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
    model.embeds_input = stage.is_first
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
    stage = config.parsed.stage(pp_rank, pp_size, vp_stage)
    # Built with ``seed``: a stage asked for on meta is initialized later (to_empty, init_weights()) from it.
    model = prune_to_stage(HybridLM(config, seed=seed, device="meta"), stage)
    target = torch.device(device) if device is not None else torch.empty(0).device
    if target.type != "meta":
        allocate(model, target)
        model.init_weights(seed)
    return model


# -- running stages with torch.distributed.pipelining ----------------------------------------------

SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "looped-bfs": "ScheduleLoopedBFS",
}
# Not offered: torch's zero-bubble schedules split the backward into input and weight passes, which
# fails with these stages in torch 2.13 (tried with ScheduleInterleavedZeroBubble on 2 x 2 stages:
# "backward through the graph a second time" in the weight pass of a last stage holding a tied
# head and an MTP depth, "Can't detach views in-place" without them); the V-shaped ones place
# stages in another order than Megatron's.
SINGLE_STAGE = ("gpipe", "1f1b")


class _AddAuxGrad(torch.autograd.Function):
    """Return ``h`` unchanged; in the backward pass give ``aux`` the gradient 1.

    A stage before the last cannot add its MoE load-balancing loss to the loss (that lives on the
    last stage), so the loss rides on the stage's output: its gradient flows as if it had been added.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=torch.float32, device=grad.device)


class StageLM(HybridLM):
    """A HybridLM pruned to one pipeline stage (see :func:`prune_to_stage`), whose forward is the
    tensor-only interface a ``PipelineStage`` calls. Parameter names are the whole model's.

    Attributes:
        pattern_stage: the stage it runs.
        boundary_dtype: dtype of the hidden states sent to the next stage.
        residual_dtype: dtype the received hidden states are cast to, on a stage after the first (None: as they
            arrive): float32 keeps the residual stream in float32 under bf16 autocast, as one process does.
        aux_total: MoE load-balancing losses of this stage since the trainer last reset it
            (weighted, no gradient; for the logged loss).
    """

    pattern_stage: PatternStage
    boundary_dtype: torch.dtype = torch.float32
    residual_dtype: torch.dtype | None = None
    aux_total: torch.Tensor | float = 0.0

    def forward(
        self,
        x: torch.Tensor,
        *,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        doc_ids: torch.Tensor,
        weight: torch.Tensor,
    ):
        """The forward ``PipelineStage`` calls: tensors in, tensors out.

        Args:
            x: (B, L) token ids on the first stage, (B, L, hidden) hidden states on the others.
            input_ids: (B, L) token ids (MTP depths on the last stage embed them again).
            labels: (B, L) next-token labels, -100 ignored.
            doc_ids: (B, L) document index of each position: every stage masks at document changes.
            weight: (B, 1 + MTP depths) each row's share of the step's loss, per head: its labels of
                the main head and of each MTP depth over that head's labels in the step (all
                data-parallel ranks; see :func:`hybridlm.model.combine_losses`), so the micro-batch
                losses add up to the whole batch's and gradients are summed, not averaged.

        Returns:
            (B, L, hidden) hidden states on a stage before the last; on the last, the weighted loss
            (0-d) and the weighted loss of each head without gradient (1 + MTP depths,): the main
            head's, then each depth's.
        """
        stage = self.pattern_stage
        shares = weight.sum(0)  # this micro-batch's share of each head's labels
        if not stage.is_first and torch.is_grad_enabled() and x.is_leaf and not x.requires_grad:
            # x is the stage's receive buffer. torch <= 2.11 creates those buffers once, when the
            # schedule first runs, and marks them as needing gradients only if that first run
            # had a backward: an evaluation before the first training step leaves them without,
            # and the next backward has no gradient to send back ("gradients None"). Mark it here.
            x.requires_grad_(True)
        out = super().forward(
            input_ids=input_ids,
            labels=labels if stage.is_last else None,
            doc_ids=doc_ids,
            hidden_states=None if stage.is_first else x if self.residual_dtype is None else x.to(self.residual_dtype),
            return_logits=False,
        )
        if stage.is_last:
            scale = self.config.mtp_loss_scale
            loss = combine_losses(out.lm_loss, out.mtp_losses, out.aux_loss, scale, shares)
            return loss, torch.stack([out.lm_loss, *out.mtp_losses]).detach() * shares
        h = out.hidden_states.to(self.boundary_dtype)
        if out.aux_loss is not None:  # like the last stage's: under the main head's share
            aux = out.aux_loss * shares[0]
            self.aux_total = self.aux_total + aux.detach()
            h = _AddAuxGrad.apply(h, aux)
        return h


def rank_stages(config: ModelConfig, pp_rank: int, pp_size: int, warn: bool = False) -> list[PatternStage]:
    """The pattern stages pipeline rank ``pp_rank`` runs, in order: one per ``|`` segment it owns
    (virtual stages ``vp`` at segment ``vp * pp_size + pp_rank``, Megatron's order), or its share of
    the legacy split of a pattern without ``|`` (whose deprecation is logged only with ``warn``: once,
    where a rank builds its stages, not at every check)."""
    p = config.parsed
    n_seg = len(p.segments)
    if n_seg == 1 or n_seg == pp_size or pp_size == 1:
        return [select_stage(p, pp_rank, pp_size, None, None, None, warn)]
    return [select_stage(p, pp_rank, pp_size, vp, None, None, warn) for vp in range(n_seg // pp_size)]


def build_pipeline_model(
    config: ModelConfig, pp_rank: int, pp_size: int, seed: int = 0
) -> tuple[nn.Module, list[nn.Module]]:
    """The stages of one pipeline rank, built on the meta device, and one HybridLM viewing them all; ``seed``: what
    their ``init_weights()`` (and :func:`hybridlm.parallel.execution.init_sharded`'s caller) initialize from.

    Returns:
        ``(rank_model, stage_models)``: each stage model is pruned to its stage; ``rank_model`` is a
        HybridLM holding the same module objects (the union of the stages), so optimizer,
        checkpoints and counting see one model with the whole model's names.
    """
    stages = rank_stages(config, pp_rank, pp_size, warn=True)
    models = []
    for st in stages:
        m = prune_to_stage(StageLM(config, seed=seed, device="meta"), st)
        m.pattern_stage = st
        m.boundary_dtype = torch.float32
        m.aux_total = 0.0
        models.append(m)
    rank = HybridLM(config, seed=seed, device="meta")
    rank.blocks = nn.ModuleDict(
        sorted(((k, b) for m in models for k, b in m.blocks.items()), key=lambda kb: int(kb[0]))
    )
    first = [m for m in models if m.pattern_stage.is_first]
    last = [m for m in models if m.pattern_stage.is_last]
    holders = first or [m for m in last if m.embeddings is not None]
    rank.embeddings = holders[0].embeddings if holders else None
    rank.norm_f = last[0].norm_f if last else None
    rank.lm_head = last[0].lm_head if last else None
    rank.mtp = last[0].mtp if last else nn.ModuleList()
    return rank, models


def make_schedule(name: str, stages: list, microbatches: int, loss_fn):
    """A ``torch.distributed.pipelining`` schedule by its run-file name (see :data:`SCHEDULES`).

    Gradients are not rescaled by the schedule: the stages' losses are already weighted."""
    from torch.distributed import pipelining

    cls = getattr(pipelining, SCHEDULES[name])
    target = stages[0] if name in SINGLE_STAGE else stages
    return cls(target, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
