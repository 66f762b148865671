"""Commit records, the ``latest`` pointer and listing: what makes a checkpoint complete.

A checkpoint is complete exactly when its COMMIT record exists and is valid (invariant 2);
COMMIT is written only after every rank's data and manifest are durable.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import numpy as np

from .errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError, FormatError, IntegrityError
from .format import (
    CHECKSUM_ALGO,
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_FILE,
    REFS,
    ChunkGeometry,
    CommitRecord,
    LatestRecord,
    ManifestRef,
    RankManifest,
    RefTarget,
    check_metadata,
    checksum,
    data_file,
    data_file_rank,
    decode_commit,
    decode_latest,
    decode_manifest,
    encode_commit,
    encode_latest,
    manifest_file,
    manifest_file_rank,
    owned_offsets,
    read_entries,
    resolve_reference,
)
from .kinds.base import RecordProbe, kind_named, kind_of
from .storage import ListsByName, Storage, join_key

__all__ = [
    "RETIRED_FILE",
    "CheckpointInfo",
    "check_checkpoint",
    "commit_checkpoint",
    "delete_checkpoint",
    "drop_other_generations",
    "drop_stale_writes",
    "forget_checkpoint",
    "known_manifest",
    "list_all",
    "next_generation",
    "note_manifest_written",
    "read_commit",
    "read_latest",
    "read_manifest",
    "read_references",
    "read_target",
    "referenced_by",
    "referenced_nbytes",
    "remembered_records",
    "resolve_name",
    "set_latest",
    "verify_references",
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
    logical_nbytes: int = 0  # its size with the bytes it references in sibling checkpoints (incremental saves)

    def __post_init__(self) -> None:
        self.logical_nbytes = self.logical_nbytes or self.nbytes


_REMEMBER: contextvars.ContextVar[bool] = contextvars.ContextVar("asyncckpt_remembered_records", default=False)
_MEMO_BYTES = 16 << 20  # manifest bytes kept per storage session
_MEMO_NAMES = 256  # COMMIT records and generations kept per storage session


class _Known:
    """What this process wrote or read under one storage session (see :func:`remembered_records`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # saves run on the worker's loop, commits on its control thread
        self.manifests: OrderedDict[str, bytes] = OrderedDict()  # key -> bytes, oldest first
        self.nbytes = 0
        self.commits: OrderedDict[str, CommitRecord] = OrderedDict()  # name -> its COMMIT as last seen
        # name -> (generation, replaced record, fresh, a COMMIT was there) as the last save of it here found
        self.generations: OrderedDict[str, tuple[int, CommitRecord | None, bool, bool]] = OrderedDict()
        self.latest: LatestRecord | None = None  # `latest` as this process last wrote or read it
        self.written: OrderedDict[str, tuple[bytes, int]] = OrderedDict()  # manifest key -> (bytes, data size)

    def add_manifest(self, key: str, blob: bytes) -> None:
        if len(blob) > _MEMO_BYTES // 4:
            return
        with self.lock:
            old = self.manifests.pop(key, None)
            self.nbytes += len(blob) - (len(old) if old is not None else 0)
            self.manifests[key] = blob
            while self.nbytes > _MEMO_BYTES:
                self.nbytes -= len(self.manifests.popitem(last=False)[1])

    def add_commit(self, name: str, rec: CommitRecord) -> None:
        with self.lock:
            self.commits.pop(name, None)
            self.commits[name] = rec
            while len(self.commits) > _MEMO_NAMES:
                self.commits.popitem(last=False)

    def add_generation(self, key: str, seen: tuple[int, CommitRecord | None, bool, bool]) -> None:
        with self.lock:
            self.generations.pop(key, None)
            self.generations[key] = seen
            while len(self.generations) > _MEMO_NAMES:
                self.generations.popitem(last=False)


_known: weakref.WeakKeyDictionary[Storage, _Known] = weakref.WeakKeyDictionary()
_known_lock = threading.Lock()


def _known_of(storage: Storage) -> _Known:
    with _known_lock:
        k = _known.get(storage)
        if k is None:
            k = _known[storage] = _Known()
        return k


@contextmanager
def remembered_records() -> Iterator[None]:
    """Within this block (this task and those it starts) the catalog answers from what this process
    already wrote or read under the same storage session instead of asking storage again.

    The worker's control steps (commit, retention, cleanup) run in it; read-side calls (load,
    verify, listing for users) never do, so they always read storage. What is answered from memory:

    * a manifest whose bytes this process read in such a block, when the caller holds the COMMIT
      reference it must match (size, CRC32C, save id; :func:`known_manifest`, and
      :func:`read_manifest` with ``ref``): the same bytes storage would return, as COMMIT certifies;
    * the generation a commit writes, as the save of the same name in this process decided it
      (:func:`next_generation`, one reading of ``COMMIT``/``RETIRED`` per save instead of two);
    * in :func:`list_all`, the COMMIT record of a name that is listed with a COMMIT and whose record
      this process wrote or read in such a block, and ``latest`` as this process last wrote or read
      it (retention judges by step and age and skips the ``latest`` target; the deletion itself
      reads COMMIT and ``latest`` again, as its proof). Deleting a checkpoint here forgets it;
    * in :func:`commit_checkpoint`, a manifest and its data file's size that the save in this process
      handed over with :func:`note_manifest_written`.
    """
    token = _REMEMBER.set(True)
    try:
        yield
    finally:
        _REMEMBER.reset(token)


def known_manifest(storage: Storage, name: str, ref: ManifestRef) -> RankManifest | None:
    """Rank ``ref.rank``'s manifest of ``name`` from memory when ``ref`` certifies the remembered bytes
    (inside :func:`remembered_records` only), else None (read it from storage)."""
    if not _REMEMBER.get():
        return None
    key = join_key(name, ref.file)
    blob = _known_of(storage).manifests.get(key)
    if blob is None or len(blob) != ref.nbytes or checksum(blob) != ref.checksum:
        return None
    where = f"{storage.uri}/{key}"
    m = decode_manifest(blob, where)
    if m.rank != ref.rank or (ref.save_id and m.save_id != ref.save_id):
        return None
    return msgspec.structs.replace(m, data_file=_data_key(m, name, where))


def note_manifest_written(storage: Storage, key: str, blob: bytes, data_nbytes: int) -> None:
    """Tell the commit of this process that it wrote manifest ``key`` (``blob``, durable: its
    ``put_record`` returned) after the data file it names, of ``data_nbytes`` bytes, was committed.

    The commit in this process then takes both from here instead of reading the manifest and the
    data file's size back (once: a later commit of the same key reads storage again)."""
    k = _known_of(storage)
    with k.lock:
        k.written.pop(key, None)
        k.written[key] = (blob, data_nbytes)
        while len(k.written) > _MEMO_NAMES:
            k.written.popitem(last=False)


def _written_by_me(storage: Storage, key: str) -> tuple[bytes, int] | None:
    if not _REMEMBER.get():
        return None
    k = _known_of(storage)
    with k.lock:
        return k.written.pop(key, None)


def forget_checkpoint(storage: Storage, name: str) -> None:
    """Drop what this process remembers of checkpoint ``name`` (it was deleted)."""
    k = _known_of(storage)
    with k.lock:
        k.commits.pop(name, None)
        if k.latest is not None and k.latest.name == name:
            k.latest = None
        for key in [key for key in k.manifests if key.startswith(f"{name}/")]:
            k.nbytes -= len(k.manifests.pop(key))
        k.generations.pop(name, None)
        for key in [key for key in k.written if key.startswith(f"{name}/")]:
            del k.written[key]


def _remember_manifest(storage: Storage, key: str, blob: bytes) -> None:
    if _REMEMBER.get():
        _known_of(storage).add_manifest(key, blob)


def _remember_commit(storage: Storage, name: str, rec: CommitRecord) -> None:
    if _REMEMBER.get():
        _known_of(storage).add_commit(name, rec)


async def read_manifest(
    storage: Storage, name: str, rank: int, ref: ManifestRef | None = None, *, file: str | None = None
) -> RankManifest:
    """Read, check and decode rank ``rank``'s manifest of the checkpoint found at ``name``.

    The file is ``ref.file`` (COMMIT's reference, whose size, CRC32C and save id it must match),
    else ``file``, else generation 0's name. The checkpoint's name is not bound into it, so a
    renamed, copied or symlinked checkpoint loads: ``data_file`` of the returned manifest is the
    data key as seen from ``name`` (a flat layout's data lives beside the manifest).
    """
    fname = ref.file if ref is not None else (file or manifest_file(rank))
    key = join_key(name, fname)
    where = f"{storage.uri}/{key}"
    got = manifest_file_rank(fname)
    if got is None or got[0] != rank:
        raise FormatError(f"{storage.uri}/{join_key(name, COMMIT_FILE)}: {fname!r} is not a manifest name of rank {rank}")
    if ref is not None and (known := known_manifest(storage, name, ref)) is not None:
        return known
    try:
        blob = await storage.read(key)
    except CheckpointNotFoundError as exc:
        raise IntegrityError(f"{where}: manifest of rank {rank} is missing") from exc
    _remember_manifest(storage, key, blob)
    if ref is not None and (len(blob) != ref.nbytes or checksum(blob) != ref.checksum):
        raise IntegrityError(
            f"{where}: manifest of rank {rank} does not match its commit record ({COMMIT_FILE}) "
            f"({len(blob)} bytes, crc32c {checksum(blob):#010x}; expected {ref.nbytes}, {ref.checksum:#010x}); "
            f"a file of another checkpoint, or damaged"
        )
    m = decode_manifest(blob, where)
    if m.rank != rank:
        raise FormatError(f"{where}: manifest belongs to rank {m.rank}, not rank {rank}")
    if ref is not None and ref.save_id and m.save_id != ref.save_id:
        raise IntegrityError(
            f"{where}: manifest of rank {rank} belongs to save {m.save_id or '(none)'}, its {COMMIT_FILE} record "
            f"to save {ref.save_id}: the files come from different checkpoints; load another checkpoint"
        )
    return msgspec.structs.replace(m, data_file=_data_key(m, name, where))


async def read_target(storage: Storage, m: RankManifest, t: RefTarget) -> RankManifest:
    """The manifest reference target ``t`` of ``m`` names (a sibling under the same root), checked against
    the size, CRC32C and save id ``m`` recorded for it; IntegrityError naming both when it cannot be read."""
    where = f"{storage.uri}/{m.name}"
    rank = manifest_file_rank(t.manifest)
    if rank is None:
        raise FormatError(f"{where}: a reference names {t.file!r}, which is not a manifest")
    ref = ManifestRef(rank=rank[0], file=t.manifest, nbytes=t.nbytes, checksum=t.checksum, data_nbytes=0,
                      save_id=t.save_id)
    try:
        return await read_manifest(storage, t.name, rank[0], ref)
    except CheckpointError as exc:
        raise IntegrityError(f"{where}: rank {m.rank} stores some of its entries by reference in {storage.uri}/"
                             f"{t.file}, which cannot be read ({exc}); the checkpoint cannot be loaded") from exc


def _relay(on_bytes: Callable[[int, int, np.ndarray], Any], js: dict[int, int], j: int, off: int,
           data: np.ndarray) -> Any:
    """Hand a target entry's bytes on under the referencing entry's index."""
    return on_bytes(js[j], off, data)


async def read_references(storage: Storage, m: RankManifest, indices: Collection[int],
                          on_bytes: Callable[[int, int, np.ndarray], Any]) -> None:
    """Read the verified bytes of the reference entries ``indices`` of ``m`` from the files that hold them:
    ``on_bytes(entry, offset in entry, bytes)`` per piece. Only the chunks holding them are read, each
    checked against its CRC32C; a failure names the file, the bytes, and this checkpoint's keys."""
    by_target: dict[int, list[int]] = {}
    for i in indices:
        by_target.setdefault(m.entries[i].ref, []).append(i)
    for t_idx, idx in sorted(by_target.items()):
        t = m.refs[t_idx]
        tm = await read_target(storage, m, t)
        where = f"{storage.uri}/{m.name} (rank {m.rank})"
        offsets = owned_offsets(tm)
        js = {resolve_reference(m.entries[i], tm, offsets, where): i for i in idx}
        try:
            await read_entries(storage, tm, list(js), functools.partial(_relay, on_bytes, js), every_chunk=False)
        except IntegrityError as exc:
            keys = [m.entries[i].key for i in idx]
            raise IntegrityError(f"{where}: keys {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} are stored "
                                 f"by reference in {storage.uri}/{tm.data_file}, which fails verification: {exc}"
                                 ) from exc


async def verify_references(storage: Storage, m: RankManifest, progress: Callable[[int], Any] | None = None
                            ) -> tuple[int, list[str]]:
    """Read and verify the bytes ``m``'s references point at, target by target; (bytes checked, problems)."""
    checked = 0
    problems: list[str] = []
    by_target: dict[int, list[int]] = {}
    for i, e in enumerate(m.entries):
        if e.ref >= 0:
            by_target.setdefault(e.ref, []).append(i)

    def on_bytes(i: int, off: int, data: np.ndarray) -> None:
        nonlocal checked
        checked += len(data)
        if progress is not None:
            progress(len(data))

    for idx in by_target.values():
        try:
            await read_references(storage, m, idx, on_bytes)
        except (FormatError, IntegrityError) as exc:
            problems.append(str(exc))
    return checked, problems


def referenced_nbytes(m: RankManifest) -> int:
    """Bytes of ``m``'s entries stored by reference (in sibling checkpoints)."""
    return sum(e.nbytes for e in m.entries if e.ref >= 0)


async def referenced_by(storage: Storage, exclude: Collection[str] = ()) -> dict[str, set[str]]:
    """Mark phase: root-relative manifest keys that references of the other checkpoints under the root
    point into -> the checkpoints referencing them. Every checkpoint counts (committed, or a save in
    progress with manifests written) except ``exclude`` and retired ones (deleted but kept for others)."""
    out: dict[str, set[str]] = {}
    names: dict[str, set[str]] = {}
    for k in await storage.list(""):
        head, _, rest = k.partition("/")
        if rest and "/" not in rest:
            names.setdefault(head, set()).add(rest)
    for name, files in names.items():
        if name in exclude or (RETIRED_FILE in files and COMMIT_FILE not in files):
            continue
        for fname in sorted(files):
            got = manifest_file_rank(fname)
            if got is None:
                continue
            try:
                blob = await storage.read(join_key(name, fname))
                m = decode_manifest(blob, f"{storage.uri}/{join_key(name, fname)}")
            except CheckpointNotFoundError:
                continue
            except (FormatError, IntegrityError) as exc:
                # a manifest that cannot be read may reference anything: keep everything rather than guess
                raise IntegrityError(f"cannot tell what {storage.uri}/{name} references ({exc}); nothing that "
                                     "may be referenced is deleted until it is repaired or deleted") from exc
            for t in m.refs:
                out.setdefault(t.file, set()).add(name)
    return out


class BasePins:
    """The base checkpoints (names under one root) that incremental saves being written in this process
    read: deletion keeps them (their references are not on storage until the manifest is written)."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._epoch: dict[str, int] = {}
        self._deleting: set[str] = set()
        self._lock = threading.Lock()  # saves pin on the worker's loop, retention deletes on its control thread

    def hold(self, name: str) -> bool:
        """Pin ``name``; False when a deletion of it has begun (then the save must not use it as its base)."""
        with self._lock:
            self._held[name] = self._held.get(name, 0) + 1
            self._epoch[name] = self._epoch.get(name, 0) + 1
            return name not in self._deleting

    def release(self, name: str) -> None:
        with self._lock:
            self._held[name] -= 1

    def token(self, name: str) -> tuple[bool, int]:
        """Whether ``name`` is held now, and how often it was held so far."""
        return self._held.get(name, 0) > 0, self._epoch.get(name, 0)

    def held_since(self, name: str, token: tuple[bool, int]) -> bool:
        """Whether ``name`` was held at any moment since ``token`` was taken."""
        return token[0] or self._held.get(name, 0) > 0 or self._epoch.get(name, 0) != token[1]

    def begin_delete(self, name: str, token: tuple[bool, int]) -> bool:
        """Start deleting ``name`` unless it was held since ``token``; from now on :meth:`hold` refuses it."""
        with self._lock:
            if self.held_since(name, token):
                return False
            self._deleting.add(name)
            return True

    def end_delete(self, name: str) -> None:
        self._deleting.discard(name)


#: Written in a deleted checkpoint's directory whose files other checkpoints still reference: it is no
#: longer a checkpoint (no COMMIT); its files go once nothing references them. It holds the highest
#: generation retired (ASCII digits; empty in markers written before that), so a new save of the same
#: name writes past the retired files instead of over them.
RETIRED_FILE = "RETIRED"


def encode_retired(generation: int) -> bytes:
    """The ``RETIRED`` marker's content: the highest generation of the retired files."""
    return str(generation).encode()


async def retired_generation(storage: Storage, name: str) -> int | None:
    """The highest generation retired under ``name`` (None: no marker). An empty marker (older
    writers) counts every rank file's generation under ``name``."""
    try:
        blob = await storage.read(join_key(name, RETIRED_FILE))
    except CheckpointNotFoundError:
        return None
    if blob.strip().isdigit():
        return int(blob)
    gens = [-1]
    for key in await storage.list(name):
        got = manifest_file_rank(key.rpartition("/")[2]) or data_file_rank(key.rpartition("/")[2])
        if got is not None:
            gens.append(got[1])
    return max(gens)


def _data_key(m: RankManifest, name: str, where: str) -> str:
    """The data file's key seen from ``name``: flat layouts keep it beside the manifest (so a
    renamed checkpoint finds it); spread layouts name it from the root, as written."""
    if m.layout != "flat":
        return m.data_file
    head, _, fname = m.data_file.rpartition("/")
    got = data_file_rank(fname)
    if head != m.name or got is None or got[0] != m.rank:
        raise FormatError(
            f"{where}: data file {m.data_file!r} is not rank {m.rank}'s data file in the checkpoint's own "
            f"directory ({m.name!r}), as the flat layout requires"
        )
    return join_key(name, fname)


async def next_generation(storage: Storage, name: str, *, overwrite: bool) -> tuple[int, CommitRecord | None]:
    """(the generation a new save of ``name`` writes, the committed record it replaces or None).

    0 when nothing is committed there (or its COMMIT is damaged: nothing loadable to keep),
    else one more than the committed generation, so an overwrite writes beside the checkpoint it
    replaces. Every rank and the commit compute it from the same COMMIT, which only this save's
    commit changes. Without ``overwrite`` a committed checkpoint raises CheckpointExistsError.
    A deleted name whose files others still reference (a ``RETIRED`` marker) is written past
    the retired generation, so those files are never overwritten. What it found is remembered
    for this save's commit in this process (:func:`remembered_records`).
    """
    generation, old, _fresh = await _generation(storage, name, overwrite)
    return generation, old


async def _generation(storage: Storage, name: str, overwrite: bool) -> tuple[int, CommitRecord | None, bool]:
    """:func:`next_generation` and whether the name was fresh (neither ``COMMIT`` nor ``RETIRED``)."""
    key = join_key(name, COMMIT_FILE)
    if storage.capabilities.list_by_name:
        # One look at NAME/ says which of the two exist (a new name: neither, and no file is opened);
        # RETIRED matters only when COMMIT is absent
        there = set(await storage.list(name))
        blob = await _read_or_none(storage, key) if key in there else None
        retired = (await retired_generation(storage, name)
                   if blob is None and join_key(name, RETIRED_FILE) in there else None)
    else:  # both at once (one round trip for a new name); RETIRED matters only when COMMIT is absent
        blob, retired = await asyncio.gather(_read_or_none(storage, key), retired_generation(storage, name))
    if blob is None:
        seen: tuple[int, CommitRecord | None, bool, bool] = ((0, None, True, False) if retired is None
                                                            else (retired + 1, None, False, False))
        _known_of(storage).add_generation(name, seen)
        return seen[:3]
    if not overwrite:
        raise CheckpointExistsError(
            f"{storage.uri}/{name} already holds a committed checkpoint; nothing was written. "
            "Pass overwrite=True to replace it, or choose another name"
        )
    try:
        rec = decode_commit(blob, f"{storage.uri}/{key}")
    except (FormatError, IntegrityError) as exc:
        log.warning("overwriting %s/%s, whose commit record is damaged: %s", storage.uri, name, exc)
        seen = (0, None, False, True)
    else:
        seen = (rec.generation + 1, rec, False, True)
    _known_of(storage).add_generation(name, seen)
    return seen[:3]


async def _read_or_none(storage: Storage, key: str) -> bytes | None:
    try:
        return await storage.read(key)
    except CheckpointNotFoundError:
        return None


async def _generation_for_commit(storage: Storage, name: str, overwrite: bool) -> tuple[int, CommitRecord | None, bool]:
    """What the save of ``name`` in this process found (taken once), else read again."""
    if _REMEMBER.get():
        k = _known_of(storage)
        with k.lock:
            seen = k.generations.pop(name, None)
        if seen is not None:
            if seen[3] and not overwrite:  # what reading COMMIT again would say (a drain writes with overwrite)
                raise CheckpointExistsError(
                    f"{storage.uri}/{name} already holds a committed checkpoint; nothing was written. "
                    "Pass overwrite=True to replace it, or choose another name"
                )
            return seen[:3]
    return await _generation(storage, name, overwrite)


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
    """Verify every rank's manifest and data size, then write COMMIT (and move ``latest``).

    An overwrite's ranks wrote the next generation's files beside the committed ones; COMMIT is
    replaced in one atomic put, so a reader sees the old or the new checkpoint, never neither.
    The replaced generation's files (and leftovers of torn earlier overwrites) go afterwards.
    """
    t0 = time.perf_counter()
    metadata = check_metadata(metadata)
    generation, old, fresh = await _generation_for_commit(storage, name, overwrite)
    refs: list[ManifestRef] = []
    data_keys: list[str] = []
    total = referenced = 0
    uses_refs = False
    for rank in range(world_size):
        fname = manifest_file(rank, generation)
        key = join_key(name, fname)
        wrote = _written_by_me(storage, key)
        if wrote is not None:  # this process wrote it, after its data file's commit returned
            blob, size = wrote
        else:
            try:
                blob = await storage.read(key)
            except CheckpointNotFoundError as exc:
                raise IntegrityError(f"{storage.uri}/{key}: manifest of rank {rank} is missing; nothing was committed") from exc
        m = decode_manifest(blob, f"{storage.uri}/{key}")
        _remember_manifest(storage, key, blob)
        data_keys.append(m.data_file)
        if wrote is None:
            size = await storage.size(m.data_file)
        want = ChunkGeometry.of(m).stored_nbytes
        if size != want:
            raise IntegrityError(f"{storage.uri}/{m.data_file}: rank {rank} data is {size} bytes, its manifest says {want}")
        for t in m.refs:  # what it references must still be there (retention may have run meanwhile)
            tm = await read_target(storage, m, t)
            tsize, twant = await storage.size(tm.data_file), ChunkGeometry.of(tm).stored_nbytes
            if tsize != twant:
                raise IntegrityError(f"{storage.uri}/{tm.data_file}: referenced by rank {rank} of {name}, is {tsize} "
                                     f"bytes, its manifest says {twant}; nothing was committed")
        refs.append(ManifestRef(rank=rank, file=fname, nbytes=len(blob), checksum=checksum(blob), data_nbytes=size,
                                save_id=m.save_id))
        total += size + len(blob)
        referenced += referenced_nbytes(m)
        uses_refs = uses_refs or REFS in m.features
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
        metadata=metadata,
        generation=generation,
        logical_nbytes=total + referenced if uses_refs else msgspec.UNSET,
    )
    if not await storage.put_record(join_key(name, COMMIT_FILE), encode_commit(record), if_absent=not overwrite):
        raise CheckpointExistsError(f"{storage.uri}/{name} was committed by someone else meanwhile; nothing was changed")
    _remember_commit(storage, name, record)

    async def tidy() -> None:  # best effort, after COMMIT; independent of `latest`, so beside it
        if not (fresh and layout == "flat"):
            # A fresh flat name (no COMMIT, no RETIRED when its save began) replaced nothing; rank files
            # of other generations under it can only be what an interrupted deletion left, and they go
            # with this checkpoint's own deletion (which removes every rank file directly under NAME/).
            await drop_other_generations(storage, name, record, old)
        await drop_stale_writes(storage, [name, *data_keys])

    moved = set_latest(storage, name, step) if update_latest else asyncio.sleep(0)
    for got in await asyncio.gather(moved, tidy(), return_exceptions=True):
        if isinstance(got, BaseException):
            raise got
    log.info(
        "committed",
        extra={"rank": 0, "step": step, "op": "commit", "bytes": total, "seconds": time.perf_counter() - t0},
    )
    return record


