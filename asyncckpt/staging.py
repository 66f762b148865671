"""Tensor sharing and the snapshot guard (trainer side); the staging pool and the copy (worker side).

Trainer: a tensor's whole storage is moved to shared memory once (CPU) or exported as a CUDA IPC
handle, registered under an id and kept alive; later saves send only the id. Storages not used
by a save are released on both sides, so the registry never outgrows one state dict. A
:class:`SnapshotGuard` records every shared tensor's in-place version counter at ``save()``; when
the worker's "snapshot done" ack arrives, a changed counter means the copy may be torn.

Worker: :func:`take_snapshot` copies what a :class:`SnapshotSpec` names into a slot of a reusable
staging pool (pinned host memory when CUDA is present, page-aligned anonymous memory otherwise),
laid out exactly as the sink will write it.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import mmap
import operator
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .runtime.context import WorkerContext

__all__ = [
    "CopyProgram",
    "CopyProgress",
    "EarlyWriter",
    "SharedRef",
    "SharedRegistry",
    "SnapshotGuard",
    "SnapshotSpec",
    "Staged",
    "StagingPool",
    "StagingSlot",
    "TrainerCopies",
    "flat_bytes",
    "share_in_place",
    "start_fd_sharing",
    "take_snapshot",
]


@dataclass(frozen=True)
class SharedRef:
    """Where a tensor lives inside a shared storage."""

    storage_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements of dtype


_version = operator.attrgetter("_version")


@dataclass
class SnapshotSpec:
    """What one snapshot copies into its staging slot, laid out as ``nbytes`` bytes.

    ``copies`` are (slot offset, tensor in a shared storage), ``inline`` are (slot offset, bytes
    copied at ``save()``). Storages in ``new_storages`` are registered by the worker under their
    ids (``ephemeral``: only for this snapshot); ids in ``release`` are forgotten first.
    """

    nbytes: int
    copies: list[tuple[int, SharedRef]] = field(default_factory=list)
    inline: list[tuple[int, bytes]] = field(default_factory=list)
    new_storages: dict[int, torch.Tensor] = field(default_factory=dict)
    release: list[int] = field(default_factory=list)
    ephemeral: bool = False


class SnapshotGuard:
    """Records each tensor's in-place version counter (``Tensor._version``) when a save is asked for.

    Views and ``.detach()`` share their base's counter, so any in-place write through the tensor
    or a view of it bumps it. Writes through ``.data``, NumPy/DLPack views of the storage, or
    other processes are invisible to it (see docs/snapshot.md).
    """

    __slots__ = ("_items",)

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        pairs = list(named)
        tensors = [t for _, t in pairs]
        # keys, tensors, their counters (read in one C-level pass); one attribute, replaced whole
        self._items: tuple[list[str], list[torch.Tensor], list[int]] = (
            [k for k, _ in pairs], tensors, list(map(_version, tensors)))

    def __len__(self) -> int:
        return len(self._items[1])

    def changed(self) -> list[str]:
        """The keys whose tensor was modified in place since the guard was made."""
        keys, tensors, versions = self._items
        now = list(map(_version, tensors))
        if now == versions:
            return []
        return [k for k, a, b in zip(keys, now, versions) if a != b]

    def release(self) -> None:
        """Drop the references to the tensors (after the check)."""
        self._items = ([], [], [])


class TrainerCopies:
    """Small CPU tensors copied by the trainer at ``save()`` into reusable shared-memory slabs.

    Copying a few MiB takes a fraction of a millisecond, less than any round trip to the worker,
    and the copy is consistent at once: no guard, no hook wait. Each save uses one slab until the
    worker has copied it into its staging slot (its ACK); ``runs`` map contiguous stretches of the
    data file to the slab, so the worker does one copy per stretch, not one per tensor.
    """

    def __init__(self, max_slabs: int) -> None:
        self.max_slabs = max(2, max_slabs)
        self._slabs: list[torch.Tensor] = []
        self._busy: dict[int, int] = {}  # slab index -> call index that still reads it

    def bases(self) -> dict[int, torch.Tensor]:
        """Every slab, keyed -1, -2, ... (so the registry keeps them shared across saves)."""
        return {-(i + 1): t for i, t in enumerate(self._slabs)}

    def release(self, done: Callable[[int], bool]) -> None:
        """Forget the slabs whose save's snapshot is taken (``done(call_idx)``)."""
        for i, idx in list(self._busy.items()):
            if done(idx):
                del self._busy[i]

    def reserve(self, nbytes: int, count: int | None = None) -> None:
        """Allocate (and touch) every slab (the first ``count``) for copies of ``nbytes`` now, not in
        the first saves."""
        cap = max(1 << 20, 1 << (max(nbytes, 1) - 1).bit_length())
        for i in range(self.max_slabs if count is None else min(count, self.max_slabs)):
            if i < len(self._slabs) and (self._slabs[i].numel() >= nbytes or i in self._busy):
                continue
            slab = torch.zeros(cap, dtype=torch.uint8).share_memory_()
            if i < len(self._slabs):
                self._slabs[i] = slab
            else:
                self._slabs.append(slab)

    def clear(self) -> None:
        """Drop every slab (the checkpointer is closed)."""
        self._slabs.clear()
        self._busy.clear()

    def busy(self, slab: int, call_idx: int) -> None:
        self._busy[slab] = call_idx

    def _slab_for(self, nbytes: int) -> int | None:
        free = [i for i in range(len(self._slabs)) if i not in self._busy]
        fitting = [i for i in free if self._slabs[i].numel() >= nbytes]
        if fitting:
            return min(fitting, key=lambda i: self._slabs[i].numel())
        cap = max(1 << 20, 1 << (max(nbytes, 1) - 1).bit_length())
        if len(self._slabs) < self.max_slabs:
            self._slabs.append(torch.empty(cap, dtype=torch.uint8).share_memory_())
            return len(self._slabs) - 1
        if free:  # replace the largest free slab by one that fits
            i = max(free, key=lambda i: self._slabs[i].numel())
            self._slabs[i] = torch.empty(cap, dtype=torch.uint8).share_memory_()
            return i
        return None

    def copy(self, program: CopyProgram, leaves: list[torch.Tensor],
             moved: list[int]) -> tuple[int, list[tuple[int, int, int]]] | None:
        """Run ``program`` (the state's ``leaves`` fill its per-save inputs) into a free slab.

        Returns (slab index, runs as (file offset, slab offset, length)), or None when every slab
        is still in use (the caller waits for a snapshot and asks again).
        """
        slab_i = self._slab_for(program.nbytes)
        if slab_i is None:
            return None
        program.run(self._slabs[slab_i][: program.nbytes], leaves, moved)
        return slab_i, program.spans


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a 1-D uint8 tensor: a view when ``t`` is contiguous, else a copy."""
    src = t.detach()
    bits = _BITS.get(src.element_size())
    if bits is not None and src.dtype != bits:
        src = src.view(bits)  # a byte copy works for every dtype (bits8, float8 ... have no copy kernel)
    return src.contiguous().reshape(-1).view(torch.uint8)


_ZEROS = torch.zeros(64, dtype=torch.uint8)
_PADS = [_ZEROS[:n] for n in range(65)]  # made once: a view costs about a microsecond
_requires_grad = operator.attrgetter("requires_grad")


def _byte_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`flat_bytes` of each tensor, at one view (two for more than one dimension) per
    contiguous tensor instead of five ops."""
    if (all(map(torch.Tensor.is_contiguous, tensors)) and not any(map(_requires_grad, tensors))
            and all(map(torch.Tensor.dim, tensors))):
        try:  # the usual case, without a Python step per tensor
            out = list(map(torch.Tensor.view, tensors, itertools.repeat(torch.uint8)))
        except RuntimeError:  # a size-1 last dim with another stride: one by one below
            pass
        else:
            for i, d in enumerate(map(torch.Tensor.dim, out)):
                if d > 1:
                    out[i] = out[i].view(-1)
            return out
    out = []
    append = out.append
    u8 = torch.uint8
    for t in tensors:
        if t.is_contiguous() and t.dim() and not t.requires_grad:
            try:
                v = t.view(u8)  # a reinterpretation: any dtype, no copy kernel needed
            except RuntimeError:  # a size-1 last dim with another stride: the general way
                append(flat_bytes(t))
                continue
            append(v if v.dim() == 1 else v.view(-1))
        else:
            append(flat_bytes(t))
    return out


