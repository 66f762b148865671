"""Hugging Face ``Trainer``: ``class MyTrainer(AsyncckptTrainerMixin, Trainer)`` (TRL's trainers too).

Each checkpoint's model weights (``pytorch_model.bin``), optimizer, scheduler, scaler and RNG
files are written by asyncckpt's worker (async ``torch.save``, in the files and formats the
stock Trainer writes and reads) into a hidden staging directory ``.checkpoint-N.partial``.
Once every file is written, the staging directory is renamed to ``checkpoint-N`` with its
``trainer_state.json``, and only then does ``save_total_limit`` pruning run. So resume discovery
(``train(resume_from_checkpoint=True)``), pruning and ``trainer_state.json`` only ever see
complete checkpoints, and resuming goes through the Trainer's own loaders.

Importing this module imports ``transformers``; install it with ``pip install 'asyncckpt[transformers]'``.
Several processes (DDP, FSDP, DeepSpeed) or XLA fall back to the stock synchronous save, with a warning.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from ..snapshot import SnapshotMode
from ..torch_save import TorchAsyncCheckpoint

try:
    from transformers import TrainerCallback
    from transformers.trainer import (
        OPTIMIZER_NAME,
        SCALER_NAME,
        SCHEDULER_NAME,
        TRAINER_STATE_NAME,
        TRAINING_ARGS_NAME,
    )
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from transformers.utils import WEIGHTS_NAME
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("asyncckpt.integrations.transformers needs the 'transformers' package: "
                      "pip install 'asyncckpt[transformers]'") from exc

# transformers 5 prunes with this function; 4.x with a Trainer method (then None)
rotate_checkpoints: Any = getattr(importlib.import_module("transformers.trainer_utils"), "rotate_checkpoints", None)

__all__ = ["FILES_PER_CHECKPOINT", "PARTIAL_SUFFIX", "AsyncckptTrainerMixin"]

log = logging.getLogger("asyncckpt")

#: Suffix of a checkpoint directory still being written (hidden: it starts with a dot too).
PARTIAL_SUFFIX = ".partial"
#: Async ``torch.save`` calls one checkpoint makes at most: weights, optimizer, scheduler, scaler,
#: RNG state and the marker whose finalize commits the directory.
FILES_PER_CHECKPOINT = 6


class AsyncckptFinishCallback(TrainerCallback):
    """Commits written checkpoints after each step; waits for all of them when training ends."""

    def __init__(self, trainer: AsyncckptTrainerMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.asyncckpt_finish(blocking=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.asyncckpt_finish(blocking=True)


class AsyncckptTrainerMixin:
    """Makes a ``transformers.Trainer`` (subclass) save its checkpoints through asyncckpt.

    Put it first: ``class MyTrainer(AsyncckptTrainerMixin, Trainer)``. Resuming is the
    Trainer's own (``trainer.train(resume_from_checkpoint=True)``). ``asyncckpt_finish(blocking=True)``
    waits for every pending checkpoint (``train()`` does it before returning).
    ``asyncckpt_max_in_flight`` counts checkpoints (each is up to :data:`FILES_PER_CHECKPOINT`
    files, written by as many saves; 2 with ``save_only_model``): one more waits until the oldest
    is written. The worker's staging memory holds up to that many checkpoints' tensors.
    """

    asyncckpt_max_in_flight: int = 2
    asyncckpt_snapshot: SnapshotMode = "auto"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asyncckpt_saver: TorchAsyncCheckpoint | None = None
        self.asyncckpt_warned = False
        self.add_callback(AsyncckptFinishCallback(self))  # type: ignore[attr-defined]

    # -- the saver -------------------------------------------------------------------------------
    def asyncckpt_get_saver(self) -> TorchAsyncCheckpoint:
        """The async ``torch.save`` writing the checkpoints (its optimizer attached once it exists)."""
        if self.asyncckpt_saver is None:
            # A limit in saves of single files would make a checkpoint's third file wait for its first.
            files = 2 if getattr(getattr(self, "args", None), "save_only_model", False) else FILES_PER_CHECKPOINT
            self.asyncckpt_saver = TorchAsyncCheckpoint(max_in_flight=files * self.asyncckpt_max_in_flight,
                                                        snapshot=self.asyncckpt_snapshot)
        opt = getattr(self, "optimizer", None)
        if opt is not None:
            self.asyncckpt_saver.attach(opt)  # step() waits for the snapshot, so saves return at once
        return self.asyncckpt_saver

    def asyncckpt_finish(self, blocking: bool = True) -> None:
        """Commit the checkpoints whose files are written (with ``blocking``: wait for all of them)."""
        if self.asyncckpt_saver is not None:
            self.asyncckpt_saver.finalize_async_save(blocking=blocking, no_dist=True)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.asyncckpt_finish(blocking=True)

    def asyncckpt_supported(self) -> bool:
        t: Any = self
        return (t.args.world_size <= 1 and not t.is_deepspeed_enabled and not t.is_fsdp_enabled
                and not getattr(t, "is_fsdp_xla_v1_enabled", False) and t.args.should_save
                and t.args.device.type != "xla")

    # -- saving ----------------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        t: Any = self
        if not self.asyncckpt_supported():
            if not self.asyncckpt_warned:
                self.asyncckpt_warned = True
                log.warning("AsyncckptTrainerMixin saves through asyncckpt in a single process only; this run "
                            "(world size %d, DeepSpeed/FSDP/XLA) uses the Trainer's synchronous save", t.args.world_size)
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
            return
        self.asyncckpt_finish(blocking=False)
        saver = self.asyncckpt_get_saver()
        name = f"{PREFIX_CHECKPOINT_DIR}-{t.state.global_step}"
        run_dir = t._get_output_dir(trial=trial)
        final = os.path.join(run_dir, name)
        staging = os.path.join(run_dir, f".{name}{PARTIAL_SUFFIX}")
        if os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run that died while writing it
        os.makedirs(staging)
        if t.hp_search_backend is None and trial is None:
            t.store_flos()

        # The files the stock Trainer writes, under the names its loaders look for.
        saver.async_save(t.model.state_dict(), os.path.join(staging, WEIGHTS_NAME))
        inner = t.accelerator.unwrap_model(t.model, keep_torch_compile=False)
        if hasattr(inner, "config") and hasattr(inner.config, "save_pretrained"):
            inner.config.save_pretrained(staging)
        processor = getattr(t, "processing_class", None) or getattr(t, "tokenizer", None)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(staging)
        torch.save(t.args, os.path.join(staging, TRAINING_ARGS_NAME))
        if not getattr(t.args, "save_only_model", False):
            saver.async_save(t.optimizer.state_dict(), os.path.join(staging, OPTIMIZER_NAME))
            saver.async_save(t.lr_scheduler.state_dict(), os.path.join(staging, SCHEDULER_NAME))
            scaler = getattr(t.accelerator, "scaler", None)
            if scaler is not None:
                saver.async_save(scaler.state_dict(), os.path.join(staging, SCALER_NAME))
            rng: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                                   "cpu": torch.random.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.random.get_rng_state()
            saver.async_save(rng, os.path.join(staging, "rng_state.pth"))

        for cb in [c for c in [*t.callback_handler.callbacks, t.control] if isinstance(c, ExportableState)]:
            cb_name = type(cb).__name__
            if isinstance(t.state.stateful_callbacks.get(cb_name), list):
                t.state.stateful_callbacks[cb_name].append(cb.state())
            else:
                t.state.stateful_callbacks[cb_name] = cb.state()
        # Inside the staging directory: it becomes visible with the rest, at the commit.
        t.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
        best_step = getattr(t.state, "best_global_step", None)
        if best_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if os.path.exists(best) or best == final:
                t.state.best_model_checkpoint = best
        limit, best_ckpt = t.args.save_total_limit, t.state.best_model_checkpoint

        def commit() -> None:
            old = os.path.join(run_dir, f".{name}.replaced")
            if os.path.isdir(final):
                os.replace(final, old)  # a checkpoint of the same step (a re-run): replaced whole
            os.replace(staging, final)
            fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if os.path.isdir(old):
                shutil.rmtree(old)
            log.info("checkpoint %s committed", final)
            if rotate_checkpoints is not None:
                rotate_checkpoints(output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=best_ckpt, use_mtime=True)
            else:  # pragma: no cover - transformers 4.x
                t._rotate_checkpoints(use_mtime=True, output_dir=run_dir)

        # A marker save whose finalize commits: saves finalize in order, so every file above is written.
        saver.async_save({"checkpoint": name}, os.path.join(staging, ".asyncckpt-written"), finalize_fns=[commit])
