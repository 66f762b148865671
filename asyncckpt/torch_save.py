"""TorchAsyncCheckpoint: an async ``torch.save``, nvidia-resiliency-ext's names and contract.

``async_save(state_dict, *args, **kwargs)`` takes what ``torch.save`` takes (a path or a
file-like object, ``pickle_protocol``, ...) and writes what ``torch.save`` would have written
at the call: the object is pickled in the trainer with every plain tensor replaced by a
reference, each tensor storage is snapshotted by the worker (whole storages, so tensors that
share one still share it in the file, with their offsets and strides), and the worker runs
``torch.save`` on the rebuilt object. A path is written to a temporary file that is fsynced and
renamed (never a half-written file under the name); a file-like object receives the bytes at
finalize. Safety lives on the load side: ``torch.load(weights_only=True)`` refuses pickles.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import io
import os
import pickle
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .checkpointer import check_when_full
from .engine import write_parts
from .errors import BadInputError, CheckpointError, StorageError
from .format import view_of_storage
from .format.torchzip import TorchZip, data_offsets, plain_save, record
from .plan import INLINE_MAX
from .queue import AsyncCallsQueue, Job, Stage
from .runtime.messages import Kind
from .runtime.protocol import SavePayload
from .snapshot import SnapshotMode, SnapshotPolicy
from .staging import SharedRegistry, SnapshotGuard, SnapshotSpec
from .storage import LocalStorage, check_key

if TYPE_CHECKING:
    from .runtime.context import WorkerContext
    from .staging import Staged

__all__ = ["TorchAsyncCheckpoint", "TorchSaveSink"]

_TAG = "asyncckpt.tensor"
_ALIGN = 64
_CHUNK = 32 << 20  # the native engine's chunk size and depth (SaveJob's defaults)
_IO_DEPTH = 4
_DIRECT_MIN = 64 << 10  # smaller tensor writes go out with the zip structures around them
_BLOCK = 4096  # O_DIRECT's alignment of file offsets, lengths and buffer addresses
_DIRECT_FILE_MIN = 16 << 20  # files smaller than this are written buffered (LocalStorage's threshold)


@dataclass
class _TensorRef:
    storage: int  # index into TorchSaveJob.storages
    dtype: torch.dtype
    offset: int  # storage offset, in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool
    parameter: bool


@dataclass
class TorchSaveJob:
    """One ``torch.save``: the pickled object with tensor references, and where the storages are staged."""

    path: str | None  # None: return the bytes (the caller passed a file-like object)
    skeleton: bytes
    tensors: list[_TensorRef]
    storages: list[tuple[int, int]]  # (slot offset, nbytes) of each storage
    save_kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"torch.save to {self.path or '<file object>'}"


@dataclass
class TorchSaveResult:
    path: str | None
    nbytes: int
    seconds: float
    data: bytes | None = None  # the file's bytes when the target was a file-like object


class _SkeletonPickler(pickle.Pickler):
    """Pickles the state with each plain CPU/CUDA tensor replaced by a reference to it."""

    def __init__(self, file: io.BytesIO, found: list[torch.Tensor]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.found = found
        self._ids: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            return None
        t: torch.Tensor = obj
        if t.layout != torch.strided or t.device.type not in ("cpu", "cuda") or t.is_quantized:
            return None  # pickled as torch pickles it (a copy, consistent at the call)
        if t.is_conj() or t.is_neg() or getattr(t, "is_nested", False):
            return None
        i = self._ids.get(id(t))
        if i is None:
            i = self._ids[id(t)] = len(self.found)
            self.found.append(t)
        return (_TAG, i)


class _SkeletonUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == _TAG:
            return self.tensors[pid[1]]
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


class _RecordingFile:
    """A file wrapper that remembers the OSError of a failed write (torch.save turns it into a RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, *a: Any) -> int:
        return self.f.seek(*a)


