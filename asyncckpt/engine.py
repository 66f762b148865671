"""The checkpoint routines that run in the worker: snapshot into staging, stream chunks, manifest.

``snapshot`` is the preload_fn of a save request and ``write`` its async_fn. Worker-global state
(shared storages by id, the staging pool, open storage backends) lives in ``_STATE``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._loop import gather_or_cancel
from .errors import StorageTimeoutError
from .format import (
    CHECKSUM_ALGO,
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    Entry,
    Node,
    RankManifest,
    checksum,
    data_file,
    encode_manifest,
    manifest_file,
)
from .staging import SharedRef, StagingPool, StagingSlot
from .storage import Storage, join_key, open_storage
from .storage.base import ObjectWriter

__all__ = ["SaveJob", "SaveResult", "configure_worker", "snapshot", "write"]

log = logging.getLogger("asyncckpt")


@dataclass
class SaveJob:
    """Everything the worker needs for one rank's part of one checkpoint."""

    root: str
    name: str
    rank: int
    world_size: int
    step: int | None
    entries: list[Entry]
    tree: Node
    data_nbytes: int
    refs: dict[int, SharedRef]
    inline: dict[int, bytes]
    new_storages: dict[int, torch.Tensor]
    release: list[int]
    overwrite: bool = False
    chunk_size: int = 32 << 20
    io_concurrency: int = 4
    storage_options: dict[str, Any] = field(default_factory=dict)
    layout: str = "flat"
    data_prefix: str = ""  # key prefix of data files; "" means the checkpoint's own directory
    timeout_s: float | None = None  # a write stage that takes longer fails with StorageTimeoutError


@dataclass
class SaveResult:
    rank: int
    name: str
    nbytes: int
    manifest_checksum: int
    manifest_nbytes: int
    snapshot_s: float
    write_s: float


@dataclass
class _Staged:
    job: SaveJob
    slot: StagingSlot
    snapshot_s: float


class _WorkerState:
    def __init__(self) -> None:
        self.storages: dict[int, torch.Tensor] = {}
        self.pool = StagingPool(2)
        self.backends: dict[tuple[str, str], Storage] = {}
        self.cuda_stream: Any = None

    def backend(self, root: str, options: dict[str, Any]) -> Storage:
        key = (root, repr(sorted(options.items())))
        st = self.backends.get(key)
        if st is None:
            st = self.backends[key] = open_storage(root, **options)
        return st


_STATE = _WorkerState()


def configure_worker(options: dict[str, Any]) -> None:
    """Called once in the worker process before it serves requests."""
    _STATE.pool = StagingPool(int(options.get("max_in_flight", 2)), options.get("pinned"))
    threads = options.get("torch_threads")
    if threads:
        torch.set_num_threads(int(threads))


async def close_backends() -> None:
    """Close every storage backend the worker opened (S3 clients hold connection pools)."""
    backends, _STATE.backends = list(_STATE.backends.values()), {}
    for st in backends:
        try:
            await st.close()
        except Exception as exc:  # noqa: BLE001 - shutting down: log, keep closing the others
            log.warning("closing %s failed: %s", getattr(st, "uri", st), exc)


def shutdown_worker() -> None:
    _STATE.pool.clear()
    _STATE.storages.clear()


def _source(ref: SharedRef) -> torch.Tensor:
    base = _STATE.storages[ref.storage_id]
    itemsize = torch.empty((), dtype=ref.dtype).element_size()
    usable = base.numel() - base.numel() % itemsize
    typed = base[:usable].view(ref.dtype)
    return torch.as_strided(typed, ref.shape, ref.stride, ref.storage_offset)


def _copy_in(job: SaveJob, slot: StagingSlot) -> None:
    """Copy every byte of the job into the staging slot, laid out as the data file."""
    dst_all = slot.tensor
    has_cuda = False
    for idx, ref in job.refs.items():
        e = job.entries[idx]
        if e.nbytes == 0:
            continue
        src = _source(ref)
        dst = dst_all[e.offset : e.offset + e.nbytes].view(ref.dtype).view(ref.shape)
        if src.is_cuda:
            has_cuda = True
            if _STATE.cuda_stream is None:
                _STATE.cuda_stream = torch.cuda.Stream(device=src.device)
            with torch.cuda.stream(_STATE.cuda_stream):
                dst.copy_(src, non_blocking=slot.pinned)
        else:
            dst.copy_(src)
    for idx, data in job.inline.items():
        e = job.entries[idx]
        slot.view[e.offset : e.offset + len(data)] = data
    # Zero the alignment gaps so no stale bytes of an earlier checkpoint reach the file.
    end = 0
    for e in sorted(job.entries, key=lambda e: e.offset):
        if e.offset > end:
            dst_all[end : e.offset].zero_()
        end = e.offset + e.nbytes
    if has_cuda:
        _STATE.cuda_stream.synchronize()


