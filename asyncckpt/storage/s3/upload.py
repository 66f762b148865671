"""The S3 upload state machine: one buffered PUT for small objects, else a multipart upload."""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

from botocore.exceptions import ClientError

from ...errors import CheckpointError
from ..objectstore import PartWriter
from .client import S3Client, b64_crc32c
from .errors import CALL_ERRORS, error_code, is_transient

__all__ = ["S3Writer"]


class S3Writer(PartWriter):
    """A multipart upload (or one buffered PUT for small objects); nothing is visible before `commit`.

    open --write_part--> open (parts uploaded; the upload is created by the first part)
    open --commit--> committed (CompleteMultipartUpload, verified if its reply is lost) | failed + aborted
    open --abort / a failed part--> aborted (AbortMultipartUpload; once more if a part lands after it)
    """

    service = "S3"

    def __init__(self, s3: S3Client, full: str, single_size: int | None) -> None:
        super().__init__(s3.where(full), single_size)
        self._s3 = s3
        self._full = full
        self._upload_id: str | None = None
        self._checksum = s3.checksum  # fixed per upload once it is created
        self._create_lock: asyncio.Lock | None = None
        self._parts: dict[int, dict[str, Any]] = {}
        self._sizes: dict[int, int] = {}

    def _error(self, op: str, exc: Exception) -> CheckpointError:
        return self._s3.error(op, self._full, exc)

    async def _send_part(self, index: int, view: memoryview, crc32c: int | None) -> None:
        await self._upload_part(index + 1, view, crc32c)

    async def _put_whole(self, body: memoryview) -> None:
        await self._s3.put_object(self._full, bytes(body))

    async def _landed_after_abort(self) -> None:
        if self._upload_id is not None:  # a part in flight during abort may have landed after it: abort once more
            await self._s3.abort_upload(self._full, self._upload_id, quiet=True)

    async def _discard(self, first: bool) -> None:
        if self._upload_id is not None and (first or self._inflight):
            await self._s3.abort_upload(self._full, self._upload_id, quiet=True)

    async def _ensure_upload(self) -> str:
        if self._upload_id is not None:
            return self._upload_id
        if self._create_lock is None:
            self._create_lock = asyncio.Lock()
        async with self._create_lock:
            if self._upload_id is None:
                self._upload_id = await self._create()
        return self._upload_id

    async def _create(self) -> str:
        s3 = self._s3
        self._checksum = s3.checksum
        if self._checksum:
            try:
                resp = await s3.call("create_multipart_upload", Key=self._full, ChecksumAlgorithm="CRC32C")
                return str(resp["UploadId"])
            except ClientError as exc:
                if not s3.checksum_refused(exc):
                    raise
        self._checksum = False
        resp = await s3.call("create_multipart_upload", Key=self._full)
        return str(resp["UploadId"])

    async def _upload_part(self, number: int, view: memoryview, crc32c: int | None) -> None:
        upload_id = await self._ensure_upload()
        lc = await self._s3.loop_client()
        async with lc.transfers:  # at most part_concurrency copies in flight
            self._st.check_open("write_part")
            body = bytes(view)  # botocore wants bytes; and a retry after we return must not see reused memory
            extra: dict[str, Any] = {}
            crc = None
            if self._checksum:
                crc = b64_crc32c(value=crc32c) if crc32c is not None else b64_crc32c(body)
                extra["ChecksumCRC32C"] = crc
            resp = await self._s3.timed(
                lc.client.upload_part(
                    Bucket=self._s3.bucket, Key=self._full, UploadId=upload_id, PartNumber=number, Body=body, **extra
                )
            )
        part: dict[str, Any] = {"PartNumber": number, "ETag": resp["ETag"]}
        if crc is not None:
            part["ChecksumCRC32C"] = crc
        self._parts[number] = part
        self._sizes[number] = len(body)

    async def _assemble(self, indices: list[int]) -> None:
        numbers = [i + 1 for i in indices]
        parts = [self._parts[i] for i in numbers]
        total = sum(self._sizes.values())
        s3 = self._s3
        policy = s3.config.policy
        last: BaseException | None = None
        for attempt in range(policy.max_attempts):
            try:
                await s3.call(
                    "complete_multipart_upload",
                    Key=self._full,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
                return
            except ClientError as exc:
                code, _ = error_code(exc)
                if code == "NoSuchUpload" and await self._completed(parts, total):
                    return  # an earlier attempt did complete; its reply was lost
                if not is_transient(exc):
                    raise
                last = exc
            except Exception as exc:
                if not is_transient(exc):
                    raise
                last = exc
            # The reply was lost or the store failed: the upload may have completed anyway.
            if await self._completed(parts, total):
                return
            await policy.backoff(attempt + 1)
        assert last is not None
        raise last

    async def _completed(self, parts: list[dict[str, Any]], total: int) -> bool:
        """Whether CompleteMultipartUpload took effect: upload gone and our object (size, ETag) in place."""
        s3 = self._s3
        try:
            await s3.call("list_parts", Key=self._full, UploadId=self._upload_id, MaxParts=1)
            return False  # the upload still exists: not completed
        except ClientError as exc:
            code, status = error_code(exc)
            if code != "NoSuchUpload" and status != 404:
                return False
        except CALL_ERRORS:
            return False
        try:
            head = await s3.call("head_object", Key=self._full)
        except CALL_ERRORS:
            return False
        if int(head.get("ContentLength", -1)) != total:
            return False
        etag = str(head.get("ETag", "")).strip('"')
        digests = [str(p["ETag"]).strip('"') for p in parts]
        if re.fullmatch(r"[0-9a-f]{32}-\d+", etag) and all(re.fullmatch(r"[0-9a-f]{32}", d) for d in digests):
            expect = hashlib.md5(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()
            return etag == f"{expect}-{len(parts)}"
        return True
