"""How blocks execute: activation checkpointing, torch.compile and FSDP2 sharding, applied per block.

A fused ``[XY]`` block is one unit for each of them: recomputed as a whole, compiled as one graph
and sharded as one FSDP group. Order (as torchtitan): float8 linear layers (``ops.float8``), then
checkpointing, then compile, then FSDP.
"""

from __future__ import annotations

import collections
import contextlib

import torch
import torch.distributed as dist
from torch import nn


def _all_blocks(model: nn.Module):
    yield from model.blocks.values()
    for depth in model.mtp:
        yield from depth.blocks.values()


#: Recomputation policies a block can get: keep nothing, or keep the outputs of the matmuls and
#: attention kernels (the expensive, compute-bound ops) and recompute the rest (norms, activations,
#: the conv and the scans, which are memory-bound and cheap to redo).
AC_POLICIES = ("none", "full", "selective")


def parse_ac_policy(spec: str) -> dict[str, str]:
    """``"M=selective,*=full"`` -> {symbol: policy}; ``"selective"`` alone applies to every kind.

    A block's kind is its first symbol (the sequence mixer of a fused group). Kinds not named are
    left out (the caller picks their policy). Raises ValueError naming the bad entry.
    """
    from ..pattern.symbols import LAYER_SYMBOLS as ALL_SYMBOLS

    out: dict[str, str] = {}
    spec = spec.strip()
    if not spec:
        return out
    if "=" not in spec:
        if spec not in AC_POLICIES:
            raise ValueError(f"{spec!r} is not one of {', '.join(AC_POLICIES)}")
        return {s: spec for s in ALL_SYMBOLS}
    for entry in spec.split(","):
        kind, _, policy = (x.strip() for x in entry.partition("="))
        if kind not in ALL_SYMBOLS:
            raise ValueError(f"{entry.strip()!r}: {kind!r} is not a layer symbol ({' '.join(ALL_SYMBOLS)})")
        if policy not in AC_POLICIES:
            raise ValueError(f"{entry.strip()!r}: {policy!r} is not one of {', '.join(AC_POLICIES)}")
        if kind in out:  # the first or the last would win without a word
            raise ValueError(f"{entry.strip()!r}: {kind!r} is named twice")
        out[kind] = policy
    return out


def _save_matmuls_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_flash_attention_forward",
    )
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_context():
    """``context_fn`` for ``torch.utils.checkpoint``: save matmul / attention outputs, recompute the rest."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_matmuls_policy())


def apply_activation_checkpointing(model: nn.Module, policy: str = "full") -> nn.Module:
    """Recompute blocks in the backward pass instead of storing their activations.

    Args:
        policy: ``"full"`` (recompute every block whole), ``"selective"`` (keep matmul and
            attention outputs, recompute the rest), ``"none"``, or per block kind, e.g.
            ``"M=selective,*=full,-=none"`` (kinds not named are recomputed whole). A fused
            block is one unit; its kind is its sequence mixer's symbol.
    """
    per_kind = parse_ac_policy(policy)
    for block in _all_blocks(model):
        chosen = per_kind.get(block.symbols[0], "full")
        block.activation_checkpointing = chosen != "none"
        block.checkpoint_context_fn = selective_context if chosen == "selective" else None
    return model


def _seam_policy(hidden_size: int):
    """Keep a fused block's residual sum ``h = x + delta`` for the backward pass, recompute nothing.

    Under bf16 autocast the seam is the add of the float32 residual stream and the sequence
    mixer's bf16 output: the one add of two (..., hidden) tensors of different dtypes that the
    backward reads (the block's final add is the same kind, but nothing reads its output back).
    Left alone, inductor's partitioner saves ``delta`` (bf16, half the bytes) and recomputes ``h``
    inside the seam's norm backward, which then reads two tensors instead of one; an unfused
    model saves ``h`` as the next block's input.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    add = torch.ops.aten.add.Tensor

    def policy(ctx, op, *args, **kwargs):
        if not _tracing():
            # Run eagerly (a graph break in the block, or a backend such as "eager" that runs the
            # traced region as it is): caching every op's output would make it an eager selective
            # checkpoint that keeps every intermediate and refuses any later in-place update of
            # one. Recomputing instead makes it a plain checkpoint: the same values, more time.
            return CheckpointPolicy.PREFER_RECOMPUTE
        if op is add and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args):
            a, b = args
            if a.dtype != b.dtype and a.shape == b.shape and a.shape[-1] == hidden_size:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_SAVE  # the partitioner's own choice, as without a policy

    return policy


