"""AsyncStorageWriter: a DCP StorageWriter whose writes run on asyncckpt's persistent worker."""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import os
import pickle
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import SerializationFormat, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .._loop import _get_loop, run_sync
from ..engine import SaveJob
from ..errors import BadInputError, CheckpointNotFoundError
from ..format import ALIGN, CHECKSUM_ALGO, ValueNode
from ..plan import INLINE_MAX, tensor_bytes
from ..queue import AsyncCallsQueue
from ..staging import SharedRegistry, SnapshotSpec
from ..storage import Storage, join_key, open_storage, split_uri
from ._commit import (
    DcpCommitOp,
    DcpExtraFilesOp,
    check_extra_files,
    commit_dcp,
    committed_generation,
    next_generation,
    prepare_target,
)
from ._format import (
    DCP_FORMAT,
    RankRecord,
    data_file_name,
    decode_rank_record,
    encode_record,
    generation_name,
    item_transforms,
    rank_record_file,
    record_version,
)
from ._io import BLOCK, FileSpec, ItemSpec, data_positions, exact_cpu_tensor, write_file
from ._worker import DcpJob, dcp_preload, dcp_save

__all__ = ["AsyncStorageWriter", "DcpPlanData"]


@dataclasses.dataclass
class DcpPlanData:
    """The storage_data of a global save plan: this rank's file prefix and the save's id."""

    prefix: str
    save_id: str


_DcpPlanData = DcpPlanData  # the name older pickled plans use


@dataclasses.dataclass
class _Pending:
    items: list[ItemSpec]
    data: list[Any]  # tensors (live, not copied) or bytes
    files: list[FileSpec]
    save_id: str
    rank: int
    world_size: int


_CHECKED_ROOTS: set[str] = set()  # local roots found writable (asynchronous saves check each once)

# Ids of storages shared by DCP saves come from one counter per process, far from the ids
# AsyncCheckpointer's registries use, so several registries can feed one worker safely.
_DCP_IDS = itertools.count(1 << 40)


class _DcpRegistry(SharedRegistry):
    def __init__(self) -> None:
        super().__init__()
        self._ids = _DCP_IDS


# One registry per queue (that is, per persistent worker), reset when the worker is replaced.
_REGISTRIES: weakref.WeakKeyDictionary[AsyncCallsQueue, list[Any]] = weakref.WeakKeyDictionary()


def _registry_for(queue: AsyncCallsQueue) -> _DcpRegistry:
    queue.start_worker()
    entry = _REGISTRIES.get(queue)
    if entry is None:
        entry = _REGISTRIES[queue] = [queue.worker_generation, _DcpRegistry()]
    if entry[0] != queue.worker_generation:
        entry[1].reset()
        entry[0] = queue.worker_generation
    return entry[1]


