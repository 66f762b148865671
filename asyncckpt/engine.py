"""The native sink: stream a staged snapshot in checksummed chunks, then the rank's manifest.

Runs in the worker. The runtime (``asyncckpt.runtime``) has already copied the state into a
staging slot laid out as the data file; :class:`NativeSink` writes it and returns a
:class:`SaveResult`. Chunked writing (:func:`write_chunks`, :func:`write_compressed`,
:func:`write_stream`, :func:`write_parts`) is shared with the tier drain and the other sinks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from ._loop import gather_or_cancel
from .catalog import BasePins, next_generation, note_manifest_written, read_commit, read_manifest
from .errors import CheckpointError
from .format import (
    CHECKSUM_ALGO,
    FORMAT_NAME,
    REFS,
    ChunkInfo,
    Entry,
    Node,
    RankManifest,
    RefTarget,
    checksum,
    chunk_count,
    data_file,
    digest,
    encode_manifest,
    manifest_file,
    manifest_version,
    new_save_id,
    plan_references,
    remember_manifest,
)
from .format.compression import encode_chunk
from .kinds.base import kind_named
from .storage import Storage, join_key
from .storage.base import ObjectWriter

if TYPE_CHECKING:
    from .runtime.context import WorkerContext
    from .staging import CopyProgress, Staged

__all__ = ["NativeSink", "SaveJob", "SaveResult", "write_chunks", "write_compressed", "write_parts", "write_stream"]

log = logging.getLogger("asyncckpt")


@dataclass
class SaveJob:
    """Everything the worker needs to write one rank's part of one native checkpoint."""

    root: str
    name: str
    rank: int
    world_size: int
    step: int | None
    entries: list[Entry]
    tree: Node
    data_nbytes: int
    overwrite: bool = False
    chunk_size: int = 32 << 20
    io_concurrency: int = 4
    storage_options: dict[str, Any] = field(default_factory=dict)
    layout: str = "flat"
    data_prefix: str = ""  # key prefix of data files; "" means the checkpoint's own directory
    features: list[str] = field(default_factory=list)  # format features the entries use (docs/format.md)
    compression: str | None = None  # "zstd": each chunk compressed (feature "zstd"); None: the image as is
    compression_level: int = 0
    incremental: bool = False  # record digests (feature "refs"); entries equal to ``base``'s become references
    base: str | None = None  # the checkpoint (same root) this save's references may point into

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.root.rstrip('/')}/{self.name}"


@dataclass
class SaveResult:
    rank: int
    name: str
    nbytes: int
    manifest_checksum: int
    manifest_nbytes: int
    snapshot_s: float
    write_s: float


def data_key(job: SaveJob, generation: int = 0) -> str:
    return join_key(job.data_prefix or job.name, data_file(job.rank, generation))