def _tracing() -> bool:
    """Whether a selective-checkpoint policy is being asked while AOTAutograd traces the region
    (the partitioner reads its answers), not while the region runs eagerly.

    The test ``torch.utils.checkpoint`` itself makes: a proxy dispatch mode is active.
    ``torch.compiler.is_compiling()`` is no such test: torch 2.11 answers False there, so every op
    was recomputed (fused blocks 13 % slower on the H200, eleventh device session).
    """
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None


def _save_seams(model: nn.Module) -> None:
    """Fused blocks keep their seam's sum (:func:`_seam_policy`) when compiled and not
    checkpointed: a checkpoint region that saves, traced only (``Block.seam_context_fn``).

    Not MoE blocks: their routing breaks the graph (the per-expert loop syncs with the host), and
    dynamo resumes after a break inside the region by running the region eagerly, where the policy
    makes it a checkpoint that recomputes the whole block in the backward.
    """
    import logging
    from functools import partial

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    context = partial(create_selective_checkpoint_contexts, _seam_policy(model.config.hidden_size))
    for block in _all_blocks(model):
        if block.fused and "E" not in block.symbols:
            block.seam_context_fn = context
    notices = logging.getLogger("torch._higher_order_ops.wrap")
    if not any(isinstance(f, _SeamRegionNotice) for f in notices.filters):
        notices.addFilter(_SeamRegionNotice())


class _SeamRegionNotice:
    """Drops torch's notice, printed once per process when a checkpoint with a ``context_fn`` is
    compiled, that the region must not hold in-place ops. The seam regions hold one, ``F.rms_norm``'s
    own ``add_`` of eps to a temporary; functionalized under ``torch.compile`` it is harmless, and
    fused blocks compute the unfused pair's bits (``tests/parallel/test_execution.py``; 200 steps on
    the H200, docs/benchmarks.md). Any other message of that logger passes."""

    def filter(self, record) -> bool:
        return "context_fn is passed to torch.utils.checkpoint under torch.compile" not in record.getMessage()


def compile_blocks(model: nn.Module, save_seams: bool = True, **compile_kwargs) -> nn.Module:
    """``torch.compile`` each block in place (parameter names are unchanged).

    ``save_seams``: fused blocks keep the residual sum between their two mixers for the backward
    pass, as unfused blocks keep their input, instead of recomputing it there (:func:`_seam_policy`).
    On an H200 (``bench-1.3b``, docs/benchmarks.md) fused/unfused went from 0.983 to 1.000 at
    4 × 4096, 1.028 to 1.081 at 1 × 4096 and 1.002 to 0.994 at 1 × 32768, fused peaking at
    unfused's memory (40.7 GiB at 4 × 4096, 0.7 GiB more than without); False leaves the choice
    to inductor's partitioner.

    On CPU, inductor's vectorized C++ code for the chunked SSD backward corrupts the heap now and
    then in torch 2.13 ("double free or corruption" with sequence lengths that need padding), so
    CPU blocks are compiled with scalar C++ code (``cpp.simdlen = 1``) unless the caller passes
    its own ``options``. GPU code generation is unaffected. ``torch.compile`` takes a ``mode`` or
    ``options``, not both: a ``mode`` given with options is spelled out as its options.
    """
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and "options" not in compile_kwargs:
        compile_kwargs = {**compile_kwargs, "options": {"cpp.simdlen": 1}}
    if "options" in compile_kwargs and compile_kwargs.get("mode") is not None:
        from torch._inductor import list_mode_options

        mode = compile_kwargs["mode"]
        compile_kwargs = {k: v for k, v in compile_kwargs.items() if k != "mode"}
        compile_kwargs["options"] = list_mode_options(mode) | compile_kwargs["options"]
    if save_seams:
        _save_seams(model)
    blocks = list(_all_blocks(model))
    _raise_recompile_limit(blocks)
    for block in blocks:
        block.compile(**compile_kwargs)
    return model


