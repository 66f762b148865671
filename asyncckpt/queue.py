"""AsyncRequest and AsyncCallsQueue: schedule work onto the persistent worker, finalize in order.

The names, call forms and contracts are nvidia-resiliency-ext's (``AsyncRequest`` is a
NamedTuple; a request with a ``preload_fn`` returns from ``schedule_async_request`` once the
worker ran it; ``maybe_finalize_async_calls`` is collective and decides with one all-reduce of
one integer). asyncckpt's own save paths schedule :class:`Job`\\ s: requests whose stages (write on
every rank, then commit on the coordinator, ...) advance in lockstep on those same all-reduces,
so a commit's outcome reaches every rank and no storage work runs in the training loop.
"""

from __future__ import annotations

import atexit
import inspect
import itertools
import logging
import os
import pickle
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from .completion import FAILED, UNFINISHED, dist_active, global_state
from .errors import (
    CheckpointError,
    RemoteRankError,
    TornSnapshotError,
    WorkerDiedError,
    WorkerError,
)
from .runtime.client import WorkerClient, dumps_payload
from .runtime.messages import ErrorInfo, Kind, decode_error, describe
from .runtime.protocol import CallPayload
from .staging import SnapshotGuard

__all__ = ["AsyncCallsQueue", "AsyncRequest", "Job", "RemoteRankError", "Stage"]

# This process's id, kept by a fork hook: os.getpid() is a system call, and a quiet step after
# a training step paid ~7 µs for it on the test VM.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


log = logging.getLogger("asyncckpt")

SnapshotMode = Literal["blocking", "lazy"]


class _AsyncRequestFields(NamedTuple):
    async_fn: Callable[..., Any] | None
    async_fn_args: tuple[Any, ...]
    finalize_fns: list[Callable[[], Any]]
    async_fn_kwargs: dict[str, Any] | None = None
    preload_fn: Callable[..., Any] | None = None
    is_frozen: bool = False
    call_idx: int = 0


class AsyncRequest(_AsyncRequestFields):
    """Work for the worker plus what the trainer runs once every rank has finished it.

    nvidia-resiliency-ext's NamedTuple: ``async_fn(*async_fn_args, **async_fn_kwargs)`` runs in
    the worker (``None`` is a no-op). With a ``preload_fn``, the worker first calls
    ``preload_fn()`` (self-contained, e.g. a ``functools.partial``) and its result replaces
    ``async_fn_args[1]``; ``schedule_async_request`` returns once that ran, so the caller may
    mutate the state right after. ``finalize_fns`` run in the trainer, in order, after every rank
    finished. Functions must be importable by module name (they are pickled by reference).

    The asyncckpt 0.1 form ``preload_fn(*async_fn_args, **async_fn_kwargs)`` whose result is
    ``async_fn``'s only argument is still accepted (recognised by ``preload_fn``'s signature) and
    deprecated.
    """

    __slots__ = ()

    def __new__(
        cls,
        async_fn: Callable[..., Any] | None,
        async_fn_args: tuple[Any, ...] = (),
        finalize_fns: list[Callable[[], Any]] | None = None,
        async_fn_kwargs: dict[str, Any] | None = None,
        preload_fn: Callable[..., Any] | None = None,
        is_frozen: bool = False,
        call_idx: int = 0,
    ) -> AsyncRequest:
        return super().__new__(
            cls, async_fn, tuple(async_fn_args), list(finalize_fns) if finalize_fns is not None else [],
            async_fn_kwargs, preload_fn, is_frozen, call_idx,
        )

    def add_finalize_fn(self, fn: Callable[[], Any]) -> None:
        """Append ``fn`` to the finalize callbacks (refused once frozen)."""
        if self.is_frozen:
            raise RuntimeError("Cannot add finalization functions to a frozen AsyncRequest")
        self.finalize_fns.append(fn)

    def freeze(self) -> AsyncRequest:
        """A copy that refuses further finalize callbacks."""
        return self._replace(is_frozen=True)

    def execute_sync(self) -> None:
        """Run the request here, synchronously (preload, async_fn, a barrier, the finalize callbacks)."""
        args = list(self.async_fn_args)
        if self.preload_fn is not None:
            if _preload_style(self) == "staged":
                staged = self.preload_fn(*args, **(self.async_fn_kwargs or {}))
                if self.async_fn is not None:
                    self.async_fn(staged)
                _barrier()
                self.execute_finalize_fns(validate_matching_call_idx=False)
                return
            args[1] = self.preload_fn()
        if self.async_fn is not None:
            self.async_fn(*args, **dict(self.async_fn_kwargs or {}))
        _barrier()
        self.execute_finalize_fns(validate_matching_call_idx=False)

    def execute_finalize_fns(self, validate_matching_call_idx: bool = True) -> int:
        """Run the finalize callbacks; with ``validate_matching_call_idx`` check every rank finalizes the same call."""
        for fn in self.finalize_fns:
            fn()
        if validate_matching_call_idx and dist_active():
            import torch
            import torch.distributed as dist

            t = torch.tensor([self.call_idx], dtype=torch.int64, device=_collective_device(None))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if int(t.item()) != self.call_idx:
                raise CheckpointError(
                    f"ranks finalize different async calls ({self.call_idx} here, {int(t.item())} elsewhere): "
                    "every rank must schedule and finalize the same requests"
                )
        return self.call_idx


