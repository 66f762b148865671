"""The persistent worker process, seen from the trainer: spawn, send, poll, health, shutdown."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import sys
import time
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch.multiprocessing  # noqa: F401  (registers tensor reductions: shared memory / CUDA IPC)

from . import errors
from ._worker_main import main as _worker_entry
from .errors import WorkerDiedError, WorkerError

__all__ = ["WorkerProcess"]

log = logging.getLogger("asyncckpt")


@contextlib.contextmanager
def _without_main_reimport() -> Iterator[None]:
    """Keep spawn from re-running the user's script in the worker (no ``__main__`` guard needed)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {}
    for attr in ("__file__", "__spec__"):
        if hasattr(main, attr):
            saved[attr] = getattr(main, attr)
    try:
        if "__file__" in saved:
            del main.__file__
        main.__spec__ = None
        yield
    finally:
        for attr, value in saved.items():
            setattr(main, attr, value)


def _rebuild_error(name: str, blob: bytes | None, message: str, tb: str) -> BaseException:
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:  # noqa: BLE001
            exc = None
    if isinstance(exc, errors.CheckpointError):
        exc.worker_traceback = tb  # type: ignore[attr-defined]
        if isinstance(exc, OSError) and exc.strerror is not None:
            # StorageError(errno, text): str() shows "[Errno N] strerror", so the traceback goes there
            exc.strerror = f"{exc.strerror}\n\nworker traceback:\n{tb}"
        else:
            exc.args = (f"{exc.args[0] if exc.args else message}\n\nworker traceback:\n{tb}", *exc.args[1:])
        return exc
    err = WorkerError(f"{name}: {message}\n\nworker traceback:\n{tb}")
    err.worker_traceback = tb  # type: ignore[attr-defined]
    if exc is not None:
        err.__cause__ = exc
    return err


class WorkerProcess:
    """One spawned worker. Not thread-safe: one owner (the AsyncCallsQueue) drives it."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_entry, args=(child, os.getpid(), dict(options or {})), name="asyncckpt-worker", daemon=True
        )
        with _without_main_reimport():
            self.proc.start()
        child.close()
        self.died: WorkerDiedError | None = None
        log.debug("worker %s started", self.proc.pid)

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.died is None and self.proc.is_alive()

    def send(self, msg: tuple[Any, ...]) -> None:
        if self.died is not None:
            raise self.died
        data = ForkingPickler.dumps(msg)
        try:
            self._conn.send_bytes(data)
        except (OSError, EOFError, BrokenPipeError) as exc:
            raise self._mark_dead(f"sending a request failed ({exc})") from exc

    def _mark_dead(self, why: str) -> WorkerDiedError:
        if self.died is None:
            self.proc.join(0.5)
            code = self.proc.exitcode
            how = f"exit code {code}" if code is not None and code >= 0 else (f"signal {-code}" if code else "unknown")
            self.died = WorkerDiedError(
                f"the asyncckpt worker process (pid {self.proc.pid}) died ({how}; {why}); pending saves "
                "are lost, earlier committed checkpoints are intact. A fresh worker starts with the next save."
            )
        return self.died

    def poll(self, timeout: float = 0.0) -> list[tuple[Any, ...]]:
        """Return messages available within ``timeout``; raises WorkerDiedError if the worker is gone."""
        if self.died is not None:
            raise self.died
        out: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready = self._conn.poll(max(0.0, deadline - time.monotonic()) if not out else 0)
                if not ready:
                    if not out and not self.proc.is_alive():
                        # Drain anything it said before dying, then report.
                        if self._conn.poll(0):
                            continue
                        raise self._mark_dead("it is no longer running")
                    return out
                raw = self._conn.recv_bytes()
            except (EOFError, OSError) as exc:
                if out:
                    return out
                raise self._mark_dead(f"its pipe closed ({type(exc).__name__})") from None
            msg = pickle.loads(raw)
            if msg[0] == "error":
                msg = ("error", msg[1], _rebuild_error(*msg[2:]))
            out.append(msg)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the worker to finish what it has and exit; kill it if it does not within ``timeout``."""
        if self.proc.is_alive() and self.died is None:
            with contextlib.suppress(Exception):
                self._conn.send_bytes(ForkingPickler.dumps(("stop",)))
            self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("asyncckpt worker %s did not stop in %.0f s; killing it", self.proc.pid, timeout)
            self.proc.kill()
            self.proc.join(5)
        with contextlib.suppress(Exception):
            self._conn.close()
        self.died = self.died or WorkerDiedError("the asyncckpt worker was stopped (close() was called)")

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
