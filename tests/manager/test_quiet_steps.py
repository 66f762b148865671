"""The steps that do not save: ``maybe_save`` takes a short path on them, and still sees every change
a user can make between two calls (another object under a key, a bad state, a step that does not
increase, a pause file, a closed manager)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt.errors import BadInputError, CheckpointError


def _state(n: int = 16):  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(n, n)
    return {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.1), "epoch": 0}


def _train(model, opt) -> None:  # type: ignore[no-untyped-def]
    loss = model(torch.randn(4, model.in_features)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _warm(mgr, state, steps: range) -> None:  # type: ignore[no-untyped-def]
    """Quiet steps after a committed save: nothing in flight, the manager warm."""
    for s in steps:
        _train(state["model"], state["optim"])
        mgr.maybe_save(s, state)
    mgr.wait()


def test_an_object_swapped_in_between_saves_is_what_the_next_save_holds(tmp_path):
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=5, signals=()) as mgr:
        _warm(mgr, state, range(1, 8))
        model = torch.nn.Linear(16, 16)
        with torch.no_grad():
            model.weight.fill_(7.0)
        state["model"] = model  # same dict, same keys, another object
        state["optim"] = torch.optim.SGD(model.parameters(), lr=0.5)
        assert mgr.maybe_save(8, state) is None
        assert mgr.maybe_save(9, state) is None
        assert mgr.maybe_save(10, state) is not None
        mgr.wait()
    got = asyncckpt.load(tmp_path / "step-00000010")
    assert torch.equal(got["model"]["weight"], torch.full((16, 16), 7.0))
    assert got["optim"]["param_groups"][0]["lr"] == 0.5


def test_the_swapped_in_optimizer_makes_its_step_wait_for_the_snapshot(tmp_path):
    """The new optimizer is hooked at the quiet step that first sees it: its in-place step right
    after a save never leaks into that save."""
    state = _state(256)
    with asyncckpt.CheckpointManager(tmp_path, every_steps=3, signals=()) as mgr:
        _warm(mgr, state, range(1, 5))
        model = torch.nn.Linear(256, 256)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        state["model"], state["optim"] = model, opt
        mgr.maybe_save(5, state)
        before = model.weight.detach().clone()
        assert mgr.maybe_save(6, state) is not None
        _train(model, opt)  # in place, right after the save
        mgr.wait()
    got = asyncckpt.load(tmp_path / "step-00000006")
    assert torch.equal(got["model"]["weight"], before)
    assert not torch.equal(model.weight.detach(), before)


def test_bad_input_on_a_quiet_step_is_refused_at_that_step(tmp_path):
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=100, signals=()) as mgr:
        _warm(mgr, state, range(1, 4))
        with pytest.raises(BadInputError, match="mapping"):
            mgr.maybe_save(4, list(state.items()))  # type: ignore[arg-type]
        with pytest.raises(BadInputError, match="does not come after"):
            mgr.maybe_save(3, state)
        with pytest.raises(BadInputError, match="integer"):
            mgr.maybe_save(4.0, state)  # type: ignore[arg-type]
        state["epoch"] = object()  # the same keys, one value replaced in place
        with pytest.raises(BadInputError, match=r"state\['epoch'\]"):
            mgr.maybe_save(4, state)
        state["epoch"] = 0
        assert mgr.maybe_save(np.int64(5), state) is None  # NumPy integers are steps too
        assert mgr.last_step == 5
    with pytest.raises(CheckpointError, match="closed"):
        mgr.maybe_save(6, state)


def test_a_pause_file_written_between_quiet_steps_saves_and_stops(tmp_path):
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1000, signals=(), pause_check_s=0) as mgr:
        _warm(mgr, state, range(1, 6))
        asyncckpt.request_pause(tmp_path)
        _train(state["model"], state["optim"])
        assert mgr.maybe_save(6, state) is not None
        assert mgr.preempted
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [6]


def test_a_signal_between_quiet_steps_saves_at_the_next_step(tmp_path):
    import os
    import signal

    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1000, signals=(signal.SIGUSR1,)) as mgr:
        _warm(mgr, state, range(1, 6))
        os.kill(os.getpid(), signal.SIGUSR1)
        _train(state["model"], state["optim"])
        assert mgr.maybe_save(6, state) is not None
        assert mgr.preempted and mgr.preempt_reason == "SIGUSR1"
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [6]
