"""Checkpoint I/O that every format shares, each job written once: atomic writes (durable, with the
permissions of a plain ``mkdir`` / ``open``, so others on a shared cluster can read a checkpoint),
safetensors in Hugging Face's layout (one file, or shards plus an index), and the one
missing / unexpected / mis-shaped check. docs/checkpoints.md describes the formats.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import numbers
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

logger = logging.getLogger("hybridlm.checkpoint")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # bytes, as Hugging Face's save_pretrained
MAX_LISTED = 20  #: names listed per kind of problem before "..."


# -- atomic writes ---------------------------------------------------------------------------------


def fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk; a refusal (EIO, ENOSPC) names it (``os.fsync`` names no file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read from /proc where possible (``os.umask`` can only read it by changing it)."""
    try:
        return int(
            next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:")).split()[1], 8
        )
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def publish(file: Path) -> None:
    """Give ``file`` the mode of a plain ``open()`` (safetensors and tempfiles write 0o600), flushed to disk."""
    os.chmod(file, 0o666 & ~umask())
    fsync(file)


def hidden(path: Path, kind: str) -> Path:
    """A fresh hidden name beside ``path`` for it while it is being written (``kind`` "tmp") or deleted ("old",
    "del"): ``.NAME.KIND-ID``, which :func:`remove_leftovers` knows."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def remove_directory(path: Path) -> None:
    """Delete ``path`` so that it vanishes at once: renamed to a hidden ``.name.del-<id>`` first (one
    atomic step), then removed. A crash mid-way leaves only the hidden folder, never a visible half
    (a listing would otherwise show a checkpoint that no longer loads)."""
    gone = hidden(path, "del")
    try:
        os.replace(path, gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


#: The hidden names of an unfinished write: ``.NAME.tmp-ID`` (being written), ``.NAME.old-ID`` / ``.NAME.del-ID``
#: (being deleted) and ``.NAME.tmp`` (a training state, one name for every rank). A kill leaves them behind.
_LEFTOVER = re.compile(r"\..+\.(?:(?:tmp|old|del)-[0-9a-f]{8}|tmp)")
_OLD = re.compile(r"\.(.+)\.old-[0-9a-f]{8}")


def remove_leftovers(folder: Path) -> list[str]:
    """Delete the leftovers of interrupted writes in ``folder`` (only while no write can be running there,
    e.g. under a run's lock); returns the names of those it removed (one it could not stays, unnamed).

    A ``.NAME.old-ID`` whose NAME is gone is put back first: a kill between :func:`commit_directory`'s two renames
    (where the system cannot swap in one step) left the previous folder, whole, only there."""
    names = sorted(p.name for p in folder.glob(".*") if _LEFTOVER.fullmatch(p.name)) if folder.is_dir() else []
    for name in names:
        if (old := _OLD.fullmatch(name)) and not os.path.lexists(folder / old[1]):
            os.replace(folder / name, folder / old[1])
            logger.warning(
                "%s: put back %s, which a write interrupted between two renames left as %s", folder, old[1], name
            )
    names = [name for name in names if os.path.lexists(folder / name)]
    for name in names:
        if (folder / name).is_dir() and not (folder / name).is_symlink():  # (rmtree refuses a link, silently here)
            shutil.rmtree(folder / name, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # (a leftover it may not remove is only taking room)
                (folder / name).unlink(missing_ok=True)
    return [name for name in names if not os.path.lexists(folder / name)]


#: Read errors that come from outside the file (its permissions, a network mount that dropped, a process out of
#: memory or descriptors), not from damage: a resume that took them for a damaged checkpoint fell back to an older
#: one and moved this one aside. EIO is among them: on a network file system it is often transient.
_NOT_DAMAGE = frozenset({
    errno.EACCES, errno.EPERM, errno.EIO, errno.ENOMEM, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EMFILE,
    errno.ENFILE,
})  # fmt: skip


def unavailable(e: BaseException) -> bool:
    """True for a failed read that says nothing about the file's content (an OSError of :data:`_NOT_DAMAGE`, memory
    running out): raised as it is, never as a CheckpointError, which a resume takes for a damaged checkpoint."""
    if isinstance(e, OSError):
        return e.errno in _NOT_DAMAGE
    return isinstance(e, (MemoryError, torch.OutOfMemoryError))


def regular(file: Path) -> Path:
    """``file``, unless it exists as something other than a regular file: a FIFO or a device would block the
    read, a folder fail obscurely (CheckpointError)."""
    if file.exists() and not file.is_file():
        raise CheckpointError(f"{file}: not a regular file")
    return file


def read_json(file: Path, missing: str) -> dict[str, Any]:
    """The JSON object in ``file``; CheckpointError ``missing`` when absent, naming the file when unreadable."""
    regular(file)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(missing) from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nesting deeper than json parses
        if unavailable(e):
            raise
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def peek_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``, or {} where there is none to read (absent, a FIFO or a folder, not JSON, not an
    object): for a look that decides nothing alone (what to name, whether a folder may be replaced)."""
    try:  # (regular's CheckpointError is a ValueError)
        data = json.loads(regular(file).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def check_format(data: Mapping[str, Any], file: Path, kind: str, format: str, version: int) -> None:
    """Refuse JSON ``data`` from ``file`` unless it is a ``kind`` (key ``format``) of at most ``version``."""
    if data.get("format") != format:
        raise CheckpointError(f"{file}: not a {kind}")
    v = data.get("format_version")
    if type(v) is not int or v < 1:
        raise CheckpointError(f"{file}: format_version must be a positive integer, got {v!r}")
    if v > version:
        raise CheckpointError(f"{file}: format_version {v} is newer than this hybridlm reads ({version})")


def destination(path: str | Path, source: str | Path | None = None) -> Path:
    """Where a directory at ``path`` is written: through symbolic links (the link keeps pointing at the
    new folder), and never the current directory, a conversion's ``source``, or a folder holding either
    (the swap would pull the one away, and delete the other)."""
    real = resolved(path)
    if Path.cwd().resolve().is_relative_to(real):
        raise CheckpointError(f"{path}: is the current directory or holds it; write from outside it, or elsewhere")
    if source is not None and Path(source).resolve().is_relative_to(real):
        raise CheckpointError(f"{path}: is the source {source} or holds it, which writing there would delete")
    return real


def resolved(path: str | Path) -> Path:
    """``path`` with its links resolved; CheckpointError for a link loop, or a file where a folder must be."""
    with errors_at(f"{path}: cannot resolve it", RuntimeError, OSError):  # a link loop: RuntimeError before 3.13
        real = Path(path).resolve()
    if file := next((p for p in real.parents if p.exists() and not p.is_dir()), None):
        raise CheckpointError(f"{path}: {file} is a file, not a folder")
    return real


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    C library or the file system cannot (the caller then renames twice)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def commit_directory(tmp: Path, path: Path, check: Callable[[], None] = lambda: None) -> Path:
    """Flush ``tmp``'s files to disk, ``check()`` (which may refuse), then put ``tmp`` at ``path`` (a
    :func:`destination`). An existing ``path`` is swapped with ``tmp`` in one step, so that every moment
    has a whole folder there (two renames where the system cannot swap), and deleted after."""
    for f in tmp.iterdir():
        if f.is_file():
            publish(f)
    fsync(tmp)
    check()
    if path.is_dir() and _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
    else:
        old = hidden(path, "old")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync(path.parent)
    return path


def check_replaceable(path: Path, key: str, value: Any, what: str, file: str = CONFIG_NAME) -> None:
    """Refuse (CheckpointError) unless ``path`` is absent, an empty directory, or one whose JSON ``file``
    has ``key: value`` (``what`` names the kind of directory it must be)."""
    if not path.exists():
        return
    try:  # (``value`` is never None: a file without ``key`` is another kind)
        same = not any(path.iterdir()) or peek_json(path / file).get(key) == value
    except OSError:  # a file
        same = False
    if not same:
        raise CheckpointError(f"{path} exists and is not {what}; refusing to replace it")


def refuse_losing(path: Path, replaced: set[str], pattern: str = "", hint: str = "") -> None:
    """Refuse (CheckpointError, naming them) to replace folder ``path`` while it holds files other than the
    ``replaced`` names and those matching glob ``pattern``: they would be deleted with the old folder."""
    lost = sorted(f.name for f in path.glob("*") if f.name not in replaced and not (pattern and f.match(pattern)))
    if lost:
        raise CheckpointError(
            f"{path}: replacing it would delete {', '.join(lost)}, which this write does not put back; move "
            f"them out {hint + ' ' if hint else ''}or write to another folder"
        )


def refuse_losing_checkpoint(path: Path, extra_names: set[str]) -> None:
    """:func:`refuse_losing` for a checkpoint folder rewritten with its weights (``model.safetensors`` or
    ``model-*-of-*.safetensors``; another safetensors file there, an adapter's, is not ours), config.json, index
    and the ``extra_names`` files (a tokenizer's)."""
    replaced = extra_names | {CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME}
    refuse_losing(path, replaced, "model-*-of-*.safetensors", "(or pass them as extra files)")


def check_shard_size(max_shard_size: object) -> None:
    """Refuse (CheckpointError) a ``max_shard_size`` that is not a positive number of bytes: the writers call it
    before gathering or reading any weights."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, numbers.Real) or not max_shard_size > 0:
        # A "5GB" (as transformers' save_pretrained takes) failed inside the sharding: "'>' not supported between
        # instances of 'int' and 'str'".
        raise CheckpointError(f"max_shard_size must be a positive number of bytes, such as 5e9; got {max_shard_size!r}")


def write_directory(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    key: str,
    what: str,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    extra_files: Mapping[str, str | bytes | Path] | None = None,
    checksums: str | None = None,
) -> Path:
    """Write ``tensors`` (see :func:`write_safetensors`), ``config`` as config.json (with each file's SHA-256 under
    key ``checksums``) and ``extra_files`` (name -> text, bytes or a file to copy) into a fresh directory, then
    rename it to ``path``. An existing ``path`` is replaced only if empty or its config.json has ``config``'s
    ``key`` value (else CheckpointError: ``what`` names the kind it must be), checked before and after writing.
    """
    check_shard_size(max_shard_size)
    path = destination(path)
    for name in extra_files or ():  # ours to write (weights, index, config.json), or outside the folder
        if Path(name).name != name or name in ("", ".", "..", CONFIG_NAME, INDEX_NAME) or name.endswith(".safetensors"):
            raise CheckpointError(f"extra file {name!r}: must be a file name other than the weights' and {CONFIG_NAME}")
    tmp = hidden(path, "tmp")

    def check() -> None:
        check_replaceable(path, key, config[key], what)
        # Weights, index and config.json are replaced; a tokenizer or a README is not ours to delete.
        refuse_losing_checkpoint(path, {f.name for f in tmp.iterdir()} if tmp.is_dir() else set(extra_files or ()))

    check()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(tmp)  # 0o777 & ~umask (tempfile.mkdtemp would give 0o700)
    try:
        write_safetensors(tmp, tensors, max_shard_size)
        if checksums:
            config = config | {checksums: {f.name: file_sha256(f) for f in sorted(tmp.glob("*.safetensors"))}}
        written(tmp / CONFIG_NAME, (tmp / CONFIG_NAME).write_text, json.dumps(config, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            content = content.read_bytes() if isinstance(content, Path) else content
            data = content.encode() if isinstance(content, str) else content
            written(tmp / name, (tmp / name).write_bytes, data)
        return commit_directory(tmp, path, check)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_file(path: Path, write: Callable[[Path], None], *more: tuple[Path, Callable[[Path], None]]) -> None:
    """``write(tmp)`` beside ``path`` (and each ``more`` file's), flush them to disk, then rename each over its
    path in order: never half-written, and a failed write leaves every file as it was. A path that is a
    symbolic link is written through it (the link stays), as :func:`destination` does for folders."""
    if folder := next((f for f in (path, *(f for f, _ in more)) if resolved(f).is_dir()), None):
        raise CheckpointError(f"{folder}: a folder, where a file is written; move it, or write elsewhere")
    tmps: dict[Path, Path] = {}
    try:
        for file, writer in ((path, write), *more):
            file = resolved(file)
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmps[file] = hidden(file, "tmp")
            written(file, writer, tmp)
            publish(tmp)
        for file, tmp in tmps.items():
            os.replace(tmp, file)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def written(file: Path, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``write(*args, **kwargs)``, which writes ``file``. A refused write becomes an error naming ``file``:
    Python's own OSError from a write (ENOSPC) names no file; safetensors raises no OSError, only the system's
    error number in its message (both become an OSError naming ``file``: the CLI then says "no space left on
    device"); torch.save's stream writer ("unexpected pos") and numpy's ``tofile`` ("N requested and M written",
    an OSError without a number) say nothing of why (a CheckpointError naming ``file``). Any other error is raised
    as it is."""
    short = r"unexpected pos|PytorchStreamWriter failed|\d+ requested and \d+ written"
    try:
        write(*args, **kwargs)
    except Exception as e:
        if isinstance(e, OSError) and e.errno is not None:
            if e.filename is None:
                e.filename = str(file)
            raise
        if code := re.search(r"os error (\d+)", str(e)):
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from e
        if re.search(short, str(e)):
            reason = next((line for line in str(e).splitlines() if line.strip()), "")[:200]
            raise CheckpointError(f"{file}: cannot write it, is the disk full? ({reason})") from e
        raise


# -- safetensors -----------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(regular(path), "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): gather the shards
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> None:
    """Write contiguous CPU ``tensors`` (see :func:`full_cpu`) into ``directory``: ``model.safetensors``,
    or numbered shards of at most ``max_shard_size`` bytes plus an index, as Hugging Face does."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        if shards[-1] and size + tensors[name].nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for name, shard in zip(names, shards):
        written(directory / name, save_file, shard, directory / name, metadata={"format": "pt"})
    if n > 1:  # the names are sorted, so the weight map is too
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        written(directory / INDEX_NAME, (directory / INDEX_NAME).write_text, json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """``safetensors.safe_open(file)`` for torch; a failure to read it is a CheckpointError naming the file."""
    from safetensors import safe_open

    regular(file)
    try:
        with open(file, "rb"):  # safetensors calls every failure to open "No such file": the OS's reason first
            pass
        with safe_open(file, framework="pt") as f:
            yield f
    except CheckpointError:
        raise
    except Exception as e:
        if unavailable(e):
            raise
        raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None


def load_safetensors(file: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (default: all) of safetensors ``file``, on the CPU."""
    with open_safetensors(file) as f:
        missing = sorted(set(names or ()) - set(f.keys()))
        if missing:
            raise CheckpointError(f"{file}: tensor {missing[0]} listed in the index is not in the file")
        return {k: f.get_tensor(k) for k in (f.keys() if names is None else names)}


def weight_files(path: str | Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, for the directory ``path`` (its index, or its one file)."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        weight_map = read_json(index, f"{index}: missing").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is not a JSON object")
        for name in set(weight_map.values()):  # a bare *.safetensors name: a file inside the checkpoint folder
            bare = isinstance(name, str) and Path(name).name == name and "\\" not in name
            if not (bare and name.endswith(".safetensors")):
                raise CheckpointError(
                    f"{index}: shard {name!r} is not a .safetensors file inside the checkpoint folder"
                )
            if not (path / name).exists():
                raise CheckpointError(f"{path}: shard {name} listed in {INDEX_NAME} is missing")
        return dict(weight_map)
    if not (path / WEIGHTS_NAME).exists():
        hint = ""
        pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))  # an older Hugging Face folder's weights
        if pickled:
            hint = (
                f" ({pickled[0]}{' ...' * (len(pickled) > 1)} is a pickle, which is not read: write the model with "
                "safetensors first, transformers' `AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(NEW)`)"
            )
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} and no {INDEX_NAME}{hint}")
    with open_safetensors(path / WEIGHTS_NAME) as f:
        return dict.fromkeys(f.keys(), WEIGHTS_NAME)