async def snapshot(job: SaveJob) -> _Staged:
    """preload_fn: register shared storages, copy the state into a staging slot."""
    t0 = time.perf_counter()
    for sid in job.release:
        _STATE.storages.pop(sid, None)
    _STATE.storages.update(job.new_storages)
    job.new_storages = {}
    slot = await _STATE.pool.acquire(job.data_nbytes)
    try:
        await asyncio.to_thread(_copy_in, job, slot)
    except BaseException:
        await _STATE.pool.release(slot)
        raise
    return _Staged(job, slot, time.perf_counter() - t0)


def _data_key(job: SaveJob) -> str:
    return join_key(job.data_prefix or job.name, data_file(job.rank))


async def write(staged: _Staged) -> SaveResult:
    """async_fn: stream the staged bytes in checksummed chunks, then the rank's manifest.

    With ``job.timeout_s``, a write stage that does not finish in time (a hung filesystem or
    endpoint) fails with StorageTimeoutError; its staging slot is abandoned, not reused, since a
    stuck I/O thread may still read from it.
    """
    job, slot = staged.job, staged.slot
    task = asyncio.ensure_future(_write(staged))
    done, _ = await asyncio.wait({task}, timeout=job.timeout_s)
    if not done:
        task.cancel()
        _STATE.pool.discard(slot)
        raise StorageTimeoutError(
            f"writing rank {job.rank} of {job.root}/{job.name} did not finish within {job.timeout_s} s; "
            "the storage looks hung. The checkpoint is not committed; earlier ones are intact."
        )
    await _STATE.pool.release(slot)
    return task.result()


async def _write(staged: _Staged) -> SaveResult:
    job, slot = staged.job, staged.slot
    t0 = time.perf_counter()
    storage = _STATE.backend(job.root, job.storage_options)
    if job.overwrite:
        await storage.delete(join_key(job.name, COMMIT_FILE))
    crcs = await write_chunks(storage, _data_key(job), slot.view[: job.data_nbytes], job.chunk_size, job.io_concurrency)
    manifest = RankManifest(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        name=job.name,
        rank=job.rank,
        world_size=job.world_size,
        step=job.step,
        data_file=_data_key(job),
        data_nbytes=job.data_nbytes,
        chunk_size=job.chunk_size,
        checksum_algo=CHECKSUM_ALGO,
        chunk_checksums=crcs,
        entries=job.entries,
        tree=job.tree,
        layout=job.layout,
        created=time.time(),
    )
    blob = encode_manifest(manifest)
    await storage.put_record(join_key(job.name, manifest_file(job.rank)), blob)
    dt = time.perf_counter() - t0
    log.info(
        "wrote rank part",
        extra={"rank": job.rank, "step": job.step, "op": "write", "bytes": job.data_nbytes, "seconds": dt},
    )
    return SaveResult(job.rank, job.name, job.data_nbytes, checksum(blob), len(blob), staged.snapshot_s, dt)


async def write_chunks(storage: Storage, key: str, data: memoryview, chunk_size: int, concurrency: int) -> list[int]:
    """Write ``data`` to ``key`` in chunks (several in flight), returning each chunk's CRC32C.

    The object becomes visible only when every chunk is written; on any failure it is aborted.
    """
    n = len(data)
    writer = await storage.open_writer(key, size_hint=n)
    nchunks = -(-n // chunk_size) if n else 0
    crcs = [0] * nchunks
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(i: int) -> None:
        async with sem:
            part = data[i * chunk_size : min(n, (i + 1) * chunk_size)]
            crcs[i] = await asyncio.to_thread(checksum, part)
            await writer.write_part(i, i * chunk_size, part)

    await write_parts(writer, nchunks, one)
    return crcs


async def write_parts(writer: ObjectWriter, nparts: int, part: Callable[[int], Awaitable[None]]) -> None:
    """Run ``part(i)`` for every part concurrently, then commit ``writer``.

    On any failure (or cancellation) the other parts are cancelled and the write is aborted,
    so no partial object ever becomes visible.
    """
    try:
        await gather_or_cancel(part(i) for i in range(nparts))
        await writer.commit()
    except BaseException:
        await writer.abort()
        raise
