"""One exception hierarchy for everything asyncckpt raises.

Every message says what failed, where (key, file, rank, step) and what to do.
"""

from __future__ import annotations

__all__ = [
    "BadInputError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "FormatError",
    "IntegrityError",
    "StorageError",
    "StorageTimeoutError",
    "WorkerDiedError",
    "WorkerError",
]


class CheckpointError(Exception):
    """Base class of every error asyncckpt raises."""


class BadInputError(CheckpointError, ValueError):
    """The caller passed something asyncckpt cannot save or load (raised before anything is written)."""


class CheckpointExistsError(BadInputError):
    """A save targets a checkpoint that already exists and overwrite was not asked for."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No complete checkpoint exists at the given path."""


class StorageError(CheckpointError, OSError):
    """A storage backend failed (disk full, permission denied, S3 error, ...)."""


class StorageTimeoutError(StorageError, TimeoutError):
    """A storage call did not finish within the configured timeout."""


class IntegrityError(CheckpointError):
    """Stored bytes do not match their checksum, or a file is truncated/extended."""


class FormatError(IntegrityError):
    """A manifest or commit record is malformed, of an unknown version, or inconsistent."""


class WorkerError(CheckpointError):
    """The checkpoint routine raised inside the worker; the worker's traceback is in the message."""


class WorkerDiedError(CheckpointError):
    """The background worker process exited or was killed while requests were pending."""
