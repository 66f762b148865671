"""`GCSStorage`: a bucket prefix on Google Cloud Storage (or an emulator)."""

from __future__ import annotations

import functools
from typing import Any

from ...errors import (
    BadInputError,
    CheckpointError,
    IntegrityError,
    PermanentStorageError,
    StoragePreconditionError,
)
from ..base import Capabilities
from ..keys import TEMP_MARK, check_key
from ..objectstore import GetRange, PrefixedStore, Progress
from .client import GCSClient, LoopClient
from .config import GCSConfig
from .errors import HTTPStatusError
from .upload import GCSWriter

__all__ = ["GCSStorage"]

_BODY_CHUNK = 1024 * 1024


class GCSStorage(PrefixedStore):
    """A bucket prefix on Google Cloud Storage: ``gs://bucket/prefix``.

    Credentials are Google's application-default ones (``GOOGLE_APPLICATION_CREDENTIALS``, the
    gcloud ADC file, the VM's metadata server) unless ``service_file=`` or ``token=`` is given;
    ``STORAGE_EMULATOR_HOST`` (or ``endpoint_url=``) points it at an emulator, which takes no
    credentials. Parts go up in parallel as temporary objects, each with its CRC32C checked by
    GCS, and are composed into the object at commit; reads are parallel ranged GETs resumed
    after a cut; ``put_record(if_absent=True)`` is an upload with ``ifGenerationMatch=0``.
    """

    capabilities = Capabilities(conditional_put=True, abort_incomplete=True, server_checksum="crc32c")
    config: GCSConfig

    def __init__(self, uri: str, **options: Any) -> None:
        try:
            self.config = GCSConfig(uri, **options)
        except TypeError as exc:
            raise BadInputError(f"{uri}: unknown GCS option ({exc})") from exc
        cfg = self.config
        self.bucket, self.prefix, self.uri = cfg.bucket, cfg.prefix, cfg.uri
        self.gcs = GCSClient(cfg)

    def __repr__(self) -> str:
        return f"GCSStorage({self.uri!r})"

    def where(self, full: str) -> str:
        return self.gcs.where(full)

    # ------------------------------------------------------------------ writes

    async def open_writer(self, key: str, size_hint: int | None = None) -> GCSWriter:
        full = self.full_key(key)
        single = size_hint is not None and size_hint < self.config.single_put_threshold
        return GCSWriter(self.gcs, full, size_hint if single else None)

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        full = self.full_key(key)
        body = memoryview(bytes(data))
        params = {"ifGenerationMatch": "0"} if if_absent else None
        attempts = 0

        async def once(c: LoopClient) -> Any:
            nonlocal attempts
            attempts += 1
            return await self.gcs.upload(c, full, body, params=params)

        try:
            await self.gcs.call("put_if_absent" if if_absent else "put", full, once)
        except StoragePreconditionError:
            if not if_absent:
                raise
            return await self.landed_earlier(key, bytes(body), retried=attempts > 1)
        return True

    async def delete(self, key: str) -> None:
        full = self.full_key(key)
        await self.gcs.call("delete", full, lambda c: self.gcs.delete_object(c, full))

    async def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Delete the temporary part objects of unfinished uploads under ``prefix`` (a key or a folder); returns how many."""
        if prefix:
            check_key(prefix)
        want = self.full_key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        names = await self.gcs.call("list", want, lambda c: self.gcs.list_names(c, want))
        n = 0
        for full in names:
            rel = self.relative_key(full)
            if TEMP_MARK not in rel:
                continue
            if prefix and not (rel.startswith(prefix + "/") or rel.startswith(prefix + TEMP_MARK)):
                continue
            if await self.gcs.call("abort", full, functools.partial(self._delete_object, full)):
                n += 1
        return n

    async def _delete_object(self, full: str, c: LoopClient) -> Any:
        return await self.gcs.delete_object(c, full)

    # ------------------------------------------------------------------ reads

    async def _meta(self, key: str) -> dict[str, Any]:
        full = self.full_key(key)
        return await self.gcs.call("head", full, lambda c: self.gcs.json_request(c, "GET", self.gcs.object_url(full)))

    async def size(self, key: str) -> int:
        return int((await self._meta(key))["size"])

    async def list_full(self, want: str) -> list[str]:
        return list(await self.gcs.call("list", want, lambda c: self.gcs.list_names(c, want)))

    def range_getter(self, full: str) -> GetRange:
        where = self.gcs.where(full)
        url = self.gcs.object_url(full)

        async def get(pos: int, view: memoryview, progress: Progress) -> None:
            lc = await self.gcs.loop_client()
            params = {"alt": "media"}
            if progress.version:
                params["ifGenerationMatch"] = progress.version
            try:
                async with lc.transfers:
                    headers = await self.gcs.headers(lc)
                    headers["Range"] = f"bytes={pos}-{pos + len(view) - 1}"
                    async with lc.session.get(url, params=params, headers=headers) as resp:
                        if resp.status >= 300:
                            raise HTTPStatusError(resp.status, await resp.read())
                        if resp.status != 206 and pos != 0:
                            raise PermanentStorageError(
                                f"read {where}: the store ignored the Range header (HTTP {resp.status} for bytes={pos}-)"
                            )
                        if progress.version is None:
                            progress.version = resp.headers.get("x-goog-generation")
                        done = 0
                        while done < len(view):
                            chunk = await resp.content.read(min(_BODY_CHUNK, len(view) - done))
                            if not chunk:
                                break
                            view[done : done + len(chunk)] = chunk
                            done += len(chunk)
                            progress.got += len(chunk)
            except CheckpointError:
                raise
            except Exception as exc:
                err = self.gcs.error("read", full, exc)
                if isinstance(err, StoragePreconditionError) and progress.version:
                    raise IntegrityError(f"{where} changed while it was being read; read it again") from exc
                if isinstance(err, IntegrityError):
                    raise IntegrityError(f"{where} is truncated: the object ends before byte {pos}") from exc
                raise err from exc

        return get

    async def close(self) -> None:
        """Close this event loop's session; other loops keep theirs. This loop cannot use the storage afterwards."""
        await self.gcs.close()
