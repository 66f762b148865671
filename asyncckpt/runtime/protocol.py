"""The two seams of the worker runtime: sinks (what a save writes) and control operations.

A save request carries a :class:`Sink`; the runtime takes the snapshot into a staging slot,
acks it, calls ``sink.write`` and returns the slot to the pool (or abandons it after a timeout),
so every save format gets the same slot lifecycle and timeouts. Control operations (commit,
``latest``, drains, retention, cleanup) run in order on the worker's control lane, beside the
data stages, so they never wait behind the next large write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..staging import CopyProgress, SnapshotSpec, Staged
    from .context import WorkerContext

__all__ = ["CallPayload", "ControlOp", "ControlPayload", "CopyAwareSink", "SavePayload", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """Writes one snapshot somewhere (a native checkpoint, a ``torch.save`` file, DCP files).

    Instances travel to the worker pickled, so a sink is a small importable class whose
    per-save details live in the ``job`` it is given.
    """

    async def write(self, ctx: WorkerContext, job: Any, staged: Staged) -> Any:
        """Write ``staged`` (read-only; the runtime frees it afterwards); return a picklable result."""


@runtime_checkable
class CopyAwareSink(Sink, Protocol):
    """A sink whose write may start while its snapshot is still being copied.

    When no other write is running, the worker calls this instead of ``write`` as soon as the
    slot is held. It must read the slot only up to what ``await progress.wait(end)`` released, and
    leave the CPUs to the copy until ``progress.finished``: the trainer's snapshot wait must not
    grow. The runtime awaits its result, times it out and frees the slot exactly as for ``write``.
    """

    async def write_while_copying(self, ctx: WorkerContext, job: Any, staged: Staged, progress: CopyProgress) -> Any:
        """``write``, started before the copy ends."""


@runtime_checkable
class ControlOp(Protocol):
    """One step of the control lane. ``prior`` is the result of the step before it in a chain.

    ``milestone``, when set, is reported to the trainer once the step succeeded (e.g.
    ``"committed"``), so a chain can make progress visible before it ends.

    A step may also define ``sessions(ctx) -> list[Storage]``, the storage sessions it uses; when
    all of them have ``Capabilities.any_loop`` the worker runs it on its control thread
    (:meth:`WorkerContext.run_control`).
    """

    milestone: str | None

    async def run(self, ctx: WorkerContext, prior: Any) -> Any: ...


@dataclass
class SavePayload:
    """A SAVE frame's payload: snapshot ``snapshot``, ack, then ``sink.write(ctx, job, staged)``.

    ``then`` runs on the control lane after a successful write, in order, before the request is
    reported done (a single writer commits this way without waiting for the trainer);
    ``on_failure`` runs there when the write or ``then`` fails (cleanup of what was left).
    """

    sink: Sink
    snapshot: SnapshotSpec
    job: Any
    timeout_s: float | None = None
    then: list[ControlOp] = field(default_factory=list)
    on_failure: list[ControlOp] = field(default_factory=list)
    guarded: bool = False  # the trainer answers the ack with CONFIRM or CANCEL; ``then`` waits for it


@dataclass
class ControlPayload:
    """A CONTROL frame's payload: ``ops`` in order on the control lane."""

    ops: list[ControlOp]
    prior: Any = None
    on_failure: list[ControlOp] = field(default_factory=list)


@dataclass
class CallPayload:
    """A CALL frame's payload: an :class:`~asyncckpt.AsyncRequest` as the worker runs it.

    ``preload_style`` ``"nvrx"``: ``args[1] = preload_fn()``, then ``async_fn(*args, **kwargs)``
    (nvidia-resiliency-ext's contract). ``"staged"`` (asyncckpt 0.1, deprecated):
    ``async_fn(preload_fn(*args, **kwargs))``.
    """

    async_fn: Callable[..., Any] | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    preload_fn: Callable[..., Any] | None
    preload_style: Literal["nvrx", "staged"] = "nvrx"
