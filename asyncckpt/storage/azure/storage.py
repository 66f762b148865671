"""`AzureBlobStorage`: a container prefix on Azure Blob Storage (or Azurite)."""

from __future__ import annotations

import contextlib
from typing import Any

from azure.core import MatchConditions

from ...errors import (
    BadInputError,
    CheckpointError,
    IntegrityError,
    StorageNotFoundError,
    StoragePreconditionError,
)
from ..base import Capabilities
from ..keys import check_key, is_temp_key
from ..objectstore import Progress, read_ranges
from .client import AzureClient
from .config import AzureConfig
from .upload import AzureWriter, discard_uncommitted

__all__ = ["AzureBlobStorage"]


class AzureBlobStorage:
    """A container prefix on Azure Blob Storage: ``az://container/prefix``.

    Credentials come from ``AZURE_STORAGE_CONNECTION_STRING``, or ``AZURE_STORAGE_ACCOUNT_NAME`` with
    ``AZURE_STORAGE_ACCOUNT_KEY`` / ``AZURE_STORAGE_SAS_TOKEN`` (or the same as options:
    ``connection_string=``, ``account_name=``, ``account_key=``, ``sas_token=``, ``credential=``,
    ``account_url=``/``endpoint_url=``). Writes are block blobs (Put Block per part, Put Block List
    at commit); reads are parallel ranged GETs resumed after a cut; ``put_record(if_absent=True)``
    is a conditional Put Blob (``If-None-Match: *``). Azure has no CRC32C: parts go unchecked by the store.
    """

    capabilities = Capabilities(conditional_put=True, abort_incomplete=True, server_checksum=None)

    def __init__(self, uri: str, **options: Any) -> None:
        try:
            self.config = AzureConfig(uri, **options)
        except TypeError as exc:
            raise BadInputError(f"{uri}: unknown Azure Blob option ({exc})") from exc
        cfg = self.config
        self.container, self.prefix, self.uri = cfg.container, cfg.prefix, cfg.uri
        self.az = AzureClient(cfg)

    def __repr__(self) -> str:
        return f"AzureBlobStorage({self.uri!r})"

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    # ------------------------------------------------------------------ writes

    async def open_writer(self, key: str, size_hint: int | None = None) -> AzureWriter:
        full = self._full(key)
        single = size_hint is not None and size_hint < self.config.single_put_threshold
        return AzureWriter(self.az, full, size_hint if single else None)

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        full = self._full(key)
        body = bytes(data)
        if not if_absent:
            await self.az.call("put", full, lambda c: c.get_blob_client(full).upload_blob(body, overwrite=True))
            return True
        attempts = 0

        async def once(c: Any) -> Any:
            nonlocal attempts
            attempts += 1
            return await c.get_blob_client(full).upload_blob(body, overwrite=False)

        try:
            await self.az.call("put_if_absent", full, once)
        except StoragePreconditionError:
            if attempts > 1:
                # An earlier attempt may have landed before its reply was lost: it was ours if the bytes match.
                with contextlib.suppress(CheckpointError):
                    return await self.read(key) == body
            return False
        return True

    async def delete(self, key: str) -> None:
        full = self._full(key)
        with contextlib.suppress(StorageNotFoundError):
            await self.az.call("delete", full, lambda c: c.get_blob_client(full).delete_blob())

    async def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Delete blobs under ``prefix`` (a key or a folder) that hold only uncommitted blocks; returns how many."""
        if prefix:
            check_key(prefix)
        folder = self._full(prefix) if prefix else self.prefix
        want = folder if prefix else (folder + "/" if folder else "")

        async def names(include: list[str] | None) -> set[str]:
            async def go(c: Any) -> set[str]:
                return {b.name async for b in c.list_blobs(
                    name_starts_with=want, include=include, results_per_page=self.config.list_page_size
                )}

            return await self.az.call("list", want, go)

        uncommitted = await names(["uncommittedblobs"]) - await names(None)
        n = 0
        for full in sorted(uncommitted):
            rel = self._rel(full)
            if prefix and rel != prefix and not rel.startswith(prefix + "/"):
                continue
            if await discard_uncommitted(self.az, full, quiet=False):
                n += 1
        return n

    # ------------------------------------------------------------------ reads

    async def size(self, key: str) -> int:
        full = self._full(key)
        props = await self.az.call("head", full, lambda c: c.get_blob_client(full).get_blob_properties())
        return int(props.size)

    async def exists(self, key: str) -> bool:
        try:
            await self.size(key)
        except StorageNotFoundError:
            return False
        return True

    async def list(self, prefix: str = "") -> list[str]:
        if prefix:
            check_key(prefix)
        folder = self._full(prefix) if prefix else self.prefix
        want = folder + "/" if folder else ""

        async def go(c: Any) -> list[str]:
            return [b.name async for b in c.list_blobs(name_starts_with=want, results_per_page=self.config.list_page_size)]

        names = await self.az.call("list", want, go)
        return sorted(self._rel(n) for n in names if not n.endswith("/") and not is_temp_key(n[len(want) :]))

    async def read(self, key: str) -> bytes:
        size = await self.size(key)
        buf = bytearray(size)
        if size:
            await self.read_into(key, 0, memoryview(buf))
        return bytes(buf)

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        full = self._full(key)
        where = self.az.where(full)
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
            self._range_getter(full),
            offset,
            view,
            range_size=self.config.read_range_size,
            where=where,
            policy=self.config.policy,
            op_timeout=self.config.op_timeout,
        )

    def _range_getter(self, full: str):  # type: ignore[no-untyped-def]
        where = self.az.where(full)

        async def get(pos: int, view: memoryview, progress: Progress) -> None:
            lc = await self.az.loop_client()
            blob = lc.container.get_blob_client(full)
            extra: dict[str, Any] = {}
            if progress.version:
                extra = {"etag": progress.version, "match_condition": MatchConditions.IfNotModified}
            async with lc.transfers:
                try:
                    stream = await blob.download_blob(offset=pos, length=len(view), max_concurrency=1, **extra)
                    if progress.version is None:
                        progress.version = stream.properties.etag
                    done = 0
                    async for chunk in stream.chunks():
                        n = min(len(chunk), len(view) - done)
                        view[done : done + n] = chunk[:n]
                        done += n
                        progress.got += n
                except Exception as exc:
                    err = self.az.error("read", full, exc)
                    if isinstance(err, StoragePreconditionError) and progress.version:
                        raise IntegrityError(f"{where} changed while it was being read; read it again") from exc
                    if isinstance(err, IntegrityError):
                        raise IntegrityError(f"{where} is truncated: the object ends before byte {pos}") from exc
                    raise err from exc

        return get

    async def close(self) -> None:
        """Close this event loop's client; other loops keep theirs. This loop cannot use the storage afterwards."""
        await self.az.close()
