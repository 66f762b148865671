"""Listing the checkpoints under a root (local directory, ``s3://`` prefix, tiers)."""

from __future__ import annotations

import os
from typing import Any

from ._loop import run_sync
from .catalog import CheckpointInfo, list_all
from .storage import Storage, open_storage
from .tiers import Tiers

__all__ = ["CheckpointInfo", "list_checkpoints", "list_checkpoints_async", "list_incomplete"]


def _merge(per_tier: list[list[CheckpointInfo]]) -> list[CheckpointInfo]:
    """One entry per name: the fastest tier's complete copy, with every tier holding a complete copy in ``.tiers``."""
    by_name: dict[str, CheckpointInfo] = {}
    for infos in per_tier:
        for info in infos:
            have = by_name.get(info.name)
            if have is None:
                by_name[info.name] = info
            elif info.complete and not have.complete:
                info.is_latest = info.is_latest or have.is_latest
                by_name[info.name] = info
            elif info.complete:
                have.tiers.extend(t for t in info.tiers if t not in have.tiers)
                have.is_latest = have.is_latest or info.is_latest
    out = list(by_name.values())
    out.sort(key=lambda i: (not i.complete, -(i.step if i.step is not None else -1), -i.created))
    return out


async def list_checkpoints_async(
    root: str | os.PathLike[str] | Storage | Tiers, *, include_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None, check: bool = False,
) -> list[CheckpointInfo]:
    """Async form of :func:`list_checkpoints`."""
    if isinstance(root, Tiers):
        per_tier = []
        for i in range(len(root.uris)):
            st = root.storage(i)
            try:
                per_tier.append(await list_all(st, check=check))
            finally:
                await st.close()
        infos = _merge(per_tier)
        return infos if include_incomplete else [i for i in infos if i.complete]
    own = isinstance(root, (str, os.PathLike))
    storage = open_storage(root, **(storage_options or {})) if isinstance(root, (str, os.PathLike)) else root
    try:
        infos = await list_all(storage, check=check)
    finally:
        if own:
            await storage.close()
    return infos if include_incomplete else [i for i in infos if i.complete]


def list_checkpoints(
    root: str | os.PathLike[str] | Storage | Tiers, *, include_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None, check: bool = False,
) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, newest (highest step) first.

    ``root`` is a local directory, ``s3://bucket/prefix`` or :class:`~asyncckpt.Tiers` (the roots
    :func:`~asyncckpt.load` accepts). Each item has ``.name``, ``.path``, ``.step``, ``.created``
    (Unix time of the commit), ``.nbytes``, ``.tiers``, ``.world_size`` and ``.is_latest``. Only
    checkpoints with a valid commit record are listed; ``check=True`` also makes the cheap checks
    ``asyncckpt ls`` makes (every rank's record matches COMMIT, data files have their recorded
    sizes; no data is read). ``include_incomplete=True`` appends the others (``.complete`` is
    False and ``.problem`` says why). For Tiers, each name appears once, ``.tiers`` naming every
    tier that holds a complete copy.
    """
    return run_sync(
        list_checkpoints_async(root, include_incomplete=include_incomplete, storage_options=storage_options,
                               check=check)
    )


def list_incomplete(root: str | os.PathLike[str] | Storage | Tiers, *, storage_options: dict[str, Any] | None = None
                    ) -> list[CheckpointInfo]:
    """Checkpoints under ``root`` that are not complete (a save in progress or interrupted, or a bad commit record)."""
    return [i for i in list_checkpoints(root, include_incomplete=True, storage_options=storage_options) if not i.complete]
