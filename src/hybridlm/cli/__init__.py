"""The ``hybridlm`` command line: parse arguments, call the library, print results. One module per
group of commands (``model``: pattern, plan; ``train``: train, prepare; ``generate``; ``chat``; ``serve``; ``evaluate``:
eval; ``checkpoints``: inspect, convert); this one builds the parser and turns errors into exit statuses.

Exit status: 0 on success; 2 on any error (a bad pattern, config value or checkpoint, a full
disk, ...), with a one-line message and no traceback unless ``--debug``; 128 + N when training
stopped on signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP) after saving a checkpoint; 128 + N, with
"interrupted", when another command stopped on one of them (a write in progress removed, ``generate``'s
rows so far printed, ``serve``'s open requests answered 503: a server's usual end); 141, quietly, when the
reader of standard output closed the pipe. A signal once a command has done its work (a training run
complete and saved) changes nothing: see :func:`ignore_stop_signals`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import USER_ERRORS, HybridLMError
from ..pattern import symbols


def _subcommands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from .chat import add_chat
    from .checkpoints import add_convert, add_inspect
    from .evaluate import add_eval
    from .generate import add_generate
    from .model import add_pattern, add_plan
    from .serve import add_serve
    from .train import add_prepare, add_tokenizer, add_train

    return [
        add_train,
        add_generate,
        add_chat,
        add_serve,
        add_eval,
        add_prepare,
        add_tokenizer,
        add_pattern,
        add_plan,
        add_inspect,
        add_convert,
    ]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hybridlm",
        description="Build, train, checkpoint and serve hybrid language models laid out by one pattern string.",
    )
    ap.add_argument("--version", action="version", version=f"hybridlm {_version()}")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _subcommands():
        register(sub)
    for command in sub.choices.values():  # so that a command's unknown flag gets its own usage lines
        command.set_defaults(command_parser=command)
    return ap


def _version() -> str:
    from .. import __version__

    return __version__


def model_folder(path: str | Path, flag: str) -> Path:
    """The hybridlm checkpoint that ``path`` (argument ``flag``) names: itself, or a run directory's exported
    ``model/``; UsageError for a run without one yet and for a training-state checkpoint, saying what to do."""
    from ..errors import UsageError
    from ..train.rundir import CHECKPOINTS, MODEL_DIR

    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / MODEL_DIR).is_dir():
        return path / MODEL_DIR  # a run directory: its exported model
    # Only here: safe_dcp imports torch.distributed.checkpoint (a second or more), which a model folder never needs.
    from ..checkpoint.safe_dcp import METADATA_NAME

    state = (path / METADATA_NAME).exists()
    # A training state names its run only inside the run's checkpoints/: elsewhere (copied out, or written by
    # save_training_state) the folder two levels up is no run, and "--resume" of it would be the wrong advice.
    run = None
    if (path / CHECKPOINTS).is_dir():
        run = path
    elif state and path.parent.name == CHECKPOINTS:
        run = path.parent.parent
    elif state and path.absolute().parent.name == CHECKPOINTS:  # "step-000100", named from inside checkpoints/
        run = path.absolute().parent.parent
    elif state:
        raise UsageError(
            f"{flag} {path} is a training-state checkpoint (DCP, not a model folder) outside a run's {CHECKPOINTS}/: "
            "load it with hybridlm.checkpoint.training_state.load_training_state and write the model with "
            "hybridlm.save, or resume the run it came from (hybridlm train --resume RUN exports RUN/model)"
        )
    if run is not None:
        what = (
            "a training run without an exported model yet"
            if run == path
            else f"a training-state checkpoint of the run {run} (DCP, not a model folder)"
        )
        raise UsageError(
            f"{flag} {path} is {what}; the run exports its model to {run / MODEL_DIR} when it reaches train.steps "
            f"(hybridlm train --resume {run} finishes it, a pipelined run under torchrun as it started or in one "
            "process with --set parallel.pp=1; --set train.steps=N with N the latest checkpoint's step exports that "
            "checkpoint as it is)"
        )
    return path


def model_tokenizer(path: Path, config, spec: str | None, eos_token: str):
    """The tokenizer to read model folder ``path`` (its ``config``) with, and how errors name it: ``--tokenizer spec``
    ('byte' or a tokenizer.json), or where ``spec`` is None the folder's own; ``--eos-token`` replaces the saved
    end-of-document token. UsageError for a tokenizer with ids past the model's vocabulary: the model was not
    trained with it."""
    from ..errors import UsageError
    from ..train.tokenizer import build_tokenizer, load_tokenizer

    tokenizer = (
        build_tokenizer(spec, key="--tokenizer", eos_token=eos_token, eos_key="--eos-token")
        if spec is not None  # ("" is refused by name, not taken for "the checkpoint's")
        else load_tokenizer(path, "--tokenizer", eos_token)
    )
    name = f"--tokenizer {spec}" if spec else f"the tokenizer in {path}"
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(
            f"{name} has {tokenizer.vocab_size} token ids (end of text {tokenizer.eos_id}), more than the model's "
            f"vocabulary of {config.vocab_size}: the model was not trained with this tokenizer"
        )
    return tokenizer, name


def model_options(ap: argparse.ArgumentParser) -> None:
    """CHECKPOINT, --device, --dtype, --tokenizer and --eos-token: how ``generate``, ``serve`` and ``eval`` read a
    model folder (:func:`model_folder`, :func:`device_option`, :func:`dtype_option`, :func:`model_tokenizer`)."""
    ap.add_argument("checkpoint", help="model directory, or a run directory (its model/ is used)")
    ap.add_argument(
        "--device", default="auto", help="auto (CUDA when available, else cpu), cpu, cuda or cuda:N (default: auto)"
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        help="parameter dtype: float32, bfloat16, float16 or float64 (default: auto, the checkpoint's; a training "
        "run saves float32: bfloat16 halves the memory and is faster on a GPU)",
    )
    ap.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the checkpoint's)")
    ap.add_argument(
        "--eos-token",
        default="auto",
        metavar="TOKEN",
        help="the tokenizer's end-of-document token (default: auto, the id the checkpoint saved, else the first "
        "of the usual names it holds; a folder converted from Hugging Face saved the eos_token_id its "
        "generation_config.json, else config.json, names)",
    )


def progress_flags(ap: argparse.ArgumentParser) -> None:
    """--progress / --no-progress; neither: a bar only on a terminal (not in a log file)."""
    bar = ap.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show a progress bar (default: only on a terminal)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")


def device_option(flag: str, value: str):
    """The ``torch.device`` named by option ``flag``: ``auto`` (CUDA when available, else the CPU), cpu, or
    cuda[:N] with CUDA here (UsageError otherwise)."""
    import torch

    from ..errors import UsageError

    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise UsageError(f"{flag} {value!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {value!r}: hybridlm runs on cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {value}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def dtype_option(flag: str, value: str):
    """The parameter ``torch.dtype`` named by option ``flag``, or None for ``auto`` (the checkpoint's own dtype);
    UsageError naming the flag otherwise."""
    from ..errors import UsageError
    from ..model import float_dtype

    if value == "auto":
        return None
    try:
        return float_dtype(value, flag)
    except ValueError as e:
        raise UsageError(str(e)) from None


#: Units of sizes (--max-shard-size, --prefix-cache-memory), as transformers' save_pretrained reads "5GB" (decimal)
#: and "5GiB" (binary).
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def byte_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912, ``"5e9"`` -> 5_000_000_000 (argparse type)."""
    import re

    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    try:
        size = float(match[1]) * _UNITS[match[2].lower()] if match else 0.0
    except (ValueError, KeyError):
        size = 0.0
    if not 1 <= size < float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes (5e9) or a number with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(size)


def binary_size(nbytes: float) -> str:
    """``3 * 2**20`` -> ``"3.00 MiB"``, ``1.9e9`` -> ``"1.77 GiB"``: the largest binary unit that keeps the number at
    least 1 (bytes below a KiB)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:,.2f} {unit}"
    return f"{nbytes:,.0f} bytes"


def one_line(message: str) -> str:
    """An error message on one line; a pattern quoted with a caret under it keeps its three lines."""
    # (a list's "- " bullets read as stray dashes once the lines are joined)
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    if any(set(line) == {"^"} for line in lines):
        return message
    out = lines[0] if lines else ""
    for prev, line in itertools.pairwise(lines):  # "…does not fit:" then its list: no ":;" between them
        out += (" " if prev.endswith(":") else "; ") + line
    return out


#: What gloo and NCCL say when a peer process of the job has died.
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL communicator was aborted",
    "remote process exited",
)


#: What torch's allocators say when a request cannot be met (CPU, CUDA).
_NO_MEMORY = ("can't allocate memory", "out of memory")


def say(line: str, file=None) -> None:
    """Print ``line`` (to stdout, or ``file``). A terminal that went away (a closed window, a dropped ssh
    session: SIGHUP, then EIO on every write), or a pipe's reader (the `tee` of `hybridlm train 2>&1 | tee log`,
    stopped by the same Ctrl-C: EPIPE), loses the line, not the command's exit status, which still says what
    happened (129 with the signal's checkpoint saved, 0 for a finished run); other errors raise."""
    try:
        print(line, file=file)
    except OSError as e:
        if e.errno not in (errno.EIO, errno.EPIPE):
            raise


def _error(e: BaseException) -> str:
    if isinstance(e, USER_ERRORS):
        return one_line(str(e))
    if isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_GONE):
        first = (str(e).splitlines() or [""])[0][:160]
        return (
            f"another process of this torchrun job stopped ({first}): its own error says why; if training had "
            "started, the checkpoints written so far are whole and the same torchrun command with --resume "
            "RUN_DIR continues the run"
        )
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _NO_MEMORY)):
        first = (str(e).splitlines() or [""])[0][:200]
        return (
            f"out of memory ({first or type(e).__name__}): a size is too large for this machine (the model's, "
            "train.batch_size, data.seq_len, or generate's --max-new-tokens and batch); make it smaller"
        )
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"no space left on device{where}: free some space, or write elsewhere, and retry"
        return f"{e.strerror or e}{where}"
    return one_line(f"unexpected {type(e).__name__}: {e} (this may be a bug in hybridlm; --debug shows the traceback)")


