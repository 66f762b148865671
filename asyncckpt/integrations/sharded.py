"""The body of asyncckpt's Lightning strategies for sharded checkpoints (FSDP2 / ModelParallel), framework-free.

Lightning's ``ModelParallelStrategy`` writes a sharded checkpoint itself, bypassing
``CheckpointIO``: a DCP directory (``dcp.save`` on every rank) plus ``meta.pt`` (loop counters,
callbacks, schedulers: ``torch.save`` on rank 0 afterwards). :class:`ShardedCheckpointMethods`
replaces both writes (its queue, save and load are :class:`ShardedSaves`, which the Fabric
strategies of :mod:`asyncckpt.integrations.fabric` share):

* the DCP part goes through :func:`asyncckpt.dcp.async_save` on a queue of the strategy's own:
  ``save_checkpoint`` returns once the worker holds its copy of the tensors, the worker writes
  and the coordinator's worker commits (one integer all-reduce at the next training batch);
* the rest of the checkpoint (Lightning's ``meta.pt`` dict) is saved *inside* the same DCP
  state, as the uint8 tensor :data:`META_KEY`, so it is switched together with the tensors
  (an overwritten ``last.ckpt`` is a new DCP generation, switched atomically at commit);
* ``meta.pt`` itself is still written, by the committing worker right after the commit, so
  stock Lightning (``ModelParallelStrategy.load_checkpoint``, ``consolidate_checkpoint``)
  reads the directory too.

``load_checkpoint`` reads model, optimizers and the metadata in one stock ``dcp.load`` of one
generation, so a resumed run never pairs new loop counters with old weights.

Each rank's RNG state (Python ``random``, NumPy's global generator, torch CPU and CUDA, as
:func:`asyncckpt.rng.get_rng_state` returns it) is saved in the same generation under
:func:`rng_key` and put back by ``load_checkpoint`` when as many ranks resume as saved; Lightning
saves no RNG state itself, so a resumed run would otherwise draw (dropout masks, noise) other
numbers than the uninterrupted one.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import BadInputError, CheckpointNotFoundError
from ..queue import AsyncCallsQueue
from ..rng import get_rng_state, set_rng_state

__all__ = ["META_FILE", "META_KEY", "RNG_KEY_PREFIX", "FSDP1CheckpointMethods", "ShardedCheckpointMethods",
           "ShardedSaves", "entry_sizes", "init_strategy", "rng_key"]

log = logging.getLogger("asyncckpt")

#: The DCP key holding the ``torch.save`` bytes of Lightning's metadata (everything but weights and optimizers).
META_KEY = "asyncckpt_lightning_meta"
#: Lightning's name for that metadata file inside a sharded checkpoint directory.
META_FILE = "meta.pt"
#: The DCP keys holding each rank's RNG state start with this; rank ``R``'s is :func:`rng_key` ``(R)``.
RNG_KEY_PREFIX = "asyncckpt_lightning_rng.rank"


def rng_key(rank: int) -> str:
    """The DCP key of rank ``rank``'s RNG state: a 1-D uint8 tensor, the ``torch.save`` bytes of
    :func:`asyncckpt.rng.get_rng_state` with its NumPy arrays as tensors (so it loads with ``weights_only=True``)."""
    return f"{RNG_KEY_PREFIX}{int(rank)}"


def _serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _arrays_as_tensors(obj: Any) -> Any:
    """``obj`` with every NumPy array replaced by a tensor of the same dtype and values (``set_rng_state`` takes either)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _arrays_as_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_arrays_as_tensors(v) for v in obj)
    return obj


