"""The Azure Blob client's life cycle: one async ContainerClient per event loop, and the shared call helper."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from ...errors import BadInputError, CheckpointError
from ..objectstore import PerLoop, retrying, timed
from .config import AzureConfig
from .errors import translate

__all__ = ["AzureClient", "LoopClient"]

T = TypeVar("T")


@dataclass
class LoopClient:
    """One event loop's service and container clients, and its bound on transfers in flight."""

    service: BlobServiceClient
    container: ContainerClient
    transfers: asyncio.Semaphore


class AzureClient:
    """Per-loop azure-storage-blob clients for one container; every call is translated and retried here.

    The SDK's own retries are off (``retry_total=0``): the shared `RetryPolicy` retries what the
    error tree calls transient, the same way for every object store.
    """

    def __init__(self, config: AzureConfig) -> None:
        self.config = config
        self.container = config.container
        self._args: tuple[str | None, str | None, Any] | None = None  # resolved on first use (as S3 does)
        self._clients: PerLoop[LoopClient] = PerLoop(f"{config.uri} (AzureBlobStorage)")

    def settings(self) -> tuple[str | None, str | None, Any]:
        """(connection string, account URL, credential), from the options or the environment (BadInputError if none)."""
        if self._args is None:
            self._args = self.config.client_args()
        return self._args

    def where(self, full_key: str) -> str:
        return f"az://{self.container}/{full_key}"

    def error(self, op: str, full_key: str, exc: BaseException) -> CheckpointError:
        return translate(op, self.where(full_key), self.container, exc)

    async def loop_client(self) -> LoopClient:
        return await self._clients.get(self._create)

    async def _create(self) -> LoopClient:
        cfg = self.config
        opts: dict[str, Any] = {
            "retry_total": 0,
            "connection_timeout": cfg.connect_timeout,
            "read_timeout": cfg.read_timeout,
            "max_single_get_size": cfg.read_chunk_size,
            "max_chunk_get_size": cfg.read_chunk_size,
            "max_single_put_size": max(cfg.single_put_threshold, 1),
        }
        conn, url, credential = self.settings()
        try:
            if conn:
                service = BlobServiceClient.from_connection_string(conn, **opts)
            else:
                service = BlobServiceClient(url or "", credential=credential, **opts)
        except ValueError as exc:
            raise BadInputError(f"{cfg.uri}: bad Azure settings ({exc})") from exc
        return LoopClient(service, service.get_container_client(self.container), asyncio.Semaphore(cfg.part_concurrency))

    @property
    def clients(self) -> int:
        """How many loops hold a client now."""
        return len(self._clients)

    async def call(self, op: str, full_key: str, fn: Callable[[ContainerClient], Awaitable[T]], *, retry: bool = True) -> T:
        """Run ``fn(container_client)`` under ``op_timeout``, translated at this edge, retried when transient."""
        lc = await self.loop_client()

        async def once() -> T:
            try:
                return await timed(fn(lc.container), self.config.op_timeout)
            except Exception as exc:
                raise self.error(op, full_key, exc) from exc

        if not retry:
            return await once()
        return await retrying(once, self.config.policy, what=f"{op} {self.where(full_key)}")

    async def close(self) -> None:
        """Close this loop's client; this loop cannot use it afterwards."""

        async def shut(lc: LoopClient) -> None:
            await lc.container.close()
            await lc.service.close()

        await self._clients.close(shut)
