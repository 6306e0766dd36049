"""AdamW with parameter groups, and learning-rate schedules (warmup, then cosine, WSD or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..parallel.execution import replicated
from .config import OptimConfig

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

    A forward hook on each MoE router adds the tokens it routes to each expert to the layer's
    ``tokens_per_expert`` (training mode only), once per real forward: a recomputation under
    activation checkpointing runs inside the backward pass and is not counted. Micro-batches of
    one step therefore add up. Before each optimizer step the counts are summed over the
    data-parallel ranks (when ``torch.distributed`` is initialized; over ``group`` if given), each
    layer's bias moves by ``rate`` (``MoE.update_expert_bias``) and the counts restart from zero.
    A step that is skipped (non-finite) never calls the hook: call :meth:`reset` then. A step with
    no forward since the last one does nothing, no collective either: ``torch.distributed.checkpoint``
    steps the optimizer once with zero gradients to create its state when loading or saving.

    Args:
        optimizer: the optimizer whose steps carry the update.
        model: the model (or one pipeline rank's union of stages) holding the MoE layers.
        rate: bias step per optimizer step.
        group: data-parallel process group (default: the whole world).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, rate: float, group=None) -> None:
        from ..layers.moe import MoE

        self.layers = [m for m in model.modules() if isinstance(m, MoE) and m.config.moe_router_expert_bias]
        self.rate, self.group = rate, group
        self.pending = False  # routed tokens were counted since the last update
        self.handles = [m.gate.register_forward_hook(self._counter(m)) for m in self.layers]
        self.handles.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.step()))

    def _counter(self, layer: nn.Module):
        @torch.compiler.disable  # bookkeeping, not part of a compiled block's graph
        def count(router: nn.Module, args, output) -> None:
            # Inside a backward pass a forward is a checkpoint recomputation: its routing was counted.
            if not layer.training or torch._C._current_graph_task_id() != -1:
                return
            idx = output[2]  # (T, k) chosen experts
            with torch.no_grad():
                counts = torch.zeros_like(layer.tokens_per_expert).scatter_add_(
                    0, idx.reshape(-1), torch.ones(idx.numel(), dtype=layer.tokens_per_expert.dtype, device=idx.device)
                )
                layer.tokens_per_expert += counts
            self.pending = True

        return count

    @torch.no_grad()
    def step(self) -> None:
        """Reduce the counts over data-parallel ranks, update every bias, zero the counts."""
        if not self.pending:
            return
        self.pending = False
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for m in self.layers:
                torch.distributed.all_reduce(m.tokens_per_expert, group=self.group)
        for m in self.layers:
            m.update_expert_bias(self.rate)

    @torch.no_grad()
    def reset(self) -> None:
        """Drop the counts of a step whose update was skipped."""
        self.pending = False
        for m in self.layers:
            m.tokens_per_expert.zero_()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
