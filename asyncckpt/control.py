"""Control-lane operations of the native format: commit, drain to durable tiers, retention, cleanup.

Each is a small picklable object the trainer schedules on a worker (invariant 9: the loop does
no storage work); the worker runs them in order on its control lane, using its storage
sessions. They wrap the catalog's and tiers' functions, which stay usable on their own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .catalog import BasePins, commit_checkpoint, drop_stale_writes, remembered_records
from .retention import RetentionPolicy, apply_retention

if TYPE_CHECKING:
    from .runtime.context import WorkerContext
    from .storage import Storage
    from .tiers import Tiers

__all__ = ["CleanupOp", "CommitOp", "DrainOp", "ReserveStagingOp", "RetentionOp"]

log = logging.getLogger("asyncckpt")


@dataclass
class RetentionOp:
    """Apply ``policy`` under ``root`` (never the ``latest`` target, never ``protect``)."""

    root: str
    storage_options: dict[str, Any]
    policy: RetentionPolicy
    upto_step: int | None = None
    protect: frozenset[str] = frozenset()
    now: float | None = None  # the wall clock to judge max_age_s by (default: the worker's)
    rank: int = 0
    milestone: str | None = None

    def sessions(self, ctx: WorkerContext) -> list[Storage]:
        return [ctx.storage(self.root, self.storage_options)]

    async def run(self, ctx: WorkerContext, prior: Any) -> Any:
        storage = ctx.storage(self.root, self.storage_options)
        # the bases of incremental saves still being written here stay (their references are not on storage yet)
        with remembered_records():  # what this worker committed is not read back (see catalog.remembered_records)
            await apply_retention(storage, self.policy, now=self.now, upto_step=self.upto_step, rank=self.rank,
                                  protect=self.protect, pins=ctx.pins.setdefault(self.root, BasePins()))
        return prior


@dataclass
class CommitOp:
    """Verify every rank's manifest, write COMMIT, move ``latest``, drop stale writes, then retention."""

    root: str
    name: str
    world_size: int
    step: int | None
    storage_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    update_latest: bool = True
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "flat"
    retention: list[RetentionOp] = field(default_factory=list)
    milestone: str | None = "committed"

    def sessions(self, ctx: WorkerContext) -> list[Storage]:
        return [ctx.storage(self.root, self.storage_options)] + [s for r in self.retention for s in r.sessions(ctx)]

    async def run(self, ctx: WorkerContext, prior: Any) -> Any:
        storage = ctx.storage(self.root, self.storage_options)
        with remembered_records():  # the generation its save found, the manifests it reads once
            await commit_checkpoint(
                storage, self.name, world_size=self.world_size, step=self.step, overwrite=self.overwrite,
                update_latest=self.update_latest, metadata=self.metadata, layout=self.layout,
            )
        for r in self.retention:
            try:
                await r.run(ctx, None)
            except Exception as exc:  # noqa: BLE001 - the commit stands; retention tries again next time
                log.warning("retention under %s failed after committing %s: %s", r.root, self.name, exc,
                            extra={"rank": r.rank, "step": self.step, "op": "retention", "bytes": None,
                                   "seconds": None})
        return prior


@dataclass
class DrainOp:
    """Copy this rank's files of ``name`` from the fast tier to every other tier, chunk by chunk, verified.

    It names no ``sessions``: a drain moves bulk data with several chunks in flight through the
    storages' I/O threads, so it stays on the worker's main loop rather than the control thread."""

    tiers: Tiers
    name: str
    rank: int
    concurrency: int = 4
    milestone: str | None = None

    async def run(self, ctx: WorkerContext, prior: Any) -> Any:
        from .tiers import drain_rank

        storages = [ctx.storage(u, o) for u, o in zip(self.tiers.uris, self.tiers.storage_options)]
        await drain_rank(storages, self.name, self.rank, self.concurrency)
        return prior


@dataclass
class CleanupOp:
    """Remove what a failed save left (temp files, incomplete multipart uploads) under ``prefixes``."""

    root: str
    storage_options: dict[str, Any]
    prefixes: list[str]
    milestone: str | None = None

    def sessions(self, ctx: WorkerContext) -> list[Storage]:
        return [ctx.storage(self.root, self.storage_options)]

    async def run(self, ctx: WorkerContext, prior: Any) -> Any:
        t0 = time.perf_counter()
        await drop_stale_writes(ctx.storage(self.root, self.storage_options), self.prefixes)
        log.debug("cleaned up %s under %s in %.3f s", self.prefixes, self.root, time.perf_counter() - t0)
        return prior


@dataclass
class ReserveStagingOp:
    """Allocate and touch the worker's staging slots for snapshots of ``nbytes`` (``warm_up``)."""

    nbytes: int
    milestone: str | None = None

    async def run(self, ctx: WorkerContext, prior: Any) -> Any:
        await ctx.pool.reserve(self.nbytes)
        return prior
