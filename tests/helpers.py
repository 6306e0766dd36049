"""Shared test helpers: tolerances, tiny random configs and patterns."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hybridlm import ModelConfig
from hybridlm.ops.dispatch import triton_available

#: Marks tests that need Triton (its kernels compiled on a GPU, or its launch machinery).
requires_triton = pytest.mark.skipif(not triton_available(), reason="needs Triton (pip install 'hybridlm[gpu]')")


def _interpreter_problem() -> str | None:
    """The known reason Triton's interpreter, which runs the kernels in the CPU tests, cannot run
    them here, or None: Triton 3.6's (torch 2.11's) calls ``int()`` on one-element arrays, which
    NumPy 2.4 refuses, so every kernel looping over a scalar argument fails. A one-line kernel finds
    out; any other failure is left to the tests themselves to report."""
    if torch.cuda.is_available() or not triton_available():
        return None
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        total = 0
        for _ in range(n):
            total += 1
        tl.store(out_ptr, total)

    try:
        count[(1,)](torch.zeros(1, dtype=torch.int32), 3)
    except Exception as e:  # the interpreter wraps the TypeError in its own error
        if "only 0-dimensional arrays can be converted to Python scalars" in str(e):
            return (
                f"Triton {triton.__version__}'s interpreter cannot run under NumPy {numpy.__version__}; try numpy<2.4"
            )
    return None


#: Why a test of Triton's interpreter on CPU tensors skips where CUDA is (compiled Triton cannot
#: take CPU tensors); the GPU tests run those kernels there. tests/conftest.py gives it to the tests
#: of a module that sets ``INTERPRETER_ONLY``.
INTERPRETER_ONLY_REASON = "Triton's interpreter on CPU tensors; with CUDA the gpu tests run these kernels"
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason=INTERPRETER_ONLY_REASON)

#: Marks tests that run Triton kernels: compiled on a GPU, in Triton's interpreter on the CPU.
_interpreter = _interpreter_problem()
runs_triton_kernels = pytest.mark.skipif(
    not triton_available() or _interpreter is not None,
    reason=_interpreter or "needs Triton (pip install 'hybridlm[gpu]')",
)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are 0)."""
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_same_gradients(
    what: str, ours: torch.nn.Module, theirs: torch.nn.Module, x_ours, x_theirs, tol: float
) -> None:
    """The input's and every parameter's gradient (parameters paired by name) within ``tol`` (:func:`rel_err`)."""
    assert rel_err(x_ours.grad, x_theirs.grad) < tol, f"{what}: input gradient"
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, their_params[name].grad) < tol, f"{what}: gradient of {name}"


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=48,
    mamba_num_heads=4,
    mamba_head_dim=8,
    mamba_state_dim=8,
    mamba_num_groups=2,
    mamba_chunk_size=8,
    moe_num_experts=4,
    moe_top_k=2,
    moe_ffn_hidden_size=24,
    gdn_num_heads=2,
    gdn_head_dim=8,
    gdn_chunk_size=8,
)


#: Small multi-latent / sparse attention sizes (+, D): every dimension distinct, so a swapped one shows.
MLA_TINY = dict(
    q_lora_rank=12,
    kv_lora_rank=10,
    qk_head_dim=6,
    qk_pos_emb_head_dim=4,
    v_head_dim=5,
    dsa_indexer_n_heads=3,
    dsa_indexer_head_dim=8,
    dsa_indexer_topk=5,
)


