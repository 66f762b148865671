"""Functions run on gloo ranks (tests._dist.run_ranks) by the torture tests."""

from __future__ import annotations

from typing import Any

import torch


def coordinator_commit_fails(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 0's commit record write fails (ENOSPC in its worker): every rank must learn the save is not committed."""
    import os

    import asyncckpt
    from asyncckpt.errors import CheckpointError, StorageError

    from . import _inject

    state = {"w": torch.full((1000,), float(rank))}
    out: dict[str, Any] = {}
    if rank == 0:  # the coordinator's worker fails its first storage write of the commit phase, once
        os.environ["TORTURE_FAULT"] = "enospc:commit:create"
    with asyncckpt.AsyncCheckpointer(worker_options=_inject.WORKER_OPTIONS) as ck:
        ck.queue.start_worker()
        os.environ.pop("TORTURE_FAULT", None)
        h = ck.save(state, f"{root}/bad", step=1)
        try:
            ck.finalize(blocking=True)
            out["first"] = "no error"
        except CheckpointError as exc:
            out["first"] = "StorageError" if isinstance(exc, StorageError) else type(exc).__name__
        out["first_committed"] = h.committed
        h2 = ck.save(state, f"{root}/good", step=2)
        ck.finalize(blocking=True)
        out["second_committed"] = h2.committed
    return out