class CopyProgram:
    """How ``save()`` copies many small CPU tensors into a slab: one ``torch.cat`` (one C call).

    Built once per layout (see :class:`~asyncckpt.plan.PlanCache`): the inputs are flat byte views
    of the tensors (which keep their addresses while the layout holds) with zero padding between
    them, so the slab holds the data file's runs byte for byte, gaps zeroed. Tensors that are not
    contiguous are copied afresh each save (``patches``: input index -> leaf position).

    Many small inputs (``JOIN_MIN`` or more, ``JOIN_MAX_AVG`` bytes each on average) are held as
    NumPy views and gathered by ``bytes.join``: ~40 ns an input against ~220 ns in ``torch.cat``
    (50,000 tensors of 64 bytes: 2.6 ms with the copy into the slab, against 10.8 ms). Making the
    views costs ~1 µs an input, once per layout.
    """

    JOIN_MIN = 64
    JOIN_MAX_AVG = 1024
    JOIN_MAX_BYTES = 256 << 20  # above this, np.concatenate writes into the slab without a temporary

    def __init__(self, items: list[tuple[int, int, torch.Tensor, int]]) -> None:
        """``items``: (data-file offset, nbytes, tensor, its position among the state's leaves or -1), by offset."""
        runs: list[list[int]] = []
        for off, n, _, _ in items:
            if runs and off - runs[-1][1] < 64:  # adjacent but for alignment padding
                runs[-1][1] = max(runs[-1][1], off + n)
            else:
                runs.append([off, off + n])
        self.spans: list[tuple[int, int, int]] = []
        pos = 0
        for a, b in runs:
            pos = -(-pos // 64) * 64  # file offsets are 64-aligned: keep the slab's too (typed views)
            self.spans.append((a, pos, b - a))
            pos += b - a
        self.nbytes = pos
        self.inputs: list[torch.Tensor] = []
        self.patches: list[tuple[int, int]] = []
        self.by_leaf: dict[int, int] = {}  # leaf position -> input index
        views = iter(_byte_views([t for _, n, t, _ in items if n]))
        inputs = self.inputs
        slab_pos, r = 0, -1
        run_end = 0  # file offset where the current run's bytes so far end
        next_run = self.spans[0][0] if self.spans else -1
        for off, n, t, leaf in items:
            if off >= next_run >= 0:
                while r + 1 < len(self.spans) and off >= self.spans[r + 1][0]:
                    r += 1
                    a, s0, _ = self.spans[r]
                    self._pad(s0 - slab_pos)
                    slab_pos, run_end = s0, a
                next_run = self.spans[r + 1][0] if r + 1 < len(self.spans) else -1
            if n == 0:
                continue
            if off != run_end:
                self._pad(off - run_end)
                slab_pos += off - run_end
            if leaf >= 0:
                self.by_leaf[leaf] = len(inputs)
                if not t.is_contiguous():
                    self.patches.append((len(inputs), leaf))
            inputs.append(next(views))
            slab_pos += n
            run_end = off + n
        self._pad(self.nbytes - slab_pos)
        self.joined = len(inputs) >= self.JOIN_MIN and self.nbytes <= self.JOIN_MAX_AVG * len(inputs)
        if self.joined:
            self.inputs = list(map(torch.Tensor.numpy, inputs))  # type: ignore[arg-type]

    def _pad(self, n: int) -> None:
        while n > 0:
            self.inputs.append(_PADS[min(n, 64)])
            n -= 64

    def run(self, out: torch.Tensor, leaves: list[torch.Tensor], moved: Sequence[int] = ()) -> None:
        """Copy the state (``leaves``; those at positions ``moved`` live elsewhere now) into ``out``."""
        inputs: list[Any] = self.inputs
        if self.patches or moved:
            inputs = list(inputs)
            fresh = _fresh_array if self.joined else flat_bytes
            for k, leaf in self.patches:
                inputs[k] = fresh(leaves[leaf])
            for leaf in moved:
                slot = self.by_leaf.get(leaf)
                if slot is not None:
                    inputs[slot] = fresh(leaves[leaf])
        if not inputs:
            return
        if self.joined:
            dst = out.numpy()
            if self.nbytes <= self.JOIN_MAX_BYTES:
                dst[:] = np.frombuffer(b"".join(inputs), dtype=np.uint8)
            else:
                np.concatenate(inputs, out=dst)
            return
        # One thread: cat then takes its serial memcpy loop instead of one parallel copy per
        # input, and never waits for an OpenMP thread that the trainer's own work (or a loaded
        # machine) keeps off a core (a 0.03 ms copy had a 115 ms p99 that way).
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            torch.cat(inputs, out=out)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)


