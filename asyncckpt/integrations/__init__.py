"""Framework plug-ins: each module imports its framework lazily (only when the module itself is imported).

* :mod:`asyncckpt.integrations.lightning` — ``AsyncckptCheckpointIO`` for ``lightning`` (Trainer and Fabric) and
  ``AsyncckptModelParallelStrategy`` / ``AsyncckptFabricModelParallelStrategy`` for sharded (FSDP2) checkpoints;
* :mod:`asyncckpt.integrations.pytorch_lightning` — the same for ``pytorch_lightning`` / ``lightning_fabric``;
* :mod:`asyncckpt.integrations.transformers` — ``AsyncckptTrainerMixin`` for the Hugging Face ``Trainer``;
* :mod:`asyncckpt.integrations.torchtitan` — ``AsyncckptCheckpointManager``, chosen by torchtitan's ``config.checkpoint``;
* :mod:`asyncckpt.integrations.checkpoint_io` — the framework-free body the Lightning plug-ins share;
* :mod:`asyncckpt.integrations.sharded` — the same for the Lightning strategies' sharded checkpoints;
* :mod:`asyncckpt.integrations.fabric` — the same for Lightning Fabric's sharded strategies (``fabric.save``).

Accelerate needs no plug-in: pass what ``accelerator.prepare`` returns to
:class:`asyncckpt.CheckpointManager` (see docs/integrations.md).
"""

from __future__ import annotations

__all__: list[str] = []
