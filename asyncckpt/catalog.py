"""Commit records, the ``latest`` pointer and listing: what makes a checkpoint complete.

A checkpoint is complete exactly when its COMMIT record exists and is valid (invariant 2);
COMMIT is written only after every rank's data and manifest are durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError, FormatError, IntegrityError
from .format import (
    CHECKSUM_ALGO,
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_FILE,
    CommitRecord,
    LatestRecord,
    ManifestRef,
    RankManifest,
    checksum,
    decode_commit,
    decode_latest,
    decode_manifest,
    encode_commit,
    encode_latest,
    manifest_file,
)
from .storage import Storage, join_key

__all__ = [
    "CheckpointInfo",
    "check_checkpoint",
    "commit_checkpoint",
    "delete_checkpoint",
    "drop_stale_writes",
    "list_all",
    "read_commit",
    "read_latest",
    "read_manifest",
    "resolve_name",
    "set_latest",
]

log = logging.getLogger("asyncckpt")


@dataclass
class CheckpointInfo:
    """One checkpoint under a root, as listing sees it."""

    name: str
    path: str
    step: int | None
    created: float
    nbytes: int
    complete: bool
    world_size: int = 0
    kind: str = "asyncckpt"
    is_latest: bool = False
    tiers: list[str] = field(default_factory=list)
    problem: str = ""


async def read_manifest(storage: Storage, name: str, rank: int, ref: ManifestRef | None = None) -> RankManifest:
    key = join_key(name, manifest_file(rank))
    where = f"{storage.uri}/{key}"
    try:
        blob = await storage.read(key)
    except CheckpointNotFoundError as exc:
        raise IntegrityError(f"{where}: manifest of rank {rank} is missing") from exc
    if ref is not None and (len(blob) != ref.nbytes or checksum(blob) != ref.checksum):
        raise IntegrityError(
            f"{where}: manifest of rank {rank} does not match its commit record "
            f"({len(blob)} bytes, crc32c {checksum(blob):#010x}; expected {ref.nbytes}, {ref.checksum:#010x})"
        )
    m = decode_manifest(blob, where)
    if m.rank != rank or m.name != name:
        raise FormatError(f"{where}: manifest belongs to {m.name!r} rank {m.rank}, not {name!r} rank {rank}")
    return m


async def commit_checkpoint(
    storage: Storage,
    name: str,
    *,
    world_size: int,
    step: int | None,
    overwrite: bool = False,
    update_latest: bool = True,
    metadata: dict[str, str] | None = None,
    layout: str = "flat",
) -> CommitRecord:
    """Verify every rank's manifest and data size, then write COMMIT (and move ``latest``)."""
    t0 = time.perf_counter()
    refs: list[ManifestRef] = []
    data_keys: list[str] = []
    total = 0
    for rank in range(world_size):
        key = join_key(name, manifest_file(rank))
        blob = await storage.read(key)
        m = decode_manifest(blob, f"{storage.uri}/{key}")
        data_keys.append(m.data_file)
        size = await storage.size(m.data_file)
        if size != m.data_nbytes:
            raise IntegrityError(
                f"{storage.uri}/{m.data_file}: rank {rank} data is {size} bytes, its manifest says {m.data_nbytes}"
            )
        refs.append(ManifestRef(rank=rank, file=manifest_file(rank), nbytes=len(blob), checksum=checksum(blob), data_nbytes=size))
        total += size + len(blob)
    record = CommitRecord(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        name=name,
        step=step,
        world_size=world_size,
        created=time.time(),
        total_nbytes=total,
        checksum_algo=CHECKSUM_ALGO,
        manifests=refs,
        layout=layout,
        metadata=dict(metadata or {}),
    )
    if not await storage.put_record(join_key(name, COMMIT_FILE), encode_commit(record), if_absent=not overwrite):
        raise CheckpointExistsError(f"{storage.uri}/{name} was committed by someone else meanwhile; nothing was changed")
    if update_latest:
        await set_latest(storage, name, step)
    await drop_stale_writes(storage, [name, *data_keys])
    log.info(
        "committed",
        extra={"rank": 0, "step": step, "op": "commit", "bytes": total, "seconds": time.perf_counter() - t0},
    )
    return record


