"""The worker process: three lanes over one uvloop event loop.

* snapshot stage: for each CALL/SAVE in order, take the snapshot (``preload_fn`` or the staging
  copy) and ack it;
* write stage: in order, run ``async_fn`` / ``sink.write``; a save's slot goes back to the pool
  afterwards (or is abandoned after its timeout);
* control lane: commit, ``latest``, drains, retention, cleanup, in order, beside the data stages.

Frames are read and written by two threads, so the loop is never blocked by the pipe. The worker
exits by itself when its trainer dies (pipe EOF, or re-parenting).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import multiprocessing
import os
import pickle
import queue
import select
import signal
import sys
import threading
import time
from typing import Any

from ..errors import WorkerError
from ..staging import Staged, take_snapshot
from .context import WorkerConfig, WorkerContext, run_sink, set_current_context
from .messages import Kind, decode_header, describe, encode_error, encode_header
from .protocol import CallPayload, ControlPayload, CopyAwareSink, SavePayload

__all__ = ["main"]

log = logging.getLogger("asyncckpt.worker")

_STOP = object()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class CancelledRequest(WorkerError):
    """The trainer abandoned this request (its snapshot was torn); nothing of it is committed."""


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        return await result
    return result


class _Server:
    def __init__(self, conn: Any, ctx: WorkerContext, parent: int) -> None:
        self.conn = conn
        self.ctx = ctx
        self.parent = parent  # without pidfds: re-parented away from it means the trainer is gone
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.writes: asyncio.Queue[Any] = asyncio.Queue()
        self.control: asyncio.Queue[Any] = asyncio.Queue()
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.cancelled: set[int] = set()
        self.verdicts: dict[int, asyncio.Event] = {}  # guarded saves: set on CONFIRM or CANCEL
        self.writing: dict[int, asyncio.Task[Any]] = {}
        self.unwritten = 0  # requests acked and not yet through the write stage

    # -- frames ----------------------------------------------------------------------------------
    def send(self, kind: Kind, idx: int, payload: bytes = b"", sent: asyncio.Future[None] | None = None) -> None:
        """Queue a frame for the sender thread; ``sent`` is resolved (on the loop) once it went out."""
        self.outbox.put((encode_header(kind, idx), payload, sent))

    def fail(self, idx: int, exc: BaseException) -> None:
        self.send(Kind.FAILED, idx, encode_error(exc))

    def done(self, idx: int, result: Any) -> None:
        try:
            blob = pickle.dumps(result)
        except Exception:  # noqa: BLE001 - an unpicklable result is dropped, the request still succeeded
            blob = pickle.dumps(None)
        self.send(Kind.DONE, idx, blob)

    def reader(self) -> None:
        while True:
            try:
                head = decode_header(self.conn.recv_bytes())
                payload = self.conn.recv_bytes()
            except (EOFError, OSError):
                self.loop.call_soon_threadsafe(self.parent_gone, "pipe closed")
                return
            kind, idx = Kind(head.kind), head.idx
            log.debug("frame %s %d", kind.name, idx)
            if kind == Kind.STOP:
                self.loop.call_soon_threadsafe(self.inbox.put_nowait, _STOP)
                return
            if kind == Kind.CANCEL:
                self.loop.call_soon_threadsafe(self.cancel, idx)
                continue
            if kind == Kind.CONFIRM:
                self.loop.call_soon_threadsafe(self.verdict(idx).set)
                continue
            try:
                body = pickle.loads(payload)
            except BaseException as exc:  # noqa: BLE001 - answer the request, never hang the trainer
                self.fail(idx, WorkerError(
                    f"the worker cannot unpickle request {idx}: {type(exc).__name__}: {exc}. Functions and "
                    "classes a request uses must be importable by module name in the worker (not defined in "
                    "__main__ or inside a function)"
                ))
                continue
            target = self.control if kind == Kind.CONTROL else self.inbox
            self.loop.call_soon_threadsafe(target.put_nowait, (idx, body))

    def writer(self) -> None:
        while True:
            item = self.outbox.get()
            if item is _STOP:
                return
            try:
                self.conn.send_bytes(item[0])
                self.conn.send_bytes(item[1])
            except (OSError, EOFError):
                return
            finally:
                if item[2] is not None:
                    self.loop.call_soon_threadsafe(_resolve, item[2])

    def parent_gone(self, why: str) -> None:
        log.warning("asyncckpt worker %d: trainer %d gone (%s); exiting", os.getpid(), self.ctx.config.parent_pid, why)
        os._exit(3)

    def verdict(self, idx: int) -> asyncio.Event:
        ev = self.verdicts.get(idx)
        if ev is None:
            ev = self.verdicts[idx] = asyncio.Event()
        return ev

    def cancel(self, idx: int) -> None:
        self.cancelled.add(idx)
        self.verdict(idx).set()
        task = self.writing.get(idx)
        if task is not None:
            task.cancel()

    async def watchdog(self) -> None:
        trainer = _watch_handle(self.ctx.config.parent_pid)
        while True:
            if trainer is not None:
                if select.select([trainer], [], [], 0)[0]:
                    self.parent_gone("it exited")
            elif os.getppid() != self.parent:
                self.parent_gone("re-parented")
            await asyncio.sleep(0.2)

    # -- lanes -----------------------------------------------------------------------------------
    async def snapshot_stage(self) -> None:
        while True:
            item = await self.inbox.get()
            if item is _STOP:
                await self.writes.put(_STOP)
                return
            idx, body = item
            if idx in self.cancelled:
                self.fail(idx, CancelledRequest(f"request {idx} was cancelled before its snapshot"))
                continue
            log.debug("snapshot %d", idx)
            try:
                acked: asyncio.Future[None] | None = None
                if isinstance(body, SavePayload):
                    acked = self.loop.create_future()
                    staged: Any = await take_snapshot(self.ctx, body.snapshot, self._early_writer(body), acked)
                elif isinstance(body, CallPayload):
                    staged = await self._preload(body)
                else:
                    raise WorkerError(f"request {idx}: unexpected payload {type(body).__name__}")
            except BaseException as exc:  # noqa: BLE001
                self.fail(idx, exc)
                continue
            # a write started during the copy goes on at full width once this ACK is out (its
            # checksums and writes would otherwise keep the sender thread from the CPUs and the GIL)
            self.send(Kind.ACK, idx, sent=acked)
            self.unwritten += 1
            await self.writes.put((idx, body, staged))

    def _early_writer(self, body: SavePayload) -> Any:
        """Start the write during the copy when the sink can and no other write is running: the
        data stages stay in order, and the disk is busy while the copy still runs."""
        sink = body.sink
        least = self.ctx.config.write_during_copy
        if not least or self.unwritten or body.snapshot.nbytes < least or not isinstance(sink, CopyAwareSink):
            return None
        return lambda staged, progress: asyncio.ensure_future(
            sink.write_while_copying(self.ctx, body.job, staged, progress))

    async def _preload(self, call: CallPayload) -> Any:
        if call.preload_fn is None:
            return None
        if call.preload_style == "staged":
            return await _call(call.preload_fn, *call.args, **call.kwargs)
        return await _call(call.preload_fn)

    async def write_stage(self) -> None:
        while True:
            item = await self.writes.get()
            if item is _STOP:
                await self.control.put(_STOP)
                return
            idx, body, staged = item
            await asyncio.ensure_future(self._write(idx, body, staged))

    async def _write(self, idx: int, body: Any, staged: Any) -> None:
        t0 = time.perf_counter()
        log.debug("write %d", idx)
        task = asyncio.current_task()
        assert task is not None
        self.writing[idx] = task  # from now on a CANCEL interrupts it
        try:
            await self._write_or_fail(idx, body, staged, t0)
        finally:
            self.unwritten -= 1
            self.writing.pop(idx, None)
            self.verdicts.pop(idx, None)

    async def _write_or_fail(self, idx: int, body: Any, staged: Any, t0: float) -> None:
        try:
            if idx in self.cancelled:
                if isinstance(staged, Staged):
                    if staged.writing is None:
                        await self.ctx.pool.release(staged.slot)  # never written from: safe to reuse
                    else:  # its write started during the copy; an I/O thread may still read the slot
                        staged.writing.cancel()
                        await asyncio.gather(staged.writing, return_exceptions=True)
                        await self.ctx.pool.discard(staged.slot)
                raise CancelledRequest(f"request {idx} was cancelled (torn snapshot); nothing was written")
            if isinstance(body, SavePayload):
                result = await self._write_save(idx, body, staged)
                if body.guarded:
                    await self.verdict(idx).wait()  # a torn snapshot must never reach the commit
                    self.verdicts.pop(idx, None)
                    if idx in self.cancelled:
                        raise asyncio.CancelledError
                if body.then:
                    await self.control.put((idx, ControlPayload(body.then, result, body.on_failure)))
                    return
            else:
                result = await self._run_call(body, staged)
        except asyncio.CancelledError:
            self.fail(idx, CancelledRequest(f"request {idx} was cancelled (torn snapshot); its write was abandoned"))
            self._clean_up(body)
            return
        except BaseException as exc:  # noqa: BLE001
            self.fail(idx, exc)
            self._clean_up(body)
            return
        log.debug("request %d written in %.3f s", idx, time.perf_counter() - t0)
        self.done(idx, result)

    def _clean_up(self, body: Any) -> None:
        ops = getattr(body, "on_failure", None)
        if ops:
            self.control.put_nowait((None, ControlPayload(ops)))

    async def _run_call(self, call: CallPayload, staged: Any) -> Any:
        if call.async_fn is None:
            return None
        if call.preload_style == "staged" and call.preload_fn is not None:
            return await _call(call.async_fn, staged)
        args = list(call.args)
        if call.preload_fn is not None:
            if len(args) < 2:
                raise WorkerError(
                    f"{describe(call.async_fn)}: a request with a preload_fn needs at least 2 async_fn_args "
                    "(the preloaded value replaces async_fn_args[1], as in nvidia-resiliency-ext)"
                )
            args[1] = staged
        return await _call(call.async_fn, *args, **call.kwargs)

    async def _write_save(self, idx: int, body: SavePayload, staged: Any) -> Any:
        return await run_sink(self.ctx, body.sink, body.job, staged, body.timeout_s)

    async def control_lane(self) -> None:
        while True:
            item = await self.control.get()
            if item is _STOP:
                return
            idx, body = item
            prior = body.prior
            try:
                for op in body.ops:
                    prior = await self.ctx.run_control(op, prior)
                    if op.milestone and idx is not None:
                        self.send(Kind.PROGRESS, idx, pickle.dumps(op.milestone))
            except BaseException as exc:  # noqa: BLE001
                if idx is None:
                    log.warning("asyncckpt worker: cleanup failed: %s", exc)
                else:
                    self.fail(idx, exc)
                    self._clean_up(body)
                continue
            if idx is not None:
                self.done(idx, prior)

    async def run(self) -> None:
        threading.Thread(target=self.reader, name="asyncckpt-worker-rx", daemon=True).start()
        tx = threading.Thread(target=self.writer, name="asyncckpt-worker-tx", daemon=True)
        tx.start()
        wd = asyncio.ensure_future(self.watchdog())
        await asyncio.gather(self.snapshot_stage(), self.write_stage(), self.control_lane())
        wd.cancel()
        await self.ctx.close()
        self.send(Kind.STOPPED, 0)
        self.outbox.put(_STOP)
        await asyncio.to_thread(tx.join, 5)


def _lower_priority(cfg: WorkerConfig) -> None:
    if cfg.cpu_priority is not None:
        try:
            current = os.nice(0)
            if cfg.cpu_priority > current:
                os.nice(cfg.cpu_priority - current)
        except OSError as exc:
            log.warning("asyncckpt worker: cannot set CPU priority %s: %s", cfg.cpu_priority, exc)
    if cfg.io_priority is not None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            ioprio_set, who_process, class_shift = 251, 1, 13  # x86-64 syscall number
            if libc.syscall(ioprio_set, who_process, 0, int(cfg.io_priority) << class_shift) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as exc:
            log.warning("asyncckpt worker: cannot set I/O priority class %s: %s", cfg.io_priority, exc)


def _watch_handle(pid: int) -> int | None:
    """A pidfd on the trainer (readable once it exits), or None where the platform has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def warm_imports() -> None:
    """Import what a worker's first requests need, so a fork of the template has it (see runtime.launch)."""
    import importlib

    for mod in ("uvloop", "crc32c", "aiofiles", "asyncckpt.engine", "asyncckpt.torch_save", "asyncckpt.control",
                "asyncckpt.storage.local", "asyncckpt.dcp"):
        try:
            importlib.import_module(mod)
        except ImportError:  # pragma: no cover - optional; the worker imports it when it needs it
            pass


