"""The Azure Blob edge of the storage error tree: azure-core and aiohttp errors in, `StorageError` subclasses out."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

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

__all__ = ["status_of", "translate"]

_TRANSIENT_CODES = {"ServerBusy", "OperationTimedOut", "InternalError", "SlowDown", "InternalServerError"}
_CHECKSUM_CODES = {"Md5Mismatch", "Crc64Mismatch", "InvalidMd5", "InvalidCrc64"}


def status_of(exc: BaseException) -> int:
    """The HTTP status of an azure-core response error (0 otherwise)."""
    return int(getattr(exc, "status_code", 0) or 0) if isinstance(exc, HttpResponseError) else 0


def _code(exc: HttpResponseError) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _never_connected(exc: ServiceRequestError) -> bool:
    """True when no TCP connection was made (refused, DNS); False for one that broke while the request was sent."""
    inner = exc.inner_exception or exc.__cause__
    return inner is None or isinstance(inner, (aiohttp.ClientConnectorError, socket.gaierror, ConnectionRefusedError))


def translate(op: str, where: str, container: str, exc: BaseException) -> CheckpointError:
    """Map an azure-core / aiohttp / timeout error to the storage error tree, naming ``where`` and what to do."""
    if isinstance(exc, StorageOpTimeoutError) and " timed out: " not in str(exc):
        return StorageOpTimeoutError(f"{op} {where} timed out: {exc}")
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, HttpResponseError):
        status, code = status_of(exc), _code(exc)
        msg = (exc.message or str(exc)).splitlines()[0] if (exc.message or str(exc)) else ""
        if code == "ContainerNotFound":  # not a missing key: a caller must never take it for "no checkpoint yet"
            return PermanentStorageError(
                f"{op} {where} failed: container {container!r} does not exist (create it, or fix the URI / account)"
            )
        if isinstance(exc, ResourceNotFoundError) or status == 404:
            return StorageNotFoundError(f"{where} does not exist")
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
            return StoragePermissionError(
                f"{op} {where} failed: {code or status} ({msg}): check the credentials "
                f"(AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY / "
                f"AZURE_STORAGE_SAS_TOKEN) and the container's permissions"
            )
        if code in _CHECKSUM_CODES:
            return StorageChecksumError(
                f"{op} {where} failed: the store rejected the checksum ({code}); the data was corrupted in transit: "
                f"retry the save"
            )
        if status == 416 or code == "InvalidRange":
            return IntegrityError(f"{where} is truncated: the requested range starts past its end")
        if isinstance(exc, (ResourceModifiedError, ResourceExistsError)) or status in (409, 412):
            return StoragePreconditionError(f"{op} {where} failed: a precondition failed ({code or status}: {msg})")
        if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES or status == 0:
            return TransientStorageError(
                f"{op} {where} failed: {code or status} ({msg}); the store is overloaded or failing: "
                f"retry later or raise max_attempts"
            )
        return PermanentStorageError(f"{op} {where} failed: {code or status} ({msg}) [HTTP {status}]")
    if isinstance(exc, ServiceRequestError) and _never_connected(exc):
        return TransientStorageError(
            f"{op} {where} failed: cannot connect to the Azure Blob endpoint ({exc}): check the account URL / "
            f"AZURE_STORAGE_CONNECTION_STRING and that the server is up"
        )
    if isinstance(exc, asyncio.TimeoutError):
        return StorageTimeoutError(
            f"{op} {where} timed out ({exc}); the store is not answering: check it, or raise read_timeout"
        )
    if isinstance(exc, (ServiceResponseError, AzureError, aiohttp.ClientError, OSError)):
        return TransientStorageError(f"{op} {where} failed: the connection broke ({type(exc).__name__}: {exc}); retry")
    return StorageError(f"{op} {where} failed: {type(exc).__name__}: {exc}")
