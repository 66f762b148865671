"""Listing the checkpoints under a root (local directory, ``s3://`` prefix, tiers)."""

from __future__ import annotations

import os
from typing import Any

from ._loop import run_sync
from .catalog import CheckpointInfo, list_all
from .storage import Storage, open_storage

__all__ = ["CheckpointInfo", "list_checkpoints", "list_checkpoints_async", "list_incomplete"]


async def list_checkpoints_async(
    root: str | os.PathLike[str] | Storage, *, include_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[CheckpointInfo]:
    """Async form of :func:`list_checkpoints`."""
    own = isinstance(root, (str, os.PathLike))
    storage = open_storage(root, **(storage_options or {})) if own else root
    try:
        infos = await list_all(storage)
    finally:
        if own:
            await storage.close()
    return infos if include_incomplete else [i for i in infos if i.complete]


def list_checkpoints(
    root: str | os.PathLike[str] | Storage, *, include_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, newest (highest step) first.

    Each item has ``.name``, ``.path``, ``.step``, ``.created`` (Unix time of the commit),
    ``.nbytes``, ``.tiers``, ``.world_size`` and ``.is_latest``. Only checkpoints with a valid
    commit record are listed; ``include_incomplete=True`` appends the others (``.complete`` is
    False and ``.problem`` says why).
    """
    return run_sync(
        list_checkpoints_async(root, include_incomplete=include_incomplete, storage_options=storage_options)
    )


def list_incomplete(root: str | os.PathLike[str] | Storage, *, storage_options: dict[str, Any] | None = None
                    ) -> list[CheckpointInfo]:
    """Checkpoints under ``root`` that are not complete (a save in progress or interrupted, or a bad commit record)."""
    return [i for i in list_checkpoints(root, include_incomplete=True, storage_options=storage_options) if not i.complete]
