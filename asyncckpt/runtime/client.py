"""The worker seen from the trainer: launch it, send frames, receive frames on a thread.

The worker is started by :mod:`~asyncckpt.runtime.launch` (a fork of a warm template, or a fresh
``subprocess``; never ``multiprocessing``): it works from daemonic processes (many launchers'
ranks are daemonic), never re-imports the user's ``__main__`` and needs no
``if __name__ == "__main__"`` guard. Frames go over a socket pair; tensors inside
payloads travel as shared memory or CUDA IPC handles (torch's reductions).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch.multiprocessing  # noqa: F401  (registers tensor reductions: shared memory / CUDA IPC)

from ..errors import WorkerDiedError, WorkerError
from .context import WorkerConfig
from .launch import WorkerProcess, launch_worker
from .messages import Kind, decode_header, encode_header

__all__ = ["WorkerClient", "dumps_payload"]

log = logging.getLogger("asyncckpt")

_CLIENTS: weakref.WeakSet[WorkerClient] = weakref.WeakSet()


def dumps_payload(obj: Any, what: str) -> bytes:
    """Pickle a request payload for the worker (tensors as shared memory / IPC handles)."""
    try:
        return bytes(ForkingPickler.dumps(obj))
    except Exception as exc:
        raise WorkerError(
            f"{what} cannot be sent to the asyncckpt worker: {type(exc).__name__}: {exc}. Everything a request "
            "carries must be picklable, and functions importable by module name"
        ) from exc


def _length(data: bytes) -> tuple[bytes, ...]:
    """The length prefix ``multiprocessing.connection.Connection`` reads before a message."""
    n = len(data)
    return (struct.pack("!i", n),) if n <= 0x7FFFFFFF else (struct.pack("!i", -1), struct.pack("!Q", n))


class WorkerClient:
    """One worker process. ``on_frame(kind, idx, payload)`` runs on the receiver thread for each
    frame; ``on_dead(error)`` once, when the worker is gone. Sending is thread-safe and never
    blocks: what the socket cannot take at once (a large request, a worker still starting) is
    written by a sender thread, in order."""

    def __init__(self, config: dict[str, Any], on_frame: Callable[[Kind, int, bytes], None],
                 on_dead: Callable[[WorkerDiedError], None]) -> None:
        self._on_frame = on_frame
        self._on_dead = on_dead
        self._send_lock = threading.Lock()
        self.died: WorkerDiedError | None = None
        self.stopping = False
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["ASYNCCKPT_WORKER_PATH"] = json.dumps([p for p in sys.path if p])
        env["ASYNCCKPT_ROLE"] = "worker"  # lets plug-ins tell the worker from its trainer
        try:
            self.proc: WorkerProcess = launch_worker(child.fileno(), env)
        finally:
            child.close()
        self._sock = parent  # sends (MSG_DONTWAIT per call; the fd stays blocking for the receiver)
        self._conn = Connection(os.dup(parent.fileno()))
        self._backlog: deque[memoryview] = deque()  # frames (or their rest) the sender thread writes
        self._wake = threading.Condition(self._send_lock)
        self._tx: threading.Thread | None = None
        cfg = WorkerConfig(
            parent_pid=os.getpid(),
            authkey=bytes(multiprocessing.current_process().authkey),
            sys_path=[p for p in sys.path if p],
            **{k: v for k, v in config.items() if k in WorkerConfig.__dataclass_fields__},
        )
        cfg.options = {k: v for k, v in config.items() if k not in WorkerConfig.__dataclass_fields__}
        self.send(Kind.HELLO, 0, pickle.dumps(cfg))
        self._rx = threading.Thread(target=self._receive, name="asyncckpt-rx", daemon=True)
        self._rx.start()
        _CLIENTS.add(self)
        log.debug("asyncckpt worker starting")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.died is None and self.proc.poll() is None

    def send(self, kind: Kind, idx: int, payload: bytes = b"") -> None:
        """Send one frame (header and payload in one write: one wake-up of the worker, not two)."""
        if self.died is not None:
            raise self.died
        try:
            frame = b"".join((*_length(head := encode_header(kind, idx)), head, *_length(payload), payload))
            with self._send_lock:
                if self._backlog:  # keep the order: behind what the sender thread still writes
                    self._backlog.append(memoryview(frame))
                    return
                try:
                    sent = self._sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                if sent < len(frame):
                    self._backlog.append(memoryview(frame)[sent:])
                    if self._tx is None:
                        self._tx = threading.Thread(target=self._send_backlog, name="asyncckpt-tx", daemon=True)
                        self._tx.start()
                    self._wake.notify()
        except (OSError, EOFError, ValueError) as exc:
            raise self._mark_dead(f"sending to it failed ({type(exc).__name__})") from exc

    def _send_backlog(self) -> None:
        while True:
            with self._send_lock:
                while not self._backlog and self.died is None:
                    self._wake.wait()
                if self.died is not None:
                    self._backlog.clear()
                    return
                data = self._backlog[0]
            try:
                self._sock.sendall(data)  # blocking: this thread waits for the worker, not the trainer
            except OSError as exc:
                self._mark_dead(f"sending to it failed ({type(exc).__name__})")
                return
            with self._send_lock:
                self._backlog.popleft()

    def _receive(self) -> None:
        while True:
            try:
                head = decode_header(self._conn.recv_bytes())
                payload = self._conn.recv_bytes()
            except (EOFError, OSError, ValueError):
                err = self._mark_dead("its pipe closed")
                with self._send_lock:
                    self._wake.notify_all()  # a waiting sender thread ends
                self._on_dead(err)
                return
            kind = Kind(head.kind)
            if kind == Kind.STOPPED:
                continue
            try:
                self._on_frame(kind, head.idx, payload)
            except Exception:
                log.exception("asyncckpt: handling a frame from the worker failed")

    def _mark_dead(self, why: str) -> WorkerDiedError:
        if self.died is None:
            try:
                code = self.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                code = None
            how = f"exit code {code}" if code is not None and code >= 0 else (f"signal {-code}" if code else "still running")
            if self.stopping:
                self.died = WorkerDiedError("the asyncckpt worker was stopped (close() was called)")
            else:
                self.died = WorkerDiedError(
                    f"the asyncckpt worker process (pid {self.proc.pid}) died ({how}; {why}); its pending saves are "
                    "lost, earlier committed checkpoints are intact. A fresh worker starts with the next save."
                )
        return self.died

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the worker to finish what it has and exit; kill it if it does not within ``timeout``."""
        self.stopping = True
        if self.died is None and self.proc.poll() is None:
            try:
                self.send(Kind.STOP, 0)
            except WorkerDiedError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("asyncckpt worker %s did not stop in %.0f s; killing it", self.proc.pid, timeout)
        self.kill()
        self._rx.join(5)
        with self._send_lock:
            self._wake.notify_all()  # the sender thread sees ``died`` (set by the receiver) and ends
        for closable in (self._conn, self._sock):
            try:
                closable.close()
            except OSError:
                pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def forget(self) -> None:
        """In a forked child: this worker belongs to the parent; never talk to it."""
        self.died = WorkerDiedError("this asyncckpt worker belongs to the parent process (inherited across fork)")


def _after_fork_in_child() -> None:
    for c in list(_CLIENTS):
        c.forget()
    _CLIENTS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

