"""Run train_job.py (or the CLI) as a subprocess, read its lines, stop it by PID."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

JOB = Path(__file__).with_name("train_job.py")
REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.pop("ASYNCCKPT_LOG", None)
    return e


class Job:
    """A train_job.py process; lines of its stdout arrive on a queue (stderr is kept for messages)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(JOB), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env(), cwd=REPO,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._drain_err, daemon=True).start()

    @staticmethod
    def _pump(stream, q) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    def _drain_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        """The next line starting with ``prefix``; fails if the process ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {prefix!r} line within {timeout} s; saw {self.seen[-5:]}; stderr: {self.stderr()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(10)
                raise AssertionError(f"process ended (rc {self.proc.returncode}) before {prefix!r}; saw "
                                     f"{self.seen[-5:]}; stderr: {self.stderr()}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout)
        while True:  # collect what is left
            try:
                line = self.lines.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
        return rc

    def stderr(self) -> str:
        return "".join(self.err[-30:])

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def run_job(*args: str, timeout: float = 180.0) -> Job:
    job = Job(*args)
    try:
        rc = job.finish(timeout)
    except BaseException:
        job.kill()
        raise
    assert rc == 0, f"train_job {args} exited {rc}: {job.stderr()}"
    return job
