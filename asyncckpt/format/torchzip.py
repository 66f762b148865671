"""``torch.save`` archives whose data records are written from memory we already hold.

Owns the one way the worker runs ``torch.save``: :func:`record` runs it into a recording file
with torch's own CRC-32 switched off, keeping the small writes (zip headers, the pickle, the
central directory) and noting each write that lies inside ``source`` (a tensor's bytes in the
staging slot) as a reference instead of a copy. :meth:`TorchZip.patch` then puts in the CRC-32s
the caller computed (on several threads, over :meth:`TorchZip.crc_spans`): each record's data
descriptor and central-directory entry, and the ``.data/serialization_id`` torch derives from
them, so the bytes are exactly what a plain ``torch.save`` writes.

``torch.serialization.set_crc32_options`` is process-global and read when torch's zip writer is
made, so every ``torch.save`` here (:func:`record` and :func:`plain_save`) runs under one lock:
no other save of this module ever sees the switch off.
"""

from __future__ import annotations

import bisect
import functools
import os
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, cast

import numpy as np
import torch

try:  # ISA-L's CRC-32 is the zip CRC-32 at ~20-30 GB/s a thread here, zlib's ~4-7 (releases the GIL too)
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - a platform without isal wheels: zlib's is the same function
    from zlib import crc32 as _crc32

from ..errors import CheckpointError
from .chunks import byte_view

__all__ = ["CRC_SPAN", "CRC_THREADS", "TorchZip", "crc32_combine", "data_offsets", "plain_save", "record", "save_layout"]

CRC_SPAN = 32 << 20  # a record's CRC-32 is computed in spans of this size (one thread each), then combined
CRC_THREADS = 2  # the CRC-32 releases the GIL
_CRC_POOL = ThreadPoolExecutor(CRC_THREADS, thread_name_prefix="asyncckpt-crc32")

_SAVE_LOCK = threading.Lock()
_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_DESCRIPTOR = b"PK\x07\x08"
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ID_RECORD = "/.data/serialization_id"
_MASK64 = (1 << 64) - 1
_POLY = 0xEDB88320  # CRC-32 (zip), reflected


def plain_save(obj: Any, f: Any, **kwargs: Any) -> None:
    """``torch.save(obj, f, **kwargs)`` with torch's CRC-32 on, never while :func:`record` has it off."""
    with _SAVE_LOCK:
        torch.save(obj, f, **kwargs)


