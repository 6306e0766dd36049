"""Which implementation an op runs: the plain-PyTorch reference or a fast (Triton) kernel.

One switch for every op, an *execution* setting (never a model field):

- the environment variable ``HYBRIDLM_KERNELS`` = ``auto`` (default) | ``torch`` | ``triton``,
  optionally followed by per-op overrides, e.g. ``auto,add_rms_norm=torch`` (every op automatic,
  the fused seam on the reference: how one kernel is ruled out or compared, one run each);
- or, in Python, :func:`set_kernels` / the context manager :func:`use_kernels` (the same strings).

``auto`` runs the Triton kernel when the inputs live on a CUDA device and Triton imports, and the
torch reference otherwise: always on CPU, and for any float64 input (the kernels compute in float32,
while the references keep a float64 model float64, see :func:`hybridlm.ops.precision.accumulation_dtype`).
``torch`` always runs the reference. ``triton`` always runs the kernel, float64 inputs included (on CPU
only under ``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU) and raises if
Triton is missing.

Every op reports its choice through :func:`choose`, which logs it once per (op, path) and records
it, so a test can assert which path ran (:func:`paths_used`). Nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from ..errors import ConfigError

logger = logging.getLogger("hybridlm.ops")

MODES = ("auto", "torch", "triton")
ENV = "HYBRIDLM_KERNELS"
#: Every op with a fast path, as named in the setting's overrides and in :func:`paths_used`.
OPS = (
    "ssd",
    "causal_conv1d",
    "gated_rms_norm",
    "mamba2_core",
    "add_rms_norm",
    "rms_norm",
    "rms_norm_then_gate",
    "gated_delta",
    "conv_step",
    "ssd_step",
    "mamba2_step",
    "gdn_step",
    "attention",
    "moe_experts",
    "moe_route",
    "cross_entropy",
    "top_p",
    "index_scores",
    "index_topk",
    "index_target",
)

_mode: str | None = None  # set by set_kernels(); None = read the environment
_used: dict[str, str] = {}  # op -> path of its latest call
_logged: set[tuple[str, str]] = set()


def parse_setting(setting: str, source: str = ENV) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``"auto"`` or ``"torch,ssd=triton"`` -> (mode for every op, ((op, mode), ...) overrides).

    The mode may be left out (``"add_rms_norm=torch"`` means ``auto`` for the rest). Raises ValueError
    naming ``source`` and the part that is wrong. Not cached: a few string splits per op call, and
    dynamo traces it cleanly inside compiled blocks (it warns about ``lru_cache`` there).
    """
    mode, overrides = "auto", {}
    for i, part in enumerate(p.strip().lower() for p in setting.split(",")):
        op, eq, value = part.partition("=")
        op, value = op.strip(), value.strip()
        if not part and i == 0:
            continue
        if not eq and i == 0 and part in MODES:
            mode = part
        elif eq and op in OPS and value in MODES:
            overrides[op] = value
        elif eq and op not in OPS:
            raise ValueError(f"{source}={setting!r}: {op!r} is not an op; ops: {', '.join(OPS)}")
        else:
            raise ValueError(
                f"{source}={setting!r}: {part!r}: expected one of {', '.join(MODES)} first, "
                f"then op=mode overrides (e.g. auto,add_rms_norm=torch)"
            )
    return mode, tuple(overrides.items())


def kernels_mode(op: str | None = None) -> str:
    """The mode of ``op`` (its override, else the mode for every op), or with no ``op`` the mode for every op:
    :func:`set_kernels`'s setting, else ``$HYBRIDLM_KERNELS``, else ``auto``."""
    setting = _mode if _mode is not None else os.environ.get(ENV, "auto")
    mode, overrides = parse_setting(setting, "kernels" if _mode is not None else ENV)
    return dict(overrides).get(op, mode) if op is not None else mode


def set_kernels(mode: str | None) -> None:
    """Choose the kernels for the whole process, e.g. ``"torch"`` or ``"auto,ssd=torch"`` (``None`` returns to
    the environment's choice)."""
    global _mode
    if mode is not None:
        parse_setting(mode, "kernels")  # refuse a bad setting here, not at the next op
    _mode = mode


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """``with use_kernels("torch"): ...`` runs the block with that choice, then restores the previous one."""
    global _mode
    previous = _mode
    set_kernels(mode)
    try:
        yield
    finally:
        _mode = previous


