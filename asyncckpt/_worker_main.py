"""Entry point of the persistent worker process (runs in the spawned child).

Two stages over one uvloop loop: stage 1 runs each request's ``preload_fn`` (the snapshot) in
order and acks it; stage 2 runs ``async_fn`` (streaming to storage) in order and reports the
result. The worker exits by itself when its parent dies (pipe EOF or re-parenting).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any

log = logging.getLogger("asyncckpt.worker")

_STOP = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _exc_payload(exc: BaseException) -> tuple[str, bytes | None, str, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob: bytes | None = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - an unpicklable exception travels as text
        blob = None
    return (type(exc).__name__, blob, str(exc), tb)


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        return await result
    return result


class _Server:
    def __init__(self, conn: Any, parent_pid: int) -> None:
        self.conn = conn
        self.parent_pid = parent_pid
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.stage2: asyncio.Queue[Any] = asyncio.Queue()
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.done = asyncio.Event()

    # -- threads ------------------------------------------------------------------------------
    def reader(self) -> None:
        while True:
            try:
                raw = self.conn.recv_bytes()
            except (EOFError, OSError):
                self.loop.call_soon_threadsafe(self.parent_gone, "pipe closed")
                return
            try:
                msg = pickle.loads(raw)
            except BaseException as exc:  # noqa: BLE001 - report, never die silently
                idx = -1
                try:
                    idx = int(raw[:32].split(b"|", 1)[0]) if raw[:1].isdigit() else -1
                except ValueError:
                    pass
                self.send(("error", idx, *_exc_payload(exc)))
                continue
            self.loop.call_soon_threadsafe(self.inbox.put_nowait, msg)
            if msg[0] == "stop":
                return

    def writer(self) -> None:
        while True:
            msg = self.outbox.get()
            if msg is _STOP:
                return
            try:
                self.conn.send_bytes(pickle.dumps(msg))
            except (OSError, EOFError):
                return

    def send(self, msg: Any) -> None:
        self.outbox.put(msg)

    def parent_gone(self, why: str) -> None:
        log.warning("asyncckpt worker %d: parent %d gone (%s); exiting", os.getpid(), self.parent_pid, why)
        os._exit(3)

    async def watchdog(self) -> None:
        while True:
            if os.getppid() != self.parent_pid:
                self.parent_gone("re-parented")
            await asyncio.sleep(0.2)

    # -- stages -------------------------------------------------------------------------------
    async def stage_preload(self) -> None:
        while True:
            msg = await self.inbox.get()
            if msg[0] == "stop":
                await self.stage2.put(_STOP)
                return
            _, idx, async_fn, args, kwargs, preload_fn = msg
            if preload_fn is None:
                self.send(("ack", idx))
                await self.stage2.put((idx, async_fn, args, kwargs, False, None))
                continue
            try:
                staged = await _call(preload_fn, *args, **kwargs)
            except BaseException as exc:  # noqa: BLE001
                self.send(("ack", idx))
                await self.stage2.put((idx, async_fn, args, kwargs, True, _Failed(exc)))
                continue
            self.send(("ack", idx))
            await self.stage2.put((idx, async_fn, args, kwargs, True, staged))

    async def stage_write(self) -> None:
        while True:
            item = await self.stage2.get()
            if item is _STOP:
                return
            idx, async_fn, args, kwargs, preloaded, staged = item
            t0 = time.perf_counter()
            try:
                if isinstance(staged, _Failed):
                    raise staged.exc
                result = await (_call(async_fn, staged) if preloaded else _call(async_fn, *args, **kwargs))
            except BaseException as exc:  # noqa: BLE001
                self.send(("error", idx, *_exc_payload(exc)))
                continue
            try:
                pickle.dumps(result)
            except Exception:  # noqa: BLE001
                result = None
            self.send(("done", idx, result, time.perf_counter() - t0))

    async def run(self) -> None:
        threading.Thread(target=self.reader, name="asyncckpt-worker-rx", daemon=True).start()
        tx = threading.Thread(target=self.writer, name="asyncckpt-worker-tx", daemon=True)
        tx.start()
        wd = asyncio.ensure_future(self.watchdog())
        s1 = asyncio.ensure_future(self.stage_preload())
        s2 = asyncio.ensure_future(self.stage_write())
        await asyncio.gather(s1, s2)
        wd.cancel()
        from . import engine

        await engine.close_backends()
        self.send(("stopped",))
        self.outbox.put(_STOP)
        await asyncio.to_thread(tx.join, 5)


def main(conn: Any, parent_pid: int, options: dict[str, Any]) -> None:
    """Worker process entry point (spawn target)."""
    # Ctrl-C in the terminal reaches the whole process group; the trainer decides, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    level = options.get("log_level")
    if level is not None:
        logging.basicConfig(level=level, stream=sys.stderr)
    from . import engine

    engine.configure_worker(options)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; keep working without it
        runner = asyncio.run

    async def _serve() -> None:
        await _Server(conn, parent_pid).run()

    runner(_serve())
    engine.shutdown_worker()
