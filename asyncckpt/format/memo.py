"""A small cache of values decoded from bytes, keyed by those exact bytes and bounded by their size.

The worker receives the same layout bytes with every save and reads back the same few manifests
several times per save; comparing bytes costs far less than decoding and checking them again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["DecodedCache"]

V = TypeVar("V")


class DecodedCache(Generic[V]):
    """Thread-safe LRU of ``key -> value`` holding at most ``limit`` bytes of keys (``size(key)``).

    A key larger than a quarter of the limit is never kept. The values are shared between callers:
    keep only values nobody mutates (frozen structs).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> None:
        if nbytes > self.limit // 4:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.limit:
                self._bytes -= self._items.popitem(last=False)[1][1]

    @property
    def nbytes(self) -> int:
        """Bytes of the keys held now."""
        return self._bytes

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
