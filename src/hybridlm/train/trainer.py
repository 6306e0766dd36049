"""The training loop behind ``hybridlm train``.

One process or many (``torchrun``: data parallel with FSDP2; with ``parallel.pp > 1`` pipeline
stages too, run by :class:`hybridlm.train.pipeline.PipelineRunner`). Each optimizer step takes
``train.batch_size`` packed rows (split over processes and micro-batches), clips the gradient,
steps AdamW and the schedule. Every ``checkpoint_every`` steps the DCP training state is written
to ``<run_dir>/checkpoints/step-NNNNNN`` (the last ``keep_checkpoints`` are kept); at the end the
weights are exported as a hybridlm checkpoint in ``<run_dir>/model`` with the tokenizer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import resource
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint.canonical import to_canonical
from ..checkpoint.io import MAX_LISTED, check_fit, full_cpu, meta_shapes, refuse_losing_checkpoint, remove_directory
from ..checkpoint.training_state import (
    check_same_model,
    load_training_state,
    read_trainer_state,
    save_training_state,
)
from ..checkpoint.weights import WRONG_SHAPE, canonical_state_dict, load_canonical_into, read_tensors, save_state_dict
from ..errors import CheckpointError, ConfigError, DataError, DiskFullError, TrainingDivergedError
from ..model import HybridLM, combine_losses, label_counts
from ..ops.dispatch import check_device as check_kernels_device
from ..ops.float8 import apply_float8, require_float8_linears, torchao_float8
from ..parallel.execution import (
    apply_activation_checkpointing,
    apply_fsdp,
    clip_grad_norm,
    compile_blocks,
    reduce_replicated_gradients,
    replicated,
    shard_like,
    share_expert_counts,
)
from ..plan.cost import step_flops_share
from .collector import ManualGC
from .config import CUDA_GRAPH_MODES, RunConfig, records_init_from
from .data import (
    BlendedRows,
    PackedRows,
    Sampler,
    check_batch_split,
    check_distinct_sources,
    check_outside_text_folder,
    eval_rows,
    load_corpus,
    source_labels,
    source_path,
    split,
)
from .evaluation import loss_sums, weighted_mean
from .expert_load import moe_layer_keys
from .guard import NonFiniteGuard, weights_finite
from .listing import checkpoint_dir_name, list_checkpoints, load_newest, step_of
from .metrics import Metrics, loss_unit, plot_losses
from .optim import ExpertBiasHook, build_optimizer, build_scheduler
from .pipeline import PipelineRunner
from .rundir import (
    CHECKPOINTS,
    CONFIG_FILE,
    MODEL_DIR,
    claim,
    latest_checkpoint,
    remove_if_empty,
    set_aside_newer,
    unlock,
    write_config,
)
from .signals import SetupSignals, StopSignals, TrainingInterrupted, signal_name
from .threads import cpu_threads
from .tokenizer import build_tokenizer, tokenizer_fingerprint
from .trainable import freeze_others, trainable_names, trained_elements

logger = logging.getLogger("hybridlm.train")


def _dist(device: torch.device) -> tuple[int, int]:
    """(rank, world size), initializing torch.distributed under torchrun: NCCL for a run on CUDA,
    gloo for one on the CPU (also on a machine with GPUs, where NCCL would refuse CPU tensors)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: The CUDA caching allocator's setting for a run whose environment sets none (torchtitan's launcher