class NativeSink:
    """Writes asyncckpt's own format: ``NAME/rank-R.data`` in checksummed chunks, then ``rank-R.manifest``.

    It is a ``runtime.CopyAwareSink``: the worker may start :meth:`write_while_copying` while the
    snapshot is still being copied, and each chunk is written once its bytes are in the slot.
    """

    async def write(self, ctx: WorkerContext, job: SaveJob, staged: Staged) -> SaveResult:
        return await self._write(ctx, job, staged, None)

    async def write_while_copying(self, ctx: WorkerContext, job: SaveJob, staged: Staged,
                                  progress: CopyProgress) -> SaveResult:
        """:meth:`write`, started before the snapshot copy ends (``progress`` says how far it got)."""
        return await self._write(ctx, job, staged, progress)

    async def _write(self, ctx: WorkerContext, job: SaveJob, staged: Staged, progress: CopyProgress | None) -> SaveResult:
        # An incremental save's base stays pinned until its manifest is written (from then on deletion's
        # mark phase sees the references): retention on this worker keeps it (control.RetentionOp).
        base = job.base
        pins = ctx.pins.setdefault(job.root, BasePins()) if job.incremental and base else None
        if pins is not None and base and not pins.hold(base):
            job = replace(job, base=None)  # being deleted: save in full
        try:
            return await self.write_pinned(ctx, job, staged, progress)
        finally:
            if pins is not None and base:
                pins.release(base)

    async def write_pinned(self, ctx: WorkerContext, job: SaveJob, staged: Staged,
                           progress: CopyProgress | None = None) -> SaveResult:
        """:meth:`write` once the base is pinned; with ``progress``, chunks wait for their bytes."""
        t0 = time.perf_counter()
        storage = ctx.storage(job.root, job.storage_options)
        # An overwrite writes the next generation's files beside the committed checkpoint, which
        # stays loadable until the commit replaces its COMMIT (catalog.commit_checkpoint).
        generation, _ = await next_generation(storage, job.name, overwrite=job.overwrite)
        key = data_key(job, generation)
        image = staged.slot.view[: job.data_nbytes]
        features = list(job.features)
        entries, nbytes = job.entries, job.data_nbytes
        refs: list[RefTarget] = []
        if progress is not None and (job.incremental or job.compression is not None):
            await progress.ended()  # these read the whole image first (digests, packing), on every CPU
        if job.incremental:
            entries, refs, nbytes = await incremental_layout(storage, job, image)
            image = image[:nbytes]
            features.append(REFS)
        chunks: list[ChunkInfo] | msgspec.UnsetType = msgspec.UNSET
        if job.compression is None:
            crcs = await write_chunks(storage, key, image, job.chunk_size, job.io_concurrency, copying=progress)
        else:
            crcs, chunks = await write_compressed(storage, key, image, job.chunk_size, job.io_concurrency,
                                                  job.compression, job.compression_level)
            features.append(job.compression)
        manifest = RankManifest(
            format=FORMAT_NAME,
            version=manifest_version(features),
            name=job.name,
            rank=job.rank,
            world_size=job.world_size,
            step=job.step,
            data_file=key,
            data_nbytes=nbytes,
            chunk_size=job.chunk_size,
            checksum_algo=CHECKSUM_ALGO,
            chunk_checksums=crcs,
            entries=entries,
            tree=job.tree,
            layout=job.layout,
            created=time.time(),
            features=features,
            save_id=new_save_id(),
            chunks=chunks,
            refs=refs,
        )
        blob = encode_manifest(manifest)
        remember_manifest(blob, manifest)
        mkey = join_key(job.name, manifest_file(job.rank, generation))
        await storage.put_record(mkey, blob)
        # The data file's committed writer wrote exactly these bytes: a commit in this worker need
        # not read the manifest or the file's size back.
        stored = nbytes if isinstance(chunks, msgspec.UnsetType) else sum(c.stored_nbytes for c in chunks)
        note_manifest_written(storage, mkey, blob, stored)
        dt = time.perf_counter() - t0
        log.info("wrote rank part", extra={"rank": job.rank, "step": job.step, "op": "write",
                                           "bytes": nbytes, "seconds": dt})
        return SaveResult(job.rank, job.name, nbytes, checksum(blob), len(blob), staged.seconds, dt)


async def base_manifest(storage: Storage, job: SaveJob) -> tuple[RankManifest, RefTarget] | None:
    """This rank's manifest of ``job.base`` and the reference to it, or None (then the save is full)."""
    if job.base is None or job.base == job.name:
        return None
    try:
        rec = await read_commit(storage, job.base)
        kind = kind_named(rec.kind)
        if kind is None or not kind.has_rank_manifests or not 0 <= job.rank < rec.world_size:
            return None
        ref = rec.manifests[job.rank]
        m = await read_manifest(storage, job.base, job.rank, ref)
    except CheckpointError as exc:  # deleted or damaged meanwhile: write everything
        log.warning("incremental save %s: base %s cannot be read (%s); saving in full", job, job.base, exc)
        return None
    return m, RefTarget(join_key(job.base, ref.file), ref.nbytes, ref.checksum, ref.save_id)


