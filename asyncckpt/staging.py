"""Tensor sharing (trainer side) and the staging pool (worker side).

Trainer: a tensor's whole storage is moved to shared memory once (CPU) or exported as a CUDA IPC
handle, registered under an id and kept alive; later saves send only the id. Storages not used
by a save are released on both sides, so the registry never outgrows one state dict.

Worker: snapshots are copied into a reusable staging pool (pinned host memory when CUDA is
present, page-aligned anonymous memory otherwise), laid out exactly like the data file.
"""

from __future__ import annotations

import asyncio
import itertools
import mmap
from dataclasses import dataclass

import torch

__all__ = ["SharedRef", "SharedRegistry", "StagingPool", "StagingSlot"]


@dataclass(frozen=True)
class SharedRef:
    """Where a tensor lives inside a shared storage."""

    storage_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements of dtype


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
            refs[idx] = SharedRef(hit[0], t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
        release = [sid for k, (sid, _) in self._by_key.items() if k not in used]
        for k in [k for k in self._by_key if k not in used]:
            del self._by_key[k]
        return refs, new, release


class StagingSlot:
    """One contiguous staging buffer: a uint8 tensor and a memoryview of the same bytes."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.capacity = max(nbytes, mmap.PAGESIZE)
        self.pinned = pinned
        if pinned:
            self.tensor = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=True)
            self._mmap = None
        else:
            self._mmap = mmap.mmap(-1, self.capacity)
            self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.view = memoryview(self.tensor.numpy())

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

    def __init__(self, max_slots: int, pinned: bool | None = None) -> None:
        self.max_slots = max(1, max_slots)
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        self._free: list[StagingSlot] = []
        self._used = 0
        self._cond: asyncio.Condition | None = None
        self._notify_task: asyncio.Future[None] | None = None

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
            return StagingSlot(nbytes, self.pinned)
        except BaseException:
            async with self._cond:
                self._used -= 1
                self._cond.notify_all()
            raise

    async def release(self, slot: StagingSlot) -> None:
        assert self._cond is not None
        async with self._cond:
            self._used -= 1
            self._free.append(slot)
            self._cond.notify_all()

    def discard(self, slot: StagingSlot) -> None:
        """Give up a slot that may still be in use by a stuck I/O thread (it is not reused)."""
        self._used -= 1
        if self._cond is not None:
            self._notify_task = asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        assert self._cond is not None
        async with self._cond:
            self._cond.notify_all()

    def clear(self) -> None:
        for s in self._free:
            s.close()
        self._free.clear()