# Graphs one block kind may need: training and evaluation (no grad), each with static shapes and
# then, after a second shape, dynamic ones.
_GRAPHS_PER_KIND = 4


def _raise_recompile_limit(blocks: list[nn.Module]) -> None:
    """Let dynamo keep a graph per block kind and mode, beside the graphs it already holds.

    Every block runs the same ``Block.forward`` code, and dynamo caps the graphs it keeps for one
    code object (8 by default): a pattern with several block kinds (``M``, ``*``, ``-``, ``[M-]``,
    …), each traced for training and evaluation and again for a new batch shape, passes that cap,
    and dynamo then runs the remaining blocks *eagerly* with a warning. The graphs of models
    compiled earlier in the process (a benchmark's variants, a sweep, a test module) count
    against the same cap, so the limit is raised above them too: on an H100, a float8 run
    compiled after two others ran some blocks eagerly and its losses left the compiled run's.
    """
    import torch._dynamo.config as dynamo_config

    if not blocks:
        return
    try:  # a private helper (torch >= 2.2); without it the count starts from this model's own graphs
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        held = len(_debug_get_cache_entry_list(type(blocks[0]).forward))
    except (ImportError, TypeError):
        held = 0
    kinds = len({b.symbols for b in blocks})
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, held + _GRAPHS_PER_KIND * kinds)


