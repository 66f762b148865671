"""DCP's failure contract: a failed save raises ``CheckpointException`` on every rank.

:class:`DcpCheckpointException` is both torch's ``CheckpointException`` (what code written for
DCP catches) and an asyncckpt :class:`~asyncckpt.errors.CheckpointError`. Its ``failures`` map
each failing rank to ``(exception, traceback summary)`` exactly as DCP's do; when the ranks
agree on a failure through the completion all-reduce, one ``all_gather_object`` (on the failure
path only) tells every rank which ranks failed and why.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError, RemoteRankError

__all__ = ["DcpCheckpointException", "as_checkpoint_exception", "gather_failures", "wrap_failure"]


class DcpCheckpointException(CheckpointException, CheckpointError):
    """A failed DCP save or load through asyncckpt: DCP's ``CheckpointException`` (``failures``:
    rank -> (exception, traceback summary)) and an asyncckpt ``CheckpointError`` at once.

    Raised on every rank: the failing rank's own error is in ``failures`` under its rank, on
    every rank alike.
    """

    def __init__(self, msg: str, failures: dict[int, Any]) -> None:
        CheckpointException.__init__(self, msg, failures)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return f"{self.message}\n{CheckpointException.__str__(self)}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.failures))


def wrap_failure(exc: BaseException) -> tuple[BaseException, traceback.StackSummary]:
    """DCP's (exception, traceback summary) pair, picklable (code objects dropped)."""
    summary = traceback.extract_tb(exc.__traceback__)
    for frame in summary:
        if hasattr(frame, "_code"):
            object.__setattr__(frame, "_code", None)
    return (exc, summary)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception that cannot travel is described instead
        new = RuntimeError(f"{type(exc).__name__}: {exc}")
        new.__traceback__ = exc.__traceback__
        return new


def gather_failures(local: BaseException | None, group: Any = None) -> dict[int, Any]:
    """Collective (every rank of ``group`` calls it): every rank's own failure, by rank."""
    mine = None if local is None else wrap_failure(_portable(local))
    if not (dist.is_available() and dist.is_initialized()):
        return {} if mine is None else {0: mine}
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return {r: f for r, f in enumerate(out) if f is not None}


def as_checkpoint_exception(exc: BaseException, what: str, *, group: Any = None, collective: bool = False,
                            rank: int | None = None) -> DcpCheckpointException:
    """Turn a failure of ``what`` into DCP's exception.

    ``collective``: every rank of ``group`` is handling the same failure right now (the
    completion all-reduce told them all), so the ranks exchange their errors once and each
    raises with every failing rank's error. Otherwise the failure is this rank's alone.
    """
    if isinstance(exc, DcpCheckpointException):
        return exc
    own = None if isinstance(exc, RemoteRankError) else exc
    if collective and dist.is_available() and dist.is_initialized():
        failures = gather_failures(own, group)
    else:
        r = rank if rank is not None else (dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0)
        failures = {r: wrap_failure(exc)}
    if not failures:  # every rank reports another's failure: keep what this rank knows
        r = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
        failures = {r: wrap_failure(exc)}
    first = failures[min(failures)][0]
    text = str(first).splitlines()[0] if str(first) else type(first).__name__
    err = DcpCheckpointException(
        f"{what} failed on rank(s) {sorted(failures)}: {type(first).__name__}: {text}. The checkpoint is not "
        "committed; earlier checkpoints are intact.", failures,
    )
    err.__cause__ = exc
    return err
