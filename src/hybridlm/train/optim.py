"""AdamW with parameter groups, and learning-rate schedules (warmup, then cosine, WSD or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig

#: Parameters never decayed: scales and offsets whose size is not a capacity knob.
NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "bias")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights (every 1-D ``weight``), biases, and Mamba/GDN's A_log, D and dt_bias."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in NO_DECAY_NAMES or param.dim() < 2


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + keep) and bool(decay + keep)
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