#: The commands whose operand is a layer pattern, and the characters a pattern is written with.
_PATTERN_COMMANDS = ("pattern", "plan")
_PATTERN_CHARS = frozenset(
    (*symbols.LAYER_SYMBOLS, symbols.PIPE, symbols.MTP_SEPARATOR, symbols.FUSION_START, symbols.FUSION_END)
)


def dash_pattern_operands(argv: Sequence[str]) -> list[str]:
    """``argv`` with a layer pattern that starts with ``-`` (an MLP first, ``-M-M``) moved after ``--``, so that
    argparse takes it for the pattern instead of an unknown option. No option of ``pattern`` or ``plan`` is
    written with pattern characters alone, nor takes such a value; a lone ``--`` keeps its usual meaning."""
    argv = list(argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is None or argv[command] not in _PATTERN_COMMANDS or "--" in argv[command:]:
        return argv
    dashed = [a for a in argv[command + 1 :] if len(a) > 1 and a != "--" and a[0] == "-" and set(a) <= _PATTERN_CHARS]
    if len(dashed) != 1:  # none, or several (argparse then says which it did not recognise)
        return argv
    rest = argv[command + 1 :]
    rest.remove(dashed[0])
    return [*argv[: command + 1], *rest, "--", dashed[0]]


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside training (whose own handlers save first): raised as SIGINT raises
    KeyboardInterrupt, so that a write in progress (``prepare``, ``convert``) removes its hidden temporary
    folder instead of the signal's default action killing the process and leaving it behind."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _stop_signals_raise():
    """While entered (on the main thread), SIGTERM and SIGHUP raise :class:`_Terminated` where they have their
    default action; a handler installed by others (or SIGHUP ignored under nohup) stays. At exit SIGINT, SIGTERM and
    SIGHUP get back the handlers they had, also where the command changed them (see :func:`ignore_stop_signals`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in (signal.SIGTERM, signal.SIGHUP):
        if previous[s] is signal.SIG_DFL:
            signal.signal(s, _terminate)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:  # (None: a handler installed from C, which Python cannot put back)
                signal.signal(s, handler)


def ignore_stop_signals() -> None:
    """From here on SIGINT, SIGTERM and SIGHUP are ignored: the command has done its work (a training run complete
    and saved) and its status is decided. A signal while it printed its summary said "interrupted" (exit 143), and
    one while the interpreter shut down (a second or so with torch loaded) killed the process (143) or raised
    KeyboardInterrupt into the shutdown (a traceback). Ignored, not handled: Python stops running handlers early in
    its shutdown, before the modules are torn down, and the default actions come back; an ignored signal stays
    ignored. Ctrl-\\ (SIGQUIT) or kill -9 still end a shutdown that hangs. :func:`main` puts the handlers back for
    its caller; :func:`entry` ignores them again until the process ends."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(dash_pattern_operands(sys.argv[1:] if argv is None else argv))
    if unknown:  # (parse_args would report them under the top-level usage, as "hybridlm: error")
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with _stop_signals_raise():
            return int(args.func(args) or 0)
    except _Terminated as e:
        say(f"interrupted by {signal.Signals(e.signum).name}", sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        say("interrupted", sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`hybridlm pattern ... | head`): stop quietly, as other CLI tools do;
        # stdout goes to /dev/null so that the interpreter's final flush cannot fail again (the descriptor opened
        # for it is closed once copied: main() may run many times in its caller's process).
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
        return 141
    except Exception as e:
        status = getattr(e, "exit_status", None)
        if isinstance(e, HybridLMError) and isinstance(status, int):
            # train.signals.TrainingInterrupted: a checkpoint was saved; the message (rank 0's) says how to resume.
            if str(e):
                say(str(e), sys.stderr)
            return status
        if args.debug:
            raise
        print(f"error: {_error(e)}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``hybridlm`` command (and ``python -m hybridlm.cli``).

    A process of a torchrun job leaves with ``os._exit`` once ``main`` returned: its ranks have
    met at a final barrier, so nothing is in flight, and skipping the interpreter's teardown
    skips gloo's (a finished run could otherwise end with SIGABRT on one rank, which torchrun
    reports as a failed job). Streams and logging are flushed first."""
    code = main()
    ignore_stop_signals()  # (main put back the handlers, for a caller in Python; here nothing follows)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)
