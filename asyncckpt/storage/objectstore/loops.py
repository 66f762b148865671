"""One client per running event loop (clients hold loop-bound connection pools)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from ...errors import PermanentStorageError

__all__ = ["PerLoop"]

T = TypeVar("T")


class PerLoop(Generic[T]):
    """Lazily create one ``T`` per running loop; `close` closes the current loop's and bars reuse there.

    A storage object may be used from several loops over its life (the worker's uvloop, the
    trainer's private loop thread). Resources of loops that were closed without `close` are dropped.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._items: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        self._closed: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    def __len__(self) -> int:
        return len(self._items)

    def current(self) -> T | None:
        """This loop's item, if one was made."""
        return self._items.get(asyncio.get_running_loop())

    async def get(self, create: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        item = self._items.get(loop)
        if item is not None:
            return item
        if loop in self._closed:
            raise PermanentStorageError(f"{self._what}: used after close() on this event loop; open a new one")
        lock = self._locks.setdefault(loop, asyncio.Lock())
        async with lock:
            item = self._items.get(loop)
            if item is None:
                for other in [lp for lp in list(self._items) if lp.is_closed()]:
                    self._items.pop(other, None)  # its loop is gone: nothing left to close it with
                item = await create()
                self._items[loop] = item
        return item

    async def close(self, closer: Callable[[T], Awaitable[None]]) -> None:
        """Close this loop's item (other loops keep theirs); this loop cannot `get` again."""
        loop = asyncio.get_running_loop()
        self._closed.add(loop)
        item = self._items.pop(loop, None)
        if item is not None:
            await closer(item)
