"""Metric sinks: a console line every N steps, JSONL always, TensorBoard when installed, a progress
bar when attached to a terminal, and a loss-curve PNG at the end (when matplotlib is installed)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..checkpoint.io import replace_file, written

logger = logging.getLogger("hybridlm.train")


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


class Metrics:
    """Where training metrics go. Only the process of rank 0 writes."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress: bool | None = None,
        resumed: bool = False,
    ):
        self.run_dir, self.total, self.enabled = run_dir, total_steps, enabled
        self.history: list[dict[str, Any]] = []
        if enabled:
            repair_jsonl(run_dir / "metrics.jsonl")
        self._jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 (closed in close())
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # A resumed run records again the steps after its checkpoint that a killed run had logged:
                # TensorBoard hides the earlier events from the first of them on (as metrics.jsonl's later
                # rows count), where it showed both. A new run records step 0 again; a resume, even at
                # step 0, records none of its checkpoint's step.
                purge = start_step + 1 if start_step or resumed else 0
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                # (a warning: the CLI configures no logging, and an info line would never be seen)
                logger.warning(
                    "tensorboard is not installed: metrics go to metrics.jsonl only (pip install 'hybridlm[logging]')"
                )
        show_bar = sys.stdout.isatty() if progress is None else progress
        self._bar = None
        if enabled and show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)
        self._t0 = time.time()
        self._start_step = start_step
        self._console_gone = False

    def print(self, line: str) -> None:
        if not self.enabled or self._console_gone:
            return
        with self._console():
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    def notice(self, line: str) -> None:
        """Write ``line`` to standard error at once; safe in a signal handler (see
        :class:`~hybridlm.train.signals.StopSignals`): ``os.write`` of the encoded line, not ``sys.stderr``, whose
        buffer the interrupted code may be writing. Over the progress bar's line on a terminal, below it elsewhere
        (the bar is drawn again below the line). A console that is gone (EIO, EPIPE) loses the line."""
        if not self.enabled or self._console_gone:
            return
        clear = ("\r\x1b[K" if os.isatty(2) else "\n") if self._bar is not None else ""
        with contextlib.suppress(OSError):
            os.write(2, f"{clear}{line}\n".encode(errors="replace"))

    @contextlib.contextmanager
    def _console(self) -> Iterator[None]:
        """Around a write to the console (stdout, or the bar's stderr). A terminal that went away (a closed window,
        a dropped ssh session: SIGHUP, then EIO on every write) must not end the run before the signal's
        checkpoint: the row is in metrics.jsonl, and the console stays quiet from here (the bar goes). So for a
        reader that went away (EPIPE: Ctrl-C or a SIGTERM to `hybridlm train | tee log` stops tee at once, and
        the run ended without its checkpoint, exit 141)."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EPIPE):
                raise
            if self._bar is not None:
                self._bar.disable = True  # its close (also when collected) would draw again
            self._console_gone, self._bar = True, None

    def record(
        self, step: int, values: dict[str, Any], console: bool, tensorboard: dict[str, float] | None = None
    ) -> None:
        """Write one row of ``values`` to metrics.jsonl and TensorBoard (and the console line when ``console``);
        ``tensorboard``: scalars for TensorBoard only, by tag (each MoE layer's load imbalance)."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time() - self._t0, 3), **values}
        self.history.append(row)
        # JSON has no NaN or Infinity (json.dumps wrote them bare, which JSON.parse and most readers refuse): a
        # skipped step's non-finite loss or gradient norm is written as null, as JavaScript and orjson write it.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        line = json.dumps(finite, allow_nan=False) + "\n"
        written(Path(self._jsonl.name), lambda: (self._jsonl.write(line), self._jsonl.flush()))  # a full disk named
        if self._tb is not None:  # (its writer thread's failed write, a full disk, comes back here: named)
            scalars = [(k, v) for k, v in {**values, **(tensorboard or {})}.items() if isinstance(v, (int, float))]
            written(self.run_dir / "tensorboard", lambda: [self._tb.add_scalar(k, v, step) for k, v in scalars])
        if self._bar is not None and "loss" in values:
            self._bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        if console:
            self.print(self.line(step, values))

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            with self._console():
                self._bar.update(n)

    def eta(self, step: int) -> float:
        done = step - self._start_step
        return (time.time() - self._t0) / done * (self.total - step) if done > 0 else float("nan")

    def line(self, step: int, v: dict[str, Any]) -> str:
        parts = [f"step {step:>{len(str(self.total))}}/{self.total}"]
        if "loss" in v:
            # The console shows the mean over the steps since the last line; the JSONL keeps each step's.
            parts.append(f"loss {v.get('loss_avg', v['loss']):.4f}")
            main, lm = v.get("lm_loss_avg", v.get("lm_loss")), v.get("lm_loss")
            differ = lm is not None and lm != v["loss"] and not (math.isnan(lm) and math.isnan(v["loss"]))
            if main is not None and differ:  # MTP or auxiliary losses: the main head's too
                parts.append(f"main {main:.4f}")
        if "val_loss" in v:
            parts.append(f"val {v['val_loss']:.4f}")
        if "lr" in v:
            parts.append(f"lr {v['lr']:.2e}")
        if "grad_norm" in v:
            parts.append(f"gnorm {v['grad_norm']:.3f}")
        if "tokens_per_s" in v:
            parts.append(f"{_fmt_rate(v['tokens_per_s'])} tok/s")
        if "mfu" in v:
            parts.append(f"MFU {100 * v['mfu']:.1f}%")
        if "peak_mem_gb" in v:
            parts.append(f"mem {v['peak_mem_gb']:.2f}GB")
        if step < self.total:
            parts.append(f"eta {_fmt_time(self.eta(step))}")
        return " | ".join(parts)

    def history_all(self, until: int | None = None) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl (earlier, resumed parts of the run included), last write per step kept, up to
        step ``until``: a killed run's rows past the checkpoint that a resume ended at (train.steps lowered) are
        not this run's history."""
        rows: dict[tuple[int, bool], dict[str, Any]] = {}
        for row in read_history(self.run_dir / "metrics.jsonl"):
            if until is None or row["step"] <= until:
                rows[(row["step"], "loss" in row)] = row
        return sorted(rows.values(), key=lambda r: r["step"])

    def close(self) -> None:
        """Close the bar, metrics.jsonl and the TensorBoard writer, each also where one before it fails (a full
        disk fails the flushes of both files: the writer's thread stayed); a failure is raised after."""
        with contextlib.ExitStack() as stack:  # (its callbacks run last first)
            if self._tb is not None:
                stack.callback(written, self.run_dir / "tensorboard", self._tb.close)
            if self._jsonl is not None:
                stack.callback(self._jsonl.close)
            if self._bar is not None:
                stack.callback(self._close_bar)

    def _close_bar(self) -> None:
        with self._console():
            self._bar.close()


def repair_jsonl(path: Path) -> None:
    """Cut a torn last line (the process died mid-write) so that appends start on a line of their own; a last
    line that is a whole row, only its newline missing (written by another tool), gets the newline instead."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if data and not data.endswith(b"\n"):
        last = data[data.rfind(b"\n") + 1 :]
        try:
            whole = isinstance(json.loads(last), dict)
        except ValueError:
            whole = False
        if whole:
            with open(path, "ab") as f:
                f.write(b"\n")
            return
        logger.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - data.rfind(b"\n") - 1)
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; lines that are not JSON objects (torn writes) are skipped."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                logger.warning("%s:%d: skipping a line that is not a metrics row", path, number)
    return rows


def loss_unit(tokenizer: str) -> str:
    """The unit of a loss over ``data.tokenizer``'s tokens: a byte tokenizer's tokens are bytes."""
    return "nats/byte" if tokenizer == "byte" else "nats/token"


def plot_losses(history: list[dict[str, Any]], out: Path, unit: str = "nats/token") -> Path | None:
    """Training and validation loss against step, as a PNG. None when matplotlib is missing."""
    try:
        # A Figure of its own, not pyplot: matplotlib.use("Agg") switched the backend of the caller's whole process
        # (a notebook running the trainer lost its inline plots), and pyplot keeps every figure until closed.
        import matplotlib.figure
    except ImportError:
        logger.warning("matplotlib is not installed: no loss-curve PNG (pip install 'hybridlm[logging]')")
        return None
    # The validation loss is the main head's: the training curve beside it is too. The total (with
    # MTP depths and auxiliary losses), where it differs, is drawn apart.
    train = [(r["step"], r.get("lm_loss", r["loss"])) for r in history if "loss" in r]
    total = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig = matplotlib.figure.Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    dot = {"marker": "o", "markersize": 3} if len(train) == 1 else {}  # a line through one point is not drawn
    if train:
        ax.plot(*zip(*train), label="train (main head)", linewidth=1.2, **dot)
    if total != train:
        ax.plot(*zip(*total), "--", label="train, total (MTP, auxiliary)", linewidth=0.8, alpha=0.7, **dot)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.2, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({unit})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # Whole or not at all, and a full disk named (PIL's write error names no file).
    replace_file(out, lambda tmp: fig.savefig(tmp, format="png"))
    return out
