"""One retry policy for every object store: bounded attempts, jittered exponential backoff."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ...errors import BadInputError, StorageError, StorageOpTimeoutError, TransientStorageError

__all__ = ["RetryPolicy", "retrying"]

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` counts the first try; the n-th retry waits ``min(max_delay, base_delay * 2**n)``
    times a random factor in [0.5, 1] (full jitter would let a burst of clients retry at once)."""

    max_attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise BadInputError(f"max_attempts must be an int >= 1, not {self.max_attempts!r}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise BadInputError("retry delays must be >= 0 seconds")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return min(self.max_delay, self.base_delay * 2 ** max(0, attempt - 1)) * random.uniform(0.5, 1.0)

    async def backoff(self, attempt: int) -> None:
        await asyncio.sleep(self.delay(attempt))


async def retrying(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    what: str = "",
    retry_on: Callable[[StorageError], bool] | None = None,
) -> T:
    """Run ``call()`` until it succeeds, retrying a `TransientStorageError` up to ``policy.max_attempts``.

    ``call`` must raise errors of the storage tree (the backend translates at its edge). A
    `StorageOpTimeoutError` is never retried (the caller's budget is spent). ``retry_on`` narrows
    what is retried. The last error is raised as it came.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except TransientStorageError as exc:
            if isinstance(exc, StorageOpTimeoutError) or (retry_on is not None and not retry_on(exc)):
                raise
            if attempt >= policy.max_attempts:
                raise
            logger.debug("%s failed (%s); retry %d of %d", what, exc, attempt, policy.max_attempts - 1)
        await policy.backoff(attempt)
