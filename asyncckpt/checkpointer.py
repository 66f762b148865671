"""AsyncCheckpointer: the non-blocking save path of the training loop."""

from __future__ import annotations

import logging
import operator
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch

from .completion import dist_active
from .control import CleanupOp, CommitOp, DrainOp, ReserveStagingOp, RetentionOp
from .deletion import on_delete
from .engine import NativeSink, SaveJob, SaveResult
from .errors import BadInputError, CheckpointError, CheckpointExistsError, WorkerDiedError
from .format import Entry, Node, check_compression, check_metadata
from .plan import INLINE_MAX, Packed, PackedTree, Plan, PlanCache, paused_gc, plan_state
from .queue import AsyncCallsQueue, Job, Stage
from .retention import RetentionPolicy
from .runtime.messages import Kind
from .runtime.protocol import ControlOp, ControlPayload, SavePayload
from .snapshot import SnapshotMode, SnapshotPolicy
from .staging import (
    CopyProgram,
    SharedRef,
    SharedRegistry,
    SnapshotGuard,
    SnapshotSpec,
    TrainerCopies,
    share_in_place,
    start_fd_sharing,
)
from .storage import check_scheme, split_uri
from .storage.layouts import data_prefix
from .tiers import TieredPath, Tiers

__all__ = ["AsyncCheckpointer", "SaveHandle", "check_local_writable", "check_when_full"]

log = logging.getLogger("asyncckpt")

#: CPU state of at most this many bytes (to be shared with the worker) is copied by ``save()``
#: itself: the copy costs less than a round trip to the worker and is consistent at once.
TRAINER_COPY_MAX = 4 << 20


_offset_and_size = operator.itemgetter(0, 1)
_is_cuda = operator.attrgetter("is_cuda")


@dataclass
class _Program:
    """What ``save()`` does for one layout, worked out once (:class:`~asyncckpt.plan.PlanCache`)."""

    layout_id: int
    shared: list[int]  # entries the worker copies from shared memory / IPC
    copy: CopyProgram | None  # the entries this thread copies now
    cuda: bool
    entries: Packed
    tree: Node  # the layout's first tree; later trees are sent as patches of it
    packed_tree: Packed
    last_tree: Node | None = None
    last_packed: Packed | PackedTree | None = None


@dataclass
class SaveHandle:
    """What ``save`` returns: follow one checkpoint from the call to its commit."""

    path: str
    name: str
    step: int | None
    call_idx: int
    started: float
    committed: bool = False
    durable: bool = False  # committed on every tier (== committed without tiers)
    result: SaveResult | None = None
    error: BaseException | None = None
    tiered: bool = False  # durable tiers follow the commit (then ``durable`` comes later)
    root: str = ""  # the root the checkpoint is saved under (its first tier)

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None


def check_local_writable(root: str) -> None:
    """Refuse a local destination that cannot be written (BadInputError), before anything is sent."""
    if "://" in root and not root.startswith("file://"):
        return
    path = root[len("file://") :] if root.startswith("file://") else root
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise BadInputError(f"cannot save under {path}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot save under {path}: {probe} is not writable by this process")


def check_when_full(when_full: str | None, on_full: str | None, owner: str) -> Literal["wait", "skip"]:
    """The back-pressure option (``on_full`` is the deprecated spelling of ``when_full``)."""
    if on_full is not None:
        warnings.warn(f"{owner}(on_full=...) is deprecated; use when_full=...", DeprecationWarning, stacklevel=3)
        if when_full is not None and when_full != on_full:
            raise BadInputError(f"{owner}: when_full={when_full!r} and on_full={on_full!r} disagree; pass when_full only")
        when_full = on_full
    when_full = when_full or "wait"
    if when_full not in ("wait", "skip"):
        raise BadInputError(f"when_full must be 'wait' or 'skip', got {when_full!r}")
    return "wait" if when_full == "wait" else "skip"


