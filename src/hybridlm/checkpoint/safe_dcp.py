"""Reading DCP training-state folders without running code from them ("What is safe to open", docs/checkpoints.md).

DCP pickles its ``.metadata`` and loads non-tensor entries with ``torch.load(weights_only=False)``:
here the metadata is unpickled with an allow-list of the classes it is made of, and a load planner
refuses every non-tensor entry. What hybridlm needs besides tensors is JSON beside the DCP files.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from ..errors import CheckpointError
from .io import regular, unavailable

METADATA_NAME = ".metadata"

#: The names a DCP ``.metadata`` pickle may use, by module (besides torch dtypes). Constructing any
#: of them runs no user-controlled code: dataclasses, enums, torch.Size, dtypes and paths.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": "Metadata MetadataIndex StorageMeta TensorProperties "
    "TensorStorageMetadata BytesStorageMetadata ChunkStorageMetadata _MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem": "_StorageInfo",
    "torch.serialization": "_get_layout",  # looks a torch.layout up by name
    "torch": "Size",
    "pathlib": "PosixPath PurePosixPath WindowsPath PureWindowsPath",
    "builtins": "set frozenset",
    "collections": "OrderedDict",
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or name in _ALLOWED.get(module, "").split():
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"'{module}.{name}' is not part of DCP metadata")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """The DCP ``Metadata`` of folder ``path``, unpickled with the allow-list above.

    Raises:
        CheckpointError: a missing or damaged file, or a crafted one naming anything else (named); a data
            file it names missing or too short for it (:func:`_check_data_files`).
    """
    file = regular(Path(path) / METADATA_NAME)
    try:
        with open(file, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a training-state directory (no DCP {METADATA_NAME})") from None
    except OSError as e:
        if unavailable(e):
            raise
        raise CheckpointError(f"{file}: unreadable ({e.strerror})") from None
    except Exception as e:  # any unpickling failure: damaged or crafted
        raise CheckpointError(f"{file}: refused ({type(e).__name__}: {e})") from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise CheckpointError(f"{file}: not DCP metadata")
    # Allowed classes in the wrong places (an int for a name, a string for a size, a list of storage entries) failed
    # in inspect and a load's own checks with AttributeError: what is read before DCP's load must be as DCP writes it.
    odd = [repr(k) for k, v in meta.state_dict_metadata.items() if not isinstance(k, str) or not _entry(v)]
    if odd or not isinstance(meta.storage_data, (dict, type(None))):
        raise CheckpointError(f"{file}: not DCP metadata (malformed {f'entry {odd[0]}' if odd else 'storage map'})")
    ends: dict[str, int] = {}  # each data file -> the end of its last entry
    for info in (meta.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
            raise CheckpointError(f"{file}: a storage entry points outside the folder ({rel!r})")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{file}: storage transforms are not supported ({info.transform_descriptors!r})")
        span = getattr(info, "offset", None), getattr(info, "length", None)
        if not all(type(n) is int and n >= 0 for n in span):
            raise CheckpointError(f"{file}: a storage entry of {rel} has no byte range ({span!r})")
        ends[rel] = max(ends.get(rel, 0), sum(span))
    _check_data_files(Path(path), ends)
    return meta


def _entry(value: object) -> bool:
    """Whether ``value`` is a state-dict entry as DCP writes one: bytes, or a tensor of a ``torch.Size``."""
    return isinstance(value, BytesStorageMetadata) or isinstance(getattr(value, "size", None), torch.Size)


def _check_data_files(path: Path, ends: dict[str, int]) -> None:
    """Refuse a folder whose data files cannot hold what its metadata says (name -> bytes ``ends``): one missing,
    not a regular file, or shorter (a truncated copy). Checked before a load writes into a live model: DCP fills
    its tensors in place, and one that failed half-way left them half-loaded. Only sizes can be checked: DCP
    stores no checksums, so a flipped bit inside tensor data loads unnoticed."""
    problems = []
    for name, end in sorted(ends.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is {'not a regular file' if file.exists() else 'missing'}")
        elif (size := file.stat().st_size) < end:
            problems.append(f"{name} holds {size:,} of {end:,} bytes")
    if problems:
        raise CheckpointError(f"{path}: a damaged training state: {'; '.join(problems)}")


class SafeFileSystemReader(FileSystemReader):
    """A :class:`FileSystemReader` that reads ``.metadata`` with :func:`read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank DCP metadata is not supported")
        meta = read_dcp_metadata(self.path)
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Refuses to unpickle non-tensor entries (DCP would use ``torch.load(weights_only=False)``)."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(
            f"entry {read_item.dest_index.fqn!r} is stored as a pickled object, which hybridlm never loads"
        )
