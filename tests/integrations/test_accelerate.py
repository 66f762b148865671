"""Accelerate: CheckpointManager over what accelerator.prepare returns, killed and resumed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import asyncckpt

from .conftest import assert_same, run_script

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'asyncckpt[accelerate]')")


def test_sigkill_then_restore_matches_the_uninterrupted_loop(tmp_path: Path) -> None:
    run_script("accelerate_train.py", str(tmp_path / "ref"), "--no-ckpt")
    out = tmp_path / "async"
    run_script("accelerate_train.py", str(out), "--kill-at", "9", expect_kill=True)
    committed = [i.step for i in asyncckpt.list_checkpoints(str(out / "ckpts"))]
    assert committed and set(committed) <= {4, 8}
    run_script("accelerate_train.py", str(out))  # restores the newest committed step, trains to 12
    assert_same(torch.load(out / "final.pt", weights_only=False), torch.load(tmp_path / "ref" / "final.pt", weights_only=False), "final")
    assert sorted(i.step for i in asyncckpt.list_checkpoints(str(out / "ckpts"))) == [8, 12]  # keep_last=2


def test_prepared_objects_go_straight_into_the_manager(tmp_path: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    mgr = asyncckpt.CheckpointManager(tmp_path, signals=None)
    try:
        mgr.save(1, {"model": model, "optim": opt}, block=True)
        expected = copy.deepcopy({"model": model.state_dict(), "optim": opt.state_dict()})
        with torch.no_grad():
            model.weight.zero_()
        opt.state[next(iter(opt.state))]["momentum_buffer"].zero_()
        assert mgr.restore({"model": model, "optim": opt}) == 1
        assert_same(model.state_dict(), expected["model"], "model")
        assert_same(opt.state_dict(), expected["optim"], "optim")
    finally:
        mgr.close()
