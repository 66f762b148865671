"""The body of Lightning's ``CheckpointIO`` over :class:`~asyncckpt.TorchAsyncCheckpoint`, framework-free.

``save_checkpoint`` is an async ``torch.save``: it returns once the worker holds its snapshot
of the state (a memory copy), and the worker writes the file to a temporary name, fsyncs it and
renames it over ``path``. A file under a checkpoint's name is therefore always complete (an
older ``last.ckpt`` stays readable until the new one replaces it), nothing needs a collective
call (saving from rank 0 alone is fine), and saves still pending at normal interpreter exit are
finished. ``load_checkpoint`` and ``remove_checkpoint`` first wait for a pending save of that
path; ``teardown`` waits for all of them.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from ..errors import BadInputError, CheckpointNotFoundError
from ..snapshot import SnapshotMode
from ..torch_save import TorchAsyncCheckpoint

__all__ = ["RNG_KEY", "CheckpointIOMethods", "capture_rng", "restore_rng", "world_size"]

log = logging.getLogger("asyncckpt")

#: Key under which the plug-in stores the process's RNG state in a Lightning checkpoint.
RNG_KEY = "asyncckpt_rng_state"


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG state in types ``torch.load(weights_only=True)`` accepts."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(kind), [int(x) for x in key], int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned."""
    try:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        kind, key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"the checkpoint's {RNG_KEY!r} entry is malformed ({type(exc).__name__}: {exc}); "
                            "load it with rng=False") from exc
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def world_size() -> int:
    """The default process group's size, 1 without torch.distributed."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class CheckpointIOMethods:
    """``save_checkpoint`` / ``load_checkpoint`` / ``remove_checkpoint`` / ``teardown`` through asyncckpt.

    Args:
        rng: also save the process's RNG state in the checkpoint (under :data:`RNG_KEY`) and
            restore it when a checkpoint is loaded, so a resumed run draws what the
            uninterrupted one would have (Lightning itself saves no RNG state). With several
            ranks only rank 0 saves, so the state is not restored there (each rank keeps its own).
        snapshot: ``"blocking"`` (default) returns from ``save_checkpoint`` once the snapshot is
            taken; see :class:`~asyncckpt.TorchAsyncCheckpoint` for ``"auto"``/``"lazy"``.
        max_in_flight: saves being written at most; one more waits for a slot.
        optimizers: optimizer(s) to attach (their ``step`` waits for the snapshot), for ``snapshot="auto"``.
    """

    def __init__(self, *, rng: bool = True, snapshot: SnapshotMode = "blocking", max_in_flight: int = 2,
                 optimizers: Any = None) -> None:
        self.rng = rng
        self.snapshot = snapshot
        self.max_in_flight = max_in_flight
        self.optimizers = optimizers
        self.saver: TorchAsyncCheckpoint | None = None
        self.pending: dict[str, int] = {}  # absolute path -> call index of its newest save

    # -- helpers -------------------------------------------------------------------------------
    def get_saver(self) -> TorchAsyncCheckpoint:
        """The async ``torch.save`` behind the plug-in (started at the first save)."""
        if self.saver is None:
            self.saver = TorchAsyncCheckpoint(snapshot=self.snapshot, max_in_flight=self.max_in_flight,
                                              optimizers=self.optimizers)
        return self.saver

    def collect(self, blocking: bool = False) -> None:
        """Finish saves that are written (all of them with ``blocking``); a failed save raises here."""
        if self.saver is None:
            return
        done = set(self.saver.finalize_async_save(blocking=blocking, no_dist=True))
        if blocking:
            self.pending.clear()
        else:
            self.pending = {p: i for p, i in self.pending.items() if i not in done}

    def wait_for(self, path: str) -> None:
        """Block until a pending save of ``path`` (if any) is on disk."""
        if os.path.abspath(path) in self.pending:
            self.collect(blocking=True)

    # -- CheckpointIO --------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Start writing ``checkpoint`` to ``path`` (``torch.save`` format); returns once it is snapshotted."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r})")
        target = os.path.abspath(os.fspath(path))
        if "://" in os.fspath(path):
            raise BadInputError(f"{type(self).__name__} writes local paths only, got {os.fspath(path)}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self.collect()
        self.wait_for(target)  # two saves of one name in flight could land out of order
        if self.rng:
            checkpoint = {**checkpoint, RNG_KEY: capture_rng()}
        idx = self.get_saver().async_save(checkpoint, target)
        if idx is not None:
            self.pending[target] = idx

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """``torch.load`` of ``path`` once any pending save of it is written; restores the RNG state it holds."""
        target = os.fspath(path)
        self.wait_for(target)
        if os.path.islink(target) and not os.path.exists(target):
            raise CheckpointNotFoundError(
                f"checkpoint {target} is a link to {os.readlink(target)}, which was never written (the process "
                "stopped while writing it, e.g. with save_last='link'); resume from the newest complete file "
                f"in {os.path.dirname(target)} instead")
        if not os.path.exists(target):
            raise CheckpointNotFoundError(f"checkpoint file not found: {target}")
        if map_location is None:
            map_location = "cpu"
        ckpt = torch.load(target, map_location=map_location, weights_only=True if weights_only is None else weights_only)
        rng = ckpt.pop(RNG_KEY, None) if isinstance(ckpt, dict) else None
        if rng is not None and self.rng:
            if world_size() == 1:
                restore_rng(rng)
            else:  # the state is rank 0's: putting it on every rank would make their streams equal
                log.info("not restoring the RNG state saved in %s: it is rank 0's and %d ranks run", target, world_size())
        return ckpt

    def remove_checkpoint(self, path: Any) -> None:
        """Remove ``path`` (a file or a directory) once any pending save of it is written."""
        target = os.fspath(path)
        self.wait_for(target)
        if os.path.islink(target) or os.path.isfile(target):
            os.remove(target)
        elif os.path.isdir(target):
            shutil.rmtree(target)
        log.debug("removed checkpoint %s", target)

    def teardown(self) -> None:
        """Wait until every pending save is written, then stop the worker (a later save starts a new one)."""
        if self.saver is None:
            return
        try:
            self.collect(blocking=True)
        finally:
            self.saver.close()
            self.saver = None
