"""Preemption (SIGTERM) and cooperative pause (`asyncckpt pause`): save at the step boundary, exit 0, resume."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import asyncckpt
from asyncckpt.preemption import PAUSE_FILE
from tests.manager._proc import REPO, Job, env, run_job


def _run_until_stopped(tmp_path, stop) -> tuple[int, Job, float]:  # type: ignore[no-untyped-def]
    root = tmp_path / "ck"
    k = random.Random().randint(3, 12)
    job = Job("--root", str(root), "--total", "100000", "--every", "1000", "--sleep", "0.05", "--pause-check", "0.05")
    try:
        job.wait_for("START 0")
        job.wait_for(f"STEP {k}")
        t0 = time.monotonic()
        stop(job, root)
        line = job.wait_for("PREEMPTED", timeout=120)
        rc = job.finish(timeout=120)
        took = time.monotonic() - t0
    finally:
        job.kill()
    assert rc == 0, job.stderr()
    step = int(line.split()[1])
    assert step >= k
    return step, job, took


def _check_and_resume(tmp_path, step: int) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "ck"
    listed = asyncckpt.list_checkpoints(root)
    assert listed[0].step == step and listed[0].is_latest, listed
    assert not asyncckpt.listing.list_incomplete(root)
    state = asyncckpt.load(listed[0].path)
    assert state["__asyncckpt__"]["step"] == step
    assert state["sched"]["last_epoch"] == step  # the state is that of the step it stopped at
    again = run_job("--root", str(root), "--total", str(step + 2), "--every", "1000")
    assert f"START {step}" in again.seen
    assert f"STEP {step + 1}" in again.seen and f"STEP {step}" not in again.seen


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_exits_0_and_resumes(tmp_path):
    step, job, took = _run_until_stopped(tmp_path, lambda job, root: job.signal(signal.SIGTERM))
    assert f"PREEMPTED {step} SIGTERM" in job.seen
    print(f"SIGTERM -> exit 0 in {took:.2f} s, checkpoint at step {step}")
    _check_and_resume(tmp_path, step)


@pytest.mark.slow
def test_asyncckpt_pause_saves_exits_0_and_resumes(tmp_path):
    def pause(job, root):  # type: ignore[no-untyped-def]
        out = subprocess.run([sys.executable, "-m", "asyncckpt", "pause", str(root)], env=env(), cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "pause requested" in out.stdout

    step, job, took = _run_until_stopped(tmp_path, pause)
    assert f"PREEMPTED {step} pause" in job.seen
    assert not (tmp_path / "ck" / PAUSE_FILE).exists()  # the request is consumed
    print(f"asyncckpt pause -> exit 0 in {took:.2f} s, checkpoint at step {step}")
    _check_and_resume(tmp_path, step)


# -- in-process: handlers, chaining, a second signal, pause records --------------------------------
def _tiny():  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"model": model, "optim": opt}


def test_handlers_only_set_a_flag_chain_and_are_restored(tmp_path):
    heard = []

    def previous(signum, frame):  # type: ignore[no-untyped-def]
        heard.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        mgr = asyncckpt.CheckpointManager(tmp_path, every_steps=1000)
        try:
            assert signal.getsignal(signal.SIGUSR1) != previous
            os.kill(os.getpid(), signal.SIGUSR1)
            assert heard == [signal.SIGUSR1]  # chained to the previous handler
            assert not mgr.preempted  # nothing happens until the next maybe_save
            state = _tiny()
            assert mgr.maybe_save(7, state) is not None
            assert mgr.preempted and mgr.preempt_reason == "SIGUSR1"
            assert asyncckpt.list_checkpoints(tmp_path)[0].step == 7  # committed before maybe_save returned
            assert mgr.maybe_save(8, state) is None  # stopped: no more saves
        finally:
            mgr.close()
        assert signal.getsignal(signal.SIGUSR1) is previous  # restored on close
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_second_signal_during_the_final_save_does_not_abort_it(tmp_path):
    mgr = asyncckpt.CheckpointManager(tmp_path, every_steps=1000)
    real_save = mgr.ckpt.save
    calls = []

    def save_with_interruption(*a, **k):  # type: ignore[no-untyped-def]
        handle = real_save(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)  # the cluster insists while the save streams
        calls.append(handle)
        return handle

    mgr.ckpt.save = save_with_interruption  # type: ignore[method-assign]
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        mgr.maybe_save(3, _tiny())
        assert mgr.preempted and len(calls) == 1
        assert mgr._signals.count == 2
        assert calls[0].committed
        assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [3]
    finally:
        mgr.close()


def test_pause_request_record_and_stale_request_is_consumed_on_restore(tmp_path):
    asyncckpt.request_pause(tmp_path, reason="maintenance")
    rec = asyncckpt.preemption.read_pause(tmp_path)
    assert rec is not None and rec["reason"] == "maintenance"
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1000, pause_check_s=0) as mgr:
        assert mgr.restore(_tiny()) == 0  # a request found at start belongs to the previous run
        assert asyncckpt.preemption.read_pause(tmp_path) is None
        mgr.maybe_save(1, _tiny())
        assert not mgr.preempted
        asyncckpt.request_pause(tmp_path)
        mgr.maybe_save(2, _tiny())
        assert mgr.preempted and mgr.preempt_reason == "pause"
    assert asyncckpt.preemption.read_pause(tmp_path) is None
    assert asyncckpt.list_checkpoints(tmp_path)[0].step == 2


def test_pause_on_a_missing_root_is_refused(tmp_path):
    with pytest.raises(asyncckpt.BadInputError, match="does not exist"):
        asyncckpt.request_pause(tmp_path / "nothing-here")


def test_pause_check_is_rate_limited_by_the_injected_clock(tmp_path):
    now = [0.0]
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1000, pause_check_s=10, clock=lambda: now[0],
                                     signals=()) as mgr:
        state = _tiny()
        mgr.maybe_save(1, state)  # first check: nothing
        asyncckpt.request_pause(tmp_path)
        now[0] = 5.0
        mgr.maybe_save(2, state)
        assert not mgr.preempted  # not looked again yet
        now[0] = 10.0
        mgr.maybe_save(3, state)
        assert mgr.preempted
    assert asyncckpt.list_checkpoints(tmp_path)[0].step == 3
