"""Safe deletion (invariant 10): only checkpoints, proven by their own records, and only their own keys.

A name under a root is deleted only when one of its records proves it is a checkpoint:

* a ``COMMIT`` record that passes its record checksum (asyncckpt, or asyncckpt's DCP writer);
* a ``rank-NNNNN.manifest`` that decodes as asyncckpt's manifest of that name (an incomplete save);
* a DCP checksum record of asyncckpt's DCP writer (``__R.checksums``, ``.checksums``);
* a DCP ``.metadata`` that unpickles, with DCP's own classes only, as DCP ``Metadata`` (stock DCP);
* a temp file of one of the names above (``*.tmp-<12 hex>``: a local save torn by a crash).

Then exactly these keys go: the names the format reserves directly under ``NAME/`` (``COMMIT``,
``rank-NNNNN.manifest``/``.data``, ``.metadata``, ``.checksums``, ``__R.checksums``,
``__R_I.distcp`` and their temp files), each rank's data file where its manifest, or the
key layout recorded in COMMIT, puts it (``HH/NAME/rank-NNNNN.data`` for a spread layout), and
the keys under ``NAME/`` that the committed generation's own records name (the handler of its
kind lists them: :meth:`asyncckpt.kinds.CheckpointKind.generation_files`). A COMMIT of a kind this
version has no handler for is refused (DeleteRefusedError): nothing says which files it owns.
Anything else under ``NAME/`` (a user's ``notes.txt``) stays. A ``NAME`` that is a symbolic link
(inside the root) to a checkpoint is an alias: only the link is removed. Order: ``COMMIT`` first, then
DCP's ``.metadata`` (both commit points: the checkpoint is never seen complete and half
deleted), data, then the records that prove ownership last, so an interrupted delete can be
finished by running it again. Where the storage declares ``delete_many``, the same three steps go
as three batches, each durable before the next (one request, or one directory fsync per directory,
per step): see docs/reliability.md, "The save cycle's storage requests".
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ._loop import run_sync
from .catalog import (
    RETIRED_FILE,
    BasePins,
    encode_retired,
    forget_checkpoint,
    known_manifest,
    list_all,
    read_commit,
    read_latest,
    read_manifest,
    referenced_by,
    retired_generation,
    set_latest,
)
from .errors import (
    BadInputError,
    CheckpointError,
    CheckpointNotFoundError,
    DeleteRefusedError,
    FormatError,
    IntegrityError,
    NotACheckpointError,
    StorageError,
)
from .format import (
    COMMIT_FILE,
    LATEST_FILE,
    REFS,
    CommitRecord,
    RankManifest,
    data_file,
    data_file_rank,
    manifest_file_rank,
)
from .kinds.base import CheckpointKind, kind_of
from .locate import describe_local, is_missing_bucket, local_path
from .storage import (
    TEMP_MARK,
    AbortsIncompleteUploads,
    DeletesMany,
    LocalStorage,
    Storage,
    join_key,
    open_storage,
    split_uri,
)
from .storage.layouts import data_prefix
from .tiers import TieredPath, Tiers

__all__ = ["DeleteReport", "delete", "delete_async", "delete_checkpoint", "on_delete", "sweep_retired"]

log = logging.getLogger("asyncckpt")

_MANIFEST = re.compile(r"rank-(\d{5,})(?:\.g[1-9]\d*)?\.manifest")
_DATA = re.compile(r"rank-(\d{5,})(?:\.g[1-9]\d*)?\.data")
_DCP_DATA = re.compile(r"__\d+_\d+(?:\.g[1-9]\d*)?\.distcp")
_DCP_RANK = re.compile(r"__(\d+)(?:\.g[1-9]\d*)?\.checksums")
_DCP_METADATA = ".metadata"
_DCP_INDEX = re.compile(r"(?:\.g[1-9]\d*)?\.checksums")  # a collective save's index (generation 0, or G)
_DCP_GEN_METADATA = re.compile(r"\.g[1-9]\d*\.metadata")
_TEMP = re.compile(r"(.+)\.tmp-[0-9a-f]{12}")
_SPREAD = re.compile(r"[0-9a-f]{2,}|p\d{2,}")
_MAX_PROBED_RANKS = 1 << 16  # a manifest's world_size is not bounded by anything else
_RECORDS = "COMMIT, rank-NNNNN.manifest, DCP .metadata or asyncckpt's DCP .checksums"


def _reserved(fname: str) -> bool:
    """A name asyncckpt's formats (native, DCP) give a file directly under a checkpoint's directory."""
    return (fname in (COMMIT_FILE, _DCP_METADATA) or bool(_DCP_INDEX.fullmatch(fname))
            or bool(_DCP_GEN_METADATA.fullmatch(fname)) or bool(_MANIFEST.fullmatch(fname))
            or bool(_DATA.fullmatch(fname)) or bool(_DCP_DATA.fullmatch(fname)) or bool(_DCP_RANK.fullmatch(fname)))


@dataclass
class DeleteReport:
    """What :func:`delete` removed (keys relative to the root)."""

    path: str  #: the checkpoint's path (``ROOT/NAME``)
    kind: str  #: the COMMIT's kind (``"asyncckpt"``, ``"dcp"``: asyncckpt's DCP writer), or ``"dcp (stock)"``
    complete: bool  #: it had a valid COMMIT (or, stock DCP, a readable ``.metadata``)
    deleted: list[str] = field(default_factory=list)  #: keys removed, in the order removed
    kept: list[str] = field(default_factory=list)  #: keys under ``NAME/`` that were not the checkpoint's
    latest: str | None = None  #: where ``latest`` points now, when this delete moved it ("" = removed)
    notes: list[str] = field(default_factory=list)  #: what the records could not establish


@dataclass
class _Plan:
    kind: str
    complete: bool
    commit: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    uploads: list[str] = field(default_factory=list)  # keys whose unfinished S3 uploads to abort
    data_of: dict[str, str] = field(default_factory=dict)  # manifest key -> its data file's key
    refs: bool = False  # a manifest uses feature "refs": others may reference its bytes, it may reference others'
    referenced: dict[str, set[str]] = field(default_factory=dict)  # manifest key kept -> who references it
    retired: str = ""  # the RETIRED marker's key when there is one
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def order(self) -> list[str]:
        keep = {k for m in self.referenced for k in (m, self.data_of.get(m, m))}
        marker = [self.retired] if self.retired and not self.referenced else []
        return [k for k in dict.fromkeys(self.commit + self.data + self.records + self.manifests + marker)
                if k not in keep]


def _temp_names(names: Iterable[str]) -> list[str]:
    """Those of ``names`` that are temp files of asyncckpt's names, sorted."""
    return [n for n in sorted(names) if (m := _TEMP.fullmatch(n)) and _reserved(m.group(1))]


