"""The hybrid language model: embedding -> blocks -> final RMSNorm -> output head, plus MTP depths.

Assembly only: mixers live in ``hybridlm.layers``, kernels in ``hybridlm.ops``, parallelism in
``hybridlm.parallel``. Blocks are kept in a ``ModuleDict`` keyed by their global block index, so a
pipeline stage that deletes the blocks it does not run keeps the names of those it does, and the
canonical checkpoint layout (one entry per pattern symbol) is a pure function of the pattern.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layers import RMSNorm, SequenceContext, build_mixer, mixer_class
from .layers.context import positions_in_segment, segment_ids
from .layers.init import normal_
from .layers.rope import Yarn, rope_cos_sin
from .ops.attention import document_block_mask, use_flex
from .ops.cross_entropy import linear_cross_entropy
from .ops.norm import add_rms_norm
from .ops.precision import accumulation_dtype

IGNORE_INDEX = -100


class Layer(nn.Module):
    """One canonical layer: ``x + mixer(norm(x))``."""

    def __init__(self, symbol: str, config: ModelConfig) -> None:
        super().__init__()
        self.symbol = symbol
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_zero_centered)
        self.mixer = build_mixer(symbol, config)

    def forward(
        self, x: torch.Tensor, ctx: SequenceContext, aux_losses: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        return x + self.mix(self.norm(x), ctx, aux_losses)

    def mix(self, x: torch.Tensor, ctx: SequenceContext, aux_losses: list[torch.Tensor] | None) -> torch.Tensor:
        """The mixer on normed ``x``; a mixer with an auxiliary loss records it in ``aux_losses``."""
        if getattr(self.mixer, "has_aux_loss", False):
            return self.mixer(x, ctx, aux_losses)
        return self.mixer(x, ctx)

    def init_weights(self, gen: torch.Generator | None, std: float, out_std: float) -> None:
        self.norm.init_weights()
        self.mixer.init_weights(gen, std, out_std)


class Block(nn.Module):
    """One block of the pattern: a single layer, or a fused ``[XY]`` group (sequence then channel mixer).

    A fused block computes exactly ``h = x + X(norm_X(x)); out = h + Y(norm_Y(h))``, the same ops
    as the two unfused layers, so results agree bitwise. It is one unit for activation
    checkpointing, ``torch.compile`` and sharding, and ``add_rms_norm`` marks where the residual
    add and the next norm can become one kernel.

    Attributes:
        symbols: the block's pattern symbols, e.g. ``"*-"``.
        layer_offset: canonical index of the block's first layer.
        activation_checkpointing: recompute this block in the backward pass (set by
            ``hybridlm.parallel``).
        checkpoint_context_fn: ``torch.utils.checkpoint`` context_fn (selective recomputation
            policy) set with it, or None to recompute everything.
        seam_context_fn: a context_fn that only decides what a compiled block's backward keeps
            (``compile_blocks(save_seams=True)``, the default), applied while ``torch.compile`` traces the
            block and it is not checkpointed; run eagerly, the block ignores it.
    """

    def __init__(self, symbols: str, config: ModelConfig, layer_offset: int) -> None:
        super().__init__()
        self.symbols = symbols
        self.layer_offset = layer_offset
        self.layers = nn.ModuleList(Layer(s, config) for s in symbols)
        self.activation_checkpointing = False
        self.checkpoint_context_fn = None
        self.seam_context_fn = None

    @property
    def fused(self) -> bool:
        return len(self.layers) > 1

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, L, hidden) -> (output (B, L, hidden), the block's auxiliary losses, each 0-d).

        The losses are returned, not added to something in ``ctx``: FSDP2 hands each sharded
        block a copy of its dataclass arguments, so what one block put into ``ctx`` the next
        would not see (every MoE loss after the first was lost under data parallelism).
        """
        # Never recompute a cached forward: the recomputation would update the cache a second time.
        if self.activation_checkpointing and torch.is_grad_enabled() and ctx.cache is None:
            if self.checkpoint_context_fn is not None:
                out, aux = checkpoint(self._forward, x, ctx, use_reentrant=False, context_fn=self.checkpoint_context_fn)
            else:
                out, aux = checkpoint(self._forward, x, ctx, use_reentrant=False)
        elif self.seam_context_fn is not None and torch.compiler.is_compiling() and torch.is_grad_enabled():
            # Traced, the region only tags what the partitioner must save. Run eagerly (a graph
            # break inside it, or a backend that runs the traced graph as it is) the policy makes
            # it a plain checkpoint (``parallel.execution._seam_policy``).
            out, aux = checkpoint(self._forward, x, ctx, use_reentrant=False, context_fn=self.seam_context_fn)
        else:
            out, aux = self._forward(x, ctx)
        # Returned from here, outside the checkpointed function: a recomputation returns its own
        # copy, which the checkpoint discards (only its saved tensors are used): one term each.
        return out, aux

    def _forward(self, x: torch.Tensor, ctx: SequenceContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The block's computation: (output (B, L, hidden), its mixers' auxiliary losses, each 0-d)."""
        aux_losses: list[torch.Tensor] = []  # this call's own: never shared with a recomputation
        if len(self.layers) == 1:
            out = self.layers[0](x, ctx, aux_losses)
        else:
            seq, chan = self.layers
            h, normed = add_rms_norm(
                x, seq.mix(seq.norm(x), ctx, aux_losses), chan.norm.weight, chan.norm.eps, chan.norm.zero_centered
            )
            out = h + chan.mix(normed, ctx, aux_losses)
        return out, aux_losses

    def init_weights(self, gen_for, std: float, out_std: float) -> None:
        """``gen_for(i)`` gives the generator of canonical layer ``i``."""
        for j, layer in enumerate(self.layers):
            layer.init_weights(gen_for(self.layer_offset + j), std, out_std)


def run_blocks(blocks: nn.ModuleDict, x: torch.Tensor, ctx: SequenceContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``blocks`` in order on x (B, L, hidden): (output, every block's auxiliary losses in order)."""
    aux_losses: list[torch.Tensor] = []
    for block in blocks.values():
        x, aux = block(x, ctx)
        aux_losses += aux
    return x, aux_losses


