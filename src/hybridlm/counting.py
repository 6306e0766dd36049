"""Parameter and FLOP counts, split per layer kind.

FLOPs are forward matmul FLOPs (2 per multiply-add) of what the model runs: projections, the
output head, attention scores and weighted values over all keys (no causal halving, the PaLM
convention), and the batched products of the chunked Mamba2/GDN scans. Elementwise work,
convolutions written as shifted adds and triangular solves are not counted. A training step costs
about three times the forward.

Active parameters (``num_params(model, active=True)``, the "A3B" of "30B-A3B") are those one token's
forward uses: each MoE layer counts its router, its top-k routed experts out of all of them, its shared
expert and gate, and its norm; every other part counts whole, the embedding included (as in the total,
unless ``exclude_embeddings``), though a token reads one row of it.
"""

from __future__ import annotations

from .config import ModelConfig
from .layers import mixer_class
from .layers.moe import MoE


class PerKind(float):
    """A total that also remembers its parts: ``float(x)``, ``x.by_kind``, ``x["M"]``."""

    by_kind: dict[str, float]

    def __new__(cls, by_kind: dict[str, float]) -> PerKind:
        obj = super().__new__(cls, sum(by_kind.values()))
        obj.by_kind = dict(by_kind)
        return obj

    def __getitem__(self, kind: str) -> float:
        return self.by_kind[kind]

    def __reduce__(self):  # copy and pickle rebuild it from its parts (float's own would pass the total)
        return (PerKind, (self.by_kind,))

    def __repr__(self) -> str:
        parts = ", ".join(f"{k!r}: {v:.4g}" for k, v in self.by_kind.items())
        return f"PerKind({float(self):.6g}; {parts})"


def flops_per_token(config: ModelConfig, seq_len: int) -> PerKind:
    """Forward FLOPs per token at ``seq_len``, keyed by layer symbol, ``"head"`` and ``"mtp"``."""
    if not hasattr(seq_len, "__index__") or isinstance(seq_len, bool) or seq_len < 0:
        raise ValueError(f"seq_len must be an integer >= 0 (0: the per-token projections alone), got {seq_len!r}")
    seq_len = int(seq_len)
    c, p = config, config.parsed
    per = {s: mixer_class(s).flops_per_token(c, seq_len) for s in c.symbols}
    by_kind: dict[str, float] = {}
    for s in p.layers:
        by_kind[s] = by_kind.get(s, 0.0) + per[s]
    head = 2 * c.hidden_size * c.vocab_size
    by_kind["head"] = head
    if p.mtp_depths:
        depth = 2 * (2 * c.hidden_size) * c.hidden_size + head + sum(per[s] for s in p.mtp_layers)
        by_kind["mtp"] = p.mtp_depths * depth
    return PerKind(by_kind)


def idle_expert_params(moe: MoE) -> int:
    """Parameters of an MoE layer one token leaves unused: its routed experts but the top-k it is sent to."""
    E, k = moe.config.moe_num_experts, moe.config.moe_top_k
    stacked = sum(t.numel() for t in moe.experts.parameters())  # (E, ., .) each: a multiple of E
    return stacked // E * (E - k)


def num_params(model, exclude_embeddings: bool = False, active: bool = False) -> PerKind:
    """Parameters of ``model`` keyed by layer symbol plus ``embeddings``, ``head``, ``norm_f`` and ``mtp``.

    Shared (tied) tensors count once. ``exclude_embeddings`` leaves out the input embedding. ``active``: only those
    a token uses (each MoE layer's top-k routed experts instead of all; see the module's docstring): the same
    parts, the ``E`` part and an ``mtp`` part with ``E`` layers smaller.
    """
    seen: set[int] = set()

    def count(module) -> int:
        n = 0
        for t in module.parameters():
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel()
        if active:
            n -= sum(idle_expert_params(m) for m in module.modules() if isinstance(m, MoE))
        return n

    by_kind: dict[str, float] = {}
    if model.embeddings is not None and not exclude_embeddings:
        by_kind["embeddings"] = count(model.embeddings)
    elif model.embeddings is not None:
        seen.add(id(model.embeddings.weight))
    for block in model.blocks.values():
        for layer in block.layers:
            by_kind[layer.symbol] = by_kind.get(layer.symbol, 0) + count(layer)
    if model.norm_f is not None:
        by_kind["norm_f"] = count(model.norm_f)
    if model.lm_head is not None:
        by_kind["head"] = count(model.lm_head)
    if len(model.mtp):
        by_kind["mtp"] = count(model.mtp)
    return PerKind(by_kind)