def apply_fsdp(
    model: nn.Module,
    mesh=None,
    param_dtype: torch.dtype | None = None,
    *,
    reshard_after_forward: bool = True,
    sum_gradients: bool = False,
) -> nn.Module:
    """Shard parameters over the data-parallel processes with FSDP2.

    Units: one per block (a fused block is one), the embedding and the output head each their own
    (a 131k vocabulary is a large share of a small model; the tied head stays with the root,
    which reads the embedding's weight outside its forward), then the root for what is left
    (norms, MTP projections). Works on a model built on the meta device (materialize it with
    :func:`init_sharded` afterwards).

    Args:
        mesh: a 1-D device mesh (default: all processes, on the device type of the model's
            parameters; FSDP's own default would be the GPU wherever there is one, also for a model
            on the CPU; a model on the meta device gets FSDP's default).
        param_dtype: compute dtype of gathered parameters (e.g. bfloat16); gradients are reduced
            in float32. Other than float32, the parameters the model keeps in float32 stay whole on
            every rank: sum their gradients with :func:`reduce_replicated_gradients`, clip with
            :func:`clip_grad_norm`, and build the optimizer with ``train.optim.build_optimizer``.
        reshard_after_forward: free the blocks' (and embedding's, head's) gathered parameters
            after each forward (pipeline stages keep them between micro-batches instead); the
            root always keeps its own until the backward, which begins with them.
        sum_gradients: reduce gradients by sum instead of mean over the mesh (for losses already
            divided by the global number of tokens).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"reshard_after_forward": reshard_after_forward}
    device_type = next(model.parameters(), torch.empty(0)).device.type  # a pipeline stage may hold none
    if mesh is None and device_type != "meta":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh is not None:
        kwargs["mesh"] = mesh
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if param_dtype not in (None, torch.float32):
        # The parameters the model keeps in float32 (``HybridLM.cast``: Mamba2's A_log, D and dt_bias,
        # the MoE router, ...) would be gathered in param_dtype with the rest of their unit; FSDP
        # leaves them whole on every rank instead (a few small tensors), and
        # reduce_replicated_gradients sums their gradients.
        keep = model.fp32_parameter_names()
        kwargs["ignored_params"] = {p for name, p in model.named_parameters() if name in keep}
    for block in _all_blocks(model):
        fully_shard(block, **kwargs)
    if model.embeddings is not None and not (model.config.tie_embeddings and model.norm_f is not None):
        fully_shard(model.embeddings, **kwargs)
    if model.lm_head is not None:
        fully_shard(model.lm_head, **kwargs)
    # The root keeps its parameters from the end of the forward to the backward, which starts with
    # them (FSDP's own default for a root): resharding would free them only to gather them again at
    # once. In torch 2.11 it was worse: FSDP2 looks for the forward's output tensors to hook the
    # re-gather on, did not look inside the ModelOutput dataclass, and the backward read the freed
    # parameters (SIGSEGV in the first backward of every multi-process run; torch 2.13 looks inside).
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    if sum_gradients:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)
    return model


def replicated(p: torch.Tensor) -> bool:
    """Whether ``p`` is held whole by each data-parallel rank: not an FSDP shard (DTensor)."""
    from torch.distributed.tensor import DTensor

    return not isinstance(p, DTensor)


def shard_like(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (full values, the same on every rank) placed as the ``params`` of the same names are: an FSDP
    shard (DTensor) takes this rank's part, in its dtype and on its device, with no collective; the rest are kept.
    A sharded model loads the result with ``load_state_dict`` (FSDP's hooks re-register its shards)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = dict(tensors)
    for k, t in tensors.items():
        if isinstance(p := params.get(k), DTensor):
            full = t.to(device=p.to_local().device, dtype=p.dtype)
            out[k] = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return out


class StepCounts:
    """A MoE router's ``count_reducer`` for ``moe_aux_loss_type = "global_aux_loss"``, as Megatron-LM counts: the routed
    (token, expert) pairs of every data-parallel rank (summed over ``group``; None: this process's alone), added up
    over the micro-batches of the optimizer step so far (Megatron's ``global_tokens_per_expert`` over its
    ``ga_steps``), so that micro-batch m balances with the counts of micro-batches 1..m. :meth:`reset` starts a step.

    A block recomputed under activation checkpointing routes again inside the backward: that call gets back the
    counts its forward used (the forwards' counts are queued, and backwards run in the forwards' order: one
    micro-batch after another, and every pipeline schedule offered), without counting twice or all-reducing again.

    Kept out of torch.compile (``torch.compiler.disable``): the running sum lives between micro-batches, where a
    compiled graph's outputs may be overwritten (CUDA graphs), and a recomputation must be told from a forward.
    """

    def __init__(self, group=None) -> None:
        self.group = group
        self.total: torch.Tensor | None = None  # (S, E) int64: this step's counts so far
        self.used: collections.deque[torch.Tensor] = collections.deque()  # each forward's, for its recomputation

    @torch.compiler.disable
    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        """counts: (S, E) int64, this micro-batch's -> (S, E), the step's so far over every rank."""
        if torch._C._current_graph_task_id() != -1:  # a forward inside a backward: a recomputation
            if not self.used:
                raise RuntimeError(
                    "a router recomputed under activation checkpointing found no forward's counts to use again: "
                    "StepCounts.reset() ran between a micro-batch's forward and its backward"
                )
            return self.used.popleft()
        if self.group is not None:
            counts = counts.clone()
            dist.all_reduce(counts, group=self.group)
        self.total = counts if self.total is None else self.total + counts
        self.used.append(self.total)
        return self.total

    def reset(self) -> None:
        """Start the next optimizer step: no counts yet."""
        self.total = None
        self.used.clear()


def share_expert_counts(model: nn.Module, group=None) -> list[StepCounts]:
    """Give every MoE router of ``model`` a :class:`StepCounts` over the data-parallel ``group`` (None: this process
    alone, its micro-batches still added up), which ``moe_aux_loss_type = "global_aux_loss"`` balances with
    (``Router.count_reducer``); returns them, for the caller to :meth:`~StepCounts.reset` before each optimizer step.

    Every rank of ``group`` must run the same MoE layers on each micro-batch, as data-parallel ranks do: each forward
    all-reduces."""
    from ..layers.moe import Router

    installed = []
    for m in model.modules():
        if isinstance(m, Router):
            m.count_reducer = StepCounts(group)
            installed.append(m.count_reducer)
    return installed


def reduce_replicated_gradients(model: nn.Module, group=None) -> None:
    """Sum over ``group`` the gradients of the parameters an FSDP-sharded ``model`` holds whole on every
    rank (:func:`apply_fsdp` with a param_dtype; FSDP reduces only its shards'), as ``sum_gradients``
    does for the shards. Call after the step's last backward and before the gradient is clipped."""
    grads = [p.grad for p in model.parameters() if p.grad is not None and replicated(p)]
    if grads:  # one collective for all of them
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))