def _local_temps(storage: Storage, prefix: str) -> list[str]:
    """Temp files of asyncckpt's names directly under ``prefix`` (local roots; listings hide them)."""
    if not isinstance(storage, LocalStorage):
        return []
    d = storage.path(prefix)
    try:
        names = os.listdir(d) if d.is_dir() and not d.is_symlink() else []
    except OSError:
        return []
    return [join_key(prefix, n) for n in _temp_names(names) if (d / n).is_file()]


def _data_key_ok(key: str, name: str) -> bool:
    """A manifest's data file must be this checkpoint's own: ``NAME/rank-N.data`` or ``SPREAD/NAME/rank-N.data``."""
    parts = key.split("/")
    if len(parts) == 2:
        return parts[0] == name and bool(_DATA.fullmatch(parts[1]))
    return len(parts) == 3 and bool(_SPREAD.fullmatch(parts[0])) and parts[1] == name and bool(_DATA.fullmatch(parts[2]))


async def _dcp_evidence(storage: Storage, name: str, direct: set[str], plan_notes: list[str]) -> tuple[bool, bool]:
    """(asyncckpt's DCP records readable, stock DCP .metadata readable)."""
    from .dcp._format import decode_index, decode_rank_record, load_metadata

    ours = stock = False
    for fname in sorted(direct):
        if not (_DCP_RANK.fullmatch(fname) or _DCP_INDEX.fullmatch(fname)):
            continue
        key = join_key(name, fname)
        try:
            blob = await storage.read(key)
            (decode_index if _DCP_INDEX.fullmatch(fname) else decode_rank_record)(blob, f"{storage.uri}/{key}")
            ours = True
        except (FormatError, IntegrityError, CheckpointNotFoundError) as exc:
            plan_notes.append(str(exc))
    if _DCP_METADATA in direct:
        key = join_key(name, _DCP_METADATA)
        try:
            md = load_metadata(await storage.read(key), f"{storage.uri}/{key}")
            stock = True
            for info in (getattr(md, "storage_data", None) or {}).values():
                rel = str(getattr(info, "relative_path", ""))
                if rel and not _DCP_DATA.fullmatch(rel):
                    plan_notes.append(f"{storage.uri}/{key} names a data file {rel!r} outside the DCP layout; left in place")
        except (FormatError, IntegrityError, CheckpointNotFoundError) as exc:
            plan_notes.append(str(exc))
    return ours, stock


