"""S3 backend (aiobotocore): streaming multipart uploads, parallel ranged reads that resume.

One client per running event loop (the worker's uvloop and the trainer's private loop
thread may both use the same `S3Storage`), created lazily and closed by `close()`.
Every botocore/aiohttp error leaves as a `StorageError` (or subclass) whose message
names the operation, the ``s3://bucket/key`` and what to do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import random
import re
import socket
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from .._loop import gather_or_cancel
from ..errors import (
    BadInputError,
    CheckpointError,
    CheckpointNotFoundError,
    IntegrityError,
    StorageError,
    StorageTimeoutError,
)
from ..format import checksum as _crc32c
from . import register_backend
from .keys import check_key

__all__ = ["MIN_PART_SIZE", "S3Storage"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
_BODY_CHUNK = 1 * MiB

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")
_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_CREDENTIALS = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "ExpiredToken",
    "Forbidden",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
    "403",
}
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
}
_DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}
_PRECONDITION = {"PreconditionFailed", "412"}
_CONFLICT = {"ConditionalRequestConflict", "OperationAborted", "409"}
# Errors after which the server may or may not have acted on the request.
_TRANSIENT_EXC = (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


class _OpTimeout(Exception):
    """Raised by `S3Storage._timed` when ``op_timeout`` expires (kept apart from botocore's timeouts)."""


# Everything a request can fail with (for best-effort calls that must not raise).
_CALL_ERRORS = (ClientError, CheckpointError, _OpTimeout, *_TRANSIENT_EXC)


def _code(exc: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status of a ClientError (``("", 0)`` otherwise)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) or {}
        meta = exc.response.get("ResponseMetadata", {}) or {}
        return str(err.get("Code", "") or ""), int(meta.get("HTTPStatusCode", 0) or 0)
    return "", 0


def _retries(exc: BaseException) -> int:
    if isinstance(exc, ClientError):
        return int((exc.response.get("ResponseMetadata", {}) or {}).get("RetryAttempts", 0) or 0)
    return 0


def _is_transient(exc: BaseException) -> bool:
    """True for errors where retrying may help: connection trouble, timeouts, throttling, 5xx."""
    if isinstance(exc, ClientError):
        code, status = _code(exc)
        return status >= 500 or code in _THROTTLED or code in {"RequestTimeout", "InternalError"}
    return isinstance(exc, (_OpTimeout, *_TRANSIENT_EXC)) and not isinstance(
        exc, (NoCredentialsError, PartialCredentialsError, ProfileNotFound)
    )


def _never_connected(exc: EndpointConnectionError) -> bool:
    """True when no TCP connection was made (refused, DNS); False for a connection that broke mid-request.

    aiobotocore reports both as EndpointConnectionError; only the wrapped aiohttp error tells them apart.
    """
    inner = exc.kwargs.get("error")
    return inner is None or isinstance(inner, (aiohttp.ClientConnectorError, socket.gaierror))


def _b64_crc32c(data: bytes | memoryview) -> str:
    return base64.b64encode(_crc32c(data).to_bytes(4, "big")).decode("ascii")


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))


@dataclass
class _LoopClient:
    client: Any
    stack: contextlib.AsyncExitStack
    transfers: asyncio.Semaphore  # bounds part uploads and ranged GETs on this loop


class _Progress:
    __slots__ = ("etag", "got")

    def __init__(self, etag: str | None = None) -> None:
        self.got = 0
        self.etag = etag  # of the first response: resumed GETs must see the same object