def _fresh_array(t: torch.Tensor) -> np.ndarray:
    return flat_bytes(t).numpy()


_fd_sharing_started = False


def start_fd_sharing() -> None:
    """Start multiprocessing's fd-sharing listener (a thread) now: the first CPU storage sent to
    the worker would otherwise start it inside a ``save()``."""
    global _fd_sharing_started
    if _fd_sharing_started:
        return
    from multiprocessing import reduction

    r, w = os.pipe()
    try:
        shared = reduction.DupFd(r)  # registers a duplicate with the sharer, which starts it
        detach = getattr(shared, "detach", None)
        if detach is not None:
            os.close(detach())  # take the duplicate back through the listener: nothing stays registered
    finally:
        os.close(r)
        os.close(w)
    _fd_sharing_started = True


def share_in_place(tensors: Iterable[torch.Tensor], min_nbytes: int = 64 * 1024) -> int:
    """Move the storages of CPU tensors larger than ``min_nbytes`` to shared memory now (a copy;
    the tensors keep working in place), so a later save need not; returns the bytes moved."""
    moved = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() * t.element_size() <= min_nbytes:
            continue
        st = t.untyped_storage()
        if not st.is_shared():
            st.share_memory_()
            moved += st.nbytes()
    return moved


class SharedRegistry:
    """Trainer-side registry of storages the worker can already see."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._by_key: dict[tuple[str, int, int], tuple[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def reset(self) -> None:
        """Forget everything (the worker that knew these ids is gone)."""
        self._by_key.clear()

    def prepare(
        self, tensors: dict[int, torch.Tensor]
    ) -> tuple[dict[int, SharedRef], dict[int, torch.Tensor], list[int]]:
        """Return (refs by entry index, storages to send by id, ids to release)."""
        refs: dict[int, SharedRef] = {}
        new: dict[int, torch.Tensor] = {}
        used: set[tuple[str, int, int]] = set()
        for idx, t in tensors.items():
            storage = t.untyped_storage()
            if t.device.type == "cpu" and not storage.is_shared():
                storage.share_memory_()  # one-time move; the tensor keeps working in place
            # Keyed by the address *after* the move: the pre-move address is freed and may be reused.
            key = (str(t.device), storage.data_ptr(), storage.nbytes())
            hit = self._by_key.get(key)
            if hit is None:
                base = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                hit = (next(self._ids), base)
                self._by_key[key] = hit
                new[hit[0]] = base
            used.add(key)
            refs[idx] = SharedRef(hit[0], t.dtype, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()))
        release = [sid for k, (sid, _) in self._by_key.items() if k not in used]
        for k in [k for k in self._by_key if k not in used]:
            del self._by_key[k]
        return refs, new, release


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux; elsewhere pages fault in on first use
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if _MADV_HUGEPAGE is not None else None)  # Linux 5.14


def _staging_memory(nbytes: int, huge_pages: bool) -> mmap.mmap:
    """``nbytes`` of page-aligned anonymous memory, every page faulted in; with ``huge_pages``, in
    huge pages where the kernel allows them (transparent huge pages in "madvise" or "always" mode)."""
    if _MADV_HUGEPAGE is None or not huge_pages:
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED | _MAP_POPULATE)
    # Private, not shared: shared anonymous memory is shmem, which gets no huge pages by default.
    mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    try:
        mem.madvise(_MADV_HUGEPAGE)
    except OSError:  # THP not built in: 4 KiB pages
        pass
    try:
        mem.madvise(_MADV_POPULATE_WRITE)  # type: ignore[arg-type]
    except (OSError, ValueError):  # an older kernel: touch every page instead
        torch.frombuffer(mem, dtype=torch.uint8).zero_()
    return mem


class StagingSlot:
    """One contiguous staging buffer: a uint8 tensor and a memoryview of the same bytes."""

    def __init__(self, nbytes: int, pinned: bool, huge_pages: bool = True) -> None:
        self.capacity = max(nbytes, mmap.PAGESIZE)
        self.pinned = pinned
        if pinned:
            self.tensor = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=True)
            self._mmap = None
        else:
            # Fault every page in now, in one pass, not in the first snapshot's copy: on the project's
            # VM the same 1 GiB took 0.58-0.71 s to write with O_DIRECT from pages first touched by
            # the copy and 0.35-0.41 s from populated ones, on every later save too (docs/benchmarks.md,
            # "Durable path, issue 14"). In huge pages (the default), an O_DIRECT write of 32 MiB took
            # 0.15-0.23 ms of CPU instead of 1.0-1.2 ms and a save's durable time fell 15 % with the
            # same snapshot wait (docs/benchmarks.md, "Turn 9").
            self._mmap = _staging_memory(self.capacity, huge_pages)
            self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.view = self.tensor.numpy().data

    def close(self) -> None:
        self.view.release()
        del self.tensor
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive somewhere; the GC frees it later
                pass


class StagingPool:
    """A bounded set of reusable staging slots (one per save in flight)."""

    def __init__(self, max_slots: int, pinned: bool | None = None, huge_pages: bool = True) -> None:
        self.max_slots = max(1, max_slots)
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        self.huge_pages = huge_pages
        self._free: list[StagingSlot] = []
        self._used = 0
        self._cond: asyncio.Condition | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by free slots (slots in use are counted by their users)."""
        return sum(s.capacity for s in self._free)

    async def acquire(self, nbytes: int) -> StagingSlot:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            await self._cond.wait_for(lambda: self._used < self.max_slots)
            self._used += 1
            fitting = [s for s in self._free if s.capacity >= nbytes]
            if fitting:
                slot = min(fitting, key=lambda s: s.capacity)
                self._free.remove(slot)
                return slot
            if self._free and self._used + len(self._free) > self.max_slots:
                # Grow by replacing the largest free slot instead of holding one more.
                old = max(self._free, key=lambda s: s.capacity)
                self._free.remove(old)
                old.close()
        try:
            return StagingSlot(nbytes, self.pinned, self.huge_pages)
        except BaseException:
            async with self._cond:
                self._used -= 1
                self._cond.notify_all()
            raise

    async def reserve(self, nbytes: int) -> None:
        """Allocate (and touch) every slot at ``nbytes`` now, so the first snapshots fault no pages."""
        if nbytes <= 0:
            return
        slots = [await self.acquire(nbytes) for _ in range(self.max_slots)]
        for slot in slots:
            await asyncio.to_thread(slot.tensor[:nbytes].zero_)
            await self.release(slot)

    async def release(self, slot: StagingSlot) -> None:
        assert self._cond is not None
        async with self._cond:
            self._used -= 1
            self._free.append(slot)
            self._cond.notify_all()

    async def discard(self, slot: StagingSlot) -> None:
        """Give up a slot that may still be in use by a stuck I/O thread (it is never reused)."""
        assert self._cond is not None
        async with self._cond:
            self._used -= 1
            self._cond.notify_all()

    def clear(self) -> None:
        for s in self._free:
            s.close()
        self._free.clear()


