"""The run configuration of ``hybridlm train``: dataclasses, TOML files and ``--set a.b=c`` overrides.

A run file has five tables::

    [model]   # a preset name and/or ModelConfig fields; vocab_size defaults to the tokenizer's,
    preset = "tiny"   # or else the preset's (tiny's 256: the byte tokenizer needs 257)
    vocab_size = 257
    hidden_size = 128
    [data]    # corpus, tokenizer, sequence length, validation split
    [optim]   # AdamW, schedule, clipping
    [train]   # steps, batch, devices, logging, checkpoints, init_from (fine-tuning)
    [parallel]  # pipeline ranks, schedule, micro-batches (data parallel = world size / pp)

Every error names the dotted field (``optim.lr: must be positive``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from ..config import (
    ModelConfig,
    check_field_names,
    is_finite,
    is_special_file,
    refuse_unknown_keywords,
    unused_fields,
)
from ..errors import CheckpointError, ConfigError, UnknownFieldError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Largest integer setting (steps, rows, tokens, seeds): torch and numpy count in 64 bits, and numpy's generators
#: take non-negative seeds.
MAX_INT = 2**63 - 1
#: Largest ``train.threads``: far above any CPU's cores; starting 100,000 threads crashed the process.
MAX_THREADS = 4096

#: The embedded default model: a small hybrid with two fused attention+MLP blocks that learns
#: English bytes on a laptop CPU in a few minutes.
DEFAULT_MODEL: dict[str, Any] = {
    "pattern": "M-[*-]M-M-[*-]",
    "hidden_size": 192,
    "num_attention_heads": 6,
    "ffn_hidden_size": 512,
    "position_embedding": "rope",
    "mamba_head_dim": 32,
    "mamba_state_dim": 32,
    "mamba_num_groups": 2,
    "mamba_chunk_size": 64,
}

#: A model field's ``None`` in a run file, which TOML cannot write: ``q_lora_rank = "none"`` is MLA's full-rank
#: query (the default is 512, so leaving the field out cannot ask for it). config.toml writes ``None`` so too.
NONE_WORD = "none"
_NULLABLE_MODEL_FIELDS = frozenset(
    name
    for name, hint in get_type_hints(ModelConfig).items()
    if {type(None), str} & set(get_args(hint)) == {type(None)}
)
_MODEL_FIELDS = frozenset(f.name for f in fields(ModelConfig))


@refuse_unknown_keywords(lambda unknown: _unknown_fields("data", unknown))
@dataclass
class DataConfig:
    #: builtin:pydoc, a .txt/.jsonl/.parquet file (.jsonl.gz, .zst, ... too) or folder, or a `hybridlm prepare`
    #: folder; or a list of them, a blend
    source: str | list[str] = "builtin:pydoc"
    #: a blend's share of each source (positive, normalised to sum 1; None: each source's training rows)
    weights: list[float] | None = None
    tokenizer: str = "byte"  #: "byte" or a Hugging Face tokenizer.json
    seq_len: int = 256  #: tokens per packed row
    val_fraction: float = 0.05  #: share of documents held out for validation
    jsonl_field: str = "text"  #: the text field of .jsonl records
    eos_token: str = "auto"  #: a tokenizer.json's end-of-document token ("auto": the first usual name it holds)
    seed: int = 0  #: data order and validation split

    def sources(self) -> list[str]:
        """``source`` as a list: one source, or a blend's."""
        return [self.source] if isinstance(self.source, str) else list(self.source)


@refuse_unknown_keywords(lambda unknown: _unknown_fields("optim", unknown))
@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  #: the floor the decay ends at, / lr (cosine: after the last step; WSD: at it)
    schedule: str = "cosine"  #: "cosine", "wsd" (warmup-stable-decay) or "constant" (after warmup)
    warmup_steps: int = 30
    decay_fraction: float = 0.2  #: WSD: share of the steps spent decaying
    weight_decay: float = 0.1  #: not applied to norms, biases, A_log, D and dt_bias (but see the next field)
    #: decay the q/k norm weights too, as Megatron-LM's apply_wd_to_qk_layernorm (Qwen3-Next's recipe, with
    #: model.norm_zero_centered): attention's q_norm / k_norm and DSA's q_a_layernorm (train.optim.QK_NORMS)
    apply_wd_to_qk_layernorm: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  #: max global gradient norm (0 = no clipping)
    moe_expert_bias_rate: float = 1e-3  #: step of the aux-loss-free expert-bias update


#: ``train.compile_mode`` values: "auto" and the torch.compile modes the trainer has run. Those in
#: CUDA_GRAPH_MODES record CUDA graphs, so the trainer marks where each step begins
#: (``cudagraph_mark_step_begin``). "auto" is "reduce-overhead" where CUDA graphs can run (one
#: CUDA process) and "default" elsewhere: on an H200 CUDA graphs were as fast at every shape where
#: the GPU is the bottleneck and faster wherever the host is, with the same losses (docs/training.md).
#: Not offered: the max-autotune modes, whose code for a second batch shape (evaluation after
#: training) failed on CPU in torch 2.13 ("Expected size for first two dimensions of batch2
#: tensor": a bmm with the first shape's batch size baked in).
COMPILE_MODES = ("auto", "default", "reduce-overhead")
CUDA_GRAPH_MODES = ("reduce-overhead",)


