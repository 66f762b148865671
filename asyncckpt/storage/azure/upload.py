"""The Azure block-blob upload state machine: one buffered PUT for small blobs, else staged blocks + a block list."""

from __future__ import annotations

import base64
import contextlib
import logging
import uuid

from azure.storage.blob import BlobBlock

from ...errors import CheckpointError, StorageNotFoundError
from ..objectstore import PartWriter
from .client import AzureClient

__all__ = ["AzureWriter", "block_id"]

logger = logging.getLogger(__name__)


def block_id(token: str, index: int) -> str:
    """The block id of part ``index`` of one upload: every id of a blob has the same length, as Azure requires."""
    return base64.b64encode(f"{token}-{index:08d}".encode()).decode("ascii")


class AzureWriter(PartWriter):
    """Blocks are staged as parts arrive (invisible), and `commit` puts the block list: the blob appears at once.

    open --write_part--> open (Put Block; a per-writer token keeps racing writers' blocks apart)
    open --commit--> committed (Put Block List, or one Put Blob for small/empty blobs) | failed + aborted
    open --abort / a failed part--> aborted (uncommitted blocks of a blob that has no committed version are deleted)
    """

    service = "Azure"

    def __init__(self, az: AzureClient, full: str, single_size: int | None) -> None:
        super().__init__(az.where(full), single_size)
        self._az = az
        self._full = full
        self._token = uuid.uuid4().hex[:12]
        self._blocks: dict[int, str] = {}

    async def _send_part(self, index: int, view: memoryview, crc32c: int | None) -> None:
        bid = block_id(self._token, index)
        lc = await self._az.loop_client()
        async with lc.transfers:
            self._st.check_open("write_part")
            # The SDK sends the caller's memory as is (no copy); the call returns only when it was sent.
            await self._az.call(
                f"upload part {index + 1} of",
                self._full,
                lambda c: c.get_blob_client(self._full).stage_block(bid, view, length=len(view)),  # type: ignore[arg-type]  # any buffer works; no copy
            )
        self._blocks[index] = bid

    async def _put_whole(self, body: memoryview) -> None:
        data = bytes(body)
        await self._az.call("put", self._full, lambda c: c.get_blob_client(self._full).upload_blob(data, overwrite=True))

    async def _discard(self, first: bool) -> None:
        if first and self._blocks:
            await discard_uncommitted(self._az, self._full, quiet=True)

    async def _assemble(self, numbers: list[int]) -> None:
        blocks = [BlobBlock(self._blocks[i]) for i in numbers]
        # Put Block List is idempotent: a retry after a lost reply commits the same list again.
        await self._az.call("commit", self._full, lambda c: c.get_blob_client(self._full).commit_block_list(blocks))


async def discard_uncommitted(az: AzureClient, full: str, *, quiet: bool) -> bool:
    """Delete ``full`` if it holds only uncommitted blocks (no committed blob: nothing a reader sees is lost).

    Azure drops uncommitted blocks by itself after a week; this frees them now. True if deleted.
    """
    try:
        try:
            await az.call("abort", full, lambda c: c.get_blob_client(full).get_blob_properties())
            return False  # a committed blob is there (an earlier save): leave it, its blocks expire on their own
        except StorageNotFoundError:
            pass
        with contextlib.suppress(StorageNotFoundError):
            await az.call("abort", full, lambda c: c.get_blob_client(full).delete_blob())
            return True
        return False
    except CheckpointError as exc:
        if not quiet:
            raise
        logger.warning("%s (uncommitted blocks left behind: AzureBlobStorage.abort_incomplete_uploads() removes them)", exc)
        return False
