"""One exception hierarchy for everything asyncckpt raises.

Every message says what failed, where (key, file, rank, step) and what to do.
"""

from __future__ import annotations

__all__ = [
    "BadInputError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "DeleteRefusedError",
    "FormatError",
    "IntegrityError",
    "NotACheckpointError",
    "PermanentStorageError",
    "RemoteRankError",
    "StorageChecksumError",
    "StorageError",
    "StorageNotFoundError",
    "StorageOpTimeoutError",
    "StoragePermissionError",
    "StoragePreconditionError",
    "StorageTimeoutError",
    "TornSnapshotError",
    "TransientStorageError",
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
    """A storage backend failed (disk full, permission denied, S3 error, ...).

    ``retryable`` says whether repeating the same request may help: True for
    `TransientStorageError`, False for `PermanentStorageError`, None when unknown.
    """

    retryable: bool | None = None


class TransientStorageError(StorageError):
    """A failure a retry may cure: throttling, a 5xx reply, a broken connection, a timeout."""

    retryable = True


class PermanentStorageError(StorageError):
    """A failure the same request will hit again: bad credentials, a missing bucket, a rejected request."""

    retryable = False


class StorageTimeoutError(TransientStorageError, TimeoutError):
    """A storage call did not finish within the configured timeout."""


class StorageOpTimeoutError(StorageTimeoutError):
    """A whole storage call (its retries included) outran the backend's ``op_timeout``; not resumed."""


class StorageNotFoundError(PermanentStorageError, CheckpointNotFoundError):
    """A key (object, blob, file) does not exist in the store.

    Deprecated behaviour, kept for one release: it is also a `CheckpointNotFoundError`, which
    backends raised for a missing key before; catch `StorageNotFoundError` for a missing key.
    """


class StoragePermissionError(PermanentStorageError, PermissionError):
    """The store refused the credentials or the request's permissions (401/403, EACCES)."""


class StoragePreconditionError(PermanentStorageError):
    """A conditional request's precondition failed (the object exists, or changed meanwhile)."""


class StorageChecksumError(PermanentStorageError):
    """The store rejected the bytes' checksum: they were corrupted on the way; save again."""


class IntegrityError(CheckpointError):
    """Stored bytes do not match their checksum, or a file is truncated/extended."""


class FormatError(IntegrityError):
    """A manifest or commit record is malformed, of an unknown version, or inconsistent."""


class WorkerError(CheckpointError):
    """A routine raised inside the worker.

    The message ends with the worker-side frame in one line; ``worker_traceback`` holds the
    worker's full traceback and ``worker_exception`` the original exception when it could travel.
    """

    worker_traceback: str = ""
    worker_frame: str = ""
    worker_exception: BaseException | None = None


class RemoteRankError(CheckpointError):
    """Another rank's part of a request failed; this rank's part finished, but nothing is committed."""


class WorkerDiedError(CheckpointError):
    """The background worker process exited or was killed while requests were pending."""


class TornSnapshotError(CheckpointError):
    """The state changed in place while the worker was copying it; that save is never committed.

    ``keys`` names the tensors whose in-place version counter moved between ``save()`` and the
    worker's "snapshot done". Attach the optimizer/module that mutates the state (so its step
    waits for the snapshot), call ``wait_snapshot()`` before mutating, or use
    ``snapshot="blocking"``.
    """

    def __init__(self, message: str, keys: list[str] | None = None) -> None:
        super().__init__(message)
        self.keys = list(keys or [])

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0] if self.args else "", self.keys))


class NotACheckpointError(BadInputError):
    """A path holds something its own records do not prove to be a checkpoint (a plain directory,
    a file, other objects, records too damaged to read); nothing was read from it as a
    checkpoint, nothing was deleted. The message says what the path holds."""


class DeleteRefusedError(CheckpointError):
    """A delete was refused for safety: the checkpoint ``latest`` points to (or a root, meaning
    that checkpoint) without ``force=True`` / ``--force``. Nothing was deleted."""