async def _direct_files(storage: Storage, name: str) -> tuple[set[str], list[str] | None, list[str]]:
    """Names of the files directly under ``NAME/`` (a local directory is not walked: it may be anything);
    every key under ``NAME/`` (what ``storage.list(NAME)`` gives) when the one look it took shows them all
    (an object store's listing; a local directory without subdirectories), else None; and, on a local
    root, the temp files of asyncckpt's names directly under it (listings hide them)."""
    if isinstance(storage, LocalStorage):
        d = storage.path(name)
        link = d.is_symlink()
        if link:
            await storage.list(name)  # refuses a link leading outside the root
        if not d.is_dir():
            return set(), None, []
        try:
            with os.scandir(d) as it:
                found = list(it)
        except OSError as exc:
            raise StorageError(exc.errno or 0, f"cannot list {d}: {exc.strerror or exc}") from exc
        # One look serves the three: is_file/is_dir follow links, as (d / n).is_file() and os.walk do.
        files = {e.name for e in found if e.is_file()}
        temps = [] if link else [join_key(name, n) for n in _temp_names(files)]
        listed = None
        if not any(e.is_dir() for e in found):  # nothing deeper: this look is what storage.list(NAME) walks
            listed = sorted(f"{name}/{e.name}" for e in found if TEMP_MARK not in e.name)
        return files, listed, temps
    listed = await storage.list(name)
    return {k[len(name) + 1 :] for k in listed if "/" not in k[len(name) + 1 :]}, listed, []