def _sum(losses: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(losses).sum() if losses else None


def _blocks(config: ModelConfig, blocks: tuple[str, ...], offsets: tuple[int, ...]) -> nn.ModuleDict:
    return nn.ModuleDict({str(i): Block(sym, config, off) for i, (sym, off) in enumerate(zip(blocks, offsets))})


class OutputHead(nn.Linear):
    """The untied output projection (``lm_head.weight``, (V, hidden)).

    ``head(h)`` gives logits (B, L, V); ``head(h, labels)`` gives the mean cross entropy computed
    chunk by chunk (:func:`hybridlm.ops.cross_entropy.linear_cross_entropy`), never holding the
    logits of the whole batch. Both go through ``forward``, so FSDP2 gathers the sharded weight
    around either call.
    """

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, labels)


class MTPDepth(nn.Module):
    """One multi-token-prediction depth (Megatron / DeepSeek-V3 style).

    ``x = eh_proj([enorm(embed(tokens shifted d)), hnorm(h_prev)])``, then the MTP pattern's
    blocks, then ``final_norm``; the output head is the model's.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, p = config.hidden_size, config.parsed
        self.enorm = RMSNorm(H, config.norm_eps, config.norm_zero_centered)
        self.hnorm = RMSNorm(H, config.norm_eps, config.norm_zero_centered)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.blocks = _blocks(config, p.mtp_blocks, p.mtp_block_layer_offsets)
        self.final_norm = RMSNorm(H, config.norm_eps, config.norm_zero_centered)

    def forward(
        self, h_prev: torch.Tensor, emb: torch.Tensor, ctx: SequenceContext
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h_prev, emb (B, L, hidden) -> (the depth's normed output (B, L, hidden), its blocks' auxiliary losses)."""
        # The depth's residual stream in the embedding's dtype, as the main model's starts: under bf16 autocast
        # eh_proj returns bf16, and every block of the depth then added its output in bf16 (its logits 1.3x
        # further from float64 than the main head's, where the main stream stays float32).
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1)).to(emb.dtype)
        x, aux = run_blocks(self.blocks, x, ctx)
        return self.final_norm(x), aux


