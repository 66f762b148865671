"""TorchAsyncCheckpoint: an async ``torch.save`` whose file plain ``torch.load`` reads."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from .engine import _STATE, SaveJob, _Staged, snapshot
from .errors import BadInputError, StorageError
from .format import BigIntNode, BytesNode, DictNode, ListNode, Node, RefNode, ValueNode
from .plan import plan_state
from .queue import AsyncCallsQueue, AsyncRequest
from .staging import SharedRegistry

__all__ = ["TorchAsyncCheckpoint"]


@dataclass
class _TorchSaveResult:
    path: str
    nbytes: int
    seconds: float


def _rebuild(node: Node, staged: _Staged) -> Any:
    job = staged.job
    if isinstance(node, ValueNode):
        return node.value
    if isinstance(node, BigIntNode):
        return int(node.value)
    if isinstance(node, BytesNode):
        return node.value
    if isinstance(node, RefNode):
        e = job.entries[node.index]
        raw = staged.slot.tensor[e.offset : e.offset + e.nbytes]
        if e.kind == "tensor":
            from .dtypes import torch_dtype

            # A storage of its own per tensor (a view over the staging slot, no copy), so
            # torch.save writes each tensor as its own record.
            if e.nbytes == 0:
                return torch.empty(e.shape, dtype=torch_dtype(e.dtype))
            t = torch.frombuffer(staged.slot.view[e.offset : e.offset + e.nbytes], dtype=torch.uint8)
            return t.view(torch_dtype(e.dtype)).reshape(e.shape)
        if e.kind == "ndarray":
            import numpy as np

            return np.frombuffer(bytes(raw.numpy()), dtype=np.dtype(e.dtype)).reshape(e.shape)
        import pickle

        return pickle.loads(bytes(raw.numpy()))
    if isinstance(node, DictNode):
        return {k: _rebuild(v, staged) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ListNode):
        items = [_rebuild(v, staged) for v in node.items]
        return tuple(items) if node.tuple else items
    raise TypeError(node)


def _torch_save_sync(staged: _Staged, path: str) -> _TorchSaveResult:
    t0 = time.perf_counter()
    obj = _rebuild(staged.job.tree, staged)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StorageError(exc.errno or 0, f"async torch.save to {path} failed: {exc}") from exc
    return _TorchSaveResult(path, os.path.getsize(path), time.perf_counter() - t0)


async def _write_torch(staged: _Staged, path: str) -> _TorchSaveResult:
    import asyncio

    try:
        return await asyncio.to_thread(_torch_save_sync, staged, path)
    finally:
        await _STATE.pool.release(staged.slot)


async def _torch_job(staged: _Staged) -> _TorchSaveResult:
    return await _write_torch(staged, staged.job.root)


class TorchAsyncCheckpoint:
    """Async ``torch.save``: ``async_save`` returns at once, ``finalize_async_save`` completes.

    The file is written by the persistent worker from a snapshot of the state taken at the
    call (wait with ``wait_snapshot()`` before mutating it) and is read by plain
    ``torch.load(path, weights_only=True)``.
    """

    def __init__(self, *, max_in_flight: int = 2, allow_pickle: bool = False) -> None:
        self.queue = AsyncCallsQueue(worker_options={"max_in_flight": max_in_flight})
        self.allow_pickle = allow_pickle
        self._registry = SharedRegistry()
        self._gen = -1

    def async_save(self, state_dict: Any, path: str | os.PathLike[str], finalize_fns: list[Any] | None = None) -> int:
        """Start writing ``state_dict`` to ``path`` in torch.save format; returns the call index."""
        path = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(path)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise BadInputError(f"cannot write {path}: {parent} is not a writable directory")
        plan = plan_state(state_dict, allow_pickle=self.allow_pickle)
        self.queue.start_worker()
        if self._gen != self.queue.worker_generation:
            self._registry.reset()
            self._gen = self.queue.worker_generation
        if any(t.is_cuda for t in plan.tensors.values()):
            torch.cuda.current_stream().synchronize()
        refs, new, release = self._registry.prepare(plan.tensors)
        job = SaveJob(root=path, name=os.path.basename(path), rank=0, world_size=1, step=None,
                      entries=plan.entries, tree=plan.tree, data_nbytes=plan.data_nbytes, refs=refs,
                      inline=plan.inline, new_storages=new, release=release)
        req = AsyncRequest(_torch_job, (job,), finalize_fns=list(finalize_fns or []), preload_fn=snapshot)
        return self.queue.schedule_async_request(req)

    def wait_snapshot(self, timeout: float | None = None) -> None:
        self.queue.wait_snapshot(timeout)

    def finalize_async_save(self, blocking: bool = False, no_dist: bool = True) -> list[int]:
        """Finish completed saves (all of them with ``blocking``); returns finalized call indices."""
        return self.queue.maybe_finalize_async_calls(blocking=blocking, no_dist=no_dist)

    def close(self) -> None:
        if self.queue.get_num_unfinalized_calls():
            self.finalize_async_save(blocking=True)
        self.queue.close()

    def __enter__(self) -> TorchAsyncCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