def _barrier() -> None:
    if dist_active():
        import torch.distributed as dist

        dist.barrier()


def _collective_device(group: Any) -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _preload_style(req: AsyncRequest) -> Literal["nvrx", "staged"]:
    """``"staged"`` when ``preload_fn`` only fits the asyncckpt 0.1 form ``preload_fn(*args, **kwargs)``."""
    fn = req.preload_fn
    if fn is None:
        return "nvrx"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return "nvrx"
    try:
        sig.bind()
        return "nvrx"
    except TypeError:
        pass
    try:
        sig.bind(*req.async_fn_args, **(req.async_fn_kwargs or {}))
    except TypeError:
        return "nvrx"  # fits neither: let the worker report the TypeError of the documented form
    return "staged"


@dataclass
class Stage:
    """One step of a :class:`Job`: a frame for the worker, run by ``ranks`` (None: every rank).

    ``payload`` may be a zero-argument callable, called when the stage starts (so a commit can
    be told what is known only then, e.g. which checkpoints are still draining).
    """

    kind: Kind  # Kind.SAVE, Kind.CALL or Kind.CONTROL
    payload: Any
    ranks: Collection[int] | None = None


@dataclass
class Job:
    """A request of asyncckpt's own save paths.

    Its ``stages`` run one after the other; each starts on every rank once the previous one has
    finished on every rank (decided by the same single-int all-reduce as the finalize). When the
    last stage is done everywhere, ``finalize_fns`` run. ``guard`` is checked the moment the
    worker acks the snapshot of stage 0; ``on_torn`` is called with the queue's lock held, before
    the error can be seen (it must not call back into the queue), ``on_progress`` on the thread
    that received the milestone.
    """

    stages: list[Stage]
    finalize_fns: list[Callable[[], Any]] = field(default_factory=list)
    guard: SnapshotGuard | None = None
    label: str = "request"
    on_torn: Callable[[list[str]], None] | None = None
    on_progress: Callable[[str], None] | None = None
    confirm: bool = False  # tell the worker the guard's verdict (its stage-0 payload is ``guarded``)
    #: False when the snapshot reads only memory the caller will not change (copies taken at
    #: save()): ``wait_snapshot`` then need not wait for this job's ack.
    shares_state: bool = True


