"""``CheckpointManager.warm_up``: before the loop, so no save in it waits for the worker's start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import asyncckpt


def test_manager_warm_up_waits_for_the_worker_and_saves_stay_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = tmp_path / "started"
    monkeypatch.setenv("ASYNCCKPT_TEST_STARTED", str(started))  # written by the worker at its start, 0.5 s in
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optim": opt}
    options = {"worker_options": {"preload": ["tests._slow_start"]}}
    with asyncckpt.CheckpointManager(tmp_path / "ck", every_steps=2, keep_last=2, signals=(), checkpointer_options=options) as mgr:
        mgr.warm_up(state)
        assert started.exists(), "warm_up returned before the worker had started"
        for step in range(1, 5):
            model(torch.randn(2, 256)).sum().backward()
            opt.step()
            mgr.maybe_save(step, state)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
    out = asyncckpt.load(mgr.path_for(4))
    assert all(torch.equal(out["model"][k], v) for k, v in expected.items())
