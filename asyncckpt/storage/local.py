"""Local filesystem backend: pwrite from a thread pool, fsync, temp file + rename."""

from __future__ import annotations

import asyncio
import builtins
import ctypes
import errno
import mmap
import os
import stat
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import (
    CheckpointError,
    IntegrityError,
    PermanentStorageError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    TransientStorageError,
)
from .base import Capabilities, blocking_calls_welcome
from .keys import TEMP_MARK, check_key

__all__ = ["LocalStorage"]

_TMP_MARK = TEMP_MARK
_IO_ALIGN = 4096  # O_DIRECT: buffer address, offset and length must be multiples of this
_DIRECT_MIN = 16 << 20  # files at least this large write their aligned parts with O_DIRECT
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))  # buffers one preadv takes
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16
_DIRECT_READ_MIN = 1 << 20  # a buffer's page-aligned middle at least this large is read with O_DIRECT
# A direct run is read as pieces of this size, up to _DIRECT_READS of them in flight in the process:
# the virtual disks measured here want many requests in flight (1 GiB cold: 2 MiB x 16 ~0.40 s,
# 32 MiB x 4 0.85 s, buffered with readahead 0.45-0.8 s); 64 threads faulting fresh destination
# memory at once spent 1-2.5 CPU seconds on page-fault contention (16: 0.2).
_DIRECT_PIECE = 2 << 20
_DIRECT_READS = 16
_BOUNCE_WINDOW = _DIRECT_PIECE * _DIRECT_READS  # bytes one bounce read stages at once
_direct_pool: ThreadPoolExecutor | None = None
_direct_pool_lock = threading.Lock()


def _direct_reads() -> ThreadPoolExecutor:
    """The process's pool for direct-read pieces (made on first use; idle threads cost nothing)."""
    global _direct_pool
    with _direct_pool_lock:
        if _direct_pool is None:
            _direct_pool = ThreadPoolExecutor(max_workers=_DIRECT_READS, thread_name_prefix="asyncckpt-dread")
        return _direct_pool
_NO_DIRECT = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)  # what a filesystem refusing O_DIRECT answers


def _storage_error(op: str, path: str | os.PathLike[str], exc: OSError) -> StorageError:
    hint = ""
    cls: type[StorageError] = StorageError
    if exc.errno == errno.ENOSPC:
        hint = " (the disk is full: free space or choose another destination)"
        cls = PermanentStorageError
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = " (the destination is not writable: check permissions or mount options)"
        cls = StoragePermissionError
    elif exc.errno in (errno.EINTR, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE):
        cls = TransientStorageError
    err = cls(exc.errno or 0, f"{op} failed for {os.fspath(path)!s}: {exc.strerror or exc}{hint}")
    err.__cause__ = exc
    return err


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdirs(path: Path) -> None:
    """``mkdir -p`` that makes each new directory durable: a new entry survives a power loss only
    once its parent directory is fsynced (the commit's own fsyncs cover only the files' directory)."""
    missing = []
    p = path
    while not p.is_dir() and p.parent != p:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _open_for_read(p: Path, flags: int = 0) -> int:
    try:
        return os.open(p, os.O_RDONLY | os.O_CLOEXEC | flags)
    except FileNotFoundError as exc:
        raise StorageNotFoundError(f"{p} does not exist") from exc
    except OSError as exc:
        raise _storage_error("open", p, exc) from exc


def _preadv_all(fd: int, p: Path, views: list[memoryview], offset: int) -> None:
    """Fill ``views`` in order from ``fd`` at ``offset`` (``_IOV_MAX`` buffers a call); a short file raises."""
    want = sum(len(v) for v in views)
    done = k = 0  # bytes read; the first view not yet full
    while k < len(views):
        n = os.preadv(fd, views[k : k + _IOV_MAX], offset + done)
        if n == 0:
            raise IntegrityError(f"{p} is truncated: wanted {want} bytes at offset {offset}, file ends after {done}")
        done += n
        while k < len(views) and n >= len(views[k]):  # drop the views filled; trim a partial one
            n -= len(views[k])
            k += 1
        if n:
            views[k] = views[k][n:]


# How ``_direct_runs`` reads a run: through the page cache; with O_DIRECT straight into the buffer;
# with O_DIRECT into an aligned scratch buffer, then copied (the buffer's address disagrees with its
# file offset modulo the page size: a caller's tensor, not a ``read_buffer``).
_BUFFERED, _DIRECT, _BOUNCE = 0, 1, 2


