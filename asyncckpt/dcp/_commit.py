"""The DCP commit and the preparation of a checkpoint's directory, as storage coroutines.

Both run in the worker for asynchronous saves: :class:`DcpCommitOp` is the control-lane step
that commits a DCP checkpoint once every rank wrote its part (checksum index, ``.metadata`` -
DCP's commit point -, the COMMIT record, ``latest``), and :func:`prepare_target` runs in each
rank's worker before it writes (refuse an existing checkpoint, or remove its commit point
first). A synchronous ``dcp.save`` through :class:`~asyncckpt.dcp.AsyncStorageWriter` runs the
same coroutines from the calling process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..catalog import drop_stale_writes, set_latest
from ..errors import (
    BadInputError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
)
from ..format import (
    CHECKSUM_ALGO,
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    CommitRecord,
    ManifestRef,
    checksum,
    decode_commit,
    encode_commit,
)
from ..storage import Storage, join_key
from ._format import (
    CHECKSUMS_FILE,
    DCP_FORMAT,
    DCP_KIND,
    METADATA_FILE,
    IndexRecord,
    decode_rank_record,
    encode_record,
    index_file,
    is_dcp_file,
    item_transforms,
    metadata_file,
    rank_index_file,
    rank_metadata_file,
    rank_record_file,
    record_version,
)

if TYPE_CHECKING:
    from ..runtime.context import WorkerContext

__all__ = ["DcpCommitOp", "DcpExtraFilesOp", "check_extra_files", "commit_dcp", "committed_generation", "drop_other_generations", "next_generation",
           "prepare_target"]

log = logging.getLogger("asyncckpt")


def exists_message(uri: str, found: list[str]) -> str:
    """DCP's overwrite refusal, naming what was found and what to do."""
    return (
        f"Checkpoint already exists and self.overwrite=False: {uri} already holds a DCP checkpoint "
        f"({', '.join(found)}); nothing was written. Pass overwrite=True to the writer to replace it, "
        "or choose another checkpoint_id."
    )


async def committed_generation(storage: Storage, name: str) -> int | None:
    """The generation of the DCP checkpoint committed at ``name``; None when no valid COMMIT of a
    DCP checkpoint is there (nothing, damaged, or another kind)."""
    key = join_key(name, COMMIT_FILE)
    try:
        rec = decode_commit(await storage.read(key), f"{storage.uri}/{key}")
    except (CheckpointNotFoundError, FormatError, IntegrityError):
        return None
    return rec.generation if rec.kind == DCP_KIND else None


async def next_generation(storage: Storage, name: str) -> int:
    """The generation a collective save of ``name`` writes once its target is prepared: one more
    than the committed DCP checkpoint's, 0 when none is committed there."""
    committed = await committed_generation(storage, name)
    return 0 if committed is None else committed + 1


async def prepare_target(storage: Storage, name: str, *, overwrite: bool, uri: str, rank: int | None = None) -> int:
    """Before this rank writes: refuse an existing checkpoint, or choose the generation to write.

    Returns the generation this save writes. A collective save (``rank`` None) over a committed
    DCP checkpoint of generation G writes G+1 beside it (the switch is the commit's); every rank
    and the commit read the same COMMIT, which only this save's commit changes. Over anything
    else (a stock DCP checkpoint, a damaged one) the commit point goes first and generation 0 is
    written, so a crash from here on never shows old metadata over new data.

    ``rank`` set: a save without collectives (this rank's ``__R.metadata`` is its commit point;
    an existing checkpoint is recognised by rank 0's, as DCP does); always generation 0.
    """
    if rank is None:
        probe = [COMMIT_FILE, METADATA_FILE]
        remove = [COMMIT_FILE, METADATA_FILE, CHECKSUMS_FILE]
    else:
        probe = [rank_metadata_file(0)]
        remove = [rank_metadata_file(rank), rank_index_file(rank)]
    if not overwrite:
        found = [k for k in probe if await storage.exists(join_key(name, k))]
        if found:
            raise CheckpointExistsError(exists_message(uri, found))
        return 0
    committed = await committed_generation(storage, name) if rank is None else None
    if committed is not None:
        return committed + 1
    for k in remove:
        await storage.delete(join_key(name, k))
    return 0


