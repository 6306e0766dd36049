"""Mixture of experts: a top-k router and experts run as one batched computation over sorted tokens.

Routing (computed in float32, as NemotronH does; in float64 in a float64 model)::

    scores = softmax(x W^T) or sigmoid(x W^T)                      (T, E)
    choice = scores + expert_bias                                  (the bias only steers selection)
    group-limited: keep the topk_groups groups whose best two choice-scores sum highest
    idx    = top_k(choice);  w = scores[idx]  (/ sum, if moe_norm_topk_prob)  * moe_routed_scaling
    y      = sum_k w_k expert_{idx_k}(x)  + shared_expert(x)  (* sigmoid(x W_g^T), if moe_shared_expert_gate)

Training adds the router's losses (Megatron-LM's, recorded in the caller's ``aux_losses``; :func:`balancing_loss`,
:func:`z_loss`): load balancing over the micro-batch's tokens (``moe_aux_loss_type`` "aux_loss"), per sequence
("seq_aux_loss", DeepSeek-V3's) or with the routed-token shares of every data-parallel rank's micro-batches of the
step so far ("global_aux_loss", Qwen's global-batch balancing as Megatron-LM counts it; :attr:`Router.count_reducer`),
weighted by ``moe_aux_loss_coeff``, and ST-MoE's router z-loss, weighted by ``moe_z_loss_coeff``.

Names follow Hugging Face NemotronH: ``gate.weight``, ``gate.e_score_correction_bias``,
``experts.up_proj`` (E, F, H), ``experts.down_proj`` (E, H, F), ``shared_experts.*``; the shared expert's
gate, which NemotronH lacks, is Qwen3-Next's ``shared_expert_gate.weight`` (1, H) (Megatron-LM:
``shared_experts.gate_weight``, the same (1, H)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.dispatch import kernels_mode, record
from ..ops.precision import accumulation_dtype, matmul_dtype
from ..ops.routing import route
from .context import SequenceContext
from .init import normal_
from .mlp import MLP, activate


class Router(nn.Module):
    #: ``"global_aux_loss"``'s routed-pair counts: (S, E) int64 of this micro-batch -> (S, E) of every data-parallel
    #: rank's micro-batches of the step so far (Megatron's), given by the training code that knows the ranks and the
    #: steps (``parallel.execution.share_expert_counts``); None (the model alone): the micro-batch's own counts.
    count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.weight = nn.Parameter(torch.empty(c.moe_num_experts, c.hidden_size))
        if c.moe_router_expert_bias:
            self.register_buffer("e_score_correction_bias", torch.empty(c.moe_num_experts), persistent=True)

    def forward(
        self, x: torch.Tensor, aux_losses: list[torch.Tensor] | None = None, sequences: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, H) -> (scores (T, E), weights (T, k), indices (T, k) int64); scores and weights float32
        (float64 for float64 ``x``).

        Args:
            aux_losses: where the router's training losses (0-d each) are recorded, with gradients on: the balancing
                loss where ``moe_aux_loss_coeff > 0``, the z-loss where ``moe_z_loss_coeff > 0``. A per-call list
                (the block's), so a recomputation under activation checkpointing records into its own.
            sequences: the sequences ``x``'s tokens are, in order, each ``T / sequences`` long (the per-sequence
                balancing loss's).
        """
        c = self.config
        # Routing decides which experts run: keep it float32 even under autocast (which would
        # otherwise run this linear in bf16 and flip near-tied top-k choices). A float64 model routes
        # in float64 (accumulation_dtype's rule): float32 logits there made its outputs depend on how
        # many tokens one call routes (cached decoding, batch size) at ~1e-9.
        acc = accumulation_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(acc), self.weight.to(acc))
        bias = self.e_score_correction_bias.to(acc) if c.moe_router_expert_bias else None
        scores, weights, idx = route(
            logits, c.moe_top_k, c.moe_router_score, bias, c.moe_num_groups, c.moe_topk_groups, c.moe_norm_topk_prob,
            c.moe_routed_scaling,
        )  # fmt: skip
        if aux_losses is not None and torch.is_grad_enabled():
            if c.moe_aux_loss_coeff > 0:
                kind = c.moe_aux_loss_type
                normed = scores if c.moe_router_score == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
                reduce = self.count_reducer if kind == "global_aux_loss" else None
                loss = balancing_loss(normed, idx, sequences if kind == "seq_aux_loss" else 1, reduce)
                aux_losses.append(c.moe_aux_loss_coeff * loss)
            if c.moe_z_loss_coeff > 0:
                aux_losses.append(c.moe_z_loss_coeff * z_loss(logits))
        return scores, weights, idx


