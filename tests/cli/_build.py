"""Checkpoints for the CLI tests, written by the real CheckpointManager."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import asyncckpt


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def build_root(root: Any, steps=(10, 20, 30), storage_options: dict[str, Any] | None = None,  # type: ignore[no-untyped-def]
               big: bool = False) -> dict[str, Any]:
    """Save ``steps`` under ``root``; returns the state as of the last step (tensors cloned)."""
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    state: dict[str, Any] = {"model": m, "optim": opt, "extra": {"table": np.arange(6, dtype=np.int32), "note": "hi"}}
    if big:  # several 5 MiB chunks, for interrupting a stream half-way
        state["big"] = torch.arange(3 << 20, dtype=torch.float32)
    opts: dict[str, Any] = {"checkpointer_options": {"chunk_size": 5 << 20}}
    with asyncckpt.CheckpointManager(root, signals=(), storage_options=storage_options, **opts) as mgr:
        for s in steps:
            loss = m(torch.randn(4, 32)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.save(s, state)
    return {"model": {k: v.clone() for k, v in m.state_dict().items()}, "big": state.get("big")}