# -- checking --------------------------------------------------------------------------------------


def listed(names: Sequence[str]) -> str:
    """``names`` joined by commas, the first :data:`MAX_LISTED` of them, then " ..." where there are more."""
    return ", ".join(names[:MAX_LISTED]) + (" ..." if len(names) > MAX_LISTED else "")


def refuse_problems(what: str, problems: Sequence[str]) -> None:
    """Raise CheckpointError ``what`` (where, and what was refused) with each of ``problems`` on a line of its own,
    if there are any: a refusal lists every reason at once, not the first."""
    if problems:
        raise CheckpointError(f"{what}:\n  - " + "\n  - ".join(problems))


@contextlib.contextmanager
def errors_at(where: object, *kinds: type[Exception]) -> Iterator[None]:
    """Re-raise an error of ``kinds`` (default: CheckpointError) from inside as a CheckpointError that starts with
    ``where``: the caller knows which file or folder was read, the code it calls does not."""
    kinds = kinds or (CheckpointError,)
    try:
        yield
    except kinds as e:
        raise CheckpointError(f"{where}: {e}") from None


def fit_problems(
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str = "checkpoint",
    show: Callable[[str], str] = str,
    wrong_shape: str = "{name}: {source} has {got}, expected {want}",
    counted: bool = True,
) -> list[str]:
    """Every way the name -> shape map ``shapes`` (read from ``source``) differs from ``expected``, a line
    per kind, at most :data:`MAX_LISTED` names each (with their number when ``counted``). ``show`` writes
    a name (e.g. where it was read from); ``wrong_shape`` is the line of a mis-shaped tensor."""
    problems = []
    for what, names in (
        ("missing tensors", [show(k) for k in expected if k not in shapes]),
        ("unexpected tensors", [show(k) for k in sorted(shapes) if k not in expected]),
    ):
        if names:
            more = f" ... ({len(names)} in all)" if len(names) > MAX_LISTED else ""
            problems.append(f"{what}{f' ({len(names)})' if counted else ''}: " + ", ".join(names[:MAX_LISTED]) + more)
    wrong = [
        wrong_shape.format(name=show(k), source=source, got=tuple(shapes[k]), want=tuple(s))
        for k, s in expected.items()
        if k in shapes and tuple(shapes[k]) != tuple(s)
    ]
    more = [f"... ({len(wrong)} in all)"] if len(wrong) > MAX_LISTED else []
    return problems + (["shape mismatches:\n    " + "\n    ".join(wrong[:MAX_LISTED] + more)] if wrong else [])


