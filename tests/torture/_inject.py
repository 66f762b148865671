"""Phase announcements, pauses, faults and a power-loss journal, without hooks in the engine.

Every process that runs a phase announces it itself. The trainer calls :func:`install` before
it creates its checkpointer and passes :data:`WORKER_OPTIONS` to it (``worker_options=``): the
worker then imports this module at start (the runtime's ``preload`` seam) and instruments
itself. Instrumenting wraps module-level functions the engine calls (``plan_state`` in the
trainer; ``take_snapshot``, ``write_chunks``, ``commit_checkpoint``, ``set_latest`` and
``delete_checkpoint`` in the worker), routes the ``os`` calls of ``asyncckpt.storage.local``
through :class:`_OsProxy` and wraps the S3 backend's requests. The engine's code runs
unchanged; only the timing (pauses) and the observation (stdout lines, journal) are added.

Environment (read at import; the spawned worker inherits it):

``TORTURE_ANNOUNCE=1``
    print ``@@ <role> <pid> BEGIN|END <phase> <name>`` lines on stdout (role: trainer/worker).
``TORTURE_SLOW=<phase>[,<phase>...]`` and ``TORTURE_SLOW_S`` (default 0.02)
    pause that long at every storage operation of those phases, and at their start and end,
    so a kill sent at a random moment after BEGIN lands inside the phase.
``TORTURE_FAULT=<how>:<phase>[:<op>]``
    at the first storage operation ``<op>`` (default: any) of ``<phase>``: ``raise`` a
    ValueError, ``hang`` (block until the process ends), or ``enospc`` (an OSError ENOSPC).
``TORTURE_JOURNAL=<file>``
    append every mutation of local storage (create, write, truncate, fsync/fdatasync, rename,
    link, unlink, mkdir, rmdir, directory fsync) to ``<file>``, for :mod:`tests.torture.powerloss`.

Phases: trainer ``planning``; worker ``snapshot``, ``streaming`` (the data file, up to its
rename), ``manifest``, ``commit`` (on the coordinator's worker), ``latest`` and ``retention``
(the trainer script's own retention pass announces ``retention`` from the trainer).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import os
import pathlib
import pickle
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

ANNOUNCE = os.environ.get("TORTURE_ANNOUNCE") == "1"
SLOW = {p for p in os.environ.get("TORTURE_SLOW", "").split(",") if p}
SLOW_S = float(os.environ.get("TORTURE_SLOW_S", "0.02"))
FAULT = os.environ.get("TORTURE_FAULT", "")
JOURNAL = os.environ.get("TORTURE_JOURNAL", "")

PHASES = ("planning", "snapshot", "streaming", "manifest", "commit", "latest", "retention")

_state = threading.local()
#: phases in progress in this process, oldest first (the worker snapshots the next save while it
#: streams the previous one, so this is a list with removal by identity, not a stack)
_active: list[tuple[str, str]] = []
_installed = False
_lock = threading.RLock()
_journal_fd: int | None = None
_fault_fired = False
#: the name of the save being planned (set by the trainer script before ``save``)
current_name = "?"


def role() -> str:
    return "worker" if os.environ.get("ASYNCCKPT_ROLE") == "worker" else "trainer"


def say(line: str) -> None:
    """One line on stdout, written with a single ``write`` (atomic on a pipe)."""
    os.write(1, (line.rstrip("\n") + "\n").encode())


def _announce(what: str, phase: str, name: str) -> None:
    if ANNOUNCE:
        say(f"@@ {role()} {os.getpid()} {what} {phase} {name}")


#: the phase of the task (or the storage thread working for it) that runs a storage operation: the worker
#: streams one save while it commits another, and each operation must count for its own phase
_task_phase: contextvars.ContextVar[str | None] = contextvars.ContextVar("torture_phase", default=None)


def current_phase() -> str | None:
    """The phase of the running task; else the newest phase in progress that does storage operations."""
    mine = _task_phase.get()
    if mine is not None:
        return mine
    for ph, _ in reversed(_active):
        if ph not in ("snapshot", "planning"):
            return ph
    return None


@contextlib.contextmanager
def phase(name_of_phase: str, name: str) -> Iterator[None]:
    """Mark a phase: announce it, pause at its start and end when it is slowed."""
    entry = (name_of_phase, name)
    _active.append(entry)
    token = _task_phase.set(name_of_phase) if name_of_phase not in ("snapshot", "planning") else None
    _announce("BEGIN", name_of_phase, name)
    _pause(name_of_phase)
    try:
        yield
    finally:
        _pause(name_of_phase)
        if token is not None:
            _task_phase.reset(token)
        _active.remove(entry)
        _announce("END", name_of_phase, name)


def _pause(ph: str | None) -> None:
    if ph is not None and ph in SLOW:
        time.sleep(SLOW_S)


def _point(op: str) -> None:
    """A storage operation is about to run: pause and/or inject the configured fault."""
    global _fault_fired
    cur = current_phase()
    _pause(cur)
    if not FAULT or _fault_fired:
        return
    how, _, rest = FAULT.partition(":")
    ph, _, want_op = rest.partition(":")
    if ph != cur or (want_op and want_op != op):
        return
    _fault_fired = True
    _announce("FAULT", ph, f"{how}:{op}")
    if how == "raise":
        raise ValueError(f"injected fault: {op} in phase {ph}")
    if how == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if how == "hang":
        while True:
            time.sleep(3600)


# -- power-loss journal ---------------------------------------------------------------------------
def _journal(rec: tuple[Any, ...]) -> None:
    global _journal_fd
    if not JOURNAL:
        return
    if _journal_fd is None:
        _journal_fd = os.open(JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    blob = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
    os.write(_journal_fd, struct.pack("<Q", len(blob)) + blob)


def mark(kind: str, name: str) -> None:
    """Put a marker (e.g. "finalized", name) into the journal, in order with the operations."""
    with _lock:
        _journal(("mark", kind, name))


def _ino(path: Any) -> int:
    return os.lstat(path).st_ino


def _dir_and_name(path: Any) -> tuple[int, str]:
    p = os.fspath(path)
    return os.stat(os.path.dirname(p)).st_ino, os.path.basename(p)


class _File:
    """What ``open(path, "wb")`` returns inside asyncckpt.storage.local: journals its writes."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._ino = os.fstat(f.fileno()).st_ino

    def write(self, data: bytes) -> int:
        _point("write")
        with _lock:
            pos = self._f.tell()
            n = self._f.write(data)
            self._f.flush()
            _journal(("write", self._ino, pos, bytes(data)))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