async def drop_other_generations(storage: Storage, name: str, generation: int, files: list[str]) -> None:
    """After generation ``generation`` was committed and ``.metadata`` switched: remove the DCP files
    directly under ``NAME/`` it does not use (the replaced generation, torn overwrites' leftovers).

    Only names asyncckpt's DCP writer gives are touched, never ``.metadata``/COMMIT or the
    committed ``files``. Best effort: a failure is logged, the commit stands.
    """
    keep = {*files, index_file(generation), metadata_file(generation), METADATA_FILE}
    try:
        doomed = []
        for key in await storage.list(name):
            fname = key[len(name) + 1 :]
            if "/" not in fname and fname not in keep and is_dcp_file(fname):
                doomed.append(key)
        # data first, records last: a rerun after an interruption still finds what to remove
        for key in sorted(doomed, key=lambda k: not k.endswith(".distcp")):
            await storage.delete(key)
    except CheckpointError as exc:
        log.warning("overwrote %s/%s; removing the replaced generation's files failed: %s", storage.uri, name, exc)


async def commit_dcp(
    storage: Storage,
    name: str,
    metadata: Any,
    *,
    ranks: list[int],
    save_id: str | None,
    checkpoint_id: str,
    update_latest: bool,
    per_rank: int | None = None,
) -> Any:
    """Verify the ranks' checksum records, then write the index, the metadata and (collective
    saves) the COMMIT record and ``latest``. Returns the committed Metadata.

    A collective save over a committed DCP checkpoint of generation G commits generation G+1
    (see :func:`prepare_target`): index and metadata copy under G+1's names, then COMMIT, then
    ``.metadata`` replaced, then the old generation's files removed.

    ``per_rank``: a save without collectives; commit rank ``per_rank``'s own ``__R.metadata``.
    """
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        MetadataIndex,
        StorageMeta,
        TensorStorageMetadata,
    )

    # what prepare_target chose on every rank: the committed generation + 1, or 0
    generation = 0 if per_rank is not None else await next_generation(storage, name)
    keys = [join_key(name, rank_record_file(r, generation)) for r in ranks]

    async def read(key: str) -> bytes | None:
        try:
            return await storage.read(key)
        except CheckpointNotFoundError:
            return None  # a rank with nothing to write writes no record (NVRx's form); coverage decides below

    blobs = await asyncio.gather(*(read(k) for k in keys))
    storage_data: dict[Any, Any] = {}
    files, items, refs = [], [], []
    transforms: list[list[str] | None] = []
    skipped: list[str] = []
    sid = save_id
    for rank, blob, key in zip(ranks, blobs, keys):
        where = f"{storage.uri}/{key}"
        if blob is None:
            skipped.append(f"rank {rank}: no checksum record")
            continue
        rec = decode_rank_record(blob, where)
        if rec.rank != rank:
            raise FormatError(f"{where}: record belongs to rank {rec.rank}, not {rank}")
        if sid is None:
            sid = rec.save_id
        if rec.save_id != sid:
            skipped.append(f"rank {rank}: record of another save ({rec.save_id}, a stale file)")
            continue
        rec_transforms = item_transforms(rec)
        for it, tr in zip(rec.items, rec_transforms):
            storage_data[MetadataIndex(it.fqn, it.chunk_offset, it.index)] = _StorageInfo(
                it.file, it.offset, it.length, transform_descriptors=list(tr) if tr else None
            )
        files += rec.files
        items += rec.items
        transforms += rec_transforms
        refs.append(ManifestRef(rank=rank, file=rank_record_file(rank, generation), nbytes=len(blob), checksum=checksum(blob),
                                data_nbytes=sum(f.nbytes for f in rec.files)))
    for fqn, smd in metadata.state_dict_metadata.items():
        missing: list[Any]
        if isinstance(smd, TensorStorageMetadata):
            missing = [c.offsets for c in smd.chunks if MetadataIndex(fqn, c.offsets) not in storage_data]
        elif isinstance(smd, BytesStorageMetadata):
            missing = [] if MetadataIndex(fqn) in storage_data else ["<bytes>"]
        else:
            missing = []
        if missing:
            raise IntegrityError(
                f"{storage.uri}/{name}: no rank wrote {fqn!r} (chunks {missing[:4]}"
                f"{'; ' + ', '.join(skipped) if skipped else ''}); the checkpoint was not committed"
            )
    md = dataclasses.replace(
        metadata,
        storage_data=storage_data,
        version=CURRENT_DCP_VERSION,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=sid),
    )
    blob = pickle.dumps(md)
    has_transforms = any(transforms)
    index = IndexRecord(
        format=DCP_FORMAT, version=record_version(transforms), save_id=sid or "", world_size=len(ranks),
        checksum_algo=CHECKSUM_ALGO, metadata_nbytes=len(blob), metadata_crc32c=checksum(blob),
        files=files, items=items, created=time.time(), transforms=transforms if has_transforms else None,
    )
    if per_rank is not None:
        await storage.put_record(join_key(name, rank_index_file(per_rank)), encode_record(index))
        await storage.put_record(join_key(name, rank_metadata_file(per_rank)), blob)
        return md
    await storage.put_record(join_key(name, index_file(generation)), encode_record(index))
    await storage.put_record(join_key(name, metadata_file(generation)), blob)
    total = sum(f.nbytes for f in files) + sum(r.nbytes for r in refs) + len(blob)
    commit = CommitRecord(
        format=FORMAT_NAME, version=FORMAT_VERSION, name=name, step=None, world_size=len(ranks),
        created=time.time(), total_nbytes=total, checksum_algo=CHECKSUM_ALGO, manifests=refs, kind=DCP_KIND,
        generation=generation,
    )
    # The switch: asyncckpt's readers follow COMMIT; the stock reader follows .metadata, replaced
    # next (a crash between leaves it on the old generation, whose files are still all there).
    await storage.put_record(join_key(name, COMMIT_FILE), encode_commit(commit))
    if generation:
        await storage.put_record(join_key(name, METADATA_FILE), blob)
        await drop_other_generations(storage, name, generation, [f.name for f in files] + [r.file for r in refs])
    await drop_stale_writes(storage, [name])  # temp files / uploads of killed earlier writes of this name
    if update_latest:
        await set_latest(storage, name, None)
    return md