def balancing_loss(
    probs: torch.Tensor,
    idx: torch.Tensor,
    sequences: int = 1,
    reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Switch-style load balancing, unweighted: ``E * sum_e f_e * P_e`` with ``f_e`` the share of the routed (token,
    expert) pairs that go to expert ``e`` and ``P_e`` the mean of ``e``'s probability over the tokens, taken within
    each of ``sequences`` equal runs of tokens and averaged over them (1: the whole batch, Megatron's "aux_loss";
    the batch's rows: DeepSeek-V3's sequence-wise loss, Megatron's "seq_aux_loss").

    Args:
        probs: (T, E) routing probabilities (each row sums to 1; sigmoid scores normalized first), T a multiple of
            ``sequences``.
        idx: (T, k) chosen experts.
        reduce_counts: the (S, E) routed-pair counts with more counted in (Megatron's "global_aux_loss": other
            processes' and the step's earlier micro-batches': ``f_e`` the share over all of those tokens, ``P_e``
            this micro-batch's own). Called whatever ``T``, so that every rank joins its collective.

    Returns:
        A 0-d tensor in ``probs``' dtype; 0 for no tokens.
    """
    T, E = probs.shape
    # Counts per run by scatter_add, not bincount: bincount sizes its output from the data (a host sync on CUDA).
    pairs = idx.reshape(sequences, -1)
    counts = torch.zeros(sequences, E, dtype=torch.long, device=probs.device).scatter_add_(
        1, pairs, torch.ones_like(pairs)
    )
    if reduce_counts is not None:
        counts = reduce_counts(counts)
    if T == 0:  # an empty batch balances nothing: 0, not 0 / 0
        return probs.sum() * 0.0
    # (S, E): each run's pairs (T k / S here, all ranks' with reduce_counts), then float64 in a float64 model
    share = counts.to(probs.dtype) / counts.sum(dim=-1, keepdim=True).to(probs.dtype)
    mean_prob = probs.reshape(sequences, T // sequences, E).mean(dim=1)  # (S, E)
    return E * (share * mean_prob).sum(dim=-1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss, unweighted: the mean over tokens of ``logsumexp_e(logits)^2``, which keeps the router's
    logits small (Megatron-LM's ``moe_z_loss_coeff``). logits: (T, E) -> 0-d; 0 for no tokens."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


class Experts(nn.Module):
    """All routed experts' weights, stacked: (E, out, in) per projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        E, H, Fe = c.moe_num_experts, c.hidden_size, c.resolved_moe_ffn_hidden_size
        self.activation = c.mlp_activation
        self.up_proj = nn.Parameter(torch.empty(E, Fe, H))
        if self.activation == "swiglu":
            self.gate_proj = nn.Parameter(torch.empty(E, Fe, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, Fe))

    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run tokens sorted by expert.

        Args:
            xs: (N, H) token rows, grouped by expert in expert order.
            counts: (E,) rows per expert.
        """
        dtype = matmul_dtype(xs)
        if (
            kernels_mode("moe_experts") != "torch"
            and xs.is_cuda
            and dtype == torch.bfloat16
            and hasattr(F, "grouped_mm")
            # grouped_mm needs 16-byte aligned strides: bf16 widths a multiple of 8 (measured: other
            # widths raise "strides should be multiple of 16 bytes"); others take the loop below.
            and self.up_proj.shape[-1] % 8 == 0
            and self.up_proj.shape[-2] % 8 == 0
        ):
            # All experts in one grouped GEMM per projection, offsets computed on the device: no
            # host sync. Explicit bf16 casts: autocast does not cover grouped_mm, and the
            # parameters (float32 master weights) and rows (float32 residual stream) may differ.
            record("moe_experts", "grouped_mm")
            offs = counts.cumsum(0).to(torch.int32)
            xs = xs.to(dtype)

            def proj(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                # inp.to: CUDA autocast runs pow (relu²'s square) in float32.
                return F.grouped_mm(inp.to(dtype), w.to(dtype).transpose(-2, -1), offs=offs)

            gate = proj(xs, self.gate_proj) if self.activation == "swiglu" else None
            h = activate(proj(xs, self.up_proj), self.activation, gate)
            return proj(h, self.down_proj)
        if xs.is_cuda and torch.cuda.is_current_stream_capturing():
            record("moe_experts", "dense")
            return self.dense(xs, counts)
        record("moe_experts", "loop")
        # Portable path: one matmul per expert over its contiguous slice of sorted rows (the
        # split sizes need the counts on the host: one sync).
        outs = []
        xs = xs.to(dtype)
        for e, rows in enumerate(torch.split(xs, counts.tolist())):
            if rows.shape[0] == 0:
                continue
            gate = F.linear(rows, self.gate_proj[e].to(dtype)) if self.activation == "swiglu" else None
            h = activate(F.linear(rows, self.up_proj[e].to(dtype)), self.activation, gate)
            outs.append(F.linear(h, self.down_proj[e].to(dtype)))
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])

    def dense(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert on every row, each row keeping its own expert's output: no host sync, so a
        CUDA graph can capture it (the decode step of a float32 model, a few rows); E times the
        work, so never the training path.

        Args:
            xs: (N, H) token rows, grouped by expert in expert order.
            counts: (E,) rows per expert.
        """
        dtype = matmul_dtype(xs)
        xs = xs.to(dtype)
        ends = counts.cumsum(0)
        expert = torch.searchsorted(ends, torch.arange(xs.shape[0], device=xs.device), right=True)  # (N,)
        out = xs.new_zeros(xs.shape[0], self.down_proj.shape[1])
        for e in range(self.down_proj.shape[0]):
            gate = F.linear(xs, self.gate_proj[e].to(dtype)) if self.activation == "swiglu" else None
            h = activate(F.linear(xs, self.up_proj[e].to(dtype)), self.activation, gate)
            out = torch.where((expert == e)[:, None], F.linear(h, self.down_proj[e].to(dtype)), out)
        return out


class MoE(nn.Module):
    """The ``E`` mixer. Input and output (B, L, hidden_size)."""

    keep_fp32 = ("gate.weight", "gate.e_score_correction_bias")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config)
        if config.moe_shared_expert_ffn_hidden_size:
            self.shared_experts = MLP(config, config.moe_shared_expert_ffn_hidden_size)
        if config.moe_shared_expert_gate:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        # Tokens routed to each expert since the last expert-bias update (no gradient). The model never
        # writes it: the training hook (``hybridlm.train.expert_load.ExpertLoad``) counts the router's
        # choices once per real forward; ``hybridlm.train.optim.ExpertBiasHook`` applies the update before
        # each optimizer step, and the trainer's ``moe_load_imbalance`` metric reads them. Integers: exact
        # at any batch size (float32 stops counting at 2^24), and untouched by ``model.to(torch.bfloat16)``.
        self.register_buffer(
            "tokens_per_expert", torch.zeros(config.moe_num_experts, dtype=torch.int64), persistent=False
        )

    #: ``forward`` takes ``aux_losses``: a list owned by the caller for this one call.
    has_aux_loss = True

    def forward(
        self, x: torch.Tensor, ctx: SequenceContext | None = None, aux_losses: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x: (B, L, H) -> (B, L, H).

        Args:
            aux_losses: where the router's training losses are recorded (:meth:`Router.forward`).
        """
        c = self.config
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        k = c.moe_top_k
        _, weights, idx = self.gate(flat, aux_losses, sequences=shape[0] if x.dim() == 3 else 1)  # (B, L, H): B

        # Sort the T*k (token, expert) pairs by expert so each expert's rows are contiguous.
        pair_expert = idx.reshape(-1)
        order = torch.argsort(pair_expert, stable=True)
        pair_token = order // k
        # scatter_add, not bincount: bincount sizes its output from the data (a host sync on CUDA).
        counts = torch.zeros(c.moe_num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, pair_expert, torch.ones_like(pair_expert)
        )
        # (Rows gathered in, then scattered back with index_add_: a route that wrote each row once, in pair order, and
        # summed a token's parts in float32 was 2.6 % slower eagerly and failed compiled on an H100, design.md.)
        out = self.experts(flat[pair_token], counts)
        out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        y = torch.zeros_like(flat).index_add_(0, pair_token, out.to(flat.dtype))
        if c.moe_shared_expert_ffn_hidden_size:
            y = y + self.shared(flat)
        return y.reshape(shape)

    def shared(self, flat: torch.Tensor) -> torch.Tensor:
        """The shared expert on every token, scaled by its per-token gate if there is one: (T, H) -> (T, H)."""
        out = self.shared_experts(flat)
        if self.config.moe_shared_expert_gate:
            out = out * torch.sigmoid(self.shared_expert_gate(flat))  # (T, 1): one scale per token
        return out

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts, lower over-loaded ones,
        from ``tokens_per_expert``, then zero the counts (``rate=0`` only zeroes them)."""
        if self.config.moe_router_expert_bias and self.tokens_per_expert.sum() > 0:
            load = self.tokens_per_expert.double()
            bias = self.gate.e_score_correction_bias
            if rate and bias.dtype.itemsize < 4:  # bf16 rounds a step of 1e-3 away from |bias| 0.5 on: no balancing
                raise TypeError(
                    f"gate.e_score_correction_bias is {str(bias.dtype).removeprefix('torch.')}, which rounds a step "
                    f"of {rate:g} away: cast the model with HybridLM.cast(dtype), which keeps it float32, not .to(dtype)"
                )
            bias += rate * torch.sign(load.mean() - load).to(bias.dtype)
        self.tokens_per_expert.zero_()

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator | None, std: float, out_std: float) -> None:
        normal_(self.gate.weight, std, gen)
        if self.config.moe_router_expert_bias:
            nn.init.zeros_(self.gate.e_score_correction_bias)
        normal_(self.experts.up_proj, std, gen)
        if self.config.mlp_activation == "swiglu":
            normal_(self.experts.gate_proj, std, gen)
        normal_(self.experts.down_proj, out_std, gen)
        if self.config.moe_shared_expert_ffn_hidden_size:
            self.shared_experts.init_weights(gen, std, out_std)
        if self.config.moe_shared_expert_gate:  # drawn last: a model without the gate draws as before
            normal_(self.shared_expert_gate.weight, std, gen)
        self.tokens_per_expert.zero_()

    @staticmethod
    def flops_per_token(c: ModelConfig, seq_len: int) -> float:
        mult = 3 if c.mlp_activation == "swiglu" else 2
        flops = 2 * c.hidden_size * c.moe_num_experts  # router
        flops += c.moe_top_k * 2 * c.hidden_size * c.resolved_moe_ffn_hidden_size * mult
        flops += 2 * c.hidden_size * c.moe_shared_expert_ffn_hidden_size * mult
        if c.moe_shared_expert_gate:
            flops += 2 * c.hidden_size  # the gate's (H -> 1) projection
        return flops


def moe_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: route each token, then loop over experts with a mask, in the dtype of ``x`` (slow; for tests)."""
    c = layer.config
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ layer.gate.weight.T
    scores = logits.softmax(-1) if c.moe_router_score == "softmax" else logits.sigmoid()
    choice = scores.clone()
    if c.moe_router_expert_bias:
        choice = choice + layer.gate.e_score_correction_bias
    E, G = c.moe_num_experts, c.moe_num_groups
    if G > 1:
        group_score = choice.view(-1, G, E // G).topk(min(2, E // G), -1).values.sum(-1)
        top_groups = group_score.topk(c.moe_topk_groups, -1).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, top_groups, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(E // G, 1), float("-inf"))
    idx = choice.topk(c.moe_top_k, -1).indices
    w = scores.gather(1, idx)
    if c.moe_norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * c.moe_routed_scaling
    y = torch.zeros_like(flat)
    ex = layer.experts
    for e in range(E):
        hit = idx == e  # (T, k)
        tokens = hit.any(-1)
        if not tokens.any():
            continue
        xe = flat[tokens]
        gate = xe @ ex.gate_proj[e].T if c.mlp_activation == "swiglu" else None
        he = activate(xe @ ex.up_proj[e].T, c.mlp_activation, gate) @ ex.down_proj[e].T
        y[tokens] += (w * hit).sum(-1)[tokens].unsqueeze(-1) * he
    if c.moe_shared_expert_ffn_hidden_size:
        s = layer.shared_experts
        gate = flat @ s.gate_proj.weight.T if c.mlp_activation == "swiglu" else None
        shared = activate(flat @ s.up_proj.weight.T, c.mlp_activation, gate) @ s.down_proj.weight.T
        if c.moe_shared_expert_gate:
            shared = shared / (1 + torch.exp(-(flat @ layer.shared_expert_gate.weight.T)))  # (T, 1)
        y += shared
    return y.reshape(x.shape)