def check_fit(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str, hint: str = "", **kw
) -> None:
    """Refuse ``tensors`` unless its names and shapes are exactly ``expected`` and all are floating point
    (:func:`not_floating`), listing every problem."""
    problems = fit_problems({k: tuple(t.shape) for k, t in tensors.items()}, expected, source=source, **kw)
    if problems := problems + not_floating(tensors):
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems) + hint)


def refuse_meta(tensors: Mapping[str, Any], doing: str, error: Callable[[str], Exception] = CheckpointError) -> None:
    """Refuse (``error``) ``tensors`` (name -> tensor) of which some are on the meta device, naming them: they have
    shapes and no values, and torch fails far from the cause (saving: "Cannot copy out of meta tensor", naming none)
    or, copying into one, keeps nothing (loading: a no-op with a warning). ``doing`` says what could not be done, as
    the caller puts it ("cannot save the weights")."""
    meta = [k for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_meta]
    if not meta:
        return
    # A model built on meta: its first name says enough.
    names = f"all {len(meta)} of them: {meta[0]}, ..." if len(meta) == len(tensors) > 1 else listed(meta)
    raise error(
        f"{doing}: tensors on the meta device, without values ({names}); allocate the model with "
        "model.to_empty(device=...), then give it values with model.init_weights() or by loading weights into it"
    )


def not_floating(tensors: Mapping[str, Any]) -> list[str]:
    """The problem line naming the tensors of ``tensors`` that are not floating point, if any: weights are, and an
    integer one would be cast into the model without a word."""
    odd = [f"{k} ({t.dtype})" for k, t in tensors.items() if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    return ["not floating point: " + listed(odd)] if odd else []


def dominant_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype holding the most elements (float32 when there is none)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def meta_shapes(config, source: object = "the model config") -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor of a model with ``config`` (built on the meta device); a tensor past
    torch's sizes (an edited hidden_size=10**12) is a CheckpointError naming ``source``, where the config was read."""
    from ..model import HybridLM
    from .canonical import to_canonical

    try:
        state = HybridLM(config, device="meta").state_dict()
    except RuntimeError as e:  # "Storage size calculation overflowed", from inside nn.Linear
        raise CheckpointError(f"{source}: describes a tensor larger than torch can hold ({e})") from None
    return {k: tuple(v.shape) for k, v in to_canonical(state, config.parsed).items()}
