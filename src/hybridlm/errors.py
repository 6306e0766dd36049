"""Errors raised for bad user input (pure Python). The CLI prints them and exits with status 2."""

from __future__ import annotations

import os

from ._errors_base import HybridLMError
from .pattern.errors import PatternError

__all__ = [
    "USER_ERRORS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiskFullError",
    "HybridLMError",
    "NonFiniteLogitsError",
    "PatternError",
    "UnknownFieldError",
    "UsageError",
]


class ConfigError(HybridLMError, ValueError):
    """A configuration value is invalid. The message starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")

    def __reduce__(self):
        return (type(self), (self.field, str(self)[len(self.field) + 2 :]))


class UnknownFieldError(ConfigError, TypeError):
    """A configuration names a field that does not exist (a misspelling, another framework's name). A TypeError
    too, as Python's refusal of an unexpected keyword argument is: ``ModelConfig(moe_router_topk=2)`` raised that."""


class CheckpointError(HybridLMError, ValueError):
    """A checkpoint is missing, damaged, or does not match the model it is loaded into."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint is sound but holds another model than the one it is loaded into."""


class TrainingDivergedError(HybridLMError, RuntimeError):
    """Training stopped: the loss or gradient was not finite for too many steps in a row."""


class NonFiniteLogitsError(HybridLMError, RuntimeError):
    """Generation stopped: the model's logits for a token of prompt ``row`` (0-based) were NaN or inf (damaged
    weights, or an overflow). The message starts with ``where`` (default ``prompt <row>``)."""

    def __init__(self, row: int, message: str, where: str | None = None) -> None:
        self.row, self.message, self.where = row, message, where
        super().__init__(f"{where or f'prompt {row}'}: {message}")

    def __reduce__(self):
        return (type(self), (self.row, self.message, self.where))


class DiskFullError(HybridLMError, OSError):
    """A write of a training run failed for want of space (``errno`` ENOSPC, or EDQUOT: a quota), ``filename``
    the file. An OSError as the write's own was; the message says what the run kept and how to go on."""

    def __init__(self, errno: int, filename: str | None, message: str) -> None:
        super().__init__(message)
        self.errno, self.filename, self.strerror = errno, filename, os.strerror(errno)

    def __str__(self) -> str:  # the message (OSError's own would be "[Errno 28] ...: 'file'")
        return str(self.args[0])

    def __reduce__(self):
        return (type(self), (self.errno, self.filename, str(self)))


class DataError(HybridLMError, ValueError):
    """Training or evaluation data is missing or malformed."""


class UsageError(HybridLMError, ValueError):
    """A command-line request that cannot be carried out as asked."""


#: Errors the CLI reports as ``error: ...`` (exit status 2) rather than as a traceback.
USER_ERRORS = (
    PatternError,
    ConfigError,
    CheckpointError,
    DataError,
    DiskFullError,
    UsageError,
    TrainingDivergedError,
    NonFiniteLogitsError,
)
