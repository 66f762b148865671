"""A per-call timeout whose expiry is told apart from the client's own (socket) timeouts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from ...errors import StorageOpTimeoutError

__all__ = ["timed"]

T = TypeVar("T")


async def timed(aw: Awaitable[T], seconds: float | None, what: str = "") -> T:
    """Await ``aw``; if it takes longer than ``seconds``, cancel it and raise `StorageOpTimeoutError`.

    Errors raised by ``aw`` itself (a socket read timeout included) pass through unchanged, so
    a caller can resume after those but not after its own budget ran out.
    """
    if seconds is None:
        return await aw
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    if not done:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        prefix = f"{what} timed out: " if what else ""
        raise StorageOpTimeoutError(f"{prefix}no answer within op_timeout={seconds:g}s; the store is not answering")
    return task.result()