async def drop_other_generations(storage: Storage, name: str, record: CommitRecord, old: CommitRecord | None) -> None:
    """After ``record`` was committed at ``name``: remove the rank files it does not reference.

    That is the generation it replaced (its data files wherever its manifests put them) and
    files of torn earlier saves directly under ``NAME/`` (and under the new data prefix). Only
    names the format gives rank files are touched. Best effort: a failure is logged, the commit
    stands; a reader still holding the replaced COMMIT retries with the new one.
    """
    keep: set[str] = set()
    keep_manifests = {join_key(name, ref.file) for ref in record.manifests}
    for ref in record.manifests:
        keep.add(join_key(name, ref.file))
        gen = manifest_file_rank(ref.file)
        keep.add(join_key(name, data_file(ref.rank, gen[1] if gen else 0)))
    try:
        kind = kind_of(record, f"{storage.uri}/{name}")
        new = await kind.generation_files(storage, name, record)
        if new.problems:
            raise IntegrityError("; ".join(new.problems))
        keep.update(new.keys)
        prefixes = {name} | {k.rpartition("/")[0] for k in new.keys}
        doomed: list[str] = []
        refs = False
        # the replaced generation's files, as its own records name them (only a record of the same kind:
        # another kind's files are not this kind's to remove)
        if old is not None and kind_named(old.kind) is kind:
            gone = await kind.generation_files(storage, name, old)
            doomed += [k for k in gone.keys if k not in keep]
            refs = gone.shared
        retired = False
        for prefix in sorted(prefixes):
            for key in await storage.list(prefix):
                rest = key[len(prefix) + 1 :]
                if "/" not in rest and (data_file_rank(rest) or manifest_file_rank(rest)):
                    doomed.append(key)
                retired = retired or (prefix == name and rest == RETIRED_FILE)
        refs = refs or retired  # a deleted earlier save of this name left files others reference
        if refs:  # files of the replaced generation that other checkpoints reference stay (with their data)
            for mkey in await referenced_by(storage, exclude={name}):
                head, _, fname = mkey.partition("/")
                got = manifest_file_rank(fname)
                if head == name and got is not None:
                    keep.add(mkey)
                    keep.add((await read_manifest(storage, name, got[0], file=fname)).data_file)
        # data first, manifests last: a rerun after an interruption still finds what to remove
        doomed = sorted(dict.fromkeys(k for k in doomed if k not in keep), key=lambda k: k.endswith(".manifest"))
        for key in doomed:
            await storage.delete(key)
        if doomed:
            log.debug("removed %d files of replaced or torn saves of %s/%s", len(doomed), storage.uri, name)
        if retired and not any(k.startswith(f"{name}/") and k.endswith(".manifest") and k not in keep_manifests
                               for k in keep):
            await storage.delete(join_key(name, RETIRED_FILE))  # nothing retired is left here
    except CheckpointError as exc:
        log.warning("could not remove the replaced files of %s/%s: %s", storage.uri, name, exc)


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
            for prefix in _outermost(prefixes):
                await storage.abort_incomplete_uploads(prefix)
    except CheckpointError as exc:
        log.warning("could not remove what earlier torn saves left under %s: %s", storage.uri, exc)


