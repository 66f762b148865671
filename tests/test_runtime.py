"""The worker runtime from the user's side: requests that cannot run, forks, daemonic ranks, exits."""

from __future__ import annotations

import functools
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCallsQueue, AsyncRequest

from . import _worker_fns as fns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_function_defined_in_main_fails_clearly_and_never_hangs():
    script = """
        import time, asyncckpt
        from asyncckpt import AsyncCallsQueue, AsyncRequest

        def mine(x):  # lives in __main__: the worker cannot import it
            return x

        q = AsyncCallsQueue()
        q.schedule_async_request(AsyncRequest(mine, (1,)))
        t0 = time.monotonic()
        q.wait_snapshot(timeout=30)
        try:
            q.maybe_finalize_async_calls(blocking=True, no_dist=True)
        except asyncckpt.WorkerError as exc:
            print("ERROR", round(time.monotonic() - t0, 1), exc)
        from tests._worker_fns import echo
        idx = q.schedule_async_request(AsyncRequest(echo, ("next",)))
        print("NEXT", q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [idx], q.call_result(idx))
        q.close()
    """
    out = _run(script)
    assert out.returncode == 0, out.stderr
    err = next(line for line in out.stdout.splitlines() if line.startswith("ERROR"))
    # a liveness bound, not a speed goal: without the error frame this waited forever (the worker's start,
    # spawn + import torch, is most of the time and takes seconds on a loaded 2-core machine)
    assert float(err.split()[1]) < 60
    assert "cannot unpickle request" in err and "__main__" in err
    assert "NEXT True next" in out.stdout


def test_an_unpicklable_argument_fails_at_finalize_and_the_queue_goes_on():
    q = AsyncCallsQueue()
    try:
        q.schedule_async_request(AsyncRequest(fns.echo, (lambda: 1,)))
        q.wait_snapshot(timeout=5)
        with pytest.raises(asyncckpt.WorkerError, match="cannot be sent to the asyncckpt worker"):
            q.maybe_finalize_async_calls(blocking=True, no_dist=True)
        idx = q.schedule_async_request(AsyncRequest(fns.echo, (3,)))
        assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [idx]
    finally:
        q.close()


def test_nvrx_preload_contract_returns_after_the_preload(tmp_path):
    t = torch.arange(1 << 20, dtype=torch.float32)
    q = AsyncCallsQueue(True, True, 10, None, 30.0, False)  # NVRx's positional arguments
    try:
        for i in range(5):
            path = str(tmp_path / f"t{i}.pt")
            req = AsyncRequest(fns.save_second, (path, None), [], preload_fn=functools.partial(fns.clone, t))
            q.schedule_async_request(req)  # returns once preload_fn ran in the worker
            t.mul_(0)  # so this cannot reach the file
            q.maybe_finalize_async_calls(blocking=True, no_dist=True)
            assert torch.equal(torch.load(path), torch.arange(1 << 20, dtype=torch.float32) * (0 if i else 1))
    finally:
        q.close(False)


def test_async_request_is_nvrx_namedtuple():
    done: list[int] = []
    req = AsyncRequest(fns.echo, (1,), [lambda: done.append(1)])
    fn, args, _finalize_fns, kwargs, preload, frozen, idx = req
    assert (fn, args, kwargs, preload, frozen, idx) == (fns.echo, (1,), None, None, False, 0)
    frozen_req = req.freeze()
    assert frozen_req.is_frozen and frozen_req._replace(call_idx=3).call_idx == 3
    with pytest.raises(RuntimeError, match="frozen"):
        frozen_req.add_finalize_fn(lambda: None)
    req.execute_sync()  # preload, async_fn, (barrier), finalize callbacks, all here
    assert done == [1]
    assert AsyncRequest(fns.echo, (1,)).finalize_fns is not AsyncRequest(fns.echo, (2,)).finalize_fns


def test_async_fn_none_is_a_no_op_finalized_in_order():
    q = AsyncCallsQueue()
    try:
        ran: list[str] = []
        a = q.schedule_async_request(AsyncRequest(None, (), [lambda: ran.append("none")]))
        b = q.schedule_async_request(AsyncRequest(fns.echo, (2,), [lambda: ran.append("echo")]))
        assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [a, b]
        assert ran == ["none", "echo"]
    finally:
        q.close()


def _child_saves(root: str, conn) -> None:
    try:
        with asyncckpt.AsyncCheckpointer() as ck:
            ck.save({"w": torch.full((1 << 18,), 3.0)}, os.path.join(root, "child"))
        conn.send("ok")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(f"{type(exc).__name__}: {exc}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_worker(tmp_path):
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"w": torch.ones(1 << 18)}, tmp_path / "parent")
        ck.finalize(blocking=True)
        parent_worker = ck.queue.worker_pid
        ctx = multiprocessing.get_context("fork")
        a, b = ctx.Pipe()
        p = ctx.Process(target=_child_saves, args=(str(tmp_path), b))
        p.start()
        assert a.poll(60), "the forked child hung"
        assert a.recv() == "ok"
        p.join(30)
        ck.save({"w": torch.zeros(1 << 18)}, tmp_path / "parent2")  # the parent's worker is untouched
        ck.finalize(blocking=True)
        assert ck.queue.worker_pid == parent_worker
    assert torch.equal(asyncckpt.load(tmp_path / "child")["w"], torch.full((1 << 18,), 3.0))
    assert torch.equal(asyncckpt.load(tmp_path / "parent2")["w"], torch.zeros(1 << 18))


