"""The checkpoint engines bench/run.py compares, behind one small interface.

Each engine saves one state dict to one destination per repetition. The runner times
``begin`` + ``wait_unblocked`` (what the training loop is blocked for: the call plus any wait
before the next optimizer step may mutate the state) and ``wait_durable`` (until the checkpoint
is on stable storage: fsync'ed, or committed for asyncckpt / multipart-completed on S3). Engines
that do not fsync by themselves get an explicit fsync of what they wrote inside ``wait_durable``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import importlib.util
import mmap
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

MiB = 1 << 20


class EngineUnavailable(Exception):
    """The engine cannot run here; the message says why (shown in the output as is)."""


# -- helpers ---------------------------------------------------------------------------------


def fsync_path(path: str) -> None:
    """fsync a file, or every file under a directory, then the directories themselves."""
    if os.path.isfile(path):
        files, dirs = [path], [os.path.dirname(os.path.abspath(path))]
    else:
        files, dirs = [], [path]
        for dirpath, dirnames, filenames in os.walk(path):
            files += [os.path.join(dirpath, f) for f in filenames]
            dirs += [os.path.join(dirpath, d) for d in dirnames]
        dirs.append(os.path.dirname(os.path.abspath(path)))
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop_page_cache(path: str) -> None:
    """Evict the (clean, fsync'ed) pages of ``path``'s files so a load reads from the disk.

    posix_fadvise(DONTNEED) touches only these files, never the rest of the machine's cache.
    """
    if not os.path.exists(path):
        return
    paths = [path] if os.path.isfile(path) else [
        os.path.join(dp, f) for dp, _d, fs in os.walk(path) for f in fs
    ]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def flat_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state dict, by a '/'-joined key path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}" if prefix else str(i)))
    return out


def same_state(ref: Any, got: Any) -> tuple[bool, str]:
    """Bitwise comparison of every tensor of ``ref`` with ``got``; returns (equal, why not)."""
    a, b = flat_tensors(ref), flat_tensors(got)
    if set(a) != set(b):
        missing = sorted(set(a) - set(b))[:3]
        extra = sorted(set(b) - set(a))[:3]
        return False, f"keys differ (missing {missing}, unexpected {extra})"
    for k, t in a.items():
        u = b[k]
        if t.dtype != u.dtype or t.shape != u.shape:
            return False, f"{k}: {u.dtype}{tuple(u.shape)} loaded, {t.dtype}{tuple(t.shape)} saved"
        if not torch.equal(t.contiguous().view(-1).view(torch.uint8), u.contiguous().view(-1).view(torch.uint8)):
            return False, f"{k}: bytes differ"
    return True, ""


def state_nbytes(sd: Any) -> int:
    return sum(t.numel() * t.element_size() for t in flat_tensors(sd).values())


# -- the engine interface ------------------------------------------------------------------------


class Engine(abc.ABC):
    """One way to save a checkpoint. Subclasses fill in the hooks below."""

    name = "engine"
    label = "engine"
    description = ""
    #: "sync": the call is the whole save; "async": the call returns, the write goes on
    mode = "sync"
    #: which destinations it can write: "local", "s3"
    targets: tuple[str, ...] = ("local",)
    #: checks a checksum of every byte when loading
    verifies_checksums = False
    #: fsync/commit is part of the engine itself (False: the bench adds an fsync in durable_s)
    own_fsync = True

    def open(self, ctx: dict[str, Any]) -> None:
        """Prepare (start workers...). Raise EngineUnavailable with the reason if it cannot run."""
        return None

    def dest(self, root: str, tag: str) -> str:
        return os.path.join(root, f"{self.name}-{tag}")

    @abc.abstractmethod
    def begin(self, sd: Any, dest: str, step: int) -> None:
        """Start saving ``sd`` to ``dest`` (the call the training loop makes)."""

    def wait_unblocked(self) -> None:
        """Block until the state may be mutated (the next optimizer step may run)."""
        return None

    def wait_durable(self) -> None:
        """Block until the checkpoint begun last is durable."""
        return None

    def poll(self) -> None:
        """Called once per training step: non-blocking progress (finalize...)."""
        return None

    def before_next_save(self) -> None:
        """Called before a new save in the training loop: wait for what must finish first."""
        self.wait_durable()

    def worker_pids(self) -> list[int]:
        return []

    @abc.abstractmethod
    def load(self, dest: str, like: Any) -> Any:
        """Load the checkpoint at ``dest`` (``like``: a state of the same structure)."""

    def remove(self, dest: str) -> None:
        remove_path(dest)

    def close(self) -> None:
        """Stop workers and release what ``open`` started."""
        return None


# -- torch.save ---------------------------------------------------------------------------------


class TorchSave(Engine):
    name = "torch_save"
    label = "torch.save"
    description = "plain torch.save (synchronous); the bench fsyncs the file and directory for durable_s"
    own_fsync = False

    def dest(self, root: str, tag: str) -> str:
        return os.path.join(root, f"{self.name}-{tag}.pt")

    def begin(self, sd: Any, dest: str, step: int) -> None:
        torch.save(sd, dest)
        self._last = dest

    def wait_durable(self) -> None:
        last = getattr(self, "_last", None)
        if last is not None:
            fsync_path(last)
            self._last = None

    def load(self, dest: str, like: Any) -> Any:
        return torch.load(dest, weights_only=True)


# -- torch.distributed.checkpoint ----------------------------------------------------------------

_DCP_THREADS = 4  # FileSystemWriter thread_count: 4 beat the default 1 here (see docs/benchmarks.md)


class _DcpBase(Engine):
    own_fsync = True  # FileSystemWriter(sync_files=True) fsyncs every file; we add the directories

    def _writer(self, dest: str) -> Any:
        import torch.distributed.checkpoint as dcp

        return dcp.FileSystemWriter(dest, thread_count=_DCP_THREADS, sync_files=True)

    def _fsync_dirs(self, dest: str) -> None:
        for d in (dest, os.path.dirname(os.path.abspath(dest))):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load(self, dest: str, like: Any) -> Any:
        import torch.distributed.checkpoint as dcp

        target = _empty_like_tree(like)
        dcp.load(target, checkpoint_id=dest)
        return target


def _empty_like_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj)
    if isinstance(obj, dict):
        return {k: _empty_like_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_empty_like_tree(v) for v in obj]
    return obj


class DcpSave(_DcpBase):
    name = "dcp_save"
    label = "dcp.save"
    description = f"torch.distributed.checkpoint.save, FileSystemWriter(thread_count={_DCP_THREADS}, sync_files=True)"

    def begin(self, sd: Any, dest: str, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, storage_writer=self._writer(dest))
        self._fsync_dirs(dest)


class DcpAsync(_DcpBase):
    """dcp.async_save with a reused DefaultStager (cached staging buffers, staging in a thread)."""

    mode = "async"

    def __init__(self, executor: str) -> None:
        self.executor = executor
        self.name = f"dcp_async_{executor}"
        self.label = f"dcp.async_save ({executor})"
        share = executor == "process"
        self.description = (
            f"torch.distributed.checkpoint.async_save, {executor} executor, DefaultStager(StagingOptions("
            f"use_pinned_memory=False, use_shared_memory={share}, use_async_staging=True, "
            f"use_non_blocking_copy=False)) reused across saves; FileSystemWriter(thread_count={_DCP_THREADS}, "
            "sync_files=True). Pinned memory and non-blocking copies need an accelerator (none here)."
        )
        self._resp: Any = None
        self._dest: str | None = None

    def open(self, ctx: dict[str, Any]) -> None:
        from torch.distributed.checkpoint import state_dict_saver as sds
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self.executor == "process":
            if not hasattr(sds.AsyncCheckpointerType, "PROCESS"):
                raise EngineUnavailable(f"torch {torch.__version__} has no process executor for dcp.async_save")
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise EngineUnavailable("the process executor needs an initialized process group")
        self._type = getattr(sds.AsyncCheckpointerType, self.executor.upper())
        # Pinned memory and non-blocking copies need an accelerator; on CPU these are the best settings.
        cuda = torch.cuda.is_available()
        self._stager = DefaultStager(StagingOptions(cuda, self.executor == "process", True, cuda))

    def begin(self, sd: Any, dest: str, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        self._dest = dest
        self._resp = dcp.async_save(
            sd, storage_writer=self._writer(dest), async_checkpointer_type=self._type, async_stager=self._stager
        )

    def wait_unblocked(self) -> None:
        r = self._resp
        if r is not None and hasattr(r, "staging_completion"):
            r.staging_completion.result()

    def wait_durable(self) -> None:
        r, self._resp = self._resp, None
        if r is None:
            return
        (r.upload_completion if hasattr(r, "upload_completion") else r).result()
        assert self._dest is not None
        self._fsync_dirs(self._dest)

    def worker_pids(self) -> list[int]:
        if self.executor != "process":
            return []
        from torch.distributed.checkpoint import _async_process_executor as ape

        proc = getattr(ape, "_CHECKPOINT_PROCESS", None)
        p = getattr(proc, "_save_process", None)
        return [p.pid] if p is not None and p.pid else []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.wait_durable()
        with contextlib.suppress(Exception):
            self._stager.close()
        if self.executor == "process":
            from torch.distributed.checkpoint import _async_process_executor as ape

            proc = getattr(ape, "_CHECKPOINT_PROCESS", None)
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.__del__()  # sends TERMINATE and joins the daemon it started
                ape._CHECKPOINT_PROCESS = None


# -- nvidia-resiliency-ext ------------------------------------------------------------------------


class NvResiliency(Engine):
    name = "nvre_async"
    label = "nvidia-resiliency-ext"
    description = "nvidia_resiliency_ext.checkpointing.async_ckpt.TorchAsyncCheckpoint (persistent queue)"
    mode = "async"
    own_fsync = False

    def open(self, ctx: dict[str, Any]) -> None:
        if importlib.util.find_spec("nvidia_resiliency_ext") is None:
            raise EngineUnavailable(
                "nvidia-resiliency-ext is not installed (`pip install nvidia-resiliency-ext`; 0.4.1 is the newest "
                "wheel for this Python on the index used here). Even installed, its TorchAsyncCheckpoint.async_save "
                "calls torch.cuda.synchronize() unconditionally, which raises 'Torch not compiled with CUDA enabled' "
                "on a CPU-only torch (checked with 0.4.1 and torch 2.13.0+cpu)"
            )
        from nvidia_resiliency_ext.checkpointing.async_ckpt.torch_ckpt import TorchAsyncCheckpoint

        self._ckpt = TorchAsyncCheckpoint(persistent_queue=True)
        probe = os.path.join(ctx["root"], "nvre-probe.pt")
        try:
            self._ckpt.async_save({"x": torch.zeros(4)}, probe)
            self._ckpt.finalize_async_save(blocking=True)
        except Exception as exc:
            raise EngineUnavailable(f"installed, but a probe save failed: {type(exc).__name__}: {exc}") from exc
        finally:
            remove_path(probe)
        self._last: str | None = None

    def begin(self, sd: Any, dest: str, step: int) -> None:
        self._ckpt.async_save(sd, dest)  # blocks for its preload (the copy) by design
        self._last = dest

    def wait_durable(self) -> None:
        self._ckpt.finalize_async_save(blocking=True)
        if self._last is not None:
            fsync_path(self._last)
            self._last = None

    def dest(self, root: str, tag: str) -> str:
        return os.path.join(root, f"{self.name}-{tag}.pt")

    def worker_pids(self) -> list[int]:
        caller = getattr(getattr(self._ckpt, "_async_calls_queue", None), "persistent_caller", None)
        proc = getattr(caller, "process", None)
        return [proc.pid] if proc is not None and proc.pid else []

    def load(self, dest: str, like: Any) -> Any:
        return torch.load(dest, weights_only=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ckpt.finalize_async_save(blocking=True, terminate=True)


# -- asyncckpt ------------------------------------------------------------------------------------


class AsyncckptSave(Engine):
    name = "asyncckpt_save"
    label = "asyncckpt save"
    description = (
        "asyncckpt.AsyncCheckpointer.save (+ wait_snapshot() = blocked; finalize(blocking=True) = durable: "
        "data and manifest fsync'ed, COMMIT written)"
    )
    mode = "async"
    targets = ("local", "s3")
    verifies_checksums = True

    def open(self, ctx: dict[str, Any]) -> None:
        from asyncckpt import AsyncCheckpointer

        self.storage_options = dict(ctx.get("storage_options") or {})
        self.ckpt = AsyncCheckpointer(storage_options=self.storage_options)

    def dest(self, root: str, tag: str) -> str:
        return f"{root.rstrip('/')}/{self.name}-{tag}"

    def begin(self, sd: Any, dest: str, step: int) -> None:
        self.ckpt.save(sd, dest, step=step, overwrite=True, update_latest=False)

    def wait_unblocked(self) -> None:
        self.ckpt.wait_snapshot()

    def wait_durable(self) -> None:
        self.ckpt.finalize(blocking=True)

    def poll(self) -> None:
        self.ckpt.finalize(blocking=False)

    def before_next_save(self) -> None:
        pass  # save() waits for a slot itself (max_in_flight)

    def worker_pids(self) -> list[int]:
        pid = self.ckpt.queue.worker_pid
        return [pid] if pid else []

    def load(self, dest: str, like: Any) -> Any:
        import asyncckpt

        return asyncckpt.load(dest, storage_options=self.storage_options or None)

    def remove(self, dest: str) -> None:
        if "://" not in dest:
            remove_path(dest)
            return
        from asyncckpt._loop import run_sync
        from asyncckpt.catalog import delete_checkpoint
        from asyncckpt.storage import open_storage, split_uri

        root, name = split_uri(dest)
        storage = open_storage(root, **self.storage_options)
        try:
            run_sync(delete_checkpoint(storage, name, force=True))
        finally:
            run_sync(storage.close())

    def close(self) -> None:
        self.ckpt.close()


class AsyncckptTorch(Engine):
    name = "asyncckpt_torch"
    label = "asyncckpt TorchAsyncCheckpoint"
    description = (
        "asyncckpt.TorchAsyncCheckpoint.async_save (+ wait_snapshot() = blocked; finalize_async_save(blocking=True)"
        " = durable: the worker fsyncs the file and directory); writes a plain torch.save file"
    )
    mode = "async"

    def open(self, ctx: dict[str, Any]) -> None:
        from asyncckpt import TorchAsyncCheckpoint

        self.ckpt = TorchAsyncCheckpoint()
        self.ckpt.queue.start_worker()

    def dest(self, root: str, tag: str) -> str:
        return os.path.join(root, f"{self.name}-{tag}.pt")

    def begin(self, sd: Any, dest: str, step: int) -> None:
        self.ckpt.async_save(sd, dest)

    def wait_unblocked(self) -> None:
        self.ckpt.wait_snapshot()

    def wait_durable(self) -> None:
        self.ckpt.finalize_async_save(blocking=True)

    def poll(self) -> None:
        self.ckpt.finalize_async_save(blocking=False)

    def before_next_save(self) -> None:
        while self.ckpt.queue.get_num_unfinalized_calls() >= 2:
            self.ckpt.finalize_async_save(blocking=False)
            time.sleep(0.005)

    def worker_pids(self) -> list[int]:
        pid = self.ckpt.queue.worker_pid
        return [pid] if pid else []

    def load(self, dest: str, like: Any) -> Any:
        return torch.load(dest, weights_only=True)

    def close(self) -> None:
        self.ckpt.close()


class AsyncckptDcp(_DcpBase):
    """asyncckpt's DCP path (asyncckpt.dcp, when this checkout has it)."""

    name = "asyncckpt_dcp"
    label = "asyncckpt DCP"
    mode = "async"
    targets = ("local", "s3")
    verifies_checksums = True
    description = (
        f"asyncckpt.dcp.async_save, AsyncStorageWriter(files_per_rank={_DCP_THREADS}) (DCP planning in the trainer, "
        "snapshot and write on the persistent worker; "
        "+ handle.wait_snapshot() = blocked; handle.result() = durable: files fsync'ed, .metadata committed); "
        "loaded with dcp.load + asyncckpt.dcp.AsyncStorageReader (CRC32C verified)"
    )

    def open(self, ctx: dict[str, Any]) -> None:
        if importlib.util.find_spec("asyncckpt.dcp") is None:
            raise EngineUnavailable("asyncckpt.dcp does not exist in this checkout")
        import asyncckpt.dcp as adcp

        self._mod = adcp
        self._pending: list[Any] = []
        self.storage_options = dict(ctx.get("storage_options") or {})
        adcp.default_queue().start_worker()

    def dest(self, root: str, tag: str) -> str:
        return f"{root.rstrip('/')}/{self.name}-{tag}"

    def begin(self, sd: Any, dest: str, step: int) -> None:
        writer = self._mod.AsyncStorageWriter(dest, files_per_rank=_DCP_THREADS, storage_options=self.storage_options)
        self._pending.append(self._mod.async_save(sd, storage_writer=writer))

    def wait_unblocked(self) -> None:
        if self._pending:
            self._pending[-1].wait_snapshot()

    def wait_durable(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def poll(self) -> None:
        self._mod.finalize_async_saves(blocking=False)
        self._pending = [h for h in self._pending if not h.done()]

    def before_next_save(self) -> None:
        self.poll()
        while len(self._pending) >= 2:
            self._pending.pop(0).result()

    def worker_pids(self) -> list[int]:
        pid = self._mod.default_queue().worker_pid
        return [pid] if pid else []

    def load(self, dest: str, like: Any) -> Any:
        import torch.distributed.checkpoint as dcp

        target = _empty_like_tree(like)
        reader = self._mod.AsyncStorageReader(dest, verify=True, storage_options=self.storage_options)
        dcp.load(target, storage_reader=reader)
        return target

    def remove(self, dest: str) -> None:
        if "://" not in dest:
            remove_path(dest)
            return
        from asyncckpt._loop import run_sync
        from asyncckpt.storage import open_storage

        storage = open_storage(dest, **self.storage_options)
        try:
            for key in run_sync(storage.list()):
                run_sync(storage.delete(key))
        finally:
            run_sync(storage.close())

    def close(self) -> None:
        self._mod.close_async_saves()


# -- physical limits ------------------------------------------------------------------------------


class MemcpyFloor:
    """One copy of every tensor into a preallocated (already faulted-in) byte buffer.

    Timed two ways, each once per call: libc memcpy (ctypes.memmove, one thread) and torch's
    ``copy_`` (its intra-op threads, what the engines use). The floor is the faster of the two.
    """

    def __init__(self, sd: Any) -> None:
        self.tensors = [t for t in flat_tensors(sd).values() if t.is_contiguous()]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        self.buf = torch.zeros(self.nbytes, dtype=torch.uint8)  # zeros: every page touched once

    def run(self) -> dict[str, float]:
        base = self.buf.data_ptr()
        t0 = time.perf_counter()
        off = 0
        for t in self.tensors:
            n = t.numel() * t.element_size()
            ctypes.memmove(base + off, t.data_ptr(), n)
            off += n
        t1 = time.perf_counter()
        off = 0
        for t in self.tensors:
            n = t.numel() * t.element_size()
            self.buf[off : off + n].copy_(t.reshape(-1).view(torch.uint8))
            off += n
        t2 = time.perf_counter()
        return {"libc": t1 - t0, "torch": t2 - t1, "floor": min(t1 - t0, t2 - t1)}


#: The ways ``raw_disk_write`` writes the bytes; the fastest counts as the disk's limit.
# (name, O_DIRECT, chunk, threads, flush, from huge pages). The source buffer matters to O_DIRECT:
# from transparent huge pages the kernel pins 512x fewer pages per write, and asyncckpt's staging
# slots use them where the kernel allows, so the limit must be measured from them too.
RAW_DISK_METHODS = (
    ("pwrite 16 MiB x 4 threads + fsync", False, 16 * MiB, 4, "fsync", False),
    ("write 64 MiB x 1 thread, sequential + fdatasync", False, 64 * MiB, 1, "fdatasync", False),
    ("pwrite 32 MiB x 2 threads + fdatasync", False, 32 * MiB, 2, "fdatasync", False),
    ("O_DIRECT 32 MiB x 2 threads + fdatasync", True, 32 * MiB, 2, "fdatasync", False),
    ("O_DIRECT 64 MiB x 1 thread + fdatasync", True, 64 * MiB, 1, "fdatasync", False),
    ("O_DIRECT 32 MiB x 2 threads + fdatasync, from huge pages", True, 32 * MiB, 2, "fdatasync", True),
    ("O_DIRECT 32 MiB x 4 threads + fdatasync, from huge pages", True, 32 * MiB, 4, "fdatasync", True),
)


def _huge_page_buffer(nbytes: int) -> mmap.mmap | None:
    """Private anonymous memory in transparent huge pages, or None where the kernel offers none."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return None
    mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # shared anonymous memory gets no huge pages
    try:
        mem.madvise(advice)
    except OSError:
        mem.close()
        return None
    return mem


def _raw_write_once(view: memoryview, path: str, direct: bool, chunk: int, threads: int, sync: str) -> float:
    n = len(view)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)

    def one(i: int) -> None:
        part = view[i : min(n, i + chunk)]
        off = i
        while part:
            w = os.pwrite(fd, part, off)
            part, off = part[w:], off + w

    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        starts = range(0, n - n % 4096 if direct else n, chunk)
        if threads == 1:  # plain sequential writes from this thread
            for i in starts:
                one(i)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, starts))
        if direct and n % 4096:  # an unaligned tail goes through the page cache
            tail = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(tail, view[n - n % 4096 :], n - n % 4096)
                getattr(os, sync)(tail)
            finally:
                os.close(tail)
        getattr(os, sync)(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


def raw_disk_write(buf: torch.Tensor, path: str) -> tuple[float, str, dict[str, float]]:
    """Write ``buf`` to ``path`` every way in RAW_DISK_METHODS (file and directory made durable);
    returns (fastest seconds, its method, seconds of each method)."""
    n = buf.numel() * buf.element_size()
    src = memoryview(buf.numpy()).cast("B")
    buffers = {False: mmap.mmap(-1, max(n, 1)), True: _huge_page_buffer(max(n, 1))}  # page-aligned for O_DIRECT
    views = {}
    for huge, mem in buffers.items():
        if mem is not None:
            views[huge] = memoryview(mem)[:n]
            views[huge][:] = src
    times: dict[str, float] = {}
    try:
        for name, direct, chunk, threads, sync, huge in RAW_DISK_METHODS:
            if (direct and not hasattr(os, "O_DIRECT")) or huge not in views:
                continue
            try:
                times[name] = _raw_write_once(views[huge], path, direct, chunk, threads, sync)
            except OSError:  # e.g. O_DIRECT refused by this filesystem
                continue
    finally:
        for v in views.values():
            v.release()
        for mem in buffers.values():
            if mem is not None:
                mem.close()
    best = min(times, key=times.__getitem__)
    return times[best], best, times


def raw_s3_upload(buf: torch.Tensor, uri: str, options: dict[str, Any], part: int = 32 * MiB,
                  concurrency: int = 8) -> float:
    """A plain aiobotocore multipart upload of ``buf`` (``concurrency`` parts in flight); seconds."""
    from aiobotocore.session import get_session

    body = uri.split("://", 1)[1]
    bucket, _, prefix = body.partition("/")
    key = f"{prefix.rstrip('/')}/raw-limit-{os.getpid()}-{time.time_ns()}" if prefix else f"raw-limit-{time.time_ns()}"
    view = memoryview(buf.numpy())
    n = len(view)

    async def go() -> float:
        session = get_session()
        kw = {k: v for k, v in options.items() if k in (
            "endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")}
        kw.setdefault("region_name", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        async with session.create_client("s3", **kw) as s3:
            t0 = time.perf_counter()
            up = await s3.create_multipart_upload(Bucket=bucket, Key=key)
            uid = up["UploadId"]
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int, off: int) -> dict[str, Any]:
                async with sem:
                    r = await s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=i + 1,
                                             Body=bytes(view[off : min(n, off + part)]))
                    return {"PartNumber": i + 1, "ETag": r["ETag"]}

            try:
                parts = await asyncio.gather(*(one(i, off) for i, off in enumerate(range(0, n, part))))
                await s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=uid,
                                                   MultipartUpload={"Parts": list(parts)})
            except BaseException:
                await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=uid)
                raise
            dt = time.perf_counter() - t0
            await s3.delete_object(Bucket=bucket, Key=key)
            return dt

    return asyncio.run(go())


def all_engines() -> list[Engine]:
    """Every engine, in the order they are reported."""
    return [
        TorchSave(),
        DcpSave(),
        DcpAsync("thread"),
        DcpAsync("process"),
        NvResiliency(),
        AsyncckptSave(),
        AsyncckptTorch(),
        AsyncckptDcp(),
    ]


ENGINE_NAMES = [e.name for e in all_engines()]

__all__ = [
    "ENGINE_NAMES",
    "Engine",
    "EngineUnavailable",
    "MemcpyFloor",
    "all_engines",
    "drop_page_cache",
    "flat_tensors",
    "fsync_path",
    "raw_disk_write",
    "raw_s3_upload",
    "remove_path",
    "same_state",
    "state_nbytes",
]