@dataclass
class ModelOutput:
    """What :meth:`HybridLM.forward` returns.

    Attributes:
        logits: (B, L, V) float32 next-token logits (float64 in a float64 model; None on a stage without the head
            and with ``return_logits=False``).
        loss: total loss when labels were given: ``lm_loss + mtp_loss_scale * mean(mtp_losses) + aux_loss``.
        lm_loss: cross entropy of the main head.
        mtp_losses: cross entropy of each MTP depth (depth d predicts the token d+1 places further).
        aux_loss: sum of the auxiliary losses: MoE load balancing and the DSA indexer loss (None without any).
        mtp_logits: (B, L, V) per MTP depth (the last ``logits_to_keep`` positions, as ``logits``).
        hidden_states: (B, L, hidden) output of the last block (before the final norm).
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    hidden_states: torch.Tensor | None = None


def _seed(seed: int, *key: object) -> int:
    try:  # an integer of any type (numpy, a 0-d tensor) seeds as that integer; bools and floats are refused
        seed = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        seed = None
    if seed is None:
        raise ValueError("seed must be an integer")
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


#: The dtypes a model can compute in. The float8 types are floating too, but storage formats: torch has no
#: add or matmul for them, and a model cast to one failed at its first forward ("add_stub" not implemented).
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def float_dtype(dtype: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """``dtype`` (a torch dtype or its name, ``"bfloat16"``), refused unless one of :data:`COMPUTE_DTYPES`."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not (isinstance(dtype, torch.dtype) and dtype in COMPUTE_DTYPES):
        names = ", ".join(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES)
        raise ValueError(f"{what} must be a floating torch.dtype the model computes in ({names}), got {dtype!r}")
    return dtype


def _check_tensors(hidden_size: int, **inputs: Any) -> None:
    """Refuse, by name, an input that is not a tensor (a list or a numpy array failed later with an
    AttributeError naming no argument) and ``hidden_states`` that are not (B, L, hidden_size)."""
    for name, value in inputs.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    h = inputs.get("hidden_states")
    if h is not None and (h.dim() != 3 or h.shape[-1] != hidden_size or not h.is_floating_point()):
        raise ValueError(f"hidden_states must be (B, L, {hidden_size}) floating point, got {tuple(h.shape)} {h.dtype}")