def _child_finalizes_inherited(ck, conn) -> None:  # type: ignore[no-untyped-def]
    try:
        done = ck.finalize(blocking=True)  # the parent's save is not this process's to finish
        conn.send(("ok", len(done), ck.queue.get_num_unfinalized_calls()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send((f"{type(exc).__name__}: {exc}", -1, -1))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_leaves_the_parents_pending_saves_alone(tmp_path):
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"w": torch.ones(1 << 10)}, tmp_path / "pending")  # not finalized yet
        ctx = multiprocessing.get_context("fork")
        a, b = ctx.Pipe()
        p = ctx.Process(target=_child_finalizes_inherited, args=(ck, b))
        p.start()
        assert a.poll(60), "the forked child hung"
        assert a.recv() == ("ok", 0, 0)
        p.join(30)
        assert [h.name for h in ck.finalize(blocking=True)] == ["pending"]
    assert torch.equal(asyncckpt.load(tmp_path / "pending")["w"], torch.ones(1 << 10))


def test_a_daemonic_process_can_save(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_child_saves, args=(str(tmp_path), b), daemon=True)
    p.start()
    assert a.poll(120), "the daemonic child hung"
    assert a.recv() == "ok"
    p.join(30)
    assert torch.equal(asyncckpt.load(tmp_path / "child")["w"], torch.full((1 << 18,), 3.0))


def test_a_script_that_saves_and_just_returns_leaves_a_committed_checkpoint(tmp_path):
    script = """
        import sys, torch, asyncckpt

        def main(root):
            ck = asyncckpt.AsyncCheckpointer()
            ck.save({"w": torch.full((4 << 20,), 5.0), "step": 7}, root + "/final", step=7)
            tac = asyncckpt.TorchAsyncCheckpoint()
            tac.async_save({"w": torch.full((4 << 20,), 6.0)}, root + "/final.pt")
            # no close(), no finalize(): main returns and the interpreter exits

        main(sys.argv[1])
    """
    out = _run(script, str(tmp_path))
    assert out.returncode == 0, out.stderr
    got = asyncckpt.load(tmp_path / "final")
    assert got["step"] == 7 and torch.equal(got["w"], torch.full((4 << 20,), 5.0))
    assert torch.equal(torch.load(tmp_path / "final.pt")["w"], torch.full((4 << 20,), 6.0))


def test_pending_saves_are_finished_before_exit_hooks_registered_before_the_first_save(tmp_path):
    """A framework registers its own exit hook (Lightning: destroy_process_group) when it sets up the process
    group, after importing asyncckpt and before the first save; asyncckpt's finish must run before it."""
    script = """
        import atexit, sys, torch, asyncckpt
        ck = asyncckpt.AsyncCheckpointer(snapshot="lazy")

        def framework_teardown():
            print("unfinalized at the framework's hook:", ck.queue.get_num_unfinalized_calls(), flush=True)

        atexit.register(framework_teardown)
        ck.save({"w": torch.full((4 << 20,), 5.0)}, sys.argv[1] + "/final")
    """
    out = _run(script, str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "unfinalized at the framework's hook: 0" in out.stdout, out.stdout + out.stderr
    assert torch.equal(asyncckpt.load(tmp_path / "final")["w"], torch.full((4 << 20,), 5.0))


def test_finish_at_exit_false_opts_out(tmp_path):
    script = """
        import sys, torch, asyncckpt
        ck = asyncckpt.AsyncCheckpointer(finish_at_exit=False, snapshot="lazy")
        ck.save({"w": torch.full((16 << 20,), 5.0)}, sys.argv[1] + "/dropped")
    """
    out = _run(script, str(tmp_path))
    assert out.returncode == 0, out.stderr
    with pytest.raises(asyncckpt.CheckpointNotFoundError):
        asyncckpt.load(tmp_path / "dropped")


def test_a_with_block_that_raises_keeps_the_saves_whose_snapshot_was_taken(tmp_path):
    w = torch.full((4 << 20,), 1.0)
    with pytest.raises(RuntimeError, match="training blew up"), asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"w": w}, tmp_path / "kept")  # "auto" without hooks: returns with the copy taken
        w.fill_(2.0)
        raise RuntimeError("training blew up")
    assert torch.equal(asyncckpt.load(tmp_path / "kept")["w"], torch.full((4 << 20,), 1.0))


def test_worker_never_outlives_its_trainer_started_without_multiprocessing():
    script = """
        import time, torch, asyncckpt
        ck = asyncckpt.AsyncCheckpointer()
        print(ck.queue.worker_pid, flush=True)
        time.sleep(60)
    """
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())  # type: ignore[union-attr]
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30  # liveness: a worker still importing torch on a loaded machine notices late
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.05)
        assert not _alive(worker)
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