def record_forwards(monkeypatch, model) -> list[tuple[int, int]]:
    """From now on, the (rows, positions) of every forward of ``model``'s class, in order (its ``forward`` wrapped
    through ``monkeypatch``, undone after the test)."""
    shapes: list[tuple[int, int]] = []
    forward = type(model).forward

    def recorded(self, ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", recorded)
    return shapes


def hf_rope_parameters(cfg: ModelConfig, **extra) -> dict:
    """transformers' ``rope_parameters`` for ``cfg``'s rotary frequencies (plain, or YaRN's from the ``yarn_*`` fields;
    attention_factor left for transformers to compute), with ``extra`` keys."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **extra}
    if cfg.rope_type == "yarn":
        rope |= {
            "rope_type": "yarn",
            "factor": cfg.yarn_rotary_scaling_factor,
            "original_max_position_embeddings": cfg.yarn_original_max_position_embeddings,
            "beta_fast": cfg.yarn_beta_fast,
            "beta_slow": cfg.yarn_beta_slow,
            "mscale": cfg.yarn_mscale,
            "mscale_all_dim": cfg.yarn_mscale_all_dim,
            "truncate": cfg.yarn_correction_range_round_to_int,
        }
    return rope


def tiny_config(pattern: str, **overrides) -> ModelConfig:
    return ModelConfig(pattern=pattern, **{**TINY, **overrides})


def random_block(rng: random.Random, allow_fused: bool = True, sequence: str = "MG*") -> str:
    """A random block; ``sequence``: the sequence mixers to draw from (``*`` excludes ``+`` and ``D``)."""
    if allow_fused and rng.random() < 0.35:
        return f"[{rng.choice(sequence)}{rng.choice('-E')}]"
    return rng.choice(sequence + "-E")


def random_pattern(
    rng: random.Random, max_blocks: int = 6, mtp: bool = True, pipes: bool = True, sequence: str = "MG*"
) -> str:
    blocks = [random_block(rng, sequence=sequence) for _ in range(rng.randint(1, max_blocks))]
    if pipes and len(blocks) > 1 and rng.random() < 0.4:
        blocks.insert(rng.randint(1, len(blocks) - 1), "|")
    text = "".join(blocks)
    if mtp and rng.random() < 0.4:
        depth = "".join(random_block(rng, sequence=sequence) for _ in range(rng.randint(1, 2)))
        text += ("/" + depth) * rng.randint(1, 2)
    return text


def random_config(rng: random.Random, pattern: str) -> ModelConfig:
    """A tiny config with randomized options around ``pattern``."""
    groups = rng.choice([1, 2])
    return tiny_config(
        pattern,
        mlp_activation=rng.choice(["relu2", "swiglu", "gelu"]),
        position_embedding=rng.choice(["none", "rope"]),
        rotary_percent=rng.choice([1.0, 0.5]),
        qk_norm=rng.random() < 0.5,
        moe_router_score=rng.choice(["softmax", "sigmoid"]),
        moe_router_expert_bias=rng.random() < 0.5,
        moe_num_groups=groups,
        moe_topk_groups=rng.randint(1, groups),
        moe_shared_expert_ffn_hidden_size=rng.choice([0, 16]),
        moe_aux_loss_coeff=rng.choice([0.0, 0.01]),
        tie_embeddings=rng.random() < 0.3,
        gdn_num_value_heads=rng.choice([2, 4]),
        **_random_mla(rng, pattern),
        # drawn last, and only for attention: the other options' draws stay what they were
        **({"attention_output_gate": rng.random() < 0.5} if "*" in pattern else {}),
        **(_random_yarn(rng) if set(pattern) & set("*+D") else {}),
    )


def _random_yarn(rng: random.Random) -> dict:
    """YaRN's frequencies for a third of the patterns that rotate (drawn after every other option)."""
    if rng.random() >= 1 / 3:
        return {}
    return dict(
        rope_type="yarn",
        yarn_rotary_scaling_factor=rng.choice([2.0, 8.0]),
        yarn_original_max_position_embeddings=rng.choice([8, 64]),
        yarn_mscale_all_dim=rng.choice([0.0, 0.707]),
        yarn_correction_range_round_to_int=rng.random() < 0.5,
    )


def _random_mla(rng: random.Random, pattern: str) -> dict:
    """MLA/DSA options, drawn only for patterns with ``+`` or ``D`` (other patterns keep their draws)."""
    if "+" not in pattern and "D" not in pattern:
        return {}
    return dict(
        MLA_TINY,
        q_lora_rank=None if "D" not in pattern and rng.random() < 0.3 else 12,
        dsa_indexer_topk=rng.choice([3, 5, 64]),
        dsa_indexer_loss_coeff=rng.choice([0.01, 0.1]),
        dsa_indexer_use_sparse_loss=rng.random() < 0.5,
    )


def unfused(pattern: str) -> str:
    return pattern.replace("[", "").replace("]", "")


def assert_bf16_within(
    actual: torch.Tensor, exact_ref: torch.Tensor, rounded_ref: torch.Tensor, factor: float = 2.0, what: str = ""
) -> None:
    """The low-precision contract: a kernel's error is judged against a same-precision reference.

    ``actual`` (the kernel fed bf16-rounded inputs) must be within ``factor`` × the error of
    ``rounded_ref`` (the float64 reference fed the same bf16-rounded inputs, its output rounded
    to ``actual``'s dtype), both measured against ``exact_ref`` (the float64 reference on the
    exact inputs) with :func:`rel_err`.
    """
    assert actual.shape == exact_ref.shape == rounded_ref.shape, f"{what}: shapes differ"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, exact_ref)
    base = rel_err(rounded_ref.to(actual.dtype), exact_ref)
    assert err <= factor * base, f"{what}: error {err:.3g} > {factor} × {base:.3g} (float64 on bf16-rounded inputs)"


def run_failure(r) -> str:
    """What a failed ``subprocess.run`` of torchrun printed that matters: the lines that name an
    error or an abort (a rank's C++ ``terminate`` message is otherwise lost in torchrun's report),
    then the tails of stdout and stderr."""
    text = r.stdout + r.stderr
    marks = ("terminate", "what()", "Abort", "Error", "error:", "Traceback", "Signal")
    lines = [x for x in text.splitlines() if any(m in x for m in marks)][:30]
    return "\n".join(
        ["-- lines naming an error --", *lines, "-- stdout --", r.stdout[-1500:], "-- stderr --", r.stderr[-1500:]]
    )