_triton_ok: bool | None = None  # cached import check (a plain global: torch.compile traces it cleanly)


def triton_available() -> bool:
    """True when Triton imports (it is an optional dependency: ``pip install "hybridlm[gpu]"``)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton
            import triton.language  # noqa: F401
        except Exception:  # ImportError, or a broken install that fails on import
            _triton_ok = False
        else:
            _triton_ok = True
    return _triton_ok


def choose(op: str, *tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"torch"`` for one call of ``op`` on ``tensors``, and record the choice.

    Args:
        op: the op's name, e.g. ``"ssd"``, ``"causal_conv1d"``.
        tensors: the call's tensor inputs (None entries are ignored); ``auto`` picks Triton only
            when all of them are on CUDA and none is float64.
    """
    mode = kernels_mode(op)
    if mode == "torch":
        path = "torch"
    elif mode == "triton":
        if not triton_available():
            raise ConfigError(ENV, "'triton' but Triton does not import; install it with: pip install 'hybridlm[gpu]'")
        if not all(t.is_cuda for t in tensors if t is not None):
            _check_interpreted(op, "CPU tensors")
        path = "triton"
    else:
        present = [t for t in tensors if t is not None]
        on_cuda = all(t.is_cuda for t in present)
        float64 = any(t.dtype == torch.float64 for t in present)  # the kernels accumulate in float32
        path = "triton" if on_cuda and not float64 and triton_available() else "torch"
    _record(op, path)
    return path


def check_device(device: torch.device | str) -> None:
    """Refuse (ConfigError) a malformed kernel setting, or ``triton`` for every op on a ``device`` other than CUDA
    outside Triton's interpreter: called where a run starts, so that it fails before any work. (A per-op override
    fails at its op, if the model runs it; ``attention`` and ``moe_experts`` have no Triton kernel, and their
    ``triton`` only means "not torch".)"""
    try:  # the setting is read at every op: a bad one is refused here, not as a ValueError inside the model
        mode = kernels_mode()
    except ValueError as e:
        raise ConfigError(ENV, str(e).partition(": ")[2]) from None
    if torch.device(device).type != "cuda" and mode == "triton":
        _check_interpreted("every op", str(device))


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: TRITON_INTERPRET read as Triton reads a flag (1, true, on).
    The variable itself, not ``triton.knobs``: dynamo traces this inside compiled blocks, and cannot trace knobs."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _check_interpreted(what: str, where: str) -> None:
    # Compiled Triton kernels need CUDA tensors; elsewhere Triton fails inside the launch ("0 active drivers").
    if not _interpreting():
        raise ConfigError(
            ENV,
            f"'triton' for {what} on {where}: Triton's kernels run on CUDA, or on the CPU only in its interpreter "
            "(TRITON_INTERPRET=1, for tests); use 'auto' or 'torch' here",
        )


def choose_eager(op: str, *tensors: torch.Tensor | None) -> str:
    """:func:`choose` for an op whose kernel pays only in eager code: inside ``torch.compile`` it is
    ``"torch"`` (inductor fuses the reference with its neighbours, without a custom op's Python
    launch), and tracing records nothing."""
    return "torch" if torch.compiler.is_compiling() else choose(op, *tensors)


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors`` (None entries are skipped): grad mode on and one of them
    requiring a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def record(op: str, path: str) -> None:
    """Record (and log once) that ``op`` ran ``path``: for fast paths that are not Triton kernels (e.g. ``grouped_mm``)."""
    _record(op, path)


def _record(op: str, path: str) -> None:
    # Inside torch.compile tracing the record/log would be a side effect of tracing only (and a
    # graph break): the eager calls before compilation and the choice itself are what matter.
    if torch.compiler.is_compiling():
        return
    _used[op] = path
    if (op, path) not in _logged:
        _logged.add((op, path))
        logger.info("kernel %s: %s path", op, path)


def paths_used() -> dict[str, str]:
    """op -> path of its most recent call (a copy)."""
    return dict(_used)


def reset_paths() -> None:
    """Forget recorded choices (tests call this before asserting which path ran)."""
    _used.clear()