class _Call:
    __slots__ = (
        "acked",
        "done",
        "error",
        "finalize_fns",
        "guard",
        "idx",
        "job",
        "label",
        "on_progress",
        "on_torn",
        "result",
        "scheduled",
        "stage",
        "stages",
        "worker",
        "world",
    )

    def __init__(self, idx: int, job: Job, worker: WorkerClient, world: int) -> None:
        self.idx = idx
        self.job = job
        self.stages = job.stages
        self.stage = 0
        self.finalize_fns = job.finalize_fns
        self.guard = job.guard
        self.label = job.label
        self.on_torn = job.on_torn
        self.on_progress = job.on_progress
        self.worker = worker
        self.world = world
        self.scheduled = time.monotonic()
        self.acked = False
        self.done = False  # the current stage finished on this rank
        self.result: Any = None
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.done or self.error is not None

    def is_acked(self) -> bool:
        return self.acked

    def is_finished(self) -> bool:
        return self.finished


def _rebuild_error(info: ErrorInfo) -> BaseException:
    """The worker's exception as the trainer raises it: traceback in attributes, one frame line in the message."""
    exc: BaseException | None = None
    if info.blob is not None:
        try:
            exc = pickle.loads(info.blob)
        except Exception:  # noqa: BLE001
            exc = None
    where = f" [in the worker: {info.frame}]"
    if isinstance(exc, CheckpointError):
        if isinstance(exc, OSError) and exc.strerror is not None:
            exc.strerror = f"{exc.strerror}{where}"  # str() shows "[Errno N] strerror"
        elif exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]}{where}", *exc.args[1:])
        else:
            exc.args = (f"{info.message}{where}", *exc.args[1:])
        exc.worker_traceback = info.traceback  # type: ignore[attr-defined]
        exc.worker_frame = info.frame  # type: ignore[attr-defined]
        return exc
    name = info.type.rsplit(".", 1)[-1]
    err = WorkerError(f"{name}: {info.message}{where}")
    err.worker_traceback = info.traceback
    err.worker_frame = info.frame
    err.worker_exception = exc
    if exc is not None:
        err.__cause__ = exc
    return err


_ORDER = itertools.count()
_LIVE: weakref.WeakSet[AsyncCallsQueue] = weakref.WeakSet()
_PENDING: set[AsyncCallsQueue] = set()  # queues with unfinished work stay alive until exit
_PENDING_LOCK = threading.Lock()