class S3Storage:
    """A bucket prefix on S3 or an S3-compatible store (SeaweedFS, MinIO, Ceph RGW, moto).

    Endpoint, region and credentials come from the usual AWS settings (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/config``...) unless given here.
    ``op_timeout`` bounds every request (a part, a ranged GET, a HEAD...) including botocore's
    own retries; an expired one raises StorageTimeoutError.
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        profile: str | None = None,
        max_attempts: int = 5,
        part_concurrency: int = 8,
        single_put_threshold: int = 8 * MiB,
        read_range_size: int = 16 * MiB,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        op_timeout: float | None = None,
        conditional_writes: bool | str = "auto",
        checksum: bool = True,
        addressing_style: str | None = None,
    ) -> None:
        self.bucket, self.prefix = self._parse_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        if max_attempts < 1 or part_concurrency < 1 or read_range_size < 1 or single_put_threshold < 0:
            raise BadInputError(
                f"{uri}: max_attempts, part_concurrency and read_range_size must be >= 1, single_put_threshold >= 0"
            )
        if conditional_writes not in (True, False, "auto"):
            raise BadInputError(f"{uri}: conditional_writes must be True, False or 'auto', not {conditional_writes!r}")
        if op_timeout is not None and op_timeout <= 0:
            raise BadInputError(f"{uri}: op_timeout must be > 0 seconds or None, not {op_timeout!r}")
        if addressing_style not in (None, "auto", "path", "virtual"):
            raise BadInputError(
                f"{uri}: addressing_style must be 'auto', 'path' or 'virtual', not {addressing_style!r}"
            )
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self.profile = profile
        self.max_attempts = max_attempts
        self.part_concurrency = part_concurrency
        self.single_put_threshold = single_put_threshold
        self.read_range_size = read_range_size
        self.op_timeout = op_timeout
        self.checksum = checksum
        # None until a conditional PUT has been tried (when "auto"), then True/False.
        self._conditional: bool | None = None if conditional_writes == "auto" else bool(conditional_writes)
        self._conditional_mode = conditional_writes
        self._credentials = {
            k: v
            for k, v in (
                ("aws_access_key_id", aws_access_key_id),
                ("aws_secret_access_key", aws_secret_access_key),
                ("aws_session_token", aws_session_token),
            )
            if v is not None
        }
        if addressing_style is None:
            custom = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            addressing_style = "path" if custom else "auto"
        self._config = Config(
            region_name=region_name,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * part_concurrency),
            # We send our own CRC32C where wanted; never let botocore checksum every body itself.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": addressing_style},
        )
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = weakref.WeakKeyDictionary()
        self._client_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        # Loops on which close() ran: a straggling task there must not quietly open a new client.
        self._closed_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _parse_uri(uri: str) -> tuple[str, str]:
        if not isinstance(uri, str) or not uri.lower().startswith("s3://"):
            raise BadInputError(f"{uri!r} is not an S3 URI (expected s3://bucket/prefix)")
        bucket, _, prefix = uri[5:].partition("/")
        if not _BUCKET_RE.match(bucket):
            raise BadInputError(f"{uri}: {bucket!r} is not a valid bucket name (3-63 letters, digits, '.', '-' or '_')")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except IntegrityError as exc:
                raise BadInputError(f"{uri}: invalid prefix: {exc}") from exc
        return bucket, prefix

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, full_key: str) -> str:
        return f"s3://{self.bucket}/{full_key}"

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    async def _loop_client(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        lc = self._clients.get(loop)
        if lc is not None:
            return lc
        if loop in self._closed_loops:
            raise StorageError(f"{self.uri}: used after close() on this event loop; open a new S3Storage")
        lock = self._client_locks.setdefault(loop, asyncio.Lock())
        async with lock:
            lc = self._clients.get(loop)
            if lc is None:
                for other in [lp for lp in list(self._clients) if lp.is_closed()]:
                    self._clients.pop(other, None)  # its loop is gone: nothing left to close it with
                stack = contextlib.AsyncExitStack()
                try:
                    session = AioSession(profile=self.profile)
                    client = await stack.enter_async_context(
                        session.create_client(
                            "s3",
                            endpoint_url=self.endpoint_url,
                            region_name=self.region_name,
                            config=self._config,
                            **self._credentials,
                        )
                    )
                except ProfileNotFound as exc:
                    await stack.aclose()
                    raise BadInputError(f"{self.uri}: AWS profile {self.profile!r} not found ({exc})") from exc
                except Exception as exc:
                    await stack.aclose()
                    raise self._error("connect", "", exc) from exc
                lc = _LoopClient(client, stack, asyncio.Semaphore(self.part_concurrency))
                self._clients[loop] = lc
        return lc

    async def _client(self) -> Any:
        return (await self._loop_client()).client

    async def _timed(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` under ``op_timeout`` (if any), turning its expiry into `_OpTimeout`."""
        if self.op_timeout is None:
            return await aw
        try:
            return await asyncio.wait_for(aw, self.op_timeout)
        except asyncio.TimeoutError as exc:
            if isinstance(exc, (BotoCoreError, aiohttp.ClientError)):
                raise
            raise _OpTimeout(f"no answer within op_timeout={self.op_timeout:g}s") from exc

    async def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        client = await self._client()
        return await self._timed(getattr(client, method)(Bucket=self.bucket, **kwargs))

    def _error(self, op: str, full_key: str, exc: BaseException) -> CheckpointError:
        """Map a botocore/aiohttp/timeout error to a StorageError (or subclass) with a useful message."""
        where = self._where(full_key)
        if isinstance(exc, CheckpointError):
            return exc
        if isinstance(exc, ClientError):
            code, status = _code(exc)
            msg = (exc.response.get("Error", {}) or {}).get("Message", "") or str(exc)
            attempts = _retries(exc) + 1
            if code in _NOT_FOUND or (status == 404 and code not in ("NoSuchBucket", "NoSuchUpload")):
                return CheckpointNotFoundError(f"{where} does not exist")
            if code == "NoSuchBucket":
                return StorageError(
                    f"{op} {where} failed: bucket {self.bucket!r} does not exist "
                    f"(create it, or fix the URI / endpoint_url)"
                )
            if code in _CREDENTIALS or status == 403:
                return StorageError(
                    f"{op} {where} failed: {code or status} ({msg}): check the credentials "
                    f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the profile= option) "
                    f"and the bucket's permissions"
                )
            if code in _DIGEST:
                return StorageError(
                    f"{op} {where} failed: the store rejected the checksum ({code}: {msg}); "
                    f"the data was corrupted in transit: retry the save"
                )
            if code == "NoSuchUpload":
                return StorageError(
                    f"{op} {where} failed: the multipart upload no longer exists "
                    f"(aborted, expired or cleaned up): retry the save"
                )
            if code in _THROTTLED or status >= 500:
                return StorageError(
                    f"{op} {where} failed after {attempts} attempt(s): {code or status} ({msg}); "
                    f"the store is overloaded or failing: retry later or raise max_attempts"
                )
            return StorageError(f"{op} {where} failed: {code or status} ({msg}) [HTTP {status}]")
        if isinstance(exc, _OpTimeout):
            return StorageTimeoutError(f"{op} {where} timed out: {exc}; the store is not answering")
        if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError, asyncio.TimeoutError)):
            return StorageTimeoutError(
                f"{op} {where} timed out ({exc}); the store is not answering: check it, or raise read_timeout"
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                f"{op} {where} failed: no usable AWS credentials ({exc}): set AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or pass aws_access_key_id= / profile="
            )
        if isinstance(exc, EndpointConnectionError) and _never_connected(exc):
            return StorageError(
                f"{op} {where} failed: cannot connect to the S3 endpoint ({exc}): check endpoint_url / "
                f"AWS_ENDPOINT_URL and that the server is up"
            )
        if isinstance(exc, (BotoCoreError, aiohttp.ClientError, OSError)):
            return StorageError(f"{op} {where} failed: the connection broke ({type(exc).__name__}: {exc}); retry")
        return StorageError(f"{op} {where} failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ writes

    async def open_writer(self, key: str, size_hint: int | None = None) -> _S3Writer:
        full = self._full(key)
        single = size_hint is not None and size_hint < self.single_put_threshold
        return _S3Writer(self, full, size_hint if single else None)

    async def _put_object(self, op: str, full: str, body: bytes, **extra: Any) -> dict[str, Any]:
        """PutObject with our CRC32C when enabled; disables checksums once if the store refuses them."""
        if self.checksum:
            try:
                return await self._call("put_object", Key=full, Body=body, ChecksumCRC32C=_b64_crc32c(body), **extra)
            except ClientError as exc:
                if not self._checksum_refused(exc, ambiguous=bool(extra)):
                    raise
        return await self._call("put_object", Key=full, Body=body, **extra)

    def _checksum_refused(self, exc: ClientError, *, ambiguous: bool = False) -> bool:
        """Whether ``exc`` says the store does not support S3 checksums (then stop sending them).

        ``ambiguous``: the request carried other optional headers, so a bare NotImplemented may be about those.
        """
        code, status = _code(exc)
        msg = str((exc.response.get("Error", {}) or {}).get("Message", "")).lower()
        about_checksum = "checksum" in msg
        if (code == "NotImplemented" and (about_checksum or not ambiguous)) or (
            status == 400 and code in ("InvalidArgument", "InvalidRequest") and about_checksum
        ):
            logger.warning(
                "%s: the store refuses S3 checksums (%s: %s); sending parts without CRC32C", self.uri, code, msg
            )
            self.checksum = False
            return True
        return False

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        full = self._full(key)
        data = bytes(data)
        if not if_absent:
            try:
                await self._put_object("put", full, data)
            except Exception as exc:
                raise self._error("put", full, exc) from exc
            return True
        if self._conditional is not False:
            result = await self._put_if_absent(full, data)
            if result is not None:
                return result
        # Fallback for stores without conditional writes: NOT atomic (documented).
        if await self.exists(key):
            return False
        try:
            await self._put_object("put", full, data)
        except Exception as exc:
            raise self._error("put", full, exc) from exc
        return True

    async def _put_if_absent(self, full: str, data: bytes) -> bool | None:
        """PUT with ``If-None-Match: *``; None when the store does not support it (and "auto" allows a fallback)."""
        for attempt in range(self.max_attempts):
            try:
                await self._put_object("put_if_absent", full, data, IfNoneMatch="*")
                self._conditional = True
                return True
            except ClientError as exc:
                code, status = _code(exc)
                if code in _PRECONDITION or status == 412:
                    self._conditional = True
                    if _retries(exc):
                        # An earlier attempt may have landed before its reply was lost: it was ours if the bytes match.
                        with contextlib.suppress(CheckpointError):
                            return await self.read(self._rel(full)) == data
                    return False
                if code in _CONFLICT or status == 409:
                    await _backoff(attempt)  # a concurrent conditional write is in progress: retry
                    continue
                if (
                    self._conditional_mode == "auto"
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
                raise self._error("put_if_absent", full, exc) from exc
            except Exception as exc:
                raise self._error("put_if_absent", full, exc) from exc
        raise StorageError(
            f"put_if_absent {self._where(full)} failed: {self.max_attempts} conflicting concurrent conditional writes; retry"
        )

    async def delete(self, key: str) -> None:
        full = self._full(key)
        try:
            await self._call("delete_object", Key=full)
        except ClientError as exc:
            code, status = _code(exc)
            if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
                return
            raise self._error("delete", full, exc) from exc
        except Exception as exc:
            raise self._error("delete", full, exc) from exc

    async def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Abort every multipart upload for ``prefix`` (a key or a folder) left by a crashed save; returns how many."""
        if prefix:
            check_key(prefix)
        full = self._full(prefix) if prefix else self.prefix
        n = 0
        kwargs: dict[str, Any] = {"Prefix": full}
        while True:
            try:
                page = await self._call("list_multipart_uploads", **kwargs)
            except Exception as exc:
                raise self._error("list_multipart_uploads", full, exc) from exc
            for up in page.get("Uploads", []) or []:
                key = up["Key"]
                rel = self._rel(key) if (not self.prefix or key.startswith(self.prefix + "/")) else None
                if rel is None or (prefix and rel != prefix and not rel.startswith(prefix + "/")):
                    continue
                if await self._abort_upload(key, up["UploadId"], quiet=False):
                    n += 1
            if not page.get("IsTruncated"):
                return n
            kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
            if not kwargs["KeyMarker"] and not kwargs["UploadIdMarker"]:
                return n

    async def _abort_upload(self, full: str, upload_id: str, *, quiet: bool) -> bool:
        """AbortMultipartUpload; True if aborted, False if it was already gone. Quiet: log instead of raising."""
        try:
            await self._call("abort_multipart_upload", Key=full, UploadId=upload_id)
            return True
        except ClientError as exc:
            code, status = _code(exc)
            if code == "NoSuchUpload" or status == 404:
                return False
            err: CheckpointError = self._error("abort", full, exc)
        except _CALL_ERRORS as exc:
            err = self._error("abort", full, exc)
        if not quiet:
            raise err
        logger.warning("%s (upload %s left behind: S3Storage.abort_incomplete_uploads() removes it)", err, upload_id)
        return False

    # ------------------------------------------------------------------ reads

    async def size(self, key: str) -> int:
        full = self._full(key)
        try:
            head = await self._call("head_object", Key=full)
        except Exception as exc:
            raise self._error("head", full, exc) from exc
        return int(head["ContentLength"])

    async def exists(self, key: str) -> bool:
        try:
            await self.size(key)
        except CheckpointNotFoundError:
            return False
        return True

    async def list(self, prefix: str = "") -> list[str]:
        if prefix:
            check_key(prefix)
        folder = self._full(prefix) if prefix else self.prefix
        want = folder + "/" if folder else ""
        out: list[str] = []
        kwargs: dict[str, Any] = {"Prefix": want}
        while True:
            try:
                page = await self._call("list_objects_v2", **kwargs)
            except Exception as exc:
                raise self._error("list", want, exc) from exc
            for obj in page.get("Contents", []) or []:
                key = obj["Key"]
                if key.endswith("/") or not key.startswith(want):
                    continue  # folder markers some stores create
                out.append(self._rel(key))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(out)
            kwargs["ContinuationToken"] = token

    async def read(self, key: str) -> bytes:
        full = self._full(key)
        progress = _Progress()
        try:
            resp = await self._call("get_object", Key=full)
        except Exception as exc:
            raise self._error("read", full, exc) from exc
        length = int(resp["ContentLength"])
        buf = bytearray(length)
        view = memoryview(buf)
        try:
            await self._timed(self._drain(resp["Body"], view, progress))
        except Exception as exc:
            if isinstance(exc, _OpTimeout) or not _is_transient(exc):
                raise self._error("read", full, exc) from exc
            # Cut mid-body: resume the rest with Range requests.
            await self._fetch_into(full, progress.got, view[progress.got :], etag=resp.get("ETag"), failures=1)
            return bytes(buf)
        if progress.got != length:
            raise IntegrityError(f"{self._where(full)} is truncated: got {progress.got} of {length} bytes")
        return bytes(buf)

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        full = self._full(key)
        view = memoryview(buf)
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        n = len(view)
        if offset < 0:
            raise BadInputError(f"read {self._where(full)}: negative offset {offset}")
        if n == 0:
            size = await self.size(key)
            if offset > size:
                raise IntegrityError(
                    f"{self._where(full)} is truncated: offset {offset} is past its end ({size} bytes)"
                )
            return
        step = self.read_range_size
        await gather_or_cancel(self._fetch_into(full, offset + i, view[i : i + step]) for i in range(0, n, step))

    async def _fetch_into(
        self, full: str, start: int, view: memoryview, *, etag: str | None = None, failures: int = 0
    ) -> None:
        """Fill ``view`` from ``start`` with ranged GETs, resuming after cut bodies (bounded attempts)."""
        lc = await self._loop_client()
        progress = _Progress(etag)
        n = len(view)
        last: BaseException | None = None
        while progress.got < n:
            if failures >= self.max_attempts:
                err = (
                    self._error("read", full, last)
                    if last is not None
                    else StorageError(f"read {self._where(full)} failed")
                )
                raise StorageError(
                    f"{err} (the body was cut {failures} time(s) at {start + progress.got}; gave up resuming)"
                ) from last
            pos = start + progress.got
            extra: dict[str, Any] = {"IfMatch": progress.etag} if progress.etag else {}
            try:
                async with lc.transfers:
                    await self._timed(self._get_range(lc.client, full, pos, view[progress.got :], progress, extra))
                if progress.got < n:
                    raise IntegrityError(
                        f"{self._where(full)} is truncated: wanted {len(view)} bytes at offset {start}, "
                        f"the object ends after {progress.got}"
                    )
            except ClientError as exc:
                code, status = _code(exc)
                if code == "InvalidRange" or status == 416:
                    raise IntegrityError(
                        f"{self._where(full)} is truncated: wanted {len(view)} bytes at offset {start}, "
                        f"the object ends before {pos}"
                    ) from exc
                if progress.etag and (code in _PRECONDITION or status == 412):
                    raise IntegrityError(f"{self._where(full)} changed while it was being read; read it again") from exc
                if not _is_transient(exc):
                    raise self._error("read", full, exc) from exc
                last = exc
            except CheckpointError:
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    raise self._error("read", full, exc) from exc
                last = exc
            else:
                return
            if isinstance(last, _OpTimeout):
                raise self._error("read", full, last) from last
            failures += 1  # every cut counts, with or without progress: keeps the loop bounded
            logger.debug("read %s: cut at %d (%s); resuming", self._where(full), start + progress.got, last)
            await _backoff(failures)

    async def _get_range(
        self, client: Any, full: str, pos: int, view: memoryview, progress: _Progress, extra: dict[str, Any]
    ) -> None:
        end = pos + len(view) - 1
        resp = await client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={pos}-{end}", **extra)
        content_range = resp.get("ContentRange")
        if content_range:
            m = re.match(r"bytes (\d+)-(\d+)/", content_range)
            if m is None or int(m.group(1)) != pos:
                resp["Body"].close()
                raise IntegrityError(
                    f"{self._where(full)}: asked for bytes from {pos}, the store sent {content_range!r}"
                )
        elif pos != 0:
            resp["Body"].close()
            raise StorageError(
                f"read {self._where(full)}: the store ignored the Range header (HTTP 200 for bytes={pos}-)"
            )
        if progress.etag is None:
            progress.etag = resp.get("ETag")
        await self._drain(resp["Body"], view, progress)

    @staticmethod
    async def _drain(body: Any, view: memoryview, progress: _Progress) -> None:
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
        loop = asyncio.get_running_loop()
        self._closed_loops.add(loop)
        lc = self._clients.pop(loop, None)
        if lc is not None:
            await lc.stack.aclose()


class _S3Writer:
    """A multipart upload (or one buffered PUT for small objects); nothing is visible before `commit`."""

    def __init__(self, storage: S3Storage, full: str, single_size: int | None) -> None:
        self._s = storage
        self._full = full
        self._where = storage._where(full)
        self._buf: bytearray | None = bytearray(single_size) if single_size is not None else None
        self._end = 0
        self._upload_id: str | None = None
        self._checksum = storage.checksum  # fixed per upload once it is created
        self._create_lock: asyncio.Lock | None = None
        self._parts: dict[int, dict[str, Any]] = {}
        self._sizes: dict[int, int] = {}
        self._inflight = 0
        self._state = "open"  # open | committed | aborted
        self._failed: BaseException | None = None

    def __repr__(self) -> str:
        return f"<S3 writer {self._where} {self._state}>"

    def _check_open(self, op: str) -> None:
        if self._failed is not None:
            raise StorageError(f"{op} {self._where}: the upload already failed ({self._failed})") from self._failed
        if self._state != "open":
            raise StorageError(f"{op} {self._where} after {'commit' if self._state == 'committed' else 'abort'}")

    async def write_part(self, index: int, offset: int, data: memoryview) -> None:
        self._check_open("write_part")
        view = memoryview(data)
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if index < 0:
            raise BadInputError(f"write_part {self._where}: negative part index {index}")
        if self._buf is not None:
            end = offset + len(view)
            if end > len(self._buf):
                self._buf.extend(bytes(end - len(self._buf)))
            self._buf[offset:end] = view
            self._end = max(self._end, end)
            return
        self._inflight += 1
        try:
            await self._upload_part(index + 1, view)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = self._s._error(f"upload part {index + 1} of", self._full, exc)
            if self._failed is None:
                self._failed = err
            raise err from exc
        finally:
            self._inflight -= 1
            if self._failed is not None and self._state == "open":
                await self._abort()
            elif self._state == "aborted" and self._inflight == 0 and self._upload_id is not None:
                # A part that was in flight during abort may have landed after it: abort once more.
                await self._s._abort_upload(self._full, self._upload_id, quiet=True)

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
        s = self._s
        self._checksum = s.checksum
        if self._checksum:
            try:
                resp = await s._call("create_multipart_upload", Key=self._full, ChecksumAlgorithm="CRC32C")
                return str(resp["UploadId"])
            except ClientError as exc:
                if not s._checksum_refused(exc):
                    raise
        self._checksum = False
        resp = await s._call("create_multipart_upload", Key=self._full)
        return str(resp["UploadId"])

    async def _upload_part(self, number: int, view: memoryview) -> None:
        upload_id = await self._ensure_upload()
        lc = await self._s._loop_client()
        async with lc.transfers:  # at most part_concurrency copies in flight
            self._check_open("write_part")
            body = bytes(view)  # botocore wants bytes; and a retry after we return must not see reused memory
            extra: dict[str, Any] = {}
            crc = _b64_crc32c(body) if self._checksum else None
            if crc is not None:
                extra["ChecksumCRC32C"] = crc
            resp = await self._s._timed(
                lc.client.upload_part(
                    Bucket=self._s.bucket, Key=self._full, UploadId=upload_id, PartNumber=number, Body=body, **extra
                )
            )
        part: dict[str, Any] = {"PartNumber": number, "ETag": resp["ETag"]}
        if crc is not None:
            part["ChecksumCRC32C"] = crc
        self._parts[number] = part
        self._sizes[number] = len(body)

    async def commit(self) -> None:
        self._check_open("commit")
        try:
            if self._buf is not None:
                body = bytes(memoryview(self._buf)[: self._end])
                await self._s._put_object("put", self._full, body)
            elif self._upload_id is None:
                await self._s._put_object("put", self._full, b"")  # nothing was written: an empty object
            else:
                await self._complete()
        except asyncio.CancelledError:
            await self._abort()
            raise
        except Exception as exc:
            err = self._s._error("commit", self._full, exc)
            self._failed = err
            await self._abort()
            raise err from exc
        self._state = "committed"
        self._buf = None

    async def _complete(self) -> None:
        if self._inflight:
            raise StorageError(f"commit {self._where}: {self._inflight} part(s) still uploading; await them first")
        numbers = sorted(self._parts)
        if numbers != list(range(1, len(numbers) + 1)):
            missing = sorted(set(range(1, (numbers[-1] if numbers else 0) + 1)) - set(numbers))
            raise StorageError(f"commit {self._where}: parts {missing[:10]} were never written")
        parts = [self._parts[i] for i in numbers]
        total = sum(self._sizes.values())
        s = self._s
        last: BaseException | None = None
        for attempt in range(s.max_attempts):
            try:
                await s._call(
                    "complete_multipart_upload",
                    Key=self._full,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
                return
            except ClientError as exc:
                code, _ = _code(exc)
                if code == "NoSuchUpload" and await self._completed(parts, total):
                    return  # an earlier attempt did complete; its reply was lost
                if not _is_transient(exc):
                    raise
                last = exc
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                last = exc
            # The reply was lost or the store failed: the upload may have completed anyway.
            if await self._completed(parts, total):
                return
            await _backoff(attempt)
        assert last is not None
        raise last

    async def _completed(self, parts: list[dict[str, Any]], total: int) -> bool:
        """Whether CompleteMultipartUpload took effect: upload gone and our object (size, ETag) in place."""
        s = self._s
        try:
            await s._call("list_parts", Key=self._full, UploadId=self._upload_id, MaxParts=1)
            return False  # the upload still exists: not completed
        except ClientError as exc:
            code, status = _code(exc)
            if code != "NoSuchUpload" and status != 404:
                return False
        except _CALL_ERRORS:
            return False
        try:
            head = await s._call("head_object", Key=self._full)
        except _CALL_ERRORS:
            return False
        if int(head.get("ContentLength", -1)) != total:
            return False
        etag = str(head.get("ETag", "")).strip('"')
        digests = [str(p["ETag"]).strip('"') for p in parts]
        if re.fullmatch(r"[0-9a-f]{32}-\d+", etag) and all(re.fullmatch(r"[0-9a-f]{32}", d) for d in digests):
            expect = hashlib.md5(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()
            return etag == f"{expect}-{len(parts)}"
        return True

    async def abort(self) -> None:
        if self._state == "committed":
            return
        await self._abort()

    async def _abort(self) -> None:
        first = self._state != "aborted"
        self._state = "aborted"
        self._buf = None
        if self._upload_id is not None and (first or self._inflight):
            await self._s._abort_upload(self._full, self._upload_id, quiet=True)


def _factory(uri: str, **options: Any) -> S3Storage:
    return S3Storage(uri, **options)


register_backend("s3", _factory)
