"""Kind ``"dcp"``: a DCP checkpoint written by asyncckpt's DCP writer (see :mod:`asyncckpt.dcp._format`).

Its COMMIT lists each rank's checksum record (``__R.checksums``); the checkpoint's ``.checksums``
index holds the CRC32C of its DCP ``.metadata``. It loads with ``torch.distributed.checkpoint.load``
(resharding to any world size), not with ``asyncckpt.load``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from ..dcp._format import DCP_KIND
from ..errors import CheckpointError, CheckpointNotFoundError, FormatError, IntegrityError
from ..format import CommitRecord, ManifestRef, checksum
from ..storage import Storage, join_key
from .base import CheckpointKind, GenerationFiles, Progress, RecordProbe, VerifyReport, register_kind

__all__ = ["DcpKind"]

_PIECE = 16 << 20  # an item is read and checked in pieces of this size (items may be GiBs)


class DcpKind(CheckpointKind):
    name: ClassVar[str] = DCP_KIND
    reader: ClassVar[str] = ("load it with torch.distributed.checkpoint.load or asyncckpt.dcp.AsyncStorageReader; "
                             "`asyncckpt verify` checks it")

    async def _rank_record(self, storage: Storage, name: str, ref: ManifestRef) -> Any:
        from ..dcp._format import decode_rank_record

        key = join_key(name, ref.file)
        try:
            blob = await storage.read(key)
        except CheckpointNotFoundError as exc:
            raise IntegrityError(f"{storage.uri}/{key}: checksum record of rank {ref.rank} is missing") from exc
        if len(blob) != ref.nbytes or checksum(blob) != ref.checksum:
            raise IntegrityError(f"{storage.uri}/{key}: checksum record of rank {ref.rank} does not match its "
                                 "commit record")
        return decode_rank_record(blob, f"{storage.uri}/{key}")

    async def _index(self, storage: Storage, name: str, generation: int) -> Any:
        from ..dcp._format import decode_index, index_file

        key = join_key(name, index_file(generation))
        try:
            blob = await storage.read(key)
        except CheckpointNotFoundError as exc:
            raise IntegrityError(f"{storage.uri}/{key}: the checksum index of the DCP checkpoint is missing") from exc
        return decode_index(blob, f"{storage.uri}/{key}")

    def checks(self, storage: Storage, name: str, rec: CommitRecord, probe: RecordProbe) -> list[Awaitable[str]]:
        from ..dcp._format import index_file, metadata_file

        async def rank(ref: ManifestRef) -> str:
            async with probe.sem:
                rr = await self._rank_record(storage, name, ref)
            for f in rr.files:
                problem = await probe.check_size(join_key(name, f.name), f.nbytes,
                                                 f"the checksum record of rank {ref.rank}")
                if problem:
                    return problem
            return ""

        async def metadata() -> str:
            async with probe.sem:
                index = await self._index(storage, name, rec.generation)
            return await probe.check_size(join_key(name, metadata_file(rec.generation)), index.metadata_nbytes,
                                          index_file(rec.generation))

        return [metadata(), *(rank(ref) for ref in rec.manifests)]

    async def generation_files(self, storage: Storage, name: str, rec: CommitRecord) -> GenerationFiles:
        from ..dcp._format import index_file, metadata_file

        out = GenerationFiles(keys=[join_key(name, index_file(rec.generation))])
        if rec.generation:
            out.keys.append(join_key(name, metadata_file(rec.generation)))
        for ref in rec.manifests:
            out.keys.append(join_key(name, ref.file))
            try:
                rr = await self._rank_record(storage, name, ref)
            except CheckpointError as exc:
                out.problems.append(str(exc))
                continue
            out.keys += [join_key(name, f.name) for f in rr.files]
        return out

    async def verify(self, storage: Storage, name: str, rec: CommitRecord, progress: Progress,
                     total: Callable[[int], Any]) -> VerifyReport:
        from ..dcp._format import metadata_file

        report = VerifyReport()
        records = []
        for ref in rec.manifests:
            try:
                records.append(await self._rank_record(storage, name, ref))
                report.files += 1
            except (FormatError, IntegrityError) as exc:
                report.problems.append(str(exc))
        try:
            index = await self._index(storage, name, rec.generation)
            report.files += 1
            md_key = join_key(name, metadata_file(rec.generation))
            blob = await storage.read(md_key)
            report.files += 1
            if len(blob) != index.metadata_nbytes or checksum(blob) != index.metadata_crc32c:
                report.problems.append(
                    f"{storage.uri}/{md_key} ({len(blob)} bytes, crc32c {checksum(blob):#010x}) does not match its "
                    f"checksum index ({index.metadata_nbytes} bytes, {index.metadata_crc32c:#010x})")
        except CheckpointNotFoundError as exc:
            report.problems.append(f"{storage.uri}/{name}: the DCP .metadata is missing ({exc})")
        except (FormatError, IntegrityError) as exc:
            report.problems.append(str(exc))
        total(sum(it.length for rr in records for it in rr.items))
        for rr in records:
            for f in rr.files:
                key = join_key(name, f.name)
                try:
                    size = await storage.size(key)
                except CheckpointNotFoundError:
                    report.problems.append(f"{storage.uri}/{key} is missing (rank {rr.rank})")
                    continue
                report.files += 1
                if size != f.nbytes:
                    report.problems.append(f"{storage.uri}/{key} is {size} bytes, the checksum record of rank "
                                           f"{rr.rank} says {f.nbytes}")
                    continue
                for it in (it for it in rr.items if it.file == f.name):
                    got = await _crc_of(storage, key, it.offset, it.length, progress)
                    report.checked += it.length
                    if got != it.crc32c:
                        report.problems.append(
                            f"{storage.uri}/{key}: item {it.fqn!r} (bytes {it.offset}..{it.offset + it.length}) "
                            f"fails its checksum (crc32c {got:#010x}, expected {it.crc32c:#010x}); the checkpoint "
                            "is corrupt: load an older one")
        return report


async def _crc_of(storage: Storage, key: str, offset: int, length: int, progress: Progress) -> int:
    """CRC32C of ``length`` bytes of ``key`` from ``offset``, read in pieces."""
    crc = 0
    buf = bytearray(min(length, _PIECE))
    done = 0
    while done < length:
        n = min(_PIECE, length - done)
        view = memoryview(buf)[:n]
        await storage.read_into(key, offset + done, view)
        crc = checksum(view, crc)
        done += n
        progress(n)
    return crc


DCP = register_kind(DcpKind())
