"""Lightning (``import lightning``): ``Trainer(plugins=[AsyncckptCheckpointIO()])`` or ``Fabric(plugins=[...])``.

Importing this module imports ``lightning``; install it with ``pip install 'asyncckpt[lightning]'``.
"""

from __future__ import annotations

from typing import Any

from .checkpoint_io import RNG_KEY, CheckpointIOMethods

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("asyncckpt.integrations.lightning needs the 'lightning' package: "
                      "pip install 'asyncckpt[lightning]'") from exc

__all__ = ["RNG_KEY", "AsyncckptCheckpointIO"]


class AsyncckptCheckpointIO(CheckpointIOMethods, CheckpointIO):
    """Lightning ``CheckpointIO`` whose saves are written by asyncckpt's worker (see
    :class:`asyncckpt.integrations.checkpoint_io.CheckpointIOMethods` for the arguments)."""

    def __init__(self, **kwargs: Any) -> None:
        CheckpointIOMethods.__init__(self, **kwargs)