class _Skipper:
    """The file object a ``skip_data`` torch.save writes to: notes where each data record starts."""

    def __init__(self) -> None:
        self.pos = 0
        self.skipped: list[tuple[int, int]] = []

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        self.pos += n
        return n

    def seek(self, n: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_CUR:
            raise CheckpointError("torch.save (skip_data) asked for an absolute seek; only relative ones are expected")
        self.skipped.append((self.pos, n))
        self.pos += n
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        return None


def data_offsets(obj: Any, **save_kwargs: Any) -> list[tuple[int, int]]:
    """(file offset, size) of each non-empty data record ``torch.save(obj, f, **save_kwargs)`` writes,
    in order, found without reading a tensor byte (``torch.serialization.skip_data``, thread-local)."""
    return save_layout(obj, **save_kwargs)[0]


def save_layout(obj: Any, **save_kwargs: Any) -> tuple[list[tuple[int, int]], int]:
    """:func:`data_offsets` and the size of the whole file ``torch.save(obj, f, **save_kwargs)`` writes."""
    rec = _Skipper()
    with torch.serialization.skip_data():
        torch.save(obj, cast(IO[bytes], rec), **save_kwargs)
    return rec.skipped, rec.pos


@dataclass
class _Piece:
    """One write call of torch's zip writer: ``data`` kept, or ``length`` bytes at ``src`` in the source."""

    offset: int
    length: int
    data: bytearray | None
    src: int = 0


@dataclass
class _Record:
    name: str
    local: int  # file offset of its local header
    data_offset: int
    size: int
    descriptor_crc: int  # file offset of the CRC field of the record's data descriptor (-1: none)
    central_crc: int  # file offset of the CRC field of its central-directory entry


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


class _Recorder:
    """The file object torch.save writes to: keeps small writes, notes writes inside ``source``."""

    def __init__(self, source: memoryview | None, min_ref: int) -> None:
        self.pieces: list[_Piece] = []
        self.pos = 0
        self._source = source
        self._base = _address(source) if source is not None else 0
        self._min_ref = min_ref

    def write(self, b: Any) -> int:
        mv = byte_view(b)
        n = len(mv)
        if n == 0:
            return 0
        src = _address(mv) - self._base if self._source is not None and n >= self._min_ref else -1
        if self._source is not None and 0 <= src and src + n <= len(self._source):
            self.pieces.append(_Piece(self.pos, n, None, src))
        else:
            self.pieces.append(_Piece(self.pos, n, bytearray(mv)))
        self.pos += n
        return n

    def flush(self) -> None:
        return None

    def tell(self) -> int:
        return self.pos


def record(obj: Any, source: memoryview | None = None, *, min_ref: int = 4096, **save_kwargs: Any) -> TorchZip:
    """Run ``torch.save(obj, <recorder>, **save_kwargs)`` with torch's CRC-32 off.

    Writes of at least ``min_ref`` bytes inside ``source`` are kept as references to it (so
    ``source`` must stay unchanged until the archive is written). Call :meth:`TorchZip.patch`
    before reading any byte of the result.
    """
    rec = _Recorder(source, min_ref)
    with _SAVE_LOCK:
        if not hasattr(torch.serialization, "set_crc32_options"):  # torch < 2.5: torch computes them too
            torch.save(obj, cast(IO[bytes], rec), **save_kwargs)
            return TorchZip(rec.pieces, rec.pos, source)
        was = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(obj, cast(IO[bytes], rec), **save_kwargs)
        finally:
            torch.serialization.set_crc32_options(was)
    return TorchZip(rec.pieces, rec.pos, source)


class TorchZip:
    """A recorded ``torch.save`` archive: its write calls, in file order, and its records."""

    def __init__(self, pieces: list[_Piece], size: int, source: memoryview | None) -> None:
        self.pieces = pieces
        self.size = size
        self._source = source
        self._starts = [p.offset for p in pieces]
        self.records = self._parse()
        self.patched = False

    # -- reading the recorded bytes --------------------------------------------------------------
    def _views(self, offset: int, n: int) -> Iterator[memoryview]:
        """The archive's bytes ``[offset, offset + n)`` as views into the pieces and the source."""
        i = bisect.bisect_right(self._starts, offset) - 1
        end = offset + n
        while offset < end:
            p = self.pieces[i]
            a, b = offset - p.offset, min(p.length, end - p.offset)
            if p.data is not None:
                yield memoryview(p.data)[a:b]
            else:
                assert self._source is not None
                yield self._source[p.src + a : p.src + b]
            offset = p.offset + b
            i += 1

    def _read(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise CheckpointError(f"torch.save archive: a zip structure points at bytes {offset}..{offset + n} "
                                  f"outside the {self.size}-byte archive; torch's zip layout is not the one expected")
        return b"".join(self._views(offset, n))

    def _put(self, offset: int, value: bytes) -> None:
        for k, byte in enumerate(value):
            p = self.pieces[bisect.bisect_right(self._starts, offset + k) - 1]
            if p.data is None:
                raise CheckpointError(f"torch.save archive: the zip field at byte {offset + k} lies in tensor data")
            p.data[offset + k - p.offset] = byte

    def _u16(self, off: int) -> int:
        return int(struct.unpack("<H", self._read(off, 2))[0])

    def _u32(self, off: int) -> int:
        return int(struct.unpack("<I", self._read(off, 4))[0])

    def _u64(self, off: int) -> int:
        return int(struct.unpack("<Q", self._read(off, 8))[0])

    def _parse(self) -> list[_Record]:
        eocd = self.size - 22  # torch writes no archive comment
        if self._read(eocd, 4) != _EOCD:
            raise CheckpointError("torch.save archive: no end-of-central-directory record at its end")
        count, cd = self._u16(eocd + 10), self._u32(eocd + 16)
        if count == 0xFFFF or cd == 0xFFFFFFFF:
            loc = eocd - 20
            if self._read(loc, 4) != _ZIP64_LOCATOR:
                raise CheckpointError("torch.save archive: zip64 sizes without a zip64 locator")
            z64 = self._u64(loc + 8)
            count, cd = self._u64(z64 + 32), self._u64(z64 + 48)
        records = []
        off = cd
        for _ in range(count):
            if self._read(off, 4) != _CENTRAL:
                raise CheckpointError(f"torch.save archive: no central-directory entry at byte {off}")
            if self._u16(off + 10) != 0:
                raise CheckpointError("torch.save archive: a compressed record (torch.save stores records)")
            size, local = self._u32(off + 24), self._u32(off + 42)
            nlen, xlen, clen = self._u16(off + 28), self._u16(off + 30), self._u16(off + 32)
            name = self._read(off + 46, nlen).decode()
            x = off + 46 + nlen
            while x < off + 46 + nlen + xlen:  # zip64 extra: the fields saturated above, in order
                tag, ln = self._u16(x), self._u16(x + 2)
                if tag == 1:
                    f = x + 4
                    if size == 0xFFFFFFFF:
                        size = self._u64(f)
                        f += 16  # uncompressed, then compressed size
                    if local == 0xFFFFFFFF:
                        local = self._u64(f)
                x += 4 + ln
            data = local + 30 + self._u16(local + 26) + self._u16(local + 28)
            # miniz writes no data descriptor after an empty record (its CRC-32 is 0 anyway)
            described = size > 0 or (data + 4 <= self.size and self._read(data, 4) == _DESCRIPTOR)
            if self._read(local, 4) != _LOCAL or (described and self._read(data + size, 4) != _DESCRIPTOR):
                raise CheckpointError(f"torch.save archive: record {name!r} is not laid out as torch writes it")
            records.append(_Record(name, local, data, size, data + size + 4 if described else -1, off + 16))
            off = x + clen
        return records

    # -- checksums -----------------------------------------------------------------------------
    def crc_spans(self, span: int = CRC_SPAN) -> list[tuple[int, memoryview]]:
        """(record index, bytes) spans whose CRC-32s :meth:`patch` needs, in order (compute them anywhere)."""
        out = []
        for i, r in enumerate(self.records):
            if r.name.endswith(_ID_RECORD):
                continue  # derived from the others' CRCs in patch()
            for v in self._views(r.data_offset, r.size):
                for a in range(0, len(v), span):
                    out.append((i, v[a : a + span]))
        return out

    def checksum(self, span: int = CRC_SPAN) -> None:
        """Compute every CRC-32 (spans of ``span`` bytes, on ``CRC_THREADS`` shared threads) and :meth:`patch`."""
        views = [v for _, v in self.crc_spans(span)]
        small = sum(len(v) for v in views) < span
        self.patch([_crc32(v) for v in views] if small else list(_CRC_POOL.map(_crc32, views)), span)

    def patch(self, span_crcs: list[int], span: int = CRC_SPAN) -> None:
        """Fill in every CRC-32 (``span_crcs[k]`` is ``zlib.crc32`` of ``crc_spans(span)[k]``)."""
        crcs = [0] * len(self.records)
        for (i, v), c in zip(self.crc_spans(span), span_crcs, strict=True):
            crcs[i] = crc32_combine(crcs[i], c, len(v))
        ident = next((i for i, r in enumerate(self.records) if r.name.endswith(_ID_RECORD)), None)
        by_descriptor = {r.descriptor_crc - 4: crcs[i] for i, r in enumerate(self.records) if r.descriptor_crc >= 0}
        if ident is not None:
            rid = self.records[ident]
            combined = 0
            for p in self.pieces:  # torch's rule: every write starting with a descriptor signature counts
                if p.offset >= rid.local:  # torch computed the id before writing its record
                    break
                if p.length >= 8 and self._read(p.offset, 4) == _DESCRIPTOR:
                    crc = by_descriptor.get(p.offset)
                    if crc is None:  # tensor bytes that happen to start with the signature
                        crc = int(struct.unpack("<I", self._read(p.offset + 4, 4))[0])
                    combined = _hash_combine(combined, crc)
            old = self._read(rid.data_offset, rid.size)
            if rid.size != 40 or not old.isdigit():
                raise CheckpointError(f"torch.save archive: {rid.name!r} is not the 40 digits torch writes")
            new = old[:20] + b"%020d" % combined
            self._put(rid.data_offset, new)
            crcs[ident] = _crc32(new)
        for r, c in zip(self.records, crcs):
            field = struct.pack("<I", c)
            if r.descriptor_crc >= 0:
                self._put(r.descriptor_crc, field)
            self._put(r.central_crc, field)
        self.patched = True

    # -- writing -----------------------------------------------------------------------------------
    def layout(self, min_size: int, align: int, limit: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
        """How to write the archive: ``direct`` (file offset, source offset, length) ranges to write
        straight from the source, and the ``gathered`` (file offset, length) ranges between them.

        A source write of at least ``min_size`` bytes is direct, trimmed to whole ``align`` blocks
        when its file and source offsets agree modulo ``align`` (what O_DIRECT needs) and cut in
        pieces of at most ``limit``; everything else is gathered (read it with :meth:`read`).
        """
        direct: list[tuple[int, int, int]] = []
        for p in self.pieces:
            if p.data is not None or p.length < min_size:
                continue
            f, s, end = p.offset, p.src, p.offset + p.length
            if (f - s) % align == 0:
                head = -f % align
                f, s = f + head, s + head
                end = max(f, end - end % align)
            for a in range(f, end, limit):
                direct.append((a, s + a - f, min(limit, end - a)))
        gathered: list[tuple[int, int]] = []
        pos = 0
        for f, _, n in [*direct, (self.size, 0, 0)]:
            for a in range(pos, f, limit):
                gathered.append((a, min(limit, f - a)))
            pos = f + n
        return direct, gathered

    def read(self, offset: int, n: int) -> bytes:
        """The archive's bytes ``[offset, offset + n)`` (after :meth:`patch`)."""
        if not self.patched:
            raise CheckpointError("torch.save archive: read before patch(); its CRC-32s would be 0")
        return self._read(offset, n)

    def views(self) -> Iterator[memoryview]:
        """The whole archive, in order (after :meth:`patch`)."""
        if not self.patched:
            raise CheckpointError("torch.save archive: read before patch(); its CRC-32s would be 0")
        return self._views(0, self.size) if self.size else iter(())

    def getvalue(self) -> bytes:
        return b"".join(self.views())


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t (what torch folds record CRC-32s into the serialization id with)."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _MASK64)) & _MASK64


def _mul(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected bit order)."""
    p = 0
    m = 1 << 31
    while m:
        if a & m:
            p ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        m >>= 1
    return p


_X_POW2 = [1 << 30]  # x^(2^k): x^1, x^2, x^4, ...
for _ in range(63):
    _X_POW2.append(_mul(_X_POW2[-1], _X_POW2[-1]))


@functools.lru_cache(maxsize=64)
def _shift(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial (spans mostly share one length: cached)."""
    p = 1 << 31  # x^0
    k = 3  # x^(2^3) = x^8: one byte
    while nbytes:
        if nbytes & 1:
            p = _mul(_X_POW2[k], p)
        nbytes >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len2 = len(B)``."""
    return _mul(_shift(len2), crc1) ^ crc2 if len2 else crc1
