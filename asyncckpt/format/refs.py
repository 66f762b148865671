"""References between checkpoints of one root (feature ``refs``, incremental saves).

Every stored entry of an incremental save records :func:`digest` of its raw bytes. An entry
whose key, kind, dtype, shape and digest equal those of the same key in the base checkpoint's
manifest is stored as a reference: ``Entry.ref`` indexes ``RankManifest.refs`` (the manifest
holding the bytes) and ``Entry.offset`` is the entry's offset in that manifest's data image. A
reference always names the manifest that holds the bytes (the base's own target when the base
entry was a reference): one hop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
import xxhash

from ..errors import FormatError
from .records import ALIGN, Entry, RankManifest, RefTarget

__all__ = ["ReferencePlan", "digest", "owned_offsets", "plan_references", "referenced_files", "resolve_reference"]


def digest(data: memoryview | bytes) -> bytes:
    """XXH3-128 of ``data``, big-endian (``DIGEST_SIZE`` bytes).

    A non-cryptographic hash: it proves equality of bytes written by this job's own training
    (a 2**-128 accidental collision), not against an adversary who crafts tensors; ~20x faster
    than BLAKE2b, which made hashing the cost of an incremental save.
    """
    return xxhash.xxh3_128_digest(data)


@dataclass(frozen=True)
class ReferencePlan:
    """What an incremental save writes: ``entries`` for its manifest, ``refs`` for its ``RankManifest.refs``,
    ``moves`` (old image offset, new image offset, nbytes) of the entries it still stores, ``data_nbytes``."""

    entries: list[Entry]
    refs: list[RefTarget]
    moves: list[tuple[int, int, int]]
    data_nbytes: int


def plan_references(entries: Sequence[Entry], digests: Mapping[int, bytes], base: RankManifest | None,
                    base_target: RefTarget | None, name: str = "") -> ReferencePlan:
    """Turn the entries whose bytes equal the base's into references; lay the rest out again, packed.

    ``digests`` holds the digest of every entry that owns bytes; ``base`` is the base checkpoint's
    manifest of this rank (None: a full save that still records digests) and ``base_target`` the
    reference to it. Bytes held by checkpoint ``name`` itself (an overwrite of a name the base
    references) are stored again, never referenced: a checkpoint references only its siblings.
    """
    by_key: dict[str, Entry] = {}
    if base is not None:
        by_key = {e.key: e for e in base.entries if e.view_of < 0 and e.digest}
    refs: list[RefTarget] = []
    ref_index: dict[str, int] = {}

    def target(t: RefTarget) -> int:
        if t.file not in ref_index:
            ref_index[t.file] = len(refs)
            refs.append(t)
        return ref_index[t.file]

    out: list[Entry] = []
    moves: list[tuple[int, int, int]] = []
    end = 0
    # owned entries in image order, so each moves towards the start (never over bytes not yet moved)
    order = sorted(range(len(entries)), key=lambda i: entries[i].offset)
    new: dict[int, Entry] = {}
    for i in order:
        e = entries[i]
        if e.view_of >= 0:
            continue
        d = digests[i]
        b = by_key.get(e.key)
        if (b is not None and base is not None and base_target is not None and b.digest == d and b.kind == e.kind
                and b.dtype == e.dtype and b.shape == e.shape and b.nbytes == e.nbytes and e.nbytes > 0):
            t = base.refs[b.ref] if b.ref >= 0 else base_target
            if t.name != name:
                new[i] = msgspec.structs.replace(e, offset=b.offset, digest=d, ref=target(t))
                continue
        off = -(-end // ALIGN) * ALIGN if e.nbytes else end
        moves.append((e.offset, off, e.nbytes))
        new[i] = msgspec.structs.replace(e, offset=off, digest=d)
        end = off + e.nbytes
    for i, e in enumerate(entries):
        if e.view_of >= 0:
            s = new[e.view_of]
            out.append(msgspec.structs.replace(e, offset=s.offset))
        else:
            out.append(new[i])
    return ReferencePlan(out, refs, moves, end)


def referenced_files(m: RankManifest) -> list[str]:
    """Root-relative keys of the manifests ``m``'s references point into."""
    used = {e.ref for e in m.entries if e.ref >= 0}
    return [t.file for i, t in enumerate(m.refs) if i in used]


def owned_offsets(target: RankManifest) -> dict[int, int]:
    """Image offset -> index of the entries of ``target`` that own bytes (the entries references can name)."""
    return {t.offset: j for j, t in enumerate(target.entries) if t.view_of < 0 and t.ref < 0 and t.nbytes}


def resolve_reference(e: Entry, target: RankManifest, offsets: Mapping[int, int], where: str) -> int:
    """The index of the entry of ``target`` that holds reference ``e``'s bytes (``offsets``: its
    :func:`owned_offsets`); FormatError when none does."""
    j = offsets.get(e.offset)
    if j is not None:
        t = target.entries[j]
        if (t.nbytes, t.digest, t.kind, t.dtype, t.shape) == (e.nbytes, e.digest, e.kind, e.dtype, e.shape):
            return j
    raise FormatError(f"{where}: key {e.key!r} refers to bytes [{e.offset}, {e.offset + e.nbytes}) of "
                      f"{target.data_file}, where no entry with its dtype, shape and digest lies")