def _as_uint8(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class ShardedSaves:
    """What every asyncckpt Lightning strategy for sharded checkpoints shares (Trainer and Fabric).

    The strategy's own queue of :func:`asyncckpt.dcp.async_save` calls, the pending save of each
    path (so two saves of one name never commit out of order), the save of a DCP state with
    Lightning's metadata (:data:`META_KEY`, and :data:`META_FILE` written by the committing worker)
    and each rank's RNG state (:func:`rng_key`) in one generation, and the load of all of it in one
    ``dcp.load``. The strategy supplies ``broadcast``, ``barrier``, ``global_rank``, ``world_size``
    and ``is_global_zero``. ``rng=False`` neither saves nor restores the ranks' RNG state.

    Finishing a save is collective: every rank calls ``asyncckpt_collect`` / ``asyncckpt_close``.
    """

    # provided by the Lightning strategy this is mixed into
    broadcast: Callable[..., Any]
    barrier: Callable[..., None]
    global_rank: int
    world_size: int
    is_global_zero: bool

    def __init__(self, *, rng: bool = True) -> None:
        self.asyncckpt_rng = rng
        self.asyncckpt_queue: AsyncCallsQueue | None = None
        self.asyncckpt_pending: dict[str, int] = {}  # absolute path -> call index of its newest save
        self.asyncckpt_abort = False
        #: process group of the completion all-reduce (None: the default group)
        self.asyncckpt_group: Any = None

    def asyncckpt_collect(self, blocking: bool = False) -> None:
        """Commit the saves every rank has written (all of them with ``blocking``); collective.

        A failed save raises DCP's ``CheckpointException`` here, on every rank.
        """
        q = self.asyncckpt_queue
        if q is None or not q.get_num_unfinalized_calls():
            return
        import asyncckpt.dcp as adcp

        done = {h.call_idx for h in adcp.finalize_async_saves(blocking=blocking, queue=q)}
        if blocking:
            self.asyncckpt_pending.clear()
        else:
            self.asyncckpt_pending = {p: i for p, i in self.asyncckpt_pending.items()
                                      if i not in done and q.is_pending(i)}

    def asyncckpt_wait_for(self, path: Any) -> None:
        """Block until a pending save of ``path`` (if any) is committed; collective."""
        if os.path.abspath(os.fspath(path)) in self.asyncckpt_pending:
            self.asyncckpt_collect(blocking=True)

    def asyncckpt_close(self) -> None:
        """Finish every pending save (collective; dropped after an exception) and stop the worker."""
        q, self.asyncckpt_queue = self.asyncckpt_queue, None
        if q is None:
            return
        import asyncckpt.dcp as adcp

        try:
            if not self.asyncckpt_abort:
                while q.get_num_unfinalized_calls():
                    adcp.finalize_async_saves(blocking=True, queue=q)
        finally:
            self.asyncckpt_pending.clear()
            q.close(abort=True)

    def asyncckpt_target(self, filepath: Any) -> str:
        """The absolute local path every rank saves ``filepath`` to (rank 0's), once no save of it is pending.

        Commits what is written (non-blocking), waits for a pending save of the same path (two saves
        of one name in flight could commit out of order), and removes a full (single-file)
        checkpoint of that name, which the directory replaces as in Lightning. Collective.
        """
        raw = os.fspath(self.broadcast(filepath))
        if "://" in raw:
            raise BadInputError(f"{type(self).__name__} writes sharded checkpoints to local paths only, got {raw}")
        path = os.path.abspath(raw)
        self.asyncckpt_collect()
        self.asyncckpt_wait_for(path)
        if self.broadcast(os.path.isfile(path)):
            if self.is_global_zero:
                os.unlink(path)
            self.barrier("asyncckpt.save_checkpoint")
        return path

    def asyncckpt_save(self, state: dict[str, Any], path: str, meta: Any) -> None:
        """Start the async DCP save of ``state`` into ``path`` (from :meth:`asyncckpt_target`); collective.

        Rank 0's ``meta`` (Lightning's ``meta.pt`` dict) goes into the same generation as
        :data:`META_KEY` and beside it as :data:`META_FILE`; each rank's RNG state under
        :func:`rng_key` (unless ``rng=False``). Returns once the worker holds its copy of the tensors.
        """
        import asyncckpt.dcp as adcp

        state = dict(state)
        extra: dict[str, bytes] | None = None
        if self.global_rank == 0:  # rank 0's metadata, as Lightning writes meta.pt from rank 0
            blob = _serialize(meta)
            state[META_KEY] = _as_uint8(blob)
            extra = {META_FILE: blob}
        if self.asyncckpt_rng:  # every rank's own streams, under a key of its own (DCP keeps one copy per key)
            state[rng_key(self.global_rank)] = _as_uint8(_serialize(_arrays_as_tensors(get_rng_state())))
        if self.asyncckpt_queue is None:
            self.asyncckpt_queue = AsyncCallsQueue(group=self.asyncckpt_group)
        handle = adcp.async_save(state, checkpoint_id=path, queue=self.asyncckpt_queue, snapshot="blocking",
                                 extra_files=extra)
        self.asyncckpt_pending[path] = handle.call_idx

    def asyncckpt_load(self, path: Path, state: dict[str, Any], sizes: tuple[int, dict[str, int]],
                       weights_only: bool | None, check: Callable[[Any], None] | None = None) -> Any:
        """``dcp.load`` of ``state`` (state dicts to fill in place) plus the metadata of the same generation.

        ``sizes`` is what :func:`entry_sizes` returned for ``path``. Restores this rank's RNG state
        when the checkpoint holds one per rank of this run; returns the unpickled metadata. ``check``
        (raising) sees the metadata first: a refused checkpoint leaves the RNG state alone.
        """
        import torch.distributed.checkpoint as dcp

        size, rng_sizes = sizes
        state = dict(state)
        state[META_KEY] = torch.empty(size, dtype=torch.uint8)
        own_rng = rng_key(self.global_rank)
        rng_here = self.asyncckpt_rng and own_rng in rng_sizes and len(rng_sizes) == self.world_size
        if rng_here:
            state[own_rng] = torch.empty(rng_sizes[own_rng], dtype=torch.uint8)
        elif self.asyncckpt_rng:
            log.info("not restoring the RNG state: %s holds it for %d rank(s), %d run now", path, len(rng_sizes),
                     self.world_size)
        dcp.load(state, checkpoint_id=path)  # one .metadata, so one generation for all of it
        meta = torch.load(io.BytesIO(state[META_KEY].numpy().tobytes()), map_location="cpu", weights_only=weights_only)
        if check is not None:
            check(meta)
        if rng_here:
            set_rng_state(torch.load(io.BytesIO(state[own_rng].numpy().tobytes()), map_location="cpu", weights_only=True))
        return meta


class ShardedCheckpointMethods(ShardedSaves):
    """``save_checkpoint`` / ``load_checkpoint`` / ``remove_checkpoint`` of a sharded Lightning strategy through asyncckpt.

    Mixed in before a Lightning Trainer strategy whose sharded checkpoint is ``{"state_dict": ...,
    "optimizer_N": ...}`` in DCP plus ``meta.pt`` (``ModelParallelStrategy``). Besides what
    :class:`ShardedSaves` needs, the strategy supplies ``model``, ``optimizers`` and
    ``lightning_module``. ``sharded=False`` (a full checkpoint gathered on rank 0) leaves every
    call to the strategy itself (pass ``AsyncckptCheckpointIO`` as its ``checkpoint_io`` plug-in to
    make that write asynchronous). ``rng=False`` neither saves nor restores the ranks' RNG state.

    All ranks call ``save_checkpoint``, ``load_checkpoint``, ``remove_checkpoint``,
    ``on_train_batch_start`` and ``teardown`` (Lightning does): finishing a save is collective.
    """

    #: the DCP key of the module's state: Lightning's ``ModelParallelStrategy`` writes ``state_dict``,
    #: its ``FSDPStrategy`` ``model`` (kept, so the stock strategy reads what asyncckpt wrote)
    asyncckpt_model_key: ClassVar[str] = "state_dict"

    model: Any
    optimizers: Any
    lightning_module: Any

    def __init__(self, *, sharded: bool = True, rng: bool = True) -> None:
        ShardedSaves.__init__(self, rng=rng)
        self.asyncckpt_sharded = sharded

    # -- the strategy's methods ----------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Start the sharded save of ``checkpoint`` into directory ``filepath``; returns once it is snapshotted."""
        if not self.asyncckpt_sharded:
            super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r}): "
                            "sharded checkpoints do not go through the CheckpointIO")
        path = self.asyncckpt_target(filepath)
        state: dict[str, Any] = {self.asyncckpt_model_key: checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        self.asyncckpt_save(state, path, checkpoint)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load weights, optimizer states and metadata of one committed generation; returns the metadata.

        This rank's RNG state is restored from the same generation when the checkpoint holds one
        per rank of this run (``rng=True``, the default). A sharded checkpoint without asyncckpt's
        metadata entry (written by stock Lightning) and a full checkpoint file are loaded by the
        strategy itself.
        """
        path = Path(os.path.abspath(os.fspath(self.broadcast(checkpoint_path))))
        self.asyncckpt_wait_for(path)
        sizes = entry_sizes(path)
        if sizes is None:
            return super().load_checkpoint(path, weights_only=weights_only)  # type: ignore[misc, no-any-return]
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        module = self.model
        optimizers = list(self.optimizers)
        key = self.asyncckpt_model_key
        state: dict[str, Any] = {key: get_model_state_dict(module)}
        state.update({f"optimizer_{i}": get_optimizer_state_dict(module, opt) for i, opt in enumerate(optimizers)})
        meta = self.asyncckpt_load(path, state, sizes, weights_only)
        if not isinstance(meta, dict):
            raise BadInputError(f"{path}: its {META_KEY!r} entry holds a {type(meta).__name__}, not Lightning's "
                                "checkpoint dict")
        self.asyncckpt_load_model(module, state[key], strict=self.lightning_module.strict_loading)
        for i, opt in enumerate(optimizers):
            set_optimizer_state_dict(module, opt, optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        return meta

    def asyncckpt_load_model(self, module: Any, state_dict: dict[str, Any], *, strict: bool) -> None:
        """Load the module's loaded (sharded) state dict into it."""
        module.load_state_dict(state_dict, strict=strict)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove a checkpoint once its pending save is committed; a sharded one with :func:`asyncckpt.delete`.

        ``asyncckpt.delete`` removes only what the checkpoint's own records prove is the
        checkpoint's (then ``meta.pt`` and the emptied directory go); anything else in it stays.
        """
        self.asyncckpt_wait_for(filepath)
        path = Path(os.fspath(filepath))
        if not (path.is_dir() and not path.is_symlink()):
            super().remove_checkpoint(filepath)  # type: ignore[misc]
            return
        if self.is_global_zero:
            import asyncckpt

            asyncckpt.delete(path)
            (path / META_FILE).unlink(missing_ok=True)
            try:
                path.rmdir()
            except OSError:  # something not ours is left in it
                log.info("kept %s: it holds files that are not the checkpoint's", path)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Commit saves whose files are written (a non-blocking finalize: one integer all-reduce)."""
        self.asyncckpt_collect()
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def on_exception(self, exception: BaseException) -> None:
        """Other ranks may be gone: teardown drops pending saves instead of finishing them collectively."""
        self.asyncckpt_abort = True
        super().on_exception(exception)  # type: ignore[misc]

    def teardown(self) -> None:
        """Finish every pending save (collective), stop the worker, then the strategy's own teardown."""
        try:
            self.asyncckpt_close()
        finally:
            super().teardown()  # type: ignore[misc]


class FSDP1CheckpointMethods(ShardedCheckpointMethods):
    """:class:`ShardedCheckpointMethods` for Lightning's ``FSDPStrategy`` (FSDP1): its DCP key names
    (``model``, ``optimizer_N``), so the stock strategy and this one resume from each other's checkpoints."""

    asyncckpt_model_key = "model"

    def asyncckpt_load_model(self, module: Any, state_dict: dict[str, Any], *, strict: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # an FSDP1 module's own load_state_dict expects its default (full) state dict type
        set_model_state_dict(module, state_dict, options=StateDictOptions(strict=strict))


def init_strategy(strategy: ShardedCheckpointMethods, base: type[Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  flag: str, sharded: Callable[[Any], bool], *, rng: bool = True) -> None:
    """``base.__init__(strategy, *args, **kwargs)``, then the asyncckpt part, sharded when
    ``sharded(value of base's argument flag)`` (defaults applied) says the strategy saves sharded."""
    base.__init__(strategy, *args, **kwargs)
    bound = inspect.signature(base.__init__).bind(strategy, *args, **kwargs)
    bound.apply_defaults()
    ShardedCheckpointMethods.__init__(strategy, sharded=sharded(bound.arguments[flag]), rng=rng)


def entry_sizes(path: Path) -> tuple[int, dict[str, int]] | None:
    """The byte sizes of asyncckpt's metadata entry and of every rank's RNG entry (by key) in the DCP
    checkpoint at ``path``; None for other checkpoints."""
    if not path.is_dir():
        return None
    if not (path / ".metadata").is_file():
        raise CheckpointNotFoundError(
            f"{path} holds no committed DCP checkpoint (no .metadata): its save never finished (the process "
            f"stopped while writing it); resume from another checkpoint in {path.parent}")
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if META_KEY not in entries:
        return None
    sizes: dict[str, int] = {}
    for key, entry in entries.items():
        if key == META_KEY or key.startswith(RNG_KEY_PREFIX):
            if not isinstance(entry, TensorStorageMetadata) or len(entry.size) != 1:
                raise BadInputError(f"{path}: its {key!r} entry is not a 1-D byte tensor; it was not written by asyncckpt")
            sizes[key] = int(entry.size[0])
    return sizes.pop(META_KEY), sizes
