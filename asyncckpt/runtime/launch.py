"""How a worker process comes to life: forked from a warm template, or spawned fresh.

A fresh worker pays for ``import torch`` and the engine (1-3 s of CPU) before it can take its
first frame. So the first worker a trainer process starts also starts a *template*: a small
process that imports all of that once and then only forks. Every later worker of this trainer
(a second checkpointer, a restarted worker, a ``TorchAsyncCheckpoint`` beside a manager) is a
fork of it and is ready in milliseconds.

The template is single-threaded Python that never touched CUDA or ran a tensor op, so a fork of
it is as safe as a fresh interpreter. Each fork takes the trainer's environment, working
directory and umask *at that moment*. The template exits when its trainer does (its control
socket closes, or it is re-parented); its workers exit on their own as before (their pipe closes,
or they are re-parented).

``ASYNCCKPT_WORKER_START=spawn`` turns the template off: every worker is a fresh
``subprocess`` (as on platforms without ``fork``).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Protocol

__all__ = ["START_ENV", "WorkerProcess", "launch_worker", "template_main"]

log = logging.getLogger("asyncckpt")

#: Environment variable choosing how workers start: ``template`` (default where ``fork`` exists) or ``spawn``.
START_ENV = "ASYNCCKPT_WORKER_START"

_WORKER_BOOT = (
    "import json, os, sys; sys.path[:0] = json.loads(os.environ.pop('ASYNCCKPT_WORKER_PATH', '[]')); "
    "from asyncckpt.runtime.server import main; main()"
)
_TEMPLATE_BOOT = (
    "import json, os, sys; sys.path[:0] = json.loads(os.environ.pop('ASYNCCKPT_WORKER_PATH', '[]')); "
    "from asyncckpt.runtime.launch import template_main; template_main()"
)


class WorkerProcess(Protocol):
    """What the trainer needs of a worker process (``subprocess.Popen`` is one)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


def launch_worker(fd: int, env: dict[str, str]) -> WorkerProcess:
    """Start a worker that talks over socket ``fd`` (the trainer closes its copy afterwards)."""
    how = os.environ.get(START_ENV, "template").strip().lower() or "template"
    if how not in ("template", "spawn"):
        log.warning("asyncckpt: ignoring %s=%r (use template or spawn)", START_ENV, how)
        how = "template"
    if how == "template" and hasattr(os, "fork") and hasattr(socket, "send_fds"):
        tmpl = _template(env)
        if tmpl is not None:
            return tmpl.fork(fd, env)
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER_BOOT, str(fd), str(os.getpid())],
        pass_fds=(fd,), stdin=subprocess.DEVNULL, env=env, close_fds=True,
    )


# -- the trainer's side ----------------------------------------------------------------------------------------

_lock = threading.Lock()
_current: _Template | None = None


def _template(env: dict[str, str]) -> _Template | None:
    """This process's template, started on first use (None if it cannot start: spawn instead)."""
    global _current
    with _lock:
        if _current is None or _current.dead:
            try:
                _current = _Template(env)
            except OSError as exc:
                log.warning("asyncckpt: cannot start the worker template (%s); spawning workers fresh", exc)
                return None
        return _current


class _Template:
    """The template process seen from the trainer: fork requests out, pids and exit codes back."""

    def __init__(self, env: dict[str, str]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tenv = dict(env, ASYNCCKPT_ROLE="template")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _TEMPLATE_BOOT, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=tenv, close_fds=True,
            )
        finally:
            theirs.close()
        self.sock = mine
        self.dead = False
        self.cond = threading.Condition()
        self.pending: deque[ForkedWorker] = deque()  # fork requests not yet answered, in order
        self.exits: dict[int, int] = {}
        self.send_lock = threading.Lock()
        self.rx = threading.Thread(target=self._receive, name="asyncckpt-template-rx", daemon=True)
        self.rx.start()

    def fork(self, fd: int, env: dict[str, str]) -> ForkedWorker:
        req = {"env": env, "cwd": os.getcwd(), "umask": _umask(), "trainer": os.getpid()}
        w = ForkedWorker(self)
        with self.send_lock:
            with self.cond:
                if self.dead:
                    raise OSError("the asyncckpt worker template is gone")
                self.pending.append(w)
            try:
                socket.send_fds(self.sock, [pickle.dumps(req)], [fd])
            except OSError:
                self._gone()
                raise
        return w

    def _receive(self) -> None:
        while True:
            try:
                msg = self.sock.recv(1 << 16)
            except OSError:
                msg = b""
            if not msg:
                self._gone()
                return
            m = pickle.loads(msg)
            with self.cond:
                if m["op"] == "exit":
                    self.exits[m["pid"]] = m["code"]
                elif self.pending:
                    w = self.pending.popleft()
                    w.resolved(m.get("pid"), m.get("error"))
                self.cond.notify_all()

    def _gone(self) -> None:
        with self.cond:
            self.dead = True
            while self.pending:
                self.pending.popleft().resolved(None, "the worker template exited")
            self.cond.notify_all()

    def forget(self) -> None:
        """In a forked child of the trainer: the template is the parent's; drop our copy of its socket."""
        self.dead = True
        try:
            self.sock.close()
        except OSError:
            pass


