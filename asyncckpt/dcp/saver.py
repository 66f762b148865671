"""DCP async saving on the persistent worker: plan synchronously, write in the background, commit.

One call, in the style of ``dcp.async_save``: ``handle = async_save(state_dict, checkpoint_id=...)``;
``handle.result()`` returns (on every rank) once the checkpoint is committed. The commit is the
save's last stage, run by the coordinator's worker; its outcome reaches every rank through the
completion all-reduce, and a failure raises DCP's ``CheckpointException`` on every rank.

Low level, nvidia-resiliency-ext's shape (schedule on your own ``AsyncCallsQueue``)::

    ret = save_state_dict_async_plan(state_dict, writer, process_group)
    save_fn, preload_fn, args = writer.get_save_function_and_args()
    queue.schedule_async_request(AsyncRequest(save_fn, args, preload_fn=preload_fn,
        finalize_fns=[lambda: save_state_dict_async_finalize(*ret)]))
    ...
    queue.maybe_finalize_async_calls(blocking=False)   # every step; blocking=True at the end

Here the coordinator commits inside the finalize function and one extra single-int all-reduce
tells every rank the outcome.
"""

from __future__ import annotations

import inspect
import os
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.utils import _DistWrapper

from ..completion import global_state
from ..errors import BadInputError, CheckpointError, RemoteRankError
from ..queue import AsyncCallsQueue, Job, Stage
from ..runtime.messages import Kind
from ..runtime.protocol import ControlOp, ControlPayload, SavePayload
from ..snapshot import check_snapshot_mode
from ..staging import SnapshotGuard
from ._commit import check_extra_files
from ._errors import DcpCheckpointException, as_checkpoint_exception
from ._worker import DcpSink
from .cache import CheckpointMetadataCache, global_metadata_cache
from .writer import AsyncStorageWriter, DcpPlanData

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


class AsyncSavePlan(tuple):  # type: ignore[type-arg]
    """The result of :func:`save_state_dict_async_plan`.

    It is nvidia-resiliency-ext's 3-tuple ``(storage_writer, global_metadata, dist_wrapper)``
    (so ``save_state_dict_async_finalize(*plan)`` works) and carries what asyncckpt needs as
    attributes (so ``save_state_dict_async_finalize(plan)`` works too). ``global_metadata`` is
    None except on the committing rank(s).
    """

    save_id: str
    rank: int
    world_size: int
    is_coordinator: bool
    checkpoint_id: str
    plan_seconds: float
    collective: bool  # saved with collectives (one .metadata); False: every rank commits its own
    use_dist: bool

    def __new__(cls, storage_writer: AsyncStorageWriter, global_metadata: Metadata | None, dist_wrapper: Any, *,
                save_id: str, rank: int, world_size: int, is_coordinator: bool, checkpoint_id: str,
                plan_seconds: float = 0.0, collective: bool = True, use_dist: bool = False) -> AsyncSavePlan:
        self = super().__new__(cls, (storage_writer, global_metadata, dist_wrapper))
        self.save_id, self.rank, self.world_size = save_id, rank, world_size
        self.is_coordinator, self.checkpoint_id, self.plan_seconds = is_coordinator, checkpoint_id, plan_seconds
        self.collective, self.use_dist = collective, use_dist
        return self

    @property
    def storage_writer(self) -> AsyncStorageWriter:
        return self[0]

    @property
    def metadata(self) -> Metadata | None:
        return self[1]

    @property
    def dist_wrapper(self) -> Any:
        return self[2]

    @property
    def commits_here(self) -> bool:
        """This rank writes a commit point (the coordinator; every rank without collectives)."""
        return self.is_coordinator if self.collective else True

    @property
    def group(self) -> Any:
        return getattr(self[2], "group", None)

    def __repr__(self) -> str:
        return f"AsyncSavePlan({self.checkpoint_id!r}, rank={self.rank}, world_size={self.world_size})"


