"""Tokens routed to each expert in one optimizer step, for every MoE layer: counted by a forward hook on each
router, summed over micro-batches and data-parallel ranks. Two readers: the expert-bias update
(:class:`hybridlm.train.optim.ExpertBiasHook`) and the ``moe_load_imbalance`` metric (:meth:`ExpertLoad.imbalance`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.canonical import canonical_name
from ..pattern import HybridPattern
from ..pattern.symbols import MOE


def moe_layer_keys(pattern: HybridPattern) -> list[str]:
    """The key of every MoE layer of ``pattern``, in canonical order: ``layer_<i>`` for canonical layer ``i`` of
    the main stack, then ``mtp_<d>_layer_<i>`` for layer ``i`` of MTP depth ``d``. A pure function of the pattern,
    so every pipeline rank lists the whole model's layers alike."""
    keys = [f"layer_{i}" for i, s in enumerate(pattern.layers) if s == MOE]
    keys += [
        f"mtp_{d}_layer_{i}" for d in range(pattern.mtp_depths) for i, s in enumerate(pattern.mtp_layers) if s == MOE
    ]
    return keys


def layer_key(module_name: str, pattern: HybridPattern) -> str:
    """The :func:`moe_layer_keys` key of the MoE mixer named ``module_name`` in a model built from ``pattern``
    (``blocks.3.layers.1.mixer``; wrappers of activation checkpointing, compile or FSDP allowed)."""
    parts = canonical_name(f"{module_name}.weight", pattern).split(".")  # layers.<i>.… or mtp.<d>.layers.<i>.…
    return f"mtp_{parts[1]}_layer_{parts[3]}" if parts[0] == "mtp" else f"layer_{parts[1]}"


class ExpertLoad:
    """Counts the tokens each MoE layer's router sends to each expert, into the layer's ``tokens_per_expert``.

    A forward hook on every router adds the router's top-k choices (``top_k`` per token, every input token)
    to the layer's counts in training mode, once per real forward: a forward inside a backward pass is an
    activation-checkpointing recomputation, whose routing was counted. Micro-batches of a step add up. The
    counts stay on the device: no host sync per layer or micro-batch. :meth:`reduce` sums them over the
    data-parallel ranks once per step; :meth:`reset` starts the next step.

    The hook is traced into a compiled block's graph (a scatter-add into a buffer): ``torch.compiler.disable``d,
    it split the graph at every router, which cost a small MoE model's CUDA-graphed steps a fifth of their speed.
    Under activation checkpointing torch's compiled checkpoint refuses the buffer update and the block runs as an
    eager checkpoint, where the recomputation is recognized and skipped.

    Args:
        model: the model (or one pipeline rank's union of stages) holding the MoE layers.
        group: data-parallel process group of :meth:`reduce` (default: the whole world).

    Attributes:
        layers: this model's MoE layers, in canonical order.
        keys: each layer's :func:`moe_layer_keys` key.
        pending: tokens were counted since the last :meth:`reset`.
    """

    def __init__(self, model: nn.Module, group=None) -> None:
        from ..layers.moe import MoE

        found = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        pattern = found[0][1].config.parsed if found else None
        order = moe_layer_keys(pattern) if pattern is not None else []
        keyed = sorted(((layer_key(name, pattern), m) for name, m in found), key=lambda km: order.index(km[0]))
        self.keys = [k for k, _ in keyed]
        self.layers = [m for _, m in keyed]
        self.group = group
        self.pending = False
        self._reduced = False
        self.handles = [m.gate.register_forward_hook(self._counter(m)) for m in self.layers]

    def _counter(self, layer: nn.Module):
        def count(router: nn.Module, args, output) -> None:
            if not layer.training:
                return
            # Eager, a forward inside a backward pass is a checkpoint recomputation: its routing was counted.
            # Compiled, the recomputation is part of the compiled backward, which replays no buffer update.
            if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
                return
            idx = output[2]  # (T, k) chosen experts
            with torch.no_grad():
                counts = layer.tokens_per_expert
                counts.scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=counts.dtype, device=idx.device))
            self.pending = True

        return count

    @torch.no_grad()
    def reduce(self) -> None:
        """Sum every layer's counts over the data-parallel ranks (when ``torch.distributed`` is initialized), in one
        collective; once per step: a second call before :meth:`reset` does nothing, and so does a step without a
        forward (no collective: ``torch.distributed.checkpoint`` steps the optimizer with none)."""
        if not self.pending or self._reduced:
            return
        self._reduced = True
        if self.layers and torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = torch.stack([m.tokens_per_expert for m in self.layers])  # (layers, E)
            torch.distributed.all_reduce(counts, group=self.group)
            for m, c in zip(self.layers, counts):
                m.tokens_per_expert.copy_(c)

    @torch.no_grad()
    def imbalance(self) -> torch.Tensor:
        """(len(layers),) float64 on the device: each layer's largest expert count over its mean count in this step,
        after :meth:`reduce` (1.0: perfectly balanced; at most ``E / top_k``, where one expert is chosen by
        every token). NaN for a layer that routed nothing. Reading it is the caller's one host sync."""
        self.reduce()
        if not self.layers:
            return torch.zeros(0, dtype=torch.float64)
        counts = torch.stack([m.tokens_per_expert for m in self.layers]).double()  # (layers, E)
        return counts.amax(dim=-1) / counts.mean(dim=-1)

    @torch.no_grad()
    def reset(self) -> None:
        """Zero the counts: the next step starts."""
        self.pending = self._reduced = False
        for m in self.layers:
            m.tokens_per_expert.zero_()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