async def _examine(storage: Storage, name: str) -> _Plan | str:
    """The keys of checkpoint ``name`` as its records name them, or (a str) what the name holds instead."""
    direct, listed, temps = await _direct_files(storage, name)
    problems: list[str] = []
    rec: CommitRecord | None = None
    kind: CheckpointKind | None = None
    if COMMIT_FILE in direct:
        try:
            rec = await read_commit(storage, name)
        except (FormatError, IntegrityError) as exc:
            problems.append(str(exc))
    if rec is not None:
        try:
            kind = kind_of(rec, f"{storage.uri.rstrip('/')}/{name}")
        except FormatError as exc:  # its handler would say which files it owns: none here to ask
            raise DeleteRefusedError(f"{exc}. Nothing was deleted: this asyncckpt cannot tell which files a "
                                     f"{rec.kind!r} checkpoint owns") from exc
    manifests: dict[str, RankManifest] = {}  # by file name: a rank may have several generations
    committed = {ref.file: ref for ref in rec.manifests} if rec is not None and kind is not None else {}
    for fname in sorted(direct):
        got = manifest_file_rank(fname)
        if got is None:
            continue
        ref = committed.get(fname)
        known = known_manifest(storage, name, ref) if ref is not None and ref.rank == got[0] else None
        if known is not None:  # the bytes its COMMIT certifies, read or committed by this process before
            manifests[fname] = known
            continue
        try:
            manifests[fname] = await read_manifest(storage, name, got[0], file=fname)
        except (FormatError, IntegrityError) as exc:
            problems.append(str(exc))
    dcp_ours, dcp_stock = await _dcp_evidence(storage, name, direct, problems)
    if rec is None and not manifests and not dcp_ours and not dcp_stock and not temps:
        return await _why_not(storage, name, problems)

    native = (kind is not None and kind.has_rank_manifests) or bool(manifests) or any(
        _MANIFEST.fullmatch(f) or _DATA.fullmatch(f) for f in direct)
    label = kind.name if kind is not None else ("asyncckpt" if native else "dcp" if dcp_ours else "dcp (stock)")
    complete = rec is not None or (dcp_stock and not native and not dcp_ours)
    plan = _Plan(kind=label, complete=complete, notes=[f"damaged record: {p}" for p in problems])
    if COMMIT_FILE in direct:
        plan.commit.append(join_key(name, COMMIT_FILE))
    if _DCP_METADATA in direct:
        plan.commit.append(join_key(name, _DCP_METADATA))
    for fname in sorted(direct):
        key = join_key(name, fname)
        if _DATA.fullmatch(fname) or _DCP_DATA.fullmatch(fname):
            plan.data.append(key)
        elif _DCP_RANK.fullmatch(fname) or _DCP_INDEX.fullmatch(fname) or _DCP_GEN_METADATA.fullmatch(fname):
            plan.records.append(key)
        elif _MANIFEST.fullmatch(fname):
            plan.manifests.append(key)
    if RETIRED_FILE in direct:
        plan.retired = join_key(name, RETIRED_FILE)
    for fname, m in manifests.items():
        plan.refs = plan.refs or REFS in m.features
        if _data_key_ok(m.data_file, name):
            plan.data.append(m.data_file)
            plan.data_of[join_key(name, fname)] = m.data_file
        else:
            plan.notes.append(f"the manifest of rank {m.rank} names {m.data_file!r} as its data file, which is not "
                              "this checkpoint's key; left in place")
    if kind is not None and rec is not None:  # what the committed generation's own records name
        named = set(plan.order())
        try:
            own = (await kind.generation_files(storage, name, rec)).keys
        except CheckpointError as exc:
            own = []
            plan.notes.append(f"the committed records cannot all be read ({exc}); files only they name are left")
        for key in own:
            head, _, fname = key.rpartition("/")
            if key not in named and ((head == name and fname != COMMIT_FILE) or _data_key_ok(key, name)):
                plan.data.append(key)
    # Ranks without a readable manifest: their data file is where the recorded key layout puts it.
    layout = kind.data_layout(rec) if kind is not None and rec is not None else None
    if layout is None and manifests:
        first = next(iter(manifests.values()))
        layout = (first.layout, first.step, first.world_size, 0)
    read_ranks = {m.rank for m in manifests.values()}
    if layout is not None:
        try:
            prefix = data_prefix(layout[0], name, layout[1])
        except BadInputError as exc:
            plan.notes.append(f"unknown key layout ({exc}): data files of ranks without a readable manifest are left")
        else:
            if layout[2] > _MAX_PROBED_RANKS:
                plan.notes.append(f"the records claim {layout[2]} ranks; data files of ranks without a readable "
                                  f"manifest were looked for among the first {_MAX_PROBED_RANKS} only")
            for rank in range(min(layout[2], _MAX_PROBED_RANKS)):
                for gen in dict.fromkeys((layout[3], 0)):
                    key = join_key(prefix, data_file(rank, gen))
                    if rank not in read_ranks and (await storage.exists(key)):
                        plan.data.append(key)
                    if not plan.complete:
                        plan.uploads.append(key)
            if prefix != name:
                temps += _local_temps(storage, prefix)
    plan.data += temps
    if not plan.complete:
        plan.uploads += [k for k in plan.order() if not k.endswith(f"/{COMMIT_FILE}")]
    if plan.refs:  # mark: the files of this checkpoint that other checkpoints reference stay
        refd = await referenced_by(storage, exclude={name})
        plan.referenced = {k: refd[k] for k in plan.manifests if k in refd}
    mine = set(plan.order()) | {k for m in plan.referenced for k in (m, plan.data_of.get(m, m))}
    if plan.referenced or plan.retired:
        mine.add(join_key(name, RETIRED_FILE))
    plan.kept = [k for k in (listed if listed is not None else await storage.list(name)) if k not in mine]
    return plan