def _stateful_to_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in state_dict.items()}


def save_state_dict_async_plan(
    state_dict: dict[str, Any],
    storage_writer: AsyncStorageWriter,
    process_group: dist.ProcessGroup | None = None,
    coordinator_rank: int = 0,
    planner: SavePlanner | None = None,
    enable_cache: bool = False,
    metadata_cache: CheckpointMetadataCache | None = None,
    *,
    no_dist: bool = False,
    use_collectives: bool = True,
) -> AsyncSavePlan:
    """Run DCP's planning (local plans, global plan, metadata) now; prepare the writer's next request.

    A collective over ``process_group`` when torch.distributed is initialized (every rank calls
    it) unless ``no_dist`` or ``use_collectives=False`` (DCP's meanings). Nothing is copied and
    no storage is touched: the worker checks and prepares the checkpoint's directory, snapshots
    the tensors and writes. ``enable_cache`` / ``metadata_cache``: nvidia-resiliency-ext's plan
    cache; the plans are recorded in it, planning always runs in full (see
    :mod:`asyncckpt.dcp.cache`).
    """
    if not isinstance(storage_writer, AsyncStorageWriter):
        raise BadInputError(
            f"storage_writer must be an asyncckpt.dcp.AsyncStorageWriter (or asyncckpt.nvrx's FileSystemWriterAsync), "
            f"got {type(storage_writer).__name__}"
        )
    if not isinstance(state_dict, dict):
        raise BadInputError(f"a DCP state dict must be a dict, got {type(state_dict).__name__}")
    t0 = time.perf_counter()
    use_dist = dist.is_available() and dist.is_initialized() and not no_dist
    dw = _DistWrapper(process_group, use_dist, coordinator_rank)
    planner = planner if planner is not None else DefaultSavePlanner()
    state_dict = _stateful_to_state_dict(state_dict)
    global_md: Metadata | None = None
    local_plan: SavePlan | None = None

    def local_step() -> SavePlan:
        nonlocal local_plan
        storage_meta = storage_writer.storage_meta()
        if "storage_meta" in inspect.signature(planner.set_up_planner).parameters:
            planner.set_up_planner(state_dict=state_dict, storage_meta=storage_meta, is_coordinator=dw.is_coordinator)
        else:  # planners written for older torch
            planner.set_up_planner(state_dict, dw.is_coordinator)  # type: ignore[call-arg, arg-type]
        storage_writer.set_up_storage_writer(dw.is_coordinator, rank=dw.rank, use_collectives=use_collectives,
                                             deferred_target=True)
        local_plan = storage_writer.prepare_local_plan(planner.create_local_plan())
        storage_writer.check_plan(local_plan, planner)  # bad values fail every rank here, as in DCP
        return local_plan

    def global_step(all_plans: list[SavePlan]) -> list[SavePlan]:
        nonlocal global_md
        all_plans, global_md = planner.create_global_plan(all_plans)
        return storage_writer.prepare_global_plan(all_plans)

    if use_collectives:
        try:
            if dw.get_world_size() == 1:  # what reduce_scatter computes, without pickling plans through gloo
                central = _plan_alone(dw.rank, local_step, global_step)
            else:
                central = dw.reduce_scatter("plan", local_step, global_step)
        except CheckpointException as exc:  # every rank raises it (DCP's planning contract)
            raise DcpCheckpointException(
                f"planning the DCP save of {storage_writer.uri} failed on rank(s) {sorted(exc.failures)}: "
                + "; ".join(f"{type(e).__name__}: {e}" for e, _ in exc.failures.values()), exc.failures,
            ) from exc
    else:
        try:
            central = global_step([local_step()])[0]
        except CheckpointError as exc:
            raise as_checkpoint_exception(exc, f"planning the DCP save of {storage_writer.uri}") from exc
    sd = central.storage_data
    save_id = sd.save_id if isinstance(sd, DcpPlanData) else storage_writer.save_id
    final = planner.finish_plan(central)
    world = dw.get_world_size() if use_collectives else 1
    storage_writer.prepare_write_data(final, planner, save_id=save_id, world_size=world)
    if enable_cache:
        cache = metadata_cache if metadata_cache is not None else global_metadata_cache()
        if cache is not None:
            cache.set_cache_metadata(central, local_plan, False)
            cache.prepare_save_state_dict_ret(dw.rank, coordinator_rank, (storage_writer, global_md, dw))
    commits_here = dw.is_coordinator or not use_collectives
    return AsyncSavePlan(
        storage_writer, global_md if commits_here else None, dw,
        save_id=save_id, rank=dw.rank, world_size=world, is_coordinator=dw.is_coordinator,
        checkpoint_id=storage_writer.uri, plan_seconds=time.perf_counter() - t0,
        collective=use_collectives, use_dist=use_dist,
    )


