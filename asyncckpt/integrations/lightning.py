"""Lightning (``import lightning``): ``Trainer(plugins=[AsyncckptCheckpointIO()])`` or ``Fabric(plugins=[...])``.
Sharded (FSDP2 / tensor parallel) checkpoints: ``Trainer(strategy=AsyncckptModelParallelStrategy(...))``;
FSDP1: ``Trainer(strategy=AsyncckptFSDPStrategy(state_dict_type="sharded", ...))`` (CUDA only, as FSDP1 is).
Fabric's sharded checkpoints: ``Fabric(strategy=AsyncckptFabricModelParallelStrategy(parallelize_fn, ...))``;
FSDP1: ``Fabric(strategy=AsyncckptFabricFSDPStrategy(...))`` (CUDA only).

Importing this module imports ``lightning``; install it with ``pip install 'asyncckpt[lightning]'``.
"""

from __future__ import annotations

from typing import Any

from .checkpoint_io import RNG_KEY, CheckpointIOMethods
from .fabric import FabricFSDP1CheckpointMethods, FabricShardedCheckpointMethods, init_fabric_strategy
from .sharded import FSDP1CheckpointMethods, ShardedCheckpointMethods, init_strategy

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.strategies import FSDPStrategy as FabricFSDPStrategy
    from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallelStrategy
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("asyncckpt.integrations.lightning needs the 'lightning' package: "
                      "pip install 'asyncckpt[lightning]'") from exc

__all__ = ["RNG_KEY", "AsyncckptCheckpointIO", "AsyncckptFSDPStrategy", "AsyncckptFabricFSDPStrategy",
           "AsyncckptFabricModelParallelStrategy",
           "AsyncckptModelParallelStrategy"]


class AsyncckptCheckpointIO(CheckpointIOMethods, CheckpointIO):
    """Lightning ``CheckpointIO`` whose saves are written by asyncckpt's worker (see
    :class:`asyncckpt.integrations.checkpoint_io.CheckpointIOMethods` for the arguments)."""

    def __init__(self, **kwargs: Any) -> None:
        CheckpointIOMethods.__init__(self, **kwargs)


class AsyncckptModelParallelStrategy(ShardedCheckpointMethods, ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 / tensor parallel) whose sharded checkpoints asyncckpt's worker writes.

    Takes ``ModelParallelStrategy``'s arguments: ``Trainer(strategy=AsyncckptModelParallelStrategy(...))``.
    ``save_checkpoint`` returns once the worker holds its copy of the shards; the DCP checkpoint,
    Lightning's metadata and each rank's RNG state are committed together, and ``load_checkpoint``
    restores all three (see :mod:`asyncckpt.integrations.sharded`). ``rng=False``: no RNG state.
    """

    def __init__(self, *args: Any, rng: bool = True, **kwargs: Any) -> None:
        init_strategy(self, ModelParallelStrategy, args, kwargs, "save_distributed_checkpoint", bool, rng=rng)


class AsyncckptFSDPStrategy(FSDP1CheckpointMethods, FSDPStrategy):
    """``FSDPStrategy`` (FSDP1) whose sharded checkpoints (``state_dict_type="sharded"``) asyncckpt's worker writes.

    Takes ``FSDPStrategy``'s arguments. The DCP keys are the stock strategy's (``model``,
    ``optimizer_N``), plus asyncckpt's metadata entry, so either strategy resumes from what the other
    wrote. ``state_dict_type="full"`` is left to the stock strategy. FSDP1 needs CUDA (torch refuses
    it on CPU), so this class is tested only where a GPU is present
    (``tests/integrations/test_lightning_sharded.py``, skipped without CUDA).
    """

    def __init__(self, *args: Any, rng: bool = True, **kwargs: Any) -> None:
        init_strategy(self, FSDPStrategy, args, kwargs, "state_dict_type", lambda v: v == "sharded", rng=rng)


class AsyncckptFabricModelParallelStrategy(FabricShardedCheckpointMethods, FabricModelParallelStrategy):
    """Fabric's ``ModelParallelStrategy`` (FSDP2 / tensor parallel) whose ``fabric.save`` asyncckpt's worker writes.

    Takes the strategy's arguments: ``Fabric(strategy=AsyncckptFabricModelParallelStrategy(parallelize_fn, ...))``.
    ``fabric.save(path, state)`` returns once the worker holds its copy of the shards; the DCP checkpoint
    (Fabric's keys), the user's metadata (also as ``meta.pt``) and each rank's RNG state are committed
    together at a later optimizer step or at exit, and ``fabric.load(path, state)`` restores all three
    (see :mod:`asyncckpt.integrations.fabric`). ``rng=False``: no RNG state.
    """

    def __init__(self, *args: Any, rng: bool = True, **kwargs: Any) -> None:
        init_fabric_strategy(self, FabricModelParallelStrategy, args, kwargs, "save_distributed_checkpoint", bool,
                             rng=rng)


class AsyncckptFabricFSDPStrategy(FabricFSDP1CheckpointMethods, FabricFSDPStrategy):
    """Fabric's ``FSDPStrategy`` (FSDP1) whose sharded ``fabric.save`` (``state_dict_type="sharded"``, its default)
    asyncckpt's worker writes; ``"full"`` is left to the stock strategy. Takes ``FSDPStrategy``'s arguments.
    FSDP1 needs CUDA, so this class is tested only where a GPU is present (skipped on CPU).
    """

    def __init__(self, *args: Any, rng: bool = True, **kwargs: Any) -> None:
        init_fabric_strategy(self, FabricFSDPStrategy, args, kwargs, "state_dict_type", lambda v: v == "sharded",
                             rng=rng)
