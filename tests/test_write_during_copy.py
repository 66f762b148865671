"""Writing a snapshot while it is still being copied (engine.write_chunks ``copying``, staging.take_snapshot
``early``, the worker's CopyAwareSink): ordering is checked with events, never with timings."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt import engine
from asyncckpt.engine import write_chunks
from asyncckpt.format import checksum
from asyncckpt.runtime.context import WorkerConfig, WorkerContext
from asyncckpt.staging import CopyProgress, SharedRef, SnapshotSpec, Staged, take_snapshot
from asyncckpt.storage import LocalStorage

CHUNK = 64 << 10


class RecordingStorage(LocalStorage):
    """A LocalStorage whose writers log ("write", chunk index) when a part's write begins and, while
    ``gate`` is clear, hold the write there."""

    def __init__(self, root: Path, log: list[tuple[str, int]], gate: asyncio.Event) -> None:
        super().__init__(root)
        self.log = log
        self.gate = gate
        self.began = asyncio.Event()
        self.crcs: dict[int, int | None] = {}

    async def open_writer(self, key: str, size_hint: int | None = None) -> Any:
        writer = await super().open_writer(key, size_hint)
        real = writer.write_part

        async def recorded(index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
            self.log.append(("write", index))
            self.crcs[index] = crc32c
            self.began.set()
            await self.gate.wait()
            await real(index, offset, data, crc32c=crc32c)

        writer.write_part = recorded  # type: ignore[method-assign]
        return writer


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_during_the_copy_chunks_go_out_one_at_a_time_once_copied_and_unchecksummed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nchunks = 4
    data = os.urandom(nchunks * CHUNK - 100)
    log: list[tuple[str, int]] = []
    summed: list[int] = []
    real_checksum = engine.checksum

    def counted(view: memoryview) -> int:
        summed.append(len(view))
        return real_checksum(view)

    monkeypatch.setattr(engine, "checksum", counted)
    gate = asyncio.Event()
    progress = CopyProgress(len(data))
    st = RecordingStorage(tmp_path, log, gate)
    try:
        task = asyncio.ensure_future(write_chunks(st, "ck/rank-0.data", memoryview(data), CHUNK, 4, copying=progress))
        await _settle()
        assert log == []  # nothing is copied yet
        log.append(("copied", 0))
        progress.advance(CHUNK)
        await st.began.wait()
        log.append(("copied", 2))
        progress.advance(3 * CHUNK)
        await _settle()
        assert log == [("copied", 0), ("write", 0), ("copied", 2)]  # one write at a time during the copy
        assert summed == []  # and no checksum: the copy keeps the CPUs
        gate.set()
        await _settle()
        log.append(("copied", 3))
        progress.advance(len(data))
        crcs = await task
    finally:
        await st.close()
    writes = [i for what, i in log if what == "write"]
    assert sorted(writes) == list(range(nchunks))
    assert log.index(("write", 3)) > log.index(("copied", 3))  # no chunk before its bytes were copied
    assert (tmp_path / "ck" / "rank-0.data").read_bytes() == data
    assert crcs == [checksum(memoryview(data)[i * CHUNK : (i + 1) * CHUNK]) for i in range(nchunks)]
    assert len(summed) == nchunks  # each chunk summed once, the early ones after the copy


async def test_after_the_copy_the_other_chunks_wait_for_the_snapshot_ack(tmp_path: Path) -> None:
    nchunks = 4
    data = os.urandom(nchunks * CHUNK)
    log: list[tuple[str, int]] = []
    gate = asyncio.Event()
    gate.set()
    loop = asyncio.get_running_loop()
    acked: asyncio.Future[None] = loop.create_future()
    progress = CopyProgress(len(data), loop, acked)
    st = RecordingStorage(tmp_path, log, gate)
    try:
        task = asyncio.ensure_future(write_chunks(st, "ck/rank-0.data", memoryview(data), CHUNK, 4, copying=progress))
        progress.advance(CHUNK)
        await st.began.wait()
        progress.advance(len(data))  # the copy has ended; its ACK is not out yet
        await asyncio.sleep(0.05)
        assert [i for what, i in log if what == "write"] == [0]
        log.append(("acked", -1))
        acked.set_result(None)
        crcs = await task
    finally:
        await st.close()
    assert sorted(i for what, i in log if what == "write") == list(range(nchunks))
    assert log.index(("write", 3)) > log.index(("acked", -1))
    assert (tmp_path / "ck" / "rank-0.data").read_bytes() == data
    assert crcs == [checksum(memoryview(data)[i * CHUNK : (i + 1) * CHUNK]) for i in range(nchunks)]


async def test_a_copy_that_fails_after_chunks_went_out_leaves_no_object(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    log: list[tuple[str, int]] = []
    gate = asyncio.Event()
    gate.set()
    progress = CopyProgress(len(data))
    st = RecordingStorage(tmp_path, log, gate)
    try:
        task = asyncio.ensure_future(write_chunks(st, "ck/rank-0.data", memoryview(data), CHUNK, 4, copying=progress))
        progress.advance(2 * CHUNK)
        await st.began.wait()
        progress.fail(OSError("the source went away"))
        with pytest.raises(RuntimeError, match="copy failed"):
            await task
    finally:
        await st.close()
    assert ("write", 0) in log
    assert not (tmp_path / "ck" / "rank-0.data").exists()
    assert [p.name for p in (tmp_path / "ck").iterdir()] == []  # the partial file was removed too


class VerifyingStorage(RecordingStorage):
    """As if the store verified CRC32C on upload: every part must come with its checksum."""

    capabilities = replace(LocalStorage.capabilities, server_checksum="crc32c")


async def test_a_store_that_verifies_checksums_gets_them_with_every_part_written_during_the_copy(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    gate = asyncio.Event()
    gate.set()
    st = VerifyingStorage(tmp_path, [], gate)
    progress = CopyProgress(len(data))
    try:
        task = asyncio.ensure_future(write_chunks(st, "ck/rank-0.data", memoryview(data), CHUNK, 4, copying=progress))
        progress.advance(CHUNK)
        await st.began.wait()
        assert st.crcs == {0: checksum(memoryview(data)[:CHUNK])}
        progress.advance(len(data))
        crcs = await task
    finally:
        await st.close()
    assert st.crcs == dict(enumerate(crcs))


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


def test_a_native_save_starts_writing_before_its_snapshot_ends_and_loads_back_exactly(tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncckpt

    log = tmp_path / "events"
    monkeypatch.setenv("ASYNCCKPT_TEST_OVERLAP", str(log))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    torch.manual_seed(0)
    state = {f"w{i}": torch.randn(4 << 20) for i in range(4)}  # 64 MiB: 4 copy pieces, 8 chunks
    opts = {"chunk_size": 8 << 20,
            "worker_options": {"preload": ["tests._overlap_probe"], "write_during_copy": 32 << 20}}
    with asyncckpt.AsyncCheckpointer(**opts) as ck:
        for name in ("a", "b"):
            ck.save(state, str(tmp_path / name))
            ck.wait_snapshot()
            ck.finalize(blocking=True)
    events = log.read_text().split()
    # per save: the first piece is copied, its chunks are written, and only then does the rest of
    # the copy go on (the probe holds it until a write began) and the snapshot end
    assert events.count("snapshot") == 2 and events.count("write") == 16
    first, second = events[: events.index("snapshot") + 1], events[events.index("snapshot") + 1 :]
    for one in (first, second):
        assert one[0] == "write", events
    for name in ("a", "b"):
        got = asyncckpt.load(str(tmp_path / name))  # every chunk's CRC32C is checked
        assert all(torch.equal(got[k], v) for k, v in state.items())
    # a snapshot under write_during_copy (one copy piece, so the probe never holds it) is copied
    # before its write starts; and so is every snapshot without the option (the default)
    log.unlink()
    small = {"w": torch.randn(1 << 20)}
    with asyncckpt.AsyncCheckpointer(**opts) as ck:
        ck.save(small, str(tmp_path / "small"))
        ck.finalize(blocking=True)
    assert log.read_text().split() == ["snapshot", "write"]
    monkeypatch.setenv("ASYNCCKPT_TEST_OVERLAP_HOLD", "0")  # a new worker: nothing to wait for
    one = {"w": torch.randn(10 << 20)}  # 40 MiB
    for name, options in (("default", {}), ("zero", {"write_during_copy": 0})):
        log.unlink()
        with asyncckpt.AsyncCheckpointer(chunk_size=8 << 20,
                                         worker_options={"preload": ["tests._overlap_probe"], **options}) as ck:
            ck.save(one, str(tmp_path / name))
            ck.finalize(blocking=True)
        assert log.read_text().split()[0] == "snapshot", name
        got = asyncckpt.load(str(tmp_path / name))
        assert torch.equal(got["w"], one["w"])