async def _why_not(storage: Storage, name: str, problems: list[str]) -> str:
    if problems:
        return (f"its records are damaged ({'; '.join(problems)}) and no other record ({_RECORDS}) can be read, so "
                "nothing proves what it holds. If you know it is a checkpoint, delete it by hand")
    if isinstance(storage, LocalStorage):
        return f"it is {describe_local(storage.path(name))} and none of asyncckpt's or DCP's records ({_RECORDS})"
    listed = await storage.list(name)
    if not listed:
        if await storage.exists(name):
            return f"it is an object of {await storage.size(name)} bytes, not a checkpoint prefix"
        return ""
    shown = ", ".join(k[len(name) + 1 :] for k in listed[:4]) + (" ..." if len(listed) > 4 else "")
    return f"it is a prefix holding {len(listed)} object(s) ({shown}) and none of asyncckpt's or DCP's records ({_RECORDS})"


async def _remove(storage: Storage, name: str, plan: _Plan) -> list[str]:
    done: list[str] = []
    if plan.referenced:
        # Retired before COMMIT goes: a crash in between leaves it committed (COMMIT wins), never unmarked.
        gens = [got[1] for key in plan.manifests + plan.data
                if (got := manifest_file_rank(key.rpartition("/")[2]) or data_file_rank(key.rpartition("/")[2]))]
        await storage.put_record(join_key(name, RETIRED_FILE), encode_retired(max(gens, default=0)))
        for m, who in sorted(plan.referenced.items()):
            plan.notes.append(f"kept {m} and its data: referenced by {', '.join(sorted(who))}; they go once "
                              "nothing references them")
    order = plan.order()
    if storage.capabilities.delete_many and isinstance(storage, DeletesMany):
        # Three steps, each durable before the next (see docs/reliability.md, "deletion"): the commit
        # points; the data and other files; the records that prove whose files they were. Each step is
        # one request (S3) or one directory fsync per directory (local), not one per key.
        points, proofs = set(plan.commit), set(plan.manifests) | {plan.retired}
        groups = [[k for k in order if k in points], [k for k in order if k not in points and k not in proofs],
                  [k for k in order if k in proofs]]
        await storage.delete_many([g for g in groups if g])
        done += order
    else:
        for key in order:
            await storage.delete(key)
            done.append(key)
    forget_checkpoint(storage, name)
    if storage.capabilities.abort_incomplete and isinstance(storage, AbortsIncompleteUploads):
        for key in dict.fromkeys(plan.uploads):  # object stores: unfinished uploads of exactly these keys
            try:
                await storage.abort_incomplete_uploads(key)
            except CheckpointError as exc:
                plan.notes.append(f"could not abort unfinished uploads of {key}: {exc}")
    return done


