"""The life cycle every streaming writer shares: open -> committed | aborted, a sticky failure, and
`PartWriter`, the part upload / commit / abort flow of every object-store backend."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from ...errors import BadInputError, CheckpointError, PermanentStorageError

__all__ = ["PartWriter", "WriterState", "buffer_part", "checked_part"]


class WriterState:
    """``open`` until `commit` or `abort`; once a call failed, every later call re-raises that failure."""

    __slots__ = ("failed", "state", "where")

    def __init__(self, where: str) -> None:
        self.where = where
        self.state = "open"  # open | committed | aborted
        self.failed: CheckpointError | None = None

    def check_open(self, op: str) -> None:
        """Raise unless the writer is open and nothing failed yet."""
        if self.failed is not None:
            raise PermanentStorageError(f"{op} {self.where}: the upload already failed ({self.failed})") from self.failed
        if self.state != "open":
            done = "commit" if self.state == "committed" else "abort"
            raise PermanentStorageError(f"{op} {self.where} after {done}")

    def fail(self, err: CheckpointError) -> None:
        if self.failed is None:
            self.failed = err


def checked_part(st: WriterState, index: int, data: Any) -> memoryview:
    """``data`` as flat bytes for ``write_part``; refuses a closed/failed writer and a negative index."""
    st.check_open("write_part")
    view = memoryview(data)
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if index < 0:
        raise BadInputError(f"write_part {st.where}: negative part index {index}")
    return view


def buffer_part(buf: bytearray, end: int, offset: int, view: memoryview) -> int:
    """Copy a part of a small object into ``buf`` (sent in one request at commit); returns the new end."""
    stop = offset + len(view)
    if stop > len(buf):
        buf.extend(bytes(stop - len(buf)))
    buf[offset:stop] = view
    return max(end, stop)


class PartWriter(ABC):
    """One object written in numbered parts (or, given ``single_size``, buffered and put whole at
    `commit`); nothing is visible before `commit`. The life cycle every object-store backend shares:

    - open --write_part--> open: `_send_part` uploads part ``index`` (a small object is buffered instead);
    - open --commit--> committed: `_put_whole` for a buffered or empty object, else `_assemble` once
      every part from 0 up is written; a failure there aborts;
    - open --abort / a failed part--> aborted: `_discard` (``first``: not aborted before), and
      `_landed_after_abort` when the last part in flight finishes after the abort.

    Each step raises CheckpointErrors; `_error` translates anything else it knows (None: re-raise as is).
    """

    service = "object store"  #: shown in ``repr``

    def __init__(self, where: str, single_size: int | None) -> None:
        self._where = where
        self._buf: bytearray | None = bytearray(single_size) if single_size is not None else None
        self._end = 0
        self._written: set[int] = set()
        self._inflight = 0
        self._st = WriterState(where)

    def __repr__(self) -> str:
        return f"<{self.service} writer {self._where} {self._st.state}>"

    @abstractmethod
    async def _send_part(self, index: int, view: memoryview, crc32c: int | None) -> None:
        """Upload part ``index`` (0-based); check ``_st.check_open`` once a transfer slot is held."""

    @abstractmethod
    async def _put_whole(self, body: memoryview) -> None:
        """Put the whole object (a buffered small object, or an empty one) in one request."""

    @abstractmethod
    async def _assemble(self, indices: list[int]) -> None:
        """Make the object from parts ``indices`` (0..n-1, all written) in one atomic step."""

    @abstractmethod
    async def _discard(self, first: bool) -> None:
        """Remove what the parts left (best effort); ``first``: the writer was not aborted before."""

    async def _landed_after_abort(self) -> None:
        """A part in flight during the abort finished after it (default: nothing to do)."""
        return None

    async def _after_commit(self) -> None:
        """Clean up after a successful commit (default: nothing to do)."""
        return None

    def _error(self, op: str, exc: Exception) -> CheckpointError | None:
        """``exc`` as a storage error of ``op`` (None: not ours to translate, re-raised as is)."""
        return exc if isinstance(exc, CheckpointError) else None

    async def write_part(self, index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
        view = checked_part(self._st, index, data)
        if self._buf is not None:
            self._end = buffer_part(self._buf, self._end, offset, view)
            return
        self._inflight += 1
        try:
            await self._send_part(index, view, crc32c)
            self._written.add(index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = self._error(f"upload part {index + 1} of", exc)
            if err is None:
                raise
            self._st.fail(err)
            if err is exc:
                raise
            raise err from exc
        finally:
            self._inflight -= 1
            if self._st.failed is not None and self._st.state == "open":
                await self._abort()
            elif self._st.state == "aborted" and self._inflight == 0:
                await self._landed_after_abort()

    async def commit(self) -> None:
        self._st.check_open("commit")
        try:
            if self._buf is not None or not self._written:
                await self._put_whole(memoryview(self._buf)[: self._end] if self._buf is not None else memoryview(b""))
            else:
                if self._inflight:
                    raise PermanentStorageError(
                        f"commit {self._where}: {self._inflight} part(s) still uploading; await them first")
                numbers = sorted(self._written)
                if numbers != list(range(len(numbers))):
                    missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
                    raise PermanentStorageError(
                        f"commit {self._where}: parts {[m + 1 for m in missing[:10]]} were never written")
                await self._assemble(numbers)
        except asyncio.CancelledError:
            await self._abort()
            raise
        except Exception as exc:
            err = self._error("commit", exc)
            if err is None:
                raise
            self._st.fail(err)
            await self._abort()
            if err is exc:
                raise
            raise err from exc
        self._st.state = "committed"
        self._buf = None
        await self._after_commit()

    async def abort(self) -> None:
        if self._st.state == "committed":
            return
        await self._abort()

    async def _abort(self) -> None:
        first = self._st.state != "aborted"
        self._st.state = "aborted"
        self._buf = None
        await self._discard(first)