async def drop_stale_writes(storage: Storage, prefixes: list[str]) -> None:
    """Remove what torn earlier saves of this checkpoint left (temp files, incomplete multipart uploads).

    Every rank's writes for it are done once it is committed, so anything unfinished under its
    keys is stale. Best effort: a failure is logged, the commit stands.
    """
    from .storage import AbortsIncompleteUploads, CleansTempFiles

    caps = storage.capabilities
    try:
        if caps.cleanup_temp and isinstance(storage, CleansTempFiles):  # local: the checkpoint's own directory
            await storage.cleanup_temp(prefixes[0])
        if caps.abort_incomplete and isinstance(storage, AbortsIncompleteUploads):  # object stores: these prefixes
            for prefix in dict.fromkeys(prefixes):
                await storage.abort_incomplete_uploads(prefix)
    except CheckpointError as exc:
        log.warning("could not remove what earlier torn saves left under %s: %s", storage.uri, exc)


async def set_latest(storage: Storage, name: str, step: int | None) -> None:
    await storage.put_record(LATEST_FILE, encode_latest(LatestRecord(name=name, step=step, created=time.time())))


async def read_latest(storage: Storage) -> LatestRecord | None:
    try:
        blob = await storage.read(LATEST_FILE)
    except CheckpointNotFoundError:
        return None
    return decode_latest(blob, f"{storage.uri}/{LATEST_FILE}")


async def read_commit(storage: Storage, name: str) -> CommitRecord:
    key = join_key(name, COMMIT_FILE)
    try:
        blob = await storage.read(key)
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{storage.uri}/{name} is not a complete checkpoint (no {COMMIT_FILE} record): "
            "it does not exist or its save did not finish"
        ) from exc
    rec = decode_commit(blob, f"{storage.uri}/{key}")
    if rec.name != name:
        raise FormatError(f"{storage.uri}/{key}: commit record belongs to {rec.name!r}, not {name!r}")
    return rec


async def resolve_name(storage: Storage, name: str | None) -> str:
    """``name`` itself, or the checkpoint ``latest`` points to when ``name`` is None."""
    if name is not None:
        return name
    latest = await read_latest(storage)
    if latest is None:
        raise CheckpointNotFoundError(f"{storage.uri} has no '{LATEST_FILE}' pointer: no checkpoint was committed there")
    return latest.name


async def list_all(storage: Storage, *, check: bool = False) -> list[CheckpointInfo]:
    """Every checkpoint under the root, complete ones first, each group newest first.

    Complete means a valid COMMIT record. With ``check``, committed checkpoints also pass
    :func:`check_checkpoint` (records and data sizes, no data read) or are listed as not
    complete with the reason.
    """
    keys = await storage.list("")
    names: dict[str, list[str]] = {}
    for k in keys:
        if "/" in k:
            head, _, rest = k.partition("/")
            names.setdefault(head, []).append(rest)
    latest = None
    try:
        latest = await read_latest(storage)
    except CheckpointError:
        pass
    out: list[CheckpointInfo] = []
    for name, files in names.items():
        path = f"{storage.uri.rstrip('/')}/{name}"
        if COMMIT_FILE not in files:
            # Only files directly under NAME/ make it a checkpoint; deeper ones are data under a
            # spread layout prefix (HH/NAME/...), owned by the checkpoint whose manifest names them.
            if any("/" not in f and f.endswith(".manifest") for f in files):
                out.append(CheckpointInfo(name, path, None, 0.0, 0, False, problem="no commit record (save did not finish)"))
            elif any("/" not in f and f.endswith(".data") for f in files):
                out.append(CheckpointInfo(name, path, None, 0.0, 0, False, problem=(
                    "no commit record and no manifest, only data files (a save torn before its manifest was "
                    "written?); nothing proves they are a checkpoint's, so `asyncckpt rm` refuses: delete by hand")))
            continue
        try:
            rec = await read_commit(storage, name)
        except CheckpointError as exc:
            out.append(CheckpointInfo(name, path, None, 0.0, 0, False, problem=str(exc)))
            continue
        out.append(
            CheckpointInfo(
                name,
                path,
                rec.step,
                rec.created,
                rec.total_nbytes,
                True,
                world_size=rec.world_size,
                kind=rec.kind,
                is_latest=latest is not None and latest.name == name,
                tiers=[storage.uri],
            )
        )
    if check:
        sem = asyncio.Semaphore(_CHECK_CONCURRENCY)
        done = [i for i in out if i.complete]
        problems = await asyncio.gather(*(check_checkpoint(storage, i.name, sem=sem) for i in done))
        for info, problem in zip(done, problems):
            if problem:
                info.complete = False
                info.problem = f"committed, but {problem}" + (f" ('{LATEST_FILE}' points to it)" if info.is_latest else "")
    out.sort(key=lambda i: (not i.complete, -(i.step if i.step is not None else -1), -i.created))
    return out


