"""The seam from the engine's side: the CRC32C the engine computes reaches write_part, and
the catalog's cleanup goes by declared capabilities, not by probing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncckpt.catalog import commit_checkpoint
from asyncckpt.engine import write_chunks
from asyncckpt.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    DictNode,
    RankManifest,
    checksum,
    encode_manifest,
    manifest_file,
)
from asyncckpt.storage import Capabilities, LocalStorage

from .conftest import payload


class SpyStorage(LocalStorage):
    """A LocalStorage that records what its writers are given and what cleanup is asked of it."""

    def __init__(self, root: Path, caps: Capabilities) -> None:
        super().__init__(root)
        self.capabilities = caps  # type: ignore[misc]
        self.parts: list[tuple[int, int, int | None]] = []
        self.aborted: list[str] = []
        self.cleaned: list[str] = []

    async def open_writer(self, key: str, size_hint: int | None = None) -> Any:
        writer = await super().open_writer(key, size_hint)
        real = writer.write_part

        async def spy(index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
            self.parts.append((index, len(data), crc32c))
            await real(index, offset, data, crc32c=crc32c)

        writer.write_part = spy  # type: ignore[method-assign]
        return writer

    async def abort_incomplete_uploads(self, prefix: str = "") -> int:
        self.aborted.append(prefix)
        return 0

    async def cleanup_temp(self, prefix: str = "") -> int:
        self.cleaned.append(prefix)
        return await super().cleanup_temp(prefix)


async def test_write_chunks_hands_each_chunks_crc32c_to_the_backend(tmp_path: Path) -> None:
    st = SpyStorage(tmp_path, Capabilities())
    data = payload(3 * 1000 + 17, seed=1)
    crcs = await write_chunks(st, "ck/rank-0.data", memoryview(data), 1000, concurrency=2)
    assert crcs == [checksum(data[i : i + 1000]) for i in range(0, len(data), 1000)]
    assert sorted(st.parts) == [(i, min(1000, len(data) - 1000 * i), crcs[i]) for i in range(4)]
    assert (tmp_path / "ck" / "rank-0.data").read_bytes() == data
    await st.close()


@pytest.mark.parametrize(
    ("caps", "cleaned", "aborted"),
    [
        (Capabilities(), [], []),
        (Capabilities(cleanup_temp=True), ["step-1"], []),
        # one request for NAME: it covers NAME/rank-00000.data (a flat layout's data file)
        (Capabilities(abort_incomplete=True), [], ["step-1"]),
    ],
)
async def test_commit_cleans_up_by_declared_capabilities(
    tmp_path: Path, caps: Capabilities, cleaned: list[str], aborted: list[str]
) -> None:
    """Both cleanup methods exist on the spy: only what the capabilities declare is called."""
    st = SpyStorage(tmp_path, caps)
    data = payload(2500, seed=2)
    crcs = await write_chunks(st, "step-1/rank-00000.data", memoryview(data), 1000, concurrency=2)
    manifest = RankManifest(
        format=FORMAT_NAME, version=FORMAT_VERSION, name="step-1", rank=0, world_size=1, step=1,
        data_file="step-1/rank-00000.data", data_nbytes=len(data), chunk_size=1000, checksum_algo="crc32c",
        chunk_checksums=crcs, entries=[], tree=DictNode(keys=[], values=[]),
    )  # fmt: skip
    await st.put_record(f"step-1/{manifest_file(0)}", encode_manifest(manifest))
    await commit_checkpoint(st, "step-1", world_size=1, step=1)
    assert (st.cleaned, st.aborted) == (cleaned, aborted)
    await st.close()