async def _move_latest_off(storage: Storage, name: str) -> str:
    """Point ``latest`` at the newest other complete checkpoint (or remove it); returns the new target ("" = removed)."""
    rest = [i for i in await list_all(storage) if i.complete and i.name != name]
    if rest:
        await set_latest(storage, rest[0].name, rest[0].step)
        return rest[0].name
    await storage.delete(LATEST_FILE)
    return ""


_on_delete: list[weakref.WeakMethod[Callable[[str, str], None]]] = []


def on_delete(callback: Callable[[str, str], None]) -> None:
    """Call the bound method ``callback(root_uri, name)`` after each checkpoint this process deletes
    (held weakly: it stops with its object). Checkpointers use it to forget what they committed."""
    _on_delete[:] = [r for r in _on_delete if r() is not None]
    _on_delete.append(weakref.WeakMethod(callback))  # type: ignore[arg-type]


def _deleted(storage: Storage, name: str) -> None:
    for ref in list(_on_delete):
        cb = ref()
        if cb is not None:
            cb(storage.uri, name)


async def delete_checkpoint(storage: Storage, name: str, *, force: bool = False,
                            pins: BasePins | None = None) -> DeleteReport:
    """Delete checkpoint ``name`` under ``storage`` as its records prove and name it (see the module docstring).

    ``pins``: the bases of incremental saves being written in this process, refused too
    (DeleteRefusedError). Refuses (DeleteRefusedError) the checkpoint ``latest`` points to unless ``force``, which first
    moves ``latest`` to the newest other complete checkpoint (or removes it). Raises
    NotACheckpointError when nothing proves ``name`` is a checkpoint, CheckpointNotFoundError when
    nothing is there.
    """
    where = f"{storage.uri.rstrip('/')}/{name}"
    try:
        join_key(name)
    except IntegrityError as exc:
        raise BadInputError(f"{where}: not a checkpoint name ({exc})") from exc
    if "/" in name or not name:
        raise BadInputError(f"{where}: a checkpoint name is one path component")
    token = pins.token(name) if pins is not None else (False, 0)
    # `latest` is read beside the examination (one round trip less), still from storage and before any delete
    found, latest = await asyncio.gather(_examine(storage, name), read_latest(storage), return_exceptions=True)
    if isinstance(found, BaseException):
        raise found
    if isinstance(found, str):
        if not found or not await _exists_at(storage, name):
            raise CheckpointNotFoundError(f"{where}: no checkpoint there (nothing at that path); nothing was deleted")
        raise NotACheckpointError(f"{where} is not a checkpoint: {found}; nothing was deleted")
    target: str | None
    if isinstance(latest, (FormatError, IntegrityError)):  # cannot tell where it points: as if it pointed here
        damaged, target = str(latest), name
    elif isinstance(latest, BaseException):
        raise latest
    else:
        damaged, target = "", latest.name if latest is not None else None
    report = DeleteReport(path=where, kind=found.kind, complete=found.complete, kept=found.kept)
    if target == name:
        if not force:
            why = (f"'{LATEST_FILE}' is damaged, so it may point to {name} ({damaged})" if damaged
                   else f"{where} is what '{LATEST_FILE}' points to")
            raise DeleteRefusedError(
                f"{why}; not deleted (force=True / --force deletes it and "
                f"{'rewrites' if damaged else 'moves'} '{LATEST_FILE}' to the newest remaining checkpoint)"
            )
        report.latest = await _move_latest_off(storage, name)
    link = storage.path(name) if isinstance(storage, LocalStorage) else None
    if link is not None and link.is_symlink():
        # A link is an alias (Lightning's ``last.ckpt``): removing it never removes what it leads to.
        target = os.readlink(link)
        await storage.delete(name)
        report.deleted, report.kept = [name], []
        report.notes = [f"{name} is a symbolic link to {target}: only the link was removed; the checkpoint it "
                        "leads to stays (delete it by its own path)"]
        log.info("deleted the link %s (-> %s)", where, target)
        return report
    # No await between the check and marking it deleted: a save pinning it from now on does not use it.
    if pins is not None and not pins.begin_delete(name, token):
        raise DeleteRefusedError(f"{where} is the base of an incremental save being written; not deleted (retention "
                                 "tries again on its next pass)")
    try:
        report.deleted = await _remove(storage, name, found)
    finally:
        if pins is not None:
            pins.end_delete(name)
    _deleted(storage, name)
    report.notes = found.notes
    if found.refs:
        report.deleted += await sweep_retired(storage)
    log.info("deleted %s (%d keys%s)", where, len(report.deleted),
             f"; left in place: {', '.join(report.kept[:5])}" if report.kept else "")
    return report


