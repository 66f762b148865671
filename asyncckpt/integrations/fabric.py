"""The body of asyncckpt's Lightning *Fabric* strategies for sharded checkpoints, framework-free.

Fabric's ``ModelParallelStrategy`` (FSDP2 / tensor parallel) writes ``fabric.save(path, state)``
itself: the modules and optimizers in ``state`` become their (sharded) state dicts under the
user's keys and go to ``dcp.save`` on every rank; everything else is the user's metadata, written
by rank 0 to ``path/meta.pt``. Fabric's strategies refuse a ``CheckpointIO``, so
:class:`FabricShardedCheckpointMethods` replaces ``save_checkpoint`` / ``load_checkpoint``:

* the save converts ``state`` as Fabric does (same keys, same state dicts) and hands it to
  :func:`asyncckpt.dcp.async_save` with the metadata and each rank's RNG state in the same
  generation (:class:`~asyncckpt.integrations.sharded.ShardedSaves`); ``meta.pt`` is written by the
  committing worker right after the commit, so stock Fabric loads the directory;
* the load reads modules, optimizers, metadata and this rank's RNG state in one ``dcp.load`` of
  one generation, and returns the metadata that ``state`` did not ask for (Fabric's contract,
  ``strict`` included); a checkpoint written by stock Fabric, a full checkpoint file and a bare
  module are loaded by the strategy itself.

Commits need no user call. Fabric has no batch hook, so a non-blocking finalize (one integer
all-reduce) runs in ``optimizer_step``, which Fabric's optimizer wrapper calls on every step.
Fabric never calls ``teardown`` by itself, so the strategy registers an exit hook once the process
group exists (``setup_environment``): at normal interpreter exit every rank finishes the pending
saves, collectively. Its all-reduces run on a gloo process group of their own, so a rank already
at exit pairs only with the other ranks' finalize calls (their steps' or their own exit's), never
with their training collectives; that group has the strategy's ``timeout``, which bounds the wait
for a rank that never gets there. A process that ends with an uncaught exception drops its pending
saves instead (nothing of them is committed; the previous generation stays loadable).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from .sharded import META_KEY, ShardedSaves, entry_sizes

__all__ = ["FabricFSDP1CheckpointMethods", "FabricShardedCheckpointMethods", "has_dtensor_parameters",
           "init_fabric_strategy"]

log = logging.getLogger("asyncckpt")


class FabricShardedCheckpointMethods(ShardedSaves):
    """``save_checkpoint`` / ``load_checkpoint`` / ``optimizer_step`` of a sharded Fabric strategy through asyncckpt.

    Mixed in before Fabric's ``ModelParallelStrategy``, which supplies, besides what
    :class:`~asyncckpt.integrations.sharded.ShardedSaves` needs, ``setup_environment``,
    ``optimizer_step`` and ``teardown``. ``sharded=False`` (the strategy gathers a full checkpoint on
    rank 0) leaves save and load to the strategy itself (synchronous). All ranks call ``fabric.save``
    and ``fabric.load`` (Fabric requires it) and step their optimizers: finishing a save is collective.
    """

    def __init__(self, *, sharded: bool = True, rng: bool = True, timeout: timedelta | None = None) -> None:
        ShardedSaves.__init__(self, rng=rng)
        self.asyncckpt_sharded = sharded
        self.asyncckpt_timeout = timeout
        self.asyncckpt_exit_hook: Callable[[], None] | None = None

    # -- commits without user calls --------------------------------------------------------------
    def setup_environment(self) -> None:
        """The strategy's setup (process group), then asyncckpt's completion group and exit hook."""
        super().setup_environment()  # type: ignore[misc]
        import torch.distributed as dist

        if self.asyncckpt_group is None and dist.is_available() and dist.is_initialized() and self.world_size > 1:
            kwargs: dict[str, Any] = {"backend": "gloo"}
            if self.asyncckpt_timeout is not None:
                kwargs["timeout"] = self.asyncckpt_timeout
            self.asyncckpt_group = dist.new_group(**kwargs)  # collective: every rank sets up its environment
        if self.asyncckpt_exit_hook is None:
            # Registered after the process group exists, so it runs before Lightning's own exit hook
            # (destroy_process_group, registered for NCCL): atexit runs handlers last-in, first-out.
            self.asyncckpt_exit_hook = self.asyncckpt_finish_at_exit
            atexit.register(self.asyncckpt_exit_hook)

    def asyncckpt_finish_at_exit(self) -> None:
        """At interpreter exit: finish every pending save (collective), or drop them after an uncaught exception."""
        q = self.asyncckpt_queue
        if q is None:
            return
        pending = q.get_num_unfinalized_calls()
        if pending and (getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None):
            log.warning("asyncckpt: %d pending sharded save(s) dropped at exit: the program ended with an exception, "
                        "and finishing them needs every rank", pending)
            self.asyncckpt_abort = True
        elif pending:
            log.info("asyncckpt: finishing %d pending sharded save(s) at exit (waits for every rank's exit or step)",
                     pending)
        try:
            self.asyncckpt_close()
        except BaseException as exc:  # noqa: BLE001 - exiting: report it, never raise from an exit hook
            log.error("asyncckpt: a pending sharded save was not committed at exit: %s", exc)

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """Commit the saves every rank has written (one integer all-reduce), then the optimizer's step."""
        self.asyncckpt_collect()
        return super().optimizer_step(optimizer, **kwargs)  # type: ignore[misc]

    def teardown(self) -> None:
        """Finish every pending save (collective), stop the worker, then the strategy's own teardown."""
        try:
            self.asyncckpt_close()
        finally:
            if self.asyncckpt_exit_hook is not None:
                atexit.unregister(self.asyncckpt_exit_hook)
                self.asyncckpt_exit_hook = None
            super().teardown()  # type: ignore[misc]

    # -- save and load -------------------------------------------------------------------------
    def asyncckpt_is_sharded_module(self, obj: Any) -> bool:
        """True for the sharded model of a checkpoint's state (a module with ``DTensor`` parameters)."""
        return has_dtensor_parameters(obj)

    def asyncckpt_load_model(self, module: Any, state_dict: dict[str, Any], *, strict: bool) -> None:
        """Load the module's loaded (sharded) state dict into it."""
        module.load_state_dict(state_dict, strict=strict)

    def asyncckpt_module(self, state: dict[str, Any], what: str) -> tuple[str, Any]:
        """The key and module of the one sharded model in ``state``, refused as Fabric refuses it."""
        modules = [(k, m) for k, m in state.items() if self.asyncckpt_is_sharded_module(m)]
        if len(modules) != 1:
            many = "Found multiple distributed models" if modules else "Could not find a distributed model"
            raise ValueError(f"{many} in the provided checkpoint state: {what} takes exactly one, set up through "
                             "the strategy, as state={'model': model, ...}")
        return modules[0]

    def save_checkpoint(self, path: Any, state: dict[str, Any], storage_options: Any = None,
                        filter: dict[str, Callable[[str, Any], bool]] | None = None) -> None:
        """Start the sharded save of ``state`` into directory ``path``; returns once every tensor is snapshotted."""
        if not self.asyncckpt_sharded:
            super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)  # type: ignore[misc]
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r}): "
                            "sharded checkpoints do not go through the CheckpointIO")
        if filter is not None:  # as Fabric: DCP cannot load a filtered sharded checkpoint (pytorch#105379)
            raise NotImplementedError(f"{type(self).__name__} doesn't support loading distributed filtered "
                                      "checkpoints, so saving them is disabled.")
        import torch
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        _, module = self.asyncckpt_module(state, "save")
        target = self.asyncckpt_target(path)
        options = StateDictOptions(cpu_offload=True)
        converted: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        for key, obj in state.items():  # Fabric's conversion: modules and optimizers to DCP, the rest is metadata
            if isinstance(obj, torch.nn.Module):
                converted[key] = get_model_state_dict(obj, options=options)
            elif isinstance(obj, torch.optim.Optimizer):
                converted[key] = get_optimizer_state_dict(module, obj, options=options)
            else:
                sd = getattr(obj, "state_dict", None)
                metadata[key] = sd() if callable(sd) and callable(getattr(obj, "load_state_dict", None)) else obj
        os.makedirs(target, exist_ok=True)
        self.asyncckpt_save(converted, target, metadata)

    def load_checkpoint(self, path: Any, state: Any = None, strict: bool = True,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Restore ``state``'s modules, optimizers and metadata from one committed generation; return the rest.

        This rank's RNG state is restored too when the checkpoint holds one per rank of this run.
        A checkpoint without asyncckpt's metadata entry (stock Fabric's), a full checkpoint file,
        and a bare module or optimizer as ``state`` are left to the strategy itself.
        """
        import torch

        if not isinstance(state, dict) or not state or not self.asyncckpt_sharded:
            return super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)  # type: ignore[misc, no-any-return]
        target = Path(os.path.abspath(os.fspath(self.broadcast(path))))
        self.asyncckpt_wait_for(target)
        sizes = entry_sizes(target)
        if sizes is None:
            return super().load_checkpoint(target, state, strict=strict, weights_only=weights_only)  # type: ignore[misc, no-any-return]
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        module_key, module = self.asyncckpt_module(state, "load")
        optimizers = {k: o for k, o in state.items() if isinstance(o, torch.optim.Optimizer)}
        loaded: dict[str, Any] = {module_key: get_model_state_dict(module)}
        loaded.update({k: get_optimizer_state_dict(module, o) for k, o in optimizers.items()})
        requested = state.keys() - {module_key} - optimizers.keys()

        def check(meta: Any) -> None:
            if not isinstance(meta, dict):
                raise BadInputError(f"{target}: its {META_KEY!r} entry holds a {type(meta).__name__}, not Fabric's "
                                    "metadata dict")
            missing = [k for k in requested if k not in meta]
            if strict and missing:  # Fabric's message
                raise KeyError(f"The requested state contains a key '{missing[0]}' that does not exist in the loaded "
                               "checkpoint. To disable strict loading, set `strict=False`.")

        metadata = self.asyncckpt_load(target, loaded, sizes, weights_only, check)
        self.asyncckpt_load_model(module, loaded[module_key], strict=strict)
        for k, opt in optimizers.items():
            set_optimizer_state_dict(module, opt, optim_state_dict=loaded[k], options=StateDictOptions(cpu_offload=True))
        for key in requested:
            if key in metadata:
                state[key] = metadata.pop(key)
        return metadata


class FabricFSDP1CheckpointMethods(FabricShardedCheckpointMethods):
    """:class:`FabricShardedCheckpointMethods` for Fabric's ``FSDPStrategy`` (FSDP1, ``state_dict_type="sharded"``).

    The same keys as the stock strategy (the user's), so either resumes from the other's checkpoint.
    FSDP1 needs CUDA: tested only where a GPU is present.
    """

    def asyncckpt_is_sharded_module(self, obj: Any) -> bool:
        """True for a module wrapped (anywhere inside) by FSDP1's ``FullyShardedDataParallel``."""
        import torch
        from torch.distributed.fsdp import FullyShardedDataParallel

        return isinstance(obj, torch.nn.Module) and any(isinstance(m, FullyShardedDataParallel) for m in obj.modules())

    def asyncckpt_load_model(self, module: Any, state_dict: dict[str, Any], *, strict: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # an FSDP1 module's own load_state_dict expects its default (full) state dict type
        set_model_state_dict(module, state_dict, options=StateDictOptions(strict=strict))


def has_dtensor_parameters(module: Any) -> bool:
    """True for a module with a ``DTensor`` parameter (one set up by Fabric's ``ModelParallelStrategy``)."""
    import torch
    from torch.distributed.tensor import DTensor

    return isinstance(module, torch.nn.Module) and any(isinstance(p, DTensor) for p in module.parameters())


def init_fabric_strategy(strategy: FabricShardedCheckpointMethods, base: type[Any], args: tuple[Any, ...],
                         kwargs: dict[str, Any], flag: str, sharded: Callable[[Any], bool], *, rng: bool = True) -> None:
    """``base.__init__(strategy, *args, **kwargs)`` for a Fabric strategy, then the asyncckpt part: sharded when
    ``sharded(value of base's argument flag)`` (defaults applied) says so; the completion group gets the
    strategy's ``timeout``."""
    import inspect

    base.__init__(strategy, *args, **kwargs)
    bound = inspect.signature(base.__init__).bind(strategy, *args, **kwargs)
    bound.apply_defaults()
    FabricShardedCheckpointMethods.__init__(strategy, sharded=sharded(bound.arguments[flag]), rng=rng,
                                            timeout=bound.arguments.get("timeout"))