class AsyncCheckpointer:
    """Non-blocking checkpoints for a training loop.

    ``save`` plans the state, shares its tensors with the persistent worker and returns; the
    worker snapshots them into staging memory and streams them to storage; commit, ``latest``,
    drains and retention run on the worker too (the loop does no storage work). With one writer
    (one process, or ``no_dist=True``) a save commits by itself; with several ranks, call
    ``finalize()`` each step and ``finalize(blocking=True)``/``close()`` at the end (collective).

    Args:
        optimizers: optimizer(s) whose ``step`` waits for the snapshot (a step pre-hook).
        modules: module(s) whose forward waits for the snapshot (buffers changed in forward).
        snapshot: ``"blocking"``: ``save`` returns once the snapshot is taken (mutate freely
            after it; nvidia-resiliency-ext's contract). ``"lazy"``: ``save`` returns at once; a
            guard fails the save with TornSnapshotError if a tensor changes in place before the
            copy is done. ``"auto"`` (default): lazy when every saved tensor belongs to an
            attached optimizer/module (their hooks wait for the copy), blocking otherwise; after
            a torn snapshot it switches to blocking with a warning.
        max_in_flight: saves in flight at most (each holds one staging slot in the worker).
        when_full: ``"wait"`` for a slot, or ``"skip"`` the save (``save`` returns None).
        process_group: group of the completion all-reduce; ``no_dist=True`` makes this rank a
            writer of its own (world size 1: it commits alone).
        coordinator_rank: the rank that writes the commit record and ``latest``.
        chunk_size / io_concurrency: streaming granularity and writes in flight.
        allow_pickle: store unsupported objects with pickle (loading them needs opt-in too).
        storage_options: passed to the storage backend (e.g. ``endpoint_url`` for S3).
        timeout_s: a save whose writing takes longer fails with StorageTimeoutError (hung storage).
        layout: key layout of data files: ``flat``, ``hashed`` or ``roundrobin`` (spreads S3 prefixes);
            recorded in the manifest, so loading never needs to be told.
        finish_at_exit: saves still pending at normal interpreter exit are finished (default).
        compression / compression_level: ``"zstd"`` compresses each chunk in the worker's threads
            (level 1..22, default 1; needs ``asyncckpt[zstd]``); None (default) writes the state as is.
        incremental: entries whose bytes equal those of the last checkpoint committed here under the same
            root are stored as references to them, not rewritten (feature ``refs``, docs/format.md).
    """

    def __init__(
        self,
        *,
        optimizers: Any = None,
        modules: torch.nn.Module | Iterable[torch.nn.Module] | None = None,
        snapshot: SnapshotMode = "auto",
        max_in_flight: int = 2,
        when_full: Literal["wait", "skip"] | None = None,
        process_group: Any = None,
        no_dist: bool | None = None,
        coordinator_rank: int = 0,
        chunk_size: int = 32 << 20,
        io_concurrency: int = 4,
        allow_pickle: bool = False,
        storage_options: dict[str, Any] | None = None,
        worker_options: dict[str, Any] | None = None,
        start_worker: bool = True,
        timeout_s: float | None = None,
        layout: str = "flat",
        finish_at_exit: bool = True,
        on_full: Literal["wait", "skip"] | None = None,
        compression: Literal["zstd"] | None = None,
        compression_level: int | None = None,
        incremental: bool = False,
    ) -> None:
        self.compression, self.compression_level = check_compression(compression, compression_level)
        self.incremental = incremental
        if max_in_flight < 1:
            raise BadInputError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.when_full = check_when_full(when_full, on_full, "AsyncCheckpointer")
        if chunk_size < (5 << 20) or chunk_size > (5 << 30):
            raise BadInputError(f"chunk_size must be between 5 MiB and 5 GiB, got {chunk_size}")
        if io_concurrency < 1:
            raise BadInputError(f"io_concurrency must be >= 1, got {io_concurrency}")
        if timeout_s is not None and timeout_s <= 0:
            raise BadInputError(f"timeout_s must be > 0 or None, got {timeout_s}")
        self._policy = SnapshotPolicy(snapshot, self, AsyncCheckpointer.wait_snapshot)
        self.max_in_flight = max_in_flight
        self.group = process_group
        self._no_dist = no_dist
        self.coordinator_rank = coordinator_rank
        self.chunk_size = chunk_size
        self.io_concurrency = io_concurrency
        self.allow_pickle = allow_pickle
        self.storage_options = dict(storage_options or {})
        self.timeout_s = timeout_s
        data_prefix(layout, "probe")  # validates the layout name
        self.layout = layout
        opts = {"max_in_flight": max_in_flight, **(worker_options or {})}
        self.queue = AsyncCallsQueue(group=process_group, worker_options=opts, finish_at_exit=finish_at_exit)
        self._registry = SharedRegistry()
        self._plans = PlanCache()
        self._program: _Program | None = None
        self._copies = TrainerCopies(max_in_flight + 1)
        self._registry_gen = -1
        self._handles: dict[int, SaveHandle] = {}
        self._draining: set[str] = set()
        self._checked_roots: set[str] = set()
        self._committed: dict[tuple[str, str], None] = {}  # (root, name) committed here, newest last
        on_delete(self._forget)  # a name this process deletes may be saved again without overwrite
        self._cleanups: dict[int, tuple[list[ControlOp], int]] = {}  # call index -> cleanup if it fails, world
        self._closed = False
        self._deferred: list[BaseException] = []  # failures met while save() waited for a slot
        self.skipped = 0
        if optimizers is not None or modules is not None:
            self.attach(optimizers, modules=modules)
        if start_worker:
            self.queue.start_worker()
            # What the first save would otherwise do on the training loop: start the fd-sharing
            # listener and make (and touch) one copy slab, large enough for any state copied whole.
            start_fd_sharing()
            self._copies.reserve(TRAINER_COPY_MAX, count=1)

    # -- properties --------------------------------------------------------------------------
    @property
    def no_dist(self) -> bool:
        return (not dist_active(self.group)) if self._no_dist is None else self._no_dist

    @property
    def rank(self) -> int:
        if self.no_dist:
            return 0
        import torch.distributed as dist

        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        if self.no_dist:
            return 1
        import torch.distributed as dist

        return dist.get_world_size(self.group)

    @property
    def in_flight(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    # -- hooks ---------------------------------------------------------------------------------
    @property
    def snapshot(self) -> str:
        """The snapshot mode asked for at construction (``auto``, ``blocking`` or ``lazy``)."""
        return self._policy.mode

    @property
    def torn(self) -> int:
        """How many saves failed because the state changed before the snapshot was taken."""
        return self._policy.torn

    def attach(self, optimizers: Any = None, module: torch.nn.Module | None = None, *,
               modules: torch.nn.Module | Iterable[torch.nn.Module] | None = None) -> None:
        """Make ``optimizer.step()`` (and the forward of ``module``/``modules``) wait for the snapshot.

        Framework wrappers (Accelerate's ``AcceleratedOptimizer``, Lightning's
        ``LightningOptimizer``) are unwrapped to the optimizer inside.
        """
        mods: list[torch.nn.Module] = []
        for m in (module, modules):
            if isinstance(m, torch.nn.Module):
                mods.append(m)
            elif m is not None:
                mods.extend(m)
        self._policy.attach(optimizers, mods)
        # The first save would move these to shared memory: do it now, off the training loop.
        for m in mods:
            share_in_place([*m.parameters(), *m.buffers()])
        for opt in self._policy.optimizers:
            self._share_optimizer_state(opt)

    def _share_optimizer_state(self, opt: torch.optim.Optimizer) -> None:
        """Share an optimizer's parameters now, and its state once its first step created it."""
        share_in_place(p for g in opt.param_groups for p in g["params"])
        if opt.state:
            share_in_place(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
            return
        handle: Any = None

        def after_step(o: torch.optim.Optimizer, *_a: Any, **_k: Any) -> None:
            if o.state:
                share_in_place(v for st in o.state.values() for v in st.values() if isinstance(v, torch.Tensor))
                handle.remove()

        handle = opt.register_step_post_hook(after_step)

    def warm_up(self, state_dict: Any = None, *, wait: bool = False, timeout: float | None = 300.0) -> None:
        """Do now what the first save would otherwise do on the training loop: start the worker,
        plan ``state_dict`` (later saves of the same structure reuse the plan), move its tensors
        to shared memory, allocate the copy slabs here and the staging slots in the worker.

        Optional: without it the first ``save()`` pays for these once (docs/snapshot.md, "Cost").
        ``wait=True`` also blocks until the worker is up and its staging allocated: the worker's
        start (its ``import torch``: 1-2 s) then happens before the training loop instead of
        holding up an early save. Raises WorkerDiedError if the worker could not start, and
        CheckpointError if it is not ready within ``timeout`` seconds.
        """
        self.queue.start_worker()
        if state_dict is None and not wait:
            return
        nbytes = 0
        if state_dict is not None:
            plan = self._plans.plan(state_dict, allow_pickle=self.allow_pickle, full=lambda *a, **k: plan_state(*a, **k))
            prog = self._program_for(plan)
            share_in_place(plan.tensors[i] for i in prog.shared)
            if prog.copy is not None:
                self._copies.reserve(prog.copy.nbytes)
            start_fd_sharing()
            nbytes = plan.data_nbytes
        job = Job([Stage(Kind.CONTROL, ControlPayload([ReserveStagingOp(nbytes)]))], label="warm-up")
        idx = self.queue.schedule_job(job, world=1, detached=True)
        if not wait:
            return
        if not self.queue.wait_finished(idx, timeout):
            raise CheckpointError(f"warm_up: the asyncckpt worker was not ready within {timeout} s (pid "
                                  f"{self.queue.worker_pid}); saves will still wait for it")
        if self.queue.worker_pid is None:
            raise WorkerDiedError("warm_up: the asyncckpt worker could not start (it exited; its stderr says why, "
                                  "e.g. a worker_options 'preload' module that fails to import); the next save "
                                  "starts a new one")

    # -- the save path -----------------------------------------------------------------------
    def _forget(self, root_uri: str, name: str) -> None:
        local = "://" not in root_uri or root_uri.startswith("file://")
        where = os.path.realpath(root_uri.removeprefix("file://")) if local else root_uri
        for r, n in list(self._committed):
            if n == name and (os.path.realpath(r) if "://" not in r else r) == where:
                del self._committed[(r, n)]

    def _resolve(self, path: str | os.PathLike[str] | TieredPath) -> tuple[str, str, dict[str, Any], Tiers | None]:
        tiers = path.tiers if isinstance(path, TieredPath) else None
        if tiers is not None:
            root, name, options = tiers.uris[0], path.name, tiers.storage_options[0]  # type: ignore[union-attr]
            split_uri(f"{root}/{name}")  # validates the name
        else:
            root, name = split_uri(path)  # type: ignore[arg-type]
            options = self.storage_options
        check_scheme(root)
        if "://" not in root:
            root = os.path.abspath(root)  # the worker must not depend on our working directory
        elif root.startswith("file://"):
            root = os.path.abspath(root[len("file://"):])
        if root not in self._checked_roots:
            check_local_writable(root)
            self._checked_roots.add(root)
        return root, name, options, tiers

    def save(
        self,
        state_dict: Any,
        path: str | os.PathLike[str] | TieredPath,
        *,
        step: int | None = None,
        overwrite: bool = False,
        update_latest: bool = True,
        metadata: dict[str, str] | None = None,
        snapshot: SnapshotMode | None = None,
        retention: RetentionPolicy | None = None,
    ) -> SaveHandle | None:
        """Start saving ``state_dict`` to ``path`` (``dir/NAME``, ``s3://bucket/prefix/NAME`` or ``tiers / NAME``).

        Returns a handle (None when skipped because ``max_in_flight`` saves are in flight and
        ``when_full="skip"``); with ``snapshot="blocking"`` (or ``"auto"`` resolving to it) only
        once the worker holds its copy. Bad input raises BadInputError before anything is
        written; an existing committed checkpoint without ``overwrite`` fails the save at
        finalize with CheckpointExistsError. ``retention`` is applied to the root on the worker
        right after this checkpoint commits (never deleting ``latest``).
        """
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed")
        t0 = time.perf_counter()
        metadata = check_metadata(metadata)
        if retention is not None and not isinstance(retention, RetentionPolicy):
            raise BadInputError(f"retention must be an asyncckpt.RetentionPolicy or None, not {type(retention).__name__}: {retention!r}")
        root, name, storage_options, tiers = self._resolve(path)
        plan = self._plans.plan(state_dict, allow_pickle=self.allow_pickle,
                                full=lambda *a, **k: plan_state(*a, **k))
        shown = os.fspath(path)
        if any(h.name == name and h.path == shown and not h.done for h in self._handles.values()):
            raise CheckpointExistsError(f"{shown} is already being saved; wait for it or choose another name")
        if not overwrite and (root, name) in self._committed:
            # What this process knows already; the worker checks the storage itself before writing.
            raise CheckpointExistsError(f"{shown} already holds a committed checkpoint; pass overwrite=True to replace it")
        if not self._wait_for_slot():
            self.skipped += 1
            log.warning("save skipped: %d saves in flight", self.in_flight,
                        extra={"rank": self.rank, "step": step, "op": "skip", "bytes": plan.data_nbytes, "seconds": 0.0})
            return None
        self.queue.start_worker()
        if self._registry_gen != self.queue.worker_generation:
            self._registry.reset()
            self._registry_gen = self.queue.worker_generation
        prog = self._program_for(plan)
        if prog.cuda:
            torch.cuda.current_stream().synchronize()  # kernels writing the state must be done before IPC reads it
        shared = {i: plan.tensors[i] for i in prog.shared}
        self._copies.release(self.queue.snapshot_taken)
        runs = self._copy_now(prog.copy, plan.leaves, plan.moved)
        refs, new, release = self._registry.prepare({**shared, **self._copies.bases()})
        if new:
            self._policy.storages_moved()
        mode = self._policy.decide(shared.values(), snapshot)
        guard = SnapshotGuard(plan.watched(shared))
        copies = [(plan.entries[i].offset, refs[i]) for i in shared]
        if runs is not None:
            base = refs[-(runs[0] + 1)]
            copies += [(file_off, SharedRef(base.storage_id, torch.uint8, (n,), (1,), slab_off))
                       for file_off, slab_off, n in runs[1]]
        spec = SnapshotSpec(
            nbytes=plan.data_nbytes,
            copies=copies,
            inline=[(plan.entries[i].offset, data) for i, data in plan.inline.items()],
            new_storages=new, release=release,
        )
        rank, world = self.rank, self.world_size
        job = SaveJob(
            root=root, name=name, rank=rank, world_size=world, step=step,
            entries=cast("list[Entry]", prog.entries), tree=cast(Node, self._packed_tree(prog, plan.tree)),
            data_nbytes=plan.data_nbytes, overwrite=overwrite,
            chunk_size=self.chunk_size, io_concurrency=self.io_concurrency,
            storage_options=storage_options, layout=self.layout, data_prefix=data_prefix(self.layout, name, step),
            features=plan.features, compression=self.compression, compression_level=self.compression_level,
            incremental=self.incremental,
            base=next((n for r, n in reversed(self._committed) if r == root and n != name), None),
        )
        handle = SaveHandle(shown, name, step, -1, time.time(), tiered=tiers is not None and len(tiers.uris) > 1,
                            root=root)
        prefixes = list(dict.fromkeys([name, *([job.data_prefix] if job.data_prefix else [])]))
        commit = CommitOp(
            root, name, world, step, storage_options, overwrite=overwrite, update_latest=update_latest,
            metadata=dict(metadata or {}), layout=self.layout,
            retention=self._retention_ops(root, storage_options, retention, tiers, 0, step),
            milestone="committed",
        )
        cleanup: list[ControlOp] = [CleanupOp(root, storage_options, prefixes)]
        finalize_fns: list[Callable[[], Any]] = []
        if world == 1:
            then: list[Any] = [commit]
            if tiers is not None and len(tiers.uris) > 1:
                then += self._drain_ops(tiers, handle, overwrite, update_latest, metadata, retention)
            payload = SavePayload(NativeSink(), spec, job, self.timeout_s, then=then, on_failure=cleanup, guarded=True)
            stages = [Stage(Kind.SAVE, payload)]
        else:
            payload = SavePayload(NativeSink(), spec, job, self.timeout_s)
            coord = [self.coordinator_rank]
            stages = [
                Stage(Kind.SAVE, payload),
                Stage(Kind.CONTROL, lambda: ControlPayload([self._protected(commit)]), coord),
            ]
            finalize_fns.append(lambda: self._mark(handle, "committed"))
            if tiers is not None and len(tiers.uris) > 1:
                finalize_fns.append(lambda: self._schedule_drain(tiers, handle, overwrite, update_latest, metadata, retention))
        finalize_fns.append(lambda: self._finish(handle))
        guard_job = Job(
            stages, finalize_fns, guard=guard, label=f"save of {shown}",
            on_torn=lambda keys: self._policy.on_torn(shown, keys),
            on_progress=lambda label: self._mark(handle, label), confirm=world == 1, shares_state=bool(shared),
        )
        handle.call_idx = self.queue.schedule_job(guard_job, snapshot="blocking" if mode == "blocking" else "lazy",
                                                  world=world)
        if runs is not None:
            self._copies.busy(runs[0], handle.call_idx)
        self._handles[handle.call_idx] = handle
        self._cleanups[handle.call_idx] = (cleanup, world)
        log.info("save scheduled", extra={"rank": rank, "step": step, "op": "save",
                                          "bytes": plan.data_nbytes, "seconds": time.perf_counter() - t0})
        return handle

    def _split(self, plan: Plan) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(tensors the worker copies from shared memory / IPC, tensors this thread copies now).

        CPU tensors of at most 64 KiB are copied now; so is everything on CPU when all of it is
        at most ``TRAINER_COPY_MAX`` bytes (a copy that costs less than any round trip).
        """
        shared: dict[int, torch.Tensor] = {}
        copied: dict[int, torch.Tensor] = {}
        entries = plan.entries
        for i, t in plan.tensors.items():
            if entries[i].nbytes <= INLINE_MAX and not t.is_cuda:  # plans hold CPU and CUDA tensors only
                copied[i] = t
            else:
                shared[i] = t
        if shared and not any(map(_is_cuda, shared.values())) and \
                sum(plan.entries[i].nbytes for i in shared) <= TRAINER_COPY_MAX:
            copied.update(shared)
            shared = {}
        return shared, copied

    def _program_for(self, plan: Plan) -> _Program:
        """The save program of ``plan``'s layout: the cached one when the layout is the same."""
        prog = self._program
        if prog is not None and plan.layout_id and prog.layout_id == plan.layout_id:
            return prog
        with paused_gc():  # a view per small tensor (see plan.paused_gc)
            prog = self._new_program(plan)
        self._program = prog if plan.layout_id else None
        return prog

    def _new_program(self, plan: Plan) -> _Program:
        shared, copied = self._split(plan)
        entries, own = plan.entries, plan.own
        items = sorted(((entries[i].offset, entries[i].nbytes, t, own.get(i, -1)) for i, t in copied.items()),
                       key=_offset_and_size)
        return _Program(
            plan.layout_id, list(shared), CopyProgram(items) if items else None,
            any(map(_is_cuda, plan.tensors.values())), Packed(plan.entries, "entries"),
            plan.tree, Packed(plan.tree, "tree"),
        )

    @staticmethod
    def _packed_tree(prog: _Program, tree: Node) -> Packed | PackedTree:
        if tree is prog.tree:
            return prog.packed_tree
        if tree is not prog.last_tree:  # plain values changed: the same layout, another tree
            prog.last_tree, prog.last_packed = tree, PackedTree.of(tree, prog.tree, prog.packed_tree)
        assert prog.last_packed is not None
        return prog.last_packed

    def _copy_now(self, program: CopyProgram | None, leaves: list[torch.Tensor],
                  moved: list[int]) -> tuple[int, list[tuple[int, int, int]]] | None:
        if program is None:
            return None
        got = self._copies.copy(program, leaves, moved)
        while got is None:  # every slab still waits for its snapshot
            self.queue.wait_snapshot()
            self._copies.release(self.queue.snapshot_taken)
            got = self._copies.copy(program, leaves, moved)
        return got

    def _retention_ops(self, root: str, options: dict[str, Any], policy: RetentionPolicy | None,
                       tiers: Tiers | None, tier: int, step: int | None) -> list[RetentionOp]:
        ops = []
        if policy is not None and policy.active:
            ops.append(RetentionOp(root, options, policy, upto_step=step, rank=self.rank))
        if tiers is not None and tiers.keep[tier] is not None:
            ops.append(RetentionOp(root, options, RetentionPolicy(keep_last=tiers.keep[tier]), rank=self.rank))
        return ops

    def _protected(self, op: CommitOp) -> CommitOp:
        """``op`` with retention told which checkpoints are still draining (decided now, when it starts)."""
        protect = frozenset(self._draining)
        return replace(op, retention=[replace(r, protect=r.protect | protect) for r in op.retention])

    def _drain_ops(self, tiers: Tiers, handle: SaveHandle, overwrite: bool, update_latest: bool,
                   metadata: dict[str, str] | None, retention: RetentionPolicy | None) -> list[Any]:
        ops: list[Any] = [DrainOp(tiers, handle.name, self.rank, self.io_concurrency)]
        for i in range(1, len(tiers.uris)):
            ops.append(CommitOp(
                tiers.uris[i], handle.name, self.world_size, handle.step, tiers.storage_options[i],
                overwrite=overwrite, update_latest=update_latest, metadata=dict(metadata or {}), layout=self.layout,
                retention=self._retention_ops(tiers.uris[i], tiers.storage_options[i], retention, tiers, i, handle.step),
                milestone="durable" if i == len(tiers.uris) - 1 else None,
            ))
        return ops

    def _schedule_drain(self, tiers: Tiers, handle: SaveHandle, overwrite: bool, update_latest: bool,
                        metadata: dict[str, str] | None, retention: RetentionPolicy | None) -> None:
        """Every rank, once the fast tier committed: drain to the durable tiers, then commit there."""
        ops = self._drain_ops(tiers, handle, overwrite, update_latest, metadata, retention)
        self._draining.add(handle.name)

        def done() -> None:
            self._draining.discard(handle.name)
            self._mark(handle, "durable")

        job = Job(
            [Stage(Kind.CONTROL, ControlPayload(ops[:1])),
             Stage(Kind.CONTROL, lambda: ControlPayload([self._protected(o) for o in ops[1:]]), [self.coordinator_rank])],
            [done], label=f"drain of {handle.path}",
        )
        self.queue.schedule_job(job, world=self.world_size)

    def _mark(self, handle: SaveHandle, label: str) -> None:
        if label in ("committed", "durable"):
            self._committed[(handle.root, handle.name)] = None
            if len(self._committed) > 10_000:
                del self._committed[next(iter(self._committed))]
            self._cleanups.pop(handle.call_idx, None)
        if label == "committed" and not handle.committed:
            handle.committed = True
            handle.durable = handle.durable or not handle.tiered
        elif label == "durable":
            handle.committed = handle.durable = True

    def _finish(self, handle: SaveHandle) -> None:
        handle.result = self.queue.call_result(handle.call_idx)
        self._mark(handle, "committed")

    def _wait_for_slot(self) -> bool:
        # Every decision here is global (finalize all-reduces), so all ranks agree on it.
        if self.in_flight < self.max_in_flight:
            return True
        self._finalize_for_slot()
        if self.when_full == "skip":
            return self.in_flight < self.max_in_flight
        while self.in_flight >= self.max_in_flight:
            time.sleep(0.002)
            self._finalize_for_slot()
        return True

    def _finalize_for_slot(self) -> None:
        """Finalize to free a slot; an earlier save's failure is kept for the next ``finalize()``,
        not raised by this unrelated ``save()``."""
        try:
            self.finalize(blocking=False)
        except CheckpointError as exc:
            self._deferred.append(exc)

    def wait_snapshot(self, timeout: float | None = None) -> None:
        """Block until every save's snapshot is taken; after it the state may be mutated."""
        self.queue.wait_snapshot(timeout)

    def nothing_to_finalize(self) -> bool:
        """True when a non-blocking :meth:`finalize` on this rank alone would find nothing to do now
        (no save finished, failed or awaiting its snapshot's verdict). A hint for per-step polling;
        with several ranks ``finalize`` is collective: call it anyway."""
        return not self._deferred and self.queue.nothing_to_finalize()

    def finalize(self, blocking: bool = False) -> list[SaveHandle]:
        """Finish the saves every rank has finished (all of them with ``blocking=True``).

        Collective when several ranks save. Returns the handles finalized by this call. A
        failed save raises its error here (a dead worker raises WorkerDiedError, a torn snapshot
        TornSnapshotError); later saves are unaffected.
        """
        done: list[SaveHandle] = []
        if self._deferred:
            raise self._deferred.pop(0)
        try:
            for idx in self.queue.maybe_finalize_async_calls(blocking=blocking, no_dist=self.no_dist):
                h = self._handles.pop(idx, None)
                if h is not None:  # drains of tiered saves have no handle of their own
                    done.append(h)
        except BaseException as exc:
            for i in [i for i in self._handles if not self.queue.is_pending(i)]:
                h = self._handles.pop(i)
                if not h.committed:
                    h.error = exc
                    self._clean_up_after(h)
            raise
        return done

    def _clean_up_after(self, h: SaveHandle) -> None:
        """On the coordinator: remove what a failed multi-rank save (or one whose worker died) left."""
        cleanup, world = self._cleanups.pop(h.call_idx, (None, 1))
        if cleanup is None or self.rank != self.coordinator_rank:
            return
        if world == 1 and not isinstance(h.error, WorkerDiedError):
            return  # the worker cleaned up after its own failed save
        try:
            self.queue.schedule_job(Job([Stage(Kind.CONTROL, ControlPayload(cleanup))], label=f"cleanup of {h.path}"),
                                    world=1, detached=True)
        except CheckpointError as exc:  # cleanup must not hide the save's own error
            log.warning("could not clean up after the failed save of %s: %s", h.path, exc)

    def close(self, *, abort: bool = False) -> None:
        """Finish every pending save (blocking) and stop the worker; ``abort`` drops them instead.

        Raises the first failed save's error after every other pending save was finished.
        """
        if self._closed:
            return
        self._closed = True
        self._policy.close()
        errors: list[BaseException] = []
        try:
            if not abort:
                while self.queue.get_num_unfinalized_calls() or self._deferred:
                    try:
                        self.finalize(blocking=True)
                    except CheckpointError as exc:  # finish the others first, then report
                        errors.append(exc)
        finally:
            self.queue.close(abort=True)
            self._plans.clear()  # the last state's tensors are no longer needed
            self._program = None
            self._copies.clear()
        if errors:
            if len(errors) > 1:
                log.warning("asyncckpt: %d saves failed; raising the first: %s", len(errors),
                            "; ".join(str(e) for e in errors[1:]))
            raise errors[0]

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # The block raised: saves whose snapshot is complete are still committed (one writer);
        # the others are abandoned. Several ranks cannot agree without every rank: abandon all.
        keep = self.world_size == 1
        dropped = self.queue.abandon_unsnapshotted(
            f"abandoned: the with block raised {exc_type.__name__} before its snapshot was taken", all_calls=not keep)
        if dropped:
            log.warning("asyncckpt: %d save(s) abandoned because the with block raised", dropped)
        try:
            self.close()
        except CheckpointError as close_exc:  # keep the block's own exception the one that propagates
            log.warning("asyncckpt: finishing saves after the with block raised: %s", close_exc)

    def __del__(self) -> None:
        # Pending saves stay with the queue, which finishes them at interpreter exit.
        try:
            self._policy.close()
        except Exception:  # noqa: BLE001
            pass
