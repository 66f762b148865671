"""AsyncRequest and AsyncCallsQueue: schedule work onto the persistent worker, finalize in order."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .completion import FAILED, UNFINISHED, global_state
from .errors import CheckpointError, WorkerDiedError
from .worker import WorkerProcess

__all__ = ["AsyncCallsQueue", "AsyncRequest", "RemoteRankError"]

log = logging.getLogger("asyncckpt")


class RemoteRankError(CheckpointError):
    """Another rank's request failed; this rank's part finished, but the checkpoint is not committed."""


@dataclass
class AsyncRequest:
    """Work for the worker plus what the trainer runs once every rank has finished it.

    In the worker, ``preload_fn(*async_fn_args, **async_fn_kwargs)`` runs first (the snapshot),
    then "snapshot done" is acked, then ``async_fn(staged)`` runs with its result. Without a
    preload_fn the ack is immediate and ``async_fn(*async_fn_args, **async_fn_kwargs)`` runs.
    Functions may be plain or ``async def``; they must be importable (pickled by reference).
    ``finalize_fns`` run in the trainer, in order, once per request, after global completion.
    """

    async_fn: Callable[..., Any]
    async_fn_args: tuple[Any, ...] = ()
    finalize_fns: list[Callable[[], Any]] = field(default_factory=list)
    async_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    preload_fn: Callable[..., Any] | None = None
    call_idx: int | None = None

    def add_finalize_fn(self, fn: Callable[[], Any]) -> None:
        self.finalize_fns.append(fn)


@dataclass
class _Call:
    idx: int
    request: AsyncRequest
    worker: WorkerProcess
    scheduled_at: float
    acked: bool = False
    done: bool = False
    result: Any = None
    seconds: float = 0.0
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.done or self.error is not None


class AsyncCallsQueue:
    """Schedules AsyncRequests on one persistent worker; finalizes them in order, globally.

    ``no_dist`` given here is the default for ``maybe_finalize_async_calls``; ``group`` is the
    process group of the all-reduce (default: the world).
    """

    def __init__(self, *, group: Any = None, worker_options: dict[str, Any] | None = None) -> None:
        self.group = group
        self.worker_options = dict(worker_options or {})
        self._worker: WorkerProcess | None = None
        self._calls: deque[_Call] = deque()
        self._by_idx: dict[int, _Call] = {}
        self._next_idx = 0
        self._results: dict[int, Any] = {}
        self.worker_generation = 0
        self._closed = False

    # -- worker ---------------------------------------------------------------------------------
    def _ensure_worker(self) -> WorkerProcess:
        if self._closed:
            raise CheckpointError("this AsyncCallsQueue is closed; create a new one")
        if self._worker is None or not self._worker.is_alive():
            if self._worker is not None:
                self._reap_dead_worker()
            self._worker = WorkerProcess(self.worker_options)
            self.worker_generation += 1
        return self._worker

    def start_worker(self) -> None:
        """Start the worker now (it otherwise starts with the first request)."""
        self._ensure_worker()

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    def _reap_dead_worker(self) -> None:
        w = self._worker
        if w is None:
            return
        err = w.died or WorkerDiedError(f"the asyncckpt worker (pid {w.pid}) is not running")
        for c in self._calls:
            if c.worker is w and not c.finished:
                c.error = err
                c.acked = True
        self._worker = None

    def _pump(self, timeout: float = 0.0) -> None:
        """Read the worker's messages (waiting up to ``timeout`` for the first)."""
        w = self._worker
        if w is None:
            return
        try:
            msgs = w.poll(timeout)
        except WorkerDiedError:
            self._reap_dead_worker()
            return
        for msg in msgs:
            kind = msg[0]
            call = self._by_idx.get(msg[1]) if len(msg) > 1 else None
            if call is None:
                continue
            if kind == "ack":
                call.acked = True
            elif kind == "done":
                call.acked = call.done = True
                call.result, call.seconds = msg[2], msg[3]
            elif kind == "error":
                call.acked = True
                call.error = msg[2]

    # -- public API -----------------------------------------------------------------------------
    def schedule_async_request(self, request: AsyncRequest) -> int:
        """Send ``request`` to the worker and return its call index at once."""
        worker = self._ensure_worker()
        idx = self._next_idx
        self._next_idx += 1
        request.call_idx = idx
        call = _Call(idx, request, worker, time.monotonic())
        msg = ("req", idx, request.async_fn, request.async_fn_args, request.async_fn_kwargs, request.preload_fn)
        try:
            worker.send(msg)
        except WorkerDiedError as exc:
            self._reap_dead_worker()
            call.error, call.acked = exc, True
        self._calls.append(call)
        self._by_idx[idx] = call
        return idx

    def get_num_unfinalized_calls(self) -> int:
        return len(self._calls)

    def snapshot_done(self) -> bool:
        """True when every scheduled request's snapshot is taken (or failed)."""
        self._pump()
        return all(c.acked for c in self._calls)

    def wait_snapshot(self, timeout: float | None = None) -> None:
        """Block until every scheduled request's snapshot is taken (or the request failed).

        Never raises for a failed request: its error surfaces at finalize.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._pump()
            if all(c.acked for c in self._calls):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"snapshot not done after {timeout} s")
            self._pump(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))

    def call_result(self, idx: int) -> Any:
        """The worker's result for a finalized call (returned once, then forgotten)."""
        if idx in self._results:
            return self._results.pop(idx)
        c = self._by_idx.get(idx)
        return None if c is None else c.result

    def maybe_finalize_async_calls(self, blocking: bool = False, no_dist: bool = False) -> list[int]:
        """Finalize finished requests in order; return their indices.

        Each check is one all-reduce of one int (unless ``no_dist``). With ``blocking``, wait
        until every request is finished on every rank. A request that failed on any rank raises
        (its own error on the failing rank, RemoteRankError elsewhere) after it is removed.
        """
        finalized: list[int] = []
        while self._calls:
            call = self._calls[0]
            if blocking:
                while not call.finished:
                    self._pump(0.05)
            else:
                self._pump()
            local = FAILED if call.error is not None else (0 if call.done else UNFINISHED)
            total = global_state(local, no_dist=no_dist, group=self.group)
            if total >= FAILED:
                self._calls.popleft()
                del self._by_idx[call.idx]
                if call.error is not None:
                    raise call.error
                raise RemoteRankError(
                    f"request {call.idx} failed on another rank ({total // FAILED} rank(s) failed); "
                    "its checkpoint is not committed. See that rank's error."
                )
            if total != 0:
                if blocking:
                    time.sleep(0.01)  # others still working; this rank is done: check again
                    continue
                break
            self._calls.popleft()
            del self._by_idx[call.idx]
            for fn in call.request.finalize_fns:
                fn()
            self._results[call.idx] = call.result
            while len(self._results) > 64:
                self._results.pop(next(iter(self._results)))
            finalized.append(call.idx)
        return finalized

    def close(self, *, abort: bool = False, no_dist: bool = False, timeout: float = 60.0) -> None:
        """Finalize everything (blocking) unless ``abort``, then stop the worker."""
        if self._closed:
            return
        try:
            if not abort and self._calls:
                self.maybe_finalize_async_calls(blocking=True, no_dist=no_dist)
        finally:
            self._closed = True
            if self._worker is not None:
                self._worker.stop(timeout)
                self._worker = None
            self._calls.clear()
            self._by_idx.clear()

    def kill_worker(self) -> None:
        """Kill the worker at once (tests and emergencies); pending requests fail at finalize."""
        if self._worker is not None:
            self._worker.kill()
            self._pump()
