"""Functions run on gloo ranks (tests._dist.run_ranks) by the torture tests."""

from __future__ import annotations

from typing import Any

import torch


def coordinator_commit_fails(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 0's commit record write fails: every rank must learn the save is not committed."""
    import asyncckpt
    import asyncckpt.checkpointer as ckpt_mod
    from asyncckpt.errors import CheckpointError, StorageError

    real = ckpt_mod.commit_checkpoint
    state = {"w": torch.full((1000,), float(rank))}
    out: dict[str, Any] = {}
    with asyncckpt.AsyncCheckpointer() as ck:
        if rank == 0:
            async def failing(*args: Any, **kwargs: Any) -> Any:
                raise StorageError(28, "injected: no space left writing COMMIT")

            ckpt_mod.commit_checkpoint = failing
        h = ck.save(state, f"{root}/bad", step=1)
        try:
            ck.finalize(blocking=True)
            out["first"] = "no error"
        except CheckpointError as exc:
            out["first"] = type(exc).__name__
        out["first_committed"] = h.committed
        ckpt_mod.commit_checkpoint = real
        h2 = ck.save(state, f"{root}/good", step=2)
        ck.finalize(blocking=True)
        out["second_committed"] = h2.committed
    return out
