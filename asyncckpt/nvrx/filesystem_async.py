"""``nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async`` on asyncckpt's DCP path.

:class:`FileSystemWriterAsync` is a ``FileSystemWriter`` (``isinstance`` checks hold) whose
writes run on asyncckpt's worker: it is :class:`~asyncckpt.dcp.AsyncStorageWriter` with NVRx's
constructor. ``get_save_function_and_args()`` returns ``(save_fn, preload_fn, args)`` for an
``AsyncRequest`` (``(None, None, [])`` when the rank has nothing to write);
``retrieve_write_results()`` returns the rank's ``WriteResult``\\ s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from torch.distributed.checkpoint import FileSystemWriter

from ..dcp.writer import AsyncStorageWriter, DcpPlanData
from ..errors import BadInputError

__all__ = ["ConsistentDataIdentifier", "FileSystemWriterAsync", "WriteBucket", "get_write_results_queue"]

WriteBucket = tuple[str, str, tuple[list[Any], list[Any]]]  # NVRx's name for one file's writes

_NOT_HERE = ("is NVRx's worker-side routine; asyncckpt's worker snapshots and writes the data itself. Schedule "
             "writer.get_save_function_and_args() in an AsyncRequest instead")


class ConsistentDataIdentifier:
    """NVRx's key of a cached data structure (kept for the name; asyncckpt shares storages by id)."""

    def __init__(self, key: str) -> None:
        self.key = key


_results_queue: Any = None


def get_write_results_queue(mp_mode: str = "spawn") -> Any:
    """NVRx's multiprocessing results queue (created on first call; asyncckpt itself does not use it)."""
    global _results_queue
    if _results_queue is None:
        import multiprocessing

        _results_queue = multiprocessing.get_context(mp_mode).Manager().Queue()
    return _results_queue


class FileSystemWriterAsync(AsyncStorageWriter, FileSystemWriter):  # type: ignore[misc]  # our rank attribute wins, as NVRx's does
    """NVRx's ``FileSystemWriterAsync(path, *args, separation_hint=None, use_msc=False,
    is_multiproc_io=False, use_cached_data_structure=False, use_cpu_shm_for_gpu_tensors=False,
    **kwargs)``; ``*args`` / ``**kwargs`` are ``FileSystemWriter``'s (``thread_count``,
    ``sync_files``, ``single_file_per_rank``, ``overwrite``, ``_extensions``, ...).

    - ``separation_hint``: honoured (hinted keys go to files of their own, named with the hint).
    - ``use_msc``: accepted; asyncckpt writes local paths and ``s3://`` URIs itself (an
      ``msc://`` path is refused with a BadInputError naming the alternative).
    - ``is_multiproc_io``, ``use_cached_data_structure``, ``use_cpu_shm_for_gpu_tensors``:
      accepted and ignored: the worker writes files in parallel threads, shares storages once
      per queue, and takes CUDA tensors as IPC handles.
    - ``single_file_per_rank=False`` works (one file per item), where NVRx raises.
    - ``open_file`` (NVRx's test hook): accepted and ignored.
    """

    _cached_identifiers: ClassVar[set[str]] = set()
    _shm_drain_callback: ClassVar[Any] = None

    def __init__(
        self,
        path: str | os.PathLike[str],
        *args: Any,
        separation_hint: str | None = None,
        use_msc: bool = False,
        is_multiproc_io: bool = False,
        use_cached_data_structure: bool = False,
        use_cpu_shm_for_gpu_tensors: bool = False,
        **kwargs: Any,
    ) -> None:
        if os.fspath(path).startswith("msc://"):
            raise BadInputError(
                f"{path}: msc:// paths (NVIDIA Multi-Storage Client) are not supported by asyncckpt; use a local path "
                "or s3://bucket/prefix/NAME (with storage_options=...)"
            )
        self.open_file = kwargs.pop("open_file", open)
        ours = {k: kwargs.pop(k) for k in ("files_per_rank", "chunk_size", "io_concurrency", "storage_options",
                                          "update_latest") if k in kwargs}
        FileSystemWriter.__init__(self, path, *args, **kwargs)
        AsyncStorageWriter.__init__(  # FileSystemWriter's arguments, as it parsed them
            self, path, self.single_file_per_rank, self.sync_files, self.thread_count, self.per_thread_copy_ahead,
            getattr(self, "cache_staged_state_dict", False), self.overwrite, list(self.transforms.extensions),
            self.serialization_format, separation_hint=separation_hint, **ours,
        )
        self.checkpoint_dir = path
        self.use_msc = use_msc
        self.is_multi_proc_io = is_multiproc_io
        self.use_cached_data_structure = use_cached_data_structure
        self.use_cpu_shm_for_gpu_tensors = use_cpu_shm_for_gpu_tensors
        self.can_run_decentralized_global_plan = True
        self.consistent_data_identifier: ConsistentDataIdentifier | None = None
        self.results_queue: Any = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self.path = Path(checkpoint_id)
            self.checkpoint_dir = checkpoint_id

    def prepare_decentralized_global_plan(self, local_plan: Any) -> Any:
        """This rank's global plan without asking the others (file prefix by rank)."""
        import dataclasses

        return dataclasses.replace(local_plan, storage_data=DcpPlanData(f"__{self.rank}_", self.save_id))

    @classmethod
    def cleanup_tensor_caches(cls) -> None:
        """Nothing to clean: asyncckpt's sharing registries follow their worker by themselves."""
        cls._cached_identifiers.clear()

    @classmethod
    def register_shm_drain_callback(cls, fn: Any) -> None:
        """Accepted for NVRx's API (asyncckpt never overwrites memory a pending write reads)."""
        cls._shm_drain_callback = fn

    @staticmethod
    def preload_tensors(resolved_plan_data: Any, non_blocking: bool = True) -> Any:
        raise NotImplementedError(f"FileSystemWriterAsync.preload_tensors {_NOT_HERE}")

    @staticmethod
    def write_preloaded_data_multithread(transform_list: Any, use_msc: bool, open_file: Any, rank: int,
                                         write_buckets: Any, global_results_queue: Any) -> None:
        raise NotImplementedError(f"FileSystemWriterAsync.write_preloaded_data_multithread {_NOT_HERE}")

    @staticmethod
    def write_preloaded_data_multiproc(transform_list: Any, use_msc: bool, open_file: Any, rank: int,
                                       write_buckets: Any, global_results_queue: Any) -> None:
        raise NotImplementedError(f"FileSystemWriterAsync.write_preloaded_data_multiproc {_NOT_HERE}")

    @staticmethod
    def write_preloaded_data(transform_list: Any, open_file: Any, local_thread_idx: int, write_bucket: Any,
                             results_queue: Any, count_queue: Any, use_fsync: bool, **kwargs: Any) -> Any:
        raise NotImplementedError(f"FileSystemWriterAsync.write_preloaded_data {_NOT_HERE}")
