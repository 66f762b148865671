"""The life cycle every streaming writer shares: open -> committed | aborted, and a sticky failure."""

from __future__ import annotations

from typing import Any

from ...errors import BadInputError, CheckpointError, PermanentStorageError

__all__ = ["WriterState", "buffer_part", "checked_part"]


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
