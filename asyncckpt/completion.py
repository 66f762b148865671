"""Global completion: one all-reduce of one integer decides whether every rank is done."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["FAILED", "UNFINISHED", "dist_active", "global_state"]

UNFINISHED = 1
#: Added by a rank whose oldest request failed; any sum >= FAILED means some rank failed.
FAILED = 1 << 20


def dist_active(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized()


def global_state(local: int, *, no_dist: bool, group: Any = None) -> int:
    """Sum ``local`` over all ranks (gloo on CPU, NCCL on the current device); ``local`` when not distributed."""
    if no_dist or not dist_active(group):
        return local
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.item())
