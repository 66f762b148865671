"""AsyncCheckpointer: the non-blocking save path of the training loop."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ._loop import run_sync
from .catalog import _drop_stale_writes, commit_checkpoint
from .completion import dist_active, global_state
from .engine import SaveJob, SaveResult, snapshot, write
from .errors import BadInputError, CheckpointError, CheckpointExistsError
from .format import COMMIT_FILE
from .plan import plan_state
from .queue import AsyncCallsQueue, AsyncRequest, RemoteRankError
from .staging import SharedRegistry
from .storage import LocalStorage, join_key, open_storage, split_uri
from .storage.layouts import data_prefix
from .tiers import TieredPath, Tiers, drain_rank, prune_tier

__all__ = ["AsyncCheckpointer", "SaveHandle"]

log = logging.getLogger("asyncckpt")


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

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None


def _check_local_writable(root: str) -> None:
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


def _commit(root: str, name: str, world_size: int, step: int | None, overwrite: bool, update_latest: bool,
            metadata: dict[str, str], storage_options: dict[str, Any], handle: SaveHandle, layout: str = "flat") -> None:
    storage = open_storage(root, **storage_options)
    try:
        run_sync(
            commit_checkpoint(
                storage, name, world_size=world_size, step=step, overwrite=overwrite,
                update_latest=update_latest, metadata=metadata, layout=layout,
            )
        )
    finally:
        run_sync(storage.close())
    _mark_committed(handle, durable=False)


def _mark_committed(handle: SaveHandle, durable: bool = True) -> None:
    if not handle.committed:
        handle.committed = True
        handle.durable = durable


class AsyncCheckpointer:
    """Non-blocking checkpoints for a training loop.

    ``save`` plans the state, shares its tensors with the persistent worker and returns at once;
    the worker snapshots them into staging memory and streams them to storage. Call
    ``wait_snapshot()`` before mutating the state (automatic for ``optimizers`` given here or via
    :meth:`attach`), ``finalize()`` each step and ``finalize(blocking=True)``/``close()`` at the end.

    Args:
        optimizers: optimizer(s) whose ``step`` waits for the snapshot (a step pre-hook).
        max_in_flight: saves in flight at most (each holds one staging slot in the worker).
        when_full: ``"wait"`` for a slot, or ``"skip"`` the save (``save`` returns None).
        process_group: group of the completion all-reduce; ``no_dist`` disables it.
        coordinator_rank: the rank that writes the commit record and ``latest``.
        chunk_size / io_concurrency: streaming granularity and writes in flight.
        allow_pickle: store unsupported objects with pickle (loading them needs opt-in too).
        storage_options: passed to the storage backend (e.g. ``endpoint_url`` for S3).
        timeout_s: a save whose writing takes longer fails with StorageTimeoutError (hung storage).
        layout: key layout of data files: ``flat``, ``hashed`` or ``roundrobin`` (spreads S3 prefixes);
            recorded in the manifest, so loading never needs to be told.
    """

    def __init__(
        self,
        *,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        max_in_flight: int = 2,
        when_full: Literal["wait", "skip"] = "wait",
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
    ) -> None:
        if max_in_flight < 1:
            raise BadInputError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if when_full not in ("wait", "skip"):
            raise BadInputError(f"when_full must be 'wait' or 'skip', got {when_full!r}")
        if chunk_size < (5 << 20) or chunk_size > (5 << 30):
            raise BadInputError(f"chunk_size must be between 5 MiB and 5 GiB, got {chunk_size}")
        self.max_in_flight = max_in_flight
        self.when_full = when_full
        self.group = process_group
        self._no_dist = no_dist
        self.coordinator_rank = coordinator_rank
        self.chunk_size = chunk_size
        self.io_concurrency = io_concurrency
        self.allow_pickle = allow_pickle
        self.storage_options = dict(storage_options or {})
        if timeout_s is not None and timeout_s <= 0:
            raise BadInputError(f"timeout_s must be > 0 or None, got {timeout_s}")
        self.timeout_s = timeout_s
        data_prefix(layout, "probe")  # validates the layout name
        self.layout = layout
        opts = {"max_in_flight": max_in_flight, **(worker_options or {})}
        self.queue = AsyncCallsQueue(group=process_group, worker_options=opts)
        self._registry = SharedRegistry()
        self._registry_gen = -1
        self._handles: dict[int, SaveHandle] = {}
        self._draining: set[str] = set()
        self._hooks: list[Any] = []
        self._closed = False
        self.skipped = 0
        if optimizers is not None:
            self.attach(optimizers)
        if start_worker:
            self.queue.start_worker()

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
    def attach(self, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
               module: torch.nn.Module | None = None) -> None:
        """Make ``optimizer.step()`` (and optionally ``module`` forward) wait for the snapshot."""
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        for opt in optimizers or ():
            self._hooks.append(opt.register_step_pre_hook(lambda *_a, **_k: self.wait_snapshot()))
        if module is not None:
            self._hooks.append(module.register_forward_pre_hook(lambda *_a, **_k: self.wait_snapshot()))

    # -- the save path -----------------------------------------------------------------------
    def save(
        self,
        state_dict: Any,
        path: str | os.PathLike[str] | TieredPath,
        *,
        step: int | None = None,
        overwrite: bool = False,
        update_latest: bool = True,
        metadata: dict[str, str] | None = None,
    ) -> SaveHandle | None:
        """Start saving ``state_dict`` to ``path`` (``dir/NAME`` or ``s3://bucket/prefix/NAME``).

        Returns at once with a handle (None when skipped because ``max_in_flight`` saves are
        in flight and ``when_full="skip"``). Bad input raises BadInputError before anything is
        written. The checkpoint is complete once a later ``finalize`` commits it.
        """
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed")
        t0 = time.perf_counter()
        tiers = path.tiers if isinstance(path, TieredPath) else None
        if tiers is not None:
            root, name, storage_options = tiers.uris[0], path.name, tiers.storage_options[0]
            split_uri(f"{root}/{name}")  # validates the name
        else:
            root, name = split_uri(path)
            storage_options = self.storage_options
        storage = open_storage(root, **storage_options)  # validates the scheme before any work
        plan = plan_state(state_dict, allow_pickle=self.allow_pickle)
        if any(h.name == name and h.path == os.fspath(path) for h in self._handles.values()):
            raise CheckpointExistsError(f"{os.fspath(path)} is already being saved; wait for it or choose another name")
        _check_local_writable(root)
        try:
            if not overwrite and self.rank == self.coordinator_rank:
                if run_sync(storage.exists(join_key(name, COMMIT_FILE))):
                    raise CheckpointExistsError(
                        f"{os.fspath(path)} already holds a committed checkpoint; pass overwrite=True to replace it"
                    )
        finally:
            run_sync(storage.close())
        if isinstance(storage, LocalStorage):
            root = str(storage.root)  # the worker must not depend on our cwd
        if not self._wait_for_slot():
            self.skipped += 1
            log.warning("save skipped: %d saves in flight", self.in_flight,
                        extra={"rank": self.rank, "step": step, "op": "skip", "bytes": plan.data_nbytes, "seconds": 0.0})
            return None
        self.queue.start_worker()
        if self._registry_gen != self.queue.worker_generation:
            self._registry.reset()
            self._registry_gen = self.queue.worker_generation
        if any(t.is_cuda for t in plan.tensors.values()):
            torch.cuda.current_stream().synchronize()  # kernels writing the state must be done before IPC reads it
        refs, new, release = self._registry.prepare(plan.tensors)
        job = SaveJob(
            root=root, name=name, rank=self.rank, world_size=self.world_size, step=step,
            entries=plan.entries, tree=plan.tree, data_nbytes=plan.data_nbytes, refs=refs,
            inline=plan.inline, new_storages=new, release=release, overwrite=overwrite,
            chunk_size=self.chunk_size, io_concurrency=self.io_concurrency,
            storage_options=storage_options, timeout_s=self.timeout_s,
            layout=self.layout, data_prefix=data_prefix(self.layout, name, step),
        )
        handle = SaveHandle(os.fspath(path), name, step, -1, time.time())
        handle._where = (root, storage_options, [name, *([job.data_prefix] if job.data_prefix else [])])  # type: ignore[attr-defined]
        finalize_fns = []
        commit = None
        if self.rank == self.coordinator_rank:
            commit = functools.partial(
                _commit, root, name, self.world_size, step, overwrite, update_latest,
                dict(metadata or {}), storage_options, handle, self.layout,
            )
        finalize_fns.append(functools.partial(self._commit_agreed, commit, handle))
        if tiers is None:
            finalize_fns.append(functools.partial(setattr, handle, "durable", True))
        else:
            finalize_fns.append(functools.partial(self._after_fast_commit, tiers, handle, overwrite, update_latest, dict(metadata or {})))
        req = AsyncRequest(write, (job,), finalize_fns=finalize_fns, preload_fn=snapshot)
        handle.call_idx = self.queue.schedule_async_request(req)
        self._handles[handle.call_idx] = handle
        log.info("save scheduled", extra={"rank": self.rank, "step": step, "op": "save",
                                          "bytes": plan.data_nbytes, "seconds": time.perf_counter() - t0})
        return handle

    def _commit_agreed(self, commit: Any, handle: SaveHandle) -> None:
        """Run the coordinator's commit; with several ranks, tell every rank its outcome (one all-reduce).

        Without it a non-coordinator rank would report the save committed while the coordinator
        may still fail (or be killed) writing the commit record.
        """
        err: BaseException | None = None
        if commit is not None:
            try:
                commit()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
                err = exc
        failed = 1 if err is not None else 0
        if not self.no_dist and self.world_size > 1:
            failed = global_state(failed, no_dist=False, group=self.group)
        if err is not None:
            raise err
        if failed:
            raise RemoteRankError(
                f"the coordinator rank {self.coordinator_rank} failed to commit {handle.path}; "
                "it is not committed. See that rank's error."
            )
        _mark_committed(handle, False)

    # -- tiers -----------------------------------------------------------------------------------
    def _after_fast_commit(self, tiers: Tiers, handle: SaveHandle, overwrite: bool, update_latest: bool,
                           metadata: dict[str, str]) -> None:
        """Runs on every rank once the fast tier committed: queue the drain to the durable tiers."""
        self._draining.add(handle.name)
        if self.rank == self.coordinator_rank and tiers.keep[0] is not None:
            run_sync(self._prune(tiers, 0))
        if len(tiers.uris) == 1:
            handle.durable = True
            self._draining.discard(handle.name)
            return
        fns = [functools.partial(self._after_drain, tiers, handle, overwrite, update_latest, metadata)]
        req = AsyncRequest(drain_rank, (tiers, handle.name, self.rank, self.io_concurrency), finalize_fns=fns)
        self.queue.schedule_async_request(req)

    def _after_drain(self, tiers: Tiers, handle: SaveHandle, overwrite: bool, update_latest: bool,
                     metadata: dict[str, str]) -> None:
        self._draining.discard(handle.name)
        if self.rank == self.coordinator_rank:
            for i in range(1, len(tiers.uris)):
                _commit(tiers.uris[i], handle.name, self.world_size, handle.step, overwrite, update_latest,
                        metadata, tiers.storage_options[i], handle, self.layout)
                if tiers.keep[i] is not None:
                    run_sync(self._prune(tiers, i))
        handle.durable = True

    async def _prune(self, tiers: Tiers, i: int) -> None:
        storage = tiers.storage(i)
        try:
            deleted = await prune_tier(storage, tiers.keep[i] or 0, protect=set(self._draining))
        finally:
            await storage.close()
        for name in deleted:
            log.info("retention deleted %s/%s", tiers.uris[i], name,
                     extra={"rank": self.rank, "step": None, "op": "retention", "bytes": 0, "seconds": 0.0})

    def _wait_for_slot(self) -> bool:
        # Every decision here is global (finalize all-reduces), so all ranks agree on it.
        if self.in_flight < self.max_in_flight:
            return True
        self.finalize(blocking=False)
        if self.when_full == "skip":
            return self.in_flight < self.max_in_flight
        while self.in_flight >= self.max_in_flight:
            time.sleep(0.005)
            self.finalize(blocking=False)
        return True

    def wait_snapshot(self, timeout: float | None = None) -> None:
        """Block until every save's snapshot is taken; after it the state may be mutated."""
        self.queue.wait_snapshot(timeout)

    def finalize(self, blocking: bool = False) -> list[SaveHandle]:
        """Commit the saves every rank has finished (all of them with ``blocking=True``).

        Returns the handles committed by this call. A failed save raises its error here (a
        dead worker raises WorkerDiedError); later saves are unaffected.
        """
        done: list[SaveHandle] = []
        try:
            for idx in self.queue.maybe_finalize_async_calls(blocking=blocking, no_dist=self.no_dist):
                h = self._handles.pop(idx, None)
                result = self.queue.call_result(idx)
                if h is not None:  # drains of tiered saves have no handle of their own
                    h.result = result
                    done.append(h)
        except BaseException as exc:
            failed = [self._handles.pop(i) for i in [i for i in self._handles if i < self._min_pending_idx()]]
            for h in failed:
                h.error = exc
            if self.rank == self.coordinator_rank:
                self._drop_torn(failed)
            raise
        return done

    def _drop_torn(self, handles: list[SaveHandle]) -> None:
        """Best effort: remove what failed saves left (temp files, incomplete multipart uploads).

        A worker killed mid-save cannot abort its own writes; nothing else would ever find an
        upload whose object never appeared.
        """
        for h in handles:
            where = getattr(h, "_where", None)
            if h.committed or where is None:
                continue
            root, options, prefixes = where
            try:
                storage = open_storage(root, **options)
                try:
                    run_sync(_drop_stale_writes(storage, prefixes))
                finally:
                    run_sync(storage.close())
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the save's own error
                log.warning("could not clean up after the failed save of %s: %s", h.path, exc)

    def _min_pending_idx(self) -> int:
        calls = self.queue._calls
        return calls[0].idx if calls else 1 << 62

    def close(self, *, abort: bool = False) -> None:
        """Finalize every pending save (blocking) and stop the worker."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        try:
            if not abort:
                while self.queue.get_num_unfinalized_calls():
                    self.finalize(blocking=True)
        finally:
            self.queue.close(abort=True)

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(abort=exc_type is not None and not issubclass(exc_type, CheckpointError))

    def __del__(self) -> None:  # best effort: never leave a worker behind
        try:
            if not self._closed:
                self.queue.close(abort=True, timeout=5)
        except Exception:  # noqa: BLE001
            pass
