"""The GCS upload state machine: one buffered upload for small objects, else parallel parts composed at commit.

GCS has no S3-style multipart upload in its JSON API (nor in the emulators); its parallel
upload is the composite object: every part is uploaded as a temporary object (its CRC32C
checked by GCS), and `commit` composes them into the final object in one atomic step (a tree of
compose requests of at most 32 sources each), then deletes the temporaries. Temporary names
carry the storage-wide temp mark, so `list` never shows them and `abort_incomplete_uploads`
finds what a crash left.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from ..._loop import gather_or_cancel
from ...errors import CheckpointError
from ..keys import TEMP_MARK
from ..objectstore import PartWriter
from .client import GCSClient
from .config import MAX_COMPOSE

__all__ = ["GCSWriter", "temp_name"]

logger = logging.getLogger(__name__)


def temp_name(full: str, token: str, what: str) -> str:
    """The name of one temporary object of an upload of ``full`` (a part, or an intermediate compose)."""
    return f"{full}{TEMP_MARK}{token}.{what}"


class GCSWriter(PartWriter):
    """open --write_part--> open (each part a temporary object) --commit--> committed (compose) | failed + aborted."""

    service = "GCS"

    def __init__(self, gcs: GCSClient, full: str, single_size: int | None) -> None:
        super().__init__(gcs.where(full), single_size)
        self._gcs = gcs
        self._full = full
        self._token = uuid.uuid4().hex[:12]
        self._parts: dict[int, str] = {}
        self._temps: set[str] = set()  # every temporary object that may exist

    async def _send_part(self, index: int, view: memoryview, crc32c: int | None) -> None:
        name = temp_name(self._full, self._token, f"part-{index:06d}")
        lc = await self._gcs.loop_client()
        async with lc.transfers:
            self._st.check_open("write_part")
            self._temps.add(name)
            await self._gcs.call(
                f"upload part {index + 1} of", self._full, lambda c: self._gcs.upload(c, name, view, crc32c=crc32c)
            )
        self._parts[index] = name

    async def _put_whole(self, body: memoryview) -> None:
        await self._gcs.call("put", self._full, lambda c: self._gcs.upload(c, self._full, body))

    async def _landed_after_abort(self) -> None:
        await self._drop_temps()  # a part that was in flight during abort may have landed after it

    async def _after_commit(self) -> None:
        await self._drop_temps()

    async def _discard(self, first: bool) -> None:
        if first:
            await self._drop_temps()

    async def _assemble(self, numbers: list[int]) -> None:
        sources = [self._parts[i] for i in numbers]
        level = 0
        while len(sources) > MAX_COMPOSE:
            groups = [sources[i : i + MAX_COMPOSE] for i in range(0, len(sources), MAX_COMPOSE)]
            names = [temp_name(self._full, self._token, f"c{level}-{j:06d}") for j in range(len(groups))]
            self._temps.update(names)
            await gather_or_cancel(self._compose(g, n) for g, n in zip(groups, names))
            sources, level = names, level + 1
        await self._compose(sources, self._full)

    async def _compose(self, sources: list[str], dest: str) -> None:
        body = {
            "sourceObjects": [{"name": s} for s in sources],
            "destination": {"contentType": "application/octet-stream"},
        }
        url = f"{self._gcs.object_url(dest)}/compose"
        # Compose is idempotent for the same sources: a retry after a lost reply writes the same object.
        await self._gcs.call("commit", self._full, lambda c: self._gcs.json_request(c, "POST", url, body=body))

    async def _drop_temps(self) -> None:
        """Delete this upload's temporary objects; best effort (logged; abort_incomplete_uploads() finds leftovers)."""
        names = sorted(self._temps)
        if not names:
            return

        sem = asyncio.Semaphore(self._gcs.config.part_concurrency)

        async def one(name: str) -> None:
            async with sem:
                await self._gcs.call(
                    "delete temporary part of", self._full, lambda c: self._gcs.delete_object(c, name)
                )
            self._temps.discard(name)

        try:
            await gather_or_cancel(one(n) for n in names)
        except CheckpointError as exc:
            logger.warning(
                "%s (temporary parts left behind: GCSStorage.abort_incomplete_uploads() removes them)", exc
            )