async def incremental_layout(storage: Storage, job: SaveJob, image: memoryview
                             ) -> tuple[list[Entry], list[RefTarget], int]:
    """Digest every stored entry of the staged ``image``, turn those equal to the base's into references
    and pack the rest to the front of ``image`` (in place); (entries, refs, bytes left to write)."""
    owned = [i for i, e in enumerate(job.entries) if e.view_of < 0]
    groups: list[list[int]] = [[] for _ in range(max(1, job.io_concurrency))]
    load = [0] * len(groups)
    for i in sorted(owned, key=lambda i: -job.entries[i].nbytes):  # balance the bytes over the threads
        g = load.index(min(load))
        groups[g].append(i)
        load[g] += job.entries[i].nbytes
    digests: dict[int, bytes] = {}

    def hash_group(idx: list[int]) -> None:
        for i in idx:
            e = job.entries[i]
            digests[i] = digest(image[e.offset : e.offset + e.nbytes])

    base = await base_manifest(storage, job)
    await gather_or_cancel(asyncio.to_thread(hash_group, g) for g in groups if g)
    base_m, base_target = base if base is not None else (None, None)
    plan = plan_references(job.entries, digests, base_m, base_target, name=job.name)

    def pack() -> None:
        buf = np.frombuffer(image, dtype=np.uint8)
        end = 0
        for old, new, n in plan.moves:
            buf[end:new] = 0
            if old != new:
                buf[new : new + n] = buf[old : old + n]  # new <= old: numpy copies overlapping ranges correctly
            end = new + n

    await asyncio.to_thread(pack)
    return plan.entries, plan.refs, plan.data_nbytes


async def write_chunks(storage: Storage, key: str, data: memoryview, chunk_size: int, concurrency: int,
                       copying: CopyProgress | None = None) -> list[int]:
    """Write ``data`` to ``key`` in chunks (several in flight), returning each chunk's CRC32C.

    ``copying``: ``data`` is a staging slot whose snapshot copy is still running. Until the copy
    ends the copy keeps the CPUs: one task writes chunks in file order, one at a time, each once
    its bytes are copied (so the copy wakes the loop only for the chunk that task waits for), and
    where the store does not verify checksums their CRC32C is computed after the copy. The other
    chunks start when the copy ends, several at once, as without ``copying``.
    The object becomes visible only when every chunk is written; on any failure it is aborted.
    """
    n = len(data)
    writer = await storage.open_writer(key, size_hint=n)
    nchunks = chunk_count(n, chunk_size)
    crcs = [0] * nchunks
    sem = asyncio.Semaphore(max(1, concurrency))
    later = storage.capabilities.server_checksum is None
    unsummed: list[int] = []
    taken = 0  # chunks below this one are written by the during-copy task

    def part_of(i: int) -> memoryview:
        return data[i * chunk_size : min(n, (i + 1) * chunk_size)]

    async def during_copy(progress: CopyProgress) -> None:
        nonlocal taken
        while taken < nchunks:
            i = taken
            await progress.wait(min(n, (i + 1) * chunk_size))
            if progress.finished:  # the rest goes at full width now
                return
            taken += 1
            part = part_of(i)
            if later:
                await writer.write_part(i, i * chunk_size, part)
                unsummed.append(i)
            else:
                crcs[i] = await asyncio.to_thread(checksum, part)
                await writer.write_part(i, i * chunk_size, part, crc32c=crcs[i])

    async def one(i: int) -> None:
        async with sem:
            part = part_of(i)
            crcs[i] = await asyncio.to_thread(checksum, part)
            await writer.write_part(i, i * chunk_size, part, crc32c=crcs[i])

    def sum_unsummed() -> None:  # the slot holds the bytes until the sink returns
        for i in unsummed:
            crcs[i] = checksum(part_of(i))

    try:
        early: list[asyncio.Future[None]] = []
        if copying is not None and not copying.finished:
            early.append(asyncio.ensure_future(during_copy(copying)))
            try:
                await copying.ended()  # the copy's end (and its ACK): from then on ``taken`` stays
            except BaseException:
                early[0].cancel()
                await asyncio.gather(*early, return_exceptions=True)
                raise
        await gather_or_cancel([*early, *(one(i) for i in range(taken, nchunks))])
        await writer.commit()
    except BaseException:
        await writer.abort()
        raise
    if unsummed:
        await asyncio.to_thread(sum_unsummed)
    return crcs


