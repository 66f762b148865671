"""Chunk geometry and the one verified-chunk reader (load, tier drain, verify and export use it).

A rank's data image (``data_nbytes`` bytes: every entry at its offset) is cut into chunks of
``chunk_size`` bytes; chunk ``i`` holds image bytes ``[i * chunk_size, min(data_nbytes, (i + 1) *
chunk_size))``. The data file stores the chunks back to back, each as written: its bytes are the
image itself unless a chunk is compressed (see :mod:`asyncckpt.format.compression`), then each
chunk's stored length is recorded in the manifest. Every stored chunk is covered by its CRC32C.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import mmap
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import msgspec
import numpy as np

from .._loop import gather_or_cancel
from ..errors import BadInputError, CheckpointNotFoundError, IntegrityError
from ..storage.base import ReadsScattered
from .compression import decode_chunk, decode_chunk_into
from .crc import checksum
from .records import ChunkInfo, RankManifest

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = [
    "ALIGNED_MIN",
    "READ_CONCURRENCY",
    "Chunk",
    "ChunkGeometry",
    "byte_view",
    "check_data_file",
    "chunk_count",
    "keys_in_range",
    "read_buffer",
    "read_chunk",
    "read_chunks",
    "read_entries",
    "read_entries_into",
    "verify_rank",
]

#: Chunks read at once by default.
READ_CONCURRENCY = 4
#: Buffers at least this large come from :func:`read_buffer`'s own page-aligned mapping.
ALIGNED_MIN = 1 << 20


def byte_view(b: Any) -> memoryview:
    """``b`` (any buffer a file's ``write`` may be handed) as a flat memoryview of bytes."""
    mv = memoryview(b)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def read_buffer(nbytes: int, stored_offset: int = 0) -> np.ndarray:
    """A writable ``uint8`` array of ``nbytes`` to read the bytes at ``stored_offset`` of a file into.

    A large one (``ALIGNED_MIN`` or more) is placed so that its address and ``stored_offset``
    agree modulo the page size: a backend can then read its page-aligned middle with direct I/O
    (local: O_DIRECT) straight from the disk, without the page cache's copy. It is a slice of an
    ordinary allocation one page larger (not a mapping of its own: memory the allocator hands out
    again is already faulted in, a fresh mapping pays a page fault per page every time).
    """
    if nbytes < ALIGNED_MIN:
        return np.empty(nbytes, dtype=np.uint8)
    base = np.empty(nbytes + mmap.PAGESIZE, dtype=np.uint8)
    start = (stored_offset - base.ctypes.data) % mmap.PAGESIZE
    return base[start : start + nbytes]


def chunk_count(nbytes: int, chunk_size: int) -> int:
    """How many chunks of ``chunk_size`` hold ``nbytes`` bytes."""
    return -(-nbytes // chunk_size) if nbytes else 0


@dataclass(frozen=True)
class ChunkGeometry:
    """Where chunk ``i`` lies in the data image (``raw``) and in the data file (``stored``)."""

    nbytes: int
    chunk_size: int
    stored_starts: tuple[int, ...]  # stored offset of every chunk, then the data file's size

    @classmethod
    def of(cls, m: RankManifest) -> ChunkGeometry:
        if m.chunks is not msgspec.UNSET:
            sizes = [c.stored_nbytes for c in m.chunks]
        else:
            n = chunk_count(m.data_nbytes, m.chunk_size)
            sizes = [min(m.chunk_size, m.data_nbytes - i * m.chunk_size) for i in range(n)]
        return cls(m.data_nbytes, m.chunk_size, (0, *itertools.accumulate(sizes)))

    def __len__(self) -> int:
        return len(self.stored_starts) - 1

    def raw(self, i: int) -> tuple[int, int]:
        """(start, length) of chunk ``i`` in the data image."""
        start = i * self.chunk_size
        return start, min(self.chunk_size, self.nbytes - start)

    def stored(self, i: int) -> tuple[int, int]:
        """(start, length) of chunk ``i`` in the data file."""
        return self.stored_starts[i], self.stored_starts[i + 1] - self.stored_starts[i]

    @property
    def stored_nbytes(self) -> int:
        """The data file's exact size."""
        return self.stored_starts[-1]

    def covering(self, start: int, end: int) -> range:
        """The chunks holding image bytes ``[start, end)``."""
        if end <= start:
            return range(0)
        return range(start // self.chunk_size, (end - 1) // self.chunk_size + 1)


def keys_in_range(m: RankManifest, start: int, end: int) -> list[str]:
    """The keys whose bytes lie in ``[start, end)`` of the data image (views by their storage), for messages."""
    hit = {i for i, e in enumerate(m.entries)
           if e.view_of < 0 and e.ref < 0 and e.nbytes and e.offset < end and e.offset + e.nbytes > start}
    storages = {e.view_of for e in m.entries if e.view_of >= 0}
    keys = [e.key for i, e in enumerate(m.entries) if (i in hit and i not in storages) or e.view_of in hit]
    return keys or ["<padding>"]


def _keys(m: RankManifest, start: int, end: int) -> str:
    keys = keys_in_range(m, start, end)
    return ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")


@dataclass(frozen=True)
class Chunk:
    """One verified chunk: ``data`` its image bytes from ``start`` (read-only), ``stored`` its bytes as in the file."""

    index: int
    start: int
    data: np.ndarray
    stored: np.ndarray
    crc: int  # CRC32C of ``stored``, as recorded


async def check_data_file(storage: Storage, m: RankManifest) -> None:
    """The data file exists and has the size the manifest implies (checked before anything is read)."""
    where = f"{storage.uri}/{m.data_file}"
    want = ChunkGeometry.of(m).stored_nbytes
    try:
        size = await storage.size(m.data_file)
    except CheckpointNotFoundError as exc:
        raise IntegrityError(f"{where}: data file of rank {m.rank} is missing") from exc
    if size != want:
        what = "truncated" if size < want else "extended"
        raise IntegrityError(f"{where}: data file is {what}: {size} bytes, manifest says {want}")


def _check_crc(storage: Storage, m: RankManifest, geo: ChunkGeometry, i: int, crc: int) -> None:
    """Raise the IntegrityError naming the file, the stored bytes and the keys of chunk ``i`` unless ``crc`` is its."""
    if crc != m.chunk_checksums[i]:
        start, n = geo.raw(i)
        sstart, sn = geo.stored(i)
        raise IntegrityError(
            f"{storage.uri}/{m.data_file}: checksum mismatch: bytes [{sstart}, {sstart + sn}) fail their checksum "
            f"(crc32c {crc:#010x}, expected {m.chunk_checksums[i]:#010x}); affected keys: {_keys(m, start, start + n)}. "
            "The checkpoint is corrupt: load an older one."
        )


async def read_chunk(storage: Storage, m: RankManifest, geo: ChunkGeometry, i: int, decode: bool = True) -> Chunk:
    """Read chunk ``i`` and verify its CRC32C, then (``decode``) decompress it and verify its raw bytes'.

    A mismatch names the file, the bytes and the keys in them. Without ``decode`` (a copy that
    keeps the chunk as stored) ``data`` is the stored bytes.
    """
    start, n = geo.raw(i)
    sstart, sn = geo.stored(i)
    stored = np.empty(sn, dtype=np.uint8)
    await storage.read_into(m.data_file, sstart, stored.data)
    crc = await asyncio.to_thread(checksum, stored.data)
    _check_crc(storage, m, geo, i, crc)
    data = stored
    if decode and m.chunks is not msgspec.UNSET and m.chunks[i].codec != "none":
        where = (f"{storage.uri}/{m.data_file}: chunk {i} (stored bytes [{sstart}, {sstart + sn}), image bytes "
                 f"[{start}, {start + n}); keys: {_keys(m, start, start + n)})")
        data = await asyncio.to_thread(decode_chunk, stored, m.chunks[i], n, where)
    return Chunk(i, start, data, stored, crc)


async def read_chunks(
    storage: Storage, m: RankManifest, on_chunk: Callable[[Chunk], Any], *,
    chunks: Collection[int] | None = None, concurrency: int = READ_CONCURRENCY,
    on_error: Callable[[int, IntegrityError], Any] | None = None, check_size: bool = True,
) -> None:
    """Read and verify the chunks ``chunks`` (all by default), several at once, handing each verified
    chunk to ``on_chunk`` (run in a thread, in no particular order).

    A chunk that fails verification raises :class:`IntegrityError`, or, with ``on_error``, is
    passed to it and the others are still read. ``check_size`` first checks the data file's size.
    """
    if check_size:
        await check_data_file(storage, m)
    geo = ChunkGeometry.of(m)
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(i: int) -> None:
        async with sem:
            try:
                chunk = await read_chunk(storage, m, geo, i)
            except IntegrityError as exc:
                if on_error is None:
                    raise
                on_error(i, exc)
                return
            await asyncio.to_thread(on_chunk, chunk)

    todo = range(len(geo)) if chunks is None else sorted(chunks)
    await gather_or_cancel(one(i) for i in todo)


async def read_entries(
    storage: Storage, m: RankManifest, wanted: Collection[int],
    on_bytes: Callable[[int, int, np.ndarray], Any], *, every_chunk: bool = True,
    progress: Callable[[int], Any] | None = None, concurrency: int = READ_CONCURRENCY, check_size: bool = True,
) -> None:
    """Read the verified bytes of the stored entries ``wanted`` (entries whose bytes are in this data file, not
    references: see ``catalog.read_references``): ``on_bytes(entry, offset in entry, bytes)``
    for each piece, in no particular order. ``every_chunk`` reads (and verifies) the whole file,
    otherwise only the chunks holding ``wanted``; ``progress`` gets each chunk's image length;
    ``check_size`` as for :func:`read_chunks`."""
    geo = ChunkGeometry.of(m)
    order = sorted((i for i in wanted if m.entries[i].nbytes), key=lambda i: m.entries[i].offset)
    chunks = None if every_chunk else {c for i in order for c in geo.covering(m.entries[i].offset,
                                                                              m.entries[i].offset + m.entries[i].nbytes)}
    offsets = [m.entries[i].offset for i in order]

    def on_chunk(chunk: Chunk) -> None:
        start, end = chunk.start, chunk.start + len(chunk.data)
        # Entries do not overlap: those before ``start`` cannot reach into this chunk but the last one.
        k = max(0, int(np.searchsorted(offsets, start, side="right")) - 1)
        while k < len(order) and m.entries[order[k]].offset < end:
            e = m.entries[order[k]]
            lo, hi = max(start, e.offset), min(end, e.offset + e.nbytes)
            if lo < hi:
                on_bytes(order[k], lo - e.offset, chunk.data[lo - start : hi - start])
            k += 1
        if progress is not None:
            progress(len(chunk.data))

    await read_chunks(storage, m, on_chunk, chunks=chunks, concurrency=concurrency, check_size=check_size)


def _crc_pieces(pieces: Sequence[memoryview]) -> int:
    crc = 0
    for p in pieces:
        crc = checksum(p, crc)
    return crc


async def _read_pieces(storage: Storage, key: str, offset: int, pieces: list[memoryview]) -> None:
    """Fill ``pieces`` in order from ``key`` at ``offset``: one scattered read where the backend offers it."""
    if storage.capabilities.scatter_read and isinstance(storage, ReadsScattered):
        await storage.read_into_scattered(key, offset, pieces)
    elif len(pieces) == 1:
        await storage.read_into(key, offset, pieces[0])
    else:  # one request for the range, then a copy: many small ranged GETs would cost more
        tmp = np.empty(sum(len(p) for p in pieces), dtype=np.uint8)
        await storage.read_into(key, offset, tmp.data)
        pos = 0
        for p in pieces:
            p[:] = tmp.data[pos : pos + len(p)]
            pos += len(p)


async def read_entries_into(
    storage: Storage, m: RankManifest, buffers: Mapping[int, np.ndarray], *, every_chunk: bool = True,
    concurrency: int = READ_CONCURRENCY, check_size: bool = True,
) -> None:
    """Read the stored entries ``buffers`` names (entry -> a writable ``uint8`` array of its ``nbytes``;
    entries whose bytes are in this data file) straight into those arrays, verifying every chunk.

    An uncompressed chunk is read in one scattered read into the arrays of the entries it spans
    (padding and bytes of entries not asked for go to scratch) and its CRC32C is computed over
    the bytes where they landed; a compressed one is read and verified, then decompressed into
    them (its raw CRC32C checked over them).
    Several chunks are in flight at once. On a mismatch the IntegrityError names the file, the
    bytes and the keys; the arrays then hold partial data and must be dropped by the caller.
    ``every_chunk`` and ``check_size`` as for :func:`read_entries`.
    """
    if check_size:
        await check_data_file(storage, m)
    geo = ChunkGeometry.of(m)
    order = sorted((i for i in buffers if m.entries[i].nbytes), key=lambda i: m.entries[i].offset)
    for i in order:
        if len(buffers[i]) != m.entries[i].nbytes or m.entries[i].ref >= 0 or m.entries[i].view_of >= 0:
            raise BadInputError(f"read_entries_into: the buffer for entry {i} ({m.entries[i].key!r}) is not the "
                                f"{m.entries[i].nbytes} bytes of an entry stored in {m.data_file}")
    offsets = [m.entries[i].offset for i in order]
    chunks = range(len(geo)) if every_chunk else sorted(
        {c for i in order for c in geo.covering(m.entries[i].offset, m.entries[i].offset + m.entries[i].nbytes)})
    codecs = [c.codec for c in m.chunks] if m.chunks is not msgspec.UNSET else ["none"] * len(geo)

    def spans(start: int, end: int) -> list[tuple[int, int, int]]:
        """(entry or -1 for scratch, image start, image end) covering ``[start, end)`` in order."""
        out: list[tuple[int, int, int]] = []
        pos = start
        k = max(0, bisect.bisect_right(offsets, start) - 1)
        while k < len(order) and offsets[k] < end:
            e = m.entries[order[k]]
            lo, hi = max(start, e.offset), min(end, e.offset + e.nbytes)
            if lo < hi:
                if lo > pos:
                    out.append((-1, pos, lo))
                out.append((order[k], lo, hi))
                pos = hi
            k += 1
        if pos < end:
            out.append((-1, pos, end))
        return out

    def dest(j: int, lo: int, hi: int) -> np.ndarray:
        off = m.entries[j].offset
        return buffers[j][lo - off : hi - off]

    async def one(i: int) -> None:
        start, n = geo.raw(i)
        parts = spans(start, start + n)
        scratch = np.empty(sum(hi - lo for j, lo, hi in parts if j < 0), dtype=np.uint8)
        pieces: list[memoryview] = []
        pos = 0
        for j, lo, hi in parts:
            if j >= 0:
                pieces.append(dest(j, lo, hi).data)
            else:
                pieces.append(scratch[pos : pos + hi - lo].data)
                pos += hi - lo
        if codecs[i] != "none":  # verify the stored frame, then decompress it into place
            stored = await read_chunk(storage, m, geo, i, decode=False)
            sstart, sn = geo.stored(i)
            where = (f"{storage.uri}/{m.data_file}: chunk {i} (stored bytes [{sstart}, {sstart + sn}), image bytes "
                     f"[{start}, {start + n}); keys: {_keys(m, start, start + n)})")
            await asyncio.to_thread(decode_chunk_into, stored.stored.data, cast(list[ChunkInfo], m.chunks)[i], pieces, where)
            return
        await _read_pieces(storage, m.data_file, geo.stored(i)[0], pieces)
        _check_crc(storage, m, geo, i, await asyncio.to_thread(_crc_pieces, pieces))

    sem = asyncio.Semaphore(max(1, concurrency))

    async def bounded(i: int) -> None:
        async with sem:
            await one(i)

    await gather_or_cancel(bounded(i) for i in chunks)


async def verify_rank(storage: Storage, m: RankManifest, progress: Callable[[int], Any] | None = None
                      ) -> tuple[int, list[str]]:
    """Read and verify every chunk of one rank's data file that is there; (image bytes checked, problems).

    A missing, truncated or extended file is a problem; the chunks it still holds are verified.
    """
    where = f"{storage.uri}/{m.data_file}"
    geo = ChunkGeometry.of(m)
    want = geo.stored_nbytes
    try:
        size = await storage.size(m.data_file)
    except CheckpointNotFoundError:
        if progress is not None:
            progress(m.data_nbytes)
        keys = [k for k in keys_in_range(m, 0, m.data_nbytes) if k != "<padding>"]
        return 0, [f"{where}: data file of rank {m.rank} is missing (keys: {', '.join(keys[:8])}"
                   f"{' ...' if len(keys) > 8 else ''})"]
    problems: dict[int, str] = {}
    if size != want:
        what = "truncated" if size < want else "longer than its manifest says"
        lost = [i for i in range(len(geo)) if sum(geo.stored(i)) > size]
        keys = keys_in_range(m, geo.raw(lost[0])[0], m.data_nbytes) if lost else []
        problems[-1] = (f"{where}: data file is {what}: {size} bytes, manifest says {want}"
                        + (f"; keys past the end: {', '.join(keys[:8])}" if keys else ""))
    readable = [i for i in range(len(geo)) if sum(geo.stored(i)) <= size]
    checked = 0

    def on_chunk(chunk: Chunk) -> None:
        nonlocal checked
        checked += len(chunk.data)
        if progress is not None:
            progress(len(chunk.data))

    def on_error(i: int, exc: IntegrityError) -> None:
        problems[i] = str(exc)
        if progress is not None:
            progress(geo.raw(i)[1])

    await read_chunks(storage, m, on_chunk, chunks=readable, on_error=on_error, check_size=False)
    if progress is not None and size < want:
        progress(sum(geo.raw(i)[1] for i in range(len(geo)) if i not in set(readable)))
    return checked, [problems[k] for k in sorted(problems)]
