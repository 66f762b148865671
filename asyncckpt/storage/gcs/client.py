"""The GCS client's life cycle (one aiohttp session and token per event loop) and the JSON API calls."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from gcloud.aio.auth import Token

from ...errors import CheckpointError, StoragePermissionError, TransientStorageError
from ...format import checksum as crc32c_of
from ..objectstore import PerLoop, retrying, timed
from .config import GCSConfig
from .errors import HTTPStatusError, translate

__all__ = ["SCOPES", "GCSClient", "LoopClient", "b64_crc32c"]

SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
T = TypeVar("T")
_SLICE = 1024 * 1024  # upload bodies are streamed in slices of the caller's memory (no copy)


def b64_crc32c(data: bytes | memoryview | None = None, *, value: int | None = None) -> str:
    """GCS's ``crc32c`` field: base64 of the 4-byte big-endian CRC32C (of ``data``, or ``value``)."""
    crc = value if value is not None else crc32c_of(data if data is not None else b"")
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


@dataclass
class LoopClient:
    """One event loop's HTTP session, token source, and bound on transfers in flight."""

    session: aiohttp.ClientSession
    token: Token | None
    transfers: asyncio.Semaphore


class GCSClient:
    """Per-loop aiohttp sessions for one bucket and the JSON API calls, translated and retried at this edge."""

    def __init__(self, config: GCSConfig) -> None:
        self.config = config
        self.bucket = config.bucket
        self.checksum = config.checksum
        self._clients: PerLoop[LoopClient] = PerLoop(f"{config.uri} (GCSStorage)")
        root = config.endpoint_url
        self._objects = f"{root}/storage/v1/b/{quote(self.bucket, safe='')}/o"
        self._uploads = f"{root}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"

    def where(self, full_key: str) -> str:
        return f"gs://{self.bucket}/{full_key}"

    def error(self, op: str, full_key: str, exc: BaseException) -> CheckpointError:
        return translate(op, self.where(full_key), self.bucket, exc)

    def object_url(self, full_key: str) -> str:
        return f"{self._objects}/{quote(full_key, safe='')}"

    async def loop_client(self) -> LoopClient:
        return await self._clients.get(self._create)

    async def _create(self) -> LoopClient:
        cfg = self.config
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout)
        connector = aiohttp.TCPConnector(limit=max(10, 2 * cfg.part_concurrency))
        session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        token = None
        if not cfg.anonymous and cfg.token is None:
            try:
                token = Token(service_file=cfg.service_file, session=session, scopes=SCOPES)  # type: ignore[arg-type]  # an aiohttp session is what it wraps
            except Exception as exc:
                await session.close()
                raise StoragePermissionError(
                    f"{cfg.uri}: no usable Google credentials ({type(exc).__name__}: {exc}): set "
                    f"GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth application-default login`, or pass "
                    f"service_file= / token="
                ) from exc
        return LoopClient(session, token, asyncio.Semaphore(cfg.part_concurrency))

    async def headers(self, lc: LoopClient) -> dict[str, str]:
        if self.config.token is not None:
            return {"Authorization": f"Bearer {self.config.token}"}
        if lc.token is None:
            return {}
        try:
            return {"Authorization": f"Bearer {await lc.token.get()}"}
        except (aiohttp.ClientConnectorError, asyncio.TimeoutError) as exc:
            raise TransientStorageError(f"{self.config.uri}: could not reach the Google token service ({exc})") from exc
        except Exception as exc:
            raise StoragePermissionError(
                f"{self.config.uri}: no usable Google credentials ({type(exc).__name__}: {exc}): set "
                f"GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth application-default login`, or pass "
                f"service_file= / token="
            ) from exc

    async def call(
        self, op: str, full_key: str, fn: Callable[[LoopClient], Awaitable[T]], *, retry: bool = True
    ) -> T:
        """Run ``fn(loop_client)`` under ``op_timeout``, translated at this edge, retried when transient."""
        lc = await self.loop_client()

        async def once() -> T:
            try:
                return await timed(fn(lc), self.config.op_timeout)
            except Exception as exc:
                raise self.error(op, full_key, exc) from exc

        if not retry:
            return await once()
        return await retrying(once, self.config.policy, what=f"{op} {self.where(full_key)}")

    async def json_request(
        self, lc: LoopClient, method: str, url: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> dict[str, Any]:
        """One JSON API request; an error status raises HTTPStatusError; returns the JSON reply ({} if none)."""
        headers = await self.headers(lc)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        async with lc.session.request(method, url, params=params, headers=headers, data=data) as resp:
            raw = await resp.read()
            if resp.status >= 300:
                raise HTTPStatusError(resp.status, raw)
            return json.loads(raw) if raw.strip() else {}

    async def upload(
        self,
        lc: LoopClient,
        name: str,
        data: memoryview,
        *,
        crc32c: int | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A multipart (metadata + media) upload of ``data`` to object ``name``, streamed from the caller's memory.

        With checksums on, the metadata carries the CRC32C, which GCS verifies before it keeps the object.
        """
        meta: dict[str, Any] = {"name": name, "contentType": "application/octet-stream"}
        if self.checksum:
            meta["crc32c"] = b64_crc32c(data, value=crc32c)
        boundary = f"asyncckpt-{uuid.uuid4().hex}"
        head = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json.dumps(meta)}\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        async def body() -> AsyncIterator[bytes | memoryview]:
            yield head
            for i in range(0, len(data), _SLICE):
                yield data[i : i + _SLICE]
            yield tail

        headers = await self.headers(lc)
        headers["Content-Type"] = f"multipart/related; boundary={boundary}"
        headers["Content-Length"] = str(len(head) + len(data) + len(tail))
        query = {"uploadType": "multipart", **(params or {})}
        async with lc.session.post(self._uploads, params=query, headers=headers, data=body()) as resp:
            raw = await resp.read()
            if resp.status >= 300:
                raise HTTPStatusError(resp.status, raw)
            return json.loads(raw) if raw.strip() else {}

    async def delete_object(self, lc: LoopClient, name: str) -> bool:
        """DELETE one object; False if it was not there."""
        try:
            await self.json_request(lc, "DELETE", self.object_url(name))
        except HTTPStatusError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list_names(self, lc: LoopClient, prefix: str) -> list[str]:
        """Every object name starting with ``prefix`` (all pages)."""
        out: list[str] = []
        params = {"prefix": prefix, "fields": "items(name),nextPageToken", "maxResults": str(self.config.list_page_size)}
        while True:
            page = await self.json_request(lc, "GET", self._objects, params=params)
            out += [item["name"] for item in page.get("items", []) or []]
            token = page.get("nextPageToken")
            if not token:
                return out
            params["pageToken"] = token

    async def close(self) -> None:
        """Close this loop's session; this loop cannot use it afterwards."""

        async def shut(lc: LoopClient) -> None:
            if lc.token is not None:
                await lc.token.close()
            await lc.session.close()

        await self._clients.close(shut)
