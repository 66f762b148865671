"""DCP async saving on the persistent worker: plan synchronously, write in the background, finalize.

Low level (schedule on your own ``AsyncCallsQueue``)::

    plan = save_state_dict_async_plan(state_dict, writer, process_group)
    save_fn, preload_fn, args = writer.get_save_function_and_args(queue)
    queue.schedule_async_request(AsyncRequest(save_fn, args, preload_fn=preload_fn,
        finalize_fns=[functools.partial(save_state_dict_async_finalize, plan)]))
    queue.wait_snapshot()          # before mutating the state (optimizer.step)
    ...
    queue.maybe_finalize_async_calls(blocking=False)   # every step; blocking=True at the end

One call, in the style of ``dcp.async_save``: ``handle = async_save(state_dict, checkpoint_id=...)``.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.utils import _DistWrapper

from ..errors import BadInputError, CheckpointError
from ..queue import AsyncCallsQueue, AsyncRequest
from .writer import AsyncStorageWriter, _DcpPlanData

__all__ = [
    "AsyncSaveHandle",
    "AsyncSavePlan",
    "async_save",
    "close_async_saves",
    "default_queue",
    "finalize_async_saves",
    "save_state_dict_async_finalize",
    "save_state_dict_async_plan",
]


@dataclass
class AsyncSavePlan:
    """What :func:`save_state_dict_async_finalize` needs once every rank has written its part."""

    storage_writer: AsyncStorageWriter
    metadata: Metadata | None  # the global metadata, on the coordinator only
    save_id: str
    rank: int
    world_size: int
    is_coordinator: bool
    checkpoint_id: str
    plan_seconds: float


def _stateful_to_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in state_dict.items()}


def save_state_dict_async_plan(
    state_dict: dict[str, Any],
    storage_writer: AsyncStorageWriter,
    process_group: dist.ProcessGroup | None = None,
    coordinator_rank: int = 0,
    planner: SavePlanner | None = None,
) -> AsyncSavePlan:
    """Run DCP's planning (local plans, global plan, metadata) now; prepare the writer's next request.

    A collective over ``process_group`` when torch.distributed is initialized (every rank calls
    it). Nothing is copied: the tensors are snapshotted by the worker once the request from
    ``storage_writer.get_save_function_and_args(queue)`` is scheduled.
    """
    if not isinstance(storage_writer, AsyncStorageWriter):
        raise BadInputError(f"storage_writer must be an asyncckpt.dcp.AsyncStorageWriter, got {type(storage_writer).__name__}")
    if not isinstance(state_dict, dict):
        raise BadInputError(f"a DCP state dict must be a dict, got {type(state_dict).__name__}")
    t0 = time.perf_counter()
    use_dist = dist.is_available() and dist.is_initialized()
    dw = _DistWrapper(process_group, use_dist, coordinator_rank)
    planner = planner if planner is not None else DefaultSavePlanner()
    state_dict = _stateful_to_state_dict(state_dict)
    global_md: Metadata | None = None

    def local_step() -> SavePlan:
        storage_meta = storage_writer.storage_meta()
        if "storage_meta" in inspect.signature(planner.set_up_planner).parameters:
            planner.set_up_planner(state_dict=state_dict, storage_meta=storage_meta, is_coordinator=dw.is_coordinator)
        else:  # planners written for older torch
            planner.set_up_planner(state_dict, dw.is_coordinator)  # type: ignore[call-arg]
        storage_writer.set_up_storage_writer(dw.is_coordinator, rank=dw.rank, use_collectives=True)
        local = planner.create_local_plan()
        return storage_writer.prepare_local_plan(local)

    def global_step(all_plans: list[SavePlan]) -> list[SavePlan]:
        nonlocal global_md
        all_plans, global_md = planner.create_global_plan(all_plans)
        return storage_writer.prepare_global_plan(all_plans)

    try:
        central = dw.reduce_scatter("plan", local_step, global_step)
    except CheckpointException as exc:
        # DCP wraps every rank's failure; surface ours (bad input, existing checkpoint) as itself.
        ours = [(r, e) for r, (e, _tb) in sorted(exc.failures.items()) if isinstance(e, CheckpointError)]
        if ours:
            rank, err = ours[0]
            raise type(err)(f"{err} (raised on rank {rank} while planning)") from exc
        raise
    sd = central.storage_data
    save_id = sd.save_id if isinstance(sd, _DcpPlanData) else storage_writer.save_id
    final = planner.finish_plan(central)
    world = dw.get_world_size()
    storage_writer.prepare_write_data(final, planner, save_id=save_id, world_size=world)
    return AsyncSavePlan(
        storage_writer=storage_writer,
        metadata=global_md if dw.is_coordinator else None,
        save_id=save_id,
        rank=dw.rank,
        world_size=world,
        is_coordinator=dw.is_coordinator,
        checkpoint_id=storage_writer.uri,
        plan_seconds=time.perf_counter() - t0,
    )


def save_state_dict_async_finalize(plan: AsyncSavePlan) -> Metadata | None:
    """After global completion: the coordinator writes ``.metadata`` (and the commit record).

    Run it as the request's finalize_fn (``AsyncCallsQueue`` runs it on every rank once every
    rank's write is done); other ranks return None at once. Returns the checkpoint's Metadata.
    """
    if not plan.is_coordinator:
        return None
    if plan.metadata is None:
        raise CheckpointError(f"{plan.checkpoint_id}: the coordinator's plan holds no metadata; it cannot be committed")
    return plan.storage_writer.commit(plan.metadata, world_size=plan.world_size, save_id=plan.save_id)


# -- the one-call helper -------------------------------------------------------------------------

_QUEUES: dict[int | None, AsyncCallsQueue] = {}
_HANDLES: dict[int, dict[int, AsyncSaveHandle]] = {}  # id(queue) -> call index -> handle


def default_queue(process_group: dist.ProcessGroup | None = None, **worker_options: Any) -> AsyncCallsQueue:
    """The queue (one persistent worker) :func:`async_save` uses for ``process_group``."""
    key = None if process_group is None else id(process_group)  # the queue keeps the group alive
    q = _QUEUES.get(key)
    if q is None:
        q = _QUEUES[key] = AsyncCallsQueue(group=process_group, worker_options=worker_options or None)
    return q


class AsyncSaveHandle:
    """A future-like handle of one :func:`async_save`.

    ``wait_snapshot()`` (local) must return before the state is mutated. ``result()`` blocks
    until the checkpoint is committed; like every finalize it is collective (all ranks call it).
    ``done()`` is local and never blocks.
    """

    def __init__(self, plan: AsyncSavePlan, queue: AsyncCallsQueue, scheduled_s: float) -> None:
        self.plan = plan
        self.queue = queue
        self.call_idx = -1
        self.scheduled_s = scheduled_s  # plan + share + schedule, seconds
        self.metadata: Metadata | None = None
        self.error: BaseException | None = None
        self.committed = False

    @property
    def checkpoint_id(self) -> str:
        return self.plan.checkpoint_id

    def _finalize(self) -> None:
        self.metadata = save_state_dict_async_finalize(self.plan)
        self.committed = True

    def snapshot_done(self) -> bool:
        return self.done() or self.queue.snapshot_done()

    def wait_snapshot(self, timeout: float | None = None) -> None:
        """Block until the worker holds its copy of the state (then the state may change)."""
        if not self.done():
            self.queue.wait_snapshot(timeout)

    def done(self) -> bool:
        return self.committed or self.error is not None

    def exception(self) -> BaseException | None:
        return self.error

    def result(self) -> Metadata | None:
        """Finalize (blocking, collective) until this save is committed; its Metadata on the coordinator."""
        while not self.done():
            if self.queue.get_num_unfinalized_calls() == 0:
                self.error = CheckpointError(
                    f"{self.checkpoint_id}: the save was dropped before it was finalized (its queue was closed "
                    "or aborted); the checkpoint is not committed"
                )
                break
            finalize_async_saves(blocking=True, queue=self.queue)
        if self.error is not None:
            raise self.error
        return self.metadata


def finalize_async_saves(blocking: bool = False, *, queue: AsyncCallsQueue | None = None,
                         process_group: dist.ProcessGroup | None = None) -> list[AsyncSaveHandle]:
    """Commit the saves every rank has finished (all with ``blocking``); collective, call on every rank.

    Returns the handles committed by this call; a failed save raises its error here.
    """
    q = queue if queue is not None else _QUEUES.get(None if process_group is None else id(process_group))
    if q is None:
        return []
    handles = _HANDLES.setdefault(id(q), {})
    try:
        done = q.maybe_finalize_async_calls(blocking=blocking)
    except BaseException as exc:
        pending = {c.idx for c in q._calls}
        for idx in [i for i in handles if i not in pending]:
            h = handles.pop(idx)
            if not h.committed:
                h.error = exc
        raise
    out = [handles.pop(i) for i in done if i in handles]
    for idx in [i for i, h in handles.items() if h.done()]:  # finalized through the queue directly
        del handles[idx]
    return out


def async_save(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_writer: AsyncStorageWriter | None = None,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    coordinator_rank: int = 0,
    queue: AsyncCallsQueue | None = None,
) -> AsyncSaveHandle:
    """Plan now, snapshot and write on the persistent worker; returns an :class:`AsyncSaveHandle`.

    Call ``handle.wait_snapshot()`` before mutating the state, :func:`finalize_async_saves`
    each step (or ``handle.result()``) and :func:`close_async_saves` at shutdown.
    """
    t0 = time.perf_counter()
    if storage_writer is None:
        if checkpoint_id is None:
            raise BadInputError("async_save needs checkpoint_id or storage_writer")
        storage_writer = AsyncStorageWriter(checkpoint_id)
    elif checkpoint_id is not None:
        storage_writer.reset(checkpoint_id)
    else:
        storage_writer.reset()
    q = queue if queue is not None else default_queue(process_group)
    plan = save_state_dict_async_plan(state_dict, storage_writer, process_group, coordinator_rank, planner)
    save_fn, preload_fn, args = storage_writer.get_save_function_and_args(q)
    handle = AsyncSaveHandle(plan, q, 0.0)
    req = AsyncRequest(save_fn, args, finalize_fns=[handle._finalize], preload_fn=preload_fn)
    handle.call_idx = q.schedule_async_request(req)
    _HANDLES.setdefault(id(q), {})[handle.call_idx] = handle
    handle.scheduled_s = time.perf_counter() - t0
    return handle


def close_async_saves(*, abort: bool = False) -> None:
    """Finalize every pending :func:`async_save` (blocking, collective) and stop the workers."""
    try:
        if not abort:
            for q in list(_QUEUES.values()):
                while q.get_num_unfinalized_calls():
                    finalize_async_saves(blocking=True, queue=q)
    finally:
        for key, q in list(_QUEUES.items()):
            q.close(abort=True)
            _HANDLES.pop(id(q), None)
            del _QUEUES[key]
