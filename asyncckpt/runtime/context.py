"""WorkerContext: everything a worker keeps between requests (instead of module globals)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import torch

from ..catalog import BasePins
from ..staging import StagingPool
from ..storage import Storage, blocking_calls_here, open_storage

__all__ = ["WorkerConfig", "WorkerContext", "current_context", "run_sink"]

log = logging.getLogger("asyncckpt.worker")


@dataclass
class WorkerConfig:
    """What the trainer tells a new worker in its HELLO frame."""

    parent_pid: int
    authkey: bytes
    sys_path: list[str]
    max_in_flight: int = 2
    pinned: bool | None = None  # staging in pinned memory (default: when CUDA is available)
    torch_threads: int | None = None
    # native saves of a snapshot at least this large start writing while the copy runs, each chunk
    # once its bytes are copied (0 or None, the default: never). Off because on this 2-core machine
    # the writes still lengthen the trainer's snapshot wait (docs/benchmarks.md, "Writing during the
    # snapshot copy, again")
    write_during_copy: int | None = None
    # unpinned staging slots in transparent huge pages where the kernel gives them: durable time
    # -15 % at 1 GiB here with the same snapshot wait (docs/benchmarks.md, "Turn 9"); False opts out
    huge_pages: bool = True
    log_level: int | str | None = None
    cpu_priority: int | None = None  # nice value the worker lowers itself to (NVRx's cpu_priority)
    io_priority: int | None = None  # ionice class (NVRx's io_priority); None leaves it unchanged
    device: int | None = None  # CUDA device index of the trainer when it uses CUDA
    preload: list[str] = field(default_factory=list)  # modules the worker imports at start (plug-ins)
    options: dict[str, Any] = field(default_factory=dict)


class WorkerContext:
    """The worker's state: shared storages by id, the staging pool, storage sessions, CUDA stream.

    One per worker process; passed to every sink and control operation.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.storages: dict[int, torch.Tensor] = {}  # shared storage id -> uint8 tensor over it
        self.pool = StagingPool(config.max_in_flight, config.pinned, config.huge_pages)
        self._sessions: dict[tuple[str, str], Storage] = {}
        self.cuda_stream: Any = None
        self.pins: dict[str, BasePins] = {}  # root -> bases of incremental saves being written here
        self._control = _ControlThread()

    def storage(self, root: str, options: dict[str, Any] | None = None) -> Storage:
        """The storage session for ``root`` with ``options``, opened once and reused."""
        opts = dict(options or {})
        key = (root, repr(sorted(opts.items())))
        st = self._sessions.get(key)
        if st is None:
            st = self._sessions[key] = open_storage(root, **opts)
        return st

    def stream_for(self, device: torch.device) -> Any:
        if self.cuda_stream is None:
            self.cuda_stream = torch.cuda.Stream(device=device)
        return self.cuda_stream

    async def run_control(self, op: Any, prior: Any) -> Any:
        """Run control step ``op``; on the control thread when every session it uses allows that.

        A step that names its sessions (``op.sessions(ctx)``) and whose sessions all have
        ``Capabilities.any_loop`` (local files) runs on a thread with an event loop of its own,
        where their calls are made inline: no hand-off to an I/O thread per small call, and its
        fsyncs never hold up the loop that takes snapshots. Others run here.
        """
        sessions = getattr(op, "sessions", None)
        if sessions is not None and all(st.capabilities.any_loop for st in sessions(self)):
            return await self._control.run(op.run(self, prior))
        return await op.run(self, prior)

    async def close(self) -> None:
        self._control.stop()
        sessions, self._sessions = list(self._sessions.values()), {}
        for st in sessions:
            try:
                await st.close()
            except Exception as exc:  # noqa: BLE001 - shutting down: log, keep closing the others
                log.warning("closing %s failed: %s", getattr(st, "uri", st), exc)
        self.pool.clear()
        self.storages.clear()


class _ControlThread:
    """A thread running an event loop of its own, started on first use, for control steps."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="asyncckpt-control", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        async def blocking_ok() -> Any:
            with blocking_calls_here():
                return await coro

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(blocking_ok(), self._ensure()))

    def stop(self) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()


_CURRENT: WorkerContext | None = None


def set_current_context(ctx: WorkerContext | None) -> None:
    global _CURRENT
    _CURRENT = ctx


def current_context() -> WorkerContext:
    """The worker's context, for functions run through an ``AsyncRequest`` (CALL frames).

    Raises RuntimeError outside a worker process.
    """
    if _CURRENT is None:
        raise RuntimeError("not inside an asyncckpt worker process")
    return _CURRENT


async def run_sink(ctx: WorkerContext, sink: Any, job: Any, staged: Any, timeout_s: float | None = None) -> Any:
    """Run ``sink.write(ctx, job, staged)`` (or await the write started during the copy,
    ``staged.writing``) and give the staging slot back afterwards.

    After ``timeout_s`` (a hung storage) or a cancellation the write is abandoned and so is its
    slot: an I/O thread may still read it, so it is never reused.
    """
    import asyncio

    from ..errors import StorageTimeoutError

    task = staged.writing if staged.writing is not None else asyncio.ensure_future(sink.write(ctx, job, staged))
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        await ctx.pool.discard(staged.slot)
        raise
    if not done:
        task.cancel()
        await ctx.pool.discard(staged.slot)
        raise StorageTimeoutError(
            f"{job}: writing did not finish within {timeout_s} s; the storage looks hung. "
            "The checkpoint is not committed; earlier ones are intact."
        )
    await ctx.pool.release(staged.slot)
    return task.result()