# -- the copy (worker side) -----------------------------------------------------------------------

#: Same-size integer dtypes used to copy raw bytes of dtypes without a copy kernel (bits8, ...).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Staged:
    """A snapshot held in a staging slot: what sinks write from."""

    slot: StagingSlot
    nbytes: int
    seconds: float
    #: the sink's write when it started during the copy (``take_snapshot``'s ``early``), else None
    writing: asyncio.Future[Any] | None = None


def _source(ctx: WorkerContext, ref: SharedRef) -> torch.Tensor:
    base = ctx.storages[ref.storage_id]
    itemsize = ref.dtype.itemsize
    usable = base.numel() - base.numel() % itemsize
    typed = base[:usable].view(ref.dtype)
    return torch.as_strided(typed, ref.shape, ref.stride, ref.storage_offset)


#: Threads that copy contiguous CPU bytes into staging (plain memmove, the GIL released): two
#: reach the memcpy floor on this machine class without an OpenMP pool fighting the trainer.
COPY_THREADS = 2
_PIECE = 16 << 20  # large copies are split so the threads share them evenly
_memmove = ctypes.memmove
_copy_pool: ThreadPoolExecutor | None = None


def _pieces(moves: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(dst, src, nbytes) runs cut into pieces of at most ``_PIECE`` bytes, in the runs' order."""
    return [(dst + o, src + o, min(_PIECE, n - o)) for dst, src, n in moves for o in range(0, n, _PIECE)]


def _batches(pieces: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Consecutive pieces grouped into batches of at most ``_PIECE`` bytes (one per large piece)."""
    out: list[list[tuple[int, int, int]]] = []
    size = _PIECE
    for p in pieces:
        if size + p[2] > _PIECE:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p[2]
    return out


def _pool() -> ThreadPoolExecutor:
    global _copy_pool
    if _copy_pool is None:
        _copy_pool = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="asyncckpt-copy")
    return _copy_pool


def _run_memmoves(moves: list[tuple[int, int, int]], base: int = 0, nbytes: int = 0,
                  report: Callable[[int], None] | None = None) -> None:
    """Copy (dst address, src address, nbytes) runs on COPY_THREADS threads, in file (dst) order.

    The threads take the next batch of pieces from one queue as they go, so a thread that the
    machine keeps off a core does not hold back a fixed share (a split fixed in advance took up
    to 1.3x as long at load 5-7 on this 2-core machine; the same at load 2.5). With ``report``, every time the copied prefix
    grows, ``report(bytes from the slot's start ``base`` that are final)`` is called (``nbytes``
    when all are).
    """
    batches = _batches(_pieces(sorted(moves)))
    if not batches:
        return
    done = [False] * len(batches)
    lock = threading.Lock()
    state = [0, 0]  # next batch to hand out, batches done as a prefix

    def work() -> None:
        while True:
            with lock:
                i = state[0]
                if i >= len(batches):
                    return
                state[0] += 1
            for dst, src, n in batches[i]:
                _memmove(dst, src, n)
            if report is None:
                continue
            with lock:
                done[i] = True
                k = state[1]
                while k < len(done) and done[k]:
                    k += 1
                if k == state[1]:
                    continue
                state[1] = k
                report(batches[k][0][0] - base if k < len(batches) else nbytes)

    if COPY_THREADS <= 1 or len(batches) <= 1 or sum(m[2] for m in moves) < (8 << 20):
        work()
        return
    for f in [_pool().submit(work) for _ in range(COPY_THREADS)]:
        f.result()


class CopyProgress:
    """How much of a staging slot is copied: the first :attr:`ready` bytes of the image are final.

    The copy threads report through :meth:`report`, which wakes the event loop only when a
    waiter's bytes are there (a wake-up per copied piece cost ~60 more context switches per GiB
    copied, on the copy's two cores); a writer started before the copy ends awaits :meth:`wait` for the bytes it is about
    to write. :meth:`advance` is the same report made on the loop.
    """

    def __init__(self, nbytes: int, loop: asyncio.AbstractEventLoop | None = None,
                 acked: asyncio.Future[None] | None = None) -> None:
        self.nbytes = nbytes
        self._acked = acked
        self.ready = 0
        self.error: BaseException | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._want = nbytes + 1  # the least end a waiter waits for (read by the copy threads)
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        self._loop = loop

    @property
    def finished(self) -> bool:
        """Every byte is copied."""
        return self.ready >= self.nbytes

    def report(self, upto: int) -> None:
        """The first ``upto`` bytes are copied (called by the copy, in one thread at a time)."""
        if upto <= self.ready:
            return
        self.ready = upto  # first the bytes, then the look at the waiters: wait() does the reverse
        if upto >= self._want and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake)

    def advance(self, upto: int) -> None:
        """The first ``upto`` bytes are copied (called on the loop)."""
        self.ready = max(self.ready, upto)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The copy failed: every wait raises from now on."""
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        while True:
            ready = self.ready
            waiting = []
            for end, fut in self._waiters:
                if fut.done():
                    continue
                if self.error is not None:
                    fut.set_exception(RuntimeError(f"the snapshot copy failed: {self.error!r}"))
                elif end <= ready:
                    fut.set_result(None)
                else:
                    waiting.append((end, fut))
            self._waiters = waiting
            self._want = min((end for end, _ in waiting), default=self.nbytes + 1)
            if self.ready < self._want or not waiting:  # a report made meanwhile saw the old _want
                return

    async def wait(self, end: int) -> None:
        """Return once the first ``end`` bytes are copied; raise if the copy failed."""
        if self.error is not None:
            raise RuntimeError(f"the snapshot copy failed: {self.error!r}")
        if end <= self.ready:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((end, fut))
        self._want = min(self._want, end)
        if end <= self.ready:  # the copy got there between the two looks, and saw the old _want
            self._wake()
        await fut

    async def ended(self) -> None:
        """Return once every byte is copied and the snapshot's ACK is on its way (``acked``): from
        then on a writer may use every CPU without holding up the ACK. Raise if the copy failed."""
        await self.wait(self.nbytes)
        if self._acked is not None:
            await asyncio.shield(self._acked)


def _copy_in(ctx: WorkerContext, spec: SnapshotSpec, slot: StagingSlot,
             report: Callable[[int], None] | None = None) -> None:
    """Copy ``spec`` into ``slot``. With ``report``, everything else is done before the plain
    memmoves, which go in file order and report the final prefix as it grows."""
    dst_all = slot.tensor
    base = dst_all.data_ptr()
    stream = None
    spans: list[tuple[int, int]] = []
    moves: list[tuple[int, int, int]] = []
    for off, ref in spec.copies:
        src = _source(ctx, ref)
        nbytes = src.numel() * src.element_size()
        spans.append((off, nbytes))
        if nbytes == 0:
            continue
        if not src.is_cuda and src.is_contiguous():
            moves.append((base + off, src.data_ptr(), nbytes))  # a plain memmove, no kernel
            continue
        dst = dst_all[off : off + nbytes].view(ref.dtype).view(ref.shape)
        bits = _BITS.get(src.element_size())
        if bits is not None and src.dtype != bits:
            src, dst = src.view(bits), dst.view(bits)  # a byte copy works for every dtype
        if src.is_cuda:
            stream = ctx.stream_for(src.device)
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=slot.pinned)
        else:
            dst.copy_(src)
    if report is None:
        _run_memmoves(moves)
    for off, data in spec.inline:
        slot.view[off : off + len(data)] = data
        spans.append((off, len(data)))
    # Zero the gaps so no stale bytes of an earlier snapshot reach storage.
    end = 0
    for off, n in sorted(spans):
        if off > end:
            dst_all[end:off].zero_()
        end = max(end, off + n)
    if end < spec.nbytes:
        dst_all[end : spec.nbytes].zero_()
    if stream is not None:
        stream.synchronize()
    if report is not None:
        _run_memmoves(moves, base, spec.nbytes, report)
        report(spec.nbytes)


#: Starts a write of a slot whose copy is under way (see :func:`take_snapshot`).
EarlyWriter = Callable[[Staged, CopyProgress], "asyncio.Future[Any]"]


async def take_snapshot(ctx: WorkerContext, spec: SnapshotSpec, early: EarlyWriter | None = None,
                        acked: asyncio.Future[None] | None = None) -> Staged:
    """Register the spec's storages and copy its bytes into a staging slot (released by the caller).

    ``early(staged, progress)``, when given, is called once the slot is held and before the copy
    starts; it may start writing the slot, awaiting ``progress.wait(end)`` before reading bytes up to
    ``end``. This still returns (the snapshot's ACK) exactly when the copy has ended, with that
    future in ``Staged.writing``. If the copy fails, the future is cancelled and awaited before
    the slot is abandoned (``StagingPool.discard``). ``acked``: a future the caller resolves once
    the snapshot's ACK has gone out; ``progress.ended()`` waits for it too (without it, for the copy).
    """
    t0 = time.perf_counter()
    for sid in spec.release:
        ctx.storages.pop(sid, None)
    ctx.storages.update(spec.new_storages)
    sent = list(spec.new_storages) if spec.ephemeral else []
    spec.new_storages = {}
    try:
        slot = await ctx.pool.acquire(spec.nbytes)
        staged = Staged(slot, spec.nbytes, 0.0)
        progress: CopyProgress | None = None
        writing: asyncio.Future[Any] | None = None
        try:
            report: Callable[[int], None] | None = None
            if early is not None:
                progress = CopyProgress(spec.nbytes, asyncio.get_running_loop(), acked)
                report = progress.report
                writing = staged.writing = early(staged, progress)
            await asyncio.to_thread(_copy_in, ctx, spec, slot, report)
        except BaseException as exc:
            if progress is not None:
                progress.fail(exc)
            if writing is not None:
                writing.cancel()
                await asyncio.gather(writing, return_exceptions=True)
                await ctx.pool.discard(slot)  # an I/O thread of the cancelled write may still read it
            else:
                await ctx.pool.release(slot)
            raise
    finally:
        for sid in sent:
            ctx.storages.pop(sid, None)
    staged.seconds = time.perf_counter() - t0
    return staged