async def sweep_retired(storage: Storage) -> list[str]:
    """Remove the files of deleted checkpoints that nothing references any more (data first, the
    manifest next, the ``RETIRED`` marker last, so an interrupted sweep is finished by the next one)."""
    retired = [k.partition("/")[0] for k in await storage.list("") if k.endswith(f"/{RETIRED_FILE}")
               and k.count("/") == 1]
    if not retired:
        return []
    refd = await referenced_by(storage)
    done: list[str] = []
    for name in retired:
        try:
            rec = await read_commit(storage, name)
        except CheckpointNotFoundError:
            rec = None
        except (FormatError, IntegrityError):
            continue  # a damaged COMMIT: what it holds is for `asyncckpt rm` to settle, not a sweep
        done += await _sweep_name(storage, name, rec, refd)
    if done:
        log.info("removed %d files of deleted checkpoints that nothing references any more", len(done))
    return done


async def _sweep_name(storage: Storage, name: str, rec: CommitRecord | None, refd: dict[str, set[str]]) -> list[str]:
    """Remove the unreferenced retired files of ``name`` (data, then manifest), and the marker once none
    is left. Retired are the generations up to the marker's that ``rec`` (a COMMIT written since: the
    name was saved again, or a crash stopped its deletion) does not hold. Files past the marker's
    generation belong to a save of the name in progress: the marker stays, as its commit needs it."""
    done: list[str] = []
    upto = await retired_generation(storage, name)
    if upto is None:
        return done
    current = {join_key(name, ref.file) for ref in rec.manifests} if rec is not None else set()
    left = False
    for key in await storage.list(name):
        fname = key.rpartition("/")[2]
        got = manifest_file_rank(fname)
        newer = (got or data_file_rank(fname) or (0, -1))[1] > upto
        if rec is None and newer:
            left = True
        if got is None or key in current or newer:
            continue
        if key in refd:
            left = True
            continue
        try:
            m = await read_manifest(storage, name, got[0], file=fname)
        except CheckpointNotFoundError:
            continue
        except (FormatError, IntegrityError):
            left = True  # cannot tell its data file: leave both
            continue
        for k in ((m.data_file,) if _data_key_ok(m.data_file, name) else ()) + (key,):
            await storage.delete(k)
            done.append(k)
    if not left:
        await storage.delete(join_key(name, RETIRED_FILE))
        done.append(join_key(name, RETIRED_FILE))
    return done


async def _exists_at(storage: Storage, name: str) -> bool:
    if isinstance(storage, LocalStorage):
        p = storage.path(name)
        return p.exists() or p.is_symlink()
    return await storage.exists(name) or bool(await storage.list(name))