def _open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    if "w" not in mode and "a" not in mode and "x" not in mode:
        return open(path, mode, *args, **kwargs)
    _point("create")
    with _lock:
        existed = os.path.lexists(path)
        f = open(path, mode, *args, **kwargs)
        d, name = _dir_and_name(path)
        ino = os.fstat(f.fileno()).st_ino
        _journal(("trunc", ino, 0) if existed else ("create", d, name, ino))
    return _File(f)


class _OsProxy:
    """Stands in for the ``os`` module inside asyncckpt.storage.local."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def open(self, path: Any, flags: int, mode: int = 0o777, *a: Any, **k: Any) -> int:
        if not flags & os.O_CREAT:
            return os.open(path, flags, mode, *a, **k)
        _point("create")
        with _lock:
            existed = os.path.lexists(path)
            fd = os.open(path, flags, mode, *a, **k)
            d, name = _dir_and_name(path)
            ino = os.fstat(fd).st_ino
            if not existed:
                _journal(("create", d, name, ino))
            elif flags & os.O_TRUNC:
                _journal(("trunc", ino, 0))
        return fd

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        _point("write")
        with _lock:
            n = os.pwrite(fd, data, offset)
            _journal(("write", os.fstat(fd).st_ino, offset, bytes(memoryview(data)[:n])))
        return n

    def ftruncate(self, fd: int, length: int) -> None:
        _point("truncate")
        with _lock:
            os.ftruncate(fd, length)
            _journal(("trunc", os.fstat(fd).st_ino, length))

    def fsync(self, fd: int) -> None:
        self._sync(fd, os.fsync)

    def fdatasync(self, fd: int) -> None:
        # For the power-loss model an fdatasync of a file is an fsync: its data and size are durable.
        self._sync(fd, os.fdatasync)

    def _sync(self, fd: int, how: Any) -> None:
        st = os.fstat(fd)
        is_dir = (st.st_mode & 0o170000) == 0o040000
        _point("fsyncdir" if is_dir else "fsync")
        with _lock:
            how(fd)
            _journal(("fsyncdir" if is_dir else "fsync", st.st_ino))

    def replace(self, src: Any, dst: Any) -> None:
        _point("rename")
        with _lock:
            ino = _ino(src)
            sd, sn = _dir_and_name(src)
            dd, dn = _dir_and_name(dst)
            os.replace(src, dst)
            _journal(("rename", sd, sn, dd, dn, ino))

    rename = replace

    def link(self, src: Any, dst: Any, *a: Any, **k: Any) -> None:
        _point("link")
        with _lock:
            ino = _ino(src)
            os.link(src, dst, *a, **k)
            dd, dn = _dir_and_name(dst)
            _journal(("link", dd, dn, ino))

    def unlink(self, path: Any, *a: Any, **k: Any) -> None:
        _point("unlink")
        with _lock:
            try:
                ino = _ino(path)
            except FileNotFoundError:
                ino = -1
            d, name = _dir_and_name(path) if ino != -1 else (-1, "")
            os.unlink(path, *a, **k)
            _journal(("unlink", d, name, ino))

    remove = unlink

    def rmdir(self, path: Any, *a: Any, **k: Any) -> None:
        _point("rmdir")
        with _lock:
            ino = _ino(path)
            d, name = _dir_and_name(path)
            os.rmdir(path, *a, **k)
            _journal(("rmdir", d, name, ino))


class _Path(type(pathlib.Path())):  # type: ignore[misc]
    """pathlib.Path whose ``mkdir`` is journaled (LocalStorage builds every path from its root)."""

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        missing = []
        p = pathlib.Path(os.fspath(self))
        while not p.exists():
            missing.append(p)
            if not parents or p.parent == p:
                break
            p = p.parent
        if not missing:
            if not exist_ok:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(self))
            return
        for d in reversed(missing):
            _point("mkdir")
            with _lock:
                try:
                    os.mkdir(d, mode)
                except FileExistsError:
                    if d == missing[0] and not exist_ok:
                        raise
                    continue
                pd, name = _dir_and_name(d)
                _journal(("mkdir", pd, name, os.stat(d).st_ino))


# -- installation -----------------------------------------------------------------------------------
#: what the trainer passes as ``worker_options``: the worker imports this module and instruments itself
WORKER_OPTIONS: dict[str, Any] = {"preload": [__name__]}


def _install_storage() -> None:
    import asyncckpt.storage.local as local

    if not isinstance(local.os, _OsProxy):
        local.os = _OsProxy(os)  # type: ignore[assignment]
    local.open = _open  # type: ignore[attr-defined]
    local.Path = _Path  # type: ignore[misc]
    _install_s3()
    ls = local.LocalStorage
    if not getattr(ls.put_record, "_torture", False):
        real_put = ls.put_record

        @functools.wraps(real_put)
        async def put_record(self: Any, key: str, data: bytes, *, if_absent: bool = False) -> bool:
            if key.endswith(".manifest") and role() == "worker":
                with phase("manifest", key.split("/")[0]):
                    return await real_put(self, key, data, if_absent=if_absent)
            return await real_put(self, key, data, if_absent=if_absent)

        put_record._torture = True  # type: ignore[attr-defined]
        ls.put_record = put_record  # type: ignore[method-assign]

        async def run_in_context(self: Any, fn: Any, *args: Any) -> Any:
            # the storage thread runs the operation in the calling task's context, so it knows the phase
            ctx = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(self._pool, ctx.run, fn, *args)

        ls._run = run_in_context  # type: ignore[method-assign]


def _install_s3() -> None:
    """S3: a fault/pause point before every part, commit, abort, record put and delete; the manifest phase."""
    try:
        from asyncckpt.storage.s3 import S3Storage, S3Writer
    except ImportError:
        return
    st, wr = S3Storage, S3Writer
    if getattr(st.put_record, "_torture", False):
        return

    def pointed(fn: Any, op: str, manifest: bool = False) -> Any:
        @functools.wraps(fn)
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            key = args[0] if args and isinstance(args[0], str) else ""
            if manifest and key.endswith(".manifest") and role() == "worker":
                with phase("manifest", key.split("/")[0]):
                    _point(op)
                    return await fn(self, *args, **kwargs)
            _point(op)
            return await fn(self, *args, **kwargs)

        wrapper._torture = True  # type: ignore[attr-defined]
        return wrapper

    st.put_record = pointed(st.put_record, "write", manifest=True)  # type: ignore[method-assign]
    st.delete = pointed(st.delete, "unlink")  # type: ignore[method-assign]
    wr.write_part = pointed(wr.write_part, "write")  # type: ignore[method-assign]
    wr.commit = pointed(wr.commit, "rename")  # type: ignore[method-assign]


def _install_worker() -> None:
    """Instrument the worker process (run when it imports this module as a preload)."""
    global _installed
    if _installed:
        return
    _installed = True
    import asyncckpt.catalog as catalog
    import asyncckpt.control as control
    import asyncckpt.engine as engine
    import asyncckpt.retention as retention
    import asyncckpt.runtime.server as server

    _install_storage()
    real_snapshot = server.take_snapshot
    real_chunks = engine.write_chunks
    real_commit = control.commit_checkpoint
    real_latest = catalog.set_latest
    real_delete = retention.delete_checkpoint

    async def take_snapshot(ctx: Any, spec: Any, *args: Any) -> Any:
        with phase("snapshot", current_name):
            return await real_snapshot(ctx, spec, *args)

    async def write_chunks(storage: Any, key: str, *args: Any, **kwargs: Any) -> list[int]:
        with phase("streaming", key.split("/")[0]):
            return await real_chunks(storage, key, *args, **kwargs)

    async def commit_checkpoint(storage: Any, name: str, **kwargs: Any) -> Any:
        with phase("commit", name):
            return await real_commit(storage, name, **kwargs)

    async def set_latest(storage: Any, name: str, step: int | None) -> None:
        with phase("latest", name):
            return await real_latest(storage, name, step)

    async def delete_checkpoint(storage: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        with phase("retention", name):
            return await real_delete(storage, name, *args, **kwargs)

    server.take_snapshot = take_snapshot  # type: ignore[assignment]
    engine.write_chunks = write_chunks  # type: ignore[assignment]
    control.commit_checkpoint = commit_checkpoint  # type: ignore[assignment]
    catalog.set_latest = set_latest  # type: ignore[assignment]
    retention.delete_checkpoint = delete_checkpoint  # type: ignore[assignment]


def install() -> None:
    """Instrument this (trainer) process; call before creating the checkpointer (with ``WORKER_OPTIONS``)."""
    global _installed
    if _installed:
        return
    _installed = True
    import asyncckpt.checkpointer as ckpt

    _install_storage()
    real_plan = ckpt.plan_state

    def plan_state(*args: Any, **kwargs: Any) -> Any:
        with phase("planning", current_name):
            return real_plan(*args, **kwargs)

    ckpt.plan_state = plan_state  # type: ignore[assignment]


if role() == "worker":
    _install_worker()
