"""AsyncStorageWriter: a DCP StorageWriter whose writes run on asyncckpt's persistent worker."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import os
import pickle
import time
import uuid
import weakref
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .._loop import _get_loop, run_sync
from ..catalog import set_latest
from ..engine import SaveJob
from ..errors import BadInputError, CheckpointExistsError, CheckpointNotFoundError, FormatError, IntegrityError
from ..format import (
    ALIGN,
    CHECKSUM_ALGO,
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    CommitRecord,
    Entry,
    ManifestRef,
    ValueNode,
    checksum,
    encode_commit,
)
from ..plan import INLINE_MAX, _tensor_bytes
from ..queue import AsyncCallsQueue
from ..staging import SharedRegistry
from ..storage import LocalStorage, Storage, join_key, open_storage, split_uri
from ._format import (
    CHECKSUMS_FILE,
    DCP_FORMAT,
    DCP_FORMAT_VERSION,
    METADATA_FILE,
    IndexRecord,
    RankRecord,
    data_file_name,
    decode_rank_record,
    encode_record,
    rank_record_file,
)
from ._io import FileSpec, ItemSpec, exact_cpu_tensor, write_file
from ._worker import DcpJob, dcp_preload, dcp_write

__all__ = ["AsyncStorageWriter"]


@dataclasses.dataclass
class _DcpPlanData:
    """The storage_data of a global save plan: this rank's file prefix and the save's id."""

    prefix: str
    save_id: str


@dataclasses.dataclass
class _Pending:
    items: list[ItemSpec]
    data: list[Any]  # tensors (live, not copied) or bytes
    files: list[FileSpec]
    save_id: str
    rank: int
    world_size: int


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


def _split_files(prefix: str, items: list[ItemSpec], n: int) -> list[FileSpec]:
    """Bucket items into ``n`` files: bytes items round-robin, tensors to the lightest file."""
    n = max(1, n)
    buckets: list[list[int]] = [[] for _ in range(n)]
    sizes = [0] * n
    byte_items = [i for i, it in enumerate(items) if it.kind == "bytes"]
    tensor_items = sorted((i for i, it in enumerate(items) if it.kind != "bytes"), key=lambda i: -items[i].nbytes)
    for k, i in enumerate(byte_items):
        buckets[k % n].append(i)
    for i in tensor_items:
        b = min(range(n), key=sizes.__getitem__)
        buckets[b].append(i)
        sizes[b] += items[i].nbytes
    return [FileSpec(data_file_name(prefix, j), sorted(b)) for j, b in enumerate(buckets) if b or j == 0]


class AsyncStorageWriter(StorageWriter):
    """A DCP StorageWriter for a local directory or ``s3://bucket/prefix/NAME``.

    Used with :func:`~asyncckpt.dcp.save_state_dict_async_plan`, its writes become an
    ``AsyncRequest`` for asyncckpt's persistent worker (:meth:`get_save_function_and_args`):
    the worker snapshots the tensors into its staging memory, then writes the files. Used
    with plain ``dcp.save`` it writes synchronously in this process. Either way the result is
    a DCP checkpoint that ``torch.distributed.checkpoint.load`` reads with its stock
    ``FileSystemReader`` (when local), plus CRC32C records that
    :class:`~asyncckpt.dcp.AsyncStorageReader` verifies.

    Args:
        path: checkpoint directory or ``s3://bucket/prefix/NAME``.
        overwrite: replace an existing checkpoint there (its ``.metadata`` is removed at
            planning time, before any new byte is written); ``False`` raises instead.
        files_per_rank: data files per rank (written in parallel by the worker).
        chunk_size / io_concurrency: part size of the streamed writes and parts in flight.
        storage_options: passed to the storage backend (e.g. ``endpoint_url`` for S3).
        update_latest: also point the parent's ``latest`` record at this checkpoint.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = True,
        files_per_rank: int = 1,
        chunk_size: int = 32 << 20,
        io_concurrency: int = 4,
        storage_options: dict[str, Any] | None = None,
        update_latest: bool = False,
    ) -> None:
        super().__init__()
        if files_per_rank < 1:
            raise BadInputError(f"files_per_rank must be >= 1, got {files_per_rank}")
        if chunk_size < (5 << 20) or chunk_size > (5 << 30):
            raise BadInputError(f"chunk_size must be between 5 MiB and 5 GiB, got {chunk_size}")
        if io_concurrency < 1:
            raise BadInputError(f"io_concurrency must be >= 1, got {io_concurrency}")
        self.overwrite = overwrite
        self.files_per_rank = files_per_rank
        self.chunk_size = chunk_size
        self.io_concurrency = io_concurrency
        self.storage_options = dict(storage_options or {})
        self.update_latest = update_latest
        self.is_coordinator = False
        self.rank = 0
        self._pending: _Pending | None = None
        self._set_path(path)
        self.save_id = str(uuid.uuid4())

    # -- paths ----------------------------------------------------------------------------------
    def _set_path(self, path: str | os.PathLike[str]) -> None:
        p = os.fspath(path)
        if "://" not in p:
            p = os.path.abspath(p)
        self._path = path
        self.root, self.name = split_uri(p)
        st = open_storage(self.root)
        if isinstance(st, LocalStorage):
            self.root = str(st.root)  # the worker must not depend on our working directory
        self.uri = p

    def _storage(self) -> Storage:
        return open_storage(self.root, **self.storage_options)

    @property
    def checkpoint_id(self) -> str | os.PathLike[str]:
        return self._path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        p = os.fspath(checkpoint_id)
        return "://" not in p or p.startswith(("s3://", "file://"))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.uri, save_id=self.save_id)

    # -- StorageWriter protocol -------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self._set_path(checkpoint_id)
        self.save_id = str(uuid.uuid4())

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        rank = kwargs.get("rank")
        self.rank = int(rank) if rank is not None else 0
        if kwargs.get("use_collectives", True) is False:
            raise BadInputError("AsyncStorageWriter needs use_collectives=True (one .metadata written by the coordinator)")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self.is_coordinator:
            run_sync(self._prepare_target())
        return plan

    async def _prepare_target(self) -> None:
        if "://" not in self.root:
            from ..checkpointer import _check_local_writable

            _check_local_writable(self.root)
        storage = self._storage()
        try:
            existing = [k for k in (COMMIT_FILE, METADATA_FILE) if await storage.exists(join_key(self.name, k))]
            if existing and not self.overwrite:
                raise CheckpointExistsError(
                    f"{self.uri} already holds a DCP checkpoint ({', '.join(existing)}); "
                    "pass overwrite=True to AsyncStorageWriter to replace it"
                )
            # Commit point first, so a crash from here on never shows old metadata over new data.
            for k in (COMMIT_FILE, METADATA_FILE, CHECKSUMS_FILE):
                await storage.delete(join_key(self.name, k))
        finally:
            await storage.close()

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=_DcpPlanData(f"__{i}_", self.save_id)) for i, p in enumerate(plans)]

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
            t = planner.resolve_data(wi)
            if not isinstance(t, torch.Tensor):
                raise BadInputError(f"{idx.fqn}: the planner resolved a tensor item to {type(t).__name__}, not a tensor")
            if t.layout != torch.strided or t.is_quantized:
                raise BadInputError(f"{idx.fqn}: {t.layout} / quantized tensors are not supported; save dense tensors")
            if t.device.type not in ("cpu", "cuda"):
                raise BadInputError(f"{idx.fqn}: tensors on {t.device} are not supported (cpu and cuda are)")
            t = t.detach()
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
        prefix = sd.prefix if isinstance(sd, _DcpPlanData) else f"__{self.rank}_"
        save_id = save_id or (sd.save_id if isinstance(sd, _DcpPlanData) else self.save_id)
        items, data = self._collect(plan, planner)
        files = _split_files(prefix, items, self.files_per_rank)
        self._pending = _Pending(items, data, files, save_id, self.rank, world_size)

    def get_save_function_and_args(self, queue: AsyncCallsQueue | None = None) -> tuple[Any, Any, tuple[Any, ...]]:
        """Return ``(save_fn, preload_fn, args)`` for ``AsyncRequest(save_fn, args, preload_fn=preload_fn)``.

        Pass the ``queue`` the request will be scheduled on: tensors are then moved to shared
        memory once and only their ids are sent on later saves. Without it, every save sends
        every storage afresh (correct on any queue, slower for many tensors). Call
        ``queue.wait_snapshot()`` before mutating the state.
        """
        p = self._pending
        if p is None:
            raise BadInputError(
                "nothing to save: call save_state_dict_async_plan(state_dict, writer) before get_save_function_and_args"
            )
        self._pending = None
        entries: list[Entry] = []
        tensors: dict[int, torch.Tensor] = {}
        inline: dict[int, bytes] = {}
        off = 0
        for i, (it, d) in enumerate(zip(p.items, p.data)):
            off = -(-off // ALIGN) * ALIGN
            it.slot_offset = off
            kind = "pickle" if it.kind == "bytes" else "tensor"
            dtype = "bytes" if it.dtype is None else str(it.dtype).removeprefix("torch.")
            entries.append(Entry(key=it.fqn, kind=kind, dtype=dtype, shape=list(it.shape), offset=off, nbytes=it.nbytes))
            if it.kind == "bytes":
                inline[i] = d
            elif it.nbytes == 0:
                pass
            elif d.device.type == "cpu" and it.nbytes <= INLINE_MAX:
                inline[i] = _tensor_bytes(d)  # small: copied now, consistent at once
            else:
                tensors[i] = d
            off += it.nbytes
        if any(t.is_cuda for t in tensors.values()):
            torch.cuda.current_stream().synchronize()  # kernels writing the state must finish before IPC reads it
        registry = _registry_for(queue) if queue is not None else _DcpRegistry()
        refs, new, release = registry.prepare(tensors)
        job = SaveJob(
            root=self.root, name=self.name, rank=p.rank, world_size=p.world_size, step=None,
            entries=entries, tree=ValueNode(value=None), data_nbytes=off, refs=refs, inline=inline,
            new_storages=new, release=release, chunk_size=self.chunk_size, io_concurrency=self.io_concurrency,
            storage_options=self.storage_options,
        )
        dj = DcpJob(save=job, items=p.items, files=p.files, save_id=p.save_id, ephemeral=queue is None)
        return dcp_write, dcp_preload, (dj,)

    # -- synchronous path (plain dcp.save) --------------------------------------------------------
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's files now, in this process (what plain ``dcp.save`` calls)."""
        self.prepare_write_data(plan, planner)
        p = self._pending
        assert p is not None
        self._pending = None
        storage = self._storage()
        loop = _get_loop()
        results: list[WriteResult] = []
        try:
            frs, recs = [], []
            for f in p.files:
                fr, its = write_file(
                    loop, storage, self.name, f, p.items,
                    lambda i: p.data[i] if p.items[i].kind == "bytes" else exact_cpu_tensor(p.data[i]),
                    chunk_size=self.chunk_size, concurrency=self.io_concurrency,
                )
                frs.append(fr)
                recs += its
            record = RankRecord(DCP_FORMAT, DCP_FORMAT_VERSION, p.save_id, p.rank, CHECKSUM_ALGO, frs, recs, time.time())
            run_sync(storage.put_record(join_key(self.name, rank_record_file(p.rank)), encode_record(record)))
        finally:
            run_sync(storage.close())
        for r in recs:
            results.append(
                WriteResult(
                    index=MetadataIndex(r.fqn, r.chunk_offset, r.index),
                    size_in_bytes=r.length,
                    storage_data=_StorageInfo(r.file, r.offset, r.length),
                )
            )
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator, after every rank wrote: checksum index, ``.metadata``, commit record."""
        self.commit(metadata, world_size=len(results), save_id=None)

    def commit(self, metadata: Metadata, *, world_size: int, save_id: str | None) -> Metadata:
        """Write the checkpoint's index, ``.metadata`` (its DCP commit point) and COMMIT record."""
        storage = self._storage()
        try:
            return run_sync(
                _commit_dcp(storage, self.name, metadata, world_size=world_size, save_id=save_id,
                            checkpoint_id=self.uri, update_latest=self.update_latest)
            )
        finally:
            run_sync(storage.close())


async def _commit_dcp(
    storage: Storage,
    name: str,
    metadata: Metadata,
    *,
    world_size: int,
    save_id: str | None,
    checkpoint_id: str,
    update_latest: bool,
) -> Metadata:
    keys = [join_key(name, rank_record_file(r)) for r in range(world_size)]

    async def read(key: str) -> bytes:
        try:
            return await storage.read(key)
        except CheckpointNotFoundError as exc:
            raise IntegrityError(
                f"{storage.uri}/{key}: a rank's checksum record is missing although every rank reported "
                "its write done; the checkpoint was not committed"
            ) from exc

    blobs = await asyncio.gather(*(read(k) for k in keys))
    records = [decode_rank_record(b, f"{storage.uri}/{k}") for b, k in zip(blobs, keys)]
    storage_data: dict[MetadataIndex, _StorageInfo] = {}
    files, items, refs = [], [], []
    sid = save_id
    for rank, (rec, blob, key) in enumerate(zip(records, blobs, keys)):
        where = f"{storage.uri}/{key}"
        if rec.rank != rank:
            raise FormatError(f"{where}: record belongs to rank {rec.rank}, not {rank}")
        if sid is None:
            sid = rec.save_id
        if rec.save_id != sid:
            raise IntegrityError(
                f"{where}: record is from save {rec.save_id}, not {sid} (a stale file of an earlier save?); "
                "the checkpoint was not committed"
            )
        for it in rec.items:
            storage_data[MetadataIndex(it.fqn, it.chunk_offset, it.index)] = _StorageInfo(it.file, it.offset, it.length)
        files += rec.files
        items += rec.items
        refs.append(ManifestRef(rank=rank, file=rank_record_file(rank), nbytes=len(blob), checksum=checksum(blob),
                                data_nbytes=sum(f.nbytes for f in rec.files)))
    for fqn, smd in metadata.state_dict_metadata.items():
        if isinstance(smd, TensorStorageMetadata):
            missing = [c.offsets for c in smd.chunks if MetadataIndex(fqn, c.offsets) not in storage_data]
        elif isinstance(smd, BytesStorageMetadata):
            missing = [] if MetadataIndex(fqn) in storage_data else ["<bytes>"]
        else:
            missing = []
        if missing:
            raise IntegrityError(
                f"{storage.uri}/{name}: no rank wrote {fqn!r} (chunks {missing[:4]}); the checkpoint was not committed"
            )
    md = dataclasses.replace(
        metadata,
        storage_data=storage_data,
        version=CURRENT_DCP_VERSION,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=sid),
    )
    blob = pickle.dumps(md)
    index = IndexRecord(
        format=DCP_FORMAT, version=DCP_FORMAT_VERSION, save_id=sid or "", world_size=world_size,
        checksum_algo=CHECKSUM_ALGO, metadata_nbytes=len(blob), metadata_crc32c=checksum(blob),
        files=files, items=items, created=time.time(),
    )
    await storage.put_record(join_key(name, CHECKSUMS_FILE), encode_record(index))
    await storage.put_record(join_key(name, METADATA_FILE), blob)
    total = sum(f.nbytes for f in files) + sum(r.nbytes for r in refs) + len(blob)
    commit = CommitRecord(
        format=FORMAT_NAME, version=FORMAT_VERSION, name=name, step=None, world_size=world_size,
        created=time.time(), total_nbytes=total, checksum_algo=CHECKSUM_ALGO, manifests=refs, kind="dcp",
    )
    await storage.put_record(join_key(name, COMMIT_FILE), encode_commit(commit))
    if update_latest:
        await set_latest(storage, name, None)
    return md

