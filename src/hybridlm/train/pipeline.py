"""One training step over pipeline stages: ``parallel.pp`` ranks run the stages cut at ``|`` with a
``torch.distributed.pipelining`` schedule, and FSDP2 shards each stage over the data-parallel ranks.

The processes form a (dp, pp) device mesh (rank = dp_index * pp + pp_index). Every rank of one
pipeline replica (one dp_index) reads the same rows; the first stage takes the token ids, and the token ids,
labels and document ids travel to every stage as keyword inputs of each micro-batch. Each row's
losses are weighted per head (the main head and each MTP depth) by its labels of that head over that
head's labels in the whole step (over dp), and FSDP sums the gradients, so a step equals one
process's step on the whole batch, whatever the micro-batches (the MoE balancing losses are each
micro-batch's own, under the main head's weight).

The trainer keeps its one-process path when ``pp == 1``; :class:`PipelineRunner` is what it calls
otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..checkpoint.canonical import to_canonical
from ..checkpoint.io import full_cpu
from ..config import ModelConfig
from ..errors import ConfigError
from ..model import label_counts
from ..ops.float8 import apply_float8
from ..parallel.execution import (
    apply_activation_checkpointing,
    apply_fsdp,
    clip_grad_norm,
    compile_blocks,
    init_sharded,
    reduce_replicated_gradients,
    replicated,
    share_expert_counts,
)
from ..parallel.pipeline import build_pipeline_model, make_schedule, rank_stages
from .trainable import freeze_others


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def check_every_rank_holds_layers(config: ModelConfig, pp: int) -> None:
    """Refuse (ConfigError) a pattern that leaves a pipeline rank without layers, embedding or head (an empty
    segment between '|'s): it would have no training state to save. Every rank checks every rank alike."""
    for r in range(pp):
        if not any(st.blocks or st.is_first or st.is_last for st in rank_stages(config, r, pp)):
            raise ConfigError(
                "model.pattern",
                f"pipeline rank {r} of {pp} would hold no layers (an empty segment between '|'s); "
                "training needs a layer on every rank",
            )


class PipelineRunner:
    """The stages of this rank, their schedule, and the collectives a step needs.

    Args:
        config: the model.
        pp: pipeline ranks; ``world_size / pp`` is the data-parallel size.
        schedule: a name of :data:`hybridlm.parallel.pipeline.SCHEDULES`.
        microbatches: micro-batches per step (each of ``local_batch / microbatches`` rows).
        local_batch: rows per step on each data-parallel rank.
        seq_len: tokens per row.
        seed: initialization seed (weights equal ``HybridLM(config, seed=seed)``).
        param_dtype: compute dtype (bf16 under autocast), None for float32: FSDP's parameter
            dtype when dp > 1, and the dtype of activations sent between stages.
        activation_checkpointing: a recomputation policy (``train.ac_policy``), or None.
        compile, compile_mode: ``torch.compile`` each block, in this mode (``train.compile_mode``).
        float8, float8_auto_filter: the blocks' linear layers in float8 (``train.float8``,
            ``train.float8_auto_filter``; ``ops.float8.apply_float8``).
        autocast: a context manager factory for the forward passes.

    Attributes:
        model: one HybridLM holding this rank's stages' modules under the whole model's names (for
            the optimizer, checkpoints and counting).
        stages: the stage modules, in the order the schedule runs them.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        pp: int,
        schedule: str,
        microbatches: int,
        local_batch: int,
        seq_len: int,
        seed: int,
        device: torch.device,
        param_dtype: torch.dtype | None = None,
        activation_checkpointing: str | None = None,
        compile: bool = False,
        compile_mode: str = "default",
        float8: str = "none",
        float8_auto_filter: bool = False,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        trainable: set[str] | None = None,
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.pipelining import PipelineStage

        world, rank = dist.get_world_size(), dist.get_rank()
        if world % pp:
            raise ConfigError("parallel.pp", f"{pp} does not divide the {world} processes")
        if local_batch % microbatches:
            raise ConfigError(
                "parallel.microbatches",
                f"{microbatches} micro-batches do not split the {local_batch} rows each data-parallel rank "
                "takes per step (train.batch_size / (world size / parallel.pp))",
            )
        check_every_rank_holds_layers(config, pp)
        self.config, self.device, self.autocast = config, device, autocast
        self.pp, self.dp = pp, world // pp
        self.mesh = init_device_mesh(device.type, (self.dp, pp), mesh_dim_names=("dp", "pp"))
        self.pp_rank, self.dp_rank = rank % pp, rank // pp
        self.dp_group, pp_group = self.mesh["dp"].get_group(), self.mesh["pp"].get_group()

        self.model, self.stages = build_pipeline_model(config, self.pp_rank, pp, seed)
        # "global_aux_loss" balances with the counts of this stage's data-parallel ranks, over a step's micro-batches.
        self.step_counts = share_expert_counts(self.model, self.dp_group if self.dp > 1 else None)
        apply_float8(self.model, float8, float8_auto_filter)  # before checkpointing and compile wrap the layers
        if activation_checkpointing:  # a policy: "full", "selective" or per block kind
            apply_activation_checkpointing(self.model, activation_checkpointing)
        if compile:  # on meta, so say what compile_blocks cannot see: CPU blocks get scalar C++ code
            mode = {} if compile_mode == "default" else {"mode": compile_mode}
            compile_blocks(self.model, **mode, **({"options": {"cpp.simdlen": 1}} if device.type == "cpu" else {}))
        freeze_others(self.model, config.parsed, trainable)  # (before FSDP shards the stages: it keeps the flag)
        for m in self.stages:
            m.boundary_dtype = param_dtype or torch.float32
            # One data-parallel rank has nothing to shard: the stage then runs like the one-process
            # trainer (float32 parameters under autocast, a float32 residual stream from the bf16 it
            # receives), without FSDP's per-step copies (measured on one H200: 0.925x -> 0.942x of the
            # same plain benchmark step). Under FSDP the residual is in the gathered parameters' dtype.
            m.residual_dtype = torch.float32 if self.dp == 1 else None
            if self.dp > 1:
                # Stages keep their gathered parameters between micro-batches (torchtitan does the same).
                apply_fsdp(m, self.mesh["dp"], param_dtype, reshard_after_forward=False, sum_gradients=True)
        init_sharded(self.model, seed, self.stages, device)

        # Static shapes: no probing forward on real data (it would count MoE routing twice).
        mb = local_batch // microbatches
        n_stages = len(self.stages) * pp
        hidden = torch.empty(mb, seq_len, config.hidden_size, dtype=param_dtype or torch.float32, device=device)
        hidden.requires_grad_(True)  # activations carry gradients both ways
        ids = torch.zeros(mb, seq_len, dtype=torch.long, device=device)
        loss = torch.zeros((), device=device)
        heads = torch.zeros(1 + config.parsed.mtp_depths, device=device)  # each head's loss (_loss)
        self.pipeline_stages = [
            PipelineStage(
                m,
                m.pattern_stage.segment if m.pattern_stage.segment is not None else self.pp_rank,
                n_stages,
                device,
                input_args=ids if m.pattern_stage.is_first else hidden,
                output_args=(loss, heads) if m.pattern_stage.is_last else hidden,
                group=pp_group,
            )
            for m in self.stages
        ]
        self.has_first = any(m.pattern_stage.is_first for m in self.stages)
        self.has_last = any(m.pattern_stage.is_last for m in self.stages)
        self._heads: list[torch.Tensor] = []  # each micro-batch's weighted losses per head (_loss)
        self.schedule = make_schedule(schedule, self.pipeline_stages, microbatches, self._loss)

        # The first and the last stage both hold the embedding when the head is tied to it or MTP
        # depths embed tokens: one group per data-parallel index sums the two copies' gradients.
        self.tied_group = None
        self.duplicate: set[int] = set()
        if pp > 1 and (config.tie_embeddings or config.parsed.mtp_depths):
            for d in range(self.dp):
                group = dist.new_group([d * pp, d * pp + pp - 1])
                if d == self.dp_rank and self.pp_rank in (0, pp - 1):
                    self.tied_group = group
            if self.pp_rank == pp - 1 and self.model.embeddings is not None:
                self.duplicate = {id(self.model.embeddings.weight)}  # counted once, on the first stage

    def _loss(self, output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        loss, heads = output
        self._heads.append(heads)
        return loss

    def _run(self, batch: dict[str, torch.Tensor], weight: torch.Tensor, train: bool) -> tuple[float, list[float]]:
        """Run the schedule on this rank's rows; returns this rank's weighted loss and weighted loss of each
        head (the main head, then each MTP depth; zeros on ranks without the last stage)."""
        ids, labels = batch["input_ids"], batch["labels"]
        kwargs = {"input_ids": ids, "labels": labels, "doc_ids": batch["doc_ids"], "weight": weight}
        self._heads = []
        for m in self.stages:
            m.aux_total = 0.0
        for routed in self.step_counts:  # a step's micro-batches count from nothing (an evaluation's too)
            routed.reset()
        losses: list[torch.Tensor] = []
        args = (ids,) if self.has_first else ()
        run = self.schedule.step if train else self.schedule.eval
        with self.autocast():
            run(
                *args,
                target=labels if self.has_last else None,
                losses=losses if self.has_last else None,
                return_outputs=False,
                **kwargs,
            )
        zero = torch.zeros((), device=self.device)
        total = sum((x.detach() for x in losses), zero) + sum((m.aux_total for m in self.stages), zero)
        heads = sum(self._heads, weight.new_zeros(weight.shape[1:]))
        return float(total), heads.tolist()  # one device sync each, after the schedule

    def forward_backward(self, batch: dict[str, torch.Tensor], weight: torch.Tensor) -> tuple[float, list[float]]:
        """Forward and backward over all micro-batches of one step; gradients end up reduced over dp
        (FSDP syncs only after the last micro-batch) and the tied embedding copies summed.

        Args:
            batch: this rank's rows: ``input_ids``, ``labels``, ``doc_ids``, each (B, L).
            weight: (B, 1 + MTP depths) each row's share of the step's labels of the main head and of
                each depth, over all data-parallel ranks (the trainer's ``_label_counts`` over its totals).

        Returns:
            This rank's part of the step's loss and of each head's loss, the main head's first (sums over
            all ranks = the step's).
        """
        out = self._run(batch, weight, train=True)
        if self.dp > 1:
            reduce_replicated_gradients(self.model, self.dp_group)
        if self.tied_group is not None and self.model.embeddings.weight.requires_grad:  # (train.trainable froze it)
            grad = self.model.embeddings.weight.grad
            dist.all_reduce(_local(grad), group=self.tied_group)
        return out

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(sum of main-head losses over labelled tokens, labelled tokens) of this rank's rows (on
        the last stage; zeros elsewhere)."""
        for m in self.stages:
            m.eval()
        weight = label_counts(batch["labels"], self.config.parsed.mtp_depths, batch["doc_ids"]).float()
        try:
            _, heads = self._run(batch, weight, train=False)
        finally:  # also when it raises: stages left in eval mode trained on in it (MoE expert biases frozen)
            for m in self.stages:
                m.train()
        return heads[0], float(weight[:, 0].sum()) if self.has_last else 0.0

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradient of the whole model (over stages and shards) to ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` does in one process; returns the norm before clipping."""

        def counted(p) -> bool:  # a tied copy once, a parameter each dp rank holds whole once
            return id(p) not in self.duplicate and (self.dp_rank == 0 or not replicated(p))

        return clip_grad_norm(self.model.parameters(), max_norm, self.device, counted)

    def gather_canonical(self) -> dict[str, torch.Tensor]:
        """The whole model's canonical tensors on rank 0 (empty elsewhere), on the CPU, one tensor in flight at a
        time: each stage's data-parallel group gathers a tensor's shards, and its first rank sends it to rank 0,
        which keeps the first copy of a name two stages hold (a tied embedding). Each stage pickled whole through
        ``gather_object`` cost its sender a copy, and rank 0 a buffer of world size x stage size (on the GPU under
        NCCL) plus the unpickled copy: 4.5 GB over rank 0's own stage to gather a 1.5 GB model at pp=2."""
        state = to_canonical(self.model.state_dict(), self.config.parsed)
        rank, out = dist.get_rank(), {}
        for r in range(self.pp):  # stage r's first data-parallel rank is global rank r (rank = dp * pp + pp_rank)
            if rank == 0 and r == 0:  # rank 0's own tensors: no copy on the CPU
                out = {k: full_cpu(v) for k, v in state.items()}
            elif rank == 0:
                box: list = [None]
                dist.recv_object_list(box, src=r)
                wanted = [(k, shape, dtype) for k, shape, dtype in box[0] if k not in out]
                dist.send_object_list([[k for k, _, _ in wanted]], dst=r)
                for k, shape, dtype in wanted:
                    buf = torch.empty(shape, dtype=dtype, device=self.device)
                    dist.recv(buf, src=r)
                    out[k] = buf.cpu()
            elif self.pp_rank == r:
                send = set()
                if rank == r:
                    dist.send_object_list([[(k, tuple(v.shape), v.dtype) for k, v in state.items()]], dst=0)
                    box = [None]
                    dist.recv_object_list(box, src=0)
                    send = set(box[0])
                for k, v in state.items():  # every data-parallel rank of the stage: full_tensor is a collective
                    full = v.full_tensor() if hasattr(v, "full_tensor") else v
                    if k in send:
                        dist.send(full.detach().contiguous(), dst=0)
        return out
