"""asyncckpt: checkpointing that costs the PyTorch training loop (almost) nothing."""

from __future__ import annotations

from .checkpointer import AsyncCheckpointer, SaveHandle
from .deletion import DeleteReport, delete
from .errors import (
    BadInputError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    DeleteRefusedError,
    FormatError,
    IntegrityError,
    NotACheckpointError,
    PermanentStorageError,
    RemoteRankError,
    StorageChecksumError,
    StorageError,
    StorageNotFoundError,
    StorageOpTimeoutError,
    StoragePermissionError,
    StoragePreconditionError,
    StorageTimeoutError,
    TornSnapshotError,
    TransientStorageError,
    WorkerDiedError,
    WorkerError,
)
from .listing import CheckpointInfo, list_checkpoints
from .load import load
from .logs import enable_logging
from .manager import CheckpointManager
from .preemption import request_pause
from .queue import AsyncCallsQueue, AsyncRequest
from .retention import RetentionPolicy, prune
from .rng import ResumableSampler
from .tiers import TieredPath, Tiers
from .torch_save import TorchAsyncCheckpoint

__version__ = "0.1.0"

__all__ = [
    "AsyncCallsQueue",
    "AsyncCheckpointer",
    "AsyncRequest",
    "BadInputError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "DeleteRefusedError",
    "DeleteReport",
    "FormatError",
    "IntegrityError",
    "NotACheckpointError",
    "PermanentStorageError",
    "RemoteRankError",
    "ResumableSampler",
    "RetentionPolicy",
    "SaveHandle",
    "StorageChecksumError",
    "StorageError",
    "StorageNotFoundError",
    "StorageOpTimeoutError",
    "StoragePermissionError",
    "StoragePreconditionError",
    "StorageTimeoutError",
    "TieredPath",
    "Tiers",
    "TorchAsyncCheckpoint",
    "TornSnapshotError",
    "TransientStorageError",
    "WorkerDiedError",
    "WorkerError",
    "delete",
    "enable_logging",
    "list_checkpoints",
    "load",
    "prune",
    "request_pause",
]
