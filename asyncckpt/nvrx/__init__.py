"""A drop-in for ``nvidia_resiliency_ext.checkpointing.async_ckpt`` on asyncckpt's engine.

Replace the import prefix and nothing else::

    # from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue, AsyncRequest
    from asyncckpt.nvrx.core import AsyncCallsQueue, AsyncRequest

The modules mirror NVRx's: :mod:`~asyncckpt.nvrx.core`, :mod:`~asyncckpt.nvrx.torch_ckpt`,
:mod:`~asyncckpt.nvrx.state_dict_saver`, :mod:`~asyncckpt.nvrx.filesystem_async`,
:mod:`~asyncckpt.nvrx.cached_metadata_filesystem_reader`. Their main names are also here.
docs/migrating-from-nvrx.md lists every name and what it does on asyncckpt.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AsyncCallsQueue": "core",
    "AsyncRequest": "core",
    "abort_nvrx_checkpoint": "core",
    "TorchAsyncCheckpoint": "torch_ckpt",
    "save_state_dict_async_plan": "state_dict_saver",
    "save_state_dict_async_finalize": "state_dict_saver",
    "CheckpointMetadataCache": "state_dict_saver",
    "init_checkpoint_metadata_cache": "state_dict_saver",
    "FileSystemWriterAsync": "filesystem_async",
    "CachedMetadataFileSystemReader": "cached_metadata_filesystem_reader",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
