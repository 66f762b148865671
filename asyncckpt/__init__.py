"""asyncckpt: checkpointing that costs the PyTorch training loop (almost) nothing."""

from __future__ import annotations

from .checkpointer import AsyncCheckpointer, SaveHandle
from .errors import (
    BadInputError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    StorageError,
    StorageTimeoutError,
    WorkerDiedError,
    WorkerError,
)
from .load import load
from .queue import AsyncCallsQueue, AsyncRequest, RemoteRankError
from .torch_save import TorchAsyncCheckpoint

__version__ = "0.1.0"

__all__ = [
    "AsyncCallsQueue",
    "AsyncCheckpointer",
    "AsyncRequest",
    "BadInputError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "FormatError",
    "IntegrityError",
    "RemoteRankError",
    "SaveHandle",
    "StorageError",
    "StorageTimeoutError",
    "TorchAsyncCheckpoint",
    "WorkerDiedError",
    "WorkerError",
    "load",
]
