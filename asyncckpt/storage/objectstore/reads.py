"""Parallel ranged reads into the caller's buffer, resumed after a cut body (shared by every object store)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ..._loop import gather_or_cancel
from ...errors import IntegrityError, StorageError, StorageOpTimeoutError, TransientStorageError
from .retry import RetryPolicy
from .timeouts import timed

__all__ = ["GetRange", "Progress", "read_ranges", "resumable_fetch"]

logger = logging.getLogger(__name__)


class Progress:
    """Bytes received so far for one range, and the version (ETag / generation) of the first response."""

    __slots__ = ("got", "version")

    def __init__(self, version: str | None = None) -> None:
        self.got = 0
        self.version = version  # resumed requests must see the same object version


# get_range(pos, view, progress): fetch bytes from ``pos`` into ``view`` (as many as the store sends),
# adding each received chunk to ``progress.got`` as it arrives and setting ``progress.version`` from the
# first response. It raises only errors of the storage tree (translated at the backend's edge); a
# cut body must surface as a TransientStorageError.
GetRange = Callable[[int, memoryview, Progress], Awaitable[None]]


async def resumable_fetch(
    get_range: GetRange,
    start: int,
    view: memoryview,
    *,
    where: str,
    policy: RetryPolicy,
    op_timeout: float | None = None,
    version: str | None = None,
    failures: int = 0,
) -> None:
    """Fill ``view`` with the object's bytes from ``start``, resuming after each cut at the first missing byte.

    Every cut counts against ``policy.max_attempts`` (with or without progress, so the loop is
    bounded); ``op_timeout`` bounds each request, and its expiry is not resumed. A body that
    ends cleanly but short is an `IntegrityError` (the object is shorter than asked).
    """
    progress = Progress(version)
    n = len(view)
    last: StorageError | None = None
    while progress.got < n:
        if failures >= policy.max_attempts:
            assert last is not None
            cls = type(last) if isinstance(last, TransientStorageError) else TransientStorageError
            raise cls(
                f"read {where} failed: {last} (the body was cut {failures} time(s) at {start + progress.got}; "
                f"gave up resuming)"
            ) from last
        pos = start + progress.got
        try:
            await timed(get_range(pos, view[progress.got :], progress), op_timeout, f"read {where}")
        except StorageOpTimeoutError:
            raise
        except TransientStorageError as exc:
            last = exc
        else:
            if progress.got < n:
                raise IntegrityError(
                    f"{where} is truncated: wanted {n} bytes at offset {start}, the object ends after {progress.got}"
                )
            return
        failures += 1
        logger.debug("read %s: cut at %d (%s); resuming", where, start + progress.got, last)
        await policy.backoff(failures)


async def read_ranges(
    get_range: GetRange,
    offset: int,
    view: memoryview,
    *,
    range_size: int,
    where: str,
    policy: RetryPolicy,
    op_timeout: float | None = None,
) -> None:
    """Split ``view`` into ``range_size`` ranges fetched concurrently (each resumable); bound concurrency in ``get_range``."""
    n = len(view)
    await gather_or_cancel(
        resumable_fetch(
            get_range, offset + i, view[i : i + range_size], where=where, policy=policy, op_timeout=op_timeout
        )
        for i in range(0, n, range_size)
    )
