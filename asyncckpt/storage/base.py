"""The storage seam: the protocol every backend implements, and the capabilities it declares.

A backend moves bytes for keys (``/``-separated, relative to the backend's root).
Chunking, checksums and concurrency live above it, in the engine, written once.
Optional behaviour is *declared* in ``Storage.capabilities`` (a `Capabilities`), never probed:
a caller checks the flag, then calls the matching method of `AbortsIncompleteUploads`,
`CleansTempFiles`, `DeletesMany`, `ListsByName` or `ReadsScattered`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "AbortsIncompleteUploads", "Capabilities", "CleansTempFiles", "DeletesMany", "ListsByName", "ObjectWriter",
    "ReadsScattered",
    "Storage",
    "blocking_calls_here", "blocking_calls_welcome",
]


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers beyond the protocol's minimum (all off by default).

    - ``conditional_put``: ``put_record(..., if_absent=True)`` is atomic on the store (two racing
      writers: exactly one gets True). Without it the backend falls back to a check-then-write.
    - ``abort_incomplete``: the backend has ``abort_incomplete_uploads(prefix)``
      (`AbortsIncompleteUploads`) that removes what torn uploads left under a prefix.
    - ``server_checksum``: the name of the checksum the *store* verifies on upload when the
      caller passes it to ``write_part(..., crc32c=)`` (``"crc32c"``), or None.
    - ``cleanup_temp``: the backend has ``cleanup_temp(prefix)`` (`CleansTempFiles`) that
      removes local temporary files of torn writes.
    - ``scatter_read``: the backend has ``read_into_scattered(key, offset, bufs)``
      (`ReadsScattered`) that fills several buffers from one byte range in one pass (local: preadv),
      so a chunk spanning several tensors lands in them without a staging copy.
    - ``delete_many``: the backend has ``delete_many(groups)`` (`DeletesMany`) that deletes
      several keys in fewer requests and flushes than one ``delete`` each (local: one directory
      fsync per directory instead of one per file; S3: one DeleteObjects request).
    - ``min_part_size``: the smallest part, other than an object's last, that ``write_part``
      takes (5 MiB: S3's multipart minimum; a local file takes parts of any size).
    - ``list_by_name``: keys are files in directories, so listing the keys under one ``NAME/`` is
      one directory scan (cheaper than reading a key), and the backend has ``list_names()``
      (`ListsByName`) that lists the files directly under every ``NAME/`` with one look at each
      directory instead of a walk of every key (local). Object stores list by prefix: a LIST
      costs what a GET does, so the catalog reads ``COMMIT`` and ``RETIRED`` at once instead.
    - ``any_loop``: a session holds nothing bound to the event loop it was opened on, so it may be
      used from another loop in another thread; and inside :func:`blocking_calls_here` its
      methods may do their blocking work inline instead of handing it to a thread. The worker
      runs its control steps (commit, retention, cleanup) for such storages on a thread of their
      own that way: no thread hop per small call, and no fsync on the loop that serves snapshots.
    """

    conditional_put: bool = False
    abort_incomplete: bool = False
    server_checksum: str | None = None
    cleanup_temp: bool = False
    scatter_read: bool = False
    delete_many: bool = False
    min_part_size: int = 5 << 20
    any_loop: bool = False
    list_by_name: bool = False


_BLOCKING_OK: contextvars.ContextVar[bool] = contextvars.ContextVar("asyncckpt_blocking_calls", default=False)


@contextmanager
def blocking_calls_here() -> Iterator[None]:
    """Within this block (this task and the tasks it starts), blocking storage calls are fine.

    The caller promises it runs on a thread whose event loop serves nothing else, so a backend
    with ``Capabilities.any_loop`` may run its system calls inline rather than in a thread pool.
    """
    token = _BLOCKING_OK.set(True)
    try:
        yield
    finally:
        _BLOCKING_OK.reset(token)


def blocking_calls_welcome() -> bool:
    """Whether the running code is inside :func:`blocking_calls_here` (see ``Capabilities.any_loop``)."""
    return _BLOCKING_OK.get()


