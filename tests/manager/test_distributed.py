"""Two gloo ranks: a signal seen by one rank makes both save the same step; restore agrees on what to skip."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import asyncckpt
from tests._dist import run_ranks

pytestmark = pytest.mark.multiproc


def _train_and_preempt(rank: int, world: int, root: str) -> dict:
    w = torch.full((1000,), float(rank))
    with asyncckpt.CheckpointManager(root, every_steps=4) as mgr:
        stopped = None
        for s in range(1, 11):
            w += 1
            if rank == 1 and s == 6:
                os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
            mgr.maybe_save(s, {"w": w})
            if mgr.preempted:
                stopped = s
                break
    return {"stopped": stopped, "reason": mgr.preempt_reason, "w0": float(w[0])}


def _restore(rank: int, world: int, root: str) -> dict:
    w = torch.zeros(1000)
    with asyncckpt.CheckpointManager(root, signals=()) as mgr:
        step = mgr.restore({"w": w})
    return {"step": step, "w0": float(w[0])}


@pytest.mark.slow
def test_one_rank_signalled_both_save_the_same_step_and_restore_agrees(tmp_path):
    root = str(tmp_path / "ck")
    out = run_ranks(2, _train_and_preempt, tmp_path, root, timeout=240)
    assert [o["stopped"] for o in out] == [6, 6]
    assert [o["reason"] for o in out] == ["signal on another rank", "SIGUSR1"]
    listed = asyncckpt.list_checkpoints(root)
    assert [c.step for c in listed] == [6, 4] and listed[0].world_size == 2 and listed[0].is_latest
    got = run_ranks(2, _restore, tmp_path / "r1", root, timeout=240)
    assert got == [{"step": 6, "w0": 6.0}, {"step": 6, "w0": 7.0}]  # each rank its own state
    data = os.path.join(root, "step-00000006", "rank-00001.data")  # only rank 1's part is damaged
    with open(data, "r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 1]))
    got = run_ranks(2, _restore, tmp_path / "r2", root, timeout=240)
    assert got == [{"step": 4, "w0": 4.0}, {"step": 4, "w0": 5.0}]  # both fall back together
