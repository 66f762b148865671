"""Worker plug-in (``worker_options={"preload": ["tests._overlap_probe"]}``): in every snapshot the
copy's pieces after the first wait until a data write has begun (at most 10 s, so a worker that
writes only after the copy is slow, never stuck), and events go, one per line, to the file named by
``ASYNCCKPT_TEST_OVERLAP``: "write" when a data write begins, "snapshot" when a snapshot ends."""

from __future__ import annotations

import os
import threading
from typing import Any

from asyncckpt import staging
from asyncckpt.runtime import server
from asyncckpt.storage import LocalStorage

_PATH = os.environ.get("ASYNCCKPT_TEST_OVERLAP", "")
_HOLD = os.environ.get("ASYNCCKPT_TEST_OVERLAP_HOLD", "1") != "0"
_wrote = threading.Event()
_lock = threading.Lock()
_pieces = [0]


def _note(what: str) -> None:
    if _PATH:
        with open(_PATH, "a") as f:
            f.write(what + "\n")


_memmove = staging._memmove


def _held_memmove(dst: int, src: int, n: int) -> Any:
    with _lock:
        _pieces[0] += 1
        first = _pieces[0] == 1
    if not first and _HOLD:
        _wrote.wait(10)
    return _memmove(dst, src, n)


_take_snapshot = server.take_snapshot


async def _noted_snapshot(*args: Any, **kwargs: Any) -> Any:
    _wrote.clear()
    _pieces[0] = 0
    staged = await _take_snapshot(*args, **kwargs)
    _note("snapshot")
    return staged


_open_writer = LocalStorage.open_writer


async def _noted_open_writer(self: LocalStorage, key: str, size_hint: int | None = None) -> Any:
    writer = await _open_writer(self, key, size_hint)
    real = writer.write_part

    async def noted(index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
        _note("write")
        _wrote.set()
        await real(index, offset, data, crc32c=crc32c)

    writer.write_part = noted
    return writer


staging._memmove = _held_memmove  # type: ignore[assignment]
server.take_snapshot = _noted_snapshot  # type: ignore[assignment]
LocalStorage.open_writer = _noted_open_writer  # type: ignore[method-assign]
