"""The S3 client's life cycle (one aiobotocore client per event loop) and the calls every S3 part shares."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import AioSession
from botocore.exceptions import ClientError, ProfileNotFound

from ...errors import BadInputError, CheckpointError
from ...format import checksum as crc32c_of
from ..objectstore import PerLoop, timed
from .config import S3Config
from .errors import CALL_ERRORS, error_code, translate

__all__ = ["LoopClient", "S3Client", "b64_crc32c"]

logger = logging.getLogger(__name__)


def b64_crc32c(data: bytes | memoryview | None = None, *, value: int | None = None) -> str:
    """The ``ChecksumCRC32C`` header: base64 of the 4-byte big-endian CRC32C (of ``data``, or ``value``)."""
    crc = value if value is not None else crc32c_of(data if data is not None else b"")
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


@dataclass
class LoopClient:
    """One event loop's aiobotocore client, its exit stack, and its bound on transfers in flight."""

    client: Any
    stack: contextlib.AsyncExitStack
    transfers: Any  # asyncio.Semaphore: bounds part uploads and ranged GETs on this loop


class S3Client:
    """Per-loop aiobotocore clients for one bucket, and the request helpers the storage and its writers use."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.bucket = config.bucket
        self.checksum = config.checksum  # turned off once if the store refuses S3 checksums
        self._botocore = config.botocore_config()
        self._clients: PerLoop[LoopClient] = PerLoop(f"{config.uri} (S3Storage)")

    def where(self, full_key: str) -> str:
        return f"s3://{self.bucket}/{full_key}"

    def error(self, op: str, full_key: str, exc: BaseException) -> CheckpointError:
        return translate(op, self.where(full_key), self.bucket, exc)

    async def loop_client(self) -> LoopClient:
        return await self._clients.get(self._create)

    async def _create(self) -> LoopClient:
        stack = contextlib.AsyncExitStack()
        cfg = self.config
        try:
            session = AioSession(profile=cfg.profile)
            client = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    endpoint_url=cfg.endpoint_url,
                    region_name=cfg.region_name,
                    config=self._botocore,
                    **cfg.credentials(),
                )
            )
        except ProfileNotFound as exc:
            await stack.aclose()
            raise BadInputError(f"{cfg.uri}: AWS profile {cfg.profile!r} not found ({exc})") from exc
        except Exception as exc:
            await stack.aclose()
            raise self.error("connect", "", exc) from exc
        return LoopClient(client, stack, asyncio.Semaphore(cfg.part_concurrency))

    @property
    def clients(self) -> int:
        """How many loops hold a client now."""
        return len(self._clients)

    async def client(self) -> Any:
        return (await self.loop_client()).client

    async def timed(self, aw: Any) -> Any:
        """Await ``aw`` under ``op_timeout`` (StorageOpTimeoutError when it expires)."""
        return await timed(aw, self.config.op_timeout)

    async def call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        """One S3 API call on this bucket, under ``op_timeout``; raw botocore errors pass through."""
        client = await self.client()
        return await self.timed(getattr(client, method)(Bucket=self.bucket, **kwargs))  # type: ignore[no-any-return]

    async def put_object(self, full: str, body: bytes, **extra: Any) -> dict[str, Any]:
        """PutObject with our CRC32C when enabled; disables checksums once if the store refuses them."""
        if self.checksum:
            try:
                return await self.call("put_object", Key=full, Body=body, ChecksumCRC32C=b64_crc32c(body), **extra)
            except ClientError as exc:
                if not self.checksum_refused(exc, ambiguous=bool(extra)):
                    raise
        return await self.call("put_object", Key=full, Body=body, **extra)

    def checksum_refused(self, exc: ClientError, *, ambiguous: bool = False) -> bool:
        """Whether ``exc`` says the store does not support S3 checksums (then stop sending them).

        ``ambiguous``: the request carried other optional headers, so a bare NotImplemented may be about those.
        """
        code, status = error_code(exc)
        msg = str((exc.response.get("Error", {}) or {}).get("Message", "")).lower()
        about_checksum = "checksum" in msg
        if (code == "NotImplemented" and (about_checksum or not ambiguous)) or (
            status == 400 and code in ("InvalidArgument", "InvalidRequest") and about_checksum
        ):
            logger.warning(
                "%s: the store refuses S3 checksums (%s: %s); sending parts without CRC32C", self.config.uri, code, msg
            )
            self.checksum = False
            return True
        return False

    async def abort_upload(self, full: str, upload_id: str, *, quiet: bool) -> bool:
        """AbortMultipartUpload; True if aborted, False if it was already gone. Quiet: log instead of raising."""
        try:
            await self.call("abort_multipart_upload", Key=full, UploadId=upload_id)
            return True
        except ClientError as exc:
            code, status = error_code(exc)
            if code == "NoSuchUpload" or status == 404:
                return False
            err: CheckpointError = self.error("abort", full, exc)
        except CALL_ERRORS as exc:
            err = self.error("abort", full, exc)
        if not quiet:
            raise err
        logger.warning("%s (upload %s left behind: S3Storage.abort_incomplete_uploads() removes it)", err, upload_id)
        return False

    async def close(self) -> None:
        """Close this loop's client; this loop cannot use it afterwards."""

        async def shut(lc: LoopClient) -> None:
            await lc.stack.aclose()

        await self._clients.close(shut)