class ForkedWorker:
    """A worker forked by the template: ``subprocess.Popen``'s ``pid``/``poll``/``wait``/``kill``."""

    def __init__(self, template: _Template) -> None:
        self._t = template
        self._pid: int | None = None
        self._error: str | None = None
        self._known = False
        self.returncode: int | None = None

    def resolved(self, pid: int | None, error: str | None) -> None:  # under the template's condition
        self._pid, self._error, self._known = pid, error, True

    def _wait_known(self, timeout: float | None) -> bool:
        with self._t.cond:
            return self._t.cond.wait_for(lambda: self._known, timeout)

    @property
    def pid(self) -> int:
        """The worker's pid (waits while the template is still starting)."""
        self._wait_known(None)
        return self._pid if self._pid is not None else -1

    def _code(self) -> int | None:  # under the template's condition
        if self.returncode is None and self._known:
            if self._pid is None:
                self.returncode = 255  # never started: the template failed or exited
            elif self._pid in self._t.exits:
                self.returncode = self._t.exits.pop(self._pid)
            elif self._t.dead and not _alive(self._pid):
                self.returncode = 255  # its template is gone, so nobody can tell how it ended
        return self.returncode

    def poll(self) -> int | None:
        with self._t.cond:
            if not self._known and self._t.dead:
                return 255
            return self._code()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        gone_since: float | None = None
        while True:
            with self._t.cond:
                code = self._code()
                if code is None:
                    self._t.cond.wait(0.05)
                    code = self._code()
                if code is not None:
                    return code
                pid = self._pid if self._known else None
            now = time.monotonic()
            if pid is not None and not _alive(pid):
                # Exited, but its template has not said how: the template is gone, or this interpreter
                # is shutting down and the thread that would hear it no longer runs. Do not wait forever.
                gone_since = now if gone_since is None else gone_since
                if now - gone_since > 0.5:
                    self.returncode = 255
                    return 255
            if deadline is not None and now >= deadline:
                raise subprocess.TimeoutExpired(f"asyncckpt worker {self._pid}", timeout or 0.0)

    def kill(self) -> None:
        if not self._wait_known(30) or self._pid is None or self.poll() is not None:
            return
        try:
            os.kill(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _umask() -> int:
    """This process's umask, read without setting it (setting it, even back, races other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o22)  # no /proc: the only other way
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _after_fork_in_child() -> None:
    global _current
    if _current is not None:
        _current.forget()
        _current = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the template process --------------------------------------------------------------------------------------


def template_main() -> None:
    """Template entry point: ``python -c '...template_main()' CTL_FD TRAINER_PID``."""
    ctl_fd, trainer = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the trainer decides
    sock = socket.socket(fileno=ctl_fd)
    from . import server  # the expensive part, paid once: torch, the engine, the sinks, storage

    server.warm_imports()
    me = os.getpid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def send(msg: dict[str, Any]) -> None:
        try:
            sock.send(pickle.dumps(msg))
        except OSError:
            os._exit(0)  # the trainer is gone

    while True:
        ready = select.select([ctl_fd, wake_r], [], [], 1.0)[0]
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            send({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})
        if os.getppid() != trainer:
            os._exit(0)
        if ctl_fd not in ready:
            continue
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 4)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)
        req = pickle.loads(msg)
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            send({"op": "forked", "error": f"fork failed: {exc}"})
            continue
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (wake_r, wake_w):
                os.close(fd)
            sock.close()
            _run_forked_worker(req, fds[0], me)
        for fd in fds:
            os.close(fd)
        send({"op": "forked", "pid": pid})


def _run_forked_worker(req: dict[str, Any], fd: int, template: int) -> None:
    """In the fresh fork: become the worker the trainer asked for, as a spawned one would be."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(req["env"])
        try:
            os.chdir(req["cwd"])
        except OSError:
            pass
        os.umask(req["umask"])
        os.environ.pop("ASYNCCKPT_WORKER_PATH", None)  # the HELLO frame carries the trainer's sys.path
        from .. import logs

        logs.disable_logging()  # the template's setting was its start's; the trainer's now decides
        logs.configure_from_env()
        from . import server

        sys.argv = ["-c", str(fd), str(req["trainer"])]
        server.main(expected_parent=template)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and leave; the trainer sees the pipe close
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