async def write_compressed(storage: Storage, key: str, data: memoryview, chunk_size: int, concurrency: int,
                           compression: str, level: int) -> tuple[list[int], list[ChunkInfo]]:
    """Write ``data`` to ``key`` as compressed chunks (each compressed in a worker thread, several at
    once); returns each stored chunk's CRC32C and record. Aborted on any failure."""
    n = len(data)
    nchunks = chunk_count(n, chunk_size)
    crcs = [0] * nchunks
    infos: list[ChunkInfo] = [ChunkInfo("none", 0, 0)] * nchunks

    async def produce(i: int) -> tuple[memoryview, int]:
        stored, info, crc = await asyncio.to_thread(
            encode_chunk, data[i * chunk_size : min(n, (i + 1) * chunk_size)], compression, level)
        crcs[i], infos[i] = crc, info
        return stored, crc

    writer = await storage.open_writer(key)  # the stored size is known only at the end
    await write_stream(writer, nchunks, produce, chunk_size, concurrency)
    return crcs, infos


async def write_stream(writer: ObjectWriter, count: int, produce: Callable[[int], Awaitable[tuple[memoryview, int]]],
                       part_size: int, concurrency: int) -> None:
    """Write pieces ``produce(0) .. produce(count - 1)`` (each ``(bytes, crc32c)``) back to back, then commit.

    Pieces are produced up to ``concurrency`` ahead and consumed in order; consecutive ones are
    joined into parts of at least ``part_size`` bytes (the last may be shorter), of which up to
    ``concurrency`` are written at once. On any failure (or cancellation) everything in flight is
    cancelled and the write is aborted, so no partial object ever becomes visible.
    """
    depth = max(1, concurrency)
    slots = asyncio.Semaphore(depth)
    ahead: deque[asyncio.Future[tuple[memoryview, int]]] = deque()
    writes: list[asyncio.Future[None]] = []
    nxt = 0

    async def put(index: int, offset: int, pieces: list[tuple[memoryview, int]]) -> None:
        try:
            if len(pieces) == 1:
                view, crc = pieces[0]
            else:
                view = memoryview(b"".join(p for p, _ in pieces))
                crc = await asyncio.to_thread(checksum, view)
            await writer.write_part(index, offset, view, crc32c=crc)
        finally:
            slots.release()

    try:
        pending: list[tuple[memoryview, int]] = []
        pending_n = offset = part = 0
        for i in range(count):
            while nxt < count and len(ahead) < depth:
                ahead.append(asyncio.ensure_future(produce(nxt)))
                nxt += 1
            piece = await ahead.popleft()
            pending.append(piece)
            pending_n += len(piece[0])
            if pending_n >= part_size or i == count - 1:
                await slots.acquire()
                for w in writes:
                    if w.done():
                        w.result()  # a failed write stops the stream now
                writes.append(asyncio.ensure_future(put(part, offset, pending)))
                offset, part, pending, pending_n = offset + pending_n, part + 1, [], 0
        await gather_or_cancel(writes)
        await writer.commit()
    except BaseException:
        inflight: list[asyncio.Future[Any]] = [*ahead, *writes]
        for t in inflight:
            t.cancel()
        await asyncio.gather(*ahead, *writes, return_exceptions=True)
        await writer.abort()
        raise


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