def _check_inputs(input_ids, labels, position_ids, rows: tuple[int, ...], logits_to_keep, vocab: int) -> None:
    """Refuse malformed inputs by name: shapes and dtypes always; token values where reading them
    costs no device synchronization (CPU tensors; on a GPU a bad id fails in the embedding and a bad
    label makes the loss NaN)."""
    if input_ids is not None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be (B, L) integer token ids, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if input_ids.device.type == "cpu" and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(f"input_ids: token ids must be in [0, {vocab}), got values from {low} to {high}")
    if labels is not None:
        if tuple(labels.shape) != rows or labels.dtype != torch.int64:
            raise ValueError(f"labels must be {rows} int64 like the input, got {tuple(labels.shape)} {labels.dtype}")
        if labels.device.type == "cpu":
            bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))]
            if bad.numel():
                raise ValueError(
                    f"labels: {int(bad[0])} is neither a token id in [0, {vocab}) nor the ignore index {IGNORE_INDEX}"
                )
    if position_ids is not None:  # (a (B, 1) tensor would broadcast over the positions silently)
        B, L = rows
        integer = position_ids.dtype in (torch.int64, torch.int32)
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != L or not integer:
            raise ValueError(
                f"position_ids must be ({B}, {L}) or (1, {L}) integer positions, "
                f"got {tuple(position_ids.shape)} {position_ids.dtype}"
            )
    if type(logits_to_keep) is not int or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 = all positions), got {logits_to_keep!r}")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype where that is wider (a float64 model keeps float64 logits)."""
    return x.to(accumulation_dtype(x))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy over labels != -100 (0 when there are none)."""
    total = F.cross_entropy(
        _at_least_float32(logits.reshape(-1, logits.shape[-1])),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def shift_labels(labels: torch.Tensor, shift: int, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """Labels ``shift`` positions further on (``out[t] = labels[t + shift]``), ignored past the end
    and wherever position ``t + shift`` lies in another document."""
    out = torch.full_like(labels, IGNORE_INDEX)
    if shift >= labels.shape[1]:
        return out
    out[:, :-shift] = labels[:, shift:]
    if seq_idx is not None:
        same = torch.zeros_like(labels, dtype=torch.bool)
        same[:, :-shift] = seq_idx[:, shift:] == seq_idx[:, :-shift]
        out = out.masked_fill(~same, IGNORE_INDEX)
    return out


def head_labels(labels: torch.Tensor, depths: int, seq_idx: torch.Tensor | None) -> list[torch.Tensor]:
    """The targets of the main head (``labels``) and of MTP depths 1..``depths`` (each (B, L))."""
    return [labels] + [shift_labels(labels, d, seq_idx) for d in range(1, depths + 1)]


def label_counts(labels: torch.Tensor, depths: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1 + depths) int64: each row's labelled positions for the main head, then each MTP depth.

    A depth's labels stop ``d`` positions before each document's end, so its count is smaller and
    varies between rows: the trainer turns these counts into each head's share of a step.

    Args:
        labels: (B, L) next-token labels, -100 ignored.
        depths: MTP depths of the model (``config.parsed.mtp_depths``).
        doc_ids: (B, L) document labels of packed rows, as ``forward`` takes them.
    """
    seq_idx = segment_ids(labels.shape[0], labels.shape[1], labels.device, doc_ids)
    return torch.stack([(y != IGNORE_INDEX).sum(1) for y in head_labels(labels, depths, seq_idx)], dim=1)


def combine_losses(
    lm_loss: torch.Tensor,
    mtp_losses: list[torch.Tensor],
    aux_loss: torch.Tensor | None,
    mtp_loss_scale: float,
    shares: torch.Tensor | None = None,
) -> torch.Tensor:
    """The total loss ``lm_loss + mtp_loss_scale * mean_d(mtp_losses[d]) + aux_loss``.

    With ``shares`` ((1 + depths,): the main head's, then each depth's share of a step's labels, see
    :func:`label_counts`) each head's mean loss is multiplied by its own share, so that the parts of
    a batch add up to the whole batch's loss whatever the split; the auxiliary losses, which are
    not means over labels, take the main head's share.
    """
    if shares is None:
        loss = lm_loss
        if mtp_losses:
            loss = loss + mtp_loss_scale * torch.stack(mtp_losses).mean()
        return loss if aux_loss is None else loss + aux_loss
    loss = lm_loss * shares[0]
    if mtp_losses:
        loss = loss + mtp_loss_scale * (torch.stack(mtp_losses) * shares[1:]).mean()
    return loss if aux_loss is None else loss + aux_loss * shares[0]


