"""Preemption signals and cooperative pause requests.

:class:`SignalWatcher` installs handlers (default SIGTERM and SIGUSR1, as sent by Kubernetes and
by SLURM's ``--signal``) that only record that a signal came; the manager acts at its next
``maybe_save``. :func:`request_pause` writes a ``PAUSE`` record at a checkpoint root, which a
running manager sees at its next step boundary (``asyncckpt pause ROOT`` on the command line).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._loop import run_sync
from .errors import BadInputError, CheckpointError
from .logs import log_event
from .storage import LocalStorage, Storage, open_storage

__all__ = ["PAUSE_FILE", "PauseWatcher", "SignalWatcher", "clear_pause", "read_pause", "request_pause"]

#: The record at a root that asks the job training into it to save and stop.
PAUSE_FILE = "PAUSE"

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None
)


class SignalWatcher:
    """Signal handlers that only set a flag; the previous handlers are chained and restored.

    A previous Python handler (not ``SIG_DFL``/``SIG_IGN``, not the KeyboardInterrupt one) is
    called after the flag is set, so another library watching the same signal still hears it.
    Handlers can only be installed from the main thread; elsewhere this logs a warning and
    watches nothing.
    """

    def __init__(self, signals: Iterable[int | signal.Signals] | None = DEFAULT_SIGNALS) -> None:
        self.signals = [signal.Signals(s) for s in (signals or ())]
        self.received: str | None = None
        self.count = 0
        self._previous: dict[signal.Signals, Any] = {}
        self._installed = False

    def install(self) -> SignalWatcher:
        if self._installed or not self.signals:
            return self
        if threading.current_thread() is not threading.main_thread():
            log_event(
                "signal handlers not installed: not in the main thread; preemption signals are not watched",
                op="preempt", rank=None, level=30,
            )
            return self
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(signum).name
        prev = self._previous.get(signal.Signals(signum))
        if callable(prev) and prev is not signal.default_int_handler:
            prev(signum, frame)

    @property
    def triggered(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        """Put the previous handlers back (where ours is still the one installed)."""
        if not self._installed:
            return
        if threading.current_thread() is threading.main_thread():
            for sig, prev in self._previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    if signal.getsignal(sig) == self._handle:
                        signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self._installed = False


def _open(root: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None) -> tuple[Storage, bool]:
    if isinstance(root, (str, os.PathLike)):
        return open_storage(root, **(storage_options or {})), True
    return root, False


def request_pause(
    root: str | os.PathLike[str] | Storage, *, reason: str = "", storage_options: dict[str, Any] | None = None
) -> None:
    """Ask the job training into ``root`` to save at its next step boundary and stop.

    The manager sees the request at its next ``maybe_save`` (on object stores within its
    ``pause_check_s``), saves, waits for the commit, sets ``preempted`` and removes the request.
    Running the training script again resumes from that checkpoint.
    """
    storage, own = _open(root, storage_options)
    record = {"requested": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "reason": reason}
    try:
        if isinstance(storage, LocalStorage) and not storage.root.is_dir():
            raise BadInputError(f"{storage.uri} does not exist: no job checkpoints there, so none can be paused")
        run_sync(storage.put_record(PAUSE_FILE, json.dumps(record).encode()))
    finally:
        if own:
            run_sync(storage.close())
    log_event(f"pause requested at {storage.uri}", op="pause", rank=None)


def read_pause(root: str | os.PathLike[str] | Storage, *, storage_options: dict[str, Any] | None = None
               ) -> dict[str, Any] | None:
    """The pending pause request at ``root`` (its record), or None."""
    storage, own = _open(root, storage_options)
    try:
        try:
            blob = run_sync(storage.read(PAUSE_FILE))
        except CheckpointError:
            return None
    finally:
        if own:
            run_sync(storage.close())
    try:
        rec = json.loads(blob)
        return rec if isinstance(rec, dict) else {"raw": blob.decode(errors="replace")}
    except ValueError:
        return {"raw": blob.decode(errors="replace")}


def clear_pause(root: str | os.PathLike[str] | Storage, *, storage_options: dict[str, Any] | None = None) -> None:
    """Remove a pause request (absent is fine)."""
    storage, own = _open(root, storage_options)
    try:
        run_sync(storage.delete(PAUSE_FILE))
    finally:
        if own:
            run_sync(storage.close())


class PauseWatcher:
    """Cheap check for a pause request at a root.

    A local root is checked with one ``stat`` per call (at most every ``interval`` seconds
    when ``interval`` > 0). Any other backend is polled by a daemon thread every ``interval``
    seconds, so the training loop never waits on the network.
    """

    def __init__(self, storage: Storage, *, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.interval = interval
        self.clock = clock
        self._local_path = storage.path(PAUSE_FILE) if isinstance(storage, LocalStorage) else None
        self._next_check = float("-inf")
        self._seen = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._local_path is None:
            self._thread = threading.Thread(target=self._poll, name="asyncckpt-pause-poll", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                if run_sync(self.storage.exists(PAUSE_FILE), timeout=max(30.0, self.interval)):
                    self._seen = True
            except Exception as exc:  # noqa: BLE001 - a failed poll must not kill the training job
                log_event(f"pause check failed at {self.storage.uri}: {exc}", op="pause", rank=None, level=30)
            self._stop.wait(self.interval)

    def requested(self) -> bool:
        if self._seen or self._local_path is None:
            return self._seen
        now = self.clock()
        if now < self._next_check:
            return False
        self._next_check = now + self.interval
        self._seen = self._local_path.exists()
        return self._seen

    def reset(self) -> None:
        self._seen = False
        self._next_check = float("-inf")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
