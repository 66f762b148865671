"""`PrefixedStore`: what every object-store backend does the same way above its wire calls.

A backend (S3, GCS, Azure Blob) is a bucket or container plus a key prefix. The key mapping,
``exists``, ``list``'s filtering, ``read`` and ``read_into``'s checks are the same for all of
them; a backend gives only the calls that differ on the wire:

- ``where(full)``: the object's name for messages (``s3://bucket/key``);
- ``size(key)``: one HEAD (``StorageNotFoundError`` when absent);
- ``list_full(want)``: every object name starting with ``want`` (all pages);
- ``range_getter(full)``: one ranged GET into a buffer (see :mod:`.reads`).
"""

from __future__ import annotations

import builtins
import contextlib
from abc import ABC, abstractmethod

from ...errors import BadInputError, CheckpointError, IntegrityError, StorageNotFoundError
from ..keys import check_key, is_temp_key
from .config import ObjectStoreConfig
from .reads import GetRange, read_ranges

__all__ = ["PrefixedStore"]


class PrefixedStore(ABC):
    """Key mapping and the read flow over a backend's HEAD, LIST and ranged GET (see module doc)."""

    prefix: str
    config: ObjectStoreConfig  # the backend's config: ``read_range_size``, ``policy``, ``op_timeout``

    def full_key(self, key: str) -> str:
        """The object name of ``key`` (checked: no ``..``, no absolute paths)."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def relative_key(self, full: str) -> str:
        """``key`` of the object named ``full`` (the inverse of :meth:`full_key`)."""
        return full[len(self.prefix) + 1 :] if self.prefix else full

    @abstractmethod
    def where(self, full: str) -> str: ...

    @abstractmethod
    async def size(self, key: str) -> int: ...

    @abstractmethod
    async def list_full(self, want: str) -> builtins.list[str]: ...

    @abstractmethod
    def range_getter(self, full: str) -> GetRange: ...

    async def exists(self, key: str) -> bool:
        try:
            await self.size(key)
        except StorageNotFoundError:
            return False
        return True

    async def list(self, prefix: str = "") -> builtins.list[str]:
        """Keys under ``prefix`` (a folder), sorted; folder markers and temporary objects left out."""
        if prefix:
            check_key(prefix)
        folder = self.full_key(prefix) if prefix else self.prefix
        want = folder + "/" if folder else ""
        names = await self.list_full(want)
        return sorted(
            self.relative_key(n) for n in names
            if n.startswith(want) and not n.endswith("/") and not is_temp_key(n[len(want) :])
        )

    async def read(self, key: str) -> bytes:
        size = await self.size(key)
        buf = bytearray(size)
        if size:
            await self.read_into(key, 0, memoryview(buf))
        return bytes(buf)

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        full = self.full_key(key)
        where = self.where(full)
        view = memoryview(buf)
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if offset < 0:
            raise BadInputError(f"read {where}: negative offset {offset}")
        if len(view) == 0:
            size = await self.size(key)
            if offset > size:
                raise IntegrityError(f"{where} is truncated: offset {offset} is past its end ({size} bytes)")
            return
        await read_ranges(
            self.range_getter(full),
            offset,
            view,
            range_size=self.config.read_range_size,
            where=where,
            policy=self.config.policy,
            op_timeout=self.config.op_timeout,
        )

    async def landed_earlier(self, key: str, body: bytes, retried: bool) -> bool:
        """After a conditional put was refused: True if the object there is ours (an earlier
        attempt landed before its reply was lost, so the bytes match); False if another writer's."""
        if not retried:
            return False
        with contextlib.suppress(CheckpointError):
            return await self.read(key) == body
        return False
