"""CheckpointManager: when to save, what resuming needs, preemption and pause, retention.

Built on :class:`~asyncckpt.AsyncCheckpointer` (the one save path) and the catalog::

    mgr = asyncckpt.CheckpointManager(root, every_steps=500, keep_last=3)
    start = mgr.restore({"model": model, "optim": opt, "sched": sched})
    for step in range(start, total):
        ...one training step...
        mgr.maybe_save(step + 1, {"model": model, "optim": opt, "sched": sched})
        if mgr.preempted:
            break
    mgr.close()
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from ._loop import run_sync
from .catalog import CheckpointInfo, read_latest
from .checkpointer import AsyncCheckpointer, SaveHandle, check_when_full
from .errors import BadInputError, CheckpointError, CheckpointNotFoundError, IntegrityError, TornSnapshotError
from .kinds.base import kind_named
from .listing import list_checkpoints_async
from .load import load_async
from .logs import log_event
from .plan import INLINE_MAX
from .preemption import DEFAULT_SIGNALS, PauseWatcher, SignalWatcher, clear_pause, read_pause
from .retention import RetentionPolicy
from .rng import get_rng_state, set_rng_state
from .storage import LocalStorage, Storage, open_storage
from .tiers import TieredPath, Tiers

__all__ = ["RESERVED_KEY", "CheckpointManager"]

log = logging.getLogger("asyncckpt")

#: Key under which the manager stores its own record (step, RNG state) next to the user's state.
RESERVED_KEY = "__asyncckpt__"
_PLAIN = (type(None), bool, int, float, str, bytes, bytearray, np.ndarray, np.generic, dict, list, tuple)
_TENSOR_OR_PLAIN = (torch.Tensor, *_PLAIN)


@dataclass
class _Pending:
    handle: SaveHandle
    t_start: float  # manager clock at save()
    wall_start: float
    reason: str  # "steps", "time", "explicit", "SIGTERM", "pause", ...


def _restorable(kind: str) -> bool:
    """A checkpoint of ``kind`` loads into a manager's state (its ranks have asyncckpt manifests)."""
    handler = kind_named(kind)
    return handler is not None and handler.has_rank_manifests


def _check_name_format(fmt: str) -> None:
    try:
        a, b = fmt.format(step=1), fmt.format(step=2)
    except (KeyError, IndexError, ValueError) as exc:
        raise BadInputError(f"name_format {fmt!r} must format with step= only, e.g. 'step-{{step:08d}}' ({exc})") from exc
    if a == b or "/" in a or a in (".", "..") or not a:
        raise BadInputError(f"name_format {fmt!r} must give one distinct name per step, without '/'")


