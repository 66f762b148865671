"""The GCS edge of the storage error tree: HTTP statuses and aiohttp errors in, `StorageError` subclasses out."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from ...errors import (
    CheckpointError,
    IntegrityError,
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

__all__ = ["HTTPStatusError", "translate"]


class HTTPStatusError(Exception):
    """A GCS reply with an error status (raised inside the backend, translated before it leaves)."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.reason = ""
        self.message = body.decode("utf-8", "replace").strip()[:300]
        try:
            err = json.loads(body)["error"]
            self.message = str(err.get("message", self.message))
            errors = err.get("errors") or [{}]
            self.reason = str(errors[0].get("reason", ""))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            pass
        super().__init__(f"HTTP {status}: {self.message}")


def translate(op: str, where: str, bucket: str, exc: BaseException) -> CheckpointError:
    """Map a GCS HTTP error, an aiohttp error or a timeout to the storage error tree, naming ``where``."""
    if isinstance(exc, StorageOpTimeoutError) and " timed out: " not in str(exc):
        return StorageOpTimeoutError(f"{op} {where} timed out: {exc}")
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, HTTPStatusError):
        status, msg = exc.status, exc.message
        if status == 404:
            # A read or a HEAD may miss the object; a compose misses a part; an upload or a listing can
            # only miss the bucket. A missing bucket is never a missing key (never "no checkpoint yet").
            if "bucket does not exist" not in msg.lower() and op.startswith(("read", "head", "delete")):
                return StorageNotFoundError(f"{where} does not exist")
            if op == "commit" and "bucket does not exist" not in msg.lower():
                return PermanentStorageError(
                    f"commit {where} failed: a part of the upload is gone (deleted meanwhile): retry the save"
                )
            return PermanentStorageError(
                f"{op} {where} failed: bucket {bucket!r} does not exist (create it, or fix the URI / endpoint)"
            )
        if status in (401, 403):
            return StoragePermissionError(
                f"{op} {where} failed: HTTP {status} ({msg}): check the credentials "
                f"(GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, the VM's service "
                f"account) and the bucket's permissions"
            )
        if status == 400 and ("crc32c" in msg.lower() or "md5" in msg.lower() or "hash" in msg.lower()):
            return StorageChecksumError(
                f"{op} {where} failed: the store rejected the checksum ({msg}); the data was corrupted in transit: "
                f"retry the save"
            )
        if status == 412:
            return StoragePreconditionError(f"{op} {where} failed: a precondition failed ({msg})")
        if status == 416:
            return IntegrityError(f"{where} is truncated: the requested range starts past its end")
        if status >= 500 or status in (408, 429):
            return TransientStorageError(
                f"{op} {where} failed: HTTP {status} ({msg}); the store is overloaded or failing: "
                f"retry later or raise max_attempts"
            )
        return PermanentStorageError(f"{op} {where} failed: HTTP {status} ({msg})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransientStorageError(
            f"{op} {where} failed: cannot connect to the GCS endpoint ({exc}): check endpoint_url / "
            f"STORAGE_EMULATOR_HOST and that the server is up"
        )
    if isinstance(exc, asyncio.TimeoutError):
        return StorageTimeoutError(
            f"{op} {where} timed out ({type(exc).__name__}); the store is not answering: check it, or raise read_timeout"
        )
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return TransientStorageError(f"{op} {where} failed: the connection broke ({type(exc).__name__}: {exc}); retry")
    return StorageError(f"{op} {where} failed: {type(exc).__name__}: {exc}")
