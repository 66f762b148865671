"""PyTorch Lightning (``pytorch_lightning``, ``lightning_fabric``): ``Trainer(plugins=[AsyncckptCheckpointIO()])``.

Importing this module imports ``lightning_fabric``; install it with ``pip install "asyncckpt[pytorch-lightning]"``.
"""

from __future__ import annotations

from typing import Any

from .checkpoint_io import RNG_KEY, CheckpointIOMethods

try:
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("asyncckpt.integrations.pytorch_lightning needs the 'pytorch-lightning' package: "
                      "pip install 'asyncckpt[pytorch-lightning]'") from exc

__all__ = ["RNG_KEY", "AsyncckptCheckpointIO"]


class AsyncckptCheckpointIO(CheckpointIOMethods, CheckpointIO):
    """Lightning ``CheckpointIO`` whose saves are written by asyncckpt's worker (see
    :class:`asyncckpt.integrations.checkpoint_io.CheckpointIOMethods` for the arguments)."""

    def __init__(self, **kwargs: Any) -> None:
        CheckpointIOMethods.__init__(self, **kwargs)
