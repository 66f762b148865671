"""`GCSStorage`: a bucket prefix on Google Cloud Storage (or an emulator)."""

from __future__ import annotations

import contextlib
from typing import Any

from ...errors import (
    BadInputError,
    CheckpointError,
    IntegrityError,
    PermanentStorageError,
    StorageNotFoundError,
    StoragePreconditionError,
)
from ..base import Capabilities
from ..keys import TEMP_MARK, check_key, is_temp_key
from ..objectstore import Progress, read_ranges
from .client import GCSClient, LoopClient
from .config import GCSConfig
from .errors import HTTPStatusError
from .upload import GCSWriter

__all__ = ["GCSStorage"]

_BODY_CHUNK = 1024 * 1024


class GCSStorage:
    """A bucket prefix on Google Cloud Storage: ``gs://bucket/prefix``.

    Credentials are Google's application-default ones (``GOOGLE_APPLICATION_CREDENTIALS``, the
    gcloud ADC file, the VM's metadata server) unless ``service_file=`` or ``token=`` is given;
    ``STORAGE_EMULATOR_HOST`` (or ``endpoint_url=``) points it at an emulator, which takes no
    credentials. Parts go up in parallel as temporary objects, each with its CRC32C checked by
    GCS, and are composed into the object at commit; reads are parallel ranged GETs resumed
    after a cut; ``put_record(if_absent=True)`` is an upload with ``ifGenerationMatch=0``.
    """

    capabilities = Capabilities(conditional_put=True, abort_incomplete=True, server_checksum="crc32c")

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

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    # ------------------------------------------------------------------ writes

    async def open_writer(self, key: str, size_hint: int | None = None) -> GCSWriter:
        full = self._full(key)
        single = size_hint is not None and size_hint < self.config.single_put_threshold
        return GCSWriter(self.gcs, full, size_hint if single else None)

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        full = self._full(key)
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
            if attempts > 1:
                # An earlier attempt may have landed before its reply was lost: it was ours if the bytes match.
                with contextlib.suppress(CheckpointError):
                    return await self.read(key) == bytes(body)
            return False
        return True

    async def delete(self, key: str) -> None:
        full = self._full(key)
        await self.gcs.call("delete", full, lambda c: self.gcs.delete_object(c, full))

    async def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Delete the temporary part objects of unfinished uploads under ``prefix`` (a key or a folder); returns how many."""
        if prefix:
            check_key(prefix)
        want = self._full(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        names = await self.gcs.call("list", want, lambda c: self.gcs.list_names(c, want))
        n = 0
        for full in names:
            rel = self._rel(full)
            if TEMP_MARK not in rel:
                continue
            if prefix and not (rel.startswith(prefix + "/") or rel.startswith(prefix + TEMP_MARK)):
                continue
            if await self.gcs.call("abort", full, lambda c, f=full: self.gcs.delete_object(c, f)):
                n += 1
        return n

    # ------------------------------------------------------------------ reads

    async def _meta(self, key: str) -> dict[str, Any]:
        full = self._full(key)
        return await self.gcs.call("head", full, lambda c: self.gcs.json_request(c, "GET", self.gcs.object_url(full)))

    async def size(self, key: str) -> int:
        return int((await self._meta(key))["size"])

    async def exists(self, key: str) -> bool:
        try:
            await self._meta(key)
        except StorageNotFoundError:
            return False
        return True

    async def list(self, prefix: str = "") -> list[str]:
        if prefix:
            check_key(prefix)
        folder = self._full(prefix) if prefix else self.prefix
        want = folder + "/" if folder else ""
        names = await self.gcs.call("list", want, lambda c: self.gcs.list_names(c, want))
        return sorted(self._rel(n) for n in names if not n.endswith("/") and not is_temp_key(n[len(want) :]))

    async def read(self, key: str) -> bytes:
        size = await self.size(key)
        buf = bytearray(size)
        if size:
            await self.read_into(key, 0, memoryview(buf))
        return bytes(buf)

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        full = self._full(key)
        where = self.gcs.where(full)
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