class AsyncCallsQueue:
    """Schedules requests on one persistent worker; finalizes them in order, globally.

    The positional arguments are nvidia-resiliency-ext's: ``persistent`` (only True: the worker
    is always persistent), ``is_daemon`` (accepted; the worker never outlives its trainer either
    way), ``cpu_priority`` / ``io_priority`` (the worker lowers its nice value / ionice class to
    these), ``sigterm_timeout`` (seconds ``close(abort=True)`` waits before killing), and
    ``cpu_shm_mode`` (accepted and ignored: CPU tensors always travel through shared memory).
    asyncckpt's own options are keywords: ``group`` (process group of the all-reduce),
    ``worker_options`` (staging, threads, logging) and ``finish_at_exit`` (finish pending
    requests at normal interpreter exit; default True).
    """

    def __init__(
        self,
        persistent: bool = True,
        is_daemon: bool = True,
        cpu_priority: int | None = None,
        io_priority: int | None = None,
        sigterm_timeout: float = 30.0,
        cpu_shm_mode: bool = False,
        *,
        group: Any = None,
        worker_options: dict[str, Any] | None = None,
        finish_at_exit: bool = True,
    ) -> None:
        if not persistent:
            warnings.warn("AsyncCallsQueue(persistent=False) is not supported: asyncckpt's worker is always "
                          "persistent (the temporal mode is deprecated in nvidia-resiliency-ext too)", stacklevel=2)
        self.persistent = True
        self.is_daemon = is_daemon
        self.sigterm_timeout = sigterm_timeout
        self.cpu_shm_mode = cpu_shm_mode
        self.group = group
        self.worker_options = dict(worker_options or {})
        if cpu_priority is not None:
            self.worker_options.setdefault("cpu_priority", cpu_priority)
        if io_priority is not None:
            self.worker_options.setdefault("io_priority", io_priority)
        self.finish_at_exit = finish_at_exit
        self._worker: WorkerClient | None = None
        self._calls: deque[_Call] = deque()
        self._by_idx: dict[int, _Call] = {}
        self._detached: set[int] = set()
        self._next_idx = 0
        self._results: dict[int, Any] = {}
        self._cond = threading.Condition()
        self.worker_generation = 0
        self._closed = False
        self._order = next(_ORDER)
        self._owner_pid = _pid
        _LIVE.add(self)

    # -- worker ---------------------------------------------------------------------------------
    def _ensure_worker(self) -> WorkerClient:
        if self._closed:
            raise CheckpointError("this AsyncCallsQueue is closed; create a new one")
        if self._owner_pid != _pid:
            self._forget_inherited()
        w = self._worker
        if w is None or not w.is_alive():
            if w is not None:
                self._worker_dead(w, w.died or WorkerDiedError(f"the asyncckpt worker (pid {w.pid}) is not running"))
            opts = dict(self.worker_options)
            opts.setdefault("device", _cuda_device())
            self._worker = w = WorkerClient(
                opts, on_frame=self._make_on_frame(), on_dead=self._make_on_dead()
            )
            self.worker_generation += 1
        return w

    def _make_on_frame(self) -> Callable[[Kind, int, bytes], None]:
        ref = weakref.ref(self)

        def on_frame(kind: Kind, idx: int, payload: bytes) -> None:
            q = ref()
            if q is not None:
                q._on_frame(kind, idx, payload)

        return on_frame

    def _make_on_dead(self) -> Callable[[WorkerDiedError], None]:
        ref = weakref.ref(self)

        def on_dead(err: WorkerDiedError) -> None:
            q = ref()
            if q is not None and q._worker is not None:
                q._worker_dead(q._worker, err)

        return on_dead

    def _forget_inherited(self) -> None:
        """In a process forked from the owner: the calls and the worker belong to the parent."""
        self._owner_pid = _pid
        self._worker = None
        self._calls.clear()
        self._by_idx.clear()
        self._detached.clear()
        self._cond = threading.Condition()
        self.worker_generation += 1

    def start_worker(self) -> None:
        """Start the worker now (it otherwise starts with the first request)."""
        self._ensure_worker()

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    def _worker_dead(self, w: WorkerClient, err: WorkerDiedError) -> None:
        with self._cond:
            for c in self._calls:
                if c.worker is w and not c.finished:
                    c.error = err
                    c.acked = True
            for i in list(self._detached):
                if self._by_idx[i].worker is w:
                    self._detached.discard(i)
                    del self._by_idx[i]
            if self._worker is w:
                self._worker = None
            self._cond.notify_all()

    # -- frames from the worker (receiver thread) ------------------------------------------------
    def _on_frame(self, kind: Kind, idx: int, payload: bytes) -> None:
        verdict: tuple[_Call, list[str] | None] | None = None
        progress: tuple[_Call, str] | None = None
        with self._cond:
            call = self._by_idx.get(idx)
            if call is None:
                return
            if kind == Kind.ACK:
                call.acked = True
                # Already changed: torn for sure, stop the worker now. Unchanged proves nothing yet:
                # an in-place op still running bumps the counter only when it ends, so the verdict
                # waits for the training thread (verify_snapshots).
                # An empty guard (everything was copied inside save()) has nothing to wait for.
                if call.guard is not None and (not len(call.guard) or call.guard.changed()):
                    verdict = self._judge(call)
            elif kind == Kind.DONE:
                if call.error is None:
                    call.result = pickle.loads(payload)
                    call.done = True
                call.acked = True
            elif kind == Kind.FAILED:
                if call.error is None:
                    call.error = _rebuild_error(decode_error(payload))
                call.acked = True
            elif kind == Kind.PROGRESS:
                progress = (call, pickle.loads(payload))
            if idx in self._detached and call.finished:
                self._detached.discard(idx)
                del self._by_idx[idx]
                if call.error is not None:
                    log.warning("asyncckpt: %s failed: %s", call.label, call.error)
            self._cond.notify_all()
        if verdict is not None:
            self._tell(*verdict)
        if progress is not None and progress[0].on_progress is not None:
            progress[0].on_progress(progress[1])

    def _judge(self, call: _Call) -> tuple[_Call, list[str] | None] | None:
        """Decide a guarded call whose snapshot is taken (lock held): torn, or fine."""
        guard = call.guard
        if guard is None or not call.acked:
            return None
        changed = guard.changed()
        guard.release()
        call.guard = None
        if call.error is not None:
            return None
        if changed:
            call.error = TornSnapshotError(
                f"{call.label}: the state changed while the worker was copying it "
                f"({len(changed)} tensor(s): {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); "
                "this save is not committed. Attach the optimizer/module that changes it "
                "(AsyncCheckpointer(optimizers=...) or attach()), call wait_snapshot() before changing "
                "the state, or use snapshot='blocking'.",
                changed,
            )
            if call.on_torn is not None:
                # before anyone can see the error: whoever catches it finds the policy already switched
                call.on_torn(changed)
            return (call, changed)
        return (call, None) if call.job.confirm else None

    def _tell(self, call: _Call, changed: list[str] | None) -> None:
        """Send the guard's verdict to the worker (CANCEL when torn, else CONFIRM)."""
        try:
            call.worker.send(Kind.CANCEL if changed else Kind.CONFIRM, call.idx)
        except WorkerDiedError:
            pass

    def verify_snapshots(self) -> None:
        """On the training thread: judge every taken snapshot still unjudged.

        Any in-place op this thread started has ended here, so a version counter that did not
        move proves the copy saw the state of ``save()``.
        """
        with self._cond:
            verdicts = [v for c in self._calls if c.guard is not None and c.acked and (v := self._judge(c))]
            if verdicts:
                self._cond.notify_all()
        for v in verdicts:
            self._tell(*v)

    # -- scheduling -----------------------------------------------------------------------------
    def _world(self) -> int:
        if not dist_active(self.group):
            return 1
        import torch.distributed as dist

        return dist.get_world_size(self.group)

    def _rank(self) -> int:
        if not dist_active(self.group):
            return 0
        import torch.distributed as dist

        return dist.get_rank(self.group)

    def schedule_job(self, job: Job, *, snapshot: SnapshotMode = "lazy", world: int | None = None,
                     detached: bool = False) -> int:
        """Schedule one of asyncckpt's own jobs; returns its call index.

        ``snapshot="blocking"`` returns once the worker acked stage 0's snapshot (or it failed).
        ``world`` is the number of ranks that take part (default: the group's size when
        torch.distributed is initialized, else 1). A ``detached`` job (single stage, this rank
        only: a cleanup) is not finalized in order: its failure is only logged.
        """
        if not job.stages:
            raise ValueError("a Job needs at least one stage")
        worker = self._ensure_worker()
        self.verify_snapshots()
        idx = self._next_idx
        self._next_idx += 1
        call = _Call(idx, job, worker, self._world() if world is None else world)
        with self._cond:
            self._by_idx[idx] = call
            if detached:
                self._detached.add(idx)
            else:
                self._calls.append(call)
        if not detached:
            with _PENDING_LOCK:
                _PENDING.add(self)
                _arm_exit_hook()
        self._start_stage(call)
        if snapshot == "blocking":
            self._wait(lambda: call.acked)
            self.verify_snapshots()
        return idx

    def _start_stage(self, call: _Call) -> None:
        stage = call.stages[call.stage]
        call.done = False
        if stage.ranks is not None and self._rank() not in stage.ranks:
            with self._cond:
                call.done = call.acked = True  # this rank has no part in this stage
            return
        try:
            body = stage.payload() if callable(stage.payload) else stage.payload
            payload = dumps_payload(body, call.label)
        except BaseException as exc:  # noqa: BLE001 - reported at finalize, like a worker-side failure
            with self._cond:
                call.error, call.acked = exc, True
            return
        try:
            call.worker.send(stage.kind, call.idx, payload)
        except WorkerDiedError as exc:
            with self._cond:
                if call.error is None:
                    call.error = exc
                call.acked = True

    def schedule_async_request(self, async_request: AsyncRequest, *, snapshot: SnapshotMode | None = None) -> int:
        """Send ``async_request`` to the worker; returns its call index.

        With a ``preload_fn`` it returns once the worker ran it (nvidia-resiliency-ext's
        contract: mutate freely afterwards); ``snapshot="lazy"`` returns at once instead (then
        call :meth:`wait_snapshot` before mutating). ``async_fn=None`` is a no-op request.
        """
        if len(async_request._fields) != len(AsyncRequest._fields) or not isinstance(async_request, AsyncRequest):
            async_request = AsyncRequest(**async_request._asdict())  # another library's AsyncRequest
        style = _preload_style(async_request)
        if style == "staged":
            warnings.warn(
                f"AsyncRequest preload_fn {describe(async_request.preload_fn)} takes async_fn_args: that is the "
                "asyncckpt 0.1 form (async_fn(preload_fn(*args))), deprecated; use the nvidia-resiliency-ext form "
                "(preload_fn() whose result replaces async_fn_args[1])",
                DeprecationWarning, stacklevel=2,
            )
        req = async_request.freeze()
        payload = CallPayload(req.async_fn, req.async_fn_args, dict(req.async_fn_kwargs or {}), req.preload_fn, style)
        # async_fn=None: nothing runs anywhere, but the request is finalized in order like any other.
        ranks: tuple[int, ...] | None = () if req.async_fn is None else None
        job = Job([Stage(Kind.CALL, payload, ranks)], list(req.finalize_fns), label=f"request {describe(req.async_fn)}")
        if snapshot is None:
            snapshot = "blocking" if req.preload_fn is not None else "lazy"
        return self.schedule_job(job, snapshot=snapshot)

    # -- waiting ----------------------------------------------------------------------------------
    def _wait(self, pred: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``pred()`` (checked under the lock) or ``timeout``; a dead worker wakes us too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not pred():
                w = self._worker
                if w is not None and w.died is None and w.proc.poll() is not None:
                    break  # exited; the receiver thread reports it in a moment
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.2 if left is None else min(0.2, left))
        if not pred():
            time.sleep(0.05)
            with self._cond:
                return pred()
        return True

    def wait_finished(self, idx: int, timeout: float | None = None) -> bool:
        """Wait until call ``idx`` finished (done or failed; a detached job is then forgotten, as are
        those of a worker that died); False if ``timeout`` seconds passed first."""
        def finished() -> bool:
            call = self._by_idx.get(idx)
            return call is None or call.finished
        return self._wait(finished, timeout)

    def nothing_to_finalize(self) -> bool:
        """True when :meth:`maybe_finalize_async_calls` on this rank alone would do nothing now: the
        oldest request has neither finished nor failed, and no taken snapshot awaits its verdict.

        A hint for a caller that polls every step; with several ranks finalize is collective, so
        call it anyway. Read without the lock: a flag that changes meanwhile is seen next time.
        """
        calls = self._calls
        if not calls:
            return True
        head = calls[0]
        if head.done or head.error is not None or self._owner_pid != _pid:
            return False
        return all(c.guard is None or not c.acked for c in calls)

    def get_num_unfinalized_calls(self) -> int:
        return len(self._calls)

    def snapshot_done(self) -> bool:
        """True when every scheduled request's snapshot is taken (or the request failed)."""
        self.verify_snapshots()
        with self._cond:
            return all(c.acked or not c.job.shares_state for c in self._calls)

    def wait_snapshot(self, timeout: float | None = None) -> None:
        """Block until every scheduled request's snapshot is taken (or the request failed).

        Never raises for a failed request: its error surfaces at finalize.
        """
        # The common case in an optimizer hook: every snapshot taken and judged (or none pending).
        # Flags read without the lock: one seen stale only sends this call down the full path.
        if all(c.guard is None and (c.acked or not c.job.shares_state) for c in self._calls):
            return
        ok = self._wait(lambda: all(c.acked or not c.job.shares_state for c in self._calls), timeout)
        self.verify_snapshots()
        if not ok:
            raise TimeoutError(f"snapshot not done after {timeout} s")

    def call_result(self, idx: int) -> Any:
        """The worker's result for a call (kept for the 64 most recently finalized ones)."""
        if idx in self._results:
            return self._results[idx]
        c = self._by_idx.get(idx)
        return None if c is None else c.result

    def snapshot_taken(self, idx: int) -> bool:
        """True once call ``idx``'s snapshot is taken, or it failed, or it is no longer pending."""
        c = self._by_idx.get(idx)
        return c is None or c.acked or c.error is not None

    def is_pending(self, idx: int) -> bool:
        """True while call ``idx`` waits to be finalized."""
        c = self._by_idx.get(idx)
        return c is not None and idx not in self._detached

    def abandon_unsnapshotted(self, reason: str, *, all_calls: bool = False) -> int:
        """Fail (and tell the worker to drop) every call whose snapshot is not taken yet — every
        unfinished call with ``all_calls``. Nothing of them is committed. Returns how many."""
        dropped: list[_Call] = []
        with self._cond:
            for c in self._calls:
                if c.error is None and (not c.acked or (all_calls and not c.done) or (all_calls and c.stage > 0)):
                    c.error = CheckpointError(f"{c.label}: {reason}")
                    c.acked = True
                    dropped.append(c)
            self._cond.notify_all()
        for c in dropped:
            try:
                c.worker.send(Kind.CANCEL, c.idx)
            except WorkerDiedError:
                pass
        return len(dropped)

    # -- finalize -------------------------------------------------------------------------------
    def _global(self, call: _Call, local: int, no_dist: bool) -> int:
        if no_dist or call.world <= 1:
            return local
        if not dist_active(self.group):
            if call.error is None:
                call.error = CheckpointError(
                    f"{call.label} spans {call.world} ranks, but torch.distributed is no longer initialized, so its "
                    "completion cannot be agreed; it is not committed. Finalize (close()) before "
                    "destroy_process_group()."
                )
            return FAILED
        return global_state(local, no_dist=False, group=self.group)

    def maybe_finalize_async_calls(self, blocking: bool = False, no_dist: bool = False) -> list[int]:
        """Finalize finished requests in order; return their indices.

        Collective: each check is one all-reduce of one int (unless ``no_dist``). With
        ``blocking``, wait until every request is finished on every rank. A request that failed
        on any rank raises (its own error on the failing rank, RemoteRankError elsewhere) after
        it is removed; its finalize callbacks never run.
        """
        if self._owner_pid != _pid:
            self._forget_inherited()
        finalized: list[int] = []
        while self._calls:
            call = self._calls[0]
            self.verify_snapshots()
            if blocking:
                self._wait(call.is_acked)
                self.verify_snapshots()
                self._wait(call.is_finished)
            local = FAILED if call.error is not None else (0 if call.done else UNFINISHED)
            total = self._global(call, local, no_dist)
            if total >= FAILED:
                self._pop(call)
                if call.error is not None:
                    raise call.error
                raise RemoteRankError(
                    f"{call.label} failed on another rank ({total // FAILED} rank(s) failed); "
                    "it is not committed. See that rank's error."
                )
            if total != 0:
                if blocking:
                    time.sleep(0.01)  # others still working; this rank is done: check again
                    continue
                break
            if call.stage + 1 < len(call.stages):
                call.stage += 1
                self._start_stage(call)
                continue
            self._pop(call)
            self._results[call.idx] = call.result
            while len(self._results) > 64:
                self._results.pop(next(iter(self._results)))
            for fn in call.finalize_fns:
                fn()
            finalized.append(call.idx)
        return finalized

    def _pop(self, call: _Call) -> None:
        with self._cond:
            self._calls.popleft()
            del self._by_idx[call.idx]
            empty = not self._calls
        if empty:
            with _PENDING_LOCK:
                _PENDING.discard(self)

    def close(self, abort: bool = False, *, no_dist: bool = False, timeout: float | None = None) -> None:
        """Finalize everything (blocking) unless ``abort``, then stop the worker.

        ``abort`` stops the worker at once (after ``sigterm_timeout`` at most); pending requests
        are dropped and nothing of them is committed.
        """
        if self._closed:
            return
        try:
            if not abort and self._calls:
                self.maybe_finalize_async_calls(blocking=True, no_dist=no_dist)
        finally:
            self._closed = True
            w, self._worker = self._worker, None
            if w is not None and self._owner_pid == _pid:
                w.stop(self.sigterm_timeout if timeout is None else timeout)
            with self._cond:
                self._calls.clear()
                self._by_idx.clear()
                self._detached.clear()
            with _PENDING_LOCK:
                _PENDING.discard(self)

    def kill_worker(self) -> None:
        """Kill the worker at once (tests and emergencies); pending requests fail at finalize."""
        w = self._worker
        if w is not None:
            w.kill()
            self._wait(lambda: self._worker is not w, timeout=5)

    def __del__(self) -> None:
        try:
            if not self._closed and not self._calls and self._owner_pid == _pid:
                self.close(abort=True, timeout=5)
        except Exception:  # noqa: BLE001 - best effort in a finalizer
            pass


