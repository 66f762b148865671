"""AsyncCallsQueue / AsyncRequest: ordering, finalize semantics, errors, worker reuse."""

from __future__ import annotations

import time

import pytest

import asyncckpt
from asyncckpt import AsyncCallsQueue, AsyncRequest

from . import _worker_fns as fns


@pytest.fixture(scope="module")
def q():
    queue = AsyncCallsQueue()
    yield queue
    queue.close(abort=True)


def test_requests_finish_and_finalize_in_order_once_each(q, tmp_path):
    out = tmp_path / "log.txt"
    calls: list[int] = []
    idxs = []
    for i, delay in enumerate([0.3, 0.0, 0.1]):
        req = AsyncRequest(fns.append_line, (str(out), f"r{i}", delay), finalize_fns=[lambda i=i: calls.append(i)])
        idxs.append(q.schedule_async_request(req))
    assert idxs == sorted(idxs) and len(set(idxs)) == 3
    assert q.get_num_unfinalized_calls() == 3
    done = q.maybe_finalize_async_calls(blocking=True, no_dist=True)
    assert done == idxs
    assert calls == [0, 1, 2]
    assert out.read_text().splitlines() == ["r0", "r1", "r2"]  # executed in order, not by delay
    assert q.get_num_unfinalized_calls() == 0
    assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == []


def test_non_blocking_finalize_returns_only_finished(q, tmp_path):
    idx = q.schedule_async_request(AsyncRequest(fns.sleep, (0.5,)))
    assert q.maybe_finalize_async_calls(blocking=False, no_dist=True) == []
    deadline = time.monotonic() + 20
    done: list[int] = []
    while not done and time.monotonic() < deadline:
        done = q.maybe_finalize_async_calls(blocking=False, no_dist=True)
        time.sleep(0.05)
    assert done == [idx]
    assert q.call_result(idx) == 0.5


def test_async_def_and_preload_fn(q, tmp_path):
    out = tmp_path / "a.txt"
    q.schedule_async_request(AsyncRequest(fns.async_append, (str(out), "x")))
    q.schedule_async_request(AsyncRequest(fns.echo, (21,), preload_fn=fns.preload_double))
    done = q.maybe_finalize_async_calls(blocking=True, no_dist=True)
    assert out.read_text() == "x\n"
    assert q.call_result(done[-1]) == 42  # async_fn got preload_fn's result


def test_error_in_worker_reaches_finalize_with_traceback_and_worker_survives(q, tmp_path):
    pid = q.worker_pid
    ran = []
    q.schedule_async_request(AsyncRequest(fns.fail, ("boom in worker",), finalize_fns=[lambda: ran.append(1)]))
    ok = q.schedule_async_request(AsyncRequest(fns.echo, ("after",)))
    with pytest.raises(asyncckpt.WorkerError, match="boom in worker") as ei:
        q.maybe_finalize_async_calls(blocking=True, no_dist=True)
    msg = str(ei.value)
    assert "_worker_fns.py" in msg and "in fail" in msg and len(msg.splitlines()) == 1  # one frame line
    assert "Traceback (most recent call last)" in ei.value.worker_traceback  # the whole traceback, kept aside
    assert isinstance(ei.value.worker_exception, RuntimeError)
    assert ran == []  # a failed request's finalize callbacks never run
    assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [ok]
    assert q.worker_pid == pid  # the same persistent worker served all of it


def test_worker_is_persistent_across_requests(q):
    pids = set()
    for _ in range(3):
        idx = q.schedule_async_request(AsyncRequest(fns.worker_pid))
        q.maybe_finalize_async_calls(blocking=True, no_dist=True)
        pids.add(q.call_result(idx))
    assert pids == {q.worker_pid}


def test_worker_exit_raises_worker_died_and_a_fresh_worker_serves_the_next(tmp_path):
    queue = AsyncCallsQueue()
    try:
        queue.schedule_async_request(AsyncRequest(fns.echo, (0,)))
        queue.maybe_finalize_async_calls(blocking=True, no_dist=True)  # the worker is up (start-up not timed)
        queue.schedule_async_request(AsyncRequest(fns.die))
        t0 = time.monotonic()
        with pytest.raises(asyncckpt.WorkerDiedError, match="died"):
            queue.maybe_finalize_async_calls(blocking=True, no_dist=True)
        assert time.monotonic() - t0 < 5
        idx = queue.schedule_async_request(AsyncRequest(fns.echo, (1,)))
        assert queue.maybe_finalize_async_calls(blocking=True, no_dist=True) == [idx]
        assert queue.worker_generation == 2
    finally:
        queue.close(abort=True)


def test_closed_queue_refuses_new_requests():
    queue = AsyncCallsQueue()
    queue.close()
    with pytest.raises(asyncckpt.CheckpointError, match="closed"):
        queue.schedule_async_request(AsyncRequest(fns.echo, (1,)))