async def delete_async(
    path: str | os.PathLike[str], *, force: bool = False, storage_options: dict[str, Any] | None = None
) -> DeleteReport:
    """Async form of :func:`delete`."""
    if isinstance(path, (Tiers, TieredPath)):
        raise BadInputError(
            f"delete takes one root's path, not {path!s}: delete from each tier you mean (tiers.uris), "
            "e.g. asyncckpt.delete(f'{tiers.uris[1]}/NAME')"
        )
    p = os.fspath(path)
    if not p:
        raise BadInputError("empty path: give ROOT/NAME, or a ROOT (meaning the checkpoint its 'latest' points to)")
    opts = dict(storage_options or {})
    lp = local_path(p)
    if lp is not None:
        if lp.is_file() or (lp.is_symlink() and not lp.is_dir()):
            raise NotACheckpointError(f"{p} is not a checkpoint: it is {describe_local(lp)}; nothing was deleted")
        if not lp.exists():
            raise CheckpointNotFoundError(f"{p}: no such file or directory; nothing was deleted")
    try:
        return await _delete(p, force, opts)
    except StorageError as exc:
        if is_missing_bucket(exc):
            raise CheckpointNotFoundError(f"{p}: {exc}") from exc
        raise


async def _delete(p: str, force: bool, opts: dict[str, Any]) -> DeleteReport:
    try:
        root, name = split_uri(p)
    except BadInputError:
        root, name = "", ""
    refusal: NotACheckpointError | CheckpointNotFoundError | None = None
    if root:
        parent = open_storage(root, **opts)
        try:
            return await delete_checkpoint(parent, name, force=force)
        except (NotACheckpointError, CheckpointNotFoundError) as exc:
            refusal = exc
        finally:
            await parent.close()
    storage = open_storage(p, **opts)  # maybe a root: then it means its `latest`
    try:
        latest = await read_latest(storage)
        if latest is not None:
            if not force:
                raise DeleteRefusedError(
                    f"{p} is a root; as a checkpoint path it means the one '{LATEST_FILE}' points to, {latest.name}, "
                    f"which is not deleted without force=True / --force (that deletes {latest.name} and moves "
                    f"'{LATEST_FILE}' to the newest remaining checkpoint). To delete another one, name it: {p}/NAME. "
                    "The root itself is never deleted"
                )
            return await delete_checkpoint(storage, latest.name, force=True)
        held = await _checkpoints_in(storage)
    finally:
        await storage.close()
    if held:
        raise NotACheckpointError(
            f"{p} is a root holding {len(held)} checkpoint(s) ({', '.join(held[:4])}{' ...' if len(held) > 4 else ''}) "
            f"and no '{LATEST_FILE}' pointer; name the one to delete ({p}/NAME) or use prune. Nothing was deleted"
        )
    if refusal is not None:
        raise refusal
    raise CheckpointNotFoundError(f"{p}: no checkpoint there; nothing was deleted")


async def _checkpoints_in(storage: Storage) -> list[str]:
    """Names of the checkpoints directly under a root (a local directory is not walked)."""
    if isinstance(storage, LocalStorage):
        if not storage.root.is_dir():
            return []
        return sorted(d.name for d in storage.root.iterdir()
                      if d.is_dir() and ((d / COMMIT_FILE).is_file() or any(d.glob("rank-*.manifest"))))
    return [i.name for i in await list_all(storage)]


def delete(path: str | os.PathLike[str], *, force: bool = False,
           storage_options: dict[str, Any] | None = None) -> DeleteReport:
    """Delete the checkpoint at ``path`` (``ROOT/NAME``; a ``ROOT`` means the one its ``latest`` points to).

    Only a path whose own records prove it is an asyncckpt or DCP checkpoint (complete, or an
    incomplete save) is deleted, and only the keys those records and the key layout name: other
    files under it stay (listed in ``DeleteReport.kept``). ``COMMIT`` goes first, so the
    checkpoint is never seen half deleted. The ``latest`` target (and so a ROOT) is refused with
    DeleteRefusedError unless ``force=True``, which moves ``latest`` to the newest remaining
    complete checkpoint first; ``force`` never widens what counts as a checkpoint. Anything else
    raises NotACheckpointError saying what the path holds, or CheckpointNotFoundError when
    nothing is there; in both cases nothing is deleted.
    """
    return run_sync(delete_async(path, force=force, storage_options=storage_options))