@refuse_unknown_keywords(lambda unknown: _unknown_fields("train", unknown))
@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  #: sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  #: sequences per forward; batch_size / this = accumulation steps
    seed: int = 0
    device: str = "auto"  #: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"
    precision: str = "auto"  #: "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32" or "bf16"
    activation_checkpointing: bool = False  #: recompute each block (a fused block is one unit)
    #: with activation_checkpointing: "full", "selective" (keep matmul/attention outputs, recompute
    #: norms, conv, scans) or per block kind, e.g. "M=selective,*=full,-=none"
    ac_policy: str = "full"
    compile: bool = False  #: torch.compile each block
    #: with compile: torch.compile's mode; "reduce-overhead" replays each block as CUDA graphs
    #: (one CUDA process, so no pipeline stages), which pays where the host cannot keep the GPU
    #: busy; "auto": "reduce-overhead" where it can run, else "default"
    compile_mode: str = "auto"
    #: "none", or float8 matmuls in the blocks' linear layers with torchao (needs torchao and, to be
    #: fast, a GPU with float8 tensor cores, compute capability 8.9+): "tensorwise" (one scale per
    #: tensor; the fast one) or "rowwise" (one per row). MoE experts, embedding and head stay as they are.
    float8: str = "none"
    #: with float8: leave in the run's precision the linear layers too small to gain from the recipe's float8
    #: matmuls (torchao's H100 thresholds, as torchtitan's auto_filter_small_kn)
    float8_auto_filter: bool = False
    threads: int | None = None  #: CPU threads for torch (None = torch's default)
    #: 0: Python's automatic garbage collection; N > 0: automatic collection off and a full
    #: collection after every N-th step, so its pauses land at known steps (Megatron's --manual-gc)
    gc_every: int = 0
    log_every: int = 20
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10  #: stop after this many skipped (inf/nan loss or gradient) steps in a row
    run_dir: str = "runs/{time}"  #: {time} becomes the start time
    #: a hybridlm model folder (hybridlm.save, a run's model/, hybridlm convert --from) to start from: its
    #: config.json is the model, under the [model] fields the run sets; its weights replace the initialization
    init_from: str | None = None
    #: the parameters that train: glob patterns (``*`` any text, dots too) over their canonical names (``layers.{i}.…``,
    #: ``embeddings.weight``: ``hybridlm inspect DIR --names`` lists them), e.g. "*.indexer.*" for DSA's
    #: indexer alone (DeepSeek-V3.2's dense warm-up); the others are frozen (no gradient, no optimizer state). None:
    #: every parameter. MoE expert biases are no parameters: they follow the routing unless
    #: optim.moe_expert_bias_rate = 0.
    trainable: str | list[str] | None = None


#: ``parallel.schedule`` names: torch.distributed.pipelining schedules that run stages cut by ``|``.
#: The first two run one stage per rank; the others run several (virtual stages, Megatron's order).
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")
MULTI_STAGE_SCHEDULES = ("interleaved-1f1b", "looped-bfs")


@refuse_unknown_keywords(lambda unknown: _unknown_fields("parallel", unknown))
@dataclass
class ParallelConfig:
    pp: int = 1  #: pipeline ranks; the data-parallel size is world size / pp
    schedule: str | None = None  #: gpipe, 1f1b, interleaved-1f1b, looped-bfs (default: 1f1b; interleaved if virtual)
    microbatches: int | None = None  #: micro-batches per optimizer step and rank (default 2 * pp)

    def resolved_microbatches(self) -> int:
        return self.microbatches if self.microbatches is not None else 2 * self.pp


