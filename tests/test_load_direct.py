"""Direct reads on the load path (issue 14): large buffers placed so the disk writes them in place.

``format.read_buffer`` places a large entry's memory so that its address and its offset in the
data file agree modulo the page size; ``LocalStorage`` then reads the page-aligned middle of such
buffers with O_DIRECT (no page-cache copy) and the rest buffered, falling back to buffered reads
where the filesystem refuses O_DIRECT. Checksums are still computed over the bytes where they landed.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt._loop import run_sync
from asyncckpt.errors import CheckpointNotFoundError
from asyncckpt.format.chunks import ALIGNED_MIN, read_buffer
from asyncckpt.storage import LocalStorage
from tests.test_load_path import _manifest

MiB = 1 << 20
PAGE = mmap.PAGESIZE


def _direct_ok(d: Path) -> bool:
    p = d / "probe"
    p.write_bytes(b"\0" * PAGE)
    try:
        os.close(os.open(p, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        p.unlink()


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not hasattr(os, "O_DIRECT") or not _direct_ok(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    return tmp_path


class _Syscalls:
    """Counts the bytes ``os.preadv`` reads through O_DIRECT descriptors and through others;
    ``refuse`` makes O_DIRECT fail with EINVAL at ``"open"`` or at ``"read"`` (as tmpfs and some
    network filesystems do), or at the ``"second read"`` after a short first one."""

    def __init__(self, mp: pytest.MonkeyPatch, refuse: str | None = None) -> None:
        self.direct_bytes = self.buffered_bytes = self.refused = self.direct_calls = 0
        self.direct_threads: set[str] = set()
        self._direct: set[int] = set()
        self._lock = threading.Lock()
        real_open, real_close, real_preadv = os.open, os.close, os.preadv

        def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & os.O_DIRECT and refuse == "open":
                with self._lock:
                    self.refused += 1
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, *args, **kwargs)
            if flags & os.O_DIRECT:
                with self._lock:
                    self._direct.add(fd)
            return fd

        def fake_close(fd: int) -> None:
            with self._lock:
                self._direct.discard(fd)
            real_close(fd)

        def fake_preadv(fd: int, bufs: Any, offset: int, *args: Any) -> int:
            direct = fd in self._direct
            if direct and (refuse == "read" or (refuse == "second read" and self.direct_bytes)):
                with self._lock:
                    self.refused += 1
                raise OSError(errno.EINVAL, "Invalid argument")
            if direct and refuse == "second read":  # a short first read: half of its first buffer
                bufs = [bufs[0][: len(bufs[0]) // 2 // PAGE * PAGE]]
            n = real_preadv(fd, bufs, offset, *args)
            with self._lock:
                if direct:
                    self.direct_bytes += n
                    self.direct_calls += 1
                    self.direct_threads.add(threading.current_thread().name)
                else:
                    self.buffered_bytes += n
            return n

        mp.setattr(os, "open", fake_open)
        mp.setattr(os, "close", fake_close)
        mp.setattr(os, "preadv", fake_preadv)


def _state() -> dict[str, torch.Tensor]:
    """Large tensors of sizes that are not page multiples, small ones between them."""
    g = torch.Generator().manual_seed(3)
    out: dict[str, torch.Tensor] = {}
    for i in range(4):
        out[f"big{i}"] = torch.randn((3 * MiB + 1000 * i + 12) // 4, generator=g)
        out[f"small{i}"] = torch.randn(100 + i, generator=g)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.fixture
def saved(shared_ckpt: Any, direct_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _state()
    shared_ckpt.save(state, direct_dir / "c")
    shared_ckpt.finalize(blocking=True)
    return direct_dir / "c", state


def test_read_buffer_places_large_buffers_for_direct_reads() -> None:
    for off in (0, 64, 4032, 5 * PAGE + 192):
        b = read_buffer(ALIGNED_MIN + 100, off)
        assert b.flags.writeable and len(b) == ALIGNED_MIN + 100 and b.dtype == np.uint8
        assert b.ctypes.data % PAGE == off % PAGE
        t = torch.from_numpy(b)  # the tensor keeps the allocation alive
        del b
        t.fill_(7)
        assert int(t.sum()) == 7 * (ALIGNED_MIN + 100)
    small = read_buffer(100, 64)
    assert len(small) == 100 and small.flags.writeable


def test_large_entries_are_read_with_o_direct_into_the_loaded_tensors(saved, monkeypatch) -> None:
    path, state = saved
    m = _manifest(path)
    calls = _Syscalls(monkeypatch)
    got = asyncckpt.load(path)
    monkeypatch.undo()
    _same(state, got)
    for e in m.entries:  # each large tensor's memory agrees with its file offset modulo the page size
        if e.nbytes >= ALIGNED_MIN:
            assert got[e.key].data_ptr() % PAGE == e.offset % PAGE, e.key
    big = sum(state[f"big{i}"].nbytes for i in range(4))
    # Every large tensor but at most a page at either end came through O_DIRECT; the rest buffered.
    assert big - 8 * PAGE <= calls.direct_bytes <= big
    assert calls.direct_bytes + calls.buffered_bytes >= m.data_nbytes


def test_load_into_reads_large_entries_with_o_direct(saved, monkeypatch) -> None:
    path, state = saved
    into = {k: torch.zeros_like(v) for k, v in state.items()}
    calls = _Syscalls(monkeypatch)
    asyncckpt.load(path, into=into)
    monkeypatch.undo()
    _same(state, into)
    assert calls.direct_bytes >= sum(state[f"big{i}"].nbytes for i in range(4)) - 8 * PAGE


@pytest.mark.parametrize("refuse", ["open", "read"])
def test_filesystem_refusing_o_direct_gets_buffered_reads(saved, monkeypatch, refuse: str) -> None:
    path, state = saved
    calls = _Syscalls(monkeypatch, refuse=refuse)
    got = asyncckpt.load(path)
    monkeypatch.undo()
    _same(state, got)
    assert calls.refused >= 1 and calls.direct_bytes == 0  # it was tried, refused, and the load went on


def test_direct_read_refused_after_a_short_one_restarts_buffered_bit_exact(saved, monkeypatch) -> None:
    path, state = saved
    calls = _Syscalls(monkeypatch, refuse="second read")
    got = asyncckpt.load(path)
    monkeypatch.undo()
    _same(state, got)
    assert calls.refused >= 1 and calls.direct_bytes > 0


def test_storage_stops_trying_o_direct_once_refused(direct_dir, monkeypatch) -> None:
    data = np.random.default_rng(0).integers(0, 256, 4 * MiB, dtype=np.uint8)
    (direct_dir / "f").write_bytes(data.tobytes())
    storage = LocalStorage(direct_dir)
    try:
        calls = _Syscalls(monkeypatch, refuse="open")
        for _ in range(3):
            buf = read_buffer(3 * MiB, 4096)
            run_sync(storage.read_into("f", 4096, buf.data))
            assert buf.tobytes() == data[4096 : 4096 + 3 * MiB].tobytes()
        monkeypatch.undo()
        assert calls.refused == 1 and storage.direct_read is False
    finally:
        run_sync(storage.close())


def test_scattered_read_mixes_direct_and_buffered_pieces_bit_exact(direct_dir, monkeypatch) -> None:
    """Buffers of every placement (aligned like the file, not, small, odd lengths) in one read."""
    data = np.random.default_rng(1).integers(0, 256, 16 * MiB, dtype=np.uint8)
    (direct_dir / "f").write_bytes(data.tobytes())
    start = 100
    lengths = [3 * MiB + 5, 1000, 2 * MiB, 4 * MiB + 4095, 64, 3 * MiB]
    bufs: list[np.ndarray] = []
    pos = start
    for i, n in enumerate(lengths):
        if i == 3:
            bufs.append(_misplaced(n, pos))  # not placed: O_DIRECT through a scratch buffer
        else:
            bufs.append(read_buffer(n, pos))
        pos += n
    storage = LocalStorage(direct_dir)
    try:
        calls = _Syscalls(monkeypatch)
        run_sync(storage.read_into_scattered("f", start, [b.data for b in bufs]))
        monkeypatch.undo()
    finally:
        run_sync(storage.close())
    assert np.concatenate(bufs).tobytes() == data[start:pos].tobytes()
    assert calls.direct_bytes >= 3 * MiB + 2 * MiB + 4 * MiB + 3 * MiB - 8 * PAGE
    # Each direct run goes as 2 MiB pieces, read at once by the process's direct-read threads.
    assert calls.direct_calls >= 2 + 1 + 2
    assert any(name.startswith("asyncckpt-dread") for name in calls.direct_threads)
    assert calls.direct_bytes + calls.buffered_bytes == pos - start


def _misplaced(n: int, file_offset: int, by: int = 64) -> np.ndarray:
    """A writable buffer of ``n`` bytes whose address disagrees with ``file_offset`` modulo the page size."""
    base = np.empty(n + 2 * PAGE, dtype=np.uint8)
    start = (file_offset - base.ctypes.data + by) % PAGE
    out = base[start : start + n]
    assert out.ctypes.data % PAGE != file_offset % PAGE
    return out


@pytest.mark.parametrize("file_offset", [0, 100, PAGE, 3 * PAGE + 4000])
@pytest.mark.parametrize("length", [MiB, 2 * MiB, 5 * MiB + 3, 7 * MiB + PAGE - 1])
def test_buffer_not_placed_like_the_file_is_read_with_o_direct_through_scratch(direct_dir, monkeypatch,
                                                                                file_offset: int, length: int) -> None:
    """A caller's buffer (a DCP target tensor) rarely agrees with the file modulo the page size: the
    whole pages of the file it covers still come through O_DIRECT, via a page-aligned scratch
    buffer and one copy, bit-exact, the rest buffered."""
    data = np.random.default_rng(length).integers(0, 256, file_offset + length + PAGE, dtype=np.uint8)
    (direct_dir / "f").write_bytes(data.tobytes())
    buf = _misplaced(length, file_offset)
    storage = LocalStorage(direct_dir)
    try:
        calls = _Syscalls(monkeypatch)
        run_sync(storage.read_into("f", file_offset, buf.data))
        monkeypatch.undo()
    finally:
        run_sync(storage.close())
    assert buf.tobytes() == data[file_offset : file_offset + length].tobytes()
    whole_pages = (file_offset + length) // PAGE * PAGE - -(-file_offset // PAGE) * PAGE
    assert calls.direct_bytes == (whole_pages if whole_pages >= MiB else 0)
    assert calls.direct_bytes + calls.buffered_bytes == length


@pytest.mark.parametrize("refuse", ["open", "read", "second read"])
def test_scratch_direct_read_refused_restarts_buffered_bit_exact(direct_dir, monkeypatch, refuse: str) -> None:
    data = np.random.default_rng(9).integers(0, 256, 9 * MiB, dtype=np.uint8)
    (direct_dir / "f").write_bytes(data.tobytes())
    buf = _misplaced(6 * MiB + 10, 300)
    storage = LocalStorage(direct_dir)
    try:
        calls = _Syscalls(monkeypatch, refuse=refuse)
        run_sync(storage.read_into("f", 300, buf.data))
        monkeypatch.undo()
        assert buf.tobytes() == data[300 : 300 + 6 * MiB + 10].tobytes()
        assert calls.refused >= 1 and storage.direct_read is False
    finally:
        run_sync(storage.close())


def test_scratch_direct_read_of_a_truncated_file_says_truncated(direct_dir) -> None:
    (direct_dir / "f").write_bytes(b"\1" * (3 * MiB))
    buf = _misplaced(4 * MiB, 0)
    storage = LocalStorage(direct_dir)
    try:
        with pytest.raises(asyncckpt.IntegrityError, match="truncated"):
            run_sync(storage.read_into("f", 0, buf.data))
    finally:
        run_sync(storage.close())


def test_flipped_byte_in_a_direct_read_is_caught_and_into_untouched(saved, monkeypatch) -> None:
    path, state = saved
    m = _manifest(path)
    e = next(e for e in m.entries if e.key == "big2")
    at = e.offset + e.nbytes // 2  # inside the page-aligned middle: read with O_DIRECT
    with open(path / "rank-00000.data", "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x04]))
    into = {k: torch.full_like(v, -1.0) for k, v in state.items()}
    calls = _Syscalls(monkeypatch)
    for call in (lambda: asyncckpt.load(path), lambda: asyncckpt.load(path, into=into)):
        with pytest.raises(asyncckpt.IntegrityError, match=r"rank-00000\.data: checksum mismatch.*big2"):
            call()
    monkeypatch.undo()
    assert calls.direct_bytes > 0
    assert all(bool((v == -1.0).all()) for v in into.values())


def test_small_chunks_split_inside_a_tensor_read_direct(direct_dir, monkeypatch) -> None:
    """Chunk boundaries inside a tensor: every chunk's part of it is still read in place."""
    g = torch.Generator().manual_seed(4)
    state = {"a": torch.randn(100, generator=g), "w": torch.randn((12 * MiB + 44) // 4, generator=g)}
    ck = asyncckpt.AsyncCheckpointer(chunk_size=5 * MiB)
    try:
        ck.save(state, direct_dir / "c")
        ck.finalize(blocking=True)
    finally:
        ck.close()
    calls = _Syscalls(monkeypatch)
    got = asyncckpt.load(direct_dir / "c")
    monkeypatch.undo()
    _same(state, got)
    assert calls.direct_bytes >= state["w"].nbytes - 6 * PAGE


def _dcp_small_items() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {f"s{i:02d}": torch.randn(16_000 + i, generator=g) for i in range(40)}  # ~2.5 MiB, coalesced


@pytest.fixture
def dcp_saved(direct_dir: Path) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageWriter

    sd = _dcp_small_items()
    dcp.save(sd, storage_writer=AsyncStorageWriter(str(direct_dir / "ck")))
    yield direct_dir / "ck", sd


def test_dcp_staged_ranges_are_read_with_o_direct(dcp_saved, monkeypatch) -> None:
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader

    path, sd = dcp_saved
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    calls = _Syscalls(monkeypatch)
    dcp.load(got, storage_reader=AsyncStorageReader(str(path)))
    monkeypatch.undo()
    _same(sd, got)
    assert calls.direct_bytes >= 2 * MiB


def test_dcp_large_items_land_in_their_targets_through_o_direct(direct_dir, monkeypatch) -> None:
    """dcp.load reads a large item straight into the caller's tensor, whose address has nothing to
    do with the item's offset in its .distcp file: still O_DIRECT (through scratch), still verified."""
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader, AsyncStorageWriter

    g = torch.Generator().manual_seed(6)
    sd = {f"w{i}": torch.randn((3 * MiB + 44 * i) // 4, generator=g) for i in range(3)}
    dcp.save(sd, storage_writer=AsyncStorageWriter(str(direct_dir / "big")))
    got = {k: torch.empty_like(v) for k, v in sd.items()}
    calls = _Syscalls(monkeypatch)
    dcp.load(got, storage_reader=AsyncStorageReader(str(direct_dir / "big"), verify=True))
    monkeypatch.undo()
    _same(sd, got)
    assert calls.direct_bytes >= sum(v.nbytes for v in sd.values()) - 6 * PAGE


def test_dcp_flipped_byte_in_a_direct_staged_read_is_caught(dcp_saved, monkeypatch) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from asyncckpt.dcp import AsyncStorageReader

    path, sd = dcp_saved
    md = AsyncStorageReader(str(path)).read_metadata()
    info = next(v for idx, v in md.storage_data.items() if idx.fqn == "s20")
    at = int(info.offset) + int(info.length) // 2
    with open(path / info.relative_path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))
    calls = _Syscalls(monkeypatch)
    with pytest.raises(CheckpointException) as ei:
        dcp.load({k: torch.zeros_like(v) for k, v in sd.items()}, storage_reader=AsyncStorageReader(str(path)))
    monkeypatch.undo()
    err = next(iter(ei.value.failures.values()))[0]
    assert isinstance(err, asyncckpt.IntegrityError) and "'s20'" in str(err) and "checksum mismatch" in str(err)
    assert calls.direct_bytes > 0


def test_a_file_removed_between_the_two_opens_of_a_direct_read_is_not_found(direct_dir, monkeypatch) -> None:
    """An overwrite may remove the data file a load is about to read: between the plain open and
    the O_DIRECT one. That must read as "not found" (which makes load() read the new checkpoint),
    not as a failed read."""
    data = np.random.default_rng(2).integers(0, 256, 4 * MiB, dtype=np.uint8)
    (direct_dir / "f").write_bytes(data.tobytes())
    storage = LocalStorage(direct_dir)
    real_open = os.open

    def open_after_unlink(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT and Path(path).name == "f":
            os.unlink(path)
        return real_open(path, flags, *args, **kwargs)

    try:
        monkeypatch.setattr(os, "open", open_after_unlink)
        buf = read_buffer(3 * MiB, 4096)
        with pytest.raises(CheckpointNotFoundError, match="does not exist"):
            run_sync(storage.read_into("f", 4096, buf.data))
        monkeypatch.undo()
        assert storage.direct_read  # a vanished file says nothing about O_DIRECT
    finally:
        run_sync(storage.close())
