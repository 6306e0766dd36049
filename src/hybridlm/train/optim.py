"""AdamW with parameter groups, and learning-rate schedules (warmup, then cosine, WSD or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..layers import MIXERS
from ..parallel.execution import replicated
from .config import OptimConfig
from .expert_load import ExpertLoad

#: Parameters never decayed: scales and offsets whose size is not a capacity knob.
NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "bias")

#: The norm weights ``optim.apply_wd_to_qk_layernorm`` decays, per pattern symbol (names inside that mixer): those
#: Megatron-LM's ``apply_wd_to_qk_layernorm`` decays, whose rule is a name match (``"q_layernorm." in name or
#: "k_layernorm." in name``), in the names its hybrid stack gives them (``checkpoint/megatron.py`` maps ours to
#: theirs). Attention's are ``self_attention.q_layernorm`` / ``k_layernorm`` (with ``model.qk_norm``); DSA's query
#: latent norm stands alone as ``q_layernorm``, while its key/value latent norm, ``kv_layernorm``, and the indexer's
#: ``k_norm`` do not match. MLA (``+``) has none: Megatron fuses both latent norms into the up projections
#: (``linear_q_up_proj.layer_norm_weight``, ``linear_kv_up_proj.layer_norm_weight``).
QK_NORMS: dict[str, tuple[str, ...]] = {
    "*": ("q_norm.weight", "k_norm.weight"),
    "D": ("q_a_layernorm.weight",),
}


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights (every 1-D ``weight``), biases, and Mamba/GDN's A_log, D and dt_bias."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in NO_DECAY_NAMES or param.dim() < 2


def qk_norm_symbols(config: ModelConfig) -> list[str]:
    """The pattern symbols of ``config`` (main stack and MTP depths) whose layers hold a norm of :data:`QK_NORMS`:
    attention's only with ``qk_norm``. Empty: ``optim.apply_wd_to_qk_layernorm`` decays nothing."""
    return [s for s in QK_NORMS if s in config.symbols and (s != "*" or config.qk_norm)]


def qk_norm_names(model: nn.Module) -> set[str]:
    """Full names (``model.named_parameters()``'s) of the norm weights of :data:`QK_NORMS` in ``model`` (a model,
    a pipeline rank's stages, any module holding mixers): each mixer's by its exact class, so DSA's (a subclass
    of MLA) are found and MLA's are not."""
    kinds = {MIXERS[s]: names for s, names in QK_NORMS.items()}
    found = set()
    for prefix, m in model.named_modules():
        if names := kinds.get(type(m)):
            own = dict(m.named_parameters())  # (attention without qk_norm has none of its names)
            found |= {f"{prefix}.{n}" if prefix else n for n in names if n in own}
    return found


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters: decayed, and not (:func:`no_weight_decay`); with
    ``cfg.apply_wd_to_qk_layernorm`` the q/k norm weights (:func:`qk_norm_names`) are decayed too, in the first
    group. Under FSDP the parameters it leaves whole (``parallel.execution.apply_fsdp``) get groups of their own:
    foreach and fused kernels refuse to mix shards (DTensors) with plain tensors."""
    decayed_norms = qk_norm_names(model) if cfg.apply_wd_to_qk_layernorm else set()
    split: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kept = no_weight_decay(name, p) and name not in decayed_norms
            split.setdefault((kept, replicated(p)), []).append(p)
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