def short_documents(path: Path, seed: int = 0) -> Path:
    """Write a JSONL corpus to ``path``: stretches of documents of 1 to 3 characters between documents of 40.

    A row of short documents holds a boundary every few tokens, so an MTP depth (whose labels stop d
    positions before each document's end) has a fraction of the main head's labels there, and rows differ a
    lot in that fraction: the corpus on which weighting the depths by the main head's labels showed.
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(40):
        docs += ["".join(rng.choices("abcdefgh", k=rng.randint(1, 3))) for _ in range(20)]
        docs.append("".join(rng.choices("abcdefgh ", k=40)))
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a test's child Python (torchrun ranks, the CLI): this checkout's ``src``
    and root first on ``PYTHONPATH``, then whatever the parent had there (a machine may carry
    packages on it), and one thread per process unless ``extra`` says otherwise."""
    path = [str(ROOT / "src"), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path), **extra}


class _Float64Torch(types.ModuleType):
    """``torch`` as a transformers modeling module sees it, with ``float32`` (and ``float``) meaning float64."""

    float32 = float = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def hf_in_float64(*modules: types.ModuleType):
    """Run transformers ``modules`` in float64 throughout: their RMSNorms, softmaxes, RoPE angles and scans
    upcast with ``torch.float32`` / ``.float()``, which would otherwise round a float64 comparison at 1e-7.
    Their kernel-backed functions run the torch code they wrap: where fla, mamba_ssm or causal_conv1d is
    installed (a GPU machine), transformers puts that package's kernel in the torch function's place at import,
    and a Triton kernel cannot read CPU tensors, nor compute in float64."""
    old, old_float = [m.torch for m in modules], torch.Tensor.float
    kernels = [(m, name, f) for m in modules for name, f in vars(m).items() if _kernel_backed(f, m)]
    for m in modules:
        m.torch = _Float64Torch("torch")
    for m, name, f in kernels:
        setattr(m, name, f.__wrapped__)
    torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)
    try:
        yield
    finally:
        for m, t in zip(modules, old):
            m.torch = t
        for m, name, f in kernels:
            setattr(m, name, f)
        torch.Tensor.float = old_float


def with_imported_models(module: types.ModuleType) -> tuple[types.ModuleType, ...]:
    """``module`` and the transformers model modules whose classes it imports (transformers 5.17's NemotronH takes its
    gated norm from Zamba2's, which upcasts there): what :func:`hf_in_float64` must patch for ``module``."""
    imported = {vars(module)["__name__"]}
    imported |= {
        v.__module__
        for v in vars(module).values()
        if isinstance(v, type) and v.__module__.startswith("transformers.models.") and ".modeling_" in v.__module__
    }
    return tuple(sys.modules[name] for name in sorted(imported))


def _kernel_backed(f: object, module: types.ModuleType) -> bool:
    """Whether ``f`` is one of ``module``'s torch functions that transformers' ``use_kernel_func_from_hub_with_fallback``
    wraps (``functools.wraps``: ``__wrapped__`` is the torch code, defined in ``module`` itself)."""
    wrapped = getattr(f, "__wrapped__", None)
    return callable(f) and callable(wrapped) and getattr(wrapped, "__module__", None) == module.__name__


def hf_cache_kwarg(module: torch.nn.Module, cache: object) -> dict[str, object]:
    """``{name: cache}`` under the name ``module.forward`` takes its cache by: ``cache`` since transformers 5.25,
    ``past_key_values`` (attention) or ``cache_params`` (Mamba2, Gated DeltaNet) before."""
    names = inspect.signature(module.forward).parameters
    return {next(n for n in ("cache", "past_key_values", "cache_params") if n in names): cache}


#: The watchdog of :func:`fifos_never_read`, a process of its own: a reader blocked inside the tokenizers package
#: holds the GIL, so a thread of the test's process would never run.
_FIFO_WATCHDOG = """
import os, stat, sys, time
while True:  # until killed
    for fifo in sys.argv[1:]:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
        except OSError:
            continue
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            print(fifo, flush=True)
        os.close(fd)  # the reader gets an empty file and goes on
    time.sleep(0.02)
"""


@contextlib.contextmanager
def fifos_never_read(*fifos: Path) -> Iterator[None]:
    """Fails the test if code in the block opens one of ``fifos`` (named pipes) to read it.

    A test that a FIFO is "refused, not waited on" otherwise hangs the whole suite when the refusal breaks (a
    FIFO's open for reading waits for a writer), and an alarm cannot end a wait inside Rust (the tokenizers
    package). A watchdog process opens each FIFO for writing, which succeeds only while a reader has it open, and
    closes it at once: the reader gets an empty file and goes on, and the block's end names it. (Paths that are
    not FIFOs, or not there, at a given moment are passed over.)
    """
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _FIFO_WATCHDOG, *map(os.fspath, fifos)], stdout=subprocess.PIPE, text=True
    )
    try:
        yield
    finally:
        watchdog.kill()
        opened = sorted(set(watchdog.communicate()[0].splitlines()))
    assert not opened, f"opened to be read (a blocked read, not a refusal): {opened}"