def main(expected_parent: int | None = None) -> None:
    """Worker process entry point: ``python -c '...main()' FD TRAINER_PID`` (see runtime.launch).

    ``expected_parent``: the parent whose exit means the trainer is gone (default: the trainer;
    a worker forked from the template watches the template, which leaves with the trainer)."""
    from multiprocessing.connection import Connection

    fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    conn = Connection(fd)
    # Ctrl-C in the terminal reaches the whole process group; the trainer decides, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        head = decode_header(conn.recv_bytes())
        cfg: WorkerConfig = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        os._exit(3)
    if head.kind != Kind.HELLO or cfg.parent_pid != parent_pid:
        os._exit(4)
    multiprocessing.current_process().authkey = cfg.authkey  # to receive shared storages (fd passing)
    for p in reversed(cfg.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    if cfg.log_level is not None:
        logging.basicConfig(level=cfg.log_level, stream=sys.stderr)
    _lower_priority(cfg)
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    if cfg.device is not None and torch.cuda.is_available():
        torch.cuda.set_device(cfg.device)
    import importlib

    for mod in cfg.preload:
        importlib.import_module(mod)  # plug-ins: storage backends registering themselves, instrumentation
    ctx = WorkerContext(cfg)
    set_current_context(ctx)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        runner = asyncio.run

    async def serve() -> None:
        await _Server(conn, ctx, parent_pid if expected_parent is None else expected_parent).run()

    runner(serve())
