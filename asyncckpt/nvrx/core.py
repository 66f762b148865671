"""``nvidia_resiliency_ext.checkpointing.async_ckpt.core`` on asyncckpt's engine.

Same names, arguments, defaults and contracts: :class:`AsyncRequest` (a NamedTuple),
:class:`AsyncCallsQueue` (``persistent=True, is_daemon=True, cpu_priority=10, io_priority=None,
sigterm_timeout=30.0, cpu_shm_mode=False``; ``schedule_async_request`` returns once the
request's ``preload_fn`` ran; ``maybe_finalize_async_calls`` is collective and raises
``CheckpointException`` on every rank when any rank's request failed), the caller classes,
``warmup_persistent_caller`` and :func:`abort_nvrx_checkpoint`. The worker is asyncckpt's: one
persistent process started with ``subprocess`` (also from daemonic processes), which exits with
its trainer, and whose death is reported at the next finalize instead of hanging it. CPU and
CUDA, gloo and NCCL.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, ClassVar

from ..errors import CheckpointError
from ..queue import AsyncCallsQueue as _BaseQueue
from ..queue import AsyncRequest

__all__ = [
    "AsyncCaller",
    "AsyncCallsQueue",
    "AsyncRequest",
    "PersistentAsyncCaller",
    "TemporalAsyncCaller",
    "abort_nvrx_checkpoint",
]

logger = logging.getLogger(__name__)


def _as_checkpoint_exception(exc: BaseException, *, group: Any, collective: bool) -> BaseException:
    """A failed request as DCP's CheckpointException (imported only on this failure path)."""
    from ..dcp._errors import as_checkpoint_exception

    return as_checkpoint_exception(exc, "an async checkpoint request", group=group, collective=collective)


