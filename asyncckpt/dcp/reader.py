"""AsyncStorageReader: a DCP StorageReader over asyncckpt's storage backends (local, S3, ...).

Items are fetched with parallel ranged reads (neighbouring items of a file in one read), each
item's CRC32C is checked against the checkpoint's ``.checksums`` index before it is decoded,
and the decoded tensor is narrowed to what the load plan asks for, so a checkpoint saved by N
ranks loads into M ranks (DCP's planner maps the chunks; this reader serves the byte ranges).
"""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import Generator
from concurrent.futures import Future as _CFuture
from dataclasses import dataclass
from typing import IO, Any, cast

import numpy as np
import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .._loop import _get_loop, gather_or_cancel, run_sync
from ..errors import BadInputError, CheckpointNotFoundError, FormatError, IntegrityError
from ..format import checksum
from ..format.chunks import read_buffer
from ..storage import Storage, join_key, open_storage, split_uri
from ._commit import committed_generation
from ._direct import HEAD_BYTES, TAIL_BYTES, data_record, tensor_layout
from ._format import (
    CHECKSUMS_FILE,
    IndexRecord,
    decode_index,
    index_file,
    load_metadata,
    metadata_file,
    rank_index_file,
    rank_metadata_file,
)

__all__ = ["SAFE_LEAF_TYPES", "AsyncStorageReader"]

#: Non-tensor values DCP stores as pickled bytes items that load without ``allow_pickle`` (beyond
#: what torch's weights-only unpickler accepts anyway: numbers, strings, containers, torch.Size,
#: dtypes): ``io.BytesIO``, a DCP leaf type.
SAFE_LEAF_TYPES: list[Any] = [io.BytesIO]

_SWITCH_RETRIES = 8  # overwrites followed within one load before giving up
_DIRECT_MIN = 1 << 20  # items at least this large are read straight into their destination where they can be


