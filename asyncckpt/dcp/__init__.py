"""torch.distributed.checkpoint (DCP) on asyncckpt's persistent worker.

- :class:`AsyncStorageWriter`: a DCP StorageWriter whose writes become an ``AsyncRequest``
  (``get_save_function_and_args``) executed by the persistent worker, which snapshots the
  tensors into its staging memory and writes DCP's files (local or S3) with CRC32C records.
- :func:`save_state_dict_async_plan` / :func:`save_state_dict_async_finalize`: DCP's planning
  now, ``.metadata`` on the coordinator after global completion.
- :func:`async_save`: the one-call helper (like ``dcp.async_save``), returning a handle.
- :class:`AsyncStorageReader`: parallel ranged reads with checksum verification, any
  asyncckpt storage backend; resharding N -> M ranks through DCP's planner.
- :class:`DcpCheckpointException`: what a failed save raises on every rank (DCP's
  ``CheckpointException`` and an asyncckpt ``CheckpointError``).

Both classes take ``FileSystemWriter`` / ``FileSystemReader``'s arguments (stream extensions
included), so swapping the class is the whole change.

Local checkpoints are read by plain ``torch.distributed.checkpoint.load`` too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._errors import DcpCheckpointException
    from .cache import CheckpointMetadataCache, get_metadata_caching_status, init_checkpoint_metadata_cache
    from .reader import AsyncStorageReader
    from .saver import (
        AsyncSaveHandle,
        AsyncSavePlan,
        async_save,
        close_async_saves,
        default_queue,
        finalize_async_saves,
        save_state_dict_async_finalize,
        save_state_dict_async_plan,
    )
    from .writer import AsyncStorageWriter

# Imported on first use: the worker process imports this package to unpickle its routines
# (asyncckpt.dcp._worker) and must not pay for importing torch.distributed.checkpoint.
_WHERE = {
    "CheckpointMetadataCache": "cache",
    "DcpCheckpointException": "_errors",
    "get_metadata_caching_status": "cache",
    "init_checkpoint_metadata_cache": "cache",
    "AsyncStorageReader": "reader",
    "AsyncStorageWriter": "writer",
    "AsyncSaveHandle": "saver",
    "AsyncSavePlan": "saver",
    "async_save": "saver",
    "close_async_saves": "saver",
    "default_queue": "saver",
    "finalize_async_saves": "saver",
    "save_state_dict_async_finalize": "saver",
    "save_state_dict_async_plan": "saver",
}

__all__ = [
    "AsyncSaveHandle",
    "AsyncSavePlan",
    "AsyncStorageReader",
    "AsyncStorageWriter",
    "CheckpointMetadataCache",
    "DcpCheckpointException",
    "async_save",
    "close_async_saves",
    "default_queue",
    "finalize_async_saves",
    "get_metadata_caching_status",
    "init_checkpoint_metadata_cache",
    "save_state_dict_async_finalize",
    "save_state_dict_async_plan",
]


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
