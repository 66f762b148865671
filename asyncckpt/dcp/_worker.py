"""The DCP sink: what runs in the persistent worker for a DCP save (pickled by reference).

:class:`DcpSink` writes a staged snapshot as DCP ``.distcp`` files plus this rank's checksum
record. For nvidia-resiliency-ext-style scheduling (``AsyncRequest(save_fn, args,
preload_fn=preload_fn)``), :func:`dcp_preload` / :func:`dcp_save` wrap the same snapshot and
sink, with the runtime still owning the staging slot.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..engine import SaveJob
from ..format import CHECKSUM_ALGO
from ..runtime.context import current_context, run_sink
from ..staging import SnapshotSpec, take_snapshot
from ..storage import join_key
from ._commit import next_generation, prepare_target
from ._format import DCP_FORMAT, RankRecord, encode_record, generation_name, rank_record_file, record_version
from ._io import FileSpec, ItemSpec, write_file

if TYPE_CHECKING:
    from ..runtime.context import WorkerContext
    from ..staging import Staged

__all__ = ["DcpJob", "DcpRankResult", "DcpSink", "dcp_preload", "dcp_save"]


@dataclass
class DcpJob:
    """One rank's part of one DCP checkpoint: where to write, the items and their files."""

    save: SaveJob  # root, name, rank, chunking, storage options (entries/tree unused)
    items: list[ItemSpec]
    files: list[FileSpec]
    save_id: str
    snapshot: SnapshotSpec | None = None  # for dcp_preload (NVRx-style requests)
    timeout_s: float | None = None
    # Checked by the worker before it writes (None: the caller prepared the directory already):
    # False refuses an existing checkpoint, True writes the next generation beside a committed one.
    overwrite: bool | None = None
    per_rank: bool = False  # saved without collectives: this rank's __R.metadata is its commit point
    extensions: list[Any] = field(default_factory=list)  # DCP StreamTransformExtensions, applied per item
    uri: str = ""

    def __str__(self) -> str:
        return f"DCP rank {self.save.rank} of {self.save.root.rstrip('/')}/{self.save.name}"


@dataclass
class DcpRankResult:
    rank: int
    nbytes: int
    record_nbytes: int
    snapshot_s: float
    write_s: float


def _slot_data(staged: Staged, it: ItemSpec) -> Any:
    view = staged.slot.view[it.slot_offset : it.slot_offset + it.nbytes]
    if it.kind == "bytes":
        return view
    assert it.dtype is not None
    if it.nbytes == 0:
        return torch.empty(it.shape, dtype=it.dtype)
    # A tensor over exactly these bytes of the slot (no copy), so torch.save writes only them.
    return torch.frombuffer(view, dtype=torch.uint8).view(it.dtype).view(it.shape)


class DcpSink:
    """Writes this rank's ``.distcp`` files from the staged snapshot, then its checksum record."""

    async def write(self, ctx: WorkerContext, job: DcpJob, staged: Staged) -> DcpRankResult:
        sj = job.save
        t0 = time.perf_counter()
        storage = ctx.storage(sj.root, sj.storage_options)
        if job.overwrite is not None:
            generation = await prepare_target(storage, sj.name, overwrite=job.overwrite, uri=job.uri or str(job),
                                              rank=sj.rank if job.per_rank else None)
        else:  # the caller prepared the target; a committed checkpoint there is the one to write beside
            generation = 0 if job.per_rank else await next_generation(storage, sj.name)
        files = [FileSpec(generation_name(f.name, generation), f.items) for f in job.files]
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(
                asyncio.to_thread(
                    write_file, loop, storage, sj.name, f, job.items, lambda i: _slot_data(staged, job.items[i]),
                    chunk_size=sj.chunk_size, concurrency=sj.io_concurrency, extensions=job.extensions,
                    source=staged.slot.view,
                )
                for f in files
            ),
            return_exceptions=True,  # every thread must be done with the slot before it is released
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        transforms = [t for _, _, ts in results for t in ts]  # type: ignore[misc]
        record = RankRecord(
            format=DCP_FORMAT,
            version=record_version(transforms),
            save_id=job.save_id,
            rank=sj.rank,
            checksum_algo=CHECKSUM_ALGO,
            files=[fr for fr, _, _ in results],  # type: ignore[misc]
            items=[it for _, its, _ in results for it in its],  # type: ignore[misc]
            created=time.time(),
            transforms=transforms if any(transforms) else None,
        )
        blob = encode_record(record)
        await storage.put_record(join_key(sj.name, rank_record_file(sj.rank, generation)), blob)
        nbytes = sum(fr.nbytes for fr in record.files)
        return DcpRankResult(sj.rank, nbytes, len(blob), staged.seconds, time.perf_counter() - t0)


async def dcp_preload(job: DcpJob) -> Staged:
    """``preload_fn`` of an NVRx-style request (bound with ``functools.partial``): take the snapshot."""
    assert job.snapshot is not None
    return await take_snapshot(current_context(), job.snapshot)


async def dcp_save(job: DcpJob, staged: Staged) -> DcpRankResult:
    """``async_fn`` of an NVRx-style request: ``dcp_save(job, dcp_preload(job))`` in effect."""
    return await run_sink(current_context(), DcpSink(), job, staged, job.timeout_s)