def allocate(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to_empty(device=device)`` for a module of plain tensors built on meta: the same shapes, strides
    and dtypes, uninitialized. ``torch.empty_like`` of a meta tensor (what ``to_empty`` calls) runs torch's
    Python reference, whose first call imports sympy: about a second at the start of every process that loads
    a model (``hybridlm generate``, ``hybridlm.load``). A non-contiguous tensor keeps ``empty_like``."""

    def empty(t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():  # dense: empty_like would keep these strides too
            return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
        return torch.empty_like(t, device=device)

    return module._apply(empty)


def attention_head_dims(config: ModelConfig) -> dict[str, int]:
    """Per attention kind (``*``, ``+``, ``D``) the head size :func:`~hybridlm.ops.attention.use_flex` is asked with:
    attention's ``head_dim``, and MLA's and DSA's smaller of their query/key and value heads."""
    mla = min(config.qk_head_dim + config.qk_pos_emb_head_dim, config.v_head_dim)
    return {"*": config.resolved_head_dim, "+": mla, "D": mla}


class HybridLM(nn.Module):
    """A hybrid language model laid out by ``config.pattern``.

    Args:
        config: the architecture.
        seed: initialization seed. Each canonical layer draws from its own generator keyed by
            (seed, canonical index), so the same seed gives the same weights whatever the
            brackets and whatever the pipeline split.
        device: where to allocate; ``"meta"`` allocates nothing (call :meth:`init_weights`, which
            uses ``seed``, after ``to_empty``). Default: the current default device.
        dtype: parameter dtype; the mixers' ``keep_fp32`` tensors stay float32 (:meth:`fp32_parameter_names`:
            ``A_log``, ``D``, ``dt_bias``, the MoE router's weight and expert bias, the DSA indexer's
            ``weights_proj`` and ``k_norm``).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):  # a preset name or a dict failed on a missing ``.parsed``
            raise ValueError(
                "config must be a ModelConfig (ModelConfig.preset(name), ModelConfig.from_dict(d)), "
                f"got {type(config).__name__}"
            )
        self.config = config
        p = config.parsed
        _seed(seed)  # refuse a seed that is not an integer before allocating
        # What init_weights() and init_parts() default to: a model built on meta is initialized later, from this seed.
        self.seed = operator.index(seed)
        if dtype is not None:
            dtype = float_dtype(dtype)
        for s in config.symbols:
            mixer_class(s)  # fail early, before allocating, on symbols that cannot be built
        target = torch.device(device) if device is not None else torch.empty(0).device
        H, V = config.hidden_size, config.vocab_size
        # Build on meta (no memory, no default init), then allocate once and initialize once.
        with torch.device("meta"):
            # A given weight skips nn.Embedding's default init: normal_ on a meta tensor runs torch's Python
            # reference, whose first call imports torch._dynamo (seconds at start-up, for a value never used).
            self.embeddings = nn.Embedding(V, H, _weight=torch.empty(V, H))
            self.blocks = _blocks(config, p.blocks, p.block_layer_offsets)
            self.norm_f = RMSNorm(H, config.norm_eps, config.norm_zero_centered)
            self.lm_head = None if config.tie_embeddings else OutputHead(H, V, bias=False)
            self.mtp = nn.ModuleList(MTPDepth(config) for _ in range(p.mtp_depths))
        # False on a pipeline stage after the first (prune_to_stage): its embedding, where it keeps one (a
        # tied head, MTP depths), never embeds the input, which is the previous stage's hidden states.
        self.embeds_input = True
        if target.type != "meta":
            allocate(self, target)
            self.init_weights(seed)
        if dtype is not None:
            self.cast(dtype)

    @property
    def is_whole(self) -> bool:
        """False for a pipeline stage: some blocks, the embedding or the final norm removed
        (:func:`hybridlm.parallel.pipeline.prune_to_stage`)."""
        whole = len(self.blocks) == self.config.parsed.num_blocks
        return whole and self.embeddings is not None and self.norm_f is not None

    # -- parameters --------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialize every parameter from ``seed`` (default: the seed the model was built with), keyed by
        canonical layer index."""
        for _, init in self.init_parts(seed):
            init()
        self.reset_buffers()

    def init_parts(self, seed: int | None = None) -> list[tuple[nn.Module, Callable[[], None]]]:
        """The initialization as independent parts: ``(module, init)`` pairs, ``init()`` filling the
        parameters of ``module`` only. Each part draws from its own keyed generator, so any subset,
        in any order, gives the values the whole model gets (sharded initialization relies on it).
        ``seed``: default, the seed the model was built with."""
        seed = self.seed if seed is None else seed
        _seed(seed)  # an explicit one too: refused before any part runs
        c = self.config
        std = c.init_std
        # Output projections are scaled by the canonical layer count, not the block count, so
        # fusing layers does not change the initialization.
        out_std = std / math.sqrt(max(1, c.parsed.num_layers))
        device = next(self.parameters(), torch.empty(0)).device  # a pipeline stage may hold none

        def gen(*key: object) -> torch.Generator:
            g = torch.Generator(device=device)
            g.manual_seed(_seed(seed, *key))
            return g

        parts: list[tuple[nn.Module, Callable[[], None]]] = []
        if self.embeddings is not None:
            emb = self.embeddings
            parts.append((emb, lambda: normal_(emb.weight, std, gen("embeddings"))))
        for block in self.blocks.values():
            parts.append((block, lambda b=block: b.init_weights(lambda i: gen("layers", i), std, out_std)))
        if self.norm_f is not None:
            parts.append((self.norm_f, self.norm_f.init_weights))
        if self.lm_head is not None:
            head = self.lm_head
            parts.append((head, lambda: normal_(head.weight, std, gen("lm_head"))))
        for d, depth in enumerate(self.mtp):

            def init_depth(d: int = d, depth: MTPDepth = depth) -> None:
                for norm in (depth.enorm, depth.hnorm, depth.final_norm):
                    norm.init_weights()
                normal_(depth.eh_proj.weight, std, gen("mtp", d, "eh_proj"))

            parts.append((depth, init_depth))  # its blocks are parts of their own
            for block in depth.blocks.values():
                parts.append(
                    (block, lambda b=block, d=d: b.init_weights(lambda i: gen("mtp", d, "layers", i), std, out_std))
                )
        # Each part fills parameters in place, so it runs without autograd whoever calls it (the
        # embedding's, the head's and the MTP projections' raised "a leaf Variable that requires grad").
        return [(module, torch.no_grad()(init)) for module, init in parts]

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Zero the non-persistent buffers (statistics that checkpoints do not carry)."""
        for name, buf in self.named_buffers():
            if name.endswith("tokens_per_expert"):
                buf.zero_()

    def fp32_parameter_names(self) -> set[str]:
        """Names of parameters and buffers kept in float32 by :meth:`cast`."""
        names = set()
        for prefix, module in self.named_modules():
            for name in getattr(module, "keep_fp32", ()):
                names.add(f"{prefix}.{name}" if prefix else name)
        return names

    @torch.no_grad()
    def cast(self, dtype: torch.dtype | str) -> HybridLM:
        """Cast floating parameters and buffers to ``dtype``, the numerically sensitive ones to float32.

        Those go to float32 whatever they were, not only stay there: after ``model.to(torch.bfloat16)``
        (or ``.double()``) a cast that left them alone kept them bf16 (or float64), which the expert bias's
        ``TypeError`` tells the user to fix with this very call."""
        dtype = float_dtype(dtype)
        keep = self.fp32_parameter_names()
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if t.is_floating_point():
                t.data = t.data.to(torch.float32 if name in keep else dtype)
        return self

    def num_params(self, exclude_embeddings: bool = False, active: bool = False):
        """Parameter count; a float-like total whose ``by_kind`` (or ``[kind]``) splits it per layer symbol.
        ``active``: the parameters one token uses (an MoE layer's top-k routed experts, not all of them)."""
        from .counting import num_params

        return num_params(self, exclude_embeddings, active)

    def flops_per_token(self, seq_len: int):
        """Forward matmul FLOPs per token at ``seq_len``; ``.by_kind`` splits them per layer symbol."""
        from .counting import flops_per_token

        return flops_per_token(self.config, seq_len)

    # -- forward -----------------------------------------------------------------------------

    def flex_head_dims(self) -> list[int]:
        """The head size (:func:`attention_head_dims`) of each layer kind of the model that attends through
        :func:`~hybridlm.ops.attention.causal_attention`, so under the documents' block mask: ``*`` and ``+`` (``D``
        builds a block mask of its own selection in each layer)."""
        dims = attention_head_dims(self.config)
        return [dims[kind] for kind in "*+" if kind in self.config.symbols]

    def make_context(
        self,
        batch: int,
        seqlen: int,
        device: torch.device,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> SequenceContext:
        seq_idx = segment_ids(batch, seqlen, device, doc_ids, cu_seqlens)
        if position_ids is None:
            if seq_idx is not None:
                position_ids = positions_in_segment(seq_idx)
            else:
                position_ids = torch.arange(seqlen, device=device).expand(batch, seqlen)
        ctx = SequenceContext(position_ids=position_ids, seq_idx=seq_idx)
        # float64 in a float64 model (its first parameter tells), else float32: a float64 model's attention
        # takes no FlexAttention (so no block mask to build), and its RoPE angles are float64.
        dtype = accumulation_dtype(next(self.parameters(), None))
        if any(use_flex(seq_idx, d, dtype) for d in self.flex_head_dims()):
            ctx.block_mask = document_block_mask(seq_idx)  # once per forward, outside compiled blocks
        if self.config.rotary_dim and "*" in self.config.symbols:
            # float32 angles (as Hugging Face's), float64 in a float64 model.
            c = self.config
            ctx.rope = rope_cos_sin(position_ids, c.rotary_dim, c.rope_theta, dtype, Yarn.of(c))
        return ctx

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy of the head on normed ``h`` (B, L, hidden), chunked: no (B, L, V) logits."""
        if self.lm_head is None:
            return linear_cross_entropy(h, self.embeddings.weight, labels)
        return self.lm_head(h, labels)  # a module call: FSDP gathers the head's weight around it

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Output head on normed hidden states: (B, L, hidden) -> float32 logits (B, L, V) (float64 in a
        float64 model)."""
        if self.lm_head is None:
            return _at_least_float32(F.linear(h, self.embeddings.weight))
        return _at_least_float32(self.lm_head(h))  # a module call, so FSDP can shard the head as a unit of its own

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        return_logits: bool = True,
        cache: Any = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Run the model.

        Args:
            input_ids: (B, L) token ids.
            labels: (B, L) target of each position (usually ``input_ids`` shifted left by one);
                -100 is ignored. Given labels, the output carries the losses.
            position_ids: (B, L) or (1, L) RoPE positions; default: positions within each document.
            doc_ids: (B, L) document labels of packed rows: no mixer carries information across
                a change of label (attention is masked, conv and SSM/GDN states restart).
            cu_seqlens: alternative to ``doc_ids``: cumulative document lengths over the
                flattened (B*L) tokens.
            hidden_states: (B, L, hidden) input of a pipeline stage after the first (the previous stage's
                output); given, it is the input, and ``input_ids`` only feed the MTP depths.
            document_ids, seq_idx: other names for ``doc_ids`` (give at most one of the three).
            return_logits: materialize the float32 logits; ``False`` leaves ``logits`` None and ``mtp_logits``
                empty (no (B, L, V) tensor is made). With labels and ``False`` (what the trainer passes), each
                head's loss is computed chunk by chunk (:func:`hybridlm.ops.cross_entropy.linear_cross_entropy`).
            cache: decoding cache (``hybridlm.infer.cache.InferenceCache``): ``input_ids`` continue
                the cached positions, every mixer reads and updates its state, positions come from
                the cache, and the MTP depths are not run.
            logits_to_keep: compute logits for the last this many positions only (0 = all).
        """
        _check_tensors(
            self.config.hidden_size,
            input_ids=input_ids,
            labels=labels,
            position_ids=position_ids,
            doc_ids=doc_ids,
            document_ids=document_ids,
            seq_idx=seq_idx,
            cu_seqlens=cu_seqlens,
            hidden_states=hidden_states,
        )
        given = [t for t in (doc_ids, document_ids, seq_idx) if t is not None]
        if len(given) > 1:
            raise ValueError("give document boundaries once: doc_ids, document_ids and seq_idx are the same input")
        doc_ids = given[0] if given else None
        if input_ids is None and hidden_states is None:
            raise ValueError("forward needs input_ids (or hidden_states on a pipeline stage after the first)")
        rows = tuple((input_ids if input_ids is not None else hidden_states).shape[:2])
        if input_ids is not None and hidden_states is not None and tuple(hidden_states.shape[:2]) != rows:
            # The labels are checked against input_ids and the MTP depths read both: another shape
            # failed as a size mismatch inside torch.cat or the loss, naming neither input.
            raise ValueError(
                f"hidden_states {tuple(hidden_states.shape)} and input_ids {tuple(input_ids.shape)} must have the "
                "same (B, L)"
            )
        _check_inputs(input_ids, labels, position_ids, rows, logits_to_keep, self.config.vocab_size)
        if position_ids is not None:
            position_ids = position_ids.expand(rows)
        if hidden_states is not None:
            h = hidden_states
        elif self.embeddings is not None and self.embeds_input:
            h = self.embeddings(input_ids)
        else:
            raise ValueError(
                "forward needs hidden_states on a pipeline stage after the first (the previous stage's output); "
                "input_ids alone are the first stage's input"
            )
        B, L = h.shape[:2]
        if labels is not None and (cache is not None or logits_to_keep):
            raise ValueError("labels need the logits of every position: drop cache / logits_to_keep")
        if cache is not None:
            if doc_ids is not None or cu_seqlens is not None:
                raise ValueError("a cached forward takes one document per row (padding goes in the cache)")
            cache.check_room(L, batch=B)
            if position_ids is None:
                position_ids = cache.position_ids(L)
        ctx = self.make_context(B, L, h.device, position_ids, doc_ids, cu_seqlens)
        ctx.cache = cache
        h, aux_losses = run_blocks(self.blocks, h, ctx)
        if cache is not None:
            cache.advance(L)
        out = ModelOutput(hidden_states=h)
        if self.norm_f is None:  # a pipeline stage before the last: its MoE losses ride along
            out.aux_loss = _sum(aux_losses)
            return out
        h = self.norm_f(h)
        if cache is not None:
            if return_logits:
                out.logits = self.head(h[:, -logits_to_keep:] if logits_to_keep else h)
            return out
        fused_loss = labels is not None and not return_logits
        hiddens = [h]  # the normed input of the head: main, then each MTP depth
        for d, depth in enumerate(self.mtp, start=1):
            if input_ids is None:
                raise ValueError("MTP depths need input_ids")
            shifted = torch.roll(input_ids, shifts=-d, dims=1)  # wrapped ends are masked in the labels
            h, aux = depth(h, self.embeddings(shifted), ctx)
            aux_losses += aux
            hiddens.append(h)
        if return_logits:  # also without labels: a caller after the hidden states alone pays for no head
            out.logits = self.head(hiddens[0][:, -logits_to_keep:] if logits_to_keep else hiddens[0])
            out.mtp_logits = [self.head(x[:, -logits_to_keep:] if logits_to_keep else x) for x in hiddens[1:]]
        aux = _sum(aux_losses)
        out.aux_loss = aux
        if labels is not None:
            targets = head_labels(labels, len(hiddens) - 1, ctx.seq_idx)
            if fused_loss:
                losses = [self.head_loss(x, y) for x, y in zip(hiddens, targets)]
            else:
                losses = [cross_entropy(lg, y) for lg, y in zip([out.logits, *out.mtp_logits], targets)]
            out.lm_loss, out.mtp_losses = losses[0], losses[1:]
            out.loss = combine_losses(out.lm_loss, out.mtp_losses, aux, self.config.mtp_loss_scale)
        return out
