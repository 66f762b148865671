"""`AzureBlobStorage`: a container prefix on Azure Blob Storage (or Azurite)."""

from __future__ import annotations

import contextlib
from typing import Any

from azure.core import MatchConditions

from ...errors import (
    BadInputError,
    IntegrityError,
    StorageNotFoundError,
    StoragePreconditionError,
)
from ..base import Capabilities
from ..keys import check_key
from ..objectstore import GetRange, PrefixedStore, Progress
from .client import AzureClient
from .config import AzureConfig
from .upload import AzureWriter, discard_uncommitted

__all__ = ["AzureBlobStorage"]


class AzureBlobStorage(PrefixedStore):
    """A container prefix on Azure Blob Storage: ``az://container/prefix``.

    Credentials come from ``AZURE_STORAGE_CONNECTION_STRING``, or ``AZURE_STORAGE_ACCOUNT_NAME`` with
    ``AZURE_STORAGE_ACCOUNT_KEY`` / ``AZURE_STORAGE_SAS_TOKEN`` (or the same as options:
    ``connection_string=``, ``account_name=``, ``account_key=``, ``sas_token=``, ``credential=``,
    ``account_url=``/``endpoint_url=``). Writes are block blobs (Put Block per part, Put Block List
    at commit); reads are parallel ranged GETs resumed after a cut; ``put_record(if_absent=True)``
    is a conditional Put Blob (``If-None-Match: *``). Azure has no CRC32C: parts go unchecked by the store.
    """

    capabilities = Capabilities(conditional_put=True, abort_incomplete=True, server_checksum=None)
    config: AzureConfig

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

    def where(self, full: str) -> str:
        return self.az.where(full)

    # ------------------------------------------------------------------ writes

    async def open_writer(self, key: str, size_hint: int | None = None) -> AzureWriter:
        full = self.full_key(key)
        single = size_hint is not None and size_hint < self.config.single_put_threshold
        return AzureWriter(self.az, full, size_hint if single else None)

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        full = self.full_key(key)
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
            return await self.landed_earlier(key, body, retried=attempts > 1)
        return True

    async def delete(self, key: str) -> None:
        full = self.full_key(key)
        with contextlib.suppress(StorageNotFoundError):
            await self.az.call("delete", full, lambda c: c.get_blob_client(full).delete_blob())

    async def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Delete blobs under ``prefix`` (a key or a folder) that hold only uncommitted blocks; returns how many."""
        if prefix:
            check_key(prefix)
        folder = self.full_key(prefix) if prefix else self.prefix
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
            rel = self.relative_key(full)
            if prefix and rel != prefix and not rel.startswith(prefix + "/"):
                continue
            if await discard_uncommitted(self.az, full, quiet=False):
                n += 1
        return n

    # ------------------------------------------------------------------ reads

    async def size(self, key: str) -> int:
        full = self.full_key(key)
        props = await self.az.call("head", full, lambda c: c.get_blob_client(full).get_blob_properties())
        return int(props.size)

    async def list_full(self, want: str) -> list[str]:
        async def go(c: Any) -> list[str]:
            return [b.name async for b in c.list_blobs(name_starts_with=want, results_per_page=self.config.list_page_size)]

        return list(await self.az.call("list", want, go))

    def range_getter(self, full: str) -> GetRange:
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