def _direct_runs(views: Sequence[memoryview], offset: int) -> list[tuple[int, int, list[memoryview]]]:
    """Cut ``views`` (read from ``offset`` on, in order) into runs ``(how, file offset, views)``.

    The part of a large buffer (at least ``_DIRECT_READ_MIN`` bytes) that covers whole pages of the
    file is a ``_DIRECT`` run when the buffer's address agrees with its file offset modulo the page
    size, else a ``_BOUNCE`` run; everything else (heads, tails, small or read-only buffers) goes to
    ``_BUFFERED`` runs, neighbours merged.
    """
    runs: list[tuple[int, int, list[memoryview]]] = []
    pos = offset

    def add(how: int, at: int, v: memoryview) -> None:
        if not len(v):
            return
        if runs and how == _BUFFERED and runs[-1][0] == _BUFFERED:  # buffered neighbours share one preadv
            runs[-1][2].append(v)
        else:
            runs.append((how, at, [v]))

    for v in views:
        addr = _address(v) if len(v) >= _DIRECT_READ_MIN else None
        head = -pos % _IO_ALIGN
        body = (len(v) - head) // _IO_ALIGN * _IO_ALIGN if len(v) > head else 0
        if addr is None or body < _DIRECT_READ_MIN:
            add(_BUFFERED, pos, v)
        else:
            add(_BUFFERED, pos, v[:head])
            add(_BOUNCE if (addr + head) % _IO_ALIGN else _DIRECT, pos + head, v[head : head + body])
            add(_BUFFERED, pos + head + body, v[head + body :])
        pos += len(v)
    return runs


def _read_direct_pieces(dfd: int, p: Path, view: memoryview, offset: int, bounce: bool = False) -> None:
    """Fill ``view`` from the O_DIRECT descriptor ``dfd`` at ``offset`` (page-aligned), as pieces of
    ``_DIRECT_PIECE`` bytes read at once; the first error (EINVAL: O_DIRECT refused) is raised after
    every piece has finished.

    With ``bounce`` (``view`` is not page-aligned), each window of ``_BOUNCE_WINDOW`` bytes is read
    into a page-aligned buffer of its size and every piece copied to ``view`` by the thread that
    read it (``ctypes.memmove`` lets go of the GIL). Measured for ``dcp.load`` of 1 GiB into fresh
    tensors, alternating: 0.43-0.48 s against 0.77-0.91 s buffered, and against 0.62-0.94 s for
    one reused 2 MiB scratch buffer per thread (reading into the same pages again and again was the
    slow part, not the copy).
    """
    if not bounce:
        _read_pieces(dfd, p, view, offset, None)
        return
    dest = _address(view)
    assert dest is not None  # _direct_runs makes bounce runs of writable buffers only
    for lo in range(0, len(view), _BOUNCE_WINDOW):
        n = min(_BOUNCE_WINDOW, len(view) - lo)
        base = np.empty(n + mmap.PAGESIZE, dtype=np.uint8)  # allocator memory: handed out again faulted in
        start = -base.ctypes.data % mmap.PAGESIZE
        _read_pieces(dfd, p, base[start : start + n].data, offset + lo, dest + lo)


