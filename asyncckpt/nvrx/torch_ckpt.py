"""``nvidia_resiliency_ext.checkpointing.async_ckpt.torch_ckpt`` on asyncckpt's engine.

:class:`TorchAsyncCheckpoint` is asyncckpt's async ``torch.save`` (paths and file objects, every
``torch.save`` argument, values ``torch.save`` pickles), with NVRx's defaults: the worker runs at
nice 10 (NVRx's ``cpu_priority``), ``async_save`` returns once the snapshot is taken, and a
failed save raises ``CheckpointException`` at ``finalize_async_save``.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from ..torch_save import TorchAsyncCheckpoint as _TorchAsyncCheckpoint

__all__ = ["TorchAsyncCheckpoint"]


class TorchAsyncCheckpoint(_TorchAsyncCheckpoint):
    """NVRx's ``TorchAsyncCheckpoint(persistent_queue=True)``: ``async_save(state_dict, *args,
    **kwargs)`` as ``torch.save``, ``finalize_async_save(blocking=False, no_dist=True,
    terminate=False)``, ``close(abort=False)``, the ``save`` attribute. asyncckpt's options
    (``snapshot``, ``optimizers``, ``max_in_flight``, ...) are keywords."""

    def __init__(self, persistent_queue: bool = True, **kwargs: Any) -> None:
        options = dict(kwargs.pop("worker_options", None) or {})
        options.setdefault("cpu_priority", 10)
        super().__init__(persistent_queue, worker_options=options, **kwargs)
        TorchAsyncCheckpoint.async_fn = self.save

    def finalize_async_save(self, blocking: bool = False, no_dist: bool = True, terminate: bool = False) -> list[int]:
        """Finalize finished saves (all with ``blocking``); a failure raises ``CheckpointException``."""
        try:
            return super().finalize_async_save(blocking, no_dist, terminate)
        except CheckpointError as exc:
            from ..dcp._errors import as_checkpoint_exception

            raise as_checkpoint_exception(exc, "an async torch.save", collective=False) from exc
