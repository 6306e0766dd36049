"""AdamW with parameter groups, and learning-rate schedules (warmup, then cosine, WSD or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..parallel.execution import replicated
from .config import OptimConfig
from .expert_load import ExpertLoad

#: Parameters never decayed: scales and offsets whose size is not a capacity knob.
NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "bias")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights (every 1-D ``weight``), biases, and Mamba/GDN's A_log, D and dt_bias."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in NO_DECAY_NAMES or param.dim() < 2


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters: decayed, and not (:func:`no_weight_decay`). Under FSDP
    the parameters it leaves whole (``parallel.execution.apply_fsdp``) get groups of their own: foreach
    and fused kernels refuse to mix shards (DTensors) with plain tensors."""
    split: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            split.setdefault((no_weight_decay(name, p), replicated(p)), []).append(p)
    groups = [
        {"params": split[kind], "weight_decay": 0.0 if kind[0] else cfg.weight_decay}
        for kind in sorted(split, key=lambda kind: (kind[0], not kind[1]))  # decayed first, as before
    ] or [{"params": []}]
    params = [p for group in groups for p in group["params"]]
    fused = all(p.is_cuda for p in params) and bool(params)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based) of ``total``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # WSD: hold the peak, then decay linearly to the floor over the last decay_fraction of the run.
    decay_steps = max(1, round(total * cfg.decay_fraction))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


class ExpertBiasHook:
    """Aux-loss-free expert balancing (DeepSeek-V3) as one optimizer pre-step hook.

    The tokens routed to each expert are counted by :class:`~hybridlm.train.expert_load.ExpertLoad` (its
    forward hooks, once per real forward: a recomputation under activation checkpointing is not counted;
    micro-batches of one step add up), held as :attr:`load`. Before each optimizer step the counts are
    summed over the data-parallel ranks (when ``torch.distributed`` is initialized; over ``group`` if given),
    each layer with an expert bias moves it by ``rate`` (``MoE.update_expert_bias``) and every count restarts
    from zero. A step that is skipped (non-finite) never calls the hook: call :meth:`reset` then. A step with
    no forward since the last one does nothing, no collective either: ``torch.distributed.checkpoint``
    steps the optimizer once with zero gradients to create its state when loading or saving.

    Args:
        optimizer: the optimizer whose steps carry the update.
        model: the model (or one pipeline rank's union of stages) holding the MoE layers.
        rate: bias step per optimizer step.
        group: data-parallel process group (default: the whole world).

    Attributes:
        load: the counts of every MoE layer (also those without a bias: the ``moe_load_imbalance`` metric's).
        layers: the MoE layers with an expert bias.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, rate: float, group=None) -> None:
        self.load = ExpertLoad(model, group)
        self.layers = [m for m in self.load.layers if m.config.moe_router_expert_bias]
        self.rate = rate
        self.handles = [optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.step())]

    @property
    def pending(self) -> bool:
        """Routed tokens were counted since the last update."""
        return self.load.pending

    @torch.no_grad()
    def step(self) -> None:
        """Reduce the counts over data-parallel ranks, update every bias, zero the counts."""
        if not self.load.pending:
            return
        self.load.reduce()  # (nothing where the trainer's metric reduced them this step already)
        for m in self.layers:
            m.update_expert_bias(self.rate)
        self.load.reset()

    def reset(self) -> None:
        """Drop the counts of a step whose update was skipped."""
        self.load.reset()

    def remove(self) -> None:
        self.load.remove()
        for h in self.handles:
            h.remove()