@refuse_unknown_keywords(lambda unknown: _unknown(next(iter(unknown)), list(SECTIONS), "section"))
@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    # -- reading ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        unknown = set(d) - set(SECTIONS)
        for key in unknown:
            _unknown(key, list(SECTIONS), "section")
        run = cls()
        if "model" in d:
            if not isinstance(d["model"], dict):
                raise ConfigError("model", "must be a table")
            run.model = dict(d["model"])
        for section in SECTIONS[1:]:
            if section in d:
                if not isinstance(d[section], dict):
                    raise ConfigError(section, "must be a table")
                setattr(run, section, _build(type(getattr(run, section)), d[section], section))
        run.validate()
        return run

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        if is_special_file(path):
            raise ConfigError("config", f"{path}: not a regular file")
        try:
            d = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark is no TOML
        except OSError as e:
            raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError("config", f"{path}: not UTF-8 text (byte {e.start})") from None
        except RecursionError:
            raise ConfigError("config", f"{path}: nested too deeply") from None
        except ValueError as e:  # an integer of over 4,300 digits
            raise ConfigError("config", f"{path}: {e}") from None
        return cls.from_dict(d)

    def with_overrides(self, assignments: list[str]) -> RunConfig:
        """Apply ``a.b=c`` assignments (values parsed as TOML, else taken as strings).

        ``model.preset=NAME`` replaces the whole model table with the preset (applied first, so
        other ``model.*`` assignments change the preset's fields)."""
        d = self.to_dict()
        presets = [a for a in assignments if override_key(a) == "model.preset"]
        if presets:
            d["model"] = {}
            assignments = presets[-1:] + [a for a in assignments if a not in presets]
        for item in assignments:
            if "=" not in item:
                raise ConfigError(item, "an override must look like section.field=value")
            key, raw = item.split("=", 1)
            parts = override_key(item).split(".")
            if len(parts) != 2 or not all(parts):  # (".=3", "train.=3": no section or no field named)
                raise ConfigError(key, "an override names a section and a field, e.g. train.steps=100")
            section, name = parts
            if section not in d:
                _unknown(section, list(d), "section")
            value = _parse_value(raw.strip(), f"{section}.{name}")
            # A text field keeps its text where TOML reads another type: run_dir=20240601, source=1.5.
            d[section][name] = (
                raw.strip() if not isinstance(value, (str, list)) and _holds_text(section, name) else value
            )
        init = d["train"].get("init_from")
        # (A blank init_from is refused by name in validate: emptied here, the table named model.pattern instead.)
        if self.model == DEFAULT_MODEL and isinstance(init, str) and init.strip() and not presets:
            # Over an init folder the embedded default's table is no one's: only the model fields assigned here
            # are the user's (a --set at one of the default's values, mamba_chunk_size=64, was dropped unseen).
            assigned = {override_key(a).split(".", 1)[1] for a in assignments if override_key(a).startswith("model.")}
            d["model"] = {k: v for k, v in d["model"].items() if k in assigned}
        return RunConfig.from_dict(d)

    # -- writing ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "data": dataclasses.asdict(self.data),
            "optim": dataclasses.asdict(self.optim),
            "train": dataclasses.asdict(self.train),
            "parallel": dataclasses.asdict(self.parallel),
        }

    def to_toml(self) -> str:
        """The run file: one table per section, fields in declaration order; ``None`` fields left out."""
        tables = {
            section: {k: v for k, v in values.items() if v is not None} for section, values in self.to_dict().items()
        }
        # Left out, the other sections' None fields read back as None (their default); a model field set to None
        # must stay None at a resume: left out, it would read as its default (q_lora_rank 512).
        # With train.init_from, the whole model (the folder's config under the run's fields): a resume needs no folder.
        tables["model"] = {
            k: NONE_WORD if v is None else v
            for k, v in self.model_table().items()
            if v is not None or k in _NULLABLE_MODEL_FIELDS
        }
        return tomli_w.dumps(tables)

    # -- checking -----------------------------------------------------------------------------

    def set_model_fields(self) -> dict[str, Any]:
        """The [model] fields the user set: not the embedded default's (nor a preset's name); none in a table naming
        every field under ``train.init_from`` (the config.toml of a run that started from it: the folder's own)."""
        if self.train.init_from is not None and set(self.model) >= _MODEL_FIELDS:
            return {}
        # Over a folder, the default's values are no one's only in a table built on it (a run file without [model]):
        # a run file's own table set them (its mamba_chunk_size = 64 was dropped, the folder's 128 trained).
        own = self.train.init_from is not None and not set(DEFAULT_MODEL) <= set(self.model)
        return {k: v for k, v in self.model.items() if k != "preset" and (own or (k, v) not in DEFAULT_MODEL.items())}

    def model_table(self) -> dict[str, Any]:
        """The [model] table this run trains: with ``train.init_from``, the folder's config.json with the fields the
        run sets on top (the embedded default's are not the user's: they do not override it). A table that names
        every field (what :meth:`to_toml` writes for such a run) is the model itself: a resume does not read the
        folder again, which may be gone."""
        init = self.train.init_from
        if init is None or not init.strip():  # (blank: refused by name in validate)
            return dict(self.model)
        if "preset" in self.model:
            raise ConfigError(
                "model.preset",
                "cannot be combined with train.init_from: the model is the init folder's config.json (set "
                "model fields over it, or leave train.init_from out to start a preset from scratch)",
            )
        if set(self.model) >= _MODEL_FIELDS:
            return dict(self.model)
        base = read_init_config(init).to_dict()
        base.pop("schema_version")
        own = self.set_model_fields()
        _check_norm_convention(base["norm_zero_centered"], own.get("norm_zero_centered"), init)
        return {**base, **own}

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig of this run (``vocab_size`` fills the field when the run leaves it out)."""
        values = {
            k: None if k in _NULLABLE_MODEL_FIELDS and _is_none_word(v) else v for k, v in self.model_table().items()
        }
        preset = values.pop("preset", None)
        if preset is None:  # a preset's own vocabulary is kept (the trainer checks it is large enough)
            values.setdefault("vocab_size", vocab_size if vocab_size is not None else 257)
        try:
            check_field_names(values)
            if preset is not None:
                return ModelConfig.preset(preset, **values)
            for name in ("pattern", "hidden_size"):
                if name not in values:
                    raise ConfigError(name, "required (or give a preset)")
            return ModelConfig(**values)
        except ConfigError as e:
            said = str(e)[len(e.field) + 2 :]
            if isinstance(raw := values.get(e.field), str) and said.startswith("expected "):  # a type error
                hint = get_type_hints(ModelConfig).get(e.field)
                said += _toml_spelling(raw, get_args(hint) or (hint,))  # (the other sections' hint: _check_type)
            raise ConfigError(f"model.{e.field}", said) from None

    def validate(self) -> None:
        self.model_config()
        d, o, t = self.data, self.optim, self.train
        for section in ("data", "optim", "train", "parallel"):  # paths, names: "" would mean the current folder
            for f in fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if isinstance(value, str) and not value.strip():
                    # (A field that may be None is unset by the word: left out, a resume keeps config.toml's value.)
                    nullable = type(None) in get_args(get_type_hints(type(getattr(self, section)))[f.name])
                    unset = f"write {NONE_WORD!r} to unset it" if nullable else "leave it out for its default"
                    raise ConfigError(f"{section}.{f.name}", f"must not be empty ({unset})")
        _validate_blend(d)
        for name, seed in (("data.seed", d.seed), ("train.seed", t.seed)):
            if not 0 <= seed <= MAX_INT:
                raise ConfigError(name, f"must be in [0, 2**63 - 1], got {seed}")
        _positive("data.seq_len", d.seq_len)
        if not 0.0 <= d.val_fraction < 1.0:
            raise ConfigError("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
        _positive("optim.lr", o.lr)
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
        if o.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError("optim.schedule", f"must be 'cosine', 'wsd' or 'constant', got {o.schedule!r}")
        for name in ("warmup_steps",):
            if getattr(o, name) < 0:
                raise ConfigError(f"optim.{name}", f"must be >= 0, got {getattr(o, name)}")
        if not 0.0 < o.decay_fraction <= 1.0:
            raise ConfigError("optim.decay_fraction", f"must be in (0, 1], got {o.decay_fraction}")
        _positive("optim.eps", o.eps)  # 0 divides 0 by 0 for a parameter with no gradient yet
        for name in ("weight_decay", "grad_clip", "moe_expert_bias_rate"):
            if getattr(o, name) < 0:
                raise ConfigError(f"optim.{name}", f"must be >= 0, got {getattr(o, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(o, name) < 1.0:
                raise ConfigError(f"optim.{name}", f"must be in [0, 1), got {getattr(o, name)}")
        for name in (
            "steps",
            "batch_size",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "max_nonfinite_steps",
        ):
            _positive(f"train.{name}", getattr(t, name))
        if t.micro_batch_size is not None:
            _positive("train.micro_batch_size", t.micro_batch_size)
            if t.batch_size % t.micro_batch_size:
                raise ConfigError(
                    "train.micro_batch_size", f"{t.micro_batch_size} must divide train.batch_size ({t.batch_size})"
                )
        from ..ops.float8 import FLOAT8_RECIPES
        from ..parallel.execution import parse_ac_policy

        try:
            parse_ac_policy(t.ac_policy)
        except ValueError as e:
            raise ConfigError("train.ac_policy", str(e)) from None
        if t.float8 not in FLOAT8_RECIPES:
            raise ConfigError("train.float8", f"must be one of {', '.join(FLOAT8_RECIPES)}, got {t.float8!r}")
        if t.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                "train.compile_mode", f"must be one of {', '.join(COMPILE_MODES)}, got {t.compile_mode!r}"
            )
        if t.keep_checkpoints < 1:
            raise ConfigError("train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
        if t.device not in ("auto", "cpu", "cuda") and not (
            t.device.startswith("cuda:") and t.device[5:].isascii() and t.device[5:].isdigit()
        ):
            raise ConfigError("train.device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {t.device!r}")
        if t.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError("train.precision", f"must be 'auto', 'fp32' or 'bf16', got {t.precision!r}")
        if t.threads is not None:
            _positive("train.threads", t.threads)
            if t.threads > MAX_THREADS:
                raise ConfigError("train.threads", f"must be at most {MAX_THREADS:,}, got {t.threads:,}")
        if t.gc_every < 0:
            raise ConfigError("train.gc_every", f"must be >= 0 (0: automatic collection), got {t.gc_every}")
        if t.trainable is not None:
            from .trainable import trainable_patterns

            trainable_patterns(t.trainable)  # (what they match is checked against the model: Trainer)
        self._validate_parallel()

    def notes(self) -> list[str]:
        """Settings that are valid but change nothing in this run (the trainer prints them)."""
        o, t, par = self.optim, self.train, self.parallel
        notes = []
        if o.warmup_steps >= t.steps:
            reach = "never reaches optim.lr" if o.warmup_steps > t.steps else "reaches optim.lr at the last step only"
            notes.append(
                f"optim.warmup_steps ({o.warmup_steps}) >= train.steps ({t.steps}): the learning rate {reach} "
                "and never decays"
            )
        decay_start = t.steps - max(1, round(t.steps * o.decay_fraction))  # as optim.lr_factor places it
        if o.schedule == "wsd" and decay_start < o.warmup_steps < t.steps:
            notes.append(
                f"optim.decay_fraction ({o.decay_fraction}) of train.steps ({t.steps}) starts the decay at step "
                f"{decay_start}, inside the warmup of {o.warmup_steps} steps: the learning rate drops at step "
                f"{o.warmup_steps} from optim.lr to the decay's value there, and decays over the "
                f"{t.steps - o.warmup_steps} steps after the warmup"
            )
        if t.ac_policy != TrainConfig.ac_policy and not t.activation_checkpointing:
            notes.append("train.ac_policy has no effect without train.activation_checkpointing = true")
        elif t.activation_checkpointing and "=" in t.ac_policy:  # a kind no block starts with: its entry does nothing
            from ..parallel.execution import parse_ac_policy

            parsed = self.model_config().parsed
            starts = {block[0] for block in (*parsed.blocks, *parsed.mtp_blocks)}
            if unused := [k for k in parse_ac_policy(t.ac_policy) if k not in starts]:
                notes.append(
                    f"train.ac_policy names {', '.join(map(repr, unused))}, which starts no block of the pattern: a "
                    "block's policy is that of its first layer (a fused block's, its sequence mixer's)"
                )
        if o.decay_fraction != OptimConfig.decay_fraction and o.schedule != "wsd":
            notes.append(f"optim.schedule = {o.schedule!r} does not use optim.decay_fraction (only 'wsd' does)")
        if o.min_lr_ratio != OptimConfig.min_lr_ratio and o.schedule == "constant":
            notes.append("optim.schedule = 'constant' does not use optim.min_lr_ratio")
        if (
            o.moe_expert_bias_rate != OptimConfig.moe_expert_bias_rate
            and not self.model_config().moe_router_expert_bias
        ):
            notes.append("optim.moe_expert_bias_rate has no effect without model.moe_router_expert_bias = true")
        if o.apply_wd_to_qk_layernorm:
            from .optim import qk_norm_symbols

            if not qk_norm_symbols(self.model_config()):
                notes.append(
                    "optim.apply_wd_to_qk_layernorm has no effect: the model has no q/k norm Megatron-LM decays "
                    "under it (attention's q_norm / k_norm with model.qk_norm = true, DSA's q_a_layernorm; MLA's "
                    "latent norms are not among them)"
                )
            elif o.weight_decay == 0:
                notes.append("optim.apply_wd_to_qk_layernorm has no effect with optim.weight_decay = 0")
        # The fields a user set: a preset's own, and the embedded default's, are theirs to choose.
        set_fields = list(self.set_model_fields())
        by_reason: dict[str, list[str]] = {}
        for name, why in unused_fields(self.model_config(), set_fields).items():
            by_reason.setdefault(why, []).append(f"model.{name}")
        for why, names in by_reason.items():
            verb = "has" if len(names) == 1 else "have"
            notes.append(
                f"{', '.join(names[:-1])}{' and ' if len(names) > 1 else ''}{names[-1]} {verb} no effect: {why}"
            )
        cores = os.cpu_count() or 1
        if t.threads is not None and t.threads > cores:
            notes.append(f"train.threads ({t.threads}) is more than this machine's {cores} CPU cores: they compete")
        if t.compile_mode != TrainConfig.compile_mode and not t.compile:
            notes.append("train.compile_mode has no effect without train.compile = true")
        if t.float8_auto_filter and t.float8 == "none":
            notes.append("train.float8_auto_filter has no effect without train.float8")
        if t.float8 != "none" and not t.compile:  # torchao's casts are separate kernels uncompiled
            notes.append(
                "train.float8 without train.compile = true: each float8 matmul's scaling and casts run as separate "
                "kernels, which compile fuses (torchao's advice)"
            )
        unused = [f"parallel.{k}" for k in ("schedule", "microbatches") if getattr(par, k) is not None]
        if par.pp == 1 and unused:
            verb = "has" if len(unused) == 1 else "have"
            notes.append(f"{' and '.join(unused)} {verb} no effect with parallel.pp = 1")
        return notes

    def _validate_parallel(self) -> None:
        """The checks that need no world size (the trainer checks ``world % pp`` and the batch split)."""
        par = self.parallel
        _positive("parallel.pp", par.pp)
        if par.microbatches is not None:
            _positive("parallel.microbatches", par.microbatches)
        known = SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES
        if par.schedule is not None and par.schedule not in known:
            raise ConfigError("parallel.schedule", f"must be one of {', '.join(known)}; got {par.schedule!r}")
        if par.pp == 1:
            return
        p = self.model_config().parsed
        n_seg = len(p.segments)
        # The first and last ranks may hold only the embedding and the head (an empty end segment, as in 'M|'):
        # only the ranks between them need a block. Beyond that no '|' could help ("cut the stages with '|'").
        if p.num_blocks + 2 < par.pp:
            blocks = f"{p.num_blocks} block{'s' if p.num_blocks != 1 else ''}"
            raise ConfigError(
                "parallel.pp",
                f"{par.pp} pipeline stages are more than the pattern's {blocks} allow: every rank but the first and "
                f"last needs a block (at most {p.num_blocks + 2} ranks, the ends holding only the embedding and head)",
            )
        if n_seg == 1:
            if p.num_blocks % par.pp:
                raise ConfigError(
                    "parallel.pp",
                    f"{par.pp} pipeline ranks cannot split the {p.num_blocks} blocks of a pattern without '|' "
                    "evenly; cut the stages with '|'",
                )
        elif n_seg % par.pp:
            raise ConfigError(
                "parallel.pp",
                f"must divide the pattern's {n_seg} '|' segments (one stage per segment), got {par.pp}; or place the "
                "'|' anew (--set model.pattern=..., also at a resume: checkpoints load into any split; hybridlm plan "
                f"--pp {par.pp} balances them)",
            )
        from .pipeline import check_every_rank_holds_layers

        check_every_rank_holds_layers(self.model_config(), par.pp)
        virtual = max(1, n_seg // par.pp)
        schedule = self.resolved_schedule()
        if virtual > 1 and schedule in SINGLE_STAGE_SCHEDULES:
            raise ConfigError(
                "parallel.schedule",
                f"{schedule!r} runs one stage per rank, but {n_seg} segments over pp={par.pp} make {virtual} "
                f"virtual stages per rank; use one of {', '.join(MULTI_STAGE_SCHEDULES)}",
            )
        mb = par.resolved_microbatches()
        if schedule == "1f1b" and mb < par.pp:  # torch's 1F1B fills the pipeline with one per stage first
            raise ConfigError(
                "parallel.microbatches", f"1f1b needs at least pp ({par.pp}) micro-batches, got {mb} (or use gpipe)"
            )

        def rounds(n: int) -> int:  # torch's interleaved 1F1B: n micro-batches in n // pp rounds of equal size
            return max(1, n // par.pp)

        if schedule == "interleaved-1f1b" and mb % rounds(mb):
            fits = (next(n for n in range(mb - 1, 0, -1) if n % rounds(n) == 0), mb - mb % par.pp + par.pp)
            raise ConfigError(
                "parallel.microbatches",
                f"interleaved-1f1b runs micro-batches in rounds of equal size, {rounds(mb)} rounds for {mb} over "
                f"pp={par.pp} (micro-batches // pp), which {mb} does not split; e.g. {fits[0]} or {fits[1]}, or "
                "looped-bfs (any count)",
            )

    def resolved_schedule(self) -> str:
        """``parallel.schedule``, or its default: 1f1b, interleaved-1f1b when ranks hold virtual stages."""
        if self.parallel.schedule is not None:
            return self.parallel.schedule
        n_seg = len(self.model_config().parsed.segments)
        return "interleaved-1f1b" if n_seg > self.parallel.pp > 1 else "1f1b"


SECTIONS = ("model", "data", "optim", "train", "parallel")

#: What ``train.init_from`` takes, said where a folder is refused.
INIT_FROM_TAKES = (
    "train.init_from takes a hybridlm model folder: one hybridlm.save or a run wrote (RUN/model), or a Hugging Face "
    "NemotronH or Qwen3-Next folder converted first with `hybridlm convert SRC DST --from nemotron-h` (or "
    "`--from qwen3-next`)"
)


def records_init_from(path: Path) -> bool:
    """Whether run file ``path`` (a run's config.toml) records a ``train.init_from``; True where it does not read
    (nothing is known to refuse by; a resume that uses the file says what is wrong with it where it reads it)."""
    try:
        train = tomllib.loads(path.read_text(encoding="utf-8-sig")).get("train", {})
        return not isinstance(train, dict) or isinstance(train.get("init_from"), str)
    except (OSError, ValueError, RecursionError):  # (TOMLDecodeError and UnicodeDecodeError are ValueErrors)
        return True


def read_init_config(path: str) -> ModelConfig:
    """The model config of ``train.init_from`` folder ``path``; a ConfigError naming the field where it is none."""
    from ..checkpoint.weights import read_config
    from .data import source_path
    from .rundir import CHECKPOINTS, MODEL_DIR

    folder = source_path(path)
    try:
        return read_config(folder)
    except CheckpointError as e:
        # A run's folder, or one of its training states (DCP): name the model folder the run writes.
        run = folder if (folder / CHECKPOINTS).is_dir() else None
        if folder.is_dir() and folder.absolute().parent.name == CHECKPOINTS:
            run = folder.absolute().parent.parent
        if "hybridlm convert" in str(e):  # (a NemotronH folder: said)
            said = str(e)
        elif run is not None:
            what = "a training run" if run == folder else f"a training-state checkpoint (DCP) of the run {run}"
            said = (
                f"{folder} is {what}, not a model folder; give the model folder the run exports, {run / MODEL_DIR} "
                "(written when it reaches train.steps)"
            )
        else:
            said = f"{e}; {INIT_FROM_TAKES}"
        raise ConfigError("train.init_from", said) from None


def _check_norm_convention(saved: bool, wanted: Any, init: str) -> None:
    """Refuse a ``model.norm_zero_centered`` other than the ``train.init_from`` folder's: it changes no tensor shape,
    so the load would take the weights, but each norm weight then means another scale (``w`` of a zero-centred
    model, about 0, read as the scale itself zeroes every norm; a plain model's scale, about 1, read as ``w`` doubles
    it). ``wanted``: the run's value, None where it sets none; a non-bool is left to ModelConfig's type check."""
    if not isinstance(wanted, bool) or wanted == saved:
        return
    stored = "w, the scale being 1 + w" if saved else "the scale itself"
    read = "as the scale itself (about 0: every norm would zero its input)" if saved else "as w (a scale of about 2)"
    raise ConfigError(
        "model.norm_zero_centered",
        f"{str(wanted).lower()} over train.init_from {init}, whose config.json has {str(saved).lower()}: its norm "
        f"weights store {stored}, which this model would read {read}; leave model.norm_zero_centered out (the "
        "folder's value)",
    )


def _validate_blend(d: DataConfig) -> None:
    """``data.source`` as a list (a blend) and ``data.weights``: one source a name, no repeats, a positive finite
    weight per source. (A plain string's emptiness is refused with every other text field.)"""
    if isinstance(d.source, str) and d.source.strip().startswith("[") and d.source.strip().endswith("]"):
        # --set data.source=[a,b]: the shell took the quotes, TOML could not read it, and it was kept as a path.
        raise ConfigError(
            "data.source",
            f"{d.source!r} is no TOML array (its strings need quotes), so it reads as one path; write "
            '--set data.source=\'["a.jsonl", "b/"]\' (the single quotes keep the double ones from the shell)',
        )
    if isinstance(d.source, list):
        if not d.source:
            raise ConfigError("data.source", "an empty list; name a source, or a list of sources to blend")
        seen: dict[str, int] = {}
        for i, source in enumerate(d.source):
            if not source.strip():
                raise ConfigError("data.source", f"source {i + 1} of the list is empty; name a source there")
            # The same file named twice (./a.jsonl and a.jsonl) is one source, whose weight is the sum.
            same = source if source.startswith("builtin:") else os.path.normpath(os.path.expanduser(source))
            if same in seen:
                raise ConfigError(
                    "data.source",
                    f"{source!r} (source {i + 1}) is source {seen[same] + 1} again: name each source once and give "
                    "it the sum of the weights (data.weights)",
                )
            seen[same] = i
    if d.weights is None:
        return
    if isinstance(d.source, str):
        raise ConfigError(
            "data.weights",
            f"weighs the sources of a blend, but data.source names one ({d.source!r}); leave it out (or unset it: "
            f"{NONE_WORD!r}), or list the sources: data.source = ['A', 'B'], data.weights = [0.7, 0.3]",
        )
    if len(d.weights) != len(d.source):
        raise ConfigError(
            "data.weights", f"{len(d.weights)} weight(s) for the {len(d.source)} sources of data.source; give one each"
        )
    for i, w in enumerate(d.weights):
        if not (is_finite(w) and w > 0):  # (a run file's nan and inf: refused by _check_type already, by its item)
            raise ConfigError(
                "data.weights", f"weight {i + 1} ({d.source[i]!r}) must be a positive finite number, got {w}"
            )


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(name, f"must be positive, got {value}")


#: Settings other trainers have that hybridlm takes from elsewhere (a close name would point the wrong way).
_ELSEWHERE = {
    "parallel.vpp": "virtual stages are the pattern's '|' segments beyond parallel.pp: cut it into pp x V "
    "segments (hybridlm plan --pp N --vpp V places the cuts)",
    "parallel.dp": "the data-parallel size is the number of processes over parallel.pp (torchrun --nproc_per_node)",
    # One letter from parallel.pp: "did you mean 'parallel.pp'?" pointed at pipeline ranks instead.
    **{
        f"parallel.{k}": f"{what} parallelism is not offered (data parallel with FSDP2 and pipeline stages, "
        "parallel.pp, are)"
        for k, what in (("tp", "tensor"), ("cp", "context"), ("ep", "expert"))
    },
}


_VIRTUAL = _ELSEWHERE["parallel.vpp"]
#: Megatron-LM's training arguments (in any section) -> where hybridlm takes them: the closest spelling pointed
#: elsewhere (train_iters -> train.run_dir, save_interval -> train.seed, lr_decay_style -> optim.decay_fraction).
_MEGATRON = {
    "train_iters": "hybridlm's is train.steps",
    "global_batch_size": "hybridlm's is train.batch_size (sequences per optimizer step, over all processes)",
    "clip_grad": "hybridlm's is optim.grad_clip",
    "adam_beta1": "hybridlm's is optim.beta1",
    "adam_beta2": "hybridlm's is optim.beta2",
    "adam_eps": "hybridlm's is optim.eps",
    "min_lr": "hybridlm's is optim.min_lr_ratio, a share of optim.lr (Megatron's min_lr is a rate)",
    "lr_warmup_iters": "hybridlm's is optim.warmup_steps",
    "lr_decay_style": "hybridlm's is optim.schedule (cosine, wsd or constant)",
    "lr_decay_iters": "the decay ends at train.steps",
    # Megatron's deprecated spelling of --apply-wd-to-qk-layernorm (its one value, "apply_wd_to_qk_layernorm").
    "no_weight_decay_cond_type": "hybridlm's is optim.apply_wd_to_qk_layernorm = true",
    "save_interval": "hybridlm's is train.checkpoint_every",
    "eval_interval": "hybridlm's is train.eval_every",
    "log_interval": "hybridlm's is train.log_every",
    "eval_iters": "hybridlm's is train.eval_batches",
    "manual_gc_interval": "hybridlm's is train.gc_every",
    "seq_length": "hybridlm's is data.seq_len",
    "bf16": 'hybridlm\'s is train.precision = "bf16"',
    "recompute_granularity": "hybridlm's are train.activation_checkpointing and train.ac_policy",
    "save": "hybridlm's is train.run_dir",
    "load": "resume a run with hybridlm train --resume RUN_DIR",
    "pipeline_model_parallel_size": "hybridlm's is parallel.pp",
    "virtual_pipeline_model_parallel_size": _VIRTUAL,
    "num_layers_per_virtual_pipeline_stage": _VIRTUAL,
    **dict.fromkeys(
        ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"),
        "the stages are cut at the pattern's '|' (hybridlm plan places them for balance)",
    ),
    "tensor_model_parallel_size": _ELSEWHERE["parallel.tp"],
    "context_parallel_size": _ELSEWHERE["parallel.cp"],
    "expert_model_parallel_size": _ELSEWHERE["parallel.ep"],
}


def _section_class(section: str) -> type:
    """The dataclass of run-file table ``section``."""
    return ModelConfig if section == "model" else type(getattr(RunConfig(), section))


def _field_names(section: str) -> set[str]:
    return {f.name for f in fields(_section_class(section))}


def _unknown(key: str, known: list[str], what: str = "field") -> None:
    if key in _ELSEWHERE:
        raise UnknownFieldError(key, f"unknown {what}: {_ELSEWHERE[key]}")
    section, _, name = key.rpartition(".")
    if what == "field" and (where := _MEGATRON.get(name)):
        raise UnknownFieldError(key, f"unknown {what} (a Megatron-LM argument): {where}")
    # A field of another section (train.seq_len) got the closest name of this one as a hint (train.seed); one
    # outside any table (a run file's "steps = 3" above [train]) was listed the sections.
    if other := [s for s in SECTIONS if s != section and name in _field_names(s)]:
        where = " and ".join(f"{s}.{name}" for s in other)
        raise UnknownFieldError(
            key, f"unknown {what}: {name} is {where}" + (" (a field: put it in its table)" * (what == "section"))
        )
    hint = difflib.get_close_matches(key, known, n=1)
    listed = f"; the sections are {', '.join(known)}" if what == "section" else ""
    raise UnknownFieldError(key, f"unknown {what}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + listed)


def _unknown_fields(section: str, values: dict[str, Any]) -> None:
    """Refuse the keys of ``values`` that are no field of ``section`` (a run file's table, ``--set``, or keywords
    of its dataclass), each named ``section.key``."""
    names = [f.name for f in fields(_section_class(section))]
    for key in values:
        if key not in names:
            _unknown(f"{section}.{key}", [f"{section}.{n}" for n in names])


def override_key(item: str) -> str:
    """The ``section.field`` that override ``item`` (``section.field=value``) assigns, spaces dropped."""
    return ".".join(part.strip() for part in item.partition("=")[0].split("."))


def _holds_text(section: str, name: str) -> bool:
    """Whether field ``name`` of ``section`` takes text only (str, or str or None, or str or a list of str)."""
    hint = get_type_hints(_section_class(section)).get(name)
    allowed = set(get_args(hint) if get_origin(hint) is not None else (hint,))
    return str in allowed and allowed <= {str, type(None), list[str]}


def _build(cls: type, values: dict[str, Any], section: str):
    hints = get_type_hints(cls)
    _unknown_fields(section, values)  # (before the types: an unknown key has no hint)
    # TOML has no null: "none" unsets a field that may be None, as in the model section (a resume's
    # config.toml holds the value, so leaving the field out cannot bring the default back).
    values = {k: None if _is_none_word(v) and type(None) in get_args(hints[k]) else v for k, v in values.items()}
    for key, value in values.items():
        _check_type(f"{section}.{key}", hints[key], value)
    return cls(**values)


def _is_none_word(value: Any) -> bool:
    # ("null" too: a model field's type error says "expected int or null", in JSON's words)
    return isinstance(value, str) and value.strip().lower() in (NONE_WORD, "null")


def _check_type(name: str, hint: Any, value: Any) -> None:
    allowed = get_args(hint) if get_origin(hint) is not None and get_origin(hint) is not list else (hint,)
    if value is None and type(None) in allowed:
        return
    for t in allowed:
        if get_origin(t) is list and isinstance(value, list):  # (data.source's blend, data.weights)
            (item,) = get_args(t)
            for i, v in enumerate(value):
                try:
                    _check_type(name, item, v)
                except ConfigError as e:  # the element named: "expected float, got 'a'" said not where
                    said = str(e)[len(e.field) + 2 :]
                    raise ConfigError(name, f"item {i + 1} of the list: {said}") from None
            return
        if t is bool and isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            # A larger count passed every check, then overflowed a float in the schedule's note or the batch's
            # memory check ("unexpected OverflowError", after the run folder was written). (Negative ones: refused
            # by each field's own range.)
            if value > MAX_INT:
                raise ConfigError(name, f"must be at most 2**63 - 1, got {value}")
            return
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not is_finite(value):
                shown = repr(value) if isinstance(value, float) else "an integer too large for a float"
                raise ConfigError(name, f"must be a finite number, got {shown}")
            return
        if t is str and isinstance(value, str):
            return
    names = " or ".join(
        f"a list of {get_args(t)[0].__name__}" if get_origin(t) is list else t.__name__
        for t in allowed
        if t is not type(None)
    )
    null = isinstance(value, str) and value.strip().lower() in ("none", "null", "nil", "")
    unset = f" (TOML has no null: to unset the field, write {NONE_WORD!r})" if null and type(None) in allowed else ""
    raise ConfigError(name, f"expected {names}, got {value!r}{unset or _toml_spelling(value, allowed)}")


def _toml_spelling(value: Any, allowed: tuple) -> str:
    """How TOML spells a value meant as a bool or number but read as a string (``--set optim.lr=.001`` and
    ``train.compile=True`` said only "expected float, got '.001'"), or ""."""
    if not isinstance(value, str):
        return ""
    word = value.strip()
    if bool in allowed and word.lower() in ("true", "false"):
        return f" (TOML writes it in lower case: {word.lower()})"
    try:
        number = float(word)
    except ValueError:
        return ""
    if int in allowed and number.is_integer() and abs(number) <= MAX_INT:
        return f" (TOML reads an integer written as {int(number)})"
    if float in allowed and is_finite(number):
        return f" (TOML reads a number written as {number!r})"
    return ""


def _parse_value(raw: str, name: str) -> Any:
    """An override's value (of field ``name``) as TOML reads it, else the bare string (a pattern, a path)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return raw
    except ValueError:  # an integer of over 4,300 digits
        raise ConfigError(name, f"a number of {len(raw):,} characters is out of range") from None