def clip_grad_norm(params, max_norm: float, device: torch.device, counted=lambda p: True) -> float:
    """Clip the gradient of a model spread over processes to ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``
    does in one process; returns the norm before clipping. Each process contributes its local gradients
    (an FSDP shard, or a whole tensor) where ``counted(p)``, so that a copy held by several processes
    (a replicated parameter, a tied embedding on two stages) is counted once; the squares are summed
    over every process.

    Norms and the scaling run as foreach kernels (``get_total_norm``, ``_foreach_mul_``), a few
    launches for the whole model instead of a few per parameter.
    """
    params = [p for p in params if p.grad is not None]
    grads = [p.grad.to_local() if not replicated(p) else p.grad for p in params]
    mine = [g for p, g in zip(params, grads) if counted(p)]
    local = torch.nn.utils.get_total_norm(mine) if mine else torch.zeros((), device=device)
    sq = local.float().square()
    dist.all_reduce(sq)
    norm = sq.sqrt()
    if grads:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return float(norm)


@contextlib.contextmanager
def _full_parameters(module: nn.Module, skip: set[int]):
    """Swap ``module``'s sharded (DTensor) parameters for full plain tensors; on exit copy each
    rank's shard of the full values back and restore the sharded parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    swapped = []
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or id(p) in skip or not isinstance(p, DTensor):
                continue
            local = p.to_local()
            full = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=local.device), p.requires_grad)
            mod._parameters[name] = full
            swapped.append((mod, name, p, full))
    try:
        yield
    finally:
        for mod, name, p, full in swapped:
            shard = distribute_tensor(full.detach(), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())
            mod._parameters[name] = p


@torch.no_grad()
def init_sharded(model: nn.Module, seed: int, roots: list[nn.Module], device: torch.device) -> None:
    """Allocate a meta-built, FSDP-sharded HybridLM (or pipeline stage) on ``device`` and initialize it
    to the weights ``HybridLM(config, seed=seed)`` has, holding one part's full tensors at a time.

    Args:
        model: the HybridLM whose ``init_parts`` cover the parameters.
        roots: the FSDP root modules to allocate (``model`` itself, or the pipeline stages sharing
            its modules); FSDP re-registers its shards when a root is moved.
    """
    for root in roots:
        root.to_empty(device=device)
    parts = model.init_parts(seed)
    modules = [m for m, _ in parts]
    for module, init in parts:
        # Parameters of parts nested in this one (an MTP depth's blocks) are initialized by those parts.
        inner = {m for m in module.modules() if m is not module and any(m is q for q in modules)}
        skip = {id(p) for m in inner for p in m.parameters()}
        with _full_parameters(module, skip):
            init()
    model.reset_buffers()
