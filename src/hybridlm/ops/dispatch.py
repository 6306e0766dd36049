"""Which implementation an op runs: the plain-PyTorch reference or a fast (Triton) kernel.

One switch for every op, an *execution* setting (never a model field):

- the environment variable ``HYBRIDLM_KERNELS`` = ``auto`` (default) | ``torch`` | ``triton``;
- or, in Python, :func:`set_kernels` / the context manager :func:`use_kernels`.

``auto`` runs the Triton kernel when the inputs live on a CUDA device and Triton imports, and the
torch reference otherwise (always on CPU). ``torch`` always runs the reference. ``triton`` always
runs the kernel (on CPU only under ``TRITON_INTERPRET=1``, which is how the kernels are tested
without a GPU) and raises if Triton is missing.

Every op reports its choice through :func:`choose`, which logs it once per (op, path) and records
it, so a test can assert which path ran (:func:`paths_used`). Nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

logger = logging.getLogger("hybridlm.ops")

MODES = ("auto", "torch", "triton")
ENV = "HYBRIDLM_KERNELS"

_mode: str | None = None  # set by set_kernels(); None = read the environment
_used: dict[str, str] = {}  # op -> path of its latest call
_logged: set[tuple[str, str]] = set()


def kernels_mode() -> str:
    """The current mode: :func:`set_kernels`'s value, else ``$HYBRIDLM_KERNELS``, else ``auto``."""
    mode = _mode if _mode is not None else os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def set_kernels(mode: str | None) -> None:
    """Choose the kernels for the whole process (``None`` returns to the environment's choice)."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernels: {mode!r} is not one of {', '.join(MODES)}")
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
            when all of them are on CUDA.
    """
    mode = kernels_mode()
    if mode == "torch":
        path = "torch"
    elif mode == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but Triton does not import; install it with: pip install 'hybridlm[gpu]'")
        path = "triton"
    else:
        on_cuda = all(t.is_cuda for t in tensors if t is not None)
        path = "triton" if on_cuda and triton_available() else "torch"
    _record(op, path)
    return path


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
