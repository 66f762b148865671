"""The Azure block-blob upload state machine: one buffered PUT for small blobs, else staged blocks + a block list."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid

from azure.storage.blob import BlobBlock

from ...errors import CheckpointError, PermanentStorageError, StorageNotFoundError
from ..objectstore import WriterState, buffer_part, checked_part
from .client import AzureClient

__all__ = ["AzureWriter", "block_id"]

logger = logging.getLogger(__name__)


def block_id(token: str, index: int) -> str:
    """The block id of part ``index`` of one upload: every id of a blob has the same length, as Azure requires."""
    return base64.b64encode(f"{token}-{index:08d}".encode()).decode("ascii")


class AzureWriter:
    """Blocks are staged as parts arrive (invisible), and `commit` puts the block list: the blob appears at once.

    open --write_part--> open (Put Block; a per-writer token keeps racing writers' blocks apart)
    open --commit--> committed (Put Block List, or one Put Blob for small/empty blobs) | failed + aborted
    open --abort / a failed part--> aborted (uncommitted blocks of a blob that has no committed version are deleted)
    """

    def __init__(self, az: AzureClient, full: str, single_size: int | None) -> None:
        self._az = az
        self._full = full
        self._where = az.where(full)
        self._buf: bytearray | None = bytearray(single_size) if single_size is not None else None
        self._end = 0
        self._token = uuid.uuid4().hex[:12]
        self._blocks: dict[int, str] = {}
        self._inflight = 0
        self._st = WriterState(self._where)

    def __repr__(self) -> str:
        return f"<Azure writer {self._where} {self._st.state}>"

    async def write_part(self, index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
        view = checked_part(self._st, index, data)
        if self._buf is not None:
            self._end = buffer_part(self._buf, self._end, offset, view)
            return
        bid = block_id(self._token, index)
        lc = await self._az.loop_client()
        self._inflight += 1
        try:
            async with lc.transfers:
                self._st.check_open("write_part")
                # The SDK sends the caller's memory as is (no copy); the call returns only when it was sent.
                await self._az.call(
                    f"upload part {index + 1} of",
                    self._full,
                    lambda c: c.get_blob_client(self._full).stage_block(bid, view, length=len(view)),  # type: ignore[arg-type]  # any buffer works; no copy
                )
            self._blocks[index] = bid
        except asyncio.CancelledError:
            raise
        except CheckpointError as exc:
            self._st.fail(exc)
            raise
        finally:
            self._inflight -= 1
            if self._st.failed is not None and self._st.state == "open":
                await self._abort()

    async def commit(self) -> None:
        self._st.check_open("commit")
        try:
            if self._buf is not None or not self._blocks:
                body = bytes(memoryview(self._buf)[: self._end]) if self._buf is not None else b""
                await self._az.call(
                    "put", self._full, lambda c: c.get_blob_client(self._full).upload_blob(body, overwrite=True)
                )
            else:
                await self._put_block_list()
        except asyncio.CancelledError:
            await self._abort()
            raise
        except CheckpointError as exc:
            self._st.fail(exc)
            await self._abort()
            raise
        self._st.state = "committed"
        self._buf = None

    async def _put_block_list(self) -> None:
        if self._inflight:
            raise PermanentStorageError(f"commit {self._where}: {self._inflight} part(s) still uploading; await them first")
        numbers = sorted(self._blocks)
        if numbers != list(range(len(numbers))):
            missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
            raise PermanentStorageError(f"commit {self._where}: parts {[m + 1 for m in missing[:10]]} were never written")
        blocks = [BlobBlock(self._blocks[i]) for i in numbers]
        # Put Block List is idempotent: a retry after a lost reply commits the same list again.
        await self._az.call("commit", self._full, lambda c: c.get_blob_client(self._full).commit_block_list(blocks))

    async def abort(self) -> None:
        if self._st.state == "committed":
            return
        await self._abort()

    async def _abort(self) -> None:
        first = self._st.state != "aborted"
        self._st.state = "aborted"
        self._buf = None
        if first and self._blocks:
            await discard_uncommitted(self._az, self._full, quiet=True)


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