@runtime_checkable
class ObjectWriter(Protocol):
    """A streaming writer for one key; nothing is visible under the key before `commit`."""

    async def write_part(self, index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
        """Write part ``index`` (0-based, contiguous, all but the last at least
        ``Capabilities.min_part_size``) at ``offset``.

        Calls may run concurrently and out of order; ``data`` may be reused by the caller once the
        call returns. ``crc32c`` is the CRC32C of ``data`` when the caller computed it: a backend
        whose store verifies checksums sends it (``Capabilities.server_checksum``) instead of
        computing it again; others ignore it.
        """

    async def commit(self) -> None:
        """Make the object visible under its key with its bytes durable (multipart complete; local:
        fdatasync + rename). Its name is durable no later than the next ``put_record`` on the same
        storage returns (local: directory fsyncs are batched with the record that names the file,
        which every format writes after its data)."""

    async def abort(self) -> None:
        """Discard everything written; safe to call more than once and after a failed commit."""


@runtime_checkable
class Storage(Protocol):
    """One root (a directory, a bucket prefix, a container prefix) holding checkpoints.

    Every failure leaves as a `asyncckpt.errors.StorageError` from the error tree
    (`TransientStorageError` / `PermanentStorageError` and their subclasses), a missing key as
    `StorageNotFoundError`, a short object or a bad key as `IntegrityError`.
    """

    uri: str
    capabilities: Capabilities

    async def open_writer(self, key: str, size_hint: int | None = None) -> ObjectWriter:
        """Open a streaming writer for ``key``; ``size_hint`` is the total size when known."""

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes of ``key`` at ``offset``; a short object raises IntegrityError."""

    async def read(self, key: str) -> bytes:
        """Return the whole object (meant for small records: manifests, commit records)."""

    async def size(self, key: str) -> int:
        """Return the object's size; StorageNotFoundError when absent."""

    async def exists(self, key: str) -> bool: ...

    async def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive), sorted."""

    async def delete(self, key: str) -> None:
        """Delete one key; absent keys are ignored."""

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Atomically put a small record. With ``if_absent``, return False (and change nothing) if it exists."""

    async def close(self) -> None: ...


@runtime_checkable
class AbortsIncompleteUploads(Protocol):
    """Offered where ``capabilities.abort_incomplete`` is True."""

    async def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Remove every unfinished upload for ``prefix`` (a key or a folder); return how many."""


@runtime_checkable
class CleansTempFiles(Protocol):
    """Offered where ``capabilities.cleanup_temp`` is True."""

    async def cleanup_temp(self, prefix: str = "") -> int:
        """Remove temporary files of torn writes under ``prefix``; return how many."""


@runtime_checkable
class DeletesMany(Protocol):
    """Offered where ``capabilities.delete_many`` is True."""

    async def delete_many(self, groups: Sequence[Sequence[str]]) -> None:
        """Delete the keys of ``groups`` (absent ones are ignored), as ``delete`` of each in order would,
        with fewer requests and flushes.

        Each group's removal is durable before any key of the next group is touched (a commit record
        goes before the files it names, the files before the records that prove whose they are);
        within a group the removals may become durable in any order (local: one directory fsync per
        directory after the group; S3: one DeleteObjects request). A failure raises with every
        earlier group gone and no later group touched."""


@runtime_checkable
class ListsByName(Protocol):
    """Offered where ``capabilities.list_by_name`` is True."""

    async def list_names(self) -> dict[str, list[str]]:
        """The keys directly under each ``NAME/`` directly under the root, by name (``NAME`` ->
        the file names below it, as ``list`` shows them: temporary files hidden), from one look at
        each directory. Keys deeper than ``NAME/file`` are not listed, nor a ``NAME`` without
        files directly below it."""


@runtime_checkable
class ReadsScattered(Protocol):
    """Offered where ``capabilities.scatter_read`` is True."""

    async def read_into_scattered(self, key: str, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order with the bytes of ``key`` from ``offset`` (``sum(len(b))`` of them);
        a short object raises IntegrityError."""
