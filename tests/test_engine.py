"""Writing a snapshot while it is still being copied (engine.write_chunks ``ready``, staging.take_snapshot
``early``): ordering is checked with events, never with timings."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt.engine import write_chunks
from asyncckpt.format import checksum
from asyncckpt.runtime.context import WorkerConfig, WorkerContext
from asyncckpt.staging import CopyProgress, SharedRef, SnapshotSpec, Staged, take_snapshot
from asyncckpt.storage import LocalStorage

CHUNK = 64 << 10


class RecordingStorage(LocalStorage):
    """A LocalStorage whose writers log ("write", chunk index) when a part's write begins."""

    def __init__(self, root: Path, log: list[tuple[str, int]], first_write: asyncio.Event) -> None:
        super().__init__(root)
        self.log = log
        self.first_write = first_write

    async def open_writer(self, key: str, size_hint: int | None = None) -> Any:
        writer = await super().open_writer(key, size_hint)
        real = writer.write_part

        async def recorded(index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
            self.log.append(("write", index))
            self.first_write.set()
            await real(index, offset, data, crc32c=crc32c)

        writer.write_part = recorded  # type: ignore[method-assign]
        return writer


async def test_a_chunk_is_written_once_its_bytes_are_copied_while_later_ones_are_not(tmp_path: Path) -> None:
    nchunks = 4
    data = os.urandom(nchunks * CHUNK - 100)
    log: list[tuple[str, int]] = []
    first_write = asyncio.Event()
    copied = [asyncio.Event() for _ in range(nchunks)]

    async def ready(end: int) -> None:
        await copied[(end - 1) // CHUNK].wait()

    st = RecordingStorage(tmp_path, log, first_write)
    try:
        task = asyncio.ensure_future(write_chunks(st, "ck/rank-0.data", memoryview(data), CHUNK, 4, ready=ready))
        log.append(("copied", 0))
        copied[0].set()
        await first_write.wait()  # the first chunk's write began ...
        assert log == [("copied", 0), ("write", 0)]  # ... before any later chunk was copied
        for i in range(1, nchunks):
            log.append(("copied", i))
            copied[i].set()
        crcs = await task
    finally:
        await st.close()
    for i in range(nchunks):  # no chunk was written before its bytes were copied
        assert log.index(("copied", i)) < log.index(("write", i))
    assert (tmp_path / "ck" / "rank-0.data").read_bytes() == data
    assert crcs == [checksum(memoryview(data)[i * CHUNK : (i + 1) * CHUNK]) for i in range(nchunks)]


def _context() -> WorkerContext:
    return WorkerContext(WorkerConfig(parent_pid=os.getpid(), authkey=b"k", sys_path=[]))


def _spec(tensors: list[torch.Tensor]) -> SnapshotSpec:
    copies, storages, off = [], {}, 0
    for i, t in enumerate(tensors, start=1):
        storages[i] = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        copies.append((off, SharedRef(i, t.dtype, tuple(t.shape), tuple(t.stride()), 0)))
        off += t.numel() * t.element_size()
    return SnapshotSpec(nbytes=off, copies=copies, new_storages=storages, ephemeral=True)


async def test_the_early_writer_starts_before_the_copy_and_the_snapshot_ends_with_the_copy() -> None:
    tensors = [torch.randn(3 << 20) for _ in range(4)]  # 12 MiB each: pieces of the copy in file order
    spec = _spec(tensors)
    ctx = _context()
    seen: list[str] = []
    waits: list[int] = []
    held: list[CopyProgress] = []

    def early(staged: Staged, progress: CopyProgress) -> asyncio.Future[object]:
        seen.append(f"early at {progress.ready}")
        held.append(progress)

        async def reader() -> object:
            for end in range(CHUNK, spec.nbytes + CHUNK, 8 << 20):
                await progress.wait(min(end, spec.nbytes))
                waits.append(progress.ready)
            return None

        return asyncio.ensure_future(reader())

    staged = await take_snapshot(ctx, spec, early)
    try:
        assert seen == ["early at 0"]  # called before a byte was copied
        assert held[0].ready == spec.nbytes  # the snapshot (its ACK) ends exactly when the copy has
        expect = torch.cat([t.view(torch.uint8) for t in tensors])
        assert torch.equal(staged.slot.tensor[: spec.nbytes], expect)
        await asyncio.sleep(0)
        assert waits == sorted(waits) and waits[-1] == spec.nbytes
    finally:
        await ctx.pool.release(staged.slot)
        await ctx.close()


async def test_a_failed_copy_stops_the_early_writer_before_the_slot_is_released() -> None:
    t = torch.randn(1 << 20)
    spec = _spec([t])
    spec.copies.append((spec.nbytes, SharedRef(99, t.dtype, (4,), (1,), 0)))  # storage 99 was never sent
    spec.nbytes += 16
    ctx = _context()
    started: list[asyncio.Future[object]] = []
    errors: list[BaseException | None] = []

    def early(staged: Staged, progress: CopyProgress) -> asyncio.Future[object]:
        async def writer() -> object:
            try:
                await progress.wait(progress.nbytes)
            finally:
                errors.append(progress.error)
            return None

        started.append(asyncio.ensure_future(writer()))
        return started[0]

    try:
        with pytest.raises(KeyError):
            await take_snapshot(ctx, spec, early)
        assert started[0].done()  # finished (cancelled or failed) before take_snapshot returned
        assert errors and isinstance(errors[0], KeyError)
    finally:
        await ctx.close()
