"""How workers start (asyncckpt.runtime.launch), seen from a trainer script: forks of one warm
template that see the trainer as it is at that moment, or fresh spawns; nobody outlives the
trainer, and a lost template or worker never hangs or loses the trainer's saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = """
    import json, os, sys, time
    import torch, asyncckpt
    from asyncckpt import AsyncCallsQueue, AsyncRequest
    from tests._worker_fns import process_facts

    def facts(q):
        idx = q.schedule_async_request(AsyncRequest(process_facts, ("ASYNCCKPT_TEST_MARK",)))
        assert q.maybe_finalize_async_calls(blocking=True, no_dist=True) == [idx]
        return q.call_result(idx)

    def ppid(pid):
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
"""


def _run(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> dict:
    full = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    full.pop("ASYNCCKPT_TEST_MARK", None)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_PRELUDE) + textwrap.dedent(script), *args],
                         cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_later_workers_are_forks_of_one_template_and_see_the_trainer_as_it_is_now(tmp_path):
    got = _run("""
        os.umask(0o022)
        q1 = AsyncCallsQueue()
        first = facts(q1)
        os.environ["ASYNCCKPT_TEST_MARK"] = "set after the template started"
        os.chdir(sys.argv[1])
        os.umask(0o027)
        q2 = AsyncCallsQueue()
        second = facts(q2)
        out = {"trainer": os.getpid(), "first": first, "second": second, "template_parent": ppid(first["ppid"])}
        q1.close(); q2.close()
        print(json.dumps(out))
    """, str(tmp_path))
    first, second = got["first"], got["second"]
    assert first["pid"] != second["pid"]
    assert first["ppid"] == second["ppid"] != got["trainer"]  # both forked by the one template...
    assert got["template_parent"] == got["trainer"]  # ...which is the trainer's child
    assert first["env"] is None and first["umask"] == 0o022
    assert second["env"] == "set after the template started"
    assert second["cwd"] == str(tmp_path) and second["umask"] == 0o027


def test_spawn_mode_starts_each_worker_fresh_as_the_trainers_child():
    got = _run("""
        q = AsyncCallsQueue()
        print(json.dumps({"trainer": os.getpid(), "worker": facts(q)}))
        q.close()
    """, env={"ASYNCCKPT_WORKER_START": "spawn"})
    assert got["worker"]["ppid"] == got["trainer"]


def test_template_and_workers_leave_when_the_trainer_is_killed():
    script = textwrap.dedent(_PRELUDE) + textwrap.dedent("""
        q1, q2 = AsyncCallsQueue(), AsyncCallsQueue()
        a, b = facts(q1), facts(q2)
        print(json.dumps([a["pid"], b["pid"], a["ppid"]]), flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30  # liveness bound only
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        assert [p for p in pids if _alive(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_template_costs_no_save_and_the_next_worker_gets_a_new_one(tmp_path):
    got = _run("""
        ck = asyncckpt.AsyncCheckpointer()
        ck.save({"w": torch.ones(1000)}, sys.argv[1] + "/a")
        ck.finalize(blocking=True)
        q = ck.queue
        template = ppid(q.worker_pid)
        os.kill(template, 9)
        while os.path.exists(f"/proc/{template}") and open(f"/proc/{template}/stat").read().split(")")[1].split()[0] != "Z":
            time.sleep(0.01)
        ck.save({"w": torch.full((1000,), 2.0)}, sys.argv[1] + "/b")  # the same worker goes on
        ck.finalize(blocking=True)
        same = q.worker_pid
        ck.close()  # stops a worker whose template is gone: no hang, no error
        q2 = AsyncCallsQueue()
        new = facts(q2)
        q2.close()
        print(json.dumps({"template": template, "same": same, "new_parent": new["ppid"], "trainer": os.getpid()}))
    """, str(tmp_path))
    assert got["new_parent"] not in (got["template"], got["trainer"])  # a fresh template
    assert float(__import__("asyncckpt").load(tmp_path / "b")["w"][0]) == 2.0


def test_a_killed_forked_worker_is_reported_with_its_signal(tmp_path):
    got = _run("""
        from tests._worker_fns import sleep
        ck = asyncckpt.AsyncCheckpointer()
        ck.save({"w": torch.ones(1000)}, sys.argv[1] + "/a")
        ck.finalize(blocking=True)
        q = ck.queue
        q.schedule_async_request(AsyncRequest(sleep, (60,)))
        os.kill(q.worker_pid, 9)
        try:
            q.maybe_finalize_async_calls(blocking=True, no_dist=True)
            err = ""
        except asyncckpt.WorkerDiedError as exc:
            err = str(exc)
        ck.save({"w": torch.full((1000,), 3.0)}, sys.argv[1] + "/c")  # a fresh worker takes the next save
        ck.finalize(blocking=True)
        ck.close()
        print(json.dumps({"err": err}))
    """, str(tmp_path))
    assert "signal 9" in got["err"]
    assert float(__import__("asyncckpt").load(tmp_path / "c")["w"][0]) == 3.0
    assert (tmp_path / "a").exists()


def test_unknown_start_mode_warns_and_uses_the_template():
    got = _run("""
        import logging
        logging.basicConfig()
        q = AsyncCallsQueue()
        print(json.dumps({"trainer": os.getpid(), "worker": facts(q)}))
        q.close()
    """, env={"ASYNCCKPT_WORKER_START": "bogus"})
    assert got["worker"]["ppid"] != got["trainer"]
    assert "ASYNCCKPT_WORKER_START='bogus'" in got["stderr"] and "template or spawn" in got["stderr"]



def test_queues_left_open_at_exit_stop_their_forked_workers_without_a_kill():
    # At interpreter shutdown the thread that hears the template's exit reports no longer runs;
    # stopping a forked worker must still see it leave instead of waiting out its timeout and killing it.
    got = _run("""
        from tests._worker_fns import echo
        qs = [AsyncCallsQueue() for _ in range(2)]
        for q in qs:
            q.schedule_async_request(AsyncRequest(echo, (1,)))
            q.maybe_finalize_async_calls(blocking=True, no_dist=True)
        print(json.dumps({"pids": [q.worker_pid for q in qs]}))
    """)
    assert "did not stop" not in got["stderr"] and "killing it" not in got["stderr"]
    assert not any(_alive(p) for p in got["pids"])
