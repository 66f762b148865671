"""The storage protocol every backend implements.

A backend moves bytes for keys (``/``-separated, relative to the backend's root).
Chunking, checksums and concurrency live above it, in the engine, written once.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["ObjectWriter", "Storage"]


@runtime_checkable
class ObjectWriter(Protocol):
    """A streaming writer for one key; nothing is visible under the key before `commit`."""

    async def write_part(self, index: int, offset: int, data: memoryview) -> None:
        """Write part ``index`` (0-based, contiguous, all but the last at least 5 MiB) at ``offset``.

        Calls may run concurrently; ``data`` may be reused by the caller once the call returns.
        """

    async def commit(self) -> None:
        """Make the object durable and visible under its key (fsync + rename / multipart complete)."""

    async def abort(self) -> None:
        """Discard everything written; safe to call more than once and after a failed commit."""


@runtime_checkable
class Storage(Protocol):
    """One root (a directory, a bucket prefix, tiers of both) holding checkpoints."""

    uri: str

    async def open_writer(self, key: str, size_hint: int | None = None) -> ObjectWriter:
        """Open a streaming writer for ``key``; ``size_hint`` is the total size when known."""

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes of ``key`` at ``offset``; a short object raises IntegrityError."""

    async def read(self, key: str) -> bytes:
        """Return the whole object (meant for small records: manifests, commit records)."""

    async def size(self, key: str) -> int:
        """Return the object's size; CheckpointNotFoundError when absent."""

    async def exists(self, key: str) -> bool: ...

    async def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive), sorted."""

    async def delete(self, key: str) -> None:
        """Delete one key; absent keys are ignored."""

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Atomically put a small record. With ``if_absent``, return False (and change nothing) if it exists."""

    async def close(self) -> None: ...
