"""The manager on a Tiers root: saves drain to the durable tier; a lost fast tier restores from the durable one."""

from __future__ import annotations

import shutil

import torch

import asyncckpt
from asyncckpt import Tiers


def test_manager_on_tiers_restores_after_losing_the_fast_tier(tmp_path):
    fast, slow = tmp_path / "nvme", tmp_path / "durable"
    model = torch.nn.Linear(64, 64)
    state = {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.1)}
    with asyncckpt.CheckpointManager(Tiers(fast, slow), every_steps=2, keep_last=2, signals=()) as mgr:
        for s in range(1, 7):
            with torch.no_grad():
                model.weight.add_(1.0)
            mgr.maybe_save(s, state)
    listed = asyncckpt.list_checkpoints(Tiers(fast, slow))
    assert [c.step for c in listed] == [6, 4]  # retention on every tier
    assert listed[0].is_latest and listed[0].tiers == [str(fast), str(slow)]
    assert [c.step for c in asyncckpt.list_checkpoints(slow)] == [6, 4]
    expect = model.weight.detach().clone()

    shutil.rmtree(fast)  # the node (and its local disk) is gone; the job restarts elsewhere
    other = torch.nn.Linear(64, 64)
    with asyncckpt.CheckpointManager(Tiers(fast, slow), signals=()) as mgr:
        assert mgr.restore({"model": other, "optim": torch.optim.SGD(other.parameters(), lr=0.1)}) == 6
    assert torch.equal(other.weight, expect)