def _world(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _collective(no_dist: bool, world: int) -> bool:
    import torch.distributed as dist

    return not no_dist and world > 1 and dist.is_available() and dist.is_initialized()


class AsyncCallsQueue(_BaseQueue):
    """NVRx's ``AsyncCallsQueue`` on asyncckpt's worker.

    ``persistent``: only True (asyncckpt's worker is always persistent; False warns, as NVRx's
    temporal mode is deprecated). ``is_daemon``: accepted; the worker never outlives its trainer
    either way, and it can be started from daemonic processes. ``cpu_priority`` /
    ``io_priority``: the worker lowers its nice value / ionice class to these (honoured).
    ``sigterm_timeout``: seconds ``close(abort=True)`` waits before killing the worker.
    ``cpu_shm_mode``: accepted and ignored (CPU tensors always travel through shared memory,
    CUDA tensors as IPC handles). asyncckpt's own options are keywords (``group``,
    ``worker_options``, ``finish_at_exit``).
    """

    _warmup_persistent_caller: ClassVar[AsyncCallsQueue | None] = None
    _instances: ClassVar[weakref.WeakSet[AsyncCallsQueue]] = weakref.WeakSet()

    def __new__(cls, *args: Any, **kwargs: Any) -> AsyncCallsQueue:
        warm = AsyncCallsQueue._warmup_persistent_caller
        if warm is not None and type(warm) is cls and warm.worker_pid is not None and not warm.closed:
            AsyncCallsQueue._warmup_persistent_caller = None
            warm._adopted = True  # consumed: this (already running) queue is the caller's
            return warm
        return super().__new__(cls)

    def __init__(
        self,
        persistent: bool = True,
        is_daemon: bool = True,
        cpu_priority: int = 10,
        io_priority: int | None = None,
        sigterm_timeout: float = 30.0,
        cpu_shm_mode: bool = False,
        *,
        group: Any = None,
        worker_options: dict[str, Any] | None = None,
        finish_at_exit: bool = True,
    ) -> None:
        if getattr(self, "_adopted", False):
            self._adopted = False  # a pre-warmed queue handed out by __new__: already set up
            return
        super().__init__(persistent, is_daemon, cpu_priority, io_priority, sigterm_timeout, cpu_shm_mode,
                         group=group, worker_options=worker_options, finish_at_exit=finish_at_exit)
        self.cpu_priority = cpu_priority
        self.io_priority = io_priority
        self.call_idx = -1
        self.closed = False
        AsyncCallsQueue._instances.add(self)

    @classmethod
    def get_instances(cls) -> list[AsyncCallsQueue]:
        """Every live queue of this class (NVRx's ``ObjectTracker``)."""
        return list(cls._instances)

    @property
    def persistent_caller(self) -> PersistentAsyncCaller:
        """This queue's worker, seen as NVRx's ``PersistentAsyncCaller``."""
        return PersistentAsyncCaller(queue=self)

    @classmethod
    def warmup_persistent_caller(
        cls,
        rank: int,
        is_daemon: bool = True,
        cpu_priority: int = 10,
        io_priority: int | None = None,
        sigterm_timeout: float = 30.0,
        cpu_shm_mode: bool = False,
    ) -> None:
        """Start the worker now; the next ``AsyncCallsQueue()`` gets it (no start-up latency on
        the first checkpoint). ``rank`` is accepted for NVRx's signature (logs only)."""
        if AsyncCallsQueue._warmup_persistent_caller is None:
            q = cls(True, is_daemon, cpu_priority, io_priority, sigterm_timeout, cpu_shm_mode)
            q.start_worker()
            logger.debug("rank %s: asyncckpt worker %s pre-started", rank, q.worker_pid)
            AsyncCallsQueue._warmup_persistent_caller = q

    def schedule_async_request(self, async_request: AsyncRequest, *, snapshot: Any = None) -> int:
        """Schedule ``async_request`` (collective in spirit: every rank schedules the same requests).

        Returns once its ``preload_fn`` ran in the worker (then the state may be mutated).
        """
        idx = super().schedule_async_request(async_request, snapshot=snapshot)
        self.call_idx = idx
        return idx

    def maybe_finalize_async_calls(self, blocking: bool = False, no_dist: bool = False) -> list[int]:
        """Finalize finished requests in order (all with ``blocking``); collective unless ``no_dist``.

        A request that failed on any rank raises ``CheckpointException`` on every rank, whose
        ``failures`` name each failing rank's error.
        """
        try:
            return super().maybe_finalize_async_calls(blocking=blocking, no_dist=no_dist)
        except CheckpointError as exc:
            raise _as_checkpoint_exception(exc, group=self.group, collective=_collective(no_dist, _world(self.group))) from exc

    def close(self, abort: bool = False, *, no_dist: bool = False, timeout: float | None = None) -> None:
        """Finalize all requests (unless ``abort``) and stop the worker; a pre-warmed, unused worker too."""
        try:
            super().close(abort, no_dist=no_dist, timeout=timeout)
        finally:
            self.closed = True
            warm = AsyncCallsQueue._warmup_persistent_caller
            if warm is not None and warm is not self:
                AsyncCallsQueue._warmup_persistent_caller = None
                warm.close(abort=abort)
            self.call_idx = -1


class AsyncCaller:
    """NVRx's caller interface over one asyncckpt worker: schedule one call at a time, ask whether
    the oldest is done on every rank (one int all-reduce), close."""

    def __init__(self, *, queue: _BaseQueue | None = None) -> None:
        self._queue = queue if queue is not None else _BaseQueue()
        self._ahead = 0  # calls finalized by a check that found several done
        self.start_time: float | None = None
        self.rank: int | None = None

    @property
    def process(self) -> Any:
        """The worker's pid holder (NVRx exposes the process object; None before the first call)."""
        return self._queue.worker_pid

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        """Send ``async_req`` to the worker (its finalize functions are the caller's to run)."""
        if async_req.async_fn is None:
            return
        self._queue.schedule_async_request(async_req._replace(finalize_fns=[]))

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        """True when the oldest scheduled call is done on every rank (collective unless ``no_dist``)."""
        if self._ahead:
            self._ahead -= 1
            return True
        if self._queue.get_num_unfinalized_calls() == 0:
            return True
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking, no_dist=no_dist)
        except CheckpointError as exc:
            raise _as_checkpoint_exception(exc, group=self._queue.group, collective=_collective(no_dist, 2)) from exc
        if not done:
            return False
        self._ahead = len(done) - 1
        return True

    def sync_all_async_calls(self, is_alive: int) -> bool:
        """One int all-reduce: True when no rank reports a live call."""
        from ..completion import global_state

        return global_state(int(is_alive), no_dist=False, group=self._queue.group) == 0

    def close(self, abort: bool = False) -> None:
        self._queue.close(abort=abort)

    def _debug_is_async_process_running(self) -> bool:
        return self._queue.worker_pid is not None

    def __del__(self) -> None:
        pass


class PersistentAsyncCaller(AsyncCaller):
    """NVRx's persistent caller: one long-lived worker (asyncckpt's) for every call."""

    _worker_restart_callbacks: ClassVar[list[Any]] = []

    def __init__(self, is_daemon: bool = True, cpu_priority: int = 10, io_priority: int | None = None,
                 sigterm_timeout: float = 30.0, cpu_shm_mode: bool = False, *, queue: _BaseQueue | None = None) -> None:
        super().__init__(queue=queue if queue is not None else _BaseQueue(
            True, is_daemon, cpu_priority, io_priority, sigterm_timeout, cpu_shm_mode))

    @classmethod
    def register_worker_restart_callback(cls, fn: Any) -> None:
        """Accepted for NVRx's API; asyncckpt's sharing registries notice a new worker by themselves."""
        cls._worker_restart_callbacks.append(fn)

    @classmethod
    def cleanup_worker_data_cache(cls) -> None:
        """Nothing to do: asyncckpt's worker frees its shared storages itself."""


class TemporalAsyncCaller(AsyncCaller):
    """NVRx's deprecated fork-per-call caller; here it is the persistent one (with a warning)."""

    def __init__(self) -> None:
        logger.warning("TemporalAsyncCaller is deprecated in nvidia-resiliency-ext; asyncckpt runs it on its "
                       "persistent worker")
        super().__init__()


def abort_nvrx_checkpoint() -> None:
    """Abort every ``AsyncCallsQueue`` of this process: pending requests are dropped (never
    committed) and the workers stop; the next save starts a fresh worker."""
    for q in AsyncCallsQueue.get_instances():
        q.close(abort=True)  # in a forked child this forgets the parent's worker without touching it