def _rebuild(job: TorchSaveJob, staged: Staged) -> Any:
    storages = []
    for off, n in job.storages:
        buf = staged.slot.view[off : off + n]
        storages.append(torch.frombuffer(buf, dtype=torch.uint8).untyped_storage() if n else torch.UntypedStorage(0))
    tensors = []
    for r in job.tensors:
        t = view_of_storage(storages[r.storage], r.dtype, r.offset, r.size, r.stride)
        if r.parameter:
            t = torch.nn.Parameter(t, requires_grad=r.requires_grad)
        elif r.requires_grad:
            t.requires_grad_(True)
        tensors.append(t)
    return _SkeletonUnpickler(io.BytesIO(job.skeleton), tensors).load()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_failure(path: str, cause: BaseException, exc: BaseException) -> BaseException:
    """The StorageError to raise for an OSError ``cause`` (else ``exc`` itself)."""
    if not isinstance(cause, OSError):
        return exc
    code = cause.errno or 0
    hint = {errno_mod.ENOSPC: " (the disk is full)", errno_mod.EACCES: " (permission denied)",
            errno_mod.EROFS: " (read-only file system)", errno_mod.EDQUOT: " (disk quota exceeded)"}.get(code, "")
    what = cause.strerror or cause
    err = StorageError(code, f"async torch.save to {path} failed: {what}{hint}; "
                             "no file was left behind and an earlier file of that name is intact")
    err.__cause__ = exc
    return err


def _save_to_path(obj: Any, path: str, kwargs: dict[str, Any]) -> int:
    """The buffered path (a legacy, non-zip ``torch.save``): torch.save into a temp file, fsync, rename."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    rec: _RecordingFile | None = None
    try:
        with open(tmp, "wb") as f:
            rec = _RecordingFile(f)
            plain_save(obj, rec, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
        return os.path.getsize(path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _storage_failure(path, rec.error if rec is not None and rec.error is not None else exc, exc) from exc


async def _write_archive(zf: TorchZip, slot: memoryview, path: str) -> None:
    """Write ``zf`` to ``path`` the way the native engine writes its data file: tensor bytes in
    chunks straight from the slot (O_DIRECT where aligned), several in flight, the CRC-32s computed
    meanwhile; the small zip structures last; one fdatasync, rename, then the directory's fsync."""
    parent, name = os.path.split(path)
    storage = LocalStorage(parent)
    try:
        writer = await storage.open_writer(name, size_hint=zf.size)
        direct, gathered = zf.layout(_DIRECT_MIN, _BLOCK, _CHUNK)
        crcs = asyncio.ensure_future(asyncio.to_thread(zf.checksum))
        sem = asyncio.Semaphore(_IO_DEPTH)

        async def part(i: int) -> None:
            if i < len(direct):
                f, s, n = direct[i]
                async with sem:
                    await writer.write_part(i, f, slot[s : s + n])
                return
            await crcs
            for k, (f, n) in enumerate(gathered):
                await writer.write_part(i + k, f, memoryview(zf.read(f, n)))

        try:
            await write_parts(writer, len(direct) + 1, part)
        finally:
            if not crcs.done():
                crcs.cancel()
            await asyncio.gather(crcs, return_exceptions=True)
        await asyncio.to_thread(_fsync_dir, parent)
    finally:
        await storage.close()


class TorchSaveSink:
    """Writes the ``torch.save`` archive of the object rebuilt over the staged storages.

    The archive is recorded (:func:`asyncckpt.format.torchzip.record`: the small zip structures
    kept, the tensor bytes left in the slot) and written from the slot by the native chunked
    writer; a legacy (non-zip) ``torch.save`` runs ``torch.save`` into a buffered file instead.
    """

    async def write(self, ctx: WorkerContext, job: TorchSaveJob, staged: Staged) -> TorchSaveResult:
        t0 = time.perf_counter()
        legacy = job.save_kwargs.get("_use_new_zipfile_serialization", True) is False
        if legacy or (job.path is not None and not _is_key(os.path.basename(job.path))):
            return await asyncio.to_thread(_write_buffered, job, staged, t0)
        slot = staged.slot.view
        zf = await asyncio.to_thread(lambda: record(_rebuild(job, staged), slot, **job.save_kwargs))
        if job.path is None:
            await asyncio.to_thread(zf.checksum)
            data = zf.getvalue()
            return TorchSaveResult(None, len(data), time.perf_counter() - t0, data)
        try:
            await _write_archive(zf, slot, job.path)
        except (OSError, StorageError) as exc:
            cause = exc.__cause__ if isinstance(exc, StorageError) and isinstance(exc.__cause__, OSError) else exc
            raise _storage_failure(job.path, cause, exc) from exc
        return TorchSaveResult(job.path, zf.size, time.perf_counter() - t0)