def _outermost(prefixes: list[str]) -> list[str]:
    """``prefixes`` without those another one covers (``NAME`` covers ``NAME/rank-00000.data``)."""
    out = list(dict.fromkeys(prefixes))
    return [p for p in out if not any(q != p and p.startswith(q + "/") for q in out)]


async def set_latest(storage: Storage, name: str, step: int | None) -> None:
    rec = LatestRecord(name=name, step=step, created=time.time())
    await storage.put_record(LATEST_FILE, encode_latest(rec))
    if _REMEMBER.get():
        _known_of(storage).latest = rec


async def read_latest(storage: Storage) -> LatestRecord | None:
    try:
        blob = await storage.read(LATEST_FILE)
    except CheckpointNotFoundError:
        return None
    rec = decode_latest(blob, f"{storage.uri}/{LATEST_FILE}")
    if _REMEMBER.get():
        _known_of(storage).latest = rec
    return rec


async def read_commit(storage: Storage, name: str) -> CommitRecord:
    key = join_key(name, COMMIT_FILE)
    try:
        blob = await storage.read(key)
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{storage.uri}/{name} is not a complete checkpoint (no {COMMIT_FILE} record): "
            "it does not exist or its save did not finish"
        ) from exc
    # The record's own name is not checked: a renamed or symlinked checkpoint keeps its COMMIT.
    # A COMMIT from another checkpoint is caught by its manifests' sizes, CRC32Cs and save ids.
    rec = decode_commit(blob, f"{storage.uri}/{key}")
    _remember_commit(storage, name, rec)
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
    if storage.capabilities.list_by_name:  # two levels of directories, not a walk of every file
        names = await cast(ListsByName, storage).list_names()
    else:
        names = {}
        for k in await storage.list(""):
            if "/" in k:
                head, _, rest = k.partition("/")
                names.setdefault(head, []).append(rest)
    latest = _known_of(storage).latest if _REMEMBER.get() else None
    if latest is None:
        try:
            latest = await read_latest(storage)
        except CheckpointError:
            pass
    out: list[CheckpointInfo] = []
    for name, files in names.items():
        path = f"{storage.uri.rstrip('/')}/{name}"
        if COMMIT_FILE not in files and RETIRED_FILE in files:
            out.append(CheckpointInfo(name, path, None, 0.0, 0, False, problem=(
                "deleted; files other checkpoints reference are kept until nothing references them")))
            continue
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
        rec = _known_of(storage).commits.get(name) if _REMEMBER.get() else None
        if rec is None:
            try:
                rec = await read_commit(storage, name)
            except CheckpointError as exc:
                out.append(CheckpointInfo(name, path, None, 0.0, 0, False, problem=str(exc)))
                continue
        try:
            kind_of(rec, path)
            problem = ""
        except FormatError as exc:  # a kind this version cannot read: never listed as loadable
            problem = str(exc)
        out.append(
            CheckpointInfo(
                name,
                path,
                rec.step,
                rec.created,
                rec.total_nbytes,
                not problem,
                problem=problem,
                logical_nbytes=rec.logical_nbytes if isinstance(rec.logical_nbytes, int) else rec.total_nbytes,
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
    probe = RecordProbe(storage, sem or asyncio.Semaphore(_CHECK_CONCURRENCY))
    try:
        async with probe.sem:
            rec = await read_commit(storage, name)
        jobs = kind_of(rec, f"{storage.uri.rstrip('/')}/{name}").checks(storage, name, rec, probe)
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


async def delete_checkpoint(storage: Storage, name: str, *, force: bool = False, pins: BasePins | None = None) -> Any:
    """Delete checkpoint ``name``, proven by its own records, COMMIT first; see :mod:`asyncckpt.deletion`.

    The one deletion used by the CLI, :func:`asyncckpt.delete`, retention and tier pruning.
    Returns a :class:`~asyncckpt.deletion.DeleteReport`.
    """
    from .deletion import delete_checkpoint as _delete  # deletion builds on this module

    return await _delete(storage, name, force=force, pins=pins)