def _read_pieces(dfd: int, p: Path, view: memoryview, offset: int, copy_to: int | None) -> None:
    """:func:`_read_direct_pieces` into the page-aligned ``view``; each piece then copied to the
    address ``copy_to`` (plus its place in ``view``) when one is given."""
    pieces = [view[lo : lo + _DIRECT_PIECE] for lo in range(0, len(view), _DIRECT_PIECE)]

    def one(i: int) -> None:
        _preadv_all(dfd, p, [pieces[i]], offset + i * _DIRECT_PIECE)
        if copy_to is not None:
            v = pieces[i]
            src = _address(v)
            assert src is not None
            ctypes.memmove(copy_to + i * _DIRECT_PIECE, src, len(v))

    if len(pieces) == 1:
        one(0)
        return
    futures = [_direct_reads().submit(one, i) for i in range(len(pieces))]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _address(data: memoryview) -> int | None:
    """The address of a writable buffer's first byte (None for read-only buffers)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError, BufferError):
        return None


def _is_dir(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir()
    except OSError:
        return False


class _LocalWriter:
    """Parts go to a temp file (aligned parts of a large file with O_DIRECT: no page-cache copy),
    which ``commit`` makes durable (fdatasync) and renames; its directory entry is made durable
    with the next record put on this storage (the record that names the file)."""

    def __init__(self, storage: LocalStorage, final: Path, tmp: Path, fd: int, direct_fd: int | None) -> None:
        self._storage = storage
        self._final = final
        self._tmp = tmp
        self._fd: int | None = fd
        self._direct_fd = direct_fd
        self._end = 0

    async def write_part(self, index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
        fd = self._fd
        if fd is None:
            raise StorageError(f"write to {self._final} after commit/abort")
        self._end = max(self._end, offset + len(data))
        direct = self._direct_fd
        if direct is not None and offset % _IO_ALIGN == 0 and len(data) % _IO_ALIGN == 0:
            addr = _address(data)
            if addr is not None and addr % _IO_ALIGN == 0:
                await self._storage._run(self._pwrite_direct, direct, fd, data, offset)
                return
        await self._storage._run(self._pwrite, fd, data, offset)

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        try:
            _pwrite_all(fd, data, offset)
        except OSError as exc:
            raise _storage_error("write", self._tmp, exc) from exc

    def _pwrite_direct(self, direct: int, fd: int, data: memoryview, offset: int) -> None:
        try:
            _pwrite_all(direct, data, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise _storage_error("write", self._tmp, exc) from exc
            self._direct_fd = None  # this filesystem wants other alignment: buffered from now on
            self._pwrite(fd, data, offset)

    async def commit(self) -> None:
        await self._storage._run(self._commit_sync)

    def _close_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def _commit_sync(self) -> None:
        fd = self._fd
        if fd is None:
            raise StorageError(f"commit of {self._final} after abort")
        try:
            self._close_direct()
            os.ftruncate(fd, self._end)
            os.fdatasync(fd)  # data and what reading it needs (size, blocks), O_DIRECT parts included
            os.close(fd)
            self._fd = None
            os.replace(self._tmp, self._final)
            self._storage._dirty_dir(self._final.parent)
        except OSError as exc:
            self._abort_sync()
            raise _storage_error("commit", self._final, exc) from exc

    async def abort(self) -> None:
        await self._storage._run(self._abort_sync)

    def _abort_sync(self) -> None:
        self._close_direct()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class LocalStorage:
    """A directory on a local (or network-mounted POSIX) filesystem."""

    capabilities = Capabilities(conditional_put=True, cleanup_temp=True, scatter_read=True, min_part_size=1,
                                any_loop=True, delete_many=True, list_by_name=True)

    def __init__(self, root: str | os.PathLike[str], *, threads: int = 8, direct_io: bool = True) -> None:
        self.root = Path(root).absolute()
        self.uri = str(self.root)
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self.direct_read = self.direct_io  # large aligned reads with O_DIRECT; off once the filesystem refuses
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="asyncckpt-io")
        self._dirty: set[Path] = set()  # directories with renames not yet fsynced
        self._dirty_lock = threading.Lock()

    def _dirty_dir(self, d: Path) -> None:
        with self._dirty_lock:
            self._dirty.add(d)

    def _sync_dirs(self, also: Path) -> None:
        """fsync ``also`` and every directory a committed file was renamed into since the last call."""
        with self._dirty_lock:
            dirs, self._dirty = self._dirty | {also}, set()
        try:
            for d in sorted(dirs):
                _fsync_dir(d)
        except BaseException:
            with self._dirty_lock:
                self._dirty |= dirs
            raise

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        if blocking_calls_welcome():  # a thread of the caller's own (see Capabilities.any_loop): no hop
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def path(self, key: str) -> Path:
        """The absolute path of ``key``; refuses keys that would leave the root."""
        check_key(key)
        return self.root.joinpath(*key.split("/"))

    def _resolve_inside(self, key: str) -> Path:
        # A symlink inside the root must not lead reads outside of it.
        p = self.path(key)
        self._check_inside(p, "read")
        return p

    def _check_inside(self, p: Path, what: str) -> None:
        """Refuse ``p`` if it (or the directory it would be created in) leads outside the root."""
        real_root = os.path.realpath(self.root)
        real = self._realpath_below(p, real_root)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise IntegrityError(f"{p} resolves to {real}, outside the checkpoint root {real_root}; refusing to {what} it")

    def _realpath_below(self, p: Path, real_root: str) -> str:
        """``os.path.realpath(p)`` for ``p`` under the root, checking only the components below it.

        The root itself was just resolved; below it, as long as no component is a symbolic link,
        the real path is the real root plus the rest (one lstat per component instead of one per
        component of the whole path). A link anywhere below falls back to the full resolution.
        """
        try:
            rest = p.relative_to(self.root).parts
        except ValueError:
            return os.path.realpath(p)
        cur = str(self.root)
        for part in rest:
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                break  # nothing below exists: no link can redirect it
            except OSError:
                return os.path.realpath(p)
            if stat.S_ISLNK(st.st_mode):
                return os.path.realpath(p)
        return os.path.join(real_root, *rest) if rest else real_root

    async def open_writer(self, key: str, size_hint: int | None = None) -> _LocalWriter:
        return await self._run(self._open_writer_sync, key, size_hint)

    def _open_writer_sync(self, key: str, size_hint: int | None) -> _LocalWriter:
        final = self.path(key)
        tmp = final.with_name(f"{final.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            self._check_inside(final.parent, "write into")
            _mkdirs(final.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _storage_error("open", tmp, exc) from exc
        direct = None
        if self.direct_io and size_hint is not None and size_hint >= _DIRECT_MIN:
            try:
                direct = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError:
                direct = None  # tmpfs and some network filesystems refuse O_DIRECT: buffered writes
        return _LocalWriter(self, final, tmp, fd, direct)

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        await self._run(self._read_direct_sync, key, offset, [buf])

    async def read_into_scattered(self, key: str, offset: int, bufs: Sequence[memoryview]) -> None:
        await self._run(self._read_direct_sync, key, offset, bufs)

    def _read_direct_sync(self, key: str, offset: int, bufs: Sequence[memoryview]) -> None:
        """As :meth:`_read_scattered_sync`, with the parts of large buffers that cover whole pages of
        the file read with O_DIRECT: no page-cache copy, no readahead to wait for, many reads in flight.

        The disk writes a buffer in place when its address and file offset agree modulo the page
        size (see ``format.read_buffer``); another buffer (a caller's tensor) gets each piece through
        a page-aligned scratch buffer and one copy, which still beats buffered reads: the page
        cache's copy is as large, and a buffered read waits for readahead. A filesystem that refuses O_DIRECT (tmpfs, some network
        filesystems) gets buffered reads, from then on for this storage.
        """
        views = [b.cast("B") if b.format != "B" else b for b in bufs]
        runs = _direct_runs([v for v in views if len(v)], offset) if self.direct_read else []
        if all(how == _BUFFERED for how, _at, _vs in runs):
            self._read_scattered_sync(key, offset, views)
            return
        p = self._resolve_inside(key)
        fd = _open_for_read(p)
        dfd: int | None = None
        try:
            try:  # gone since ``fd`` was opened (an overwrite replaced it): not found, as at the first open
                dfd = _open_for_read(p, os.O_DIRECT)
            except StorageError as exc:
                if isinstance(exc, StorageNotFoundError) or exc.errno not in _NO_DIRECT:
                    raise
                self.direct_read = False
            for how, at, vs in runs:
                if how != _BUFFERED and dfd is not None:
                    try:
                        _read_direct_pieces(dfd, p, vs[0], at, bounce=how == _BOUNCE)
                        continue
                    except OSError as exc:
                        if exc.errno not in _NO_DIRECT:
                            raise
                        self.direct_read = False  # refused at read time: buffered from now on
                        os.close(dfd)
                        dfd = None
                _preadv_all(fd, p, vs, at)  # a refused direct run is read again whole, from ``at``
        except CheckpointError:
            raise
        except OSError as exc:
            raise _storage_error("read", p, exc) from exc
        finally:
            os.close(fd)
            if dfd is not None:
                os.close(dfd)

    def _read_scattered_sync(self, key: str, offset: int, bufs: Sequence[memoryview]) -> None:
        p = self._resolve_inside(key)
        views = [b.cast("B") if b.format != "B" else b for b in bufs]
        views = [v for v in views if len(v)]
        fd = _open_for_read(p)
        try:
            _preadv_all(fd, p, views, offset)
        except OSError as exc:
            raise _storage_error("read", p, exc) from exc
        finally:
            os.close(fd)

    async def read(self, key: str) -> bytes:
        return await self._run(self._read_sync, key)

    def _read_sync(self, key: str) -> bytes:
        p = self._resolve_inside(key)
        try:
            return p.read_bytes()
        except FileNotFoundError as exc:
            raise StorageNotFoundError(f"{p} does not exist") from exc
        except IsADirectoryError as exc:
            raise IntegrityError(f"{p} is a directory where a file was expected") from exc
        except OSError as exc:
            raise _storage_error("read", p, exc) from exc

    async def size(self, key: str) -> int:
        return await self._run(self._size_sync, key)

    def _size_sync(self, key: str) -> int:
        p = self._resolve_inside(key)
        try:
            return p.stat().st_size
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise StorageNotFoundError(f"{p} does not exist") from exc
        except OSError as exc:
            raise _storage_error("stat", p, exc) from exc

    async def exists(self, key: str) -> bool:
        return await self._run(lambda: self.path(key).is_file())

    async def list(self, prefix: str = "") -> list[str]:
        return await self._run(self._list_sync, prefix)

    def _list_sync(self, prefix: str) -> builtins.list[str]:
        base = self.path(prefix) if prefix else self.root
        self._check_inside(base, "list")
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if _TMP_MARK in f:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), self.root)
                out.append(rel.replace(os.sep, "/"))
        return sorted(out)

    async def list_names(self) -> dict[str, builtins.list[str]]:
        """The files directly under each directory directly under the root, by directory, as
        :meth:`list` shows them (temp files hidden, a link to a directory not followed), in the
        order of :meth:`list`: what a catalog of ``NAME/`` directories needs, from one look at each
        directory instead of a walk of every file below the root."""
        return await self._run(self._list_names_sync)

    def _list_names_sync(self) -> dict[str, builtins.list[str]]:
        names: dict[str, builtins.list[str]] = {}
        try:
            with os.scandir(self.root) as it:
                top = builtins.list(it)
        except OSError:  # no root (or unreadable): the listing is empty too
            return names
        for e in top:
            try:
                if not e.is_dir() or e.is_symlink():
                    continue
                with os.scandir(e.path) as it:
                    files = [f.name for f in it if _TMP_MARK not in f.name and not _is_dir(f)]
            except OSError:  # as the listing's walk: what cannot be read is not listed
                continue
            if files:
                names[e.name] = files
        return dict(sorted(names.items(), key=lambda kv: kv[0] + "/"))

    async def delete(self, key: str) -> None:
        await self._run(self._delete_sync, key)

    def _delete_sync(self, key: str) -> None:
        self._delete_many_sync([[key]])

    async def delete_many(self, groups: Sequence[Sequence[str]]) -> None:
        """Per group: unlink its keys, then fsync each of their directories once (not once per file),
        so a group is durably gone before the next one starts; directories left empty go at the end."""
        await self._run(self._delete_many_sync, [list(g) for g in groups])

    def _delete_many_sync(self, groups: builtins.list[builtins.list[str]]) -> None:
        by_group = [[self.path(k) for k in g] for g in groups]
        for p in (p for g in by_group for p in g):
            self._check_inside(p.parent, "delete from")
        emptied: set[Path] = set()
        for group in by_group:
            dirs: dict[Path, Path] = {}  # directory -> the first file unlinked in it (for messages)
            for p in group:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise _storage_error("delete", p, exc) from exc
                dirs.setdefault(p.parent, p)
            for d, p in sorted(dirs.items()):  # the unlinks are durable before the next group's start
                try:
                    _fsync_dir(d)
                except OSError as exc:
                    raise _storage_error("delete", p, exc) from exc
            emptied |= set(dirs)
        # Drop directories left empty, up to (not including) the root; deepest first.
        for parent in sorted(emptied, key=lambda d: -len(d.parts)):
            while parent != self.root and self.root in parent.parents:
                try:
                    os.rmdir(parent)
                except OSError:
                    break
                parent = parent.parent

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        return await self._run(self._put_record_sync, key, data, if_absent)

    def _put_record_sync(self, key: str, data: bytes, if_absent: bool) -> bool:
        final = self.path(key)
        tmp = final.with_name(f"{final.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            self._check_inside(final.parent, "write into")
            _mkdirs(final.parent)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fdatasync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, final)  # atomic: fails if the target exists
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, final)
            # The record and every file committed before it (the data it names) are durable now.
            self._sync_dirs(final.parent)
            return True
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _storage_error("write", final, exc) from exc

    async def cleanup_temp(self, prefix: str = "") -> int:
        """Remove temp files left by a crashed save under ``prefix``; returns how many."""
        return await self._run(self._cleanup_temp_sync, prefix)

    def _cleanup_temp_sync(self, prefix: str) -> int:
        base = self.path(prefix) if prefix else self.root
        self._check_inside(base, "clean")
        n = 0
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if _TMP_MARK in f:
                    try:
                        os.unlink(os.path.join(dirpath, f))
                        n += 1
                    except OSError:
                        pass
        return n

    async def close(self) -> None:
        self._pool.shutdown(wait=False)