@dataclass
class DcpCommitOp:
    """Control-lane step: commit a DCP checkpoint whose ranks have all written their part.

    Scheduled on the coordinator's worker as the save's last stage (or as the ``then`` of a
    single rank's write), so the trainer does no storage work and the outcome reaches every
    rank through the completion all-reduce. ``metadata`` is DCP's global Metadata, pickled.
    """

    root: str
    name: str
    metadata: bytes
    ranks: list[int]
    save_id: str | None
    checkpoint_id: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    update_latest: bool = False
    per_rank: int | None = None
    milestone: str | None = "committed"

    def sessions(self, ctx: WorkerContext) -> list[Storage]:
        return [ctx.storage(self.root, self.storage_options)]

    async def run(self, ctx: WorkerContext, prior: Any) -> Any:
        storage = ctx.storage(self.root, self.storage_options)
        md = pickle.loads(self.metadata)
        return await commit_dcp(storage, self.name, md, ranks=self.ranks, save_id=self.save_id,
                                checkpoint_id=self.checkpoint_id, update_latest=self.update_latest,
                                per_rank=self.per_rank)


def check_extra_files(files: dict[str, bytes], uri: str) -> dict[str, bytes]:
    """Validate the names of files a commit writes beside a DCP checkpoint's own (``extra_files``)."""
    if not isinstance(files, dict):
        raise BadInputError(f"{uri}: extra_files must be a dict of file name -> bytes, got {type(files).__name__}")
    for fname, data in files.items():
        if not isinstance(fname, str) or not fname or "/" in fname or fname in (".", ".."):
            raise BadInputError(f"{uri}: extra file name {fname!r} must be one path component")
        if fname in (METADATA_FILE, COMMIT_FILE) or is_dcp_file(fname) or fname.startswith(".g"):
            raise BadInputError(f"{uri}: extra file name {fname!r} is one asyncckpt's DCP format reserves; pick another")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadInputError(f"{uri}: extra file {fname!r} must be bytes, got {type(data).__name__}")
    return {k: bytes(v) for k, v in files.items()}


@dataclass
class DcpExtraFilesOp:
    """Control-lane step after :class:`DcpCommitOp`: write small files into the checkpoint directory.

    Each file is written to a temporary name, made durable and renamed over its name, so it
    appears only once the checkpoint it belongs to is committed (and ``.metadata`` switched to
    it), and a crash leaves either the old or the new content.
    """

    root: str
    name: str
    files: dict[str, bytes]
    storage_options: dict[str, Any] = field(default_factory=dict)
    milestone: str | None = None

    def sessions(self, ctx: WorkerContext) -> list[Storage]:
        return [ctx.storage(self.root, self.storage_options)]

    async def run(self, ctx: WorkerContext, prior: Any) -> Any:
        storage = ctx.storage(self.root, self.storage_options)
        for fname, data in self.files.items():
            await storage.put_record(join_key(self.name, fname), data)
        return prior
