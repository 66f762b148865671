"""Retention: which complete checkpoints to keep (last N, every K-th step, younger than T) and pruning.

A checkpoint is kept when *any* rule keeps it; the one ``latest`` points to is never deleted,
nor is anything incomplete (it may be a save in progress). Deletion goes through
``catalog.delete_checkpoint`` (the one safe deletion: only what the checkpoint's records name,
commit record first), so a checkpoint is never seen half-deleted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._loop import run_sync
from .catalog import BasePins, CheckpointInfo, delete_checkpoint, list_all
from .errors import BadInputError, CheckpointError, CheckpointNotFoundError, NotACheckpointError, StorageError
from .locate import describe_local, is_missing_bucket, local_path
from .logs import log_event
from .storage import Storage, open_storage

__all__ = ["RetentionPolicy", "apply_retention", "prune", "prune_async", "select_deletions"]


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest ``keep_last``, every step that is a multiple of ``keep_every``, and those
    younger than ``max_age_s`` seconds. A rule left None keeps nothing by itself; with every rule
    None nothing is deleted."""

    keep_last: int | None = None
    keep_every: int | None = None
    max_age_s: float | None = None
    now: float | None = None  # judge ages at this Unix time instead of the applier's clock (replays, tests)

    def __post_init__(self) -> None:
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or self.keep_last < 1):
            raise BadInputError(f"keep_last must be an integer >= 1 (or None), got {self.keep_last!r}")
        if self.keep_every is not None and (not isinstance(self.keep_every, int) or self.keep_every < 1):
            raise BadInputError(f"keep_every must be an integer >= 1 (or None), got {self.keep_every!r}")
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise BadInputError(f"max_age_s must be > 0 seconds (or None), got {self.max_age_s!r}")

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_every is not None or self.max_age_s is not None


def select_deletions(
    infos: Sequence[CheckpointInfo],
    policy: RetentionPolicy,
    *,
    now: float | None = None,
    latest: str | None = None,
    upto_step: int | None = None,
    protect: set[str] | frozenset[str] = frozenset(),
) -> list[CheckpointInfo]:
    """The complete checkpoints ``policy`` lets go, newest first.

    ``latest`` (a name) and the names in ``protect`` are always kept; with ``upto_step``,
    checkpoints of later steps are left alone (they were committed after the retention pass
    began). Pure: no I/O.
    """
    if not policy.active:
        return []
    now = (time.time() if policy.now is None else policy.now) if now is None else now
    complete = [i for i in infos if i.complete]
    complete.sort(key=lambda i: (-(i.step if i.step is not None else -1), -i.created))
    out: list[CheckpointInfo] = []
    for rank, info in enumerate(complete):
        if info.name == latest or info.is_latest or info.name in protect:
            continue
        if upto_step is not None and (info.step is None or info.step > upto_step):
            continue
        if policy.keep_last is not None and rank < policy.keep_last:
            continue
        if policy.keep_every is not None and info.step is not None and info.step % policy.keep_every == 0:
            continue
        if policy.max_age_s is not None and now - info.created < policy.max_age_s:
            continue
        out.append(info)
    return out


async def apply_retention(
    storage: Storage,
    policy: RetentionPolicy,
    *,
    now: float | None = None,
    upto_step: int | None = None,
    dry_run: bool = False,
    rank: int = 0,
    protect: set[str] | frozenset[str] = frozenset(),
    pins: BasePins | None = None,
) -> list[CheckpointInfo]:
    """Delete what ``policy`` lets go under ``storage``; returns those deleted (or, with ``dry_run``, to delete).

    ``pins``: bases of incremental saves being written in this process; they are kept this time."""
    if not policy.active:
        return []
    infos = await list_all(storage)  # marks the `latest` target (is_latest): no second reading of it here
    doomed = select_deletions(infos, policy, now=now, upto_step=upto_step, protect=protect)
    if dry_run:
        return doomed
    deleted: list[CheckpointInfo] = []
    for info in doomed:
        t0 = time.perf_counter()
        try:
            await delete_checkpoint(storage, info.name, pins=pins)  # re-reads `latest` and refuses its target
        except CheckpointError as exc:  # one checkpoint that cannot go must not stop the others
            log_event(f"retention could not delete {info.path}: {exc}", op="delete", rank=rank, step=info.step,
                      level=30)
            continue
        deleted.append(info)
        log_event(
            f"retention deleted {info.path}", op="delete", rank=rank, step=info.step, nbytes=info.nbytes,
            seconds=time.perf_counter() - t0,
        )
    return deleted


async def prune_async(
    root: str | os.PathLike[str] | Storage,
    *,
    keep_last: int | None = None,
    keep_every: int | None = None,
    max_age_s: float | None = None,
    now: float | None = None,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[CheckpointInfo]:
    """Async form of :func:`prune`."""
    policy = RetentionPolicy(keep_last, keep_every, max_age_s)
    if not policy.active:
        raise BadInputError("prune needs at least one of keep_last, keep_every, max_age_s")
    own = isinstance(root, (str, os.PathLike))
    lp = local_path(root) if isinstance(root, (str, os.PathLike)) else None
    if lp is not None and not lp.is_dir():
        if lp.exists():
            raise NotACheckpointError(f"{lp} is not a root of checkpoints: it is {describe_local(lp)}")
        raise CheckpointNotFoundError(f"{lp}: no such directory")
    storage = open_storage(root, **(storage_options or {})) if isinstance(root, (str, os.PathLike)) else root
    try:
        return await apply_retention(storage, policy, now=now, dry_run=dry_run)
    except StorageError as exc:
        if is_missing_bucket(exc):
            raise CheckpointNotFoundError(f"{storage.uri}: {exc}") from exc
        raise
    finally:
        if own:
            await storage.close()


def prune(
    root: str | os.PathLike[str] | Storage,
    *,
    keep_last: int | None = None,
    keep_every: int | None = None,
    max_age_s: float | None = None,
    now: float | None = None,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[CheckpointInfo]:
    """Delete the complete checkpoints under ``root`` that no rule keeps; returns them.

    Keeps the newest ``keep_last``, steps that are multiples of ``keep_every`` and checkpoints
    younger than ``max_age_s`` (``now`` overrides the wall clock, for tests). Never deletes the
    ``latest`` target or incomplete checkpoints, and deletes each one as :func:`asyncckpt.delete`
    does (only the keys its records name; other files stay). ``dry_run`` only reports. A missing
    root (directory or bucket) raises CheckpointNotFoundError.
    """
    return run_sync(
        prune_async(
            root, keep_last=keep_last, keep_every=keep_every, max_age_s=max_age_s, now=now, dry_run=dry_run,
            storage_options=storage_options,
        )
    )
