"""The checksum of the format: CRC32C (Castagnoli), as S3's ``ChecksumCRC32C`` computes it."""

from __future__ import annotations

import crc32c as _crc32c

__all__ = ["CHECKSUM_ALGO", "checksum"]

CHECKSUM_ALGO = "crc32c"


def checksum(data: bytes | memoryview, value: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``value`` (releases the GIL)."""
    return _crc32c.crc32c(data, value=value)
