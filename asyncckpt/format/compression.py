"""Per-chunk compression (feature ``zstd``): encode a chunk for the data file, decode it back.

Each chunk of the data image is compressed on its own, in the worker's threads, and stored as a
zstd frame (content size in its header), or as is when compressing would not make it smaller.
The manifest records, per chunk, how it is stored, its stored length and the CRC32C of its raw
bytes (:class:`~asyncckpt.format.records.ChunkInfo`); the chunk's CRC32C covers the stored bytes.
``zstandard`` is optional (``pip install 'asyncckpt[zstd]'``) and imported only when used.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import BadInputError, IntegrityError
from .crc import checksum
from .records import ZSTD, ChunkInfo

__all__ = ["COMPRESSIONS", "ZSTD_LEVELS", "check_compression", "decode_chunk", "decode_chunk_into", "encode_chunk", "zstd"]

#: Compressions a save can ask for (each is also the name of its format feature).
COMPRESSIONS = (ZSTD,)
#: zstd levels accepted (1 fastest .. 22 smallest).
ZSTD_LEVELS = range(1, 23)
_DEFAULT_LEVEL = {ZSTD: 1}  # bench/compression.py: level 3 halves the speed for the same ratio on weights
_local = threading.local()


def zstd() -> Any:
    """The ``zstandard`` module, or an error naming the extra that installs it."""
    try:
        import zstandard
    except ImportError as exc:
        raise BadInputError(
            "zstd compression needs the zstandard package: pip install 'asyncckpt[zstd]'"
        ) from exc
    return zstandard


def check_compression(compression: str | None, level: int | None) -> tuple[str | None, int]:
    """Validate a save's ``compression``/``compression_level`` (and that the codec is installed)."""
    if compression is None:
        if level is not None:
            raise BadInputError(f"compression_level={level} needs compression='zstd'")
        return None, 0
    if compression not in COMPRESSIONS:
        raise BadInputError(f"compression must be one of {', '.join(map(repr, COMPRESSIONS))} or None, "
                            f"not {compression!r}")
    level = _DEFAULT_LEVEL[compression] if level is None else level
    if isinstance(level, bool) or not isinstance(level, int) or level not in ZSTD_LEVELS:
        raise BadInputError(f"compression_level must be an integer from {ZSTD_LEVELS.start} to {ZSTD_LEVELS.stop - 1}, "
                            f"got {level!r}")
    zstd()
    return compression, level


def _compressor(level: int) -> Any:
    """This thread's compressor for ``level`` (a ZstdCompressor must not be used by two threads at once)."""
    cache: dict[int, Any] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstd().ZstdCompressor(level=level)
    return c


def encode_chunk(raw: memoryview, compression: str, level: int) -> tuple[memoryview, ChunkInfo, int]:
    """(stored bytes, their record, their CRC32C) of one raw chunk; stored as is when that is smaller."""
    raw_crc = checksum(raw)
    packed = _compressor(level).compress(raw)
    if len(packed) >= len(raw):
        return raw, ChunkInfo("none", len(raw), raw_crc), raw_crc
    return memoryview(packed), ChunkInfo(compression, len(packed), raw_crc), checksum(packed)


def decode_chunk(stored: np.ndarray, info: ChunkInfo, raw_nbytes: int, where: str) -> np.ndarray:
    """The raw bytes of a verified stored chunk, checked against their recorded length and CRC32C."""
    if info.codec == "none":
        return stored
    z = zstd()
    try:
        size = z.frame_content_size(stored)
        if size != raw_nbytes:  # checked before it drives an allocation
            raise IntegrityError(f"{where}: the zstd frame holds {size} bytes, the chunk has {raw_nbytes}")
        raw = np.frombuffer(z.ZstdDecompressor().decompress(stored), dtype=np.uint8)
    except z.ZstdError as exc:
        raise IntegrityError(f"{where}: the zstd frame cannot be decompressed ({exc})") from exc
    crc = checksum(raw.data)
    if len(raw) != raw_nbytes or crc != info.raw_crc32c:
        raise IntegrityError(f"{where}: decompressed bytes fail their checksum (crc32c {crc:#010x}, expected "
                             f"{info.raw_crc32c:#010x}, {len(raw)} bytes for {raw_nbytes})")
    return raw


def decode_chunk_into(stored: memoryview, info: ChunkInfo, pieces: Sequence[memoryview], where: str) -> None:
    """Decompress a verified stored chunk into ``pieces`` (in order, ``sum(len)`` raw bytes) and check
    the raw bytes' recorded CRC32C over them."""
    raw_nbytes = sum(len(p) for p in pieces)
    if info.codec == "none":
        if len(stored) != raw_nbytes:
            raise IntegrityError(f"{where}: {len(stored)} stored bytes for {raw_nbytes}")
        pos = 0
        for p in pieces:
            p[:] = stored[pos : pos + len(p)]
            pos += len(p)
        return
    z = zstd()
    crc = 0
    try:
        size = z.frame_content_size(stored)
        if size != raw_nbytes:
            raise IntegrityError(f"{where}: the zstd frame holds {size} bytes, the chunk has {raw_nbytes}")
        with z.ZstdDecompressor().stream_reader(stored, read_across_frames=False) as reader:
            for p in pieces:
                got = 0
                while got < len(p):
                    k = reader.readinto(p[got:])
                    if k == 0:
                        raise IntegrityError(f"{where}: the zstd frame ends before the chunk's {raw_nbytes} bytes")
                    got += k
                crc = checksum(p, crc)
    except z.ZstdError as exc:
        raise IntegrityError(f"{where}: the zstd frame cannot be decompressed ({exc})") from exc
    if crc != info.raw_crc32c:
        raise IntegrityError(f"{where}: decompressed bytes fail their checksum (crc32c {crc:#010x}, expected "
                             f"{info.raw_crc32c:#010x}, {raw_nbytes} bytes)")