class CheckpointManager:
    """Saves a training job's state on a policy, restores it exactly, reacts to preemption.

    Args:
        root: where checkpoints go: a directory, ``s3://bucket/prefix`` or :class:`~asyncckpt.Tiers`
            (saves commit on the fast tier and drain to the others; restore reads the fastest
            tier holding a verified copy). Each checkpoint is named
            ``name_format.format(step=step)`` (default ``step-00000500``).
        every_steps: save when ``step`` is a multiple of this.
        every_seconds: save when this many seconds passed (on ``clock``) since the last save
            that committed or is still streaming (or since the manager started/restored).
        keep_last / keep_every / max_age_s: retention after each commit: keep the newest N, every
            step that is a multiple of K, and those younger than T seconds; never the ``latest``
            target (applied to every tier; a checkpoint still draining is kept). All None keeps
            everything.
        max_in_flight / when_full: at most this many saves stream at once; when another is due,
            ``"wait"`` for a slot or ``"skip"`` it (logged). ``on_full`` is the deprecated spelling.
        snapshot: ``"auto"`` (default), ``"blocking"`` or ``"lazy"``: when a save may return before
            the worker holds its copy (see :class:`~asyncckpt.AsyncCheckpointer`). Optimizers and
            modules in the state are attached, so ``"auto"`` is lazy for a usual model + optimizer;
            a save that the state outran in ``"auto"`` is retried at the next ``maybe_save``.
        rng: save Python, NumPy, torch CPU and CUDA RNG state and restore it.
        signals: signals that request a final save and stop (default SIGTERM, SIGUSR1);
            None or () installs no handler.
        pause_check_s: how often to look for an ``asyncckpt pause`` request (default 1 s on a
            local root, 10 s elsewhere, where a background thread polls).
        clock / wall_clock: time sources (monotonic / Unix), injectable for tests.
        on_error: a failed save ``"raise"`` at the next call (default) or is only logged (``"warn"``).
        storage_options, process_group, no_dist, allow_pickle, compression, compression_level, incremental and
        ``checkpointer_options`` go to the :class:`AsyncCheckpointer`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Tiers,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        max_age_s: float | None = None,
        max_in_flight: int = 2,
        when_full: Literal["wait", "skip"] | None = None,
        snapshot: Literal["auto", "blocking", "lazy"] = "auto",
        rng: bool = True,
        signals: Iterable[int] | None = DEFAULT_SIGNALS,
        pause_check_s: float | None = None,
        name_format: str = "step-{step:08d}",
        on_error: Literal["raise", "warn"] = "raise",
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        no_dist: bool | None = None,
        allow_pickle: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        checkpointer_options: dict[str, Any] | None = None,
        on_full: Literal["wait", "skip"] | None = None,
        compression: Literal["zstd"] | None = None,
        compression_level: int | None = None,
        incremental: bool = False,
    ) -> None:
        when_full = check_when_full(when_full, on_full, "CheckpointManager")
        if every_steps is not None and (isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1):
            raise BadInputError(f"every_steps must be an integer >= 1 (or None), got {every_steps!r}")
        if every_seconds is not None and not every_seconds > 0:
            raise BadInputError(f"every_seconds must be > 0 (or None), got {every_seconds!r}")
        if on_error not in ("raise", "warn"):
            raise BadInputError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        _check_name_format(name_format)
        self.retention = RetentionPolicy(keep_last, keep_every, max_age_s)
        self.tiers = root if isinstance(root, Tiers) else None
        self.root = root.uris[0] if isinstance(root, Tiers) else os.fspath(root)
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.rng = rng
        self.name_format = name_format
        self.on_error = on_error
        self.storage_options = dict(storage_options or {})
        self.clock = clock
        self.wall_clock = wall_clock
        self._storages = self._open_storages()
        self._storage = self._storages[0]
        for st in self._storages:  # so `asyncckpt pause ROOT` works before the first checkpoint
            if isinstance(st, LocalStorage):
                try:
                    st.root.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise BadInputError(f"cannot create the checkpoint root {st.root}: {exc}") from exc
        self.ckpt = AsyncCheckpointer(
            max_in_flight=max_in_flight, when_full=when_full, snapshot=snapshot, process_group=process_group,
            no_dist=no_dist,
            allow_pickle=allow_pickle, storage_options=self.storage_options, compression=compression,
            compression_level=compression_level, incremental=incremental, **(checkpointer_options or {}),
        )
        self.group = process_group
        self._signals = SignalWatcher(signals).install()
        self._pauses = [
            PauseWatcher(st, interval=pause_check_s if pause_check_s is not None else
                         (1.0 if isinstance(st, LocalStorage) else 10.0), clock=clock)
            for st in self._storages
        ]
        self._warm = False  # the first maybe_save that does not save warms the checkpointer up
        self._retry_torn = False  # an "auto" save was torn: save again at the next maybe_save
        self._pending: dict[int, _Pending] = {}
        self._hooked: set[int] = set()
        # the keys and values of the last state that passed the checks (held until close)
        self._checked: tuple[list[str], list[Any]] = ([], [])
        self._converted: list[str] = []  # its keys whose values are saved as state_dict() / get_state()
        self._multi: bool | None = None  # several ranks? decided at first use (dist may start after us)
        self._looked_at_root = False  # restore() ran, or the first save checked for an earlier run
        self._newest_at_start: int | None = None
        self._first_saved_step: int | None = None  # set when this run saves without having restored
        self._scan = threading.Thread(target=self._look_at_root, name="asyncckpt-root-scan", daemon=True)
        self._scan.start()
        self._ref_time = clock()
        self._committed_ref_time = self._ref_time
        self.last_step: int | None = None
        self.last_committed_step: int | None = None
        self.last_committed: SaveHandle | None = None
        self.preempted = False
        self.preempt_reason: str | None = None
        self.saves_started = 0
        self.saves_committed = 0
        self.saves_skipped = 0
        self.errors: deque[BaseException] = deque(maxlen=16)
        self._closed = False

    # -- small helpers ------------------------------------------------------------------------
    def _open_storages(self) -> list[Storage]:
        if self.tiers is not None:
            return [self.tiers.storage(i) for i in range(len(self.tiers.uris))]
        return [open_storage(self.root, **self.storage_options)]

    @property
    def rank(self) -> int:
        return self.ckpt.rank

    @property
    def world_size(self) -> int:
        return self.ckpt.world_size

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.ckpt.coordinator_rank

    @property
    def in_flight(self) -> int:
        return self.ckpt.in_flight

    def path_for(self, step: int) -> str | TieredPath:
        """The checkpoint path of ``step`` under the root."""
        name = self.name_format.format(step=step)
        if self.tiers is not None:
            return self.tiers / name
        if "://" in self.root:
            return f"{self.root.rstrip('/')}/{name}"
        return os.path.join(self.root, name)

    def _agree(self, values: list[int]) -> list[int]:
        """Element-wise max over ranks, so every rank takes the same decision (no-op without dist)."""
        if self._multi is None:
            self._multi = not self.ckpt.no_dist and self.world_size > 1
        if not self._multi:
            return values
        import torch.distributed as dist

        device = torch.device("cpu")
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [int(x) for x in t.tolist()]

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed; create a new one")

    def _check_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise BadInputError(f"step must be an integer, got {type(step).__name__} {step!r}")
        if step < 0:
            raise BadInputError(f"step must be >= 0, got {step}")
        if self.last_step is not None and step <= self.last_step:
            raise BadInputError(
                f"step {step} does not come after step {self.last_step} (the previous maybe_save/restore); "
                "steps must increase: pass the number of optimizer steps done so far"
            )

    # -- what gets saved ------------------------------------------------------------------------
    def _same_state(self, state: Mapping[str, Any]) -> bool:
        """The same objects under the same keys as the state checked last (called every step: two
        C-level passes that stop at the first difference; the checked objects are held, so `is` is exact)."""
        keys, vals = self._checked
        return (len(state) == len(keys) and all(map(operator.is_, state.values(), vals))
                and all(map(operator.eq, state, keys)))

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, Mapping):
            raise BadInputError(f"the state must be a mapping of names to objects, got {type(state).__name__}")
        if self._same_state(state):
            return
        converted = []
        for k, v in state.items():
            if not isinstance(k, str):
                raise BadInputError(f"state key {k!r} must be a str")
            if k == RESERVED_KEY:
                raise BadInputError(f"state key {RESERVED_KEY!r} is reserved for the manager's own record; rename it")
            if isinstance(v, _TENSOR_OR_PLAIN):
                continue
            if isinstance(v, torch.Generator) or (callable(getattr(v, "state_dict", None))
                                                  and callable(getattr(v, "load_state_dict", None))):
                converted.append(k)
                continue
            raise BadInputError(
                f"state[{k!r}]: a {type(v).__module__}.{type(v).__qualname__} has no state_dict()/load_state_dict() "
                "and is not a tensor, array, torch.Generator or plain value (None, bool, int, float, str, bytes, "
                "lists/dicts of them); give it state_dict()/load_state_dict() or save what it holds instead"
            )
        self._checked, self._converted = (list(state), list(state.values())), converted
        self._hook(state)

    def _hook(self, state: Mapping[str, Any]) -> None:
        # The snapshot must be taken before the state is mutated. Parameters change in
        # optimizer.step, which waits for it. Buffers may change in forward (BatchNorm
        # statistics): small ones are copied at save() time anyway, so only a module holding a
        # buffer too large for that makes its forward wait too.
        for v in state.values():
            if id(v) in self._hooked:
                continue
            if isinstance(v, torch.optim.Optimizer):
                self.ckpt.attach(v)
            elif isinstance(v, torch.nn.Module):
                if any(b.numel() * b.element_size() > INLINE_MAX for b in v.buffers()):
                    self.ckpt.attach(module=v)
            else:
                continue
            self._hooked.add(id(v))

    def _state_for_save(self, step: int, state: Mapping[str, Any]) -> dict[str, Any]:
        self._check_state(state)
        out = dict(state)  # tensors and plain values as they are (a state of 50,000 of them: one C-level copy)
        for k in self._converted:
            v = out[k]
            out[k] = v.get_state() if isinstance(v, torch.Generator) else v.state_dict()
        out[RESERVED_KEY] = {
            "version": 1,
            "step": int(step),
            "time": self.wall_clock(),
            "world_size": self.world_size,
            "rng": get_rng_state() if self.rng else None,
        }
        return out

    # -- finalize and retention -------------------------------------------------------------------
    def _collect(self, blocking: bool = False) -> list[SaveHandle]:
        """Commit what every rank finished; run retention for each commit; handle failures."""
        if not self._pending and not self.ckpt.in_flight:
            return []
        while True:
            try:
                self.ckpt.finalize(blocking=blocking)
                break
            except CheckpointError as exc:
                self._on_failure(exc)
                if not blocking:
                    break
        # Look at the handles, not at what this finalize returned: the checkpointer may have
        # committed some while it waited for a slot.
        done = [p for p in self._pending.values() if p.handle.committed and not self.ckpt.queue.is_pending(p.handle.call_idx)]
        done.sort(key=lambda p: p.handle.call_idx)
        for p in done:
            h = p.handle
            del self._pending[h.call_idx]
            self.saves_committed += 1
            self.last_committed = h
            self.last_committed_step = h.step
            self._committed_ref_time = max(self._committed_ref_time, p.t_start)
            nbytes = h.result.nbytes if h.result is not None else None
            log_event(
                f"checkpoint {h.path} is complete", op="finalize", rank=self.rank, step=h.step, nbytes=nbytes,
                seconds=self.wall_clock() - p.wall_start,
            )
        return [p.handle for p in done]

    def _free_slot(self) -> bool:
        """Make room for one more save: wait (``when_full="wait"``) or say no (``"skip"``).

        Done here rather than inside the checkpointer so every commit and failure passes
        through :meth:`_collect`. Each check is global (finalize all-reduces), so ranks agree.
        """
        limit = self.ckpt.max_in_flight
        if self.ckpt.in_flight < limit:
            return True
        self._collect()
        if self.ckpt.when_full == "skip":
            return self.ckpt.in_flight < limit
        while self.ckpt.in_flight >= limit:
            time.sleep(0.005)
            self._collect()
        return True

    def _on_failure(self, exc: CheckpointError) -> None:
        failed = [i for i, p in self._pending.items() if p.handle.error is not None]
        torn_in_auto = isinstance(exc, TornSnapshotError) and self.ckpt.snapshot == "auto"
        for i in failed:
            p = self._pending.pop(i)
            if torn_in_auto:
                log_event(f"the state changed while step {p.handle.step} was being copied; that save is dropped and "
                          "the next maybe_save saves again (now waiting for the copy)", op="save", rank=self.rank,
                          step=p.handle.step, level=logging.WARNING)
            else:
                log_event(f"save of {p.handle.path} failed: {exc}", op="save", rank=self.rank, step=p.handle.step,
                          level=logging.ERROR)
        if torn_in_auto:
            self._retry_torn = True
            self._ref_time = max([self._committed_ref_time] + [p.t_start for p in self._pending.values()])
            return
        self.errors.append(exc)
        # The time policy counts from the newest save that may still commit.
        self._ref_time = max([self._committed_ref_time] + [p.t_start for p in self._pending.values()])
        if self.on_error == "raise":
            raise exc

    def _look_at_root(self) -> None:
        """Background (no storage work in the loop): the newest step the root held when we started."""
        try:
            steps = [i.step for i in self._list() if i.step is not None]
        except Exception:  # noqa: BLE001 - only feeds a warning
            return
        self._newest_at_start = max(steps) if steps else None

    def _warn_if_overwriting(self) -> None:
        first = self._first_saved_step
        if first is None or self._scan.is_alive():
            return
        self._first_saved_step = None
        newest = self._newest_at_start
        if self.is_coordinator and newest is not None and newest >= first:
            log.warning(
                "%s already holds checkpoints up to step %d and this run did not call restore(); "
                "saves replace checkpoints of the same step", self.root, newest,
                extra={"rank": self.rank, "step": first, "op": "save", "bytes": None, "seconds": None},
            )

    # -- saving --------------------------------------------------------------------------------
    def _start_save(self, step: int, state: Mapping[str, Any], reason: str) -> SaveHandle | None:
        sd = self._state_for_save(step, state)
        if not self._free_slot():
            self.saves_skipped += 1
            log_event(f"save of step {step} skipped: {self.ckpt.in_flight} saves in flight (when_full='skip')",
                      op="skip", rank=self.rank, step=step)
            return None
        if not self._looked_at_root:
            self._looked_at_root = True
            self._first_saved_step = int(step)
        self._warn_if_overwriting()
        t, wall = self.clock(), self.wall_clock()
        policy = None
        if self.retention.active and self.is_coordinator:
            policy = self.retention if self.wall_clock is time.time else replace(self.retention, now=self.wall_clock())
        handle = self.ckpt.save(
            sd, self.path_for(step), step=int(step), overwrite=True, metadata={"manager": "1", "reason": reason},
            retention=policy,
        )
        if handle is None:
            self.saves_skipped += 1
            return None
        self.saves_started += 1
        self._pending[handle.call_idx] = _Pending(handle, t, wall, reason)
        self._ref_time = t
        return handle

    def _due(self, step: int) -> tuple[bool, bool]:
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_time = self.every_seconds is not None and self.clock() - self._ref_time >= self.every_seconds
        return by_steps, by_time

    def _pause_requested(self) -> bool:
        return any(p.requested() for p in self._pauses)

    def _stop_request(self) -> tuple[int, int]:
        return int(self._signals.triggered), int(self._pause_requested())

    def _quiet_step(self, step: Any, state: Any) -> bool:
        """True when this ``maybe_save`` has nothing to do: one process, warm, nothing to finalize (saves
        in flight still writing), no save due, no signal or pause, and the same ``step`` type and
        ``state`` objects as checked before.

        Most steps are such steps; this one frame of plain attribute reads is all they cost (the full
        path below decides the same, in a dozen calls each cold after a training step).
        """
        last = self.last_step
        if (type(step) is not int or last is None or step <= last or self._multi is not False or not self._warm
                or self._closed or self.preempted or self._retry_torn or self._signals.triggered
                or not self.ckpt.nothing_to_finalize()):
            return False
        if self._pending:  # saves in flight: quiet unless one was finalized outside _collect
            q = self.ckpt.queue
            if any(p.handle.committed and not q.is_pending(i) for i, p in self._pending.items()):
                return False
        if any(self._due(step)):
            return False
        return isinstance(state, dict) and self._same_state(state) and not self._pause_requested()

    def maybe_save(self, step: int, state: Mapping[str, Any]) -> SaveHandle | None:
        """Save ``state`` as of ``step`` if the policy says so; returns at once.

        ``step`` is the number of steps done (it must increase from call to call). Commits
        finished saves (non-blocking) and applies retention. After a preemption signal or a
        pause request it saves whatever the policy, waits until that checkpoint is committed
        and sets :attr:`preempted`. Returns the save's handle, or None when nothing was saved.
        """
        if self._quiet_step(step, state):
            self.last_step = step
            return None
        self._check_open()
        self._check_step(step)
        self._check_state(state)  # every call: bad state fails at step 1, not at the first save hours later
        if self.preempted:
            self.last_step = int(step)
            return None
        self._collect()
        by_steps, by_time = self._due(step)
        if self._retry_torn:
            by_steps, self._retry_torn = True, False
        sig, pause, time_due = self._agree([*self._stop_request(), int(by_time)])
        if sig or pause:
            return self._stop_save(int(step), state, self._signals.received or ("signal on another rank" if sig else "pause"), pause=bool(pause))
        handle = None
        if by_steps or time_due:
            handle = self._start_save(int(step), state, "steps" if by_steps else "time")
        elif not self._warm:
            # Once, on a step that does not save: plan the state, allocate the copy slabs and the
            # worker's staging, so the first save costs the loop what the later ones do.
            self.ckpt.warm_up(self._state_for_save(int(step), state))
        self._warm = True
        self.last_step = int(step)
        return handle

    def warm_up(self, state: Mapping[str, Any], *, timeout: float | None = 300.0) -> None:
        """Before the training loop: start the worker and wait until it is up, plan ``state``, move
        its tensors to shared memory and allocate the staging, so no save in the loop waits for any
        of it (without it, the first ``maybe_save`` that does not save warms up without waiting,
        and a save asked for while the worker still starts waits for it). Local to this rank."""
        self._check_open()
        self._check_state(state)
        self.ckpt.warm_up(self._state_for_save(self.last_step or 0, state), wait=True, timeout=timeout)
        self._warm = True

    def save(self, step: int, state: Mapping[str, Any], *, block: bool = False) -> SaveHandle | None:
        """Save now, whatever the policy (``block=True`` also waits for the commit)."""
        self._check_open()
        self._check_step(step)
        self._collect()
        handle = self._start_save(int(step), state, "explicit")
        self.last_step = int(step)
        if block:
            self.wait()
        return handle

    def _stop_save(self, step: int, state: Mapping[str, Any], reason: str, *, pause: bool) -> SaveHandle | None:
        t0 = time.perf_counter()
        log_event(f"{reason} received: saving step {step} and stopping", op="preempt", rank=self.rank, step=step)
        try:
            self._drain()  # frees every slot, so this save is never skipped
        except CheckpointError:
            pass  # an earlier save failed (already logged); the stop save must still happen
        handle = None
        if self.last_committed_step != step:
            handle = self._start_save(step, state, reason)
        self._drain()
        self.last_step = step
        self.preempted = True
        self.preempt_reason = reason
        if pause and self.is_coordinator:
            self._clear_pauses()
        log_event(
            f"preempted ({reason}): step {step} is committed at {self.path_for(step)}", op="preempt", rank=self.rank,
            step=step, nbytes=handle.result.nbytes if handle is not None and handle.result is not None else None,
            seconds=time.perf_counter() - t0,
        )
        return handle

    def _drain(self) -> None:
        while self.ckpt.in_flight:
            self._collect(blocking=True)

    def wait(self) -> list[SaveHandle]:
        """Block until every save in flight is committed and retention has run; returns the commits."""
        self._check_open()
        done: list[SaveHandle] = []
        while self.ckpt.in_flight:
            done.extend(self._collect(blocking=True))
        return done

    def wait_snapshot(self) -> None:
        """Block until pending snapshots are taken (before mutating state outside optimizer.step/forward)."""
        self.ckpt.wait_snapshot()

    # -- restoring -------------------------------------------------------------------------------
    def _candidates(self, step: int | None) -> list[CheckpointInfo]:
        complete = [i for i in self._list() if _restorable(i.kind)]
        if step is not None:
            chosen = [i for i in complete if i.step == step]
            if not chosen:
                have = ", ".join(str(i.step) for i in complete[:20]) or "none"
                raise CheckpointNotFoundError(f"{self.root} has no complete checkpoint of step {step} (complete steps: {have})")
            return chosen[:1]
        try:
            latest = run_sync(read_latest(self._storage))
        except CheckpointError as exc:
            log.warning("ignoring the unreadable latest pointer at %s: %s", self.root, exc,
                        extra={"rank": self.rank, "step": None, "op": "restore", "bytes": None, "seconds": None})
            latest = None
        first = [i for i in complete if latest is not None and i.name == latest.name]
        return first + [i for i in complete if not first or i.name != first[0].name]

    def _list(self) -> list[CheckpointInfo]:
        root: Any = self.tiers if self.tiers is not None else self._storage
        return run_sync(list_checkpoints_async(root))

    async def _load(self, info: CheckpointInfo) -> Any:
        if self.tiers is not None:
            return await load_async(self.tiers / info.name, rank=self.rank)
        return await load_async(info.path, rank=self.rank, storage_options=self.storage_options)

    def restore(self, state: MutableMapping[str, Any], step: int | None = None, *, rng: bool | None = None,
                strict: bool = True) -> int:
        """Load the newest complete checkpoint (or that of ``step``) into ``state`` in place.

        Objects with ``load_state_dict`` get their state back, tensors are copied into,
        generators reset, plain values replaced in ``state``. RNG state is restored too (unless
        ``rng=False`` here or at construction). A checkpoint failing verification is skipped
        with a warning for the next older complete one (not when ``step`` chose it). Returns the
        restored step, or 0 when the root holds no checkpoint.
        """
        self._check_open()
        self._check_state(state)
        t0 = time.perf_counter()
        self._consume_stale_pause()
        candidates = self._candidates(step)
        loaded: Any = None
        chosen: CheckpointInfo | None = None
        for info in candidates:
            err: BaseException | None = None
            try:
                loaded = run_sync(self._load(info))
            except (IntegrityError, CheckpointNotFoundError) as exc:
                err = exc
            (any_failed,) = self._agree([int(err is not None)])
            if not any_failed:
                chosen = info
                break
            why = str(err) if err is not None else "it failed verification on another rank"
            if step is not None:
                if err is not None:
                    raise err
                raise IntegrityError(f"{info.path}: {why}")
            log.warning("skipping checkpoint %s: %s; trying the next older one", info.path, why,
                        extra={"rank": self.rank, "step": info.step, "op": "restore", "bytes": None, "seconds": None})
        if chosen is None:
            if candidates:
                raise IntegrityError(
                    f"every complete checkpoint under {self.root} failed verification ({len(candidates)} tried); "
                    "see the warnings above. Nothing was restored."
                )
            log_event(f"no checkpoint under {self.root}: starting from step 0", op="restore", rank=self.rank, step=0)
            self.last_step = 0
            self._looked_at_root = True
            return 0
        self._apply(chosen, loaded, state, strict)
        own = loaded.get(RESERVED_KEY) if isinstance(loaded, dict) else None
        if (self.rng if rng is None else rng) and isinstance(own, dict) and own.get("rng") is not None:
            set_rng_state(own["rng"])
        restored = int(chosen.step if chosen.step is not None else (own or {}).get("step", 0))
        self._warn_newer(chosen)
        self._looked_at_root = True
        self.last_step = restored
        self.last_committed_step = restored
        self._ref_time = self._committed_ref_time = self.clock()
        log_event(f"restored {chosen.path}", op="restore", rank=self.rank, step=restored, nbytes=chosen.nbytes,
                  seconds=time.perf_counter() - t0)
        return restored

    def _warn_newer(self, chosen: CheckpointInfo) -> None:
        if chosen.step is None:
            return
        newer = [i for i in self._list() if i.step is not None and i.step > chosen.step]
        if newer and self.is_coordinator:
            log.warning(
                "restored step %d while %s holds newer checkpoints (%s); saves of the same steps will replace them",
                chosen.step, self.root, ", ".join(i.name for i in newer[:5]),
                extra={"rank": self.rank, "step": chosen.step, "op": "restore", "bytes": None, "seconds": None},
            )

    def _clear_pauses(self) -> None:
        for st, watcher in zip(self._storages, self._pauses):
            try:
                clear_pause(st)
            except CheckpointError as exc:
                log_event(f"could not remove the pause request at {st.uri}: {exc}", op="pause", rank=self.rank,
                          level=logging.WARNING)
            watcher.reset()

    def _consume_stale_pause(self) -> None:
        if not self.is_coordinator:
            return
        for st in self._storages:
            rec = read_pause(st)
            if rec is not None:
                log_event(f"discarding the pause request found at start at {st.uri} ({rec}): this run resumes",
                          op="pause", rank=self.rank)
        self._clear_pauses()

    def _apply(self, info: CheckpointInfo, loaded: Any, state: MutableMapping[str, Any], strict: bool) -> None:
        """Check everything first, then change the objects in ``state``."""
        where = info.path
        if not isinstance(loaded, dict):
            raise BadInputError(f"{where} does not hold a manager state (a mapping of names), but {type(loaded).__name__}")
        missing = [k for k in state if k not in loaded]
        extra = [k for k in loaded if k not in state and k != RESERVED_KEY]
        problems: list[str] = []
        if missing:
            problems.append(f"state keys missing from the checkpoint: {missing}")
        if extra and strict:
            problems.append(f"keys in the checkpoint but not in the state: {extra} (strict=False ignores them)")
        for k, v in state.items():
            if k not in loaded:
                continue
            src = loaded[k]
            if isinstance(v, torch.nn.Module):
                problems.extend(_module_problems(k, v, src, strict))
            elif isinstance(v, torch.Tensor):
                if not isinstance(src, torch.Tensor):
                    problems.append(f"{k}: the checkpoint holds {type(src).__name__}, the state a tensor")
                elif tuple(src.shape) != tuple(v.shape):
                    problems.append(f"{k}: shape {tuple(src.shape)} in the checkpoint, {tuple(v.shape)} in the state")
            elif isinstance(v, torch.Generator):
                if not isinstance(src, torch.Tensor) or src.dtype != torch.uint8:
                    problems.append(f"{k}: the checkpoint holds no generator state ({type(src).__name__})")
        if problems:
            raise BadInputError(f"cannot restore {where} into the given state: " + "; ".join(problems))
        for k, v in list(state.items()):
            src = loaded[k]
            try:
                if isinstance(v, torch.nn.Module):
                    v.load_state_dict(src, strict=strict)
                elif isinstance(v, torch.Tensor):
                    with torch.no_grad():
                        v.copy_(src)
                elif isinstance(v, torch.Generator):
                    v.set_state(src.clone())
                elif isinstance(v, _PLAIN):
                    if isinstance(v, dict) and isinstance(src, dict):
                        v.clear()
                        v.update(src)
                    elif isinstance(v, list) and isinstance(src, (list, tuple)):
                        v[:] = list(src)
                    else:
                        state[k] = src
                else:
                    v.load_state_dict(src)
            except (RuntimeError, KeyError, ValueError, TypeError) as exc:
                raise BadInputError(f"cannot restore {where}: {k}.load_state_dict failed: {exc}") from exc

    # -- closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish: every save is durable and committed, retention done, worker stopped, handlers restored."""
        if self._closed:
            return
        try:
            while self.ckpt.in_flight:
                self._collect(blocking=True)
            self._scan.join(5)
            self._warn_if_overwriting()
        finally:
            self._closed = True
            self._checked = ([], [])  # the user's objects are not held past close
            try:
                self.ckpt.close(abort=self.ckpt.in_flight > 0)
            finally:
                self._signals.close()
                for p in self._pauses:
                    p.close()
                for st in self._storages:
                    run_sync(st.close())

    def __del__(self) -> None:  # best effort: a forgotten manager must not keep swallowing SIGTERM
        try:
            if not self._closed:
                self._signals.close()
                for p in self._pauses:
                    p.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as close_exc:  # keep the original exception the one that propagates
            log_event(f"closing after an error: {close_exc}", op="finalize", rank=self.rank, level=logging.ERROR)


def _module_problems(key: str, module: torch.nn.Module, src: Any, strict: bool) -> list[str]:
    if not isinstance(src, dict):
        return [f"{key}: the checkpoint holds {type(src).__name__}, not a module state dict"]
    target = module.state_dict()
    out: list[str] = []
    missing = [k for k in target if k not in src]
    unexpected = [k for k in src if k not in target]
    if missing and strict:
        out.append(f"{key}: parameters/buffers missing from the checkpoint: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected and strict:
        out.append(f"{key}: parameters/buffers in the checkpoint but not in the model: {unexpected[:10]}"
                   f"{' ...' if len(unexpected) > 10 else ''}")
    for k, t in target.items():
        s = src.get(k)
        if isinstance(t, torch.Tensor) and isinstance(s, torch.Tensor) and tuple(t.shape) != tuple(s.shape):
            out.append(f"{key}.{k}: shape {tuple(s.shape)} in the checkpoint, {tuple(t.shape)} in the model")
    return out