#: sets the same): segments that grow in place instead of one cudaMalloc per size, so memory freed by
#: one shape (eval, a longer row) is reused by the next instead of fragmenting.
CUDA_ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator() -> str:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` to :data:`CUDA_ALLOC_CONF` unless the environment already has it;
    returns the setting in force. torch reads it when CUDA starts, so this must come before that (the
    trainer calls it first thing): where the process has already used CUDA, nothing is set and the
    answer says so."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and torch.cuda.is_initialized():
        return "unset (CUDA was in use before the trainer started)"
    return os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


def measure_matmul_flops(device: torch.device, n: int = 4096, iters: int = 20) -> float:
    """bf16 matmul FLOP/s of this GPU, measured now (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1000)


def resolve_device(spec: str) -> torch.device:
    """The device of ``train.device`` (auto, cpu, cuda, cuda:N) for this process: under torchrun, "auto" and
    "cuda" take the GPU of the process's ``LOCAL_RANK``, and one GPU named for every process is refused."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun's; 0 in one process
    asked = spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise DataError(f"train.device: {asked!r} was asked for but no CUDA device is available")
    count = torch.cuda.device_count()
    if device.index is None:  # (torch.cuda.set_device refuses an index-less device)
        if local_rank >= count:  # (else torch.cuda.set_device's "invalid device ordinal", shown as a possible bug)
            raise ConfigError(
                "train.device",
                f"{asked!r} gives each process the GPU of its LOCAL_RANK, but this machine has {count} CUDA "
                f"device(s) for process {local_rank}: launch at most {count} processes per machine "
                f"(torchrun --nproc_per_node {count})",
            )
        return torch.device(f"cuda:{local_rank}")
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "train.device",
            f"{asked!r} would put every process on this machine on one GPU; use 'cuda' or 'auto' "
            "(each process takes the GPU of its LOCAL_RANK)",
        )
    if device.index >= count:
        raise ConfigError("train.device", f"{asked!r}: this machine has {count} CUDA device(s)")
    return device


def _count(n: int) -> str:
    """A parameter count as the header writes it: millions, or the number itself below 10,000 (0.00M says nothing)."""
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"


def _fresh_window() -> dict[str, Any]:
    """What a console row averages over: the steps since the previous row."""
    return {"tokens": 0, "time": 0.0, "losses": []}


def _saved_window(saved: Any) -> dict[str, Any]:
    """The window a checkpoint saved, so that the first row after a resume averages what it would have;
    a fresh one where it is missing (an older checkpoint) or malformed (it is only what the rows report)."""
    window = _fresh_window()
    if not isinstance(saved, dict):
        return window
    tokens, seconds, losses = saved.get("tokens"), saved.get("time"), saved.get("losses")
    pairs = isinstance(losses, list) and all(
        isinstance(x, list) and len(x) == 2 and all(isinstance(v, (int, float)) for v in x) for x in losses
    )
    if type(tokens) is int and isinstance(seconds, (int, float)) and pairs:
        window.update(tokens=tokens, time=float(seconds), losses=losses)
    return window


def microbatches_for(run: RunConfig, local_batch: int, rows: int) -> int | None:
    """The ``parallel.microbatches`` that gives pipeline micro-batches of ``rows`` rows, where the schedule runs
    that many (1F1B needs at least pp, the multi-stage schedules a multiple of it); else None."""
    if local_batch % rows:
        return None
    try:
        run.with_overrides([f"parallel.microbatches={local_batch // rows}"])._validate_parallel()
    except ConfigError:
        return None
    return local_batch // rows


def _divisors(n: int) -> list[int]:
    """The divisors of ``n``, found up to its square root (a loop up to ``n`` itself ran for hours on a
    batch of 2**40 rows)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _data_position(saved: Any, checkpoint: Path) -> tuple[int, int] | None:
    """``(rows, seq_len)`` of a checkpoint's ``data_position`` (None: saved before positions were)."""
    if saved is None:
        return None
    rows, seq_len = (saved.get(k) if isinstance(saved, dict) else None for k in ("rows", "seq_len"))
    if not all(type(v) is int and v >= 0 for v in (rows, seq_len)) or seq_len == 0:
        raise CheckpointError(f"{checkpoint}: damaged data_position in its trainer state: {saved!r}")
    return rows, seq_len


def _identity_sources(identity: dict[str, Any]) -> list[dict[str, Any]]:
    """The sources a checkpoint's ``data`` record names, each ``{"source", "tokens", "docs", "fingerprint"}`` as far
    as recorded: a blend's list, or the single corpus's record itself (a plain source, and every checkpoint from
    before blends)."""
    sources = identity.get("sources")
    return [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else [identity]


def _same_shares(a: Any, b: Any) -> bool:
    """Whether two recorded ``data.weights`` give the same mix: equal once normalised (``[7, 3]`` is ``[0.7, 0.3]``),
    or both None (each source weighed by its rows). A damaged record gives no mix, so it differs."""
    if a is None or b is None:
        return a is b
    try:
        wa, wb = (np.asarray(w, dtype=np.float64) for w in (a, b))
        return wa.shape == wb.shape and bool(np.allclose(wa / wa.sum(), wb / wb.sum(), rtol=1e-12, atol=0))
    except (TypeError, ValueError):
        return False


def _host_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _on_this_host(need: int | float) -> tuple[float, str]:
    """What ``need`` bytes per process come to on this machine, whose memory the processes torchrun
    started here (``LOCAL_WORLD_SIZE``) share, and the words that say so (none in one process)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local == 1:
        return need, ""
    return need * local, f" ({need * local / 2**30:,.1f} GiB for the {local} processes on this machine)"


class Trainer:
    """Builds everything a run needs and runs it.

    Process-wide state, as a notebook sees it: the set-up seeds torch's global RNG with ``train.seed`` (as
    transformers' Trainer seeds with its ``seed``), and a resume sets the global torch, CUDA and Python ``random``
    states to the checkpoint's; ``train.threads`` holds only inside the set-up and :meth:`run_loop`. Unless the
    environment has one, ``PYTORCH_CUDA_ALLOC_CONF`` is set (:func:`configure_cuda_allocator`) for the rest of the
    process, on any device (a CPU run too), so CUDA started later in the process gets expandable segments.

    Args:
        run: the run configuration.
        run_dir: where the run lives (default: ``run.train.run_dir`` with ``{time}`` filled in).
        resume: continue the run in ``run_dir`` from its latest checkpoint.
        progress: show a progress bar (default: when stdout is a terminal).
    """

    def __init__(
        self,
        run: RunConfig,
        run_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool | None = None,
        data_named: bool = False,
        tokenizer_named: bool = False,
    ):
        """``data_named``: the resume's data was named on purpose (the CLI: ``--set data.source=...`` or
        ``data.jsonl_field``), so a corpus other than the checkpoint's is meant, not refused; ``tokenizer_named``: so
        was its tokenizer (``data.tokenizer``, ``data.eos_token``), and with it the corpus's ids (see
        :meth:`_check_same_data`)."""
        self.run = run
        self.data_named, self.tokenizer_named = data_named, tokenizer_named
        t = run.train
        self.cuda_alloc_conf = configure_cuda_allocator()
        self.device = resolve_device(t.device)
        check_kernels_device(self.device)
        self.rank, self.world = _dist(self.device)
        self.is_main = self.rank == 0
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None

        with cpu_threads(t.threads), SetupSignals() as signals:  # a signal now raises, so that the clean-up below runs
            self._setup_signals = signals
            self.run_dir, created = self._claim_run_dir(run_dir, resume)
            try:
                self._build(resume, progress)
            except BaseException:
                signals.deferred = True  # (torchrun signals the other ranks when one fails)
                if self.is_main:  # a run that did not start leaves the folder as it was (no empty one behind)
                    unlock(self.run_dir)
                    remove_if_empty(created)
                raise

    def _build(self, resume: bool, progress: bool | None) -> None:
        """Everything after the run folder: data, model, optimizer, a resumed state, then config.toml."""
        run, t = self.run, self.run.train
        torch.manual_seed(t.seed)

        # The layout first: the corpus may take long to read. The pp ranks of one pipeline replica read the
        # same rows (rank = dp index * pp + pp index).
        self.pp = run.parallel.pp
        if self.world % self.pp:
            hint = (
                " (pipeline ranks are processes: launch with torchrun --nproc_per_node N, N a multiple of pp, or"
                " set parallel.pp to one that divides it, e.g. --set parallel.pp=1: checkpoints load into any split)"
            )
            raise ConfigError("parallel.pp", f"{self.pp} does not divide the {self.world} processes" + hint)
        self.dp, self.dp_rank = self.world // self.pp, self.rank // self.pp
        check_batch_split(t.batch_size, self.dp)
        self.local_batch = t.batch_size // self.dp
        self._check_batch_fits()  # first: the hints below look at the batch's divisors
        self.micro = min(t.micro_batch_size or self.local_batch, self.local_batch)
        if self.pp > 1:  # the pipeline splits each step into parallel.microbatches
            n_micro = run.parallel.resolved_microbatches()
            if self.local_batch % n_micro:
                fits = [n for r in _divisors(self.local_batch) if (n := microbatches_for(run, self.local_batch, r))]
                hint = f"--set parallel.microbatches={' or '.join(map(str, sorted(fits)))}, or " if fits else ""
                raise ConfigError(
                    "parallel.microbatches",
                    f"{n_micro} micro-batches do not split the {self.local_batch} rows each data-parallel rank "
                    f"takes per step (train.batch_size {t.batch_size} / {self.dp} data-parallel ranks); {hint}"
                    f"a train.batch_size that is a multiple of {self.dp * n_micro}",
                )
            self.micro = self.local_batch // n_micro
            if t.micro_batch_size not in (None, self.micro):
                n = microbatches_for(run, self.local_batch, t.micro_batch_size)
                match = f", or --set parallel.microbatches={n}" if n else ""
                raise ConfigError(
                    "train.micro_batch_size",
                    f"{t.micro_batch_size} differs from the pipeline's micro-batches of {self.micro} rows "
                    f"(batch_size / data-parallel size / parallel.microbatches); leave it unset{match}",
                )
        if self.local_batch % self.micro:
            raise DataError(f"train.micro_batch_size {self.micro} must divide the per-process batch {self.local_batch}")

        # CUDA graphs (reduce-overhead) replay the blocks with static buffers: one process, one device.
        graphs_fit = self.world == 1 and self.device.type == "cuda"
        self.compile_mode = t.compile_mode
        if self.compile_mode == "auto":
            self.compile_mode = "reduce-overhead" if graphs_fit else "default"
        self.cuda_graphs = t.compile and self.compile_mode in CUDA_GRAPH_MODES
        if self.cuda_graphs and not graphs_fit:
            raise ConfigError(
                "train.compile_mode",
                f"{t.compile_mode!r} records CUDA graphs: it needs one CUDA process (here {self.world} "
                f"process(es) on {self.device.type}); use 'auto' or 'default'",
            )

        # Data.
        self.sources = run.data.sources()  # one corpus, or a blend's
        check_distinct_sources(self.sources)
        for source in self.sources:
            check_outside_text_folder(self.run_dir, source)
        self.tokenizer = build_tokenizer(run.data.tokenizer, eos_token=run.data.eos_token)
        if resume and t.init_from is not None and not records_init_from(self.run_dir / CONFIG_FILE):
            # The folder's weights would not be loaded, and its config under the run's [model] fields replaced the
            # run's own model (init_std, loss weights) without a word.
            raise ConfigError(
                "train.init_from",
                f"{t.init_from}: {self.run_dir} did not start from an init folder, and a resume continues from the "
                "run's own checkpoint (train.init_from starts a fresh run only): leave it out to resume, or fine-tune "
                "in a new run (another --run-dir)",
            )
        # The model's checks need only the tokenizer: before the corpus, whose reading may take minutes.
        self.config = run.model_config(self.tokenizer.vocab_size)
        c = self.config
        self._aux_losses = ("E" in c.symbols and (c.moe_aux_loss_coeff > 0 or c.moe_z_loss_coeff > 0)) or (
            "D" in c.symbols and c.dsa_indexer_loss_coeff > 0
        )
        # A resume continues from the run's own checkpoint: the init folder is not read again (it may be gone).
        self.init_from = source_path(t.init_from) if t.init_from is not None and not resume else None
        init_vocab = self.init_from is not None and "vocab_size" not in run.set_model_fields()
        if init_vocab and self.config.vocab_size < self.tokenizer.vocab_size:
            inside = self.init_from / "tokenizer.json"
            own = f" (data.tokenizer={inside}, the checkpoint's own)" if inside.is_file() else ""
            raise ConfigError(
                "train.init_from",
                f"{self.init_from}: the checkpoint's vocabulary of {self.config.vocab_size} tokens is smaller than "
                f"the {self.tokenizer.vocab_size} of data.tokenizer {run.data.tokenizer!r}; train with a tokenizer "
                f"that fits it{own}",
            )
        if self.config.vocab_size < self.tokenizer.vocab_size:
            raise DataError(
                f"model.vocab_size {self.config.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size} "
                f"(a preset's own size, or one set): --set model.vocab_size={self.tokenizer.vocab_size} or more"
            )
        meta = HybridLM(self.config, device="meta")
        self.num_params = int(meta.num_params())
        #: What one token uses (an MoE layer's top-k routed experts of all), for the header; None without MoE layers.
        self.num_active_params = int(meta.num_params(active=True)) if "E" in self.config.symbols else None
        self._check_model_fits()
        #: The linear layers ``train.float8`` runs in float8 (all ranks' stages together; 0 without it).
        self.float8_layers = self._check_float8(meta)
        #: Canonical names of the parameters ``train.trainable`` trains (None: all of them).
        self.trainable = trainable_names(meta, self.config.parsed, t.trainable)
        #: Elements of those (the header's; None: every parameter trains).
        self.num_trainable = (
            None if self.trainable is None else trained_elements(meta, self.config.parsed, self.trainable)
        )
        if resume:
            self._check_same_model()
        init_tensors = self._read_init() if self.init_from is not None else None
        self._read_data()

        # Model.
        self.pipeline = None
        if self.pp > 1:
            self.pipeline = PipelineRunner(
                self.config,
                pp=self.pp,
                schedule=run.resolved_schedule(),
                microbatches=run.parallel.resolved_microbatches(),
                local_batch=self.local_batch,
                seq_len=run.data.seq_len,
                seed=t.seed,
                device=self.device,
                param_dtype=self.autocast_dtype,
                activation_checkpointing=t.ac_policy if t.activation_checkpointing else None,
                compile=t.compile,
                compile_mode=self.compile_mode,
                float8=t.float8,
                float8_auto_filter=t.float8_auto_filter,
                autocast=self._autocast,
                trainable=self.trainable,
            )
            self.model = self.pipeline.model  # this rank's stages, under the whole model's names
        else:
            self.model = HybridLM(self.config, seed=t.seed, device=self.device)
        if init_tensors is not None:  # before wrapping and sharding, the model's own dtypes kept (values are copied)
            # Pipeline stages are sharded over the data-parallel ranks already: each rank loads its shards.
            own = to_canonical(self.model.state_dict(), self.config.parsed)
            load_canonical_into(self.model, shard_like(init_tensors, own), source=str(self.init_from))
            del init_tensors
        # (A resume loads its weights instead, and init_from's are checked as read.)
        if not resume and self.init_from is None and not weights_finite(self.model, self.device):
            raise ConfigError(
                "model.init_std",
                f"{self.config.init_std} makes the initial weights overflow to inf: nothing could train (every "
                "step would be skipped, and the end refused as diverged); use a smaller one (default 0.02)",
            )
        # Forward + backward; with train.trainable, of the step that runs (no frozen weight's gradient, no backward
        # before the first trained layer), so that MFU counts the work done.
        self.step_share = step_flops_share(self.config, run.data.seq_len, self.trainable)
        self.flops_per_token = 3 * float(self.model.flops_per_token(run.data.seq_len)) * self.step_share
        # "global_aux_loss" balances with the counts of every rank's micro-batches of the step so far.
        self.step_counts = (
            []
            if self.pipeline is not None
            else share_expert_counts(self.model, dist.group.WORLD if self.world > 1 else None)
        )
        if self.pipeline is None:  # before checkpointing and compile wrap the layers
            apply_float8(self.model, t.float8, t.float8_auto_filter)
        if t.activation_checkpointing and self.pipeline is None:
            apply_activation_checkpointing(self.model, t.ac_policy)
        if t.compile and self.pipeline is None:
            compile_blocks(self.model, **({} if self.compile_mode == "default" else {"mode": self.compile_mode}))
        if self.pipeline is None:  # (train.trainable: before FSDP shards them, which keeps the flag; stages: their own)
            freeze_others(self.model, self.config.parsed, self.trainable)
        if self.world > 1 and self.pipeline is None:
            # Losses are divided by the labelled tokens of all processes: gradients are summed.
            apply_fsdp(self.model, param_dtype=self.autocast_dtype, sum_gradients=True)
        self.optimizer = build_optimizer(self.model, run.optim)
        # Counts routed tokens and moves the expert biases before each optimizer step.
        self.expert_bias = ExpertBiasHook(
            self.optimizer,
            self.model,
            run.optim.moe_expert_bias_rate,
            group=self.pipeline.dp_group if self.pipeline is not None else None,
        )
        # Every MoE layer of the whole model (each pipeline rank lists all): the moe_load_imbalance metric's.
        self._moe_keys = moe_layer_keys(self.config.parsed)
        #: Each MoE layer's load imbalance in the last step, by TensorBoard tag (:meth:`_expert_load`).
        self.moe_layer_load: dict[str, float] = {}
        self.scheduler = build_scheduler(self.optimizer, t.steps, run.optim)
        self.step, self._window = 0, _fresh_window()
        self._gradient_seen = False  # (a pipeline run checks its first step's gradients: _check_some_gradient)
        self.guard = NonFiniteGuard(t.max_nonfinite_steps)
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                again, folder = self.run_dir / CONFIG_FILE, self.run_dir / CHECKPOINTS
                hint = ""
                if again.is_file():
                    hint = f"; the run stopped before its first: start it anew with --config {again} and another "
                    hint += "--run-dir"
                # A checkpoint that is no folder (a file, a broken link) is not listed: say so, not "stopped before".
                odd = sorted(p.name for p in folder.iterdir() if step_of(p) is not None) if folder.is_dir() else []
                if odd:
                    hint = f"; {', '.join(odd)} in it {'is' if len(odd) == 1 else 'are'} not a folder (a broken link?)"
                elif os.path.lexists(folder) and not folder.is_dir():
                    hint = "; it is not a folder (a file, or a broken link?)"
                raise DataError(f"{self.run_dir}: no checkpoint to resume from (looked in {folder}){hint}")

            # The newest checkpoint that loads (a damaged one is skipped with a warning).
            def load(path: Path) -> dict[str, Any]:  # a damaged data position, too, skips to an older one
                try:
                    # Checked before the load: refused after it, the checkpoint's moments stayed in the optimizer
                    # where the older one the fallback loads holds none (saved before the first step).
                    _data_position(read_trainer_state(path).get("data_position"), path)
                    return load_training_state(path, self.model, self.optimizer, self.scheduler)
                except CheckpointError:
                    # A signal inside the load came back as a damaged file (DCP and the readers wrap what stops
                    # them): it stops the start, where the fallback went on and moved this checkpoint aside.
                    if self._setup_signals.raised is not None:
                        raise self._setup_signals.raised from None
                    raise

            state, loaded = load_newest(list_checkpoints(self.run_dir / CHECKPOINTS), load)
            self.step = int(state["step"])
            self._check_same_data(state.get("data"))
            self._note_changed_blend(state.get("data"))
            self._continue_data(state.get("data_position"), loaded)
            self._window = _saved_window(state.get("window"))
            self.guard.restore(state.get("guard"))  # a streak of skipped steps goes on across a resume
            if (self.run_dir / MODEL_DIR).is_dir():  # the export at the end replaces model/: refuse now, not then
                refuse_losing_checkpoint(self.run_dir / MODEL_DIR, {*self.tokenizer.files(), *self.tokenizer.beside()})
            if self.step > t.steps:
                raise DataError(
                    f"{self.run_dir}: the checkpoint is at step {self.step}, beyond train.steps = {t.steps}; "
                    f"nothing to train (raise it, e.g. --set train.steps={self.step + t.steps})"
                )
        self._checkpoint_due = False  # a periodic save deferred by a streak of non-finite steps
        self.peak_flops = measure_matmul_flops(self.device) if self.device.type == "cuda" else None
        if self.is_main:  # only now: a run that failed to start, or a refused resume, leaves the folder as it was
            if resume:
                set_aside_newer(self.run_dir, loaded)
            write_config(self.run_dir, run.to_toml())
        self.resumed = resume
        self._loop_ended = self._closed_unrun = False  # (see run_loop and close)
        self.metrics = Metrics(self.run_dir, t.steps, self.step, self.is_main, progress, resumed=resume)

    # -- set-up helpers -------------------------------------------------------------------------

    def _read_data(self) -> None:
        """Each source's tokens, its split (data.val_fraction and data.seed, the same for every source) and packed
        rows; the sampler over them; what a checkpoint records of the data (``data_identity``).

        One source: ``train_rows`` and ``val_rows`` are its :class:`PackedRows` (None: no validation split). A
        blend: ``train_sets`` and ``val_sets`` hold each source's, ``train_rows`` and ``val_rows`` number them as
        one (:class:`BlendedRows`, which the sampler's rows index), ``source_names`` label them in the metrics."""
        d, t = self.run.data, self.run.train
        blend = len(self.sources) > 1
        self.source_names = source_labels(self.sources)
        identities, self.train_sets, val_sets = [], [], []
        for i, source in enumerate(self.sources):
            key = f"data.source (source {i + 1})" if blend else "data.source"
            stream = load_corpus(source, self.tokenizer, d.jsonl_field, progress=False, key=key)
            # What a checkpoint records of the data, to recognise it at a resume: the whole corpus, before the split
            # (data.val_fraction and data.seed may change at a resume).
            identities.append(
                {
                    "source": source,
                    "tokens": stream.num_tokens,
                    "docs": stream.num_docs,
                    "fingerprint": stream.fingerprint(),
                }
            )
            named = f"data.source {source}" if blend else "the corpus"
            train_stream, val_stream = split(stream, d.val_fraction, d.seed, named)
            what, fix = named, ""
            if val_stream is not None:  # the split may have held out the long documents: say so
                what = f"the training split of {named}" if blend else "the training split"
                fix = ", lower data.val_fraction, or choose another data.seed"
            self.train_sets.append(PackedRows(train_stream, d.seq_len, what, fix))
            if val_stream is not None:  # documents held out by data.val_fraction, chosen by data.seed
                fix = ", raise data.val_fraction, or choose another data.seed"
                what = f"the validation split of {named}" if blend else "the validation split"
                val_sets.append(PackedRows(val_stream, d.seq_len, what, fix))
        tokenizer = tokenizer_fingerprint(self.tokenizer)
        self.val_sets = val_sets or None
        if not blend:  # the single corpus's record, as before blends: its checkpoints resume either way
            self.data_identity = {**identities[0], "tokenizer": tokenizer}
            self.train_rows, self.val_rows = self.train_sets[0], val_sets[0] if val_sets else None
        else:
            self.data_identity = {"sources": identities, "weights": d.weights, "tokenizer": tokenizer}
            self.train_rows = BlendedRows(self.train_sets)
            self.val_rows = BlendedRows(val_sets) if val_sets else None
        sizes = [p.num_rows for p in self.train_sets]
        self.sampler = Sampler(sizes[0] if not blend else sizes, t.batch_size, d.seed, self.dp_rank, self.dp, d.weights)
        #: (D,) each source's share of the training rows, and of the logged val_loss (the weighted mean)
        self.weights = self.sampler.blend.weights
        self.source_val_losses: dict[str, float] = {}  # (see evaluate)

    def _read_init(self) -> dict[str, torch.Tensor]:
        """The canonical tensors of ``train.init_from``, checked against their SHA-256 and this run's model (before
        the corpus is read: a folder that does not fit is refused at once, listing what differs)."""
        path = self.init_from
        own = self.run.set_model_fields()
        hint = (
            f"\n(the model is {path}'s config.json with the run's {', '.join(f'model.{k}' for k in own)} on top: "
            "only fields that change no tensor shape, and the pattern's brackets and '|', may differ)"
            if own
            else ""
        )
        try:
            tensors = read_tensors(path, verify=True)
            check_fit(tensors, meta_shapes(self.config), str(path), hint, wrong_shape=WRONG_SHAPE)
        except CheckpointError as e:
            raise CheckpointError(f"train.init_from: {e}") from None
        # As the float32 model will hold them (every step would be skipped): float8 has no isfinite, and a float64
        # value past float32's range becomes inf in the copy.
        if bad := [k for k, v in tensors.items() if not torch.isfinite(v.float()).all()]:
            more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            raise CheckpointError(
                f"train.init_from: {path}: not finite (inf or nan): {', '.join(bad[:MAX_LISTED])}{more}"
            )
        return tensors

    def _continue_data(self, saved: Any, checkpoint: Path) -> None:
        """Continue the row stream where the checkpoint's run left it: at the rows it consumed, whatever the
        batch size was; rows of another ``data.seq_len`` are counted in tokens (the rows are cut anew, so the
        order continues only approximately). Checkpoints from before the position was saved: the step's place."""
        if (position := _data_position(saved, checkpoint)) is None:
            return
        rows, seq_len = position
        now = self.run.data.seq_len
        if seq_len != now:
            rows = rows * seq_len // now  # row i starts at token i * seq_len
            logger.warning(
                "data.seq_len changed from %d to %d at the resume: the rows are cut anew, so the data order "
                "continues only approximately (after the same number of tokens)",
                seq_len,
                now,
            )
        self.sampler.resume_at(self.step, rows)

    def _check_batch_fits(self) -> None:
        """Refuse, naming ``train.batch_size``, a step whose rows alone outgrow this machine's memory: each
        process gathers its rows of a step on the host at once (``PackedRows.rows``: six int64 arrays of
        rows x (seq_len + 1)). Without this a batch of 10**23 rows grew a Python list of row indices until
        the kernel killed the process, after the data was read and the first evaluation ran."""
        have = _host_memory()
        need = 6 * 8 * self.local_batch * (self.run.data.seq_len + 1)
        total, shared = _on_this_host(need)  # every process gathers its rows at once, on this host
        if total > have:
            raise ConfigError(
                "train.batch_size",
                f"{self.run.train.batch_size:,} rows of data.seq_len {self.run.data.seq_len:,} tokens need "
                f"{need / 2**30:,.1f} GiB per process to gather a step ({self.local_batch:,} rows of int64 token "
                f"ids, labels and document ids){shared}, more than this machine's {have / 2**30:,.1f} GiB; make it "
                "smaller",
            )

    def _check_float8(self, meta: HybridLM) -> int:
        """``train.float8``'s needs, checked before a model is built: a device with float8 matmuls, torchao, and
        linear layers it can take (``meta``: the whole model on the meta device). Returns how many it converts."""
        recipe = self.run.train.float8
        if recipe == "none":
            return 0
        if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(self.device)
            raise ConfigError(
                "train.float8",
                f"float8 matmuls need a GPU of compute capability 8.9 or later (Ada, Hopper, Blackwell); "
                f"{torch.cuda.get_device_name(self.device)} is {major}.{minor}: set it to 'none'",
            )
        try:
            torchao_float8()  # its absence said now, not after the data and the model
        except ImportError as e:
            raise ConfigError("train.float8", str(e)) from None
        try:
            return len(require_float8_linears(meta, recipe, self.run.train.float8_auto_filter))
        except ValueError as e:
            raise ConfigError("train.float8", str(e)) from None

    def _check_model_fits(self) -> None:
        """Refuse, naming a field, a model whose training state alone outgrows this device (the allocator's
        own error came from deep inside torch, as "may be a bug"): 16 bytes a parameter (float32 weights and
        gradients, AdamW's two moments), split over the processes (FSDP shards, stages); CPU processes of one
        machine share its memory."""
        need = 16 * self.num_params / self.world
        total, shared = need, ""
        if self.device.type == "cuda":
            have = torch.cuda.get_device_properties(self.device).total_memory
        else:  # the CPU processes of this machine share its memory (each checked alone, together they ran out)
            have = _host_memory()
            total, shared = _on_this_host(need)
        if total <= have:
            return
        c = self.config
        embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2)
        raise ConfigError(
            "model.vocab_size" if embeddings > self.num_params / 2 else "model.hidden_size",
            f"the model's {self.num_params:,} parameters need {need / 2**30:,.1f} GiB per process to train (16 "
            f"bytes each: float32 weights and gradients, AdamW's two moments){shared}, more than the "
            f"{have / 2**30:,.1f} GiB of this {self.device.type} device; make the model smaller",
        )

    def _check_same_model(self) -> None:
        """Refuse a resume of another model than its newest checkpoint's before the corpus is read (minutes for a
        large one) and the model built; the load checks again. A trainer state that does not read is the load's
        to judge (it falls back to an older checkpoint)."""
        checkpoints = list_checkpoints(self.run_dir / CHECKPOINTS)
        if not checkpoints:
            return
        try:
            extra = read_trainer_state(checkpoints[-1])
        except CheckpointError:
            return
        check_same_model(checkpoints[-1], extra, self.config)
        self._check_same_trainable(checkpoints[-1], extra.get("trainable"))

    def _reaches_none(self) -> ConfigError:
        return ConfigError(
            "train.trainable",
            f"{self.run.train.trainable!r}: the loss reaches none of the parameters it trains (DSA's indexer, for "
            "one, learns only from its own loss: model.dsa_indexer_loss_coeff > 0)",
        )

    def _check_some_gradient(self) -> None:
        """After a pipeline step's backward: some trained parameter got a gradient on some rank (a stage runs its
        backward whether or not its own parameters train, so nothing else says that none did). Once a run."""
        got = any(p.grad is not None for p in self.model.parameters() if p.requires_grad)
        flag = torch.tensor([float(got)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            raise self._reaches_none()
        self._gradient_seen = True

    def _check_same_trainable(self, checkpoint: Path, saved: Any) -> None:
        """Refuse a resume that trains other parameters than the checkpoint's run (``train.trainable``): its optimizer
        state holds the moments of those it trained, and no others. A checkpoint from before the field trained all."""
        meta = HybridLM(self.config, device="meta")
        try:
            was = trainable_names(meta, self.config.parsed, saved)
        except (ConfigError, TypeError, AttributeError):  # (or a damaged record: not a pattern, not a list of them)
            was = {"(patterns that match none of this model's parameters)"}
        if was != self.trainable:
            raise ConfigError(
                "train.trainable",
                f"{self.run.train.trainable!r} trains other parameters than {checkpoint}'s run did ({saved!r}); its "
                "optimizer state is that of the parameters it trained: resume with its setting, or start the next "
                "stage from the run's model/ folder (train.init_from)",
            )

    def _note_changed_blend(self, saved: Any) -> None:
        """Warn where a resume blends other sources or weights than the checkpoint's run (a setting changed on
        purpose, as another corpus is): the stream goes on from the rows consumed, but each source's position in
        it is where the new blend places it, not where the run left that source."""
        if not isinstance(saved, dict):
            return
        now = self.data_identity
        was_sources = [s.get("source") for s in _identity_sources(saved)]
        now_sources = [s["source"] for s in _identity_sources(now)]
        if max(len(was_sources), len(now_sources)) == 1:  # one corpus, another one: said nowhere before blends
            return
        if was_sources == now_sources and _same_shares(saved.get("weights"), now.get("weights")):
            return
        logger.warning(
            "the blend changed at the resume (sources %s, weights %s; the checkpoint's run had %s, weights %s): "
            "each source's rows go on from where the new blend places them, not where the run left them",
            now_sources,
            now.get("weights"),
            was_sources,
            saved.get("weights"),
        )

    def _check_same_data(self, saved: Any) -> None:
        """Refuse a resume whose ``data.tokenizer`` now reads another tokenizer than the checkpoint's run trained with
        (a tokenizer.json replaced at its path: naming the corpus anew did not make the model know its ids), or whose
        ``data.source``, the same setting, now reads other data (a relative path read from another directory, or
        files changed since); a tokenizer or data named on purpose (``self.tokenizer_named``, ``self.data_named``:
        ``--set data.source=...``, or another source) is the user's call. What older checkpoints did not record is
        not compared."""
        now = self.data_identity
        if self.tokenizer_named or not isinstance(saved, dict):  # (another tokenizer: other ids, whatever the corpus)
            return
        if saved.get("tokenizer", now["tokenizer"]) != now["tokenizer"]:  # before the corpus: its ids differ with it
            tok = self.run.data
            raise DataError(
                f"{self.run_dir}: data.tokenizer {tok.tokenizer!r} (data.eos_token {tok.eos_token!r}) is not the "
                "tokenizer this run was trained with (its files differ from those the checkpoint recorded: replaced "
                "since?), and the model learned that one's token ids; resume with that tokenizer, or, to go on with "
                "this one, name it: --set data.tokenizer=PATH"
            )
        if self.data_named:
            return
        # Each source compared with the one of its name the checkpoint recorded (a blend's, or the single corpus's:
        # a run that grew into a blend keeps its corpus); a source it did not record is another corpus, on purpose.
        recorded = {s.get("source"): s for s in _identity_sources(saved)}
        for source in _identity_sources(now):
            was = recorded.get(source["source"])
            if was is None or all(was[k] == v for k, v in source.items() if k in was):
                continue
            self._refuse_changed_source(source, was)

    def _refuse_changed_source(self, now: dict[str, Any], saved: dict[str, Any]) -> None:
        """Refuse a resume whose source ``now["source"]`` holds other data than the checkpoint recorded (``saved``)."""
        was = [f"{v:,}" if isinstance(v, int) else repr(v) for v in (saved.get("tokens"), saved.get("docs"))]
        counts = (
            f"{now['tokens']:,} token{'s' * (now['tokens'] != 1)} in {now['docs']:,} document{'s' * (now['docs'] != 1)}"
        )
        if was == [f"{now['tokens']:,}", f"{now['docs']:,}"]:
            what = f"other token ids than the run was trained on (as many: {counts})"
        else:
            what = f"{counts}, but the run was trained on {was[0]} in {was[1]}"
        name = "PATH" if len(self.sources) == 1 else "'" + json.dumps(self.sources) + "'"
        raise DataError(
            f"{self.run_dir}: data.source {now['source']!r} now holds {what}: not the corpus this run started with "
            f"(edited since? a relative path is read from the current directory, {Path.cwd()}); resume from where "
            f"the run started, or, to go on with this data, name it: --set data.source={name}"
        )

    def _claim_run_dir(self, run_dir: str | Path | None, resume: bool) -> tuple[Path, list[Path]]:
        """The run folder (rank 0 chooses and claims it, see :func:`rundir.claim`) and the folders the claim
        created (on rank 0, which removes them if the start fails; none on the others)."""
        box: list[Any] = [None]
        created: list[Path] = []
        if self.is_main:
            path, created = claim(run_dir, self.run.train.run_dir, self.run.to_toml(), resume)
            box = [str(path)]
        if self.world > 1:  # every process must agree on the directory rank 0 chose
            dist.broadcast_object_list(box, src=0)
        return Path(box[0]), created

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # -- one step --------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the rows of ``self.step``; returns its metrics."""
        batch = self._to_device(self.train_rows.rows(self.sampler.local_rows(self.step)))
        counts, totals = self._label_counts(batch)
        lr = self.optimizer.param_groups[0]["lr"]
        total = torch.zeros((), device=self.device)
        heads = torch.zeros(totals.shape, device=self.device)  # the main head's loss, then each MTP depth's
        if self.pipeline is not None:
            total, heads = (torch.tensor(x) for x in self.pipeline.forward_backward(batch, counts / totals))
            if self.trainable is not None and not self._gradient_seen:
                self._check_some_gradient()
        else:
            for routed in self.step_counts:  # a step's micro-batches count from nothing
                routed.reset()
            for start in range(0, self.local_batch, self.micro):
                part = {k: v[start : start + self.micro] for k, v in batch.items()}
                if self.world > 1:  # reduce gradients once, after the last micro-batch
                    self.model.set_requires_gradient_sync(start + self.micro >= self.local_batch)
                if start == 0:  # once per optimizer step: accumulated micro-batches form one graph step
                    self._mark_graph_step()
                with self._autocast():
                    out = self.model(part["input_ids"], part["labels"], doc_ids=part["doc_ids"], return_logits=False)
                # Each head's mean loss times the micro-batch's share of that head's labels: the
                # accumulated loss and gradient are the whole batch's, whatever the split (MTP depths
                # have fewer labels than the main head, and fewer in rows with more document ends).
                # The auxiliary losses are each micro-batch's own, under the main head's share.
                shares = counts[start : start + self.micro].sum(0) / totals  # exactly 1 for the whole batch
                loss = combine_losses(out.lm_loss, out.mtp_losses, out.aux_loss, self.config.mtp_loss_scale, shares)
                if not loss.requires_grad:  # (only train.trainable freezes every parameter the loss reaches)
                    raise self._reaches_none()
                loss.backward()
                total += loss.detach()
                heads += torch.stack([out.lm_loss, *out.mtp_losses]).detach() * shares
        clip = self.run.optim.grad_clip or float("inf")
        if self.pipeline is not None:
            grad_norm = self.pipeline.clip_grad_norm(clip)
        elif self.world > 1:  # FSDP: shards, and the float32 parameters each rank holds whole (counted once)
            reduce_replicated_gradients(self.model)
            counted = (lambda p: True) if self.is_main else (lambda p: not replicated(p))
            grad_norm = clip_grad_norm(self.model.parameters(), clip, self.device, counted)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        loss, lm_loss, *mtp = self._all_reduce([total.item(), *heads.tolist()])
        # Before the optimizer step, whose expert-bias hook zeroes the counts (a skipped step's routing is logged too).
        self.moe_layer_load = self._expert_load() if self._moe_keys else {}
        # A non-finite loss or gradient skips the update (see train/guard.py); the schedule moves on.
        finite = self.guard.finite(loss, float(grad_norm))
        if finite:
            self.optimizer.step()  # its pre-step hook updates the expert biases
        else:
            self.expert_bias.reset()  # no step, no bias update: the skipped step's counts are dropped
        if finite:
            self.scheduler.step()
        else:  # not at every step: a change of the filters makes Python show again each warning it showed once
            with warnings.catch_warnings():
                # A skipped first step moves the schedule on on purpose (above): torch's warning of a scheduler
                # stepped before its optimizer would only say that again, as if it were a mistake.
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = {"loss": loss, "lm_loss": lm_loss, "grad_norm": float(grad_norm), "lr": lr}
        out.update({f"mtp_loss_{d}": x for d, x in enumerate(mtp, 1)})  # Megatron's "mtp_d loss" per depth
        if self._aux_losses:  # MoE balancing, DSA indexer: the total's part that is no head's (Megatron logs it)
            out["aux_loss"] = loss - lm_loss - (self.config.mtp_loss_scale * sum(mtp) / len(mtp) if mtp else 0.0)
        if self.moe_layer_load:  # the worst layer's: one number to watch (TensorBoard has each layer's)
            out["moe_load_imbalance"] = max(self.moe_layer_load.values())
        if not finite:
            out["nonfinite_skipped"] = self.guard.skipped + 1
        return out

    def _expert_load(self) -> dict[str, float]:
        """Each MoE layer's load imbalance in this step (the largest expert's routed tokens over the layer's mean,
        over all micro-batches and data-parallel ranks), keyed by its TensorBoard tag
        ``moe/load_imbalance/<layer key>`` (:func:`~hybridlm.train.expert_load.moe_layer_keys`), in canonical order.

        The counts were summed on the device (:class:`~hybridlm.train.expert_load.ExpertLoad`): one read here per
        step. A pipeline rank holds only its stages' layers: the others' are filled in by one all-reduce (MAX: the
        ratios are positive and the data-parallel replicas of a stage agree), so every rank logs the whole model's.
        """
        load = self.expert_bias.load
        own = load.imbalance()  # (own layers,) reduced over the data-parallel ranks
        if self.pp > 1:
            ratios = torch.zeros(len(self._moe_keys), dtype=torch.float64, device=self.device)
            ratios[[self._moe_keys.index(k) for k in load.keys]] = own.to(self.device)
            dist.all_reduce(ratios, op=dist.ReduceOp.MAX)
            keys, own = self._moe_keys, ratios
        else:
            keys = load.keys
        return {f"moe/load_imbalance/{k}": v for k, v in zip(keys, own.tolist())}

    def _label_counts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels per head (the main head, then each MTP depth): this rank's rows' (B, 1 + depths), and the
        whole step's (1 + depths,) over all data-parallel ranks (each row counted once; at least 1).

        A micro-batch's share of a head is its rows' labels over the step's. The step's counts are found
        once, as Hugging Face's ``num_items_in_batch`` is, but stay out of the model's forward: the model
        keeps returning plain means (what a library user gets), ``combine_losses`` weighs them, and the
        pipeline takes each row's share (its schedule cuts them into micro-batches with the rows). A head
        without labels in the whole step gets shares 0 (its loss, a mean over no labels, is 0 too: no NaN).
        """
        counts = label_counts(batch["labels"], self.config.parsed.mtp_depths, batch["doc_ids"])
        total = counts.sum(0)
        if self.world > 1:
            dist.all_reduce(total)
            total = total // self.pp  # the pp ranks of a pipeline replica hold the same rows
        return counts, total.clamp(min=1)

    def _mark_graph_step(self) -> None:
        """Under CUDA graphs, at the start of each optimizer step and before each evaluation forward.

        It tells cudagraph trees that the previous step's graph outputs are dead, so their buffers
        may be reused. Once per step, not per micro-batch: marking again between accumulated
        micro-batches overwrote buffers still in use ("accessing tensor output of CUDAGraphs that
        has been overwritten", seen on the H200).
        """
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss (nats per token) over a fixed set of validation rows; None without a validation
        split. A blend's is the mean of its sources' weighted by the training mix (``self.weights``), the loss
        expected of a training row; each source's, over a fixed set of its own validation rows, is kept in
        ``self.source_val_losses`` by its metrics key ``val_loss/<name>`` (``self.source_names``; empty for one
        source)."""
        self.source_val_losses = {}
        if self.val_sets is None:
            return None
        self.model.eval()
        size = self.local_batch if self.pipeline is not None else self.micro
        sums: list[float] = []  # (loss sum, labels) of each source
        try:
            for val in self.val_sets:
                rows = eval_rows(val.num_rows, self.run.train.eval_batches * self.local_batch * self.dp)
                loss_sum, count = 0.0, 0.0
                for part in self._eval_parts(val, rows, size):
                    if self.pipeline is not None:
                        s, n = self.pipeline.evaluate(self._to_device(part))
                    else:
                        part = self._to_device(part)
                        self._mark_graph_step()
                        with self._autocast():
                            s, n = loss_sums(self.model, part)[:, 0].tolist()  # the main head's
                    loss_sum, count = loss_sum + s, count + n
                sums += [loss_sum, count]
        finally:
            # Also when it raises (Ctrl-C in a notebook): a model left in eval mode trained on in it, and the
            # MoE routers' expert biases, counted in training mode only, never moved again.
            self.model.train()
        sums = self._all_reduce(sums)
        losses = [s / max(n, 1.0) for s, n in zip(sums[::2], sums[1::2])]
        if len(losses) == 1:
            return losses[0]
        self.source_val_losses = {f"val_loss/{name}": loss for name, loss in zip(self.source_names, losses)}
        return weighted_mean(losses, self.weights)

    def _eval_parts(self, val: PackedRows, rows: np.ndarray, size: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of the validation ``rows`` of ``val`` (every ``dp``-th), ``size`` rows at a time, as
        many parts as the rank with the most rows has: every forward is collective under FSDP and the pipeline, so
        ranks that ran different numbers hung. A pipeline's parts have ``size`` rows (stages have fixed shapes): a
        short or missing part is filled with unlabelled copies of a row, which add nothing to the loss."""
        mine = rows[self.dp_rank :: self.dp]
        most = -(-len(rows) // self.dp)
        for start in range(0, most, size):
            part = val.rows(mine[start : start + size] if start < len(mine) else rows[:0])
            fill = (size if self.pipeline is not None else 1) - len(part["labels"])
            if fill > 0:
                filler = val.rows(rows[:1])
                part = {k: torch.cat([v, filler[k].expand(fill, -1)]) for k, v in part.items()}
                part["labels"][-fill:] = -100
            yield part

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        if not weights_finite(self.model, self.device):  # never let a NaN checkpoint push a good one out
            last = latest_checkpoint(self.run_dir)
            then = (
                f"the last checkpoint is {last} (lower optim.lr, then resume)"
                if last
                else "there is no earlier checkpoint (lower optim.lr and start again)"
            )
            raise TrainingDivergedError(
                f"the weights are not finite at step {self.step}: no checkpoint written; {then}"
            )
        path = self.run_dir / CHECKPOINTS / checkpoint_dir_name(self.step)
        position = {"rows": self.sampler.position(self.step), "seq_len": self.run.data.seq_len}
        save_training_state(
            path,
            self.model,
            self.optimizer,
            self.scheduler,
            step=self.step,
            data=self.data_identity,
            data_position=position,
            window=self._window,
            guard=self.guard.state(),
            trainable=self.run.train.trainable,  # (a resume checks that it trains the same parameters)
        )
        self._saved_step, self._checkpoint_due = self.step, False
        if self.is_main and not self.guard.in_a_row:  # a save inside a streak (a signal, the last step) prunes none
            for p in list_checkpoints(self.run_dir / CHECKPOINTS)[: -self.run.train.keep_checkpoints]:
                remove_directory(p)
        return path

    def _checkpoint_before(self, step: int) -> Path | None:
        """The newest checkpoint of a step before ``step`` (named when a streak from ``step`` on stops the run)."""
        older = [p for p in list_checkpoints(self.run_dir / CHECKPOINTS) if step_of(p) < step]
        return older[-1] if older else None

    def _stop_for_signal(self, signals: StopSignals) -> None:
        """Between steps: on SIGINT/SIGTERM/SIGHUP, save the current step (unless just saved) and stop."""
        signum = signals.pending(self.device if self.world > 1 else None)
        if signum is None:
            return
        if getattr(self, "_saved_step", None) != self.step:
            self.save_checkpoint()
        raise TrainingInterrupted(
            signum,
            f"{signal_name(signum)} received: stopped at step {self.step} with a checkpoint in "
            f"{latest_checkpoint(self.run_dir)}; resume with: {self.resume_command()}"
            if self.is_main
            else "",  # one message per job, not one per process (every rank stops with the same status)
        )

    def resume_command(self) -> str:
        """The command that continues this run as it was launched (torchrun with the same processes), to paste
        into a shell: a folder with spaces or quotes in its name is quoted."""
        folder = shlex.quote(str(self.run_dir))
        if self.world == 1:
            return f"hybridlm train --resume {folder}"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        nodes = f"--nnodes {self.world // local} " if self.world > local else ""
        return f"torchrun {nodes}--nproc_per_node {local} -m hybridlm.cli train --resume {folder}"

    def export(self, path: Path | None = None) -> Path:
        """Write the weights (canonical safetensors) and the tokenizer (with the files beside its tokenizer.json: its
        chat template, its special tokens) to ``<run_dir>/model``."""
        path = path or self.run_dir / MODEL_DIR
        if self.pipeline is not None:
            tensors = self.pipeline.gather_canonical()  # on rank 0, one stage at a time
        else:
            tensors = {}
            for k, v in canonical_state_dict(self.model).items():
                full = full_cpu(v)  # a collective under FSDP; only rank 0 keeps the gathered tensors
                if self.is_main:
                    tensors[k] = full
        if self.is_main:
            # (the tokenizer's own files over those beside it: its spec is the model's)
            save_state_dict(
                tensors, self.config, path, extra_files={**self.tokenizer.beside(), **self.tokenizer.files()}
            )
        if self.world > 1:
            dist.barrier()
        return path

    # -- the loop ----------------------------------------------------------------------------------

    def describe(self) -> list[str]:
        r, t = self.run, self.run.train
        tokens_per_step = t.batch_size * r.data.seq_len
        dev = f"{self.device}" + (f" × {self.world} processes" if self.world > 1 else "")
        if self.pp > 1:
            dev += f" (dp {self.dp} × pp {self.pp}, {self.run.resolved_schedule()}, {len(self.pipeline.stages)} stage(s) per rank)"
        if self.device.type == "cpu":
            threads = torch.get_num_threads()
            dev += f" ({threads} thread{'s' * (threads != 1)})"
        train_tokens = sum(p.stream.num_tokens for p in self.train_sets)
        val = f"{sum(p.stream.num_tokens for p in self.val_sets):,}" if self.val_sets is not None else "no"
        what = self.sources[0] if len(self.sources) == 1 else f"a blend of {len(self.sources)} sources"
        return [
            f"run     {self.run_dir}",
            f"model   {self.config.pattern} · {self.num_params / 1e6:.2f}M parameters"
            + (f" ({self.num_active_params / 1e6:.2f}M active)" if self.num_active_params is not None else "")
            + (
                f" · {_count(self.num_trainable)} trained (train.trainable), a step {self.step_share:.0%} of a full "
                "one's FLOPs"
                if self.num_trainable is not None
                else ""
            )
            + f" · hidden {self.config.hidden_size} "
            f"· vocab {self.config.vocab_size}",
            f"data    {what} · {r.data.tokenizer} tokenizer · {train_tokens:,} train / "
            f"{val} validation tokens · rows of {r.data.seq_len}"
            + (" · assistant turns learned only" if any(p.stream.mask is not None for p in self.train_sets) else ""),
            *self._source_lines(),
            f"optim   AdamW lr {r.optim.lr:g} ({r.optim.schedule}, warmup {r.optim.warmup_steps}) · batch {t.batch_size} "
            f"× {r.data.seq_len} = {tokens_per_step:,} tokens/step · {t.steps} step{'s' * (t.steps != 1)}",
            f"device  {dev} · {'bf16 autocast' if self.autocast_dtype else 'fp32'}"
            + (f" · activation checkpointing ({t.ac_policy})" if t.activation_checkpointing else "")
            + (
                f" · float8 matmuls ({t.float8}, {self.float8_layers} linear layers"
                + (", small ones left out" if t.float8_auto_filter else "")
                + ")"
                + (" (emulated on the CPU: far slower, for tests)" if self.device.type == "cpu" else "")
                if self.float8_layers
                else ""
            )
            + (" · compiled blocks" if t.compile else "")
            + (f" ({self.compile_mode})" if t.compile and self.compile_mode != "default" else "")
            + (f" · PYTORCH_CUDA_ALLOC_CONF={self.cuda_alloc_conf}" if self.device.type == "cuda" else ""),
            *self._init_lines(),
        ] + [f"note    {n}" for n in r.notes() + self._batch_notes() + self._split_notes() + self._trainable_notes()]

    def _source_lines(self) -> list[str]:
        """A blend's sources, one line each: its name in the metrics, weight, training rows, and how many epochs of
        it the run's steps use (a small source repeats sooner: each has its own epochs)."""
        if len(self.sources) == 1:
            return []
        epochs = self.sampler.epochs(self.sampler.position(self.run.train.steps))
        return [
            f"source  {name} · weight {w:.3g} · {rows.num_rows:,} train rows · {e:.3g} epochs in the run · {source}"
            for name, w, rows, e, source in zip(self.source_names, self.weights, self.train_sets, epochs, self.sources)
        ]

    def _init_lines(self) -> list[str]:
        """Where a fine-tuning run's weights come from (``train.init_from``; a fresh run only), and a note where the
        folder holds a tokenizer the run does not use: the byte tokenizer's ids mean other tokens to the model."""
        if self.init_from is None:
            return []
        lines = [f"init    weights from {self.init_from} (train.init_from)"]
        inside = self.init_from / "tokenizer.json"
        if self.run.data.tokenizer == "byte" and inside.is_file():
            lines.append(
                f"note    {self.init_from} holds a tokenizer.json, but data.tokenizer is 'byte': the checkpoint "
                f"learned its own tokens; train with them: --set data.tokenizer={inside}"
            )
        return lines

    def _batch_notes(self) -> list[str]:
        """What the run's processes change in a valid setting: a micro-batch larger than a process's rows
        (a per-micro-batch mean, the MoE balancing loss's, then averages over fewer rows than set)."""
        t = self.run.train
        if t.micro_batch_size is None or t.micro_batch_size <= self.micro:
            return []
        return [
            f"train.micro_batch_size {t.micro_batch_size} is more than the {self.local_batch} rows each of the "
            f"{self.dp} data-parallel processes takes per step (train.batch_size {t.batch_size}): each forward takes "
            f"{self.micro}"
        ]

    def _trainable_notes(self) -> list[str]:
        """A setting that train.trainable leaves without effect: the DSA indexer loss's coefficient where every indexer
        is frozen (a frozen indexer computes no loss: ``layers.dsa.DSA.indexer_trains``; it would train nothing)."""
        c = self.config
        if self.trainable is None or "D" not in c.symbols or c.dsa_indexer_loss_coeff == 0:
            return []
        if any(".indexer." in name for name in self.trainable):
            return []
        return [
            "model.dsa_indexer_loss_coeff has no effect: train.trainable freezes every DSA indexer, and a frozen "
            "indexer's loss is not computed (it would train nothing)"
        ]

    def _split_notes(self) -> list[str]:
        """A validation split far larger than ``data.val_fraction`` asked: it holds out whole documents, at least one,
        so a corpus of a few documents (or one long one drawn) lost far more of its tokens to it than asked (a third, of
        3 documents at 0.05), which only the header's token counts showed."""
        if self.val_sets is None:
            return []
        notes, asked = [], self.run.data.val_fraction
        for source, train_rows, val_rows in zip(self.sources, self.train_sets, self.val_sets):
            val, train = val_rows.stream, train_rows.stream
            share = val.num_tokens / (val.num_tokens + train.num_tokens)
            if share < max(2 * asked, asked + 0.1):
                continue
            of = f" of data.source {source}" if len(self.sources) > 1 else ""
            notes.append(
                f"data.val_fraction {asked:g} held out {val.num_docs:,} of {val.num_docs + train.num_docs:,} "
                f"documents{of}, {share:.0%} of the tokens (the split takes whole documents, at least one): more, "
                "shorter documents split closer to it; another data.seed draws others"
            )
        return notes

    def _peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 1e9  # GB, as on CUDA

    def close(self, destroy: bool = True) -> None:
        """Leave torch.distributed after a finished run: wait for every rank, then (``destroy``)
        destroy the process group. The CLI passes ``destroy=False`` and then leaves the process
        with ``os._exit`` (see ``hybridlm.cli.entry``): gloo's teardown at interpreter exit could
        abort a rank after a successful run (SIGABRT, seen in CI with and without the destroy).

        A trainer whose :meth:`run_loop` never ran is ended here as that loop's end would: only the loop
        freed them, so a trainer built and dropped (a notebook cell run again, a harness looking at
        ``describe()``) kept its TensorBoard writer thread, metrics.jsonl and its folder's lock for the
        life of the process, and no other process could take the folder."""
        if not self._loop_ended:
            self._loop_ended = self._closed_unrun = True
            try:
                self.metrics.close()
            finally:
                if self.is_main:
                    unlock(self.run_dir)
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            if destroy:
                dist.destroy_process_group()

    def run_loop(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` (or stop after step ``until``, saving its checkpoint; an ``until`` at or
        before the current step trains and saves nothing). Returns a summary.

        Once per trainer: its end (at ``until``, on a signal, or on an error) closes the metrics and frees the
        folder; to train on, build ``Trainer(run, run_dir, resume=True)``, which continues from the checkpoint."""
        t = self.run.train
        if self._closed_unrun:  # (nothing was trained: a resume would find no checkpoint)
            raise RuntimeError(
                f"{self.run_dir}: this trainer was closed before its run_loop ran; build a new one: "
                f"Trainer(run, run_dir={str(self.run_dir)!r})"
            )
        if self._loop_ended:  # a second call wrote to the closed metrics.jsonl ("I/O operation on closed file")
            raise RuntimeError(
                f"{self.run_dir}: this trainer's run_loop already ended, at step {self.step}; to train on, build a "
                f"new one: Trainer(run, run_dir={str(self.run_dir)!r}, resume=True) continues from the newest "
                "checkpoint"
            )
        self._loop_ended = True
        stop = min(until, t.steps) if until is not None else t.steps
        self._stepping = False  # (inside train_step: what a signal's notice says)
        # The folder is unlocked under the signal handling too: a signal after the last step changes nothing.
        with cpu_threads(t.threads), StopSignals(self._signal_notice) as signals:
            failed = True  # (until the summary is made)
            try:
                for line in self.describe():  # (inside: it shows the run's threads)
                    self.metrics.print(line)
                if self.step and self.step >= t.steps:  # a resume of a finished run: say so, not just "model saved"
                    self.metrics.print(
                        f"the run is complete at step {self.step} (train.steps = {t.steps}): nothing to train, the "
                        f"model is exported again; to train on, raise it (--set train.steps={2 * t.steps})"
                    )
                if self.device.type == "cuda":  # the run's own peak: not that of earlier work in this process
                    torch.cuda.reset_peak_memory_stats(self.device)
                summary = self._loop(stop, time.time(), signals)
                if "model" not in summary:  # stopped early (``until``): a signal since the last step, say so
                    self._stop_for_signal(signals)
                elif (signum := signals.pending(self.device if self.world > 1 else None)) is not None:
                    # During the last save or the export: both finished, so the run is complete.
                    self.metrics.print(f"{signal_name(signum)} received after the last step: the run is complete")
                failed = False
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise self._disk_full(e) from e
            finally:
                try:  # however the run ends (an error too: out of memory, a full disk): in a long-lived process a
                    # left metrics.jsonl, TensorBoard writer thread (its last points unwritten) and bar piled up
                    self.metrics.close()
                except Exception:
                    # The error that ended the run says what happened: a full disk fails the close's flush of the
                    # same row again, whose bare OSError replaced the DiskFullError naming what the run kept.
                    if not failed:
                        raise
                finally:
                    if self.is_main:  # the folder is free for the next run (or the resume)
                        unlock(self.run_dir)
        return summary

    def _signal_notice(self, signum: int, first: bool) -> None:
        """Say at once what a stop signal does (run from its handler: see :class:`StopSignals`); the first
        process only. Nothing was said until the step and the save were done, minutes on a large model, so
        users pressed Ctrl-C again, heard nothing again, and killed the run without its checkpoint."""
        if not self.is_main:
            return
        step = self.step + 1 if self._stepping else self.step
        if step >= self.run.train.steps:
            doing, until = (
                "finishing the run (its last checkpoint, then the model's export), then exiting",
                "the run is finished",
            )
        elif self._stepping:
            doing, until = f"finishing step {step} and saving its checkpoint, then exiting", f"step {step} is saved"
        elif getattr(self, "_saved_step", None) == step:
            doing, until = f"stopping at step {step}, whose checkpoint is saved", f"the run stops at step {step}"
        else:
            doing, until = f"saving a checkpoint of step {step}, then exiting", f"step {step} is saved"
        if first:
            line = f"{signal_name(signum)} received: {doing} (further signals are ignored until then)"
        else:  # another Ctrl-C: still heard, and the way out named
            line = (
                f"{signal_name(signum)} received: ignored until {until} (kill -9 {os.getpid()} ends the process at "
                "once, losing what is not saved)"
            )
        self.metrics.notice(line)

    def _disk_full(self, e: OSError) -> DiskFullError:
        """``e`` (no space left, or a quota reached) with what the run kept and how to go on: the checkpoints
        written before it are whole (a failed save leaves none of its own), so the run resumes from the newest."""
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        where = f" ({e.filename})" if e.filename else ""
        last = latest_checkpoint(self.run_dir)
        if last is not None:
            then = f"the last checkpoint is {last}; free some space, then resume with: {self.resume_command()}"
        else:
            config = shlex.quote(str(self.run_dir / CONFIG_FILE))
            then = f"no checkpoint was written; free some space, then start again with --config {config} and "
            then += "another --run-dir"
        return DiskFullError(e.errno, e.filename, f"{what}{where} at step {self.step}: training stopped; {then}")

    def _loop(self, stop: int, start_time: float, signals: StopSignals) -> dict[str, Any]:
        t = self.run.train
        window = self._window  # since the last console row; saved with each checkpoint
        with ManualGC(t.gc_every) as collector:
            try:
                # Inside the signal handling: a signal during the first evaluation saves step 0, so the
                # folder can be resumed (else it held a run that could be neither resumed nor replaced).
                # A resume at step 0 comes after that evaluation, which metrics.jsonl holds: not again.
                first_val = last_val = self.evaluate() if self.step == 0 and not self.resumed else None
                if first_val is not None:  # (and a blend's sources')
                    self.metrics.record(self.step, {"val_loss": first_val, **self.source_val_losses}, console=False)
                    self.metrics.print(f"validation loss at step 0: {first_val:.4f}")
                while self.step < stop:
                    self._stop_for_signal(signals)
                    t0 = time.perf_counter()
                    self._stepping = True
                    values = self.train_step()
                    self._stepping = False
                    collector.after_step(self.step)  # inside the timed window: its pause is training time
                    window["time"] += time.perf_counter() - t0  # training time only: evaluation is not counted
                    self.metrics.advance()
                    window["tokens"] += t.batch_size * self.run.data.seq_len
                    # The row's mean is of the finite losses: a skipped step's NaN loss made it NaN.
                    if math.isfinite(values["loss"]) and math.isfinite(values["lm_loss"]):
                        window["losses"].append([values["loss"], values["lm_loss"]])
                    record = {**values}
                    evaluate = self.step % t.eval_every == 0 or self.step == t.steps
                    console = self.step % t.log_every == 0 or self.step == stop or evaluate
                    if console:
                        if losses := window["losses"]:  # (none where every step since the last row was skipped)
                            record["loss_avg"] = sum(x for x, _ in losses) / len(losses)
                            record["lm_loss_avg"] = sum(x for _, x in losses) / len(losses)
                        record["tokens_per_s"] = window["tokens"] / window["time"]
                        record["peak_mem_gb"] = self._peak_memory_gb()
                        if self.peak_flops:
                            per_device = record["tokens_per_s"] / self.world * self.flops_per_token
                            record["mfu"] = per_device / self.peak_flops
                        window.update(_fresh_window())
                    if evaluate:
                        last_val = self.evaluate()
                        if last_val is not None:  # (and a blend's sources')
                            record.update({"val_loss": last_val, **self.source_val_losses})
                    self.metrics.record(self.step, record, console=console, tensorboard=self.moe_layer_load)
                    if "nonfinite_skipped" in values:  # else silent on the console between two rows
                        self.metrics.print(
                            f"step {self.step}: the loss or gradient is not finite (loss {values['loss']:.4g}, gnorm "
                            f"{values['grad_norm']:.4g}); the step is skipped ({values['nonfinite_skipped']} so far; "
                            f"the run stops after {t.max_nonfinite_steps} in a row)"
                        )
                    self.guard.record(self.step, "nonfinite_skipped" not in values, self._checkpoint_before)
                    self._checkpoint_due |= self.step % t.checkpoint_every == 0
                    # Inside a streak of skipped steps the weights may be what caused it (a finite step
                    # that made them blow up): the periodic save waits for a finite step.
                    if (self._checkpoint_due and not self.guard.in_a_row) or self.step == stop:
                        self.save_checkpoint()
            except KeyboardInterrupt:
                self.metrics.print(f"interrupted at step {self.step}: saving a checkpoint to resume from")
                self.save_checkpoint()
                raise
        summary: dict[str, Any] = {
            "step": self.step,
            "seconds": time.time() - start_time,
            "run_dir": str(self.run_dir),
            "first_val_loss": first_val,
            "val_loss": last_val,
        }
        if self.step >= t.steps:
            if self.guard.in_a_row and self.is_main:
                # Fewer than train.max_nonfinite_steps in a row do not stop a run, but a run that ends inside
                # the streak exports the weights of its last finite step (or its initial ones) as trained.
                logger.warning(
                    "the last %d step(s) (to step %d) were not finite and were skipped: the exported model is "
                    "that of step %d; lower optim.lr or model.init_std, or set optim.grad_clip",
                    self.guard.in_a_row,
                    self.step,
                    self.step - self.guard.in_a_row,
                )
            summary["model"] = str(self.export())
            if self.is_main:
                unit = loss_unit(self.run.data.tokenizer)
                png = plot_losses(self.metrics.history_all(self.step), self.run_dir / "loss.png", unit)
                summary["loss_curve"] = str(png) if png else None
        return summary