def _is_key(name: str) -> bool:
    """Whether the storage layer takes ``name`` as a key (it refuses backslashes, for one)."""
    try:
        check_key(name)
    except CheckpointError:
        return False
    return True


def _write_buffered(job: TorchSaveJob, staged: Staged, t0: float) -> TorchSaveResult:
    obj = _rebuild(job, staged)
    if job.path is None:
        buf = io.BytesIO()
        plain_save(obj, buf, **job.save_kwargs)
        data = buf.getvalue()
        return TorchSaveResult(None, len(data), time.perf_counter() - t0, data)
    n = _save_to_path(obj, job.path, job.save_kwargs)
    return TorchSaveResult(job.path, n, time.perf_counter() - t0)


_SAVE_ARGS = ("f", "pickle_module", "pickle_protocol", "_use_new_zipfile_serialization", "_disable_byteorder_record")


class TorchAsyncCheckpoint:
    """Async ``torch.save`` (nvidia-resiliency-ext's ``TorchAsyncCheckpoint``, on asyncckpt's worker).

    ``async_save(state_dict, f, ...)`` returns once the snapshot is taken (the NVRx contract; with
    an attached optimizer, ``snapshot="auto"`` lets it return at once and ``optimizer.step()``
    wait instead); ``finalize_async_save()`` completes finished saves (``blocking=True`` waits
    for all); ``close()`` finishes everything. Files are read by ``torch.load``.

    Args:
        persistent_queue: NVRx's argument; the worker is always persistent.
        snapshot: ``"auto"`` (default), ``"blocking"`` or ``"lazy"`` (see :mod:`asyncckpt.snapshot`).
        optimizers / modules: attach their hooks (``optimizer.step()`` waits for the snapshot).
        max_in_flight / when_full: saves in flight at most; ``"wait"`` or ``"skip"`` beyond.
        finish_at_exit: saves pending at normal interpreter exit are finished (default).
    """

    async_fn: Callable[..., Any] | None = None  # NVRx's class attribute (the function its worker runs); unused here

    def __init__(
        self,
        persistent_queue: bool = True,
        *,
        snapshot: SnapshotMode = "auto",
        optimizers: Any = None,
        modules: Any = None,
        max_in_flight: int = 2,
        when_full: str | None = None,
        worker_options: dict[str, Any] | None = None,
        finish_at_exit: bool = True,
        allow_pickle: bool | None = None,
    ) -> None:
        if allow_pickle is not None:
            warnings.warn("TorchAsyncCheckpoint(allow_pickle=...) is deprecated and ignored: it writes whatever "
                          "torch.save writes; torch.load(weights_only=True) refuses pickles on load",
                          DeprecationWarning, stacklevel=2)
        if max_in_flight < 1:
            raise BadInputError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.save = torch.save  # NVRx's attribute: the synchronous save
        self.max_in_flight = max_in_flight
        self.when_full = check_when_full(when_full, None, "TorchAsyncCheckpoint")
        self._async_calls_queue = AsyncCallsQueue(
            persistent_queue, worker_options={"max_in_flight": max_in_flight, **(worker_options or {})},
            finish_at_exit=finish_at_exit,
        )
        self._policy = SnapshotPolicy(snapshot, self, TorchAsyncCheckpoint.wait_snapshot)
        self._registry = SharedRegistry()
        self._gen = -1
        self._offsets: tuple[Any, dict[int, int]] | None = None  # (structure, file_offsets) of the last save
        self._pending_files: dict[int, Any] = {}
        self.skipped = 0
        if optimizers is not None or modules is not None:
            self.attach(optimizers, modules)

    @property
    def queue(self) -> AsyncCallsQueue:
        return self._async_calls_queue

    def _get_async_calls_queue(self) -> AsyncCallsQueue:  # NVRx's test helper
        return self._async_calls_queue

    def attach(self, optimizers: Any = None, modules: Any = None) -> None:
        """Make ``optimizer.step()`` (and module forward) wait for the snapshot, so saves can return at once."""
        self._policy.attach(optimizers, modules)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if len(args) > len(_SAVE_ARGS):
            raise BadInputError(f"async_save takes at most {len(_SAVE_ARGS)} positional arguments after the state, as torch.save")
        bound = dict(zip(_SAVE_ARGS, args))
        for k, v in kwargs.items():
            if k in bound:
                raise BadInputError(f"async_save got {k!r} twice")
            if k not in _SAVE_ARGS:
                raise BadInputError(f"async_save got an unexpected argument {k!r} (torch.save takes {', '.join(_SAVE_ARGS)})")
            bound[k] = v
        if "f" not in bound:
            raise BadInputError("async_save needs a destination: async_save(state_dict, path_or_file)")
        f = bound.pop("f")
        if bound.get("pickle_module") is not None and bound["pickle_module"] is not pickle:
            mod = bound["pickle_module"]
            if not getattr(mod, "__name__", None):
                raise BadInputError("pickle_module must be an importable module")
        return f, bound

    def async_save(self, state_dict: Any, *args: Any, finalize_fns: list[Any] | None = None, **kwargs: Any) -> int | None:
        """Schedule ``torch.save(state_dict, *args, **kwargs)`` on the worker; returns its call index.

        Returns None when the save was skipped (``when_full="skip"``). Bad arguments raise
        BadInputError at once; a storage failure (ENOSPC, EACCES, EROFS) raises StorageError at
        finalize and leaves no temporary file.
        """
        f, save_kwargs = self._bind(args, kwargs)
        path: str | None
        if isinstance(f, (str, os.PathLike)):
            path = target = os.path.abspath(os.fspath(f))
            parent = os.path.dirname(target)
            if not os.path.isdir(parent):
                raise BadInputError(f"cannot write {target}: its directory {parent} does not exist")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise BadInputError(f"cannot write {target}: {parent} is not writable by this process")
            if os.path.isdir(target):
                raise BadInputError(f"cannot write {target}: it is a directory")
        elif callable(getattr(f, "write", None)):
            path = None
        else:
            raise BadInputError(f"async_save: f must be a path or a writable file object, got {type(f).__name__}")
        found: list[torch.Tensor] = []
        buf = io.BytesIO()
        try:
            _SkeletonPickler(buf, found).dump(state_dict)
        except Exception as exc:
            raise BadInputError(f"async_save: the object cannot be pickled ({type(exc).__name__}: {exc})") from exc
        if not self._slot_free():
            self.skipped += 1
            return None
        job, spec, shared = self._plan(path, buf.getvalue(), found, save_kwargs, state_dict)
        mode = self._policy.decide(t for _, t in shared)
        what = path or "a file object"
        fns = list(finalize_fns or [])
        holder: dict[str, int] = {}
        if path is None:
            fns.insert(0, lambda: self._deliver(holder["idx"], f))
        call = Job([Stage(Kind.SAVE, SavePayload(TorchSaveSink(), spec, job))], fns, guard=SnapshotGuard(shared),
                   label=f"torch.save to {what}", on_torn=lambda keys: self._policy.on_torn(what, keys))
        holder["idx"] = idx = self.queue.schedule_job(call, snapshot=mode, world=1)
        return idx

    def _deliver(self, idx: int, f: Any) -> None:
        res = self.queue.call_result(idx)
        if isinstance(res, TorchSaveResult) and res.data is not None:
            f.write(res.data)

    def _slot_free(self) -> bool:
        if self.queue.get_num_unfinalized_calls() < self.max_in_flight:
            return True
        self.finalize_async_save(blocking=False)
        if self.when_full == "skip":
            return self.queue.get_num_unfinalized_calls() < self.max_in_flight
        while self.queue.get_num_unfinalized_calls() >= self.max_in_flight:
            time.sleep(0.002)
            self.finalize_async_save(blocking=False)
        return True

    def _plan(self, path: str | None, skeleton: bytes, found: list[torch.Tensor], save_kwargs: dict[str, Any],
              state: Any) -> tuple[TorchSaveJob, SnapshotSpec, list[tuple[str, torch.Tensor]]]:
        """Lay out every distinct storage of ``found`` in the slot; small ones are copied now.

        A storage is placed where its bytes sit in the file modulo the O_DIRECT block, so the
        worker can write them straight from the slot with O_DIRECT (see :func:`file_offsets`).
        """
        self.queue.start_worker()
        if self._gen != self.queue.worker_generation:
            self._registry.reset()
            self._gen = self.queue.worker_generation
        order: dict[tuple[str, int], int] = {}
        bases: list[torch.Tensor] = []
        refs: list[_TensorRef] = []
        for t in found:
            key = _storage_key(t)
            si = order.get(key)
            if si is None:
                si = order[key] = len(bases)
                bases.append(torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()))
            refs.append(_TensorRef(si, t.dtype, int(t.storage_offset()), tuple(t.shape), tuple(t.stride()),
                                   t.requires_grad, type(t) is torch.nn.Parameter))
        if any(b.is_cuda for b in bases):
            torch.cuda.current_stream().synchronize()
        # Where the records sit in the file depends on the pickled structure alone (tensor bytes
        # are not pickled): a state saved again with the same skeleton reuses them. A stale guess
        # would only cost O_DIRECT, never correctness: the worker lays out the real archive.
        structure = (skeleton, tuple(b.numel() for b in bases), repr(sorted(save_kwargs.items())))
        if self._offsets is None or self._offsets[0] != structure:
            self._offsets = (structure, file_offsets(path, bases, state, save_kwargs))
        layout, nbytes = slot_layout(bases, self._offsets[1])
        big: dict[int, torch.Tensor] = {}
        inline: list[tuple[int, bytes]] = []
        for si, (b, (off, n)) in enumerate(zip(bases, layout)):
            if b.device.type == "cpu" and n <= INLINE_MAX:
                inline.append((off, b.numpy().tobytes() if n else b""))
            else:
                big[si] = b
        # Decided before prepare(): moving a storage to shared memory changes its address.
        shared = [(f"tensor {i} {tuple(t.shape)}", t) for i, (t, r) in enumerate(zip(found, refs)) if r.storage in big]
        sref, new, release = self._registry.prepare(big)
        if new:
            self._policy.storages_moved()
        spec = SnapshotSpec(nbytes=nbytes, copies=[(layout[si][0], r) for si, r in sref.items()], inline=inline,
                            new_storages=new, release=release)
        return TorchSaveJob(path, skeleton, refs, layout, save_kwargs), spec, shared

    def wait_snapshot(self, timeout: float | None = None) -> None:
        """Block until every pending save's snapshot is taken (then the state may change)."""
        self.queue.wait_snapshot(timeout)

    def finalize_async_save(self, blocking: bool = False, no_dist: bool = True, terminate: bool = False) -> list[int]:
        """Finish completed saves (all of them with ``blocking``); ``terminate`` closes the queue after.

        Returns the finalized call indices; a failed save raises its error here.
        """
        try:
            return self.queue.maybe_finalize_async_calls(blocking=blocking, no_dist=no_dist)
        finally:
            if terminate:
                self.close()

    def close(self, abort: bool = False) -> None:
        """Finish every pending save (unless ``abort``) and stop the worker."""
        self._policy.close()
        self.queue.close(abort=abort, no_dist=True)

    def __enter__(self) -> TorchAsyncCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def slot_layout(bases: list[torch.Tensor], in_file: dict[int, int]) -> tuple[list[tuple[int, int]], int]:
    """(slot offset, nbytes) of each storage, and the slot's size: each storage starts where its
    bytes start in the file (``in_file``, from :func:`file_offsets`) modulo O_DIRECT's block when
    that is known, else 64-aligned."""
    layout: list[tuple[int, int]] = []
    off = 0
    for si, b in enumerate(bases):
        f = in_file.get(si)
        off += (f - off) % _BLOCK if f is not None else -off % _ALIGN
        layout.append((off, b.numel()))
        off += b.numel()
    return layout, off


def file_offsets(path: str | None, bases: list[torch.Tensor], state: Any, save_kwargs: dict[str, Any]
                  ) -> dict[int, int]:
    """Where each storage's bytes will start in the ``.pt`` file, by storage index ({} if unknown).

    Found by a ``skip_data`` torch.save of the state (no tensor byte read), only for a file
    large enough for O_DIRECT; the records must match the storages one to one (a tensor that
    torch pickles by value, e.g. a quantized one, adds records of its own: then {}).
    """
    sizes = [b.numel() for b in bases]
    if path is None or save_kwargs.get("_use_new_zipfile_serialization", True) is False or sum(sizes) < _DIRECT_FILE_MIN:
        return {}
    try:
        records = data_offsets(state, **save_kwargs)
    except Exception:  # noqa: BLE001 - a layout hint only: the worker's torch.save reports real errors
        return {}
    nonempty = [si for si, n in enumerate(sizes) if n]
    if [n for _, n in records] != [sizes[si] for si in nonempty]:
        return {}
    return {si: f for si, (f, _) in zip(nonempty, records)}


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())
