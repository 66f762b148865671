"""Serializing DCP items into ``.distcp`` files, streamed in checksummed parts to a storage backend.

Each item is written exactly as torch's FileSystemWriter writes it: a tensor as its own
``torch.save`` archive, a bytes item raw; items follow each other with no gaps. With DCP stream
extensions (``_extensions=[ZStandard()]``) each item goes through the extensions' ``transform_to``
streams, as FileSystemWriter does, and its descriptors are recorded. The bytes are
streamed through :class:`PartSink` (runs on a plain thread) into ``chunk_size`` parts that are
written by the backend on its event loop, several in flight, so memory stays at
``(concurrency + 1) * chunk_size`` per file whatever the checkpoint size.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import io
import mmap
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import numpy as np
import torch

from ..errors import CheckpointError, StorageError
from ..format import byte_view, checksum
from ..format.torchzip import TorchZip, plain_save, record, save_layout
from ..storage import ObjectWriter, Storage, join_key
from ._format import FileRecord, ItemRecord

__all__ = [
    "BLOCK", "DIRECT_MIN", "FileSpec", "ItemSpec", "PartSink", "data_positions", "exact_cpu_tensor", "transform_stream",
    "write_file", "write_order",
]


@dataclass
class ItemSpec:
    """One write item as the writer needs it (plain values: it travels to the worker)."""

    fqn: str
    chunk_offset: tuple[int, ...] | None
    index: int | None
    kind: str  # "tensor" or "bytes"
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    nbytes: int
    slot_offset: int = 0  # where its raw bytes sit in the worker's staging slot


@dataclass
class FileSpec:
    name: str
    items: list[int]  # indices into the job's item list


def exact_cpu_tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor whose storage holds exactly its bytes (torch.save writes whole storages)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


DIRECT_MIN = 1 << 20  #: smaller writes are cheaper gathered than sent as parts of their own
BLOCK = 4096  #: O_DIRECT's unit: a large item's bytes sit in the slot at their file offset modulo this


def write_order(spec: FileSpec, items: Sequence[ItemSpec]) -> list[int]:
    """The order ``spec``'s items follow each other in its file: bytes items, then tensors (FileSystemWriter's)."""
    return [i for i in spec.items if items[i].kind == "bytes"] + [i for i in spec.items if items[i].kind != "bytes"]


@functools.lru_cache(maxsize=4096)
def _tensor_archive(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int | None, int]:
    """(where the data starts, the archive's size) of a one-tensor torch.save of a contiguous CPU tensor."""
    records, size = save_layout(torch.empty(shape, dtype=dtype))
    return (records[0][0] if len(records) == 1 else None), size


def data_positions(files: Sequence[FileSpec], items: Sequence[ItemSpec]) -> dict[int, int]:
    """Where the bytes of each tensor item of at least :data:`DIRECT_MIN` bytes will start in its file
    (item index -> file offset), found by ``skip_data`` saves of empty tensors of the items' shapes
    (cached per dtype and shape). A file whose layout cannot be found is left out: its items are
    then written buffered, which changes nothing but speed."""
    out: dict[int, int] = {}
    for spec in files:
        if not any(items[i].nbytes >= DIRECT_MIN and items[i].kind != "bytes" for i in spec.items):
            continue
        order = write_order(spec, items)
        last = max(k for k, i in enumerate(order) if items[i].kind != "bytes" and items[i].nbytes >= DIRECT_MIN)
        pos = 0
        for i in order[: last + 1]:  # what follows the last large item does not matter
            it = items[i]
            if it.kind == "bytes":
                pos += it.nbytes
                continue
            assert it.dtype is not None
            try:
                start, size = _tensor_archive(it.dtype, tuple(it.shape))
            except Exception:  # noqa: BLE001 - a placement hint only; the write reports real errors
                break
            if start is not None and it.nbytes >= DIRECT_MIN:
                out[i] = pos + start
            pos += size
    return out


def _address(view: memoryview) -> int:
    """The address of a contiguous buffer's first byte (read-only buffers too)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


class PartSink(io.RawIOBase):
    """A write-only stream that cuts what it is given into parts and writes them to ``key``.

    Runs on a thread other than ``loop``'s; every storage call is a coroutine run on ``loop``.
    Tracks the CRC32C of the bytes written since the last :meth:`start_item`. At most
    ``concurrency`` parts are in flight.

    ``source``: memory that outlives the sink (the staging slot). A write of at least 1 MiB
    (and of the backend's smallest part) that lies inside it (torch.save hands over a tensor's own
    bytes) is sent as parts that point into ``source``, with no copy; everything else is gathered in
    ``chunk_size`` buffers.

    ``size``: the file's size, when known before the first byte. The writer is then opened knowing
    it (a large local file writes its aligned parts with O_DIRECT), and on a backend that takes
    parts of any size, a direct write whose bytes sit in memory at their file offset modulo
    :data:`BLOCK` is cut at block boundaries: the aligned middle goes out as parts of its own, its
    head and tail are gathered with their neighbours.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        storage: Storage,
        key: str,
        chunk_size: int,
        concurrency: int,
        timeout: float | None = None,
        source: memoryview | None = None,
        size: int | None = None,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._storage = storage
        self._key = key
        self._chunk = chunk_size
        self._min_part = max(1, min(chunk_size, storage.capabilities.min_part_size))
        self._direct_min = max(self._min_part, DIRECT_MIN)
        self._size = size
        self._align = BLOCK if size is not None and self._min_part <= BLOCK else 0
        self._concurrency = max(1, concurrency)
        self._timeout = timeout
        self._writer: ObjectWriter | None = None
        self._free: list[mmap.mmap] = []
        self._cur: mmap.mmap | None = None  # allocated at the first byte to gather
        self._fill = 0
        self._base = 0  # file offset of the gathered buffer's first byte
        self._part = 0
        self._pending: deque[tuple[concurrent.futures.Future[Any], mmap.mmap | None]] = deque()
        self._source = source
        self._src_addr = _address(source) if source is not None else 0
        self.pos = 0
        self.crc = 0

    # -- io.RawIOBase ---------------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:  # parts go out when full; commit() sends the rest
        return None

    def write(self, b: Any) -> int:
        mv = byte_view(b)
        n = len(mv)
        if n == 0:
            return 0
        self.crc = checksum(mv, self.crc)
        direct = self._in_source(mv) if n >= self._direct_min else None
        if direct is not None:
            self._write_direct(direct)
        else:
            self._gather(mv)
        self.pos += n
        return n

    def _in_source(self, mv: memoryview) -> memoryview | None:
        """``mv``'s bytes as a slice of ``source`` when they lie inside it (else None)."""
        if self._source is None:
            return None
        off = _address(mv) - self._src_addr
        if off < 0 or off + len(mv) > len(self._source):
            return None
        return self._source[off : off + len(mv)]

    def _gather(self, mv: memoryview) -> None:
        i, n = 0, len(mv)
        while i < n:
            if self._cur is None:
                self._cur = self._buffer()
            take = min(self._chunk - self._fill, n - i)
            self._cur[self._fill : self._fill + take] = mv[i : i + take]
            self._fill += take
            i += take
            if self._fill == self._chunk:
                self._send_gathered()

    def _write_direct(self, view: memoryview) -> None:
        if self._align and self._write_aligned(view):
            return
        # The gathered bytes before it go first, as their own part when that is allowed; else
        # they are topped up from ``view`` to the smallest allowed part.
        if 0 < self._fill < self._min_part:
            take = self._min_part - self._fill
            self._gather(view[:take])
            view = view[take:]
        if self._fill:
            self._send_gathered()
        while len(view) >= self._min_part:
            n = min(self._chunk, len(view))
            self._submit(view[:n], self._base, None)
            self._base += n
            view = view[n:]
        if len(view):  # a tail too small for a part of its own starts the next gathered one
            self._gather(view)

    def _write_aligned(self, view: memoryview) -> bool:
        """Send ``view``'s block-aligned middle as parts of its own (False: its address and file offset
        disagree modulo the block, or it holds no whole block)."""
        a = self._align
        head = -self.pos % a
        body = (len(view) - head) // a * a
        if body <= 0 or (_address(view) + head) % a:
            return False
        self._gather(view[:head])
        if self._fill:
            self._send_gathered()
        step = max(a, self._chunk // a * a)
        for o in range(head, head + body, step):
            n = min(step, head + body - o)
            self._submit(view[o : o + n], self._base, None)
            self._base += n
        self._gather(view[head + body :])
        return True

    # -- items ----------------------------------------------------------------------------------
    def start_item(self) -> int:
        self.crc = 0
        return self.pos

    # -- parts ----------------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._timeout)

    def _check_failed(self) -> None:
        for fut, _ in self._pending:
            if fut.done() and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]

    def _buffer(self) -> mmap.mmap:
        # At most ``concurrency`` parts are in flight and one buffer gathers: buffers are reused.
        # Anonymous mappings: only the pages a part fills are ever faulted in (a bytearray zeroes
        # all of its chunk_size bytes first, which cost more than the writes it gathered).
        return self._free.pop() if self._free else mmap.mmap(-1, self._chunk)

    def _submit(self, data: memoryview, offset: int, buf: mmap.mmap | None, size_hint: int | None = None) -> None:
        if self._writer is None:
            hint = self._size if self._size is not None else size_hint
            self._writer = self._run(self._storage.open_writer(self._key, size_hint=hint))
        self._check_failed()
        while len(self._pending) >= self._concurrency:
            done, old = self._pending.popleft()
            done.result(self._timeout)
            if old is not None:
                self._free.append(old)
        fut = asyncio.run_coroutine_threadsafe(self._writer.write_part(self._part, offset, data), self._loop)
        self._pending.append((fut, buf))
        self._part += 1

    def _send_gathered(self, size_hint: int | None = None) -> None:
        data = memoryview(self._cur)[: self._fill] if self._cur is not None else memoryview(b"")
        self._submit(data, self._base, self._cur, size_hint)
        self._base += self._fill
        self._fill = 0
        self._cur = None

    def commit(self) -> None:
        """Send the last part, wait for every part, make the object durable and visible."""
        if self._fill or self._part == 0:
            # A file that fits one part is opened knowing its size (one PUT on S3).
            self._send_gathered(size_hint=self._fill if self._writer is None else None)
        while self._pending:
            fut, buf = self._pending.popleft()
            fut.result(self._timeout)
            if buf is not None:
                self._free.append(buf)
        assert self._writer is not None
        self._run(self._writer.commit())

    def abort(self) -> None:
        """Wait for parts in flight (never leave a write running on a reused buffer), then discard."""
        while self._pending:
            fut, _ = self._pending.popleft()
            try:
                fut.result(self._timeout)
            except BaseException:  # noqa: BLE001 - the original error is what matters
                pass
        if self._writer is not None:
            try:
                self._run(self._writer.abort())
            except BaseException:  # noqa: BLE001
                pass


class _NoClose(io.RawIOBase):
    """The part sink as an extension's output: closing the transform must not close the file."""

    def __init__(self, sink: PartSink) -> None:
        super().__init__()
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self._sink.write(b)

    def close(self) -> None:  # the transform closes its output when it ends; the file goes on
        return None


def transform_stream(sink: PartSink, extensions: Sequence[Any]) -> tuple[Any, list[str]]:
    """Stack ``extensions``' ``transform_to`` over ``sink``; also return the descriptors to record
    (outermost transform last, the order DCP's readers undo them in)."""
    out: Any = _NoClose(sink)
    for ex in extensions:
        out = ex.transform_to(out)
    return out, [ex.get_descriptor() for ex in reversed(extensions)]


_CRC_SPAN = 4 << 20  # small spans: an item's CRC-32 is spread over torchzip's threads


def _write_archive(out: Any, zf: TorchZip) -> None:
    """A recorded ``torch.save(tensor)``'s bytes, its data written from the memory it was recorded
    over (no copy), its CRC-32s computed on two threads instead of by torch on this one
    (:mod:`asyncckpt.format.torchzip`)."""
    zf.checksum(_CRC_SPAN)
    for view in zf.views():
        out.write(view)


def write_file(
    loop: asyncio.AbstractEventLoop,
    storage: Storage,
    name: str,
    spec: FileSpec,
    items: list[ItemSpec],
    get_data: Callable[[int], Any],
    *,
    chunk_size: int,
    concurrency: int,
    extensions: Sequence[Any] = (),
    source: memoryview | None = None,
) -> tuple[FileRecord, list[ItemRecord], list[list[str] | None]]:
    """Serialize ``spec``'s items into ``name/spec.name`` (call from a thread, not ``loop``'s).

    ``source``: the memory ``get_data``'s values live in, if it outlives the call (see
    :class:`PartSink`); their bytes are then written from it without a copy.

    Returns the file's record, its items' records and each item's transform descriptors.
    """
    key = join_key(name, spec.name)
    order = write_order(spec, items)
    # Without transforms every item's size is known before its first byte goes out (a tensor's
    # archive is recorded, its data not read): the file is opened knowing its size.
    archives: dict[int, TorchZip] = {}
    size: int | None = None
    if source is not None and not extensions:
        archives = {i: record(get_data(i), source) for i in order if items[i].kind != "bytes"}
        size = sum(archives[i].size if i in archives else items[i].nbytes for i in order)
    sink = PartSink(loop, storage, key, chunk_size, concurrency, source=source, size=size)
    records: list[ItemRecord] = []
    transforms: list[list[str] | None] = []
    try:
        for i in order:
            it = items[i]
            start = sink.start_item()
            data = None if i in archives else get_data(i)
            out, descriptors = transform_stream(sink, extensions) if extensions else (sink, [])
            if it.kind == "bytes":
                out.write(data)
            elif i in archives:
                _write_archive(out, archives.pop(i))
            elif source is not None:
                _write_archive(out, record(data, source))
            else:
                plain_save(data, cast(IO[bytes], out))  # a writable file object is all torch.save needs
            if extensions:
                out.close()  # flushes the transforms' last bytes into the sink
            transforms.append(descriptors or None)
            del data, out
            records.append(
                ItemRecord(
                    fqn=it.fqn,
                    chunk_offset=list(it.chunk_offset) if it.chunk_offset is not None else None,
                    index=it.index,
                    file=spec.name,
                    offset=start,
                    length=sink.pos - start,
                    crc32c=sink.crc,
                    kind="bytes" if it.kind == "bytes" else "tensor",
                )
            )
        sink.commit()
    except BaseException as exc:
        sink.abort()
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise StorageError(f"writing {storage.uri}/{key} failed: {type(exc).__name__}: {exc}") from exc
        raise
    return FileRecord(name=spec.name, nbytes=sink.pos), records, transforms
