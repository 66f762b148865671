"""The S3 edge of the storage error tree: botocore/aiohttp errors in, `StorageError` subclasses out."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
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

from ...errors import (
    CheckpointError,
    PermanentStorageError,
    StorageChecksumError,
    StorageError,
    StorageNotFoundError,
    StorageOpTimeoutError,
    StoragePermissionError,
    StoragePreconditionError,
    StorageTimeoutError,
    TransientStorageError,
)

__all__ = [
    "CALL_ERRORS",
    "CONFLICT",
    "NOT_FOUND",
    "PRECONDITION",
    "error_code",
    "is_transient",
    "retry_count",
    "translate",
]

NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
CREDENTIALS = {
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
THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
}
DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}
PRECONDITION = {"PreconditionFailed", "412"}
CONFLICT = {"ConditionalRequestConflict", "OperationAborted", "409"}
# Errors after which the server may or may not have acted on the request.
RAW_TRANSIENT = (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)
# Everything a request can fail with (for best-effort calls that must not raise).
CALL_ERRORS = (ClientError, CheckpointError, *RAW_TRANSIENT)


def error_code(exc: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status of a ClientError (``("", 0)`` otherwise)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) or {}
        meta = exc.response.get("ResponseMetadata", {}) or {}
        return str(err.get("Code", "") or ""), int(meta.get("HTTPStatusCode", 0) or 0)
    return "", 0


def retry_count(exc: BaseException) -> int:
    """How often botocore retried the request before ``exc``."""
    if isinstance(exc, ClientError):
        return int((exc.response.get("ResponseMetadata", {}) or {}).get("RetryAttempts", 0) or 0)
    return 0


def is_transient(exc: BaseException) -> bool:
    """True for raw or translated errors where retrying may help: connection trouble, timeouts, throttling, 5xx."""
    if isinstance(exc, StorageOpTimeoutError):
        return False
    if isinstance(exc, CheckpointError):
        return isinstance(exc, TransientStorageError)
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        return status >= 500 or code in THROTTLED or code in {"RequestTimeout", "InternalError"}
    return isinstance(exc, RAW_TRANSIENT) and not isinstance(
        exc, (NoCredentialsError, PartialCredentialsError, ProfileNotFound)
    )


def _never_connected(exc: EndpointConnectionError) -> bool:
    """True when no TCP connection was made (refused, DNS); False for a connection that broke mid-request.

    aiobotocore reports both as EndpointConnectionError; only the wrapped aiohttp error tells them apart.
    """
    inner = exc.kwargs.get("error")
    return inner is None or isinstance(inner, (aiohttp.ClientConnectorError, socket.gaierror))


def translate(op: str, where: str, bucket: str, exc: BaseException) -> CheckpointError:
    """Map a botocore/aiohttp/timeout error to the storage error tree, with a message naming ``where``."""
    if isinstance(exc, StorageOpTimeoutError) and " timed out: " not in str(exc):
        return StorageOpTimeoutError(f"{op} {where} timed out: {exc}")
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        msg = (exc.response.get("Error", {}) or {}).get("Message", "") or str(exc)
        attempts = retry_count(exc) + 1
        if code in NOT_FOUND or (status == 404 and code not in ("NoSuchBucket", "NoSuchUpload")):
            return StorageNotFoundError(f"{where} does not exist")
        if code == "NoSuchBucket":  # not a missing key: a caller must never take it for "no checkpoint yet"
            return PermanentStorageError(
                f"{op} {where} failed: bucket {bucket!r} does not exist (create it, or fix the URI / endpoint_url)"
            )
        if code in CREDENTIALS or status == 403:
            return StoragePermissionError(
                f"{op} {where} failed: {code or status} ({msg}): check the credentials "
                f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the profile= option) "
                f"and the bucket's permissions"
            )
        if code in DIGEST:
            return StorageChecksumError(
                f"{op} {where} failed: the store rejected the checksum ({code}: {msg}); "
                f"the data was corrupted in transit: retry the save"
            )
        if code == "NoSuchUpload":
            return PermanentStorageError(
                f"{op} {where} failed: the multipart upload no longer exists "
                f"(aborted, expired or cleaned up): retry the save"
            )
        if code in PRECONDITION or status == 412:
            return StoragePreconditionError(f"{op} {where} failed: a precondition failed ({code or status}: {msg})")
        if code in THROTTLED or status >= 500 or code in {"RequestTimeout", "InternalError"}:
            return TransientStorageError(
                f"{op} {where} failed after {attempts} attempt(s): {code or status} ({msg}); "
                f"the store is overloaded or failing: retry later or raise max_attempts"
            )
        return PermanentStorageError(f"{op} {where} failed: {code or status} ({msg}) [HTTP {status}]")
    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError, asyncio.TimeoutError)):
        return StorageTimeoutError(
            f"{op} {where} timed out ({exc}); the store is not answering: check it, or raise read_timeout"
        )
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StoragePermissionError(
            f"{op} {where} failed: no usable AWS credentials ({exc}): set AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or pass aws_access_key_id= / profile="
        )
    if isinstance(exc, EndpointConnectionError) and _never_connected(exc):
        return TransientStorageError(
            f"{op} {where} failed: cannot connect to the S3 endpoint ({exc}): check endpoint_url / "
            f"AWS_ENDPOINT_URL and that the server is up"
        )
    if isinstance(exc, (BotoCoreError, aiohttp.ClientError, OSError)):
        return TransientStorageError(
            f"{op} {where} failed: the connection broke ({type(exc).__name__}: {exc}); retry"
        )
    return StorageError(f"{op} {where} failed: {type(exc).__name__}: {exc}")
