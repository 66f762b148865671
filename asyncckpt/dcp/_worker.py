"""The DCP save routines that run in the persistent worker (pickled by reference).

``dcp_preload`` is the request's preload_fn: it reuses the engine's snapshot (shared storages ->
staging slot) unchanged. ``dcp_write`` is its async_fn: it serializes the staged items into DCP
``.distcp`` files, then writes this rank's checksum record, and releases the slot.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import engine
from ..engine import SaveJob
from ..format import CHECKSUM_ALGO
from ..storage import join_key
from ._format import DCP_FORMAT, DCP_FORMAT_VERSION, RankRecord, encode_record, rank_record_file
from ._io import FileSpec, ItemSpec, write_file

__all__ = ["DcpJob", "DcpRankResult", "dcp_preload", "dcp_write"]


@dataclass
class DcpJob:
    """One rank's part of one DCP checkpoint: the engine's snapshot payload plus the file layout."""

    save: SaveJob
    items: list[ItemSpec]
    files: list[FileSpec]
    save_id: str
    ephemeral: bool = False  # storages were sent for this job only: drop them after the snapshot


@dataclass
class DcpRankResult:
    rank: int
    nbytes: int
    record_nbytes: int
    snapshot_s: float
    write_s: float


@dataclass
class _DcpStaged:
    job: DcpJob
    staged: Any  # engine._Staged


async def dcp_preload(job: DcpJob) -> _DcpStaged:
    """preload_fn: copy the shared tensors into a staging slot (the engine's snapshot)."""
    sent = list(job.save.new_storages) if job.ephemeral else []
    try:
        staged = await engine.snapshot(job.save)
    finally:
        for sid in sent:
            engine._STATE.storages.pop(sid, None)
    return _DcpStaged(job, staged)


def _slot_data(slot: Any, it: ItemSpec) -> Any:
    view = slot.view[it.slot_offset : it.slot_offset + it.nbytes]
    if it.kind == "bytes":
        return view
    assert it.dtype is not None
    if it.nbytes == 0:
        return torch.empty(it.shape, dtype=it.dtype)
    # A tensor over exactly these bytes of the slot (no copy), so torch.save writes only them.
    return torch.frombuffer(view, dtype=torch.uint8).view(it.dtype).view(it.shape)


async def dcp_write(st: _DcpStaged) -> DcpRankResult:
    """async_fn: write this rank's ``.distcp`` files and its checksum record, then free the slot."""
    job, slot = st.job, st.staged.slot
    sj = job.save
    t0 = time.perf_counter()
    try:
        storage = engine._STATE.backend(sj.root, sj.storage_options)
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(
                asyncio.to_thread(
                    write_file, loop, storage, sj.name, f, job.items, lambda i: _slot_data(slot, job.items[i]),
                    chunk_size=sj.chunk_size, concurrency=sj.io_concurrency,
                )
                for f in job.files
            ),
            return_exceptions=True,  # every thread must be done with the slot before it is released
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        record = RankRecord(
            format=DCP_FORMAT,
            version=DCP_FORMAT_VERSION,
            save_id=job.save_id,
            rank=sj.rank,
            checksum_algo=CHECKSUM_ALGO,
            files=[fr for fr, _ in results],
            items=[it for _, its in results for it in its],
            created=time.time(),
        )
        blob = encode_record(record)
        await storage.put_record(join_key(sj.name, rank_record_file(sj.rank)), blob)
    finally:
        await engine._STATE.pool.release(slot)
    nbytes = sum(fr.nbytes for fr in record.files)
    return DcpRankResult(sj.rank, nbytes, len(blob), st.staged.snapshot_s, time.perf_counter() - t0)
