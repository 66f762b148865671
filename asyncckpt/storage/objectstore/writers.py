"""The life cycle every streaming writer shares: open -> committed | aborted, and a sticky failure."""

from __future__ import annotations

from ...errors import CheckpointError, PermanentStorageError

__all__ = ["WriterState"]


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
