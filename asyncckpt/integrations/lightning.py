"""Lightning (``import lightning``): ``Trainer(plugins=[AsyncckptCheckpointIO()])`` or ``Fabric(plugins=[...])``.
Sharded (FSDP2 / tensor parallel) checkpoints: ``Trainer(strategy=AsyncckptModelParallelStrategy(...))``.

Importing this module imports ``lightning``; install it with ``pip install 'asyncckpt[lightning]'``.
"""

from __future__ import annotations

import inspect
from typing import Any

from .checkpoint_io import RNG_KEY, CheckpointIOMethods
from .sharded import ShardedCheckpointMethods

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.strategies import ModelParallelStrategy
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("asyncckpt.integrations.lightning needs the 'lightning' package: "
                      "pip install 'asyncckpt[lightning]'") from exc

__all__ = ["RNG_KEY", "AsyncckptCheckpointIO", "AsyncckptModelParallelStrategy"]


class AsyncckptCheckpointIO(CheckpointIOMethods, CheckpointIO):
    """Lightning ``CheckpointIO`` whose saves are written by asyncckpt's worker (see
    :class:`asyncckpt.integrations.checkpoint_io.CheckpointIOMethods` for the arguments)."""

    def __init__(self, **kwargs: Any) -> None:
        CheckpointIOMethods.__init__(self, **kwargs)


class AsyncckptModelParallelStrategy(ShardedCheckpointMethods, ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 / tensor parallel) whose sharded checkpoints asyncckpt's worker writes.

    Takes ``ModelParallelStrategy``'s arguments: ``Trainer(strategy=AsyncckptModelParallelStrategy(...))``.
    ``save_checkpoint`` returns once the worker holds its copy of the shards; the DCP checkpoint and
    Lightning's metadata are committed together (see :mod:`asyncckpt.integrations.sharded`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ModelParallelStrategy.__init__(self, *args, **kwargs)
        bound = inspect.signature(ModelParallelStrategy.__init__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        ShardedCheckpointMethods.__init__(self, sharded=bool(bound.arguments["save_distributed_checkpoint"]))
