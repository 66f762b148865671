"""Kind ``"asyncckpt"``: the native format (a RankManifest and a chunked data file per rank)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any, ClassVar

from ..catalog import read_manifest, referenced_nbytes, verify_references
from ..errors import BadInputError, CheckpointError
from ..format import FORMAT_NAME, REFS, ChunkGeometry, CommitRecord, ManifestRef, RankManifest, verify_rank
from ..storage import Storage, join_key
from .base import CheckpointKind, GenerationFiles, Progress, RecordProbe, VerifyReport, register_kind

__all__ = ["NativeKind", "current_rank"]


def current_rank() -> int | None:
    """This process's rank when torch.distributed is initialized, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


class NativeKind(CheckpointKind):
    name: ClassVar[str] = FORMAT_NAME
    reader: ClassVar[str] = "load it with asyncckpt.load"
    has_rank_manifests: ClassVar[bool] = True

    def checks(self, storage: Storage, name: str, rec: CommitRecord, probe: RecordProbe) -> list[Awaitable[str]]:
        async def rank(ref: ManifestRef) -> str:
            async with probe.sem:
                m = await read_manifest(storage, name, ref.rank, ref)
            return await probe.check_size(m.data_file, ChunkGeometry.of(m).stored_nbytes,
                                          f"the manifest of rank {m.rank}")

        return [rank(ref) for ref in rec.manifests]

    async def generation_files(self, storage: Storage, name: str, rec: CommitRecord) -> GenerationFiles:
        out = GenerationFiles()
        for ref in rec.manifests:
            out.keys.append(join_key(name, ref.file))
            try:
                m = await read_manifest(storage, name, ref.rank, ref)
            except CheckpointError as exc:
                out.problems.append(str(exc))
                continue
            out.keys.append(m.data_file)
            out.shared = out.shared or REFS in m.features
        return out

    def data_layout(self, rec: CommitRecord) -> tuple[str, int | None, int, int] | None:
        return rec.layout, rec.step, rec.world_size, rec.generation

    def _rank(self, storage: Storage, name: str, rec: CommitRecord, rank: int | None) -> int:
        where = self.path(storage, name)
        if rank is None:
            rank = current_rank()
            if rank is None:
                if rec.world_size != 1:
                    raise BadInputError(f"{where} was saved by {rec.world_size} ranks; pass rank= to choose one")
                rank = 0
        if not 0 <= rank < rec.world_size:
            raise BadInputError(f"{where} has ranks 0..{rec.world_size - 1}, not {rank}")
        return rank

    async def load(self, storage: Storage, name: str, rec: CommitRecord, *, rank: int | None, allow_pickle: bool,
                   keys: Collection[str | int] | None) -> Any:
        from ..load import read_rank  # load dispatches here

        r = self._rank(storage, name, rec, rank)
        m = await read_manifest(storage, name, r, rec.manifests[r])
        return await read_rank(storage, m, allow_pickle=allow_pickle, keys=keys)

    async def verify(self, storage: Storage, name: str, rec: CommitRecord, progress: Progress,
                     total: Callable[[int], Any]) -> VerifyReport:
        report = VerifyReport()
        manifests: list[RankManifest] = []
        for ref in rec.manifests:
            try:
                manifests.append(await read_manifest(storage, name, ref.rank, ref))
                report.files += 1
            except CheckpointError as exc:
                report.problems.append(str(exc))
        total(sum(m.data_nbytes + referenced_nbytes(m) for m in manifests))
        for m in manifests:
            n, probs = await verify_rank(storage, m, progress)
            report.checked += n
            report.files += 1
            report.problems += probs
            n, probs = await verify_references(storage, m, progress)  # bytes stored by reference
            report.checked += n
            report.files += len(m.refs)
            report.problems += probs
        return report

    async def rank_manifest(self, storage: Storage, name: str, rec: CommitRecord, rank: int, verb: str
                            ) -> RankManifest:
        if not 0 <= rank < rec.world_size:
            raise BadInputError(f"{self.path(storage, name)} has ranks 0..{rec.world_size - 1}, not {rank}")
        return await read_manifest(storage, name, rank, rec.manifests[rank])


NATIVE = register_kind(NativeKind())
