"""``AsyncCheckpointer.warm_up(wait=True)``: the worker's start happens before the loop, not in it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt.errors import CheckpointError, WorkerDiedError


def populated_mappings(pid: int, nbytes: int) -> int:
    """Anonymous mappings of ``pid`` (no file behind them, or ``/dev/zero``) of ``nbytes`` to
    ``nbytes`` + 1 MiB, at least ``nbytes`` of them resident: staging slots for ``nbytes``."""
    count, size, anon = 0, 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line: address range ... [path]
                path = head[5].strip() if len(head) > 5 else ""
                anon = path == "" or path.startswith("/dev/zero")
            elif head[0] == "Size:":
                size = int(head[1]) * 1024
            elif head[0] == "Rss:":
                count += anon and nbytes <= size < nbytes + (1 << 20) and int(head[1]) * 1024 >= nbytes
    return count


def test_warm_up_with_wait_returns_once_the_worker_holds_its_staging(tmp_path: Path) -> None:
    nbytes = 37 << 20  # a size no other mapping of the worker has
    state = {"w": torch.randn(nbytes // 4), "step": 3}
    with asyncckpt.AsyncCheckpointer(max_in_flight=2) as ck:
        ck.warm_up(state, wait=True)  # the worker is still importing torch when the constructor returns
        pid = ck.queue.worker_pid
        assert pid is not None
        assert populated_mappings(pid, nbytes) == 2, "warm_up(wait=True) returned before the staging slots were made"
        ck.save(state, tmp_path / "c")
        ck.finalize(blocking=True)
    out = asyncckpt.load(tmp_path / "c")
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3


def test_warm_up_with_wait_and_no_state_waits_for_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = tmp_path / "started"
    monkeypatch.setenv("ASYNCCKPT_TEST_STARTED", str(started))
    with asyncckpt.AsyncCheckpointer(worker_options={"preload": ["tests._slow_start"]}) as ck:
        ck.warm_up(wait=True)
        assert started.exists(), "warm_up(wait=True) returned before the worker had started"
        assert int(started.read_text()) == ck.queue.worker_pid


def test_warm_up_with_wait_raises_when_the_worker_cannot_start() -> None:
    with asyncckpt.AsyncCheckpointer(worker_options={"preload": ["asyncckpt_test_no_such_module"]}) as ck:
        with pytest.raises(WorkerDiedError, match="could not start"):
            ck.warm_up({"w": torch.zeros(8)}, wait=True, timeout=120)


def test_warm_up_that_times_out_says_so_and_saves_still_work(tmp_path: Path) -> None:
    state = {"w": torch.arange(10.0)}
    with asyncckpt.AsyncCheckpointer() as ck:
        with pytest.raises(CheckpointError, match="not ready within"):
            ck.warm_up(state, wait=True, timeout=0.001)  # a worker takes far longer to start
        ck.save(state, tmp_path / "c")
        ck.finalize(blocking=True)
    assert torch.equal(asyncckpt.load(tmp_path / "c")["w"], state["w"])