def _split_files(prefix: str, items: list[ItemSpec], n: int, *, single_file_per_rank: bool = True,
                 separation_hint: str | None = None) -> list[FileSpec]:
    """Bucket items into files as FileSystemWriter does: ``n`` files (bytes items round-robin,
    tensors to the lightest), or one file per item. With a ``separation_hint`` (NVRx's), items whose
    key starts with it go to files of their own, named with the hint in front."""
    if not single_file_per_rank:
        return [FileSpec(data_file_name(prefix, i), [i]) for i in range(len(items))] or [FileSpec(data_file_name(prefix, 0), [])]
    groups: list[tuple[str, list[int], int]]
    if separation_hint is None:
        groups = [("", list(range(len(items))), max(1, n))]
    else:
        hinted = [i for i, it in enumerate(items) if it.fqn.startswith(separation_hint)]
        rest = [i for i, it in enumerate(items) if not it.fqn.startswith(separation_hint)]
        groups = [("", rest, max(1, n // 2)), (separation_hint, hinted, max(1, n // 2))]
    out: list[FileSpec] = []
    count = 0
    for head, members, bins in groups:
        buckets: list[list[int]] = [[] for _ in range(bins)]
        sizes = [0] * bins
        byte_items = [i for i in members if items[i].kind == "bytes"]
        tensor_items = sorted((i for i in members if items[i].kind != "bytes"), key=lambda i: -items[i].nbytes)
        for k, i in enumerate(byte_items):
            buckets[k % bins].append(i)
        for i in tensor_items:
            smallest = min(range(bins), key=sizes.__getitem__)
            buckets[smallest].append(i)
            sizes[smallest] += items[i].nbytes
        for bucket in buckets:
            if bucket:
                out.append(FileSpec(head + data_file_name(prefix, count), sorted(bucket)))
                count += 1
    return out or [FileSpec(data_file_name(prefix, 0), [])]


def _check_extensions(extensions: Sequence[Any] | None) -> list[Any]:
    out = list(extensions or ())
    for ex in out:
        if not (callable(getattr(ex, "transform_to", None)) and callable(getattr(ex, "get_descriptor", None))):
            raise BadInputError(
                f"_extensions must be DCP StreamTransformExtensions (transform_to, get_descriptor); got {type(ex).__name__}"
            )
        try:
            pickle.loads(pickle.dumps(ex))
        except Exception as exc:
            raise BadInputError(
                f"the stream extension {type(ex).__name__} cannot be sent to the asyncckpt worker ({type(exc).__name__}: "
                f"{exc}); define its class at module level of an importable module"
            ) from exc
    return out


class AsyncStorageWriter(StorageWriter):
    """A DCP StorageWriter for a local directory or ``s3://bucket/prefix/NAME``.

    Used with :func:`~asyncckpt.dcp.async_save` or :func:`~asyncckpt.dcp.save_state_dict_async_plan`,
    its writes run on asyncckpt's persistent worker: the worker snapshots the tensors into its
    staging memory, then writes the files, and the coordinator's worker commits. Used with plain
    ``dcp.save`` it writes synchronously in this process. Either way the result is a DCP
    checkpoint that ``torch.distributed.checkpoint.load`` reads with its stock
    ``FileSystemReader`` (when local), plus CRC32C records that
    :class:`~asyncckpt.dcp.AsyncStorageReader` verifies.

    The positional arguments are ``FileSystemWriter``'s, with its meaning:

    - ``single_file_per_rank``: one file per rank and thread (default), or one per item.
    - ``sync_files``: accepted; files are always made durable (fsync / multipart complete)
      before the checkpoint is committed, whatever its value.
    - ``thread_count``: data files per rank, written in parallel by the worker (``files_per_rank``
      is the same knob under asyncckpt's name).
    - ``per_thread_copy_ahead``, ``cache_staged_state_dict``: accepted; the worker's snapshot into
      its reusable staging memory takes their place (nothing to tune).
    - ``overwrite``: replace an existing checkpoint (default True, as DCP). Over a checkpoint this
      writer committed, the new one is written beside it and switched to atomically at commit
      (readers see the old or the new one, never neither; a crash leaves one); over anything else
      its commit point is removed before the first byte is written. ``False`` makes the save fail with
      DCP's "Checkpoint already exists" (a ``CheckpointException`` on every rank).
    - ``_extensions``: DCP stream extensions (``ZStandard()``, your own
      ``StreamTransformExtension``), applied to every item and recorded in ``.metadata``.
    - ``serialization_format``: ``SerializationFormat.TORCH_SAVE`` only.

    asyncckpt's own (keyword) options: ``chunk_size`` / ``io_concurrency`` (part size and parts
    in flight), ``storage_options`` (e.g. ``endpoint_url`` for S3), ``update_latest`` (point
    the parent's ``latest`` record at this checkpoint), ``separation_hint`` (NVRx's: items
    whose key starts with it go to files of their own).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: Any = None,
        *,
        files_per_rank: int | None = None,
        chunk_size: int = 32 << 20,
        io_concurrency: int = 4,
        storage_options: dict[str, Any] | None = None,
        update_latest: bool = False,
        separation_hint: str | None = None,
    ) -> None:
        # No super().__init__(): in FileSystemWriterAsync (asyncckpt.nvrx) FileSystemWriter comes
        # next in the MRO and is initialised by that class itself; StorageWriter needs nothing.
        if not isinstance(thread_count, int) or thread_count < 1:
            raise BadInputError(f"thread_count must be an int >= 1, got {thread_count!r}")
        if files_per_rank is not None:
            if files_per_rank < 1:
                raise BadInputError(f"files_per_rank must be >= 1, got {files_per_rank}")
            if thread_count not in (1, files_per_rank):
                raise BadInputError(f"files_per_rank={files_per_rank} and thread_count={thread_count} disagree; "
                                    "they are the same knob, give one of them")
            thread_count = files_per_rank
        if chunk_size < (5 << 20) or chunk_size > (5 << 30):
            raise BadInputError(f"chunk_size must be between 5 MiB and 5 GiB, got {chunk_size}")
        if io_concurrency < 1:
            raise BadInputError(f"io_concurrency must be >= 1, got {io_concurrency}")
        if serialization_format not in (None, SerializationFormat.TORCH_SAVE):
            raise BadInputError(
                f"serialization_format={serialization_format}: AsyncStorageWriter writes DCP's torch.save format only "
                "(SerializationFormat.TORCH_SAVE); for safetensors use torch's HuggingFaceStorageWriter"
            )
        if separation_hint is not None and thread_count < 2:
            raise BadInputError("separation_hint needs thread_count >= 2 (half of the files hold the hinted keys)")
        self.single_file_per_rank = bool(single_file_per_rank)
        self.sync_files = bool(sync_files)
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.cache_staged_state_dict = cache_staged_state_dict
        self.overwrite = overwrite
        self.extensions = _check_extensions(_extensions)
        self.serialization_format = SerializationFormat.TORCH_SAVE
        self.chunk_size = chunk_size
        self.io_concurrency = io_concurrency
        self.storage_options = dict(storage_options or {})
        self.update_latest = update_latest
        self.separation_hint = separation_hint
        self.is_coordinator = False
        self.rank = 0
        self.use_collectives = True
        self.deferred_target = False
        self._pending: _Pending | None = None
        self._last: _Pending | None = None
        self._set_path(path)
        self.save_id = str(uuid.uuid4())

    @property
    def files_per_rank(self) -> int:
        return self.thread_count

    # -- paths ----------------------------------------------------------------------------------
    def _set_path(self, path: str | os.PathLike[str]) -> None:
        p = os.fspath(path)
        if p.startswith("file://"):
            p = p[len("file://"):]
        if "://" not in p:
            p = os.path.abspath(p)  # the worker must not depend on our working directory
        self._path = path
        self.root, self.name = split_uri(p)
        self.uri = p

    def _storage(self) -> Storage:
        return open_storage(self.root, **self.storage_options)

    @property
    def checkpoint_id(self) -> str | os.PathLike[str]:
        return self._path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        p = os.fspath(checkpoint_id)
        from ..storage import supports_uri  # the registry knows every scheme, plug-ins included

        return supports_uri(p)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.uri, save_id=self.save_id)

    # -- StorageWriter protocol -------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self._set_path(checkpoint_id)
        self.save_id = str(uuid.uuid4())

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """DCP's set-up; ``rank`` / ``use_collectives`` as DCP passes them. ``deferred_target=True``
        (asyncckpt's asynchronous saves) leaves the checkpoint directory to the worker."""
        self.is_coordinator = is_coordinator
        rank = kwargs.get("rank")
        self.rank = int(rank) if rank is not None else 0
        self.use_collectives = bool(kwargs.get("use_collectives", True))
        self.deferred_target = bool(kwargs.get("deferred_target", False))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if "://" not in self.root and (not self.deferred_target or self.root not in _CHECKED_ROOTS):
            from ..checkpointer import check_local_writable

            check_local_writable(self.root)  # a local stat: a clear BadInputError before anything is sent
            _CHECKED_ROOTS.add(self.root)
        if not self.use_collectives:
            if not self.deferred_target:
                run_sync(self._prepare_target(per_rank=True))
            return dataclasses.replace(plan, storage_data=DcpPlanData(f"__{self.rank}_", self.save_id))
        if self.is_coordinator and not self.deferred_target:
            run_sync(self._prepare_target(per_rank=False))
        return plan

    async def _prepare_target(self, *, per_rank: bool) -> None:
        storage = self._storage()
        try:
            await prepare_target(storage, self.name, overwrite=self.overwrite, uri=self.uri,
                                 rank=self.rank if per_rank else None)
        finally:
            await storage.close()

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [p if isinstance(p.storage_data, DcpPlanData)
                else dataclasses.replace(p, storage_data=DcpPlanData(f"__{i}_", self.save_id))
                for i, p in enumerate(plans)]

    def check_plan(self, plan: SavePlan, planner: SavePlanner) -> None:
        """Refuse tensors this writer cannot save (BadInputError), before anything is scheduled."""
        for wi in plan.items:
            if wi.type == WriteItemType.BYTE_IO:
                continue
            t = planner.resolve_data(wi)
            _check_tensor(wi.index.fqn, t)

    # -- collecting the data of a final plan ------------------------------------------------------
    def _collect(self, plan: SavePlan, planner: SavePlanner) -> tuple[list[ItemSpec], list[Any]]:
        items: list[ItemSpec] = []
        data: list[Any] = []
        for wi in plan.items:
            idx = wi.index
            chunk_offset = tuple(int(x) for x in idx.offset) if idx.offset is not None else None
            if wi.type == WriteItemType.BYTE_IO:
                obj = planner.resolve_data(wi)
                raw = bytes(obj.getbuffer()) if isinstance(obj, io.BytesIO) else bytes(obj)
                items.append(ItemSpec(idx.fqn, chunk_offset, idx.index, "bytes", None, (len(raw),), len(raw)))
                data.append(raw)
                continue
            t = _check_tensor(idx.fqn, planner.resolve_data(wi)).detach()
            if t.is_conj() or t.is_neg():
                t = t.resolve_conj().resolve_neg()
            nbytes = t.numel() * t.element_size()
            items.append(ItemSpec(idx.fqn, chunk_offset, idx.index, "tensor", t.dtype, tuple(t.shape), nbytes))
            data.append(t)
        return items, data

    def prepare_write_data(self, plan: SavePlan, planner: SavePlanner, *, save_id: str | None = None,
                           world_size: int = 1) -> None:
        """Resolve the final plan's items (no bytes are copied); the next schedule sends them."""
        sd = plan.storage_data
        prefix = sd.prefix if isinstance(sd, DcpPlanData) else f"__{self.rank}_"
        save_id = save_id or (sd.save_id if isinstance(sd, DcpPlanData) else self.save_id)
        items, data = self._collect(plan, planner)
        files = _split_files(prefix, items, self.thread_count, single_file_per_rank=self.single_file_per_rank,
                             separation_hint=self.separation_hint)
        self._pending = self._last = _Pending(items, data, files, save_id, self.rank, world_size)

    @property
    def has_data_to_write(self) -> bool:
        """True when the prepared plan has items for this rank (NVRx's attribute)."""
        return self._pending is not None and bool(self._pending.items)

    def prepare_job(self, queue: AsyncCallsQueue | None = None) -> tuple[DcpJob, list[tuple[str, torch.Tensor]]]:
        """Turn the pending plan into the worker's job (no bytes are copied); also return the tensors
        the worker will snapshot, named by key, for the snapshot guard.

        With the ``queue`` the job will be scheduled on, tensors are moved to shared memory once
        and only their ids are sent on later saves; without it every storage is sent afresh.
        """
        p = self._pending
        if p is None:
            raise BadInputError(
                "nothing to save: call save_state_dict_async_plan(state_dict, writer) before scheduling the save"
            )
        self._pending = None
        tensors: dict[int, torch.Tensor] = {}
        inline: list[tuple[int, bytes]] = []
        offsets: dict[int, int] = {}
        # A large tensor's bytes sit in the slot at their offset in the file modulo O_DIRECT's block,
        # so the worker writes them straight from the slot (see data_positions); the rest 64-aligned.
        in_file = {} if self.extensions else data_positions(p.files, p.items)
        off = 0
        for i, (it, d) in enumerate(zip(p.items, p.data)):
            f = in_file.get(i)
            off += (f - off) % BLOCK if f is not None else -off % ALIGN
            it.slot_offset = offsets[i] = off
            if it.kind == "bytes":
                inline.append((off, d))
            elif it.nbytes == 0:
                pass
            elif d.device.type == "cpu" and it.nbytes <= INLINE_MAX:
                inline.append((off, tensor_bytes(d)))  # small: copied now, consistent at once
            else:
                tensors[i] = d
            off += it.nbytes
        if any(t.is_cuda for t in tensors.values()):
            torch.cuda.current_stream().synchronize()  # kernels writing the state must finish before IPC reads it
        named = [(p.items[i].fqn, t) for i, t in tensors.items()]
        registry = _registry_for(queue) if queue is not None else _DcpRegistry()
        refs, new, release = registry.prepare(tensors)
        spec = SnapshotSpec(nbytes=off, copies=[(offsets[i], r) for i, r in refs.items()], inline=inline,
                            new_storages=new, release=release, ephemeral=queue is None)
        job = SaveJob(
            root=self.root, name=self.name, rank=p.rank, world_size=p.world_size, step=None,
            entries=[], tree=ValueNode(value=None), data_nbytes=off, chunk_size=self.chunk_size,
            io_concurrency=self.io_concurrency, storage_options=self.storage_options,
        )
        return DcpJob(save=job, items=p.items, files=p.files, save_id=p.save_id, snapshot=spec,
                      overwrite=self.overwrite if self.deferred_target else None,
                      per_rank=not self.use_collectives, extensions=list(self.extensions), uri=self.uri), named

    def get_save_function_and_args(self, queue: AsyncCallsQueue | None = None) -> tuple[Any, Any, list[Any]]:
        """Return ``(save_fn, preload_fn, args)`` for ``AsyncRequest(save_fn, args, finalize_fns, preload_fn=preload_fn)``.

        nvidia-resiliency-ext's form: in the worker, ``preload_fn()`` snapshots the tensors into
        staging memory and its result replaces ``args[1]``; ``schedule_async_request`` returns
        once it ran. ``(None, None, [])`` when this rank has nothing to write. Pass the
        ``queue`` the request will be scheduled on so storages are shared once, not sent with
        every save.
        """
        if self._pending is not None and not self._pending.items:
            self._pending = None
            return None, None, []
        job, _ = self.prepare_job(queue)
        return dcp_save, functools.partial(dcp_preload, job), [job, None]

    def retrieve_write_results(self) -> list[WriteResult]:
        """This rank's WriteResults of the last save, read back from its checksum record (NVRx's
        call; reads storage, so call it after the save finished, not in the training loop)."""
        p = self._last
        if p is None or not p.items:
            return []
        storage = self._storage()
        try:
            generation = run_sync(committed_generation(storage, self.name)) if self.use_collectives else None
            key = join_key(self.name, rank_record_file(p.rank, generation or 0))
            blob = run_sync(storage.read(key))
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(f"{storage.uri}/{key}: no write results: the save did not finish") from exc
        finally:
            run_sync(storage.close())
        rec = decode_rank_record(blob, f"{storage.uri}/{key}")
        return _write_results(rec.items, item_transforms(rec))

    # -- synchronous path (plain dcp.save) --------------------------------------------------------
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's files now, in this process (what plain ``dcp.save`` calls)."""
        self.prepare_write_data(plan, planner)
        p = self._pending
        assert p is not None
        self._pending = None
        storage = self._storage()
        loop = _get_loop()
        try:
            generation = 0 if not self.use_collectives else run_sync(next_generation(storage, self.name))
            frs, recs, trs = [], [], []
            for f in p.files:
                fr, its, ts = write_file(
                    loop, storage, self.name, FileSpec(generation_name(f.name, generation), f.items), p.items,
                    lambda i: p.data[i] if p.items[i].kind == "bytes" else exact_cpu_tensor(p.data[i]),
                    chunk_size=self.chunk_size, concurrency=self.io_concurrency, extensions=self.extensions,
                )
                frs.append(fr)
                recs += its
                trs += ts
            record = RankRecord(DCP_FORMAT, record_version(trs), p.save_id, p.rank, CHECKSUM_ALGO, frs, recs,
                                time.time(), transforms=trs if any(trs) else None)
            run_sync(storage.put_record(join_key(self.name, rank_record_file(p.rank, generation)), encode_record(record)))
        finally:
            run_sync(storage.close())
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(_write_results(recs, trs))
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """After every rank wrote (coordinator; every rank without collectives): commit."""
        if self.use_collectives:
            self.commit(metadata, world_size=len(results), save_id=None)
        else:
            self.commit(metadata, world_size=1, save_id=None)

    def commit_op(self, metadata: Metadata, *, world_size: int, save_id: str | None) -> DcpCommitOp:
        """The control-lane step that commits this checkpoint in the worker."""
        per_rank = None if self.use_collectives else self.rank
        return DcpCommitOp(
            root=self.root, name=self.name, metadata=pickle.dumps(metadata),
            ranks=list(range(world_size)) if per_rank is None else [per_rank], save_id=save_id,
            checkpoint_id=self.uri, storage_options=self.storage_options,
            update_latest=self.update_latest and per_rank is None, per_rank=per_rank,
        )

    def extra_files_op(self, files: dict[str, bytes]) -> DcpExtraFilesOp:
        """The control-lane step that writes ``files`` into this checkpoint's directory after its commit."""
        return DcpExtraFilesOp(root=self.root, name=self.name, files=check_extra_files(files, self.uri),
                               storage_options=self.storage_options)

    def commit(self, metadata: Metadata, *, world_size: int, save_id: str | None) -> Metadata:
        """Write the checkpoint's index, ``.metadata`` (its DCP commit point) and COMMIT record, here."""
        per_rank = None if self.use_collectives else self.rank
        storage = self._storage()
        try:
            return run_sync(
                commit_dcp(storage, self.name, metadata,
                           ranks=list(range(world_size)) if per_rank is None else [per_rank],
                           save_id=save_id or (self._last.save_id if self._last is not None else None),
                           checkpoint_id=self.uri, update_latest=self.update_latest and per_rank is None,
                           per_rank=per_rank)
            )
        finally:
            run_sync(storage.close())


def _check_tensor(fqn: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise BadInputError(f"{fqn}: the planner resolved a tensor item to {type(t).__name__}, not a tensor")
    if t.layout != torch.strided or t.is_quantized:
        raise BadInputError(f"{fqn}: {t.layout} / quantized tensors are not supported; save dense tensors")
    if t.device.type not in ("cpu", "cuda"):
        raise BadInputError(f"{fqn}: tensors on {t.device} are not supported (cpu and cuda are)")
    return t


def _write_results(items: list[Any], transforms: list[list[str] | None]) -> list[WriteResult]:
    return [
        WriteResult(
            index=MetadataIndex(r.fqn, r.chunk_offset, r.index),
            size_in_bytes=r.length,
            storage_data=_StorageInfo(r.file, r.offset, r.length, transform_descriptors=list(t) if t else None),
        )
        for r, t in zip(items, transforms)
    ]
