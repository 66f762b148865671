"""`S3Storage`: a bucket prefix on S3 or an S3-compatible store."""

from __future__ import annotations

import builtins
import logging
import re
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import ClientError

from ...errors import (
    BadInputError,
    CheckpointError,
    IntegrityError,
    PermanentStorageError,
    StorageOpTimeoutError,
    TransientStorageError,
)
from ..base import Capabilities
from ..keys import check_key
from ..objectstore import GetRange, PrefixedStore, Progress, resumable_fetch
from .client import S3Client
from .config import S3Config
from .errors import CONFLICT, NOT_FOUND, PRECONDITION, error_code, retry_count
from .upload import S3Writer

__all__ = ["S3Storage"]

_BODY_CHUNK = 1024 * 1024
_DELETE_BATCH = 1000  # keys one DeleteObjects request takes
logger = logging.getLogger(__name__)


class S3Storage(PrefixedStore):
    """A bucket prefix on S3 or an S3-compatible store (SeaweedFS, MinIO, Ceph RGW, moto).

    Endpoint, region and credentials come from the usual AWS settings (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/config``...) unless given here.
    ``op_timeout`` bounds every request (a part, a ranged GET, a HEAD...) including botocore's
    own retries; an expired one raises StorageOpTimeoutError.
    """

    capabilities = Capabilities(conditional_put=True, abort_incomplete=True, server_checksum="crc32c", delete_many=True)
    config: S3Config

    def __init__(self, uri: str, **options: Any) -> None:
        try:
            self.config = S3Config(uri, **options)
        except TypeError as exc:
            raise BadInputError(f"{uri}: unknown S3 option ({exc})") from exc
        cfg = self.config
        self.bucket, self.prefix, self.uri = cfg.bucket, cfg.prefix, cfg.uri
        self.endpoint_url = cfg.endpoint_url
        self.region_name = cfg.region_name
        self.profile = cfg.profile
        self.max_attempts = cfg.max_attempts
        self.part_concurrency = cfg.part_concurrency
        self.single_put_threshold = cfg.single_put_threshold
        self.read_range_size = cfg.read_range_size
        self.op_timeout = cfg.op_timeout
        self.s3 = S3Client(cfg)
        # None until a conditional PUT has been tried (when "auto"), then True/False.
        self._conditional: bool | None = None if cfg.conditional_writes == "auto" else bool(cfg.conditional_writes)
        # False once the store refused DeleteObjects: delete_many deletes key by key from then on.
        self._batch_delete = True

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"

    @property
    def checksum(self) -> bool:
        """Whether parts carry our CRC32C (turned off once if the store refuses S3 checksums)."""
        return self.s3.checksum

    def where(self, full: str) -> str:
        return self.s3.where(full)

    # ------------------------------------------------------------------ writes

    async def open_writer(self, key: str, size_hint: int | None = None) -> S3Writer:
        full = self.full_key(key)
        single = size_hint is not None and size_hint < self.single_put_threshold
        return S3Writer(self.s3, full, size_hint if single else None)

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        full = self.full_key(key)
        data = bytes(data)
        if not if_absent:
            try:
                await self.s3.put_object(full, data)
            except Exception as exc:
                raise self.s3.error("put", full, exc) from exc
            return True
        if self._conditional is not False:
            result = await self._put_if_absent(full, data)
            if result is not None:
                return result
        # Fallback for stores without conditional writes: NOT atomic (documented).
        if await self.exists(key):
            return False
        try:
            await self.s3.put_object(full, data)
        except Exception as exc:
            raise self.s3.error("put", full, exc) from exc
        return True

    async def _put_if_absent(self, full: str, data: bytes) -> bool | None:
        """PUT with ``If-None-Match: *``; None when the store does not support it (and "auto" allows a fallback)."""
        policy = self.config.policy
        for attempt in range(policy.max_attempts):
            try:
                await self.s3.put_object(full, data, IfNoneMatch="*")
                self._conditional = True
                return True
            except ClientError as exc:
                code, status = error_code(exc)
                if code in PRECONDITION or status == 412:
                    self._conditional = True
                    return await self.landed_earlier(self.relative_key(full), data, retried=bool(retry_count(exc)))
                if code in CONFLICT or status == 409:
                    await policy.backoff(attempt + 1)  # a concurrent conditional write is in progress: retry
                    continue
                if (
                    self.config.conditional_writes == "auto"
                    and self._conditional is None
                    and (code in ("NotImplemented", "InvalidArgument", "InvalidRequest") or status == 501)
                ):
                    logger.warning(
                        "%s: the store rejects conditional writes (%s); put_record(if_absent=True) falls back to "
                        "HEAD then PUT, which is not atomic",
                        self.uri,
                        code or status,
                    )
                    self._conditional = False
                    return None
                raise self.s3.error("put_if_absent", full, exc) from exc
            except Exception as exc:
                raise self.s3.error("put_if_absent", full, exc) from exc
        raise TransientStorageError(
            f"put_if_absent {self.where(full)} failed: {policy.max_attempts} conflicting concurrent "
            f"conditional writes; retry"
        )

    async def delete(self, key: str) -> None:
        full = self.full_key(key)
        try:
            await self.s3.call("delete_object", Key=full)
        except ClientError as exc:
            code, status = error_code(exc)
            if code in NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
                return
            raise self.s3.error("delete", full, exc) from exc
        except Exception as exc:
            raise self.s3.error("delete", full, exc) from exc

    async def delete_many(self, groups: Sequence[Sequence[str]]) -> None:
        """Delete group after group, each in one DeleteObjects request (1,000 keys a request) where
        the store takes it, else key by key; a key the batch could not delete is retried alone, and
        raises as ``delete`` does."""
        for group in [list(g) for g in groups]:
            for i in range(0, len(group), _DELETE_BATCH):
                await self._delete_batch(group[i : i + _DELETE_BATCH])

    async def _delete_batch(self, keys: builtins.list[str]) -> None:
        if len(keys) < 2 or not self._batch_delete:
            for key in keys:
                await self.delete(key)
            return
        fulls = {self.full_key(k): k for k in keys}
        try:
            resp = await self.s3.call("delete_objects", Delete={"Objects": [{"Key": f} for f in fulls], "Quiet": True})
        except ClientError as exc:
            code, status = error_code(exc)
            if code not in ("NotImplemented", "MethodNotAllowed", "InvalidRequest") and status not in (405, 501):
                raise self.s3.error("delete", next(iter(fulls)), exc) from exc
            logger.warning("%s: the store refuses DeleteObjects (%s); deleting key by key", self.uri, code or status)
            self._batch_delete = False
            resp = {"Errors": [{"Key": f} for f in fulls]}
        except Exception as exc:
            raise self.s3.error("delete", next(iter(fulls)), exc) from exc
        for err in resp.get("Errors", []) or []:  # each failed key alone: absent is fine, others raise
            if err.get("Code") not in NOT_FOUND and err.get("Key") in fulls:
                await self.delete(fulls[err["Key"]])

    async def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Abort every multipart upload for ``prefix`` (a key or a folder) left by a crashed save; returns how many."""
        if prefix:
            check_key(prefix)
        full = self.full_key(prefix) if prefix else self.prefix
        n = 0
        kwargs: dict[str, Any] = {"Prefix": full}
        while True:
            try:
                page = await self.s3.call("list_multipart_uploads", **kwargs)
            except Exception as exc:
                raise self.s3.error("list_multipart_uploads", full, exc) from exc
            for up in page.get("Uploads", []) or []:
                key = up["Key"]
                rel = self.relative_key(key) if (not self.prefix or key.startswith(self.prefix + "/")) else None
                if rel is None or (prefix and rel != prefix and not rel.startswith(prefix + "/")):
                    continue
                if await self.s3.abort_upload(key, up["UploadId"], quiet=False):
                    n += 1
            if not page.get("IsTruncated"):
                return n
            kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
            if not kwargs["KeyMarker"] and not kwargs["UploadIdMarker"]:
                return n

    # ------------------------------------------------------------------ reads

    async def size(self, key: str) -> int:
        full = self.full_key(key)
        try:
            head = await self.s3.call("head_object", Key=full)
        except Exception as exc:
            raise self.s3.error("head", full, exc) from exc
        return int(head["ContentLength"])

    async def list_full(self, want: str) -> list[str]:
        out: list[str] = []
        kwargs: dict[str, Any] = {"Prefix": want, "MaxKeys": self.config.list_page_size}
        while True:
            try:
                page = await self.s3.call("list_objects_v2", **kwargs)
            except Exception as exc:
                raise self.s3.error("list", want, exc) from exc
            out.extend(obj["Key"] for obj in page.get("Contents", []) or [])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return out
            kwargs["ContinuationToken"] = token

    async def read(self, key: str) -> bytes:
        full = self.full_key(key)
        progress = Progress()
        try:
            resp = await self.s3.call("get_object", Key=full)
        except Exception as exc:
            raise self.s3.error("read", full, exc) from exc
        length = int(resp["ContentLength"])
        buf = bytearray(length)
        view = memoryview(buf)
        try:
            await self.s3.timed(self._drain(resp["Body"], view, progress))
        except Exception as exc:
            err = self.s3.error("read", full, exc)
            if not isinstance(err, TransientStorageError) or isinstance(err, StorageOpTimeoutError):
                raise err from exc
            # Cut mid-body: resume the rest with Range requests.
            await self._fetch_into(full, progress.got, view[progress.got :], version=resp.get("ETag"), failures=1)
            return bytes(buf)
        if progress.got != length:
            raise IntegrityError(f"{self.where(full)} is truncated: got {progress.got} of {length} bytes")
        return bytes(buf)

    async def fetch_into(self, key: str, start: int, view: memoryview, *, version: str | None = None) -> None:
        """Fill ``view`` from ``start`` of ``key`` with resumable ranged GETs pinned to ``version`` (an ETag) if given."""
        await self._fetch_into(self.full_key(key), start, view, version=version)

    async def _fetch_into(
        self, full: str, start: int, view: memoryview, *, version: str | None = None, failures: int = 0
    ) -> None:
        await resumable_fetch(
            self.range_getter(full),
            start,
            view,
            where=self.where(full),
            policy=self.config.policy,
            op_timeout=self.config.op_timeout,
            version=version,
            failures=failures,
        )

    def range_getter(self, full: str) -> GetRange:
        async def get(pos: int, view: memoryview, progress: Progress) -> None:
            lc = await self.s3.loop_client()
            try:
                async with lc.transfers:
                    await self._get_range(lc.client, full, pos, view, progress)
            except CheckpointError:
                raise
            except ClientError as exc:
                code, status = error_code(exc)
                if code == "InvalidRange" or status == 416:
                    raise IntegrityError(
                        f"{self.where(full)} is truncated: the object ends before byte {pos}"
                    ) from exc
                if progress.version and (code in PRECONDITION or status == 412):
                    raise IntegrityError(f"{self.where(full)} changed while it was being read; read it again") from exc
                raise self.s3.error("read", full, exc) from exc
            except Exception as exc:
                raise self.s3.error("read", full, exc) from exc

        return get

    async def _get_range(self, client: Any, full: str, pos: int, view: memoryview, progress: Progress) -> None:
        end = pos + len(view) - 1
        extra: dict[str, Any] = {"IfMatch": progress.version} if progress.version else {}
        resp = await client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={pos}-{end}", **extra)
        content_range = resp.get("ContentRange")
        if content_range:
            m = re.match(r"bytes (\d+)-(\d+)/", content_range)
            if m is None or int(m.group(1)) != pos:
                resp["Body"].close()
                raise IntegrityError(f"{self.where(full)}: asked for bytes from {pos}, the store sent {content_range!r}")
        elif pos != 0:
            resp["Body"].close()
            raise PermanentStorageError(
                f"read {self.where(full)}: the store ignored the Range header (HTTP 200 for bytes={pos}-)"
            )
        if progress.version is None:
            progress.version = resp.get("ETag")
        await self._drain(resp["Body"], view, progress)

    @staticmethod
    async def _drain(body: Any, view: memoryview, progress: Progress) -> None:
        """Copy a response body into ``view``, counting bytes in ``progress`` as they arrive."""
        n = len(view)
        done = 0
        try:
            while done < n:
                chunk = await body.read(min(_BODY_CHUNK, n - done))
                if not chunk:
                    break
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
                progress.got += len(chunk)
        finally:
            body.close()

    async def close(self) -> None:
        """Close this event loop's client; other loops keep theirs. This loop cannot use the storage afterwards."""
        await self.s3.close()
