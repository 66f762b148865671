"""torchtitan: one config line, ``checkpoint = AsyncckptCheckpointManager.Config(enable=True, ...)``.

torchtitan (0.3) builds its checkpoint manager from ``config.checkpoint`` (a
``BaseCheckpointManager.Config`` whose ``build()`` constructs the manager). This manager is
torchtitan's own DCP ``CheckpointManager`` - same folder layout (``step-N``), interval, retention
(``keep_latest_k``), resume discovery and stock ``dcp.load`` - with the save replaced: every
interval save goes through :func:`asyncckpt.dcp.async_save` to asyncckpt's persistent worker.

* ``save()`` returns after planning (milliseconds); with ``snapshot="lazy"`` (default) the worker
  copies the state while the next step's forward/backward run, and torchtitan's own
  ``maybe_wait_for_staging()`` hook (called right before ``optimizers.step()``) waits for that
  copy; a tensor changed before its copy raises ``TornSnapshotError`` instead of saving it.
* The worker writes DCP files with CRC32C records and commits; ``.metadata`` appears only at the
  commit, so torchtitan's resume discovery never picks a half-written step.
* ``load()`` is torchtitan's, reading with ``dcp.load`` through
  :class:`~asyncckpt.dcp.AsyncStorageReader` (checksums verified; ``verify=False``: DCP's stock
  reader).
* The process's RNG state (Python, NumPy, torch) is saved per rank unless ``save_rng=False``.
* ``keep_latest_k``'s purge (torchtitan's selection, on its purge thread) deletes with
  :func:`asyncckpt.delete`: only what a folder's own records prove is a checkpoint goes, and never
  the folder of a save still being written.

Importing this module imports torchtitan; see docs/integrations.md for installing it beside an
existing torch (``pip install --no-deps torchtitan`` plus the few packages it imports).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch.distributed as dist

from ..errors import BadInputError, CheckpointError
from .checkpoint_io import capture_rng, restore_rng

try:
    from torchtitan.components.checkpointer import MODEL, AsyncMode, CheckpointManager
    from torchtitan.components.checkpointer.base import purge_thread as purge_loop
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "asyncckpt.integrations.torchtitan needs torchtitan (>= 0.3) importable: pip install --no-deps "
        "torchtitan tyro spmd_types==0.2.3 (see docs/integrations.md)"
    ) from exc

__all__ = ["RNG_STATE_KEY", "AsyncckptCheckpointManager", "RngState"]

log = logging.getLogger("asyncckpt")

#: Key of the RNG state in the checkpoint (one entry per rank beneath it).
RNG_STATE_KEY = "asyncckpt_rng"


class RngState:
    """A DCP ``Stateful`` holding this rank's RNG state under ``rank{R}`` (restored on load)."""

    def _key(self) -> str:
        return f"rank{dist.get_rank() if dist.is_available() and dist.is_initialized() else 0}"

    def state_dict(self) -> dict[str, Any]:
        return {self._key(): capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng(state_dict[self._key()])


class AsyncckptCheckpointManager(CheckpointManager):
    """torchtitan's DCP checkpoint manager, saving through asyncckpt's worker.

    Select it with ``config.checkpoint = AsyncckptCheckpointManager.Config(enable=True, ...)``;
    every field of torchtitan's ``CheckpointManager.Config`` keeps its meaning except
    ``async_mode``, which must stay ``"disabled"`` (asyncckpt is the asynchronous mode).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        snapshot: Literal["lazy", "blocking"] = "lazy"
        """lazy: save() returns before the copy, maybe_wait_for_staging() waits for it; blocking:
        save() returns once the worker holds its copy."""

        verify: bool = True
        """Load through asyncckpt's reader, checking every item's CRC32C (False: DCP's stock reader)."""

        save_rng: bool = True
        """Save and restore each rank's Python, NumPy and torch RNG state."""

        def __post_init__(self) -> None:
            CheckpointManager.Config.__post_init__(self)
            if self.async_mode != "disabled":
                raise ValueError(
                    f"checkpoint.async_mode={self.async_mode!r}: AsyncckptCheckpointManager saves asynchronously "
                    "itself; leave async_mode at 'disabled'"
                )
            if self.snapshot not in ("lazy", "blocking"):
                raise ValueError(f"checkpoint.snapshot must be 'lazy' or 'blocking', got {self.snapshot!r}")

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if not self.enable:
            return
        self.snapshot = config.snapshot
        self.verify = config.verify
        if config.save_rng:
            self.states[RNG_STATE_KEY] = RngState()
        stock: threading.Thread | None = getattr(self, "purge_thread", None)
        if stock is not None:  # torchtitan's thread removes with rmtree: restart it on delete_stale
            self.purge_queue.put(None)
            stock.join()
            ours = threading.Thread(target=purge_loop, args=(self.purge_queue, self.delete_stale), daemon=True,
                                    name="asyncckpt-torchtitan-purge")
            ours.start()
            self.purge_thread = ours

    # -- retention ------------------------------------------------------------------------------
    def delete_stale(self, path: str) -> None:
        """Delete the step folder ``path`` that ``keep_latest_k`` retired (on torchtitan's purge thread).

        :func:`asyncckpt.delete` removes only what the folder's records prove is a checkpoint
        (complete, or a save torn by a crash) and raises for anything else, which torchtitan's
        thread logs and skips; the folder of a save still being written is skipped here.
        """
        from ..dcp import AsyncSaveHandle
        from ..deletion import delete

        target = path if "://" in path else os.path.abspath(path)
        pending = self.save_future
        if isinstance(pending, AsyncSaveHandle) and not pending.done() and pending.checkpoint_id == target:
            log.info("keep_latest_k: not deleting %s, its save is still being written", target)
            return
        report = delete(target)
        if "://" not in target and not report.kept:
            try:
                os.rmdir(target)
            except FileNotFoundError:
                pass
            except OSError as exc:  # something appeared in it meanwhile: leave it
                raise CheckpointError(f"deleted the checkpoint in {target} but could not remove the folder: {exc}") from exc

    # -- saving ---------------------------------------------------------------------------------
    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: AsyncMode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ) -> Any:
        """Save through :func:`asyncckpt.dcp.async_save`; returns its handle (already committed when
        ``async_mode`` is DISABLED, as for the last step). Hugging Face exports stay torchtitan's."""
        if to_hf:
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        from ..dcp import async_save

        path = checkpoint_id if "://" in checkpoint_id else os.path.abspath(checkpoint_id)
        handle = async_save(state_dict, checkpoint_id=path, process_group=self.pg,
                            snapshot=self.snapshot if async_mode != AsyncMode.DISABLED else "blocking")
        if async_mode == AsyncMode.DISABLED:
            handle.result()
        return handle

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        self.maybe_wait_for_saving()  # one save in flight, as torchtitan's own async modes
        if last_step:
            self._save_last_step(curr_step)  # blocking (end of training), through dcp_save above
            return True
        self.save_future = self.dcp_save(self._flattened_model_states_sd(), self._create_checkpoint_id(curr_step),
                                         AsyncMode.ASYNC)
        self._purge_stale_checkpoints()
        return True

    def _maybe_wait_for_staging(self) -> None:
        """torchtitan calls this before ``optimizers.step()``: wait for the worker's copy, and let
        a finished save commit (a non-blocking finalize: one integer all-reduce across ranks)."""
        from ..dcp import finalize_async_saves

        handle = self.save_future
        if handle is None:
            return
        handle.wait_snapshot()
        finalize_async_saves(blocking=False)

    def _wait_for_saving(self) -> None:
        assert self.save_future is not None
        self.save_future.result()
        self.save_future = None

    def _close(self) -> None:
        try:
            if self.save_future is not None:
                self._wait_for_saving()
        finally:
            super()._close()

    # -- loading --------------------------------------------------------------------------------
    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        """torchtitan's load; a DCP checkpoint is read by ``dcp.load`` through asyncckpt's verifying reader."""
        if from_hf or not self.verify:
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        import torch.distributed.checkpoint as dcp

        from ..dcp import AsyncStorageReader

        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise BadInputError(f"checkpoint_id must be a path or URI, got {checkpoint_id!r}")
        dcp.load(state_dict, storage_reader=AsyncStorageReader(checkpoint_id))
        if MODEL in self.states:
            self.states[MODEL].load_state_dict(state_dict)
