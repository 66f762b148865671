"""PyTorch Lightning (``pytorch_lightning``, ``lightning_fabric``): ``Trainer(plugins=[AsyncckptCheckpointIO()])``.
Sharded (FSDP2 / tensor parallel) checkpoints: ``Trainer(strategy=AsyncckptModelParallelStrategy(...))``;
FSDP1: ``Trainer(strategy=AsyncckptFSDPStrategy(state_dict_type="sharded", ...))`` (CUDA only, as FSDP1 is).
Fabric (``lightning_fabric``): ``Fabric(strategy=AsyncckptFabricModelParallelStrategy(parallelize_fn, ...))``;
FSDP1: ``Fabric(strategy=AsyncckptFabricFSDPStrategy(...))`` (CUDA only).

Importing this module imports ``lightning_fabric`` and ``pytorch_lightning``; install them with
``pip install "asyncckpt[pytorch-lightning]"``.
"""

from __future__ import annotations

from typing import Any

from .checkpoint_io import RNG_KEY, CheckpointIOMethods
from .fabric import FabricFSDP1CheckpointMethods, FabricShardedCheckpointMethods, init_fabric_strategy
from .sharded import FSDP1CheckpointMethods, ShardedCheckpointMethods, init_strategy

try:
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning_fabric.strategies import FSDPStrategy as FabricFSDPStrategy
    from lightning_fabric.strategies import ModelParallelStrategy as FabricModelParallelStrategy
    from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("asyncckpt.integrations.pytorch_lightning needs the 'pytorch-lightning' package: "
                      "pip install 'asyncckpt[pytorch-lightning]'") from exc

__all__ = ["RNG_KEY", "AsyncckptCheckpointIO", "AsyncckptFSDPStrategy", "AsyncckptFabricFSDPStrategy",
           "AsyncckptFabricModelParallelStrategy",
           "AsyncckptModelParallelStrategy"]


class AsyncckptCheckpointIO(CheckpointIOMethods, CheckpointIO):
    """Lightning ``CheckpointIO`` whose saves are written by asyncckpt's worker (see
    :class:`asyncckpt.integrations.checkpoint_io.CheckpointIOMethods` for the arguments)."""

    def __init__(self, **kwargs: Any) -> None:
        CheckpointIOMethods.__init__(self, **kwargs)


class AsyncckptModelParallelStrategy(ShardedCheckpointMethods, ModelParallelStrategy):
    """:class:`asyncckpt.integrations.lightning.AsyncckptModelParallelStrategy` for ``pytorch_lightning``."""

    def __init__(self, *args: Any, rng: bool = True, **kwargs: Any) -> None:
        init_strategy(self, ModelParallelStrategy, args, kwargs, "save_distributed_checkpoint", bool, rng=rng)


class AsyncckptFSDPStrategy(FSDP1CheckpointMethods, FSDPStrategy):
    """:class:`asyncckpt.integrations.lightning.AsyncckptFSDPStrategy` for ``pytorch_lightning`` (CUDA only)."""

    def __init__(self, *args: Any, rng: bool = True, **kwargs: Any) -> None:
        init_strategy(self, FSDPStrategy, args, kwargs, "state_dict_type", lambda v: v == "sharded", rng=rng)


class AsyncckptFabricModelParallelStrategy(FabricShardedCheckpointMethods, FabricModelParallelStrategy):
    """:class:`asyncckpt.integrations.lightning.AsyncckptFabricModelParallelStrategy` for ``lightning_fabric``."""

    def __init__(self, *args: Any, rng: bool = True, **kwargs: Any) -> None:
        init_fabric_strategy(self, FabricModelParallelStrategy, args, kwargs, "save_distributed_checkpoint", bool,
                             rng=rng)


class AsyncckptFabricFSDPStrategy(FabricFSDP1CheckpointMethods, FabricFSDPStrategy):
    """:class:`asyncckpt.integrations.lightning.AsyncckptFabricFSDPStrategy` for ``lightning_fabric`` (CUDA only)."""

    def __init__(self, *args: Any, rng: bool = True, **kwargs: Any) -> None:
        init_fabric_strategy(self, FabricFSDPStrategy, args, kwargs, "state_dict_type", lambda v: v == "sharded",
                             rng=rng)
