"""Tiered checkpoints: commit on a fast tier, drain to durable tiers in the background.

``Tiers("/nvme/ckpts", "s3://bucket/run", keep=[2, 20])`` is a root accepted by
``AsyncCheckpointer.save(sd, tiers / "step-100")`` and ``asyncckpt.load(tiers)``:

* the save commits on the first (fast) tier — the handle is committed then and training may
  rely on it;
* every rank's worker then copies its data file and manifest to each durable tier, verifying
  every chunk's CRC32C on the way (the one verified-chunk reader, asyncckpt.format.chunks), and the coordinator writes the durable tier's COMMIT (and
  ``latest``) once every rank has drained — the same global completion as a save; files an
  incremental checkpoint references are there already (its base drained first) or are copied too;
* ``load`` reads the fastest tier holding a complete, verified copy and falls back to the next
  when a tier is missing it or it fails verification;
* ``keep`` is per-tier retention (keep the last N complete checkpoints; None keeps all).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .errors import BadInputError
from .format import (
    COMMIT_FILE,
    ChunkGeometry,
    RankManifest,
    checksum,
    data_file,
    encode_manifest,
    manifest_file,
    manifest_file_rank,
    read_chunk,
    remember_manifest,
)
from .storage import Storage, join_key, open_storage

__all__ = ["TieredPath", "Tiers", "drain_rank"]

log = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class Tiers:
    """An ordered list of roots, fastest first; see the module docstring."""

    uris: tuple[str, ...]
    keep: tuple[int | None, ...] = ()
    storage_options: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def __init__(self, *uris: str | os.PathLike[str], keep: list[int | None] | None = None,
                 storage_options: list[dict[str, Any]] | None = None) -> None:
        if len(uris) < 1:
            raise BadInputError("Tiers needs at least one root")
        norm = tuple(os.path.abspath(os.fspath(u)) if "://" not in os.fspath(u) else os.fspath(u).rstrip("/") for u in uris)
        if len(set(norm)) != len(norm):
            raise BadInputError(f"Tiers roots must differ: {norm}")
        keep_t = tuple(keep) if keep is not None else (None,) * len(norm)
        if len(keep_t) != len(norm) or any(k is not None and k < 1 for k in keep_t):
            raise BadInputError(f"keep must give one count >= 1 (or None) per tier, got {keep}")
        opts = tuple(storage_options) if storage_options is not None else ({},) * len(norm)
        if len(opts) != len(norm):
            raise BadInputError("storage_options must give one dict per tier")
        object.__setattr__(self, "uris", norm)
        object.__setattr__(self, "keep", keep_t)
        object.__setattr__(self, "storage_options", opts)

    def __truediv__(self, name: str) -> TieredPath:
        return TieredPath(self, name)

    def __fspath__(self) -> str:  # for messages; the first tier is where saves land
        return self.uris[0]

    def storage(self, i: int) -> Storage:
        return open_storage(self.uris[i], **self.storage_options[i])

    def __repr__(self) -> str:
        return f"Tiers({', '.join(map(repr, self.uris))}, keep={list(self.keep)})"


@dataclass(frozen=True)
class TieredPath:
    """A checkpoint name under a Tiers root."""

    tiers: Tiers
    name: str

    def __fspath__(self) -> str:
        return f"{self.tiers.uris[0]}/{self.name}"

    def __str__(self) -> str:
        return f"{self.tiers!r}/{self.name}"


async def _copy_verified(src: Storage, dst: Storage, src_key: str, dst_key: str, m: RankManifest,
                         concurrency: int) -> None:
    """Stream one data file from ``src`` to ``dst`` as stored (compressed chunks stay compressed), each
    chunk's CRC32C verified on the way."""
    from .engine import write_stream

    geo = ChunkGeometry.of(m)

    async def piece(i: int) -> tuple[memoryview, int]:
        chunk = await read_chunk(src, m, geo, i, decode=False)
        return chunk.stored.data, chunk.crc

    writer = await dst.open_writer(dst_key, size_hint=geo.stored_nbytes)
    await write_stream(writer, len(geo), piece, m.chunk_size, concurrency)


async def _drain_references(src: Storage, dst: Storage, m: RankManifest, concurrency: int) -> int:
    """Make the files ``m``'s references point into exist on ``dst`` as on ``src`` (they usually do: the
    base drained before). One missing there is copied, verified, under its own key, marked retired
    unless ``dst`` holds it committed; one that differs there refuses the drain, naming it."""
    from .catalog import RETIRED_FILE, encode_retired, read_target, retired_generation
    from .errors import CheckpointNotFoundError, IntegrityError

    copied = 0
    for t in m.refs:
        tm = await read_target(src, m, t)  # checked against m's record of it
        try:
            blob = await dst.read(t.file)
        except CheckpointNotFoundError:
            blob = None
        if blob is not None:
            if len(blob) != t.nbytes or checksum(blob) != t.checksum:
                raise IntegrityError(f"{dst.uri}/{t.file} differs from {src.uri}/{t.file}, which {m.name} references; "
                                     f"{m.name} cannot be drained to {dst.uri} by reference (delete or rename it there)")
            continue
        if not await dst.exists(join_key(t.name, COMMIT_FILE)):  # swept once nothing references it
            got = manifest_file_rank(t.file.rpartition("/")[2])
            gen = max(got[1] if got else 0, await retired_generation(dst, t.name) or 0)
            await dst.put_record(join_key(t.name, RETIRED_FILE), encode_retired(gen))
        await _copy_verified(src, dst, tm.data_file, tm.data_file, tm, concurrency)
        await dst.put_record(t.file, await src.read(t.file))
        copied += ChunkGeometry.of(tm).stored_nbytes + t.nbytes
    return copied


async def drain_rank(storages: list[Storage], name: str, rank: int, concurrency: int = 4) -> dict[str, Any]:
    """Worker routine: copy this rank's files of ``name`` from ``storages[0]`` to every other one."""
    from .catalog import next_generation, read_commit, read_manifest

    t0 = time.perf_counter()
    src = storages[0]
    copied = 0
    rec = await read_commit(src, name)
    m = await read_manifest(src, name, rank, rec.manifests[rank])
    for dst in storages[1:]:
        # Beside what the tier holds under this name, as a save there would: its commit switches.
        generation, _ = await next_generation(dst, name, overwrite=True)
        copied += await _drain_references(src, dst, m, concurrency)
        dst_key = join_key(m.data_file.rpartition("/")[0], data_file(rank, generation))
        await _copy_verified(src, dst, m.data_file, dst_key, m, concurrency)
        drained = msgspec.structs.replace(m, name=name, data_file=dst_key)
        blob = encode_manifest(drained)
        remember_manifest(blob, drained)  # the tier's commit reads it back
        await dst.put_record(join_key(name, manifest_file(rank, generation)), blob)
        copied += ChunkGeometry.of(m).stored_nbytes + len(blob)
    dt = time.perf_counter() - t0
    log.info("drained", extra={"rank": rank, "step": m.step, "op": "drain", "bytes": copied, "seconds": dt})
    return {"name": name, "rank": rank, "bytes": copied, "seconds": dt}