def _plan_alone(rank: int, local_step: Callable[[], SavePlan],
                global_step: Callable[[list[SavePlan]], list[SavePlan]]) -> SavePlan:
    """DCP's plan reduce-scatter on a one-rank group: the same plan and the same
    ``CheckpointException`` on failure, without the collective round trips."""
    try:
        return global_step([local_step()])[0]
    except Exception as exc:  # reported as DCP's collective would report it
        raise CheckpointException("plan", {rank: (exc, traceback.extract_tb(exc.__traceback__))}) from exc


_UNSET: Any = object()


def _plan_of(storage_writer: Any, global_metadata: Any, dist_wrapper: Any) -> AsyncSavePlan:
    if isinstance(storage_writer, AsyncSavePlan) and global_metadata is _UNSET:
        return storage_writer
    if not isinstance(storage_writer, AsyncStorageWriter):
        raise BadInputError(
            "save_state_dict_async_finalize takes the plan from save_state_dict_async_plan (plan or *plan), "
            f"got {type(storage_writer).__name__}"
        )
    w = storage_writer
    last = getattr(w, "_last", None)
    if last is None:
        raise BadInputError(f"{w.uri}: nothing was planned with this writer; call save_state_dict_async_plan first")
    use_dist = bool(getattr(dist_wrapper, "use_dist", dist.is_available() and dist.is_initialized()))
    return AsyncSavePlan(
        w, None if global_metadata is _UNSET else global_metadata, dist_wrapper, save_id=last.save_id,
        rank=last.rank, world_size=last.world_size, is_coordinator=w.is_coordinator, checkpoint_id=w.uri,
        collective=w.use_collectives, use_dist=use_dist,
    )


