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
import io
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import torch

from ..errors import CheckpointError, StorageError
from ..format import checksum
from ..storage import ObjectWriter, Storage, join_key
from ._format import FileRecord, ItemRecord

__all__ = ["FileSpec", "ItemSpec", "PartSink", "exact_cpu_tensor", "transform_stream", "write_file"]


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


class PartSink(io.RawIOBase):
    """A write-only stream that cuts what it is given into parts and writes them to ``key``.

    Runs on a thread other than ``loop``'s; every storage call is a coroutine run on ``loop``.
    Tracks the CRC32C of the bytes written since the last :meth:`start_item`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        storage: Storage,
        key: str,
        chunk_size: int,
        concurrency: int,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._storage = storage
        self._key = key
        self._chunk = chunk_size
        self._concurrency = max(1, concurrency)
        self._timeout = timeout
        self._writer: ObjectWriter | None = None
        self._free: list[bytearray] = []
        self._nbufs = 1
        self._cur = bytearray(chunk_size)
        self._fill = 0
        self._part = 0
        self._pending: deque[tuple[concurrent.futures.Future[Any], bytearray]] = deque()
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
        mv = memoryview(b)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        if n == 0:
            return 0
        self.crc = checksum(mv, self.crc)
        i = 0
        while i < n:
            take = min(self._chunk - self._fill, n - i)
            self._cur[self._fill : self._fill + take] = mv[i : i + take]
            self._fill += take
            i += take
            if self._fill == self._chunk:
                self._send_part()
        self.pos += n
        return n

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

    def _send_part(self, size_hint: int | None = None) -> None:
        if self._writer is None:
            self._writer = self._run(self._storage.open_writer(self._key, size_hint=size_hint))
        self._check_failed()
        data = memoryview(self._cur)[: self._fill]
        fut = asyncio.run_coroutine_threadsafe(self._writer.write_part(self._part, self._part * self._chunk, data), self._loop)
        self._pending.append((fut, self._cur))
        self._part += 1
        self._fill = 0
        if self._free:
            self._cur = self._free.pop()
        elif self._nbufs <= self._concurrency:
            self._cur = bytearray(self._chunk)
            self._nbufs += 1
        else:
            done, buf = self._pending.popleft()
            done.result(self._timeout)
            self._cur = buf

    def commit(self) -> None:
        """Send the last part, wait for every part, make the object durable and visible."""
        if self._fill or self._part == 0:
            # A file that fits one part is opened knowing its size (one PUT on S3).
            self._send_part(size_hint=self._fill if self._writer is None else None)
        while self._pending:
            fut, buf = self._pending.popleft()
            fut.result(self._timeout)
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
) -> tuple[FileRecord, list[ItemRecord], list[list[str] | None]]:
    """Serialize ``spec``'s items into ``name/spec.name`` (call from a thread, not ``loop``'s).

    Returns the file's record, its items' records and each item's transform descriptors.
    """
    key = join_key(name, spec.name)
    sink = PartSink(loop, storage, key, chunk_size, concurrency)
    records: list[ItemRecord] = []
    transforms: list[list[str] | None] = []
    try:
        # Bytes items first, then tensors: the order FileSystemWriter uses.
        order = [i for i in spec.items if items[i].kind == "bytes"] + [i for i in spec.items if items[i].kind != "bytes"]
        for i in order:
            it = items[i]
            start = sink.start_item()
            data = get_data(i)
            out, descriptors = transform_stream(sink, extensions) if extensions else (sink, [])
            if it.kind == "bytes":
                out.write(data)
            else:
                torch.save(data, cast(IO[bytes], out))  # a writable file object is all torch.save needs
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
