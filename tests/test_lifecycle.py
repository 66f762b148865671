"""Invariant 6: no orphans, no hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

import asyncckpt


def _wait_gone(pid: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still alive after {timeout} s")


@pytest.mark.fault
def test_worker_sigkill_mid_save_raises_worker_died_then_fresh_worker_saves(tmp_path):
    state = {"w": torch.randn(16 << 20)}  # 64 MiB, so the kill lands mid-save
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"w": torch.ones(3)}, tmp_path / "good")
        ck.finalize(blocking=True)
        old_pid = ck.queue.worker_pid
        ck.save(state, tmp_path / "torn")
        os.kill(old_pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(asyncckpt.WorkerDiedError, match=f"pid {old_pid}"):
            ck.finalize(blocking=True)
        assert time.monotonic() - t0 < 5
        assert ck.in_flight == 0
        ck.save(state, tmp_path / "next")
        ck.finalize(blocking=True)
        assert ck.queue.worker_pid != old_pid
    assert torch.equal(asyncckpt.load(tmp_path / "next")["w"], state["w"])
    assert torch.equal(asyncckpt.load(tmp_path / "good")["w"], torch.ones(3))
    with pytest.raises(asyncckpt.CheckpointNotFoundError):
        asyncckpt.load(tmp_path / "torn")


@pytest.mark.fault
def test_worker_death_is_reported_by_non_blocking_finalize_too(tmp_path):
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"w": torch.randn(4 << 20)}, tmp_path / "a")
        ck.queue.kill_worker()
        deadline = time.monotonic() + 5
        with pytest.raises(asyncckpt.WorkerDiedError):
            while time.monotonic() < deadline:
                ck.finalize(blocking=False)
                time.sleep(0.02)


_TRAINER = textwrap.dedent(
    """
    import sys, time, torch, asyncckpt
    root = sys.argv[1]
    ck = asyncckpt.AsyncCheckpointer()
    ck.save({"w": torch.full((1000,), 7.0), "step": 1}, root + "/step-1", step=1)
    ck.finalize(blocking=True)
    ck.save({"w": torch.randn(32 << 20), "step": 2}, root + "/step-2", step=2)
    print(ck.queue.worker_pid, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.fault
def test_trainer_sigkill_leaves_no_worker_and_previous_checkpoint_loads(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(proc.stdout.readline())
        assert psutil.pid_exists(worker_pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        took = _wait_gone(worker_pid, 10.0)
        assert took < 10.0  # liveness (the worker notices the closed pipe at once), generous for a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
    out = asyncckpt.load(tmp_path / "step-1")
    assert out["step"] == 1 and torch.equal(out["w"], torch.full((1000,), 7.0))
    complete = sorted(c.name for c in _list(tmp_path) if c.complete)
    # step-2 was in flight. Whether the worker finished it depends on when the kill came: a single-rank
    # save whose snapshot the trainer had already confirmed commits on the worker alone (a slow
    # machine got that far). Either way nothing is torn: it is absent, or complete and whole.
    assert complete in (["step-1"], ["step-1", "step-2"])
    if "step-2" in complete:
        two = asyncckpt.load(tmp_path / "step-2")
        assert two["step"] == 2 and two["w"].shape == (32 << 20,)


def test_close_stops_the_worker_cleanly(tmp_path):
    ck = asyncckpt.AsyncCheckpointer()
    ck.save({"w": torch.randn(1 << 20)}, tmp_path / "a")
    pid = ck.queue.worker_pid
    ck.close()  # blocking finalize first: the save is committed
    assert asyncckpt.load(tmp_path / "a")["w"].numel() == 1 << 20
    p = psutil.Process(pid) if psutil.pid_exists(pid) else None
    assert p is None or p.status() == psutil.STATUS_ZOMBIE or not p.is_running()
    with pytest.raises(asyncckpt.CheckpointError, match="closed"):
        ck.save({"w": torch.ones(1)}, tmp_path / "b")


def _list(root):
    from asyncckpt._loop import run_sync
    from asyncckpt.catalog import list_all
    from asyncckpt.storage import open_storage

    return run_sync(list_all(open_storage(str(root))))


def _hang_local_writes():
    """Installed in the worker: every pwrite of a LocalStorage writer blocks for a long time."""
    import time as _t

    from asyncckpt.storage import local

    def stuck(self, fd, data, offset):
        _t.sleep(30)

    local._LocalWriter._pwrite = stuck


@pytest.mark.fault
def test_hung_storage_becomes_a_timeout_error_not_a_hang(tmp_path):
    from asyncckpt import AsyncRequest

    with asyncckpt.AsyncCheckpointer(timeout_s=1.0) as ck:
        ck.save({"w": torch.ones(3)}, tmp_path / "ok")
        ck.finalize(blocking=True)
        ck.queue.schedule_async_request(AsyncRequest(_hang_local_writes))
        ck.queue.maybe_finalize_async_calls(blocking=True, no_dist=True)
        ck.save({"w": torch.randn(1 << 20)}, tmp_path / "hung")
        t0 = time.monotonic()
        with pytest.raises(asyncckpt.StorageTimeoutError, match=r"did not finish within 1\.0 s"):
            ck.finalize(blocking=True)
        assert time.monotonic() - t0 < 10
        ck.queue.kill_worker()  # its I/O threads are stuck for good; a fresh worker takes over
        ck.save({"w": torch.ones(5)}, tmp_path / "after")
        ck.finalize(blocking=True)
    assert torch.equal(asyncckpt.load(tmp_path / "after")["w"], torch.ones(5))
    assert torch.equal(asyncckpt.load(tmp_path / "ok")["w"], torch.ones(3))