class _MemReader(io.RawIOBase):
    """A seekable read-only stream over a memoryview (no copy), for torch.load."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._v = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._v)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), len(self._v) - self._pos))
        out[:n] = self._v[self._pos : self._pos + n]
        self._pos += n
        return n


@dataclass
class _Range:
    """One ranged read: ``[start, end)`` of ``file``, covering the storage items in ``members``."""

    file: str
    start: int
    end: int
    members: list[tuple[MetadataIndex, int, int]]  # (storage index, offset, length)


def _mismatch(where: str, sidx: MetadataIndex, off: int, length: int, crc: int, expected: int) -> IntegrityError:
    return IntegrityError(
        f"{where}: checksum mismatch in item {sidx.fqn!r} (chunk offset "
        f"{list(sidx.offset) if sidx.offset is not None else None}, bytes [{off}, {off + length}); "
        f"crc32c {crc:#010x}, expected {expected:#010x}). The checkpoint is corrupt: load an older one."
    )


class AsyncStorageReader(StorageReader):
    """Read a DCP checkpoint from a local directory, ``s3://bucket/prefix/NAME`` or any asyncckpt Storage.

    Args:
        path: the checkpoint (directory or URI).
        _extension_registry: as ``FileSystemReader``'s: where the stream extensions named in
            ``.metadata`` (``stream.zstd/1``, your own) are looked up (default: DCP's registry).
        verify: check every item's CRC32C and the metadata's against ``.checksums`` (written by
            :class:`AsyncStorageWriter`). A checkpoint without one (written by another writer)
            needs ``verify=False``.
        allow_pickle: unpickle ``.metadata`` without restriction and decode bytes items (DCP
            stores non-tensor values as pickles) even when they reference arbitrary classes.
            By default only DCP's metadata classes, and bytes items that torch's weights-only
            unpickler accepts (numbers, strings, containers, tensors), are loaded.
        read_concurrency: ranged reads in flight. chunk_size: large items are read in pieces
            of this size, in parallel. coalesce_gap: neighbouring items of one file closer
            than this are fetched in one read. max_inflight_bytes: bytes read but not yet
            decoded, at most (one item larger than it is read alone).
        storage_options: passed to the backend (e.g. ``endpoint_url`` for S3).
        storage: read through this backend instead (e.g. a tiered one); its root must be the
            checkpoint's parent (keys are ``NAME/<file>``, NAME being the path's last part).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        _extension_registry: Any = None,
        *,
        verify: bool = True,
        allow_pickle: bool = False,
        read_concurrency: int = 8,
        chunk_size: int = 16 << 20,
        coalesce_gap: int = 1 << 20,
        max_inflight_bytes: int = 512 << 20,
        storage_options: dict[str, Any] | None = None,
        storage: Storage | None = None,
    ) -> None:
        super().__init__()
        if read_concurrency < 1 or chunk_size < 1 or coalesce_gap < 0 or max_inflight_bytes < 1:
            raise BadInputError("read_concurrency, chunk_size and max_inflight_bytes must be >= 1, coalesce_gap >= 0")
        self.verify = verify
        self.allow_pickle = allow_pickle
        self.read_concurrency = read_concurrency
        self.chunk_size = chunk_size
        self.coalesce_gap = coalesce_gap
        self.max_inflight_bytes = max_inflight_bytes
        self.storage_options = dict(storage_options or {})
        self._given_storage = storage
        if _extension_registry is None:
            from torch.distributed.checkpoint._extension import ExtensionRegistry

            _extension_registry = ExtensionRegistry()
        elif not callable(getattr(_extension_registry, "from_descriptor_list", None)):
            raise BadInputError(
                f"_extension_registry must be a DCP ExtensionRegistry, got {type(_extension_registry).__name__}"
            )
        self.extension_registry = _extension_registry
        self.rank: int | None = None
        self.use_collectives = True
        self.storage_data: dict[MetadataIndex, Any] = {}
        self._crcs: dict[tuple[str, int, int], int] = {}
        self._generation: int | None = None  # the committed generation the metadata was read from
        self._metadata: Metadata | None = None
        self.load_id = str(uuid.uuid4())
        self._set_path(path)

    def _set_path(self, path: str | os.PathLike[str]) -> None:
        p = os.fspath(path)
        if "://" not in p:
            p = os.path.abspath(p)
        self._path = path
        self.uri = p
        self.root, self.name = split_uri(p)

    def _storage(self) -> Storage:
        if self._given_storage is not None:
            return self._given_storage
        return open_storage(self.root, **self.storage_options)

    async def _close(self, storage: Storage) -> None:
        if storage is not self._given_storage:
            await storage.close()

    @property
    def checkpoint_id(self) -> str | os.PathLike[str]:
        return self._path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        p = os.fspath(checkpoint_id)
        from ..storage import supports_uri  # the registry knows every scheme, plug-ins included

        return supports_uri(p)

    # -- StorageReader protocol -------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}
        self._crcs = {}
        if checkpoint_id:
            self._set_path(checkpoint_id)
        self.load_id = str(uuid.uuid4())

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's Metadata (``rank=R``: rank R's own, of a save without collectives)."""
        md, index = run_sync(self._read_metadata(kwargs.get("rank")))
        self._set_index(index)
        self._metadata = md
        meta = getattr(md, "storage_meta", None)
        if meta is None:
            meta = md.storage_meta = StorageMeta()
        meta.load_id = self.load_id
        return md

    async def _read_metadata(self, rank: int | None) -> tuple[Metadata, IndexRecord | None]:
        storage = self._storage()
        try:
            if rank is not None:
                return await self._read_generation(storage, rank_metadata_file(rank), rank_index_file(rank))
            # COMMIT names the generation; an overwrite committing meanwhile replaces the files just
            # named, so a read that finds them gone or mismatched follows the new COMMIT.
            generation = await committed_generation(storage, self.name)
            for _ in range(_SWITCH_RETRIES):
                try:
                    got = await self._read_generation(storage, metadata_file(generation or 0),
                                                      index_file(generation or 0))
                except (CheckpointNotFoundError, IntegrityError):
                    now = await committed_generation(storage, self.name)
                    if now == generation:
                        raise
                    generation = now
                    continue
                self._generation = generation
                return got
            raise IntegrityError(f"{self.uri}: the checkpoint was replaced {_SWITCH_RETRIES} times while its "
                                 "metadata was read; load it again when its overwrites pause")
        finally:
            await self._close(storage)

    async def _read_generation(self, storage: Storage, mfile: str, ifile: str) -> tuple[Metadata, IndexRecord | None]:
        mkey, ikey = join_key(self.name, mfile), join_key(self.name, ifile)
        where = f"{storage.uri}/{mkey}"
        try:
            blob = await storage.read(mkey)
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"{where} does not exist: {self.uri} is not a complete DCP checkpoint "
                "(it does not exist or its save did not finish)"
            ) from exc
        index = None
        if self.verify:
            try:
                iblob = await storage.read(ikey)
            except CheckpointNotFoundError as exc:
                raise IntegrityError(
                    f"{storage.uri}/{ikey} is missing: {self.uri} has no checksums to verify (written by "
                    "another writer?). Pass verify=False to AsyncStorageReader to load it unverified."
                ) from exc
            index = decode_index(iblob, f"{storage.uri}/{ikey}")
            crc = checksum(blob)
            if len(blob) != index.metadata_nbytes or crc != index.metadata_crc32c:
                raise IntegrityError(
                    f"{where} does not match its checksum ({len(blob)} bytes, crc32c {crc:#010x}; "
                    f"expected {index.metadata_nbytes}, {index.metadata_crc32c:#010x}): the metadata is "
                    "corrupt or belongs to another save. Load an older checkpoint."
                )
        return load_metadata(blob, where, allow_pickle=self.allow_pickle), index

    def _set_index(self, index: IndexRecord | None) -> None:
        self._crcs = {(it.file, it.offset, it.length): it.crc32c for it in index.items} if index is not None else {}

    def _follow_switch(self, exc: CheckpointNotFoundError) -> None:
        """A data file vanished mid-load: if an overwrite committed a new generation with the same
        layout, take its metadata (the caller reads every item again); else raise ``exc``'s story."""
        if self.rank is not None and not self.use_collectives:
            raise exc
        storage = self._storage()
        try:
            now = run_sync(committed_generation(storage, self.name))
        finally:
            run_sync(self._close(storage))
        if now is None or now == self._generation:
            raise exc
        md, index = run_sync(self._read_metadata(None))
        if self._metadata is None or md.state_dict_metadata != self._metadata.state_dict_metadata:
            raise IntegrityError(
                f"{self.uri} was overwritten by a checkpoint of another layout while it was loading "
                f"(generation {self._generation} -> {now}); load it again"
            ) from exc
        self._set_index(index)
        self._metadata = md
        self.storage_data = md.storage_data

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if metadata.storage_data is None:
            raise FormatError(f"{self.uri}: the metadata has no storage_data")
        self.storage_data = metadata.storage_data
        rank = kwargs.get("rank")
        self.rank = int(rank) if rank is not None else None
        self.use_collectives = bool(kwargs.get("use_collectives", True))

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    # -- reading ----------------------------------------------------------------------------------
    def _ranges(self, plan: LoadPlan, skip: set[MetadataIndex] | None = None) -> list[_Range]:
        needed: dict[MetadataIndex, Any] = {}
        for ri in plan.items:
            if skip and ri.storage_index in skip:
                continue
            info = self.storage_data.get(ri.storage_index)
            if info is None:
                raise FormatError(f"{self.uri}: the metadata has no storage entry for {ri.storage_index}")
            needed[ri.storage_index] = info
        by_file: dict[str, list[tuple[MetadataIndex, int, int]]] = {}
        for sidx, info in needed.items():
            by_file.setdefault(info.relative_path, []).append((sidx, int(info.offset), int(info.length)))
        ranges: list[_Range] = []
        for f, members in by_file.items():
            members.sort(key=lambda m: m[1])
            cur: _Range | None = None
            for m in members:
                _, off, length = m
                if (cur is not None and off - cur.end <= self.coalesce_gap and off >= cur.end
                        and off + length - cur.start <= max(self.chunk_size, 1)):
                    cur.end = max(cur.end, off + length)
                    cur.members.append(m)
                else:
                    cur = _Range(f, off, off + length, [m])
                    ranges.append(cur)
        return ranges

    async def _fetch(self, storage: Storage, r: _Range, sem: asyncio.Semaphore) -> np.ndarray:
        key = join_key(self.name, r.file)
        buf = read_buffer(r.end - r.start, r.start)  # placed for direct reads where the backend has them
        view = buf.data

        async def piece(lo: int, hi: int) -> None:
            async with sem:
                await storage.read_into(key, r.start + lo, view[lo:hi])

        n = len(buf)
        await gather_or_cancel(piece(lo, min(n, lo + self.chunk_size)) for lo in range(0, n, self.chunk_size))
        if self.verify:
            await asyncio.to_thread(self._verify, storage, r, buf)
        return buf

    def _verify(self, storage: Storage, r: _Range, buf: np.ndarray) -> None:
        for sidx, off, length in r.members:
            where = f"{storage.uri}/{join_key(self.name, r.file)}"
            expected = self._expected_crc(where, r.file, sidx, off, length)
            crc = checksum(buf.data[off - r.start : off - r.start + length])
            if crc != expected:
                raise _mismatch(where, sidx, off, length, crc, expected)

    def _expected_crc(self, where: str, file: str, sidx: MetadataIndex, off: int, length: int) -> int:
        expected = self._crcs.get((file, off, length))
        if expected is None:
            raise IntegrityError(
                f"{where}: item {sidx.fqn!r} (bytes [{off}, {off + length})) has no checksum in "
                f"{CHECKSUMS_FILE}; the checkpoint's records disagree. Load an older checkpoint."
            )
        return expected

    def _direct_targets(self, reqs: dict[MetadataIndex, list[ReadItem]], planner: LoadPlanner
                        ) -> dict[MetadataIndex, torch.Tensor]:
        """The items worth reading straight into their destination: one whole stored chunk into a
        plain contiguous CPU tensor, no stream transform. Their destinations, resolved once."""
        out: dict[MetadataIndex, torch.Tensor] = {}
        for sidx, items in reqs.items():
            info = self.storage_data.get(sidx)
            ri = items[0]
            if (len(items) != 1 or ri.type != LoadItemType.TENSOR or info is None or int(info.length) < _DIRECT_MIN
                    or getattr(info, "transform_descriptors", None) or any(ri.storage_offsets)):
                continue
            target = planner.resolve_tensor(ri).detach()
            if (target.device.type == "cpu" and target.is_contiguous() and not target.is_quantized
                    and not target.is_conj() and not target.is_neg()
                    and tuple(target.size()) == tuple(ri.lengths) and target.numel()):
                out[sidx] = target
        return out

    async def _read_direct(self, storage: Storage, sidx: MetadataIndex, target: torch.Tensor,
                           sem: asyncio.Semaphore) -> bool:
        """Read item ``sidx``'s tensor bytes straight into ``target``, checking the item's CRC32C over
        its bytes where they landed; False (``target`` untouched) when the item is not laid out for it."""
        info = self.storage_data[sidx]
        file, off, length = info.relative_path, int(info.offset), int(info.length)
        key = join_key(self.name, file)
        tail_start = max(0, length - TAIL_BYTES)
        head = np.empty(min(length, HEAD_BYTES), dtype=np.uint8)
        tail = np.empty(length - tail_start, dtype=np.uint8)
        async with sem:
            await gather_or_cancel([storage.read_into(key, off, head.data),
                                    storage.read_into(key, off + tail_start, tail.data)])
        rec = data_record(tail.tobytes(), tail_start)
        lay = tensor_layout(head.tobytes(), rec, target.dtype, tuple(target.size())) if rec is not None else None
        if lay is None or lay.start > len(head) or lay.start + lay.nbytes < tail_start:
            return False
        dest = target.reshape(-1).view(torch.uint8).numpy()
        view = dest.data

        async def piece(lo: int, hi: int) -> None:
            async with sem:
                await storage.read_into(key, off + lay.start + lo, view[lo:hi])

        await gather_or_cancel(piece(lo, min(lay.nbytes, lo + self.chunk_size))
                               for lo in range(0, lay.nbytes, self.chunk_size))
        if self.verify:
            where = f"{storage.uri}/{key}"
            expected = self._expected_crc(where, file, sidx, off, length)

            def crc() -> int:
                c = checksum(head.data[: lay.start])
                c = checksum(view, c)
                return checksum(tail.data[lay.start + lay.nbytes - tail_start :], c)

            got = await asyncio.to_thread(crc)
            if got != expected:
                raise _mismatch(where, sidx, off, length, got, expected)
        return True

    async def _read_all_direct(self, storage: Storage, targets: dict[MetadataIndex, torch.Tensor]
                               ) -> set[MetadataIndex]:
        """Read the ``targets`` items straight into place, several at once; those read that way."""
        sem = asyncio.Semaphore(self.read_concurrency)
        done: set[MetadataIndex] = set()

        async def one(sidx: MetadataIndex, target: torch.Tensor) -> None:
            if await self._read_direct(storage, sidx, target, sem):
                done.add(sidx)

        await gather_or_cancel(one(sidx, t) for sidx, t in targets.items())
        return done

    def _batches(self, storage: Storage, ranges: list[_Range]) -> Generator[tuple[_Range, np.ndarray], None, None]:
        """Yield fetched ranges in order; at most ``max_inflight_bytes`` (or one range) ahead."""
        loop = _get_loop()
        sem_holder: dict[str, asyncio.Semaphore] = {}

        async def fetch(r: _Range) -> np.ndarray:
            sem = sem_holder.get("s")
            if sem is None:
                sem = sem_holder["s"] = asyncio.Semaphore(self.read_concurrency)
            return await self._fetch(storage, r, sem)

        inflight: list[tuple[_Range, _CFuture[np.ndarray]]] = []
        inflight_bytes = 0
        i = 0
        try:
            while i < len(ranges) or inflight:
                while i < len(ranges) and (not inflight or inflight_bytes + (ranges[i].end - ranges[i].start) <= self.max_inflight_bytes):
                    r = ranges[i]
                    inflight.append((r, asyncio.run_coroutine_threadsafe(fetch(r), loop)))
                    inflight_bytes += r.end - r.start
                    i += 1
                r, fut = inflight.pop(0)
                buf = fut.result()
                inflight_bytes -= r.end - r.start
                yield r, buf
        finally:
            for _, fut in inflight:
                fut.cancel()

    def _untransform(self, where: str, sidx: MetadataIndex, raw: memoryview) -> Any:
        """The item's bytes with its stream transforms undone (``raw`` itself when it has none)."""
        descriptors = getattr(self.storage_data.get(sidx), "transform_descriptors", None)
        if not descriptors:
            return raw
        try:
            extensions = self.extension_registry.from_descriptor_list(descriptors)
        except Exception as exc:
            raise FormatError(
                f"{where}: item {sidx.fqn!r} was written through the stream transform(s) {list(descriptors)}, which "
                f"cannot be undone here ({type(exc).__name__}: {exc}). Register the extension's class in a DCP "
                "ExtensionRegistry and pass it as _extension_registry, or install what it needs (e.g. zstandard)."
            ) from exc
        stream: Any = _MemReader(raw)
        for ex in extensions:
            if callable(getattr(ex, "transform_from", None)):
                stream = ex.transform_from(stream)
        try:
            chunks = []
            while True:
                b = stream.read(1 << 20)
                if not b:
                    break
                chunks.append(b)
        except Exception as exc:
            raise IntegrityError(
                f"{where}: item {sidx.fqn!r} cannot be decoded by its stream transform(s) {list(descriptors)} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return memoryview(b"".join(chunks))

    def _check_bytes_item(self, where: str, sidx: MetadataIndex, raw: memoryview) -> None:
        if self.allow_pickle:
            return
        try:
            with torch.serialization.safe_globals(SAFE_LEAF_TYPES):  # DCP's leaf types besides tensors
                torch.load(cast(IO[bytes], _MemReader(raw)), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BadInputError(
                f"{where}: item {sidx.fqn!r} holds a pickled object that torch's weights-only loader refuses "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); loading it could run code. "
                "Pass allow_pickle=True to AsyncStorageReader only if you trust this checkpoint."
            ) from exc

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        # Every item is read again from the new generation when an overwrite replaced the files
        # mid-load, so the state loaded is the whole old or the whole new checkpoint.
        for attempt in range(_SWITCH_RETRIES):
            try:
                self._read_plan(plan, planner)
                break
            except CheckpointNotFoundError as exc:
                if attempt == _SWITCH_RETRIES - 1:
                    raise
                self._follow_switch(exc)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_plan(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        reqs: dict[MetadataIndex, list[ReadItem]] = {}
        for ri in plan.items:
            reqs.setdefault(ri.storage_index, []).append(ri)
        storage = self._storage()
        try:
            targets = self._direct_targets(reqs, planner)
            direct = run_sync(self._read_all_direct(storage, targets)) if targets else set()
        except BaseException:
            run_sync(self._close(storage))
            raise
        for sidx in direct:
            planner.commit_tensor(reqs[sidx][0], targets[sidx])
        batches = self._batches(storage, self._ranges(plan, direct))
        try:
            for r, buf in batches:
                where = f"{storage.uri}/{join_key(self.name, r.file)}"
                for sidx, off, length in r.members:
                    raw = self._untransform(where, sidx, buf.data[off - r.start : off - r.start + length])
                    items = reqs[sidx]
                    if items[0].type == LoadItemType.BYTE_IO:
                        self._check_bytes_item(where, sidx, raw)
                        for ri in items:
                            planner.load_bytes(ri, io.BytesIO(bytes(raw)))
                        continue
                    try:
                        tensor = torch.load(cast(IO[bytes], _MemReader(raw)), map_location="cpu", weights_only=True)
                    except Exception as exc:
                        raise IntegrityError(
                            f"{where}: item {sidx.fqn!r} at bytes [{off}, {off + length}) is not a readable tensor "
                            f"({type(exc).__name__}: {exc})"
                        ) from exc
                    if not isinstance(tensor, torch.Tensor):
                        raise FormatError(f"{where}: item {sidx.fqn!r} holds a {type(tensor).__name__}, not a tensor")
                    for ri in items:
                        part = narrow_tensor_by_index(tensor, ri.storage_offsets, ri.lengths)
                        resolved = targets.get(sidx)  # resolved once, for the direct read it did not get
                        target = resolved if resolved is not None else planner.resolve_tensor(ri).detach()
                        if target.size() != part.size():
                            raise FormatError(
                                f"{where}: item {sidx.fqn!r}: the load plan wants a {tuple(target.size())} slice, "
                                f"the stored chunk gives {tuple(part.size())}"
                            )
                        target.copy_(part)
                        planner.commit_tensor(ri, target)
                    del tensor
        finally:
            batches.close()  # cancel reads still in flight before the storage is closed
            run_sync(self._close(storage))
