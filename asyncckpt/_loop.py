"""A private event loop on a daemon thread, so synchronous API calls can run async storage code."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            t = threading.Thread(target=loop.run_forever, name="asyncckpt-loop", daemon=True)
            t.start()
            _loop = loop
        return _loop


def _forget_after_fork() -> None:
    """In a forked child: the parent's loop has no thread here; the next call starts a fresh one."""
    global _lock, _loop
    _lock = threading.Lock()
    _loop = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the private loop and return its result (safe to call from any thread)."""
    fut = asyncio.run_coroutine_threadsafe(coro, _get_loop())
    try:
        return fut.result(timeout)
    except BaseException:
        fut.cancel()
        raise


async def gather_or_cancel(aws: Iterable[Awaitable[Any]]) -> None:
    """Run ``aws`` concurrently; on the first failure (or our cancellation) cancel the rest,
    wait for them to finish, and re-raise."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