def _cuda_device() -> int | None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.current_device())
    except Exception:  # noqa: BLE001
        pass
    return None


def _reset_fd_sharing_after_fork() -> None:
    """In a child made by a bare ``os.fork()``: give it its own fd-sharing listener.

    CPU tensors reach the worker as file descriptors served by multiprocessing's resource
    sharer; multiprocessing resets that sharer only in children it forks itself, so a child of
    ``os.fork()`` would hand its worker the parent's listener address (the worker then cannot
    unpickle the request). Dropping the inherited state makes the next share start a listener here.
    """
    from multiprocessing import resource_sharer

    sharer = getattr(resource_sharer, "_resource_sharer", None)
    reset = getattr(sharer, "_afterfork", None)
    if reset is not None:
        reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_refresh_pid)
    os.register_at_fork(after_in_child=_reset_fd_sharing_after_fork)


def _finish_at_exit() -> None:
    """Normal interpreter exit: finish what is still pending (logged), unless the owner opted out."""
    died_of_exception = getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None
    with _PENDING_LOCK:
        queues = sorted((q for q in _PENDING if q.finish_at_exit), key=lambda q: q._order)
    for q in queues:
        if q._closed or not q._calls or q._owner_pid != _pid:
            continue
        multi = any(c.world > 1 for c in q._calls)
        if multi and died_of_exception:
            log.warning("asyncckpt: %d pending multi-rank request(s) dropped at exit: the program ended with an "
                        "exception, and finishing them would need every rank", len(q._calls))
            q.close(abort=True)
            continue
        waiting = sum(not c.finished for c in q._calls)
        (log.warning if waiting else log.info)(
            "asyncckpt: finishing %d pending request(s) at interpreter exit, %d still running (call close() "
            "before exiting to do it yourself; finish_at_exit=False opts out)", len(q._calls), waiting)
        try:
            q.close()
        except BaseException as exc:  # noqa: BLE001 - exiting: report, keep finishing the others
            log.error("asyncckpt: a pending request failed at exit: %s", exc)


_exit_hook_armed = False


def _arm_exit_hook() -> None:
    """Register :func:`_finish_at_exit` at the first request, not at import (caller holds ``_PENDING_LOCK``).

    Exit handlers run last-registered first. A framework registers its own (Lightning's
    ``destroy_process_group`` for NCCL) when it creates the process group, after asyncckpt was
    imported and before the first save; registered later, ours runs first, while every rank can
    still take part in finishing a multi-rank save.
    """
    global _exit_hook_armed
    if not _exit_hook_armed:
        _exit_hook_armed = True
        atexit.register(_finish_at_exit)
