"""What each block costs to train: forward+backward FLOPs, bytes, time, and memory.

An estimate from the config alone, per micro-batch of ``micro_batch_size`` sequences of ``seq_len``
tokens (``T`` tokens):

* **FLOPs** are the mixers' own ``flops_per_token`` (matmul FLOPs, see ``hybridlm.counting``) times
  ``T``, with attention's scores counted causally (half of all keys); the backward costs twice the
  forward, and activation checkpointing adds one more forward.
* **Bytes** are main-memory traffic: every tensor saved for the backward is written once and read
  once in the forward (the backward moves twice that), weights are read once in the forward and
  twice in the backward (input and weight gradients), and fp32 gradients are read and written
  once. Only the experts that receive tokens (at most ``T * top_k``) are read.
* **Time** is a roofline per layer: ``max(FLOPs / peak FLOP/s, bytes / bandwidth)`` summed over
  the layers of a block and over forward and backward. It is a lower bound on a real GPU; the
  planner only uses its ratios, and ``--measure`` replaces it by measured times. With float8
  (``train.float8``) the FLOPs of the linear layers it converts (``ops.float8.float8_linears``) run
  at the float8 peak, the rest at the bf16 one, and the casts to float8 add their own memory-bound
  kernels (:data:`CAST_BF16`, :data:`CAST_MASTER`).
* **Memory**: weights, gradients and optimizer state take :attr:`Hardware.state_bytes_per_param`
  bytes per parameter (Megatron's mixed precision: bf16 weight 2, fp32 gradient 4, fp32 master
  + two AdamW moments 12), unsharded (divide by tensor/expert/data parallel sharding yourself); the
  embedding and the head keep no bf16 copy (16). Activations are the tensors saved for the backward,
  in bf16 (fp32 where the model keeps fp32). Block-level activation checkpointing keeps only each
  block's input, plus one block's full activations while it is recomputed. The head keeps what the
  chunked loss saves (no logits); while it runs, one chunk of bf16 logits and the bf16 copies of its
  weight and input are live on top (``Costs.work_bytes``, the last stage's).
  With float8, what a compiled block saves for its converted layers (:func:`_unsaved`): a layer's
  input made by a norm or an activation from a tensor saved anyway is recomputed in the backward, a
  gated norm's output is kept as its one-byte float8 cast, and a converted weight has no bf16 copy (its
  fp32 master is cast to float8 at each matmul): 16 bytes of state, not 18.

Parameters per block are counted exactly, on a model built on the meta device.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, replace
from typing import NamedTuple

from ..config import ModelConfig
from ..layers import mixer_class
from ..model import HybridLM, attention_head_dims
from ..ops.attention import FLEX_MIN_HEAD_DIM
from ..ops.cross_entropy import DEFAULT_CHUNK
from ..ops.float8 import float8_linears

BF16 = 2  # bytes per activation / weight element
FP32 = 4

#: Bytes per value a float8 linear layer's casts move, in kernels of their own between the matmuls: the operand
#: is read once for its scale (amax) and once to be cast, and its one-byte cast written. A bf16 input or output
#: gradient: 2 + 2 + 1; the fp32 master weight: 4 + 4 + 1, and the transposed copy the input's gradient needs.
#: The forward casts input and weight, the backward the output gradient and the input again, in the layout the
#: weight's gradient needs. Both recipes alike (rowwise finds a scale per row instead of one per tensor).
CAST_BF16 = BF16 + BF16 + 1
CAST_MASTER = FP32 + FP32 + 1 + 1


@dataclass(frozen=True)
class Hardware:
    """Peak rates of one accelerator for the roofline estimate.

    Attributes:
        name: label shown in reports.
        flops_per_s: dense bf16 matmul peak.
        bytes_per_s: main-memory bandwidth.
        state_bytes_per_param: weight + gradient + optimizer bytes per parameter.
        float8_flops_per_s: dense float8 matmul peak; None where there are no float8 tensor cores.
        tf32_flops_per_s: dense TF32 matmul peak (None: half the bf16 one, as on the A100, H100 and H200).
    """

    name: str
    flops_per_s: float
    bytes_per_s: float
    state_bytes_per_param: float = BF16 + FP32 + 3 * FP32
    float8_flops_per_s: float | None = None
    tf32_flops_per_s: float | None = None

    @property
    def tf32_products_per_s(self) -> float:
        """The TF32 matmul peak (``tf32_flops_per_s``, or half the bf16 one)."""
        return self.tf32_flops_per_s or self.flops_per_s / 2

    @property
    def fp32_products_per_s(self) -> float:
        """The rate of float32 products on tensor cores as the indexer's kernels run them: ``tf32x3``, three TF32
        products for each (``ops.indexer_triton.INPUT_PRECISION``)."""
        return self.tf32_products_per_s / FP32_PRODUCT_PASSES


#: TF32 products per float32 product in ``tf32x3`` (a high and a low part: hi·hi + hi·lo + lo·hi).
FP32_PRODUCT_PASSES = 3

#: Dense bf16 (and float8, TF32) peak and HBM bandwidth from the vendors' data sheets (SXM parts).
HARDWARE = {
    "h100": Hardware("H100 SXM", 989e12, 3.35e12, float8_flops_per_s=1979e12, tf32_flops_per_s=494.7e12),
    "h200": Hardware("H200 SXM", 989e12, 4.8e12, float8_flops_per_s=1979e12, tf32_flops_per_s=494.7e12),
    "a100": Hardware("A100 SXM 80GB", 312e12, 2.04e12, tf32_flops_per_s=156e12),
}


@dataclass(frozen=True)
class ItemCost:
    """The cost of one item (a block, the embedding, the head, one MTP depth) for one micro-batch.

    Attributes:
        name: the block string (``'M'``, ``'*-'``) or ``'embedding'``, ``'head'``, ``'mtp 1'``, ...
        time_s: forward+backward seconds (estimated, or measured).
        flops: forward+backward FLOPs.
        bytes: forward+backward main-memory bytes.
        params: parameters the item owns.
        act_bytes: bytes saved for the backward without activation checkpointing.
        ckpt_bytes: bytes saved with block-level checkpointing: a block keeps its input only; the
            head keeps everything; an MTP depth keeps its projection's and head's tensors and
            its blocks' inputs.
        float8_params: weights of the float8 linear layers among ``params``: no bf16 copy of them is kept.
        gradless_params: parameters among ``params`` that never get a gradient (DSA's indexer without its loss),
            so no gradient and no optimizer state: their weights only.
    """

    name: str
    time_s: float
    flops: float
    bytes: float
    params: int
    act_bytes: float
    ckpt_bytes: float
    float8_params: int = 0
    gradless_params: int = 0


@dataclass(frozen=True)
class Costs:
    """Costs of every item of a model at one sequence length and micro-batch size.

    Attributes:
        blocks: one per block of the main stack, in block order.
        embedding: the input embedding (on the first stage).
        head: final norm, output head and cross entropy (on the last stage).
        mtp: one per MTP depth (on the last stage).
        shared_embedding_params: embedding parameters the last stage also holds (tied head or
            MTP depths need the embedding there; see ``parallel.pipeline.prune_to_stage``).
        source: ``'estimate (H100 SXM roofline)'`` or ``'measured on cuda'``.
        float8: the ``train.float8`` recipe the costs are for (``'none'``: the model's precision).
        float8_auto_filter: ``train.float8_auto_filter``: layers too small to gain left out of float8.
        work_bytes: memory the last stage needs for a moment beyond what it keeps, at the end of the forward:
            the chunked loss's logits of one chunk (``ops.cross_entropy.DEFAULT_CHUNK`` tokens, bf16), and the bf16
            copies of the head's weight and input it reads them from (the loss keeps neither for the backward).
    """

    blocks: tuple[ItemCost, ...]
    embedding: ItemCost
    head: ItemCost
    mtp: tuple[ItemCost, ...]
    shared_embedding_params: int
    seq_len: int
    micro_batch_size: int
    recompute: bool
    source: str
    state_bytes_per_param: float
    float8: str = "none"
    float8_auto_filter: bool = False
    work_bytes: float = 0.0

    @property
    def block_times(self) -> list[float]:
        return [b.time_s for b in self.blocks]

    @property
    def first_extra_s(self) -> float:
        """Time the first stage spends outside its blocks."""
        return self.embedding.time_s

    @property
    def last_extra_s(self) -> float:
        """Time the last stage spends outside its blocks (head and MTP depths)."""
        return self.head.time_s + sum(m.time_s for m in self.mtp)


# -- per layer --------------------------------------------------------------------------------------


def _mult(c: ModelConfig) -> int:
    return 3 if c.mlp_activation == "swiglu" else 2


def _indexer_trains(c: ModelConfig) -> bool:
    """Whether DSA's indexer has a backward: only its own loss reaches it (its inputs are read detached, its top-k
    takes no gradient), so without ``dsa_indexer_loss_coeff`` it keeps nothing for one, computes none, and its
    weights get no gradient and no optimizer state."""
    return c.dsa_indexer_loss_coeff > 0


#: The products the scores' backward computes for each one of the forward (``ops.indexer_triton``): each of its two
#: kernels computes the products again (the ReLU's gates: float32 products), then multiplies the scores' gradient into
#: keys (dq) or queries (dk): TF32 products in a bf16 model, whose projections round those gradients to bf16
#: (``ops.indexer_triton.PRODUCTS_16BIT``).
INDEXER_GATE_PRODUCTS, INDEXER_GRAD_PRODUCTS = 2, 2


def _indexer_products(
    c: ModelConfig, scores: float, seq_len: int, tokens: int, recompute: bool, hw: Hardware, trains: bool
) -> tuple[float, float]:
    """(FLOPs, seconds) of a DSA layer's float32 index scores (``scores``: one forward's FLOPs) at the rate of
    float32 products on tensor cores, and with the indexer loss, of its target too.

    Each forward scores once (block recompute: twice). With the loss (``_indexer_trains``) the loss's chunks are
    checkpointed, so the backward scores once more, then computes :data:`INDEXER_GATE_PRODUCTS` float32 products
    and :data:`INDEXER_GRAD_PRODUCTS` TF32 ones for each; and each of those forwards runs the target's two passes
    over the main attention's logits (bf16 products, causal, no backward: ``ops.indexer.indexer_target``).
    ``trains``: whether the indexer trains (its loss on, ``_indexer_trains``, and a parameter of it not frozen);
    False: it scores in each forward only."""
    forwards = 2 if recompute else 1
    if not trains:
        return forwards * scores, forwards * scores / hw.fp32_products_per_s
    runs = forwards + 1 + INDEXER_GATE_PRODUCTS
    target = 2 * (forwards + 1) * tokens * mixer_class("D").target_flops_per_token(c, seq_len) / 2  # (causal: half)
    flops = (runs + INDEXER_GRAD_PRODUCTS) * scores + target
    return (
        flops,
        runs * scores / hw.fp32_products_per_s
        + INDEXER_GRAD_PRODUCTS * scores / hw.tf32_products_per_s
        + target / hw.flops_per_s,
    )


def _takes_flex(c: ModelConfig, s: str) -> bool:
    """Whether a layer's attention (``*``, ``+``, ``D``) trains through FlexAttention on the GPU: heads of at least
    ``ops.attention.FLEX_MIN_HEAD_DIM`` (``model.attention_head_dims``). It skips the key blocks
    that causality, the documents (or DSA's selection) mask. Narrower heads take SDPA under a dense (B, 1, L, L) mask,
    which skips no key and which SDPA keeps as a bf16 bias (a value per key a token) for the backward."""
    heads = attention_head_dims(c)
    return s in heads and heads[s] >= FLEX_MIN_HEAD_DIM


def _mask_elements(c: ModelConfig, s: str, seq_len: int) -> float:
    """Elements per token (bf16-equivalent) an attention layer keeps of its mask: SDPA's bf16 bias of a dense mask
    (:func:`_takes_flex`), or under FlexAttention DSA's selection, which its mask_mod reads (a byte a key); the
    documents' block mask is a few blocks' indices, nothing per token."""
    if s not in "*+D":
        return 0
    if not _takes_flex(c, s):
        return seq_len
    return seq_len / 2 if s == "D" else 0


def _saved_elements(c: ModelConfig, s: str, seq_len: int, indexer_trains: bool | None = None) -> float:
    """Elements per token a layer saves for its backward in sequences of ``seq_len`` (bf16-equivalent; fp32 counts
    twice). ``indexer_trains``: whether a DSA layer's indexer loss runs (None: :func:`_indexer_trains`; a frozen
    indexer computes none).

    Includes the layer input (the fp32 residual stream of bf16 autocast training), its normed copy and the
    norm's fp32 reciprocal RMS; the rest follows the mixers' forward (the Triton kernels' saved tensors on the
    GPU). Matched per block kind to what compiled blocks at bench-1.3b's and bench-moe-1b's sizes keep on an H100,
    their rows cut into documents as training's are (``plan.measure.saved_bytes``, ``benchmarks/saved_bytes.py``;
    docs/benchmarks.md, fifty-fourth and fifty-fifth sessions): the MLP, attention and MoE to the MiB,
    Mamba2, Gated DeltaNet, MLA and DSA within 1 %.
    """
    H = c.hidden_size
    n = 2 * H + H + 2  # fp32 input of the norm, normed input of the mixer, the norm's fp32 rstd
    if s == "-":
        return n + c.resolved_ffn_hidden_size * _mult(c)  # up (and gate), activation
    if s == "E":
        k, E, Fm = c.moe_top_k, c.moe_num_experts, c.resolved_moe_ffn_hidden_size
        # The router's fp32 input (it reads the normed input in fp32), logits and scores; the top-k's int64 ids and
        # fp32 weights; per routed copy the dispatched input and output and the expert's hidden
        routed = 2 * H + 4 * E + 6 * k + k * (2 * H + Fm * _mult(c))
        gate = H + 1 if c.moe_shared_expert_gate else 0  # the shared expert's output and its sigmoid gate
        return n + routed + c.moe_shared_expert_ffn_hidden_size * _mult(c) + gate
    if s == "*":
        hq, hkv, d = c.num_attention_heads, c.resolved_num_query_groups, c.resolved_head_dim
        # q, k, v, output; with the output gate also the gate and the gated output (its sigmoid and product are
        # elementwise: a compiled block, like Megatron's fused gate, recomputes them from those two); the flash
        # kernel's fp32 log-sum-exp per head; a dense mask's bf16 bias (_mask_elements)
        saved = n + ((4 if c.attention_output_gate else 2) * hq + 2 * hkv) * d + 2 * hq
        return saved + _mask_elements(c, s, seq_len)
    if s == "M":
        h, p, g, N = c.resolved_mamba_num_heads, c.mamba_head_dim, c.mamba_num_groups, c.mamba_state_dim
        di = h * p
        states = 2 * h * p * N / c.mamba_chunk_size  # fp32 chunk states
        # in_proj output (z, xBC, dt), conv output, dt (fp32), scan output, gated-norm output and its fp32 rstd
        return n + (2 * di + 2 * g * N + h) + (di + 2 * g * N) + 2 * h + 2 * di + states + 2 * g
    if s == "G":
        nk, nv, dk = c.resolved_gdn_num_heads, c.resolved_gdn_num_value_heads, c.gdn_head_dim
        dv = c.resolved_gdn_value_head_dim
        states = 2 * nv * dk * dv / c.gdn_chunk_size
        # in projections (q k v z, b a), conv output, delta-rule output, gated-norm output and its fp32 rstd (a
        # value per head)
        return n + (2 * nk * dk + 2 * nv * dv + 2 * nv) + (2 * nk * dk + nv * dv) + 2 * nv * dv + states + 2 * nv
    if s in "+D":
        h, dqk, dr, dv = c.num_attention_heads, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim
        rq = c.q_lora_rank or 0
        # compressed q (and its norm), latent kv + rope key (and norm), up-projected q, k, v, output; the mask
        saved = n + 2 * rq + 2 * (c.kv_lora_rank + dr) + h * (2 * (dqk + dr) + 2 * dv)
        saved += _mask_elements(c, s, seq_len)
        if s == "D" and (_indexer_trains(c) if indexer_trains is None else indexer_trains):
            # The indexer loss's chunks of queries are checkpointed (layers.dsa.DSA.select_with_loss): it keeps the
            # indexer's fp32 keys and their norm's statistics, and a byte per key of selection, which FlexAttention
            # keeps anyway (_mask_elements; under SDPA's bias it is one more). Measured compiled on the CPU at tiny
            # sizes (within 40 bytes a token) and on an H100 at half bench-1.3b's width (within 0.3 %, fifty-sixth
            # session); before the chunks it kept 3 bytes per key and index head and 9 more on an H100 (13 GiB a
            # layer at 4 x 4096; docs/benchmarks.md, fifty-fifth session).
            saved += 2 * c.dsa_indexer_head_dim + 24 + (0 if _takes_flex(c, s) else seq_len / 2)
        return saved
    mixer = mixer_class(s)  # a symbol no mixer implements is refused as the model refuses it
    raise NotImplementedError(
        f"the pipeline cost model has no activation-memory estimate for '{s}' layers ({mixer.__name__}): add the "
        "elements per token its forward saves to hybridlm.plan.cost._saved_elements (docs/design.md, 'Adding a mixer')"
    )


def _unsaved(c: ModelConfig, s: str, converted: frozenset[str], frozen: frozenset[str] = frozenset()) -> float:
    """Elements per token of :func:`_saved_elements` a compiled ``s`` layer does not keep when the linear layers
    named in ``converted`` (relative to its mixer: ``'in_proj'``, ``'shared_experts.down_proj'``) are float8 and
    those in ``frozen`` (the same names; a weight matrix or an expert stack) hold no gradient, a gradient still
    passing through the layer.

    A tensor the plan counts as saved only because a linear layer reads it (the normed input, an activation, the
    gated norm's output, the router's float32 input, the rows dispatched to the experts) goes where every layer
    reading it is frozen: a frozen layer's input gradient needs its weight, not its input. Where every reader is
    frozen or float8 (some float8), the float8 rule holds. A float8 layer's backward needs its input cast to
    float8, not the bf16 input itself, and inductor's partitioner recomputes such an input where the block made it
    by a norm or an activation from a tensor it saves anyway (the normed input from the layer's input; the
    activation from the up projection's output): so the normed input goes where every layer reading it is float8,
    and the activation where the down projection is. A gated norm's output (Mamba2, Gated DeltaNet) comes out of a
    kernel the partitioner cannot run again: it keeps the float8 cast instead, one byte a value. MoE's router and
    DSA's indexer read the normed input in the model's precision, which keeps it unless they are frozen too (a DSA
    indexer that does not train is frozen here: its readers belong in ``frozen``). Attention's output is kept
    whatever reads it (the attention kernel's backward reads it). Float8 found on the CPU for the MLP (what a
    compiled block saves, ``tests/plan/test_cost.py``) and matched to bench-1.3b's peak memory on an H100
    (docs/benchmarks.md, fifty-third session); frozen layers measured compiled on the CPU for the MLP, MoE,
    attention, Mamba2 and Gated DeltaNet (``tests/plan/test_cost.py``).
    """
    if not converted and not frozen:
        return 0.0
    H, swiglu = c.hidden_size, c.mlp_activation == "swiglu"
    # Per tensor: its elements per token, the linear layers reading it, and what float8 readers leave of it.
    if s == "-":
        F = c.resolved_ffn_hidden_size
        items = [(H, ("up_proj", "gate_proj" if swiglu else None), H), (F, ("down_proj",), F)]
    elif s == "E":
        k, Fm, Fs = c.moe_top_k, c.resolved_moe_ffn_hidden_size, c.moe_shared_expert_ffn_hidden_size
        shared = ("shared_experts.up_proj", "shared_experts.gate_proj" if swiglu else None) if Fs else ()
        items = [
            (H, ("gate", *shared), 0),  # the normed input
            (2 * H, ("gate",), 0),  # its float32 copy, the router's input
            (k * H, ("experts.up_proj", "experts.gate_proj" if swiglu else None), 0),  # the dispatched rows
            (k * Fm, ("experts.down_proj",), 0),  # the experts' activation
            (Fs, ("shared_experts.down_proj",), Fs),  # the shared expert's
        ]
    elif s == "*":
        gated = c.num_attention_heads * c.resolved_head_dim if c.attention_output_gate else 0
        q = ("q_proj", "k_proj", "v_proj", "gate_proj" if c.attention_output_gate else None)
        items = [(H, q, H), (gated, ("o_proj",), 0)]  # the normed input; the gated output
    elif s == "M":
        di = c.resolved_mamba_num_heads * c.mamba_head_dim
        items = [(H, ("in_proj",), H), (di, ("out_proj",), di / 2)]
    elif s == "G":
        value_dim = c.resolved_gdn_num_value_heads * c.resolved_gdn_value_head_dim
        items = [(H, ("in_proj_qkvz", "in_proj_ba"), H), (value_dim, ("out_proj",), value_dim / 2)]
    elif s in "+D":
        mla, rq = s == "+", c.q_lora_rank or 0
        indexer = () if mla else ("indexer.wk", "indexer.weights_proj")  # (DSA's indexer reads both normed inputs)
        items = [
            (H, ("q_a_proj" if rq else "q_proj", "kv_a_proj_with_mqa", *indexer), H if mla else 0),
            (rq, ("q_b_proj", *(() if mla else ("indexer.wq_b",))), rq if mla else 0),  # the normed compressed q
            (c.kv_lora_rank, ("kv_b_proj",), c.kv_lora_rank),  # the normed latent
        ]
    else:
        return 0.0
    gone = 0.0
    for width, readers, float8_width in items:
        readers = [r for r in readers if r]
        if readers and all(r in frozen for r in readers):
            gone += width
        elif readers and all(r in frozen or r in converted for r in readers):
            gone += float8_width
    return gone


def _active_params(c: ModelConfig, s: str, params: int, tokens: int) -> float:
    """Parameters whose weights a micro-batch of ``tokens`` tokens reads."""
    if s != "E":
        return params
    E = c.moe_num_experts
    per_expert = c.hidden_size * c.resolved_moe_ffn_hidden_size * _mult(c)
    idle = max(0, E - tokens * c.moe_top_k) * per_expert
    return params - idle


@dataclass(frozen=True)
class Float8Layers:
    """A layer's linear layers float8 training converts: their ``weights``, the sum of their ``inputs`` (in
    features) and ``outputs`` (out features) per token, and their ``names`` relative to the mixer."""

    weights: int = 0
    inputs: int = 0
    outputs: int = 0
    names: frozenset[str] = frozenset()

    def cast_bytes(self, tokens: int) -> tuple[float, float]:
        """(forward, backward) bytes the casts move for ``tokens`` tokens (:data:`CAST_BF16`, :data:`CAST_MASTER`)."""
        fwd = CAST_BF16 * self.inputs * tokens + CAST_MASTER * self.weights
        bwd = CAST_BF16 * (self.inputs + self.outputs) * tokens
        return fwd, bwd


def _roofline(flops: float, nbytes: float, hw: Hardware, f8_flops: float = 0.0) -> float:
    """Seconds of ``flops`` (``f8_flops`` of them in float8) moving ``nbytes``: the slower of compute and memory."""
    compute = (flops - f8_flops) / hw.flops_per_s + (f8_flops / hw.float8_flops_per_s if f8_flops else 0.0)
    return max(compute, nbytes / hw.bytes_per_s)


def _train_cost(
    name: str,
    fwd_flops: float,
    act_elems: float,
    params: int,
    read_params: float,
    tokens: int,
    recompute: bool,
    hw: Hardware,
    fwd_f8_flops: float = 0.0,
    float8: Float8Layers = Float8Layers(),
    fwd_only_flops: float = 0.0,
    frozen: float = 0.0,
    backward: bool = True,
) -> ItemCost:
    """Forward+backward cost of one unit from its forward FLOPs (``fwd_f8_flops`` of them in the ``float8`` linear
    layers, whose two backward matmuls are float8 too, their casts kernels of their own; ``fwd_only_flops`` of them
    in work with no backward at all) and saved elements per token.

    ``frozen``: weights among ``read_params`` that train.trainable leaves frozen: the backward computes no weight
    gradient for them (a multiply-add per weight and token less), reads them once, not twice, and moves no fp32
    gradient. ``backward`` False: no gradient passes through the unit (it and every unit before it frozen), so it
    runs its forward once and saves nothing."""
    fwd_bytes = 2 * act_elems * tokens * BF16 + read_params * BF16
    fwd_cast, bwd_cast = float8.cast_bytes(tokens)
    if not backward:
        return ItemCost(name, _roofline(fwd_flops, fwd_bytes, hw, fwd_f8_flops) + fwd_cast / hw.bytes_per_s,
                        fwd_flops, fwd_bytes + fwd_cast, params, 0.0, 0.0, float8.weights)  # fmt: skip
    trained = read_params - frozen
    bwd_flops = 2 * (fwd_flops - fwd_only_flops) - 2 * frozen * tokens
    # (the weight gradients' share of the float8 products, as the weights' share frozen)
    bwd_f8_flops = 2 * fwd_f8_flops - (frozen / read_params * fwd_f8_flops if read_params else 0.0)
    bwd_bytes = 2 * 2 * act_elems * tokens * BF16 + (read_params + trained) * BF16 + 2 * trained * FP32
    passes = 2 if recompute else 1
    time = (
        passes * (_roofline(fwd_flops, fwd_bytes, hw, fwd_f8_flops) + fwd_cast / hw.bytes_per_s)
        + _roofline(bwd_flops, bwd_bytes, hw, bwd_f8_flops)
        + bwd_cast / hw.bytes_per_s
    )
    return ItemCost(
        name=name,
        time_s=time,
        flops=passes * fwd_flops + bwd_flops,
        bytes=passes * (fwd_bytes + fwd_cast) + bwd_bytes + bwd_cast,
        params=params,
        act_bytes=act_elems * tokens * BF16,
        ckpt_bytes=act_elems * tokens * BF16,
        float8_params=float8.weights,
    )


def _sum(name: str, parts: list[ItemCost], ckpt_bytes: float) -> ItemCost:
    return ItemCost(
        name=name,
        time_s=sum(p.time_s for p in parts),
        flops=sum(p.flops for p in parts),
        bytes=sum(p.bytes for p in parts),
        params=sum(p.params for p in parts),
        act_bytes=sum(p.act_bytes for p in parts),
        ckpt_bytes=ckpt_bytes,
        float8_params=sum(p.float8_params for p in parts),
        gradless_params=sum(p.gradless_params for p in parts),
    )


# -- the model --------------------------------------------------------------------------------------


class LayerParams(NamedTuple):
    """One layer's parameters for the costs.

    Attributes:
        params: elements of all of them.
        gradless: elements of those that never get a gradient: DSA's indexer without its loss, and what
            train.trainable leaves frozen.
        frozen: elements train.trainable leaves frozen outside DSA's indexer (no weight-gradient products).
        trains: whether a parameter outside the indexer trains (a gradient flows on from the layer).
        indexer_trains: whether DSA's indexer trains: its loss on and a parameter of it not frozen. Its inputs are
            read detached, so its loss's backward stays inside it.
        gradless_linears: the names, relative to the mixer, of the weight matrices and expert stacks among
            ``gradless`` (``'down_proj'``, ``'experts.up_proj'``, ``'indexer.wk'``): their inputs need not be kept
            (:func:`_unsaved`).
    """

    params: int
    gradless: int
    frozen: int
    trains: bool
    indexer_trains: bool = False
    gradless_linears: frozenset[str] = frozenset()


def _param_counts(
    config: ModelConfig, recipe: str = "tensorwise", auto_filter: bool = False, trainable: Set[str] | None = None
) -> dict[str, object]:
    """Parameters per canonical layer of every main and MTP block (:class:`LayerParams`), of each MTP depth's own parts
    (norms, ``eh_proj``: all, frozen), of the final norm + head (all, frozen, whether the head's matrix, the
    embedding's when tied, is frozen, and whether the norm trains) and the embedding's frozen ones, counted on a
    meta-device build; and per layer the linear layers float8 training converts (``float8``, ``float8_mtp``: their
    weights and their names relative to the mixer; ``recipe`` and ``auto_filter`` as
    :func:`~hybridlm.ops.float8.float8_linears` takes them). ``trainable``: the canonical names ``train.trainable``
    trains (None: all); the others get no gradient either."""
    model = HybridLM(config, device="meta")
    converted = set(float8_linears(model, recipe, auto_filter))
    p = config.parsed

    def count(module) -> int:
        return sum(t.numel() for t in module.parameters())

    def left(name: str) -> bool:
        """Whether train.trainable leaves the parameter of canonical name ``name`` frozen."""
        return trainable is not None and name not in trainable

    def frozen(module, prefix: str) -> int:
        """Elements of ``module``'s parameters (canonical names ``prefix`` + their own) that train.trainable leaves."""
        return sum(t.numel() for n, t in module.named_parameters() if left(prefix + n))

    def count_float8(prefix: str, layer) -> Float8Layers:
        mine = {name: m for name, m in layer.named_modules(prefix=prefix) if name in converted}
        return Float8Layers(
            weights=sum(m.weight.numel() for m in mine.values()),
            inputs=sum(m.in_features for m in mine.values()),
            outputs=sum(m.out_features for m in mine.values()),
            names=frozenset(n.removeprefix(f"{prefix}.mixer.") for n in mine),
        )

    def layer_params(layer, prefix: str) -> LayerParams:
        """``layer``'s :class:`LayerParams` (its canonical names: ``prefix`` + their own)."""
        indexer = getattr(layer.mixer, "indexer", None)
        side = {id(t) for t in indexer.parameters()} if indexer is not None else set()
        named = [(n, t, left(prefix + n)) for n, t in layer.named_parameters()]
        idle = not _indexer_trains(config)  # (without its loss no gradient reaches the indexer)
        gradless = [(n, t) for n, t, frozen in named if frozen or (id(t) in side and idle)]
        return LayerParams(
            params=sum(t.numel() for _, t, _ in named),
            gradless=sum(t.numel() for _, t in gradless),
            frozen=sum(t.numel() for _, t, frozen in named if frozen and id(t) not in side),
            trains=any(not frozen for _, t, frozen in named if id(t) not in side),
            indexer_trains=not idle and any(not frozen for _, t, frozen in named if id(t) in side),
            gradless_linears=frozenset(
                n.removeprefix("mixer.").removesuffix(".weight") for n, t in gradless if t.dim() >= 2
            ),
        )

    def per_layer(blocks, prefix: str, canonical: str, offsets) -> tuple[list[list[LayerParams]], list]:
        items = list(blocks.items())
        params = [
            [layer_params(layer, f"{canonical}layers.{offsets[b] + j}.") for j, layer in enumerate(block.layers)]
            for b, (_, block) in enumerate(items)
        ]
        f8 = [
            [count_float8(f"{prefix}{i}.layers.{j}", layer) for j, layer in enumerate(block.layers)]
            for i, block in items
        ]
        return params, f8

    blocks, f8 = per_layer(model.blocks, "blocks.", "", p.block_layer_offsets)
    mtp_blocks, mtp_f8, mtp_extra = [], [], []  # (per depth)
    for d, depth in enumerate(model.mtp):
        params, mtp_f8 = per_layer(depth.blocks, f"mtp.{d}.blocks.", f"mtp.{d}.", p.mtp_block_layer_offsets)
        mtp_blocks.append(params)
        own = [(n, t) for n, t in depth.named_parameters() if not n.startswith("blocks.")]  # (norms, eh_proj)
        mtp_extra.append((sum(t.numel() for _, t in own), sum(t.numel() for n, t in own if left(f"mtp.{d}.{n}"))))
    head = count(model.norm_f) + (count(model.lm_head) if model.lm_head is not None else 0)
    head_frozen = frozen(model.norm_f, "norm_f.") + (frozen(model.lm_head, "lm_head.") if model.lm_head else 0)
    embedding_frozen = frozen(model.embeddings, "embeddings.")
    matrix_frozen = bool(frozen(model.lm_head, "lm_head.") if model.lm_head is not None else embedding_frozen)
    norm_trains = frozen(model.norm_f, "norm_f.") < count(model.norm_f)
    return {"blocks": blocks, "float8": f8, "mtp_blocks": mtp_blocks, "float8_mtp": mtp_f8, "mtp_extra": mtp_extra,
            "head": (head, head_frozen, matrix_frozen, norm_trains), "embedding": embedding_frozen}  # fmt: skip


def estimate_costs(
    config: ModelConfig,
    seq_len: int,
    micro_batch_size: int = 1,
    recompute: bool = False,
    hardware: Hardware | str = "h100",
    float8: str = "none",
    float8_auto_filter: bool = False,
    trainable: Set[str] | None = None,
) -> Costs:
    """Estimated costs of every block, the embedding, the head and the MTP depths.

    Args:
        config: the model.
        seq_len: tokens per sequence.
        micro_batch_size: sequences per micro-batch.
        recompute: block-level activation checkpointing (one more forward per block).
        hardware: a :class:`Hardware` or a key of :data:`HARDWARE`.
        float8: ``train.float8``'s recipe: other than ``"none"``, the converted linear layers' matmuls
            run at ``hardware``'s float8 peak, their casts move :data:`CAST_BF16` and :data:`CAST_MASTER`
            bytes a value (both recipes alike), and compiled blocks save less (:func:`_unsaved`).
        float8_auto_filter: ``train.float8_auto_filter``: the layers too small to gain from ``float8`` stay
            at the bf16 peak (``ops.float8.slower_in_float8``).
        trainable: the canonical names of the parameters ``train.trainable`` trains (``train.trainable``'s
            ``trainable_names``; None: all). The others hold no gradient and no optimizer state (``gradless_params``),
            and the backward computes no weight gradient for them (:func:`_train_cost`'s ``frozen``); a layer no
            gradient passes through (before the first that trains, the embedding frozen) runs its forward only and
            saves nothing. In a layer a gradient passes through, a tensor kept only for frozen linear layers' weight
            gradients is not kept (:func:`_unsaved`: a frozen layer needs its weight, not its input, for the input's
            gradient), nor a frozen DSA indexer's loss (not computed); the first layer that trains is counted as
            computing its input's gradient (which nothing reads).

    Raises:
        ValueError: ``float8`` on hardware without a float8 peak.
    """
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    if float8 != "none" and hw.float8_flops_per_s is None:
        raise ValueError(f"the {hw.name} has no float8 matmuls (train.float8 = {float8!r})")
    c, p = config, config.parsed
    H, V = c.hidden_size, c.vocab_size
    T = seq_len * micro_batch_size
    float8_auto_filter = float8_auto_filter and float8 != "none"  # no float8, nothing to leave out
    counts = _param_counts(config, float8, float8_auto_filter, trainable)

    # Whether a gradient reaches the unit about to be costed from a trained parameter before it: units are costed in
    # the order the forward runs them (the main stack, then the MTP depths, which read its output).
    flowing = [counts["embedding"] == 0]

    def layer(s: str, n: LayerParams, f8: Float8Layers) -> ItemCost:
        flowing[0] = backward = flowing[0] or n.trains
        f8 = f8 if float8 != "none" else Float8Layers()
        flops = mixer_class(s).flops_per_token(c, seq_len) * T
        f8_flops = 2 * f8.weights * T  # one multiply-add per weight and token
        if _takes_flex(c, s):
            # flops_per_token counts scores over all keys (the MFU convention); FlexAttention skips
            # the key blocks above the diagonal, and time is what the planner balances. The part of
            # attention's (MLA's for DSA; its indexer below) that grows with seq_len is
            # exactly the scores and weighted values. Under a dense mask attention pays for every key.
            core = mixer_class("+" if s == "D" else s)
            flops -= (core.flops_per_token(c, seq_len) - core.flops_per_token(c, 0)) / 2 * T
        fwd_only, products = 0.0, 0.0
        if s == "D":
            # DSA's indexer (its part of flops_per_token beyond MLA's): its projections, and its scores, float32
            # products counted apart (_indexer_products), causally whatever the head sizes (its kernel skips the key
            # tiles after the diagonal). Without its loss it has no backward at all (_indexer_trains).
            dsa, mla = mixer_class(s), mixer_class("+")
            indexer, fixed = ((dsa.flops_per_token(c, k) - mla.flops_per_token(c, k)) * T for k in (seq_len, 0))
            products = (indexer - fixed) / 2  # (its scores, the part that grows with seq_len, halved)
            flops -= indexer - fixed
            fwd_only = 0.0 if n.indexer_trains else fixed
        saved = _saved_elements(c, s, seq_len, n.indexer_trains) - _unsaved(c, s, f8.names, n.gradless_linears)
        active = _active_params(c, s, n.params, T)
        item = _train_cost(s, flops, saved, n.params, active, T, recompute, hw, min(f8_flops, flops), f8, fwd_only,
                           n.frozen * active / n.params if n.params else 0.0, backward)  # fmt: skip
        if s == "D":
            side = n.indexer_trains and not backward  # (only the indexer's own loss has a backward: DSA's warm-up)
            if side:
                # Its projections' weight gradients; what its loss's checkpointed chunks keep (layer.dsa), and the
                # projections' inputs (the compressed query, the normed input); the block run again under recompute.
                kept = (2 * c.dsa_indexer_head_dim + 24 + (c.q_lora_rank or H) + H) * T * BF16
                again = item.time_s if recompute else 0.0
                item = replace(item, time_s=item.time_s + again + fixed / hw.flops_per_s,
                               flops=item.flops * (2 if recompute else 1) + fixed, act_bytes=kept, ckpt_bytes=kept)  # fmt: skip
            runs = recompute and (backward or side)
            extra_flops, extra_s = _indexer_products(c, products, seq_len, T, runs, hw, n.indexer_trains)
            item = replace(item, time_s=item.time_s + extra_s, flops=item.flops + extra_flops)
        return replace(item, gradless_params=n.gradless)

    def block(sym: str, params: list[LayerParams], f8: list[Float8Layers]) -> ItemCost:
        layers = [layer(s, n, w) for s, n, w in zip(sym, params, f8)]
        kept = flowing[0] or any(item.act_bytes for item in layers)  # (a backward runs: its input is kept)
        return _sum(sym, layers, H * T * FP32 if kept else 0.0)

    blocks = tuple(block(*item) for item in zip(p.blocks, counts["blocks"], counts["float8"]))

    # Embedding: a gather forward; the backward (unless frozen) scatters into a dense fp32 (V, H) gradient.
    emb_params = V * H
    emb_bytes = 2 * T * H * BF16 + (0 if counts["embedding"] else 2 * emb_params * FP32 + T * H * BF16)
    embedding = ItemCost(
        "embedding",
        time_s=emb_bytes / hw.bytes_per_s,
        flops=0.0,
        bytes=emb_bytes,
        params=emb_params,
        act_bytes=0.0,
        ckpt_bytes=0.0,
        gradless_params=counts["embedding"],
    )

    # Head: final norm, (H -> V) projection and cross entropy. Training runs them as the chunked linear
    # cross entropy (ops.cross_entropy, return_logits=False): each chunk's logits pass through memory (the
    # traffic counted: bf16 logits, fp32 logits and log-probs, 5V per token), but only the input and normed
    # input (2H) and the gradients its forward already computed are kept for the backward: dh in bf16 (H per
    # token) and an fp32 (V, H) dW, whatever the number of tokens.
    # A frozen matrix (the embedding's when tied) gets no dW, and hidden states no gradient reaches need no dh: the
    # loss computes and keeps only the gradients asked for.
    head_params, head_gradless, matrix_frozen, norm_trains = counts["head"]

    def head_cost(name: str, params: int, gradless: int = 0) -> ItemCost:
        dh = flowing[0]  # (the hidden states' gradient: half of the products a trained head's has)
        item = _train_cost(name, 2 * H * V * T, 2 * H + 5 * V, params, V * H, T, False, hw,
                           fwd_only_flops=0 if dh else H * V * T, frozen=V * H if matrix_frozen else 0,
                           backward=dh or not matrix_frozen)  # fmt: skip
        kept = 3 * H * T * BF16 * dh + V * H * FP32 * (not matrix_frozen)
        return replace(item, act_bytes=kept, ckpt_bytes=kept, gradless_params=gradless)

    flowing[0] = flowing[0] or norm_trains  # (the final norm's output is the head's input and the MTP depths')
    head = head_cost("head", head_params, head_gradless)
    shared = emb_params if (c.tie_embeddings or p.mtp_depths) else 0
    mtp = []
    for d in range(1, p.mtp_depths + 1):
        # enorm/hnorm, concat, eh_proj (2H -> H), the depth's blocks, final norm; then the shared head.
        own, own_gradless = counts["mtp_extra"][d - 1]
        flowing[0] = flowing[0] or own_gradless < own
        frozen = 2 * H * H * own_gradless / own if own else 0.0  # (of eh_proj's matrix; its norms are few)
        proj = _train_cost("eh_proj", 2 * 2 * H * H * T, 5 * H, own, 2 * H * H, T, False, hw, frozen=frozen,
                           backward=flowing[0])  # fmt: skip
        proj = replace(proj, gradless_params=own_gradless)
        inner = [block(*item) for item in zip(p.mtp_blocks, counts["mtp_blocks"][d - 1], counts["float8_mtp"])]
        depth_head = head_cost("head", 0)
        ckpt = proj.ckpt_bytes + sum(b.ckpt_bytes for b in inner) + depth_head.ckpt_bytes
        mtp.append(_sum(f"mtp {d}", [proj, *inner, depth_head], ckpt))

    source = f"estimate ({hw.name} roofline)"
    # One chunk of the loss's logits, the head weight's and input's bf16 copies (the depths' heads run after it).
    work = (min(T, DEFAULT_CHUNK) * V + V * H + T * H) * BF16
    return Costs(blocks, embedding, head, tuple(mtp), shared, seq_len, micro_batch_size, recompute, source,
                 hw.state_bytes_per_param, float8, float8_auto_filter, work)  # fmt: skip


def step_flops_share(config: ModelConfig, seq_len: int, trainable: Set[str] | None) -> float:
    """The share of a training step's FLOPs that a run training only the canonical names ``trainable``
    (``train.trainable``) computes, of one that trains everything (1.0 for None): what the trainer scales its MFU's
    FLOPs by, as :func:`estimate_costs` counts both (frozen weights' gradients and the backward no gradient reaches
    left out)."""
    if trainable is None:
        return 1.0

    def flops(costs: Costs) -> float:
        return sum(item.flops for item in (*costs.blocks, costs.head, *costs.mtp))

    return flops(estimate_costs(config, seq_len, trainable=trainable)) / flops(estimate_costs(config, seq_len))


def with_times(costs: Costs, times: dict[str, float], source: str, everything: Costs | None = None) -> Costs:
    """``costs`` with the time of every item whose name is a key of ``times`` replaced.

    Keys are block strings (``'M'``, ``'*-'``), ``'embedding'``, ``'head'`` and ``'mtp'`` (one depth). ``everything``:
    the estimate of the same items when every parameter trains, where ``costs`` trains some (``train.trainable``):
    a time, measured training all of a kind, is then scaled by the estimate's share of it each item runs.
    """
    ref = everything or costs

    def swap(item: ItemCost, key: str, full: ItemCost) -> ItemCost:
        if key not in times:
            return item
        return replace(item, time_s=times[key] * (item.time_s / full.time_s if full.time_s else 1.0))

    return replace(
        costs,
        blocks=tuple(swap(b, b.name, f) for b, f in zip(costs.blocks, ref.blocks)),
        embedding=swap(costs.embedding, "embedding", ref.embedding),
        head=swap(costs.head, "head", ref.head),
        mtp=tuple(swap(m, "mtp", f) for m, f in zip(costs.mtp, ref.mtp)),
        source=source,
    )


def recompute_bytes(costs: Costs, start: int, stop: int) -> float:
    """Bytes a checkpointed stage holding blocks ``start:stop`` needs beyond the blocks' inputs while it
    recomputes: one block at a time holds all of its activations again, its input (kept anyway) once.
    Only the micro-batch in its backward recomputes, so a rank needs this once, not per micro-batch in flight."""
    return max((b.act_bytes - b.ckpt_bytes for b in costs.blocks[start:stop]), default=0.0)


def stage_memory(costs: Costs, start: int, stop: int, is_first: bool, is_last: bool) -> dict[str, float]:
    """Memory of the stage holding blocks ``start:stop`` (per micro-batch for activations).

    Returns ``params``, ``gradless`` (those that never get a gradient), ``state_bytes`` (weights + gradients +
    optimizer), ``act_bytes`` (no
    checkpointing), ``act_bytes_ckpt`` (block-level checkpointing) and ``work_bytes`` (live for a moment once
    per micro-batch: :attr:`Costs.work_bytes` on the last stage).
    """
    blocks = costs.blocks[start:stop]
    params = sum(b.params for b in blocks)
    act = sum(b.act_bytes for b in blocks)
    ckpt = sum(b.ckpt_bytes for b in blocks) + recompute_bytes(costs, start, stop)
    if is_first:
        params += costs.embedding.params
    if is_last:
        extra = [costs.head, *costs.mtp]
        params += sum(m.params for m in extra) + (0 if is_first else costs.shared_embedding_params)
        act += sum(m.act_bytes for m in extra)
        ckpt += sum(m.ckpt_bytes for m in extra)
    # No bf16 copy is kept of a float8 layer's weight (its fp32 master is cast to float8 at each matmul), of the
    # embedding (a gather of the fp32 table), or of the head's weight (the chunked loss casts it for its forward
    # only: Costs.work_bytes); the last stage's copy of a shared embedding is the head's or a gather's.
    uncopied = sum(b.float8_params for b in blocks) + (sum(m.float8_params for m in costs.mtp) if is_last else 0)
    uncopied += (costs.embedding.params if is_first else 0) + (
        costs.head.params + (0 if is_first else costs.shared_embedding_params) if is_last else 0
    )
    # A parameter that never gets a gradient has no gradient and no optimizer state: its bf16 and fp32 weights only.
    gradless = sum(b.gradless_params for b in blocks) + (sum(m.gradless_params for m in costs.mtp) if is_last else 0)
    gradless += costs.embedding.gradless_params if is_first else 0
    if is_last:  # (the last stage's copy of a shared embedding is frozen with it)
        shared = costs.shared_embedding_params if costs.embedding.gradless_params and not is_first else 0
        gradless += costs.head.gradless_params + shared
    return {
        "params": params,
        "gradless": gradless,
        "state_bytes": params * costs.state_bytes_per_param
        - uncopied * BF16
        - gradless * (costs.state_bytes_per_param - BF16 - FP32),
        "act_bytes": act,
        "act_bytes_ckpt": ckpt,
        "work_bytes": costs.work_bytes if is_last else 0.0,
    }


def in_flight(pp_rank: int, pp_size: int, vpp: int) -> int:
    """Micro-batch chunks whose activations one rank holds at the peak of Megatron's 1F1B schedule.

    Non-interleaved: ``pp - rank``. Interleaved: the warmup forwards plus one,
    ``2 (pp - rank - 1) + (vpp - 1) pp + 1`` (each is one virtual stage's activations).
    """
    if vpp == 1:
        return pp_size - pp_rank
    return 2 * (pp_size - pp_rank - 1) + (vpp - 1) * pp_size + 1


__all__ = [
    "HARDWARE",
    "Costs",
    "Hardware",
    "ItemCost",
    "estimate_costs",
    "in_flight",
    "recompute_bytes",
    "stage_memory",
    "step_flops_share",
    "with_times",
]