def save_state_dict_async_finalize(storage_writer: Any, global_metadata: Any = _UNSET,
                                   dist_wrapper: Any = None) -> Metadata | None:
    """Commit after global completion: ``save_state_dict_async_finalize(plan)`` or NVRx's
    ``save_state_dict_async_finalize(storage_writer, global_metadata, dist_wrapper)``.

    Run it as the request's finalize function (every rank runs it once every rank's write is
    done). The coordinator (every rank, without collectives) writes ``.checksums``,
    ``.metadata`` and the COMMIT record; then one single-int all-reduce tells every rank the
    outcome, and a failure raises DCP's ``CheckpointException`` on every rank. Returns the
    committed Metadata where it was committed, None elsewhere.
    """
    plan = _plan_of(storage_writer, global_metadata, dist_wrapper)
    err: BaseException | None = None
    md: Metadata | None = None
    if plan.commits_here:
        try:
            if plan.metadata is None:
                raise CheckpointError(f"{plan.checkpoint_id}: this rank's plan holds no metadata; it cannot be committed")
            md = plan.storage_writer.commit(plan.metadata, world_size=plan.world_size, save_id=plan.save_id)
        except Exception as exc:  # noqa: BLE001 - every rank must learn it before anyone raises
            err = exc
    what = f"the commit of DCP checkpoint {plan.checkpoint_id}"
    if plan.use_dist and dist.is_available() and dist.is_initialized():
        failed = global_state(0 if err is None else 1, no_dist=False, group=plan.group)
        if failed:
            raise as_checkpoint_exception(
                err if err is not None else RemoteRankError(f"{what} failed on another rank"), what,
                group=plan.group, collective=True,
            )
    elif err is not None:
        raise as_checkpoint_exception(err, what, rank=plan.rank) from err
    return md


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
    until the checkpoint is committed, on every rank alike; like every finalize it is collective
    (all ranks call it). ``done()`` is local and never blocks.
    """

    def __init__(self, plan: AsyncSavePlan, queue: AsyncCallsQueue, scheduled_s: float, world: int = 1) -> None:
        self.plan = plan
        self.queue = queue
        self.call_idx = -1
        self.scheduled_s = scheduled_s  # plan + share + schedule, seconds
        self.world = world  # ranks taking part in the save's completion
        self.metadata: Metadata | None = None
        self.error: BaseException | None = None
        self.committed = False

    @property
    def checkpoint_id(self) -> str:
        return self.plan.checkpoint_id

    def _finalize(self) -> None:
        if self.plan.commits_here:
            self.metadata = self.queue.call_result(self.call_idx)
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
        """Finalize (blocking, collective) until this save is committed on every rank; its Metadata
        where it was committed (the coordinator), None elsewhere. A failure raises DCP's
        ``CheckpointException`` (:class:`~asyncckpt.dcp.DcpCheckpointException`) on every rank."""
        while not self.done():
            if self.queue.get_num_unfinalized_calls() == 0:
                self.error = as_checkpoint_exception(CheckpointError(
                    f"{self.checkpoint_id}: the save was dropped before it was finalized (its queue was closed "
                    "or aborted); the checkpoint is not committed"), f"the DCP save of {self.checkpoint_id}",
                    rank=self.plan.rank)
                break
            finalize_async_saves(blocking=True, queue=self.queue)
        if self.error is not None:
            raise self.error
        return self.metadata


def finalize_async_saves(blocking: bool = False, *, queue: AsyncCallsQueue | None = None,
                         process_group: dist.ProcessGroup | None = None) -> list[AsyncSaveHandle]:
    """Commit the saves every rank has finished (all with ``blocking``); collective, call on every rank.

    Returns the handles completed by this call; a failed save raises DCP's
    ``CheckpointException`` (:class:`~asyncckpt.dcp.DcpCheckpointException`) on every rank.
    """
    q = queue if queue is not None else _QUEUES.get(None if process_group is None else id(process_group))
    if q is None:
        return []
    handles = _HANDLES.setdefault(id(q), {})
    try:
        done = q.maybe_finalize_async_calls(blocking=blocking)
    except Exception as exc:
        failed = [idx for idx in handles if not q.is_pending(idx) and not handles[idx].committed]
        # Every rank is here for the same save when its failure came through the all-reduce.
        collective = isinstance(exc, CheckpointError) and any(handles[i].world > 1 for i in failed)
        # A failure that reached this rank through the all-reduce (a peer died) may leave its save
        # still pending here: then name the saves in flight, oldest first.
        named = failed or sorted(i for i, h in handles.items() if not h.committed)
        names = ", ".join(handles[i].checkpoint_id for i in named)
        what = f"the DCP save of {names}" if names else "a DCP save"
        err = as_checkpoint_exception(exc, what, group=q.group, collective=collective)
        for idx in failed:
            handles.pop(idx).error = err
        raise err from exc
    out = [handles.pop(i) for i in done if i in handles]
    for idx in [i for i, h in handles.items() if h.done()]:  # finalized through the queue directly
        del handles[idx]
    return out


def _job(plan: AsyncSavePlan, writer: AsyncStorageWriter, q: AsyncCallsQueue, world: int,
         handle: AsyncSaveHandle, extra: list[ControlOp] | None = None) -> tuple[Job, str]:
    dcp_job, named = writer.prepare_job(q)
    spec = dcp_job.snapshot  # travels as the payload's snapshot, not inside the job
    assert spec is not None  # prepare_job always plans one
    dcp_job.snapshot = None
    label = f"DCP save of {writer.uri}"
    guard = SnapshotGuard(named)
    metadata = plan.metadata
    if not plan.collective or world == 1:
        # This rank's worker commits right after its write: no trainer call, no extra stage.
        assert metadata is not None
        then: list[ControlOp] = [writer.commit_op(metadata, world_size=plan.world_size, save_id=plan.save_id),
                                 *(extra or [])]
        payload = SavePayload(DcpSink(), spec, dcp_job, dcp_job.timeout_s, then=then, guarded=True)
        return Job([Stage(Kind.SAVE, payload)], [handle._finalize], guard=guard, label=label, confirm=True), "then"
    payload = SavePayload(DcpSink(), spec, dcp_job, dcp_job.timeout_s)

    def commit() -> ControlPayload:  # built when every rank has written (pickles the metadata then)
        assert metadata is not None
        return ControlPayload([writer.commit_op(metadata, world_size=plan.world_size, save_id=plan.save_id),
                               *(extra or [])])

    stages = [Stage(Kind.SAVE, payload), Stage(Kind.CONTROL, commit, None if plan.is_coordinator else ())]
    return Job(stages, [handle._finalize], guard=guard, label=label), "stage"


def async_save(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_writer: AsyncStorageWriter | None = None,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    coordinator_rank: int = 0,
    queue: AsyncCallsQueue | None = None,
    snapshot: Literal["auto", "blocking", "lazy"] = "auto",
    no_dist: bool = False,
    use_collectives: bool = True,
    extra_files: dict[str, bytes] | None = None,
) -> AsyncSaveHandle:
    """Plan now, snapshot and write on the persistent worker, commit on the coordinator's worker.

    Returns an :class:`AsyncSaveHandle`: call ``handle.wait_snapshot()`` before mutating the
    state, :func:`finalize_async_saves` each step (or ``handle.result()``) and
    :func:`close_async_saves` at shutdown. ``no_dist`` / ``use_collectives`` mean what they
    mean for ``dcp.save``. The call does no storage work.

    ``extra_files`` (file name -> bytes) are written into the checkpoint's directory by the
    committing worker right after the commit (``.metadata`` switched), each replaced atomically:
    they never appear before the tensors they go with. Only the committing rank passes them
    (the coordinator; every rank without collectives).
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
    if extra_files:
        check_extra_files(extra_files, storage_writer.uri)  # before planning: a bad name fails before any collective
    if extra_files and use_collectives and not no_dist and dist.is_available() and dist.is_initialized():
        rank = dist.get_rank(process_group)
        if rank != coordinator_rank:
            raise BadInputError(f"{storage_writer.uri}: extra_files given on rank {rank}, which does not commit this "
                                f"save; pass them on the coordinator (rank {coordinator_rank}) only")
    q = queue if queue is not None else default_queue(process_group)
    plan = save_state_dict_async_plan(state_dict, storage_writer, process_group, coordinator_rank, planner,
                                      no_dist=no_dist, use_collectives=use_collectives)
    if plan.collective:
        world = plan.world_size
    else:  # every rank commits its own part; completion is still agreed by all (DCP's closing barrier)
        world = dist.get_world_size(process_group) if plan.use_dist else 1
    extra: list[ControlOp] = [storage_writer.extra_files_op(extra_files)] if extra_files else []
    handle = AsyncSaveHandle(plan, q, 0.0, world)
    job, _ = _job(plan, storage_writer, q, world, handle, extra)
    # "auto" is blocking here: nothing is attached that would make the state's mutations wait.
    handle.call_idx = q.schedule_job(job, snapshot="lazy" if check_snapshot_mode(snapshot) == "lazy" else "blocking",
                                     world=world)
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