_CHECK_CONCURRENCY = 16


async def check_checkpoint(storage: Storage, name: str, *, sem: asyncio.Semaphore | None = None) -> str:
    """The cheap checks of a committed checkpoint (what ``asyncckpt ls`` shows); "" when they hold.

    Reads the records, not the data: COMMIT passes its record checksum; every rank's record
    (manifest, or the DCP writer's checksum record) is present, has the size and CRC32C COMMIT
    recorded for it and decodes; every data file exists with the size its record gives (and a
    DCP ``.metadata`` the size its index gives). A changed byte inside a data file passes these;
    ``asyncckpt verify`` reads every chunk and finds it. Returns what failed.
    """
    sem = sem or asyncio.Semaphore(_CHECK_CONCURRENCY)

    async def size_of(key: str) -> int | None:
        async with sem:
            try:
                return await storage.size(key)
            except CheckpointNotFoundError:
                return None

    def wrong(key: str, size: int | None, want: int, what: str) -> str:
        if size is None:
            return f"{storage.uri}/{key} is missing"
        if size == want:
            return ""
        return (f"{storage.uri}/{key} is {size} bytes, {what} says {want} "
                f"({'truncated' if size < want else 'extended'})")

    async def native_rank(ref: ManifestRef) -> str:
        async with sem:
            m = await read_manifest(storage, name, ref.rank, ref)
        return wrong(m.data_file, await size_of(m.data_file), m.data_nbytes, f"the manifest of rank {m.rank}")

    async def dcp_rank(ref: ManifestRef) -> str:
        from .dcp._format import decode_rank_record

        key = join_key(name, ref.file)
        async with sem:
            blob = await storage.read(key)
        if len(blob) != ref.nbytes or checksum(blob) != ref.checksum:
            return f"{storage.uri}/{key}: checksum record of rank {ref.rank} does not match its commit record"
        rec = decode_rank_record(blob, f"{storage.uri}/{key}")
        for f in rec.files:
            problem = wrong(join_key(name, f.name), await size_of(join_key(name, f.name)), f.nbytes,
                            f"the checksum record of rank {ref.rank}")
            if problem:
                return problem
        return ""

    async def dcp_metadata() -> str:
        from .dcp._format import CHECKSUMS_FILE, METADATA_FILE, decode_index

        key = join_key(name, CHECKSUMS_FILE)
        async with sem:
            index = decode_index(await storage.read(key), f"{storage.uri}/{key}")
        md = join_key(name, METADATA_FILE)
        return wrong(md, await size_of(md), index.metadata_nbytes, f"{CHECKSUMS_FILE}")

    try:
        async with sem:
            rec = await read_commit(storage, name)
        if rec.kind == "asyncckpt":
            jobs = [native_rank(ref) for ref in rec.manifests]
        elif rec.kind == "dcp":
            jobs = [dcp_metadata(), *(dcp_rank(ref) for ref in rec.manifests)]
        else:
            return f"unknown checkpoint kind {rec.kind!r}"
    except (CheckpointNotFoundError, FormatError, IntegrityError) as exc:
        return str(exc)
    bad: list[str] = []
    for got in await asyncio.gather(*jobs, return_exceptions=True):
        if isinstance(got, (CheckpointNotFoundError, FormatError, IntegrityError)):
            bad.append(str(got))
        elif isinstance(got, BaseException):
            raise got
        elif got:
            bad.append(got)
    return "; ".join(bad[:3]) + (f"; ... ({len(bad)} problems)" if len(bad) > 3 else "")


async def delete_checkpoint(storage: Storage, name: str, *, force: bool = False) -> Any:
    """Delete checkpoint ``name``, proven by its own records, COMMIT first; see :mod:`asyncckpt.deletion`.

    The one deletion used by the CLI, :func:`asyncckpt.delete`, retention and tier pruning.
    Returns a :class:`~asyncckpt.deletion.DeleteReport`.
    """
    from .deletion import delete_checkpoint as _delete  # deletion builds on this module

    return await _delete(storage, name, force=force)
