"""The load path (issue 14): chunks read straight into the loaded tensors, each checked where it landed.

Loads must be bit-exact for every dtype family, views, empty and 0-d tensors, compressed and
incremental checkpoints and ``keys=`` selections; a corrupt byte anywhere in a chunk (inside an
entry or in the padding between entries) fails naming the file and keys, and nothing partial is
handed back or written into ``into=`` objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt._loop import run_sync
from asyncckpt.catalog import read_commit, read_manifest
from asyncckpt.format import ChunkGeometry, RankManifest, read_entries_into, stored_entries
from asyncckpt.storage import Capabilities, LocalStorage

MiB = 1 << 20

_FAMILIES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
             torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.complex64, torch.complex128,
             torch.float8_e4m3fn, torch.float8_e5m2]


def _bits(dtype: torch.dtype, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``dtype`` with random bit patterns (NaN payloads included)."""
    n = int(np.prod(shape)) if shape else 1
    return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)


def _same(a: Any, b: Any) -> None:
    """``b`` equals ``a`` bit for bit (tensors: dtype, shape, bytes), recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and b.dtype == a.dtype and b.shape == a.shape
        assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def _manifest(path: Path) -> RankManifest:
    storage = LocalStorage(path.parent)

    async def go() -> RankManifest:
        rec = await read_commit(storage, path.name)
        return await read_manifest(storage, path.name, 0, rec.manifests[0])

    try:
        return run_sync(go())
    finally:
        run_sync(storage.close())


def _flip(path: Path, offset: int) -> None:
    with open(path / "rank-00000.data", "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def _small_state(n: int = 12) -> dict[str, torch.Tensor]:
    """``n`` small tensors: one chunk spanning all of them."""
    g = torch.Generator().manual_seed(1)
    return {f"x{i:02d}": torch.randn(1000 + 7 * i, generator=g) for i in range(n)}


def test_every_dtype_family_views_empty_and_0d_bit_exact(shared_ckpt, tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 50, generator=g)
    state: dict[str, Any] = {str(dt).removeprefix("torch."): _bits(dt, (3, 17), g) for dt in _FAMILIES}
    state.update({
        "bool": torch.randint(0, 2, (33,), generator=g).bool(),
        "zero_d": torch.tensor(2.5, dtype=torch.float64),
        "zero_d_int": torch.tensor(-7),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(5, 0, dtype=torch.bfloat16),
        "np": np.arange(24, dtype=np.int16).reshape(4, 6),
        "np_f64": np.linspace(0, 1, 9),
        "base": base,
        "views": [base[3], base.t(), base[:, 5:9], base.view(torch.int32)[7:11]],
        "meta": {"step": 7, "name": "run"},
    })
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    got = asyncckpt.load(tmp_path / "c")
    _same(state, got)
    # Views share the loaded base's storage, as they shared the saved one.
    st = got["base"].untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == st for v in got["views"])
    got["base"][3, 0] = 1234.0
    assert got["views"][0][0] == 1234.0 and got["views"][1][0, 3] == 1234.0
    # Every other value owns its memory: loaded tensors do not alias each other or a scratch buffer.
    ptrs = [t.untyped_storage().data_ptr() for k, t in got.items() if isinstance(t, torch.Tensor) and t.numel()
            and k != "base"]
    assert len(set(ptrs)) == len(ptrs)


def test_chunk_with_more_entries_than_one_preadv_takes(shared_ckpt, tmp_path) -> None:
    """Thousands of entries (and the padding between them) in one chunk: all land in place."""
    g = torch.Generator().manual_seed(2)
    state = {f"p{i:04d}": torch.randint(-1000, 1000, (1 + i % 5,), generator=g) for i in range(3000)}
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    _same(state, asyncckpt.load(tmp_path / "c"))
    _same({"p0042": state["p0042"], "p2999": state["p2999"]},
          asyncckpt.load(tmp_path / "c", keys=["p0042", "p2999"]))


def test_corrupt_byte_mid_chunk_names_file_and_keys_and_changes_nothing(shared_ckpt, tmp_path) -> None:
    state = _small_state()
    path = tmp_path / "c"
    shared_ckpt.save(state, path)
    shared_ckpt.finalize(blocking=True)
    m = _manifest(path)
    e = next(e for e in m.entries if e.key == "x05")
    assert m.data_nbytes < m.chunk_size  # one chunk spans all twelve entries
    _flip(path, e.offset + e.nbytes // 2)
    into = {k: torch.full_like(v, -1.0) for k, v in state.items()}
    before = {k: v.clone() for k, v in into.items()}
    for call in (lambda: asyncckpt.load(path), lambda: asyncckpt.load(path, into=into)):
        with pytest.raises(asyncckpt.IntegrityError) as ei:
            call()
        msg = str(ei.value)
        assert f"{path}/rank-00000.data" in msg and "checksum mismatch" in msg
        assert f"bytes [0, {m.data_nbytes})" in msg and "x05" in msg and "x00" in msg
    _same(before, into)  # the into= tensors are untouched


def test_corrupt_padding_between_entries_is_caught(shared_ckpt, tmp_path) -> None:
    """Bytes between entries (alignment padding) are covered by the chunk's checksum too."""
    state = {"a": torch.arange(1001, dtype=torch.uint8), "b": torch.arange(50, dtype=torch.float64)}
    path = tmp_path / "c"
    shared_ckpt.save(state, path)
    shared_ckpt.finalize(blocking=True)
    m = _manifest(path)
    a, b = (next(e for e in m.entries if e.key == k) for k in ("a", "b"))
    assert b.offset > a.offset + a.nbytes  # there is padding to corrupt
    _flip(path, a.offset + a.nbytes)
    with pytest.raises(asyncckpt.IntegrityError, match=r"rank-00000\.data: checksum mismatch.*affected keys: a, b"):
        asyncckpt.load(path)


def test_keys_load_reads_only_their_chunks(tmp_path) -> None:
    """keys= reads the chunks holding the selection: a corrupt chunk elsewhere does not stop it."""
    g = torch.Generator().manual_seed(3)
    state = {"big": torch.randn(3 * MiB, generator=g), "small": _small_state(4)}  # 12 MiB + a few KiB
    path = tmp_path / "c"
    with asyncckpt.AsyncCheckpointer(chunk_size=5 * MiB, snapshot="blocking") as ck:
        ck.save(state, path)
        ck.finalize(blocking=True)
    m = _manifest(path)
    big = next(e for e in m.entries if e.key == "big")
    small = [e for e in m.entries if e.key.startswith("small/")]
    assert big.offset == 0 and all(e.offset >= big.nbytes for e in small)
    _flip(path, big.offset + m.chunk_size // 2)  # inside big's first chunk only
    _same({"small": state["small"]}, asyncckpt.load(path, keys=["small"]))
    with pytest.raises(asyncckpt.IntegrityError, match="affected keys: big"):
        asyncckpt.load(path, keys=["big"])


def test_compressed_checkpoint_bit_exact_and_corruption_caught(tmp_path) -> None:
    g = torch.Generator().manual_seed(4)
    state = {"noise": torch.randint(0, 256, (6 * MiB,), dtype=torch.uint8, generator=g),  # stored as is
             "zeros": torch.zeros(2 * MiB), "ints": torch.arange(MiB, dtype=torch.int32), "small": _small_state(5),
             "bf16": torch.randn(1000, generator=g).bfloat16(), "zero_d": torch.tensor(1.5)}
    path = tmp_path / "c"
    with asyncckpt.AsyncCheckpointer(compression="zstd", chunk_size=5 * MiB, snapshot="blocking") as ck:
        ck.save(state, path)
        ck.finalize(blocking=True)
    m = _manifest(path)
    assert isinstance(m.chunks, list) and m.chunks[0].codec == "none" and m.chunks[-1].codec == "zstd"
    _same(state, asyncckpt.load(path))
    _same({"small": state["small"], "zero_d": state["zero_d"]}, asyncckpt.load(path, keys=["small", "zero_d"]))
    last = ChunkGeometry.of(m).stored(len(m.chunks) - 1)
    for offset, keys in ((last[0] + last[1] // 2, "ints, small/x00"), (100, "noise")):  # a compressed chunk, a raw one
        _flip(path, offset)
        with pytest.raises(asyncckpt.IntegrityError, match=f"checksum mismatch.*{keys}"):
            asyncckpt.load(path)
        _flip(path, offset)
    _same(state, asyncckpt.load(path))


def test_incremental_checkpoint_loads_own_and_referenced_bytes(tmp_path) -> None:
    g = torch.Generator().manual_seed(5)
    state = {"frozen": torch.randn(2 * MiB, generator=g), "moving": torch.randn(1000, generator=g),
             "small": _small_state(3)}
    with asyncckpt.AsyncCheckpointer(incremental=True, snapshot="blocking") as ck:
        ck.save(state, tmp_path / "s0")
        ck.finalize(blocking=True)
        state["moving"].add_(1)
        ck.save(state, tmp_path / "s1")
        ck.finalize(blocking=True)
    m = _manifest(tmp_path / "s1")
    assert any(e.ref >= 0 for e in m.entries) and any(e.ref < 0 and e.nbytes for e in m.entries)
    _same(state, asyncckpt.load(tmp_path / "s1"))
    _same({"frozen": state["frozen"]}, asyncckpt.load(tmp_path / "s1", keys=["frozen"]))
    _flip(tmp_path / "s0", 4096)  # inside "frozen", which s1 holds by reference
    with pytest.raises(asyncckpt.IntegrityError, match=r"stored by reference in .*s0/rank-00000\.data"):
        asyncckpt.load(tmp_path / "s1")
    _same({"moving": state["moving"]}, asyncckpt.load(tmp_path / "s1", keys=["moving"]))


class _NoScatter:
    """A local directory seen through the minimum protocol (no scattered reads), as an object store is."""

    capabilities = Capabilities()

    def __init__(self, inner: LocalStorage) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.reads = 0

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        self.reads += 1
        await self.inner.read_into(key, offset, buf)

    async def size(self, key: str) -> int:
        return await self.inner.size(key)


@pytest.mark.parametrize("corrupt", [False, True])
def test_backend_without_scattered_reads(shared_ckpt, tmp_path, corrupt: bool) -> None:
    """Through a backend without ``read_into_scattered`` the same bytes land and are checked the same."""
    state = _small_state()
    path = tmp_path / "c"
    shared_ckpt.save(state, path)
    shared_ckpt.finalize(blocking=True)
    m = _manifest(path)
    if corrupt:
        _flip(path, next(e for e in m.entries if e.key == "x07").offset + 3)
    wanted = stored_entries(m, range(len(m.entries)))
    bufs = {i: np.zeros(m.entries[i].nbytes, dtype=np.uint8) for i in wanted}
    inner = LocalStorage(tmp_path)
    plain = _NoScatter(inner)

    async def go() -> None:
        try:
            await read_entries_into(plain, m, bufs)  # type: ignore[arg-type]
        finally:
            await inner.close()

    if corrupt:
        with pytest.raises(asyncckpt.IntegrityError, match=r"checksum mismatch.*x07"):
            asyncio.run(go())
        return
    asyncio.run(go())
    assert plain.reads == 1  # one ranged read for the whole chunk, not one per entry
    for i in wanted:
        e = m.entries[i]
        assert bufs[i].tobytes() == state[e.key].numpy().tobytes()


# -- DCP reader ----------------------------------------------------------------------------------


def _dcp_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(6)
    return {
        "w": torch.randn(600, 700, generator=g),  # 1.6 MiB: read straight into place
        "bf16": torch.randn(900_000, generator=g).bfloat16(),
        "i64": torch.randint(-(1 << 40), 1 << 40, (200_000,), generator=g),
        "mask": torch.randint(0, 2, (1 << 21,), generator=g).bool(),
        "c64": torch.randn(200_000, dtype=torch.complex64, generator=g),
        "t": torch.randn(800, 600, generator=g).t(),  # saved as a non-contiguous view
        "small": torch.arange(10.0),
        "zero_d": torch.tensor(3.25),
        "empty": torch.zeros(0, 5),
        "step": 9,
    }


def _blank(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.full_like(v, 0) if isinstance(v, torch.Tensor) else 0 for k, v in sd.items()}


class _Recording:
    """A storage that records the address of every buffer a read filled."""

    def __init__(self, inner: LocalStorage) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.capabilities = inner.capabilities
        self.filled: list[tuple[int, int]] = []

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        self.filled.append((np.frombuffer(buf, dtype=np.uint8).ctypes.data, len(buf)))
        await self.inner.read_into(key, offset, buf)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _dcp_save(sd: dict[str, Any], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageWriter

    dcp.save(sd, storage_writer=AsyncStorageWriter(str(path)))


def test_dcp_reader_reads_large_items_into_the_destination_bit_exact(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader

    sd = _dcp_state()
    _dcp_save(sd, tmp_path / "ck")
    got = _blank(sd)
    inner = LocalStorage(tmp_path)
    rec = _Recording(inner)
    try:
        dcp.load(got, storage_reader=AsyncStorageReader(str(tmp_path / "ck"), storage=rec))  # type: ignore[arg-type]
    finally:
        run_sync(inner.close())
    _same(sd, got)
    for k in ("w", "bf16", "i64", "mask", "c64"):  # each filled by reads landing inside its own memory
        lo, hi = got[k].data_ptr(), got[k].data_ptr() + got[k].numel() * got[k].element_size()
        assert sum(n for a, n in rec.filled if lo <= a and a + n <= hi) == hi - lo, k


@pytest.mark.parametrize("where", ["tensor bytes", "archive header"])
def test_dcp_reader_corrupt_distcp_byte_fails(tmp_path, where: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from asyncckpt.dcp import AsyncStorageReader

    sd = _dcp_state()
    path = tmp_path / "ck"
    _dcp_save(sd, path)
    md = AsyncStorageReader(str(path)).read_metadata()
    info = next(v for idx, v in md.storage_data.items() if idx.fqn == "w")
    at = int(info.offset) + (int(info.length) // 2 if where == "tensor bytes" else 40)
    with open(path / info.relative_path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(CheckpointException) as ei:
        dcp.load(_blank(sd), storage_reader=AsyncStorageReader(str(path)))
    err = next(iter(ei.value.failures.values()))[0]
    assert isinstance(err, asyncckpt.IntegrityError)
    assert info.relative_path in str(err) and "'w'" in str(err) and "checksum mismatch" in str(err)


def test_decompress_into_pieces_checks_the_raw_checksum() -> None:
    """A zstd chunk decompresses across the pieces it spans; its raw CRC32C and length are checked there."""
    from asyncckpt.format import ChunkInfo
    from asyncckpt.format.compression import decode_chunk_into, encode_chunk

    raw = np.concatenate([np.zeros(70_000, dtype=np.uint8), np.arange(50_000, dtype=np.uint32).view(np.uint8)])
    stored, info, _ = encode_chunk(memoryview(raw), "zstd", 1)
    assert info.codec == "zstd"
    outs = [np.empty(n, dtype=np.uint8) for n in (1, 69_999, 123_456, len(raw) - 193_456)]
    decode_chunk_into(stored, info, [o.data for o in outs], "here")
    assert np.concatenate(outs).tobytes() == raw.tobytes()
    bad = ChunkInfo(info.codec, info.stored_nbytes, info.raw_crc32c ^ 1)
    with pytest.raises(asyncckpt.IntegrityError, match="here: decompressed bytes fail their checksum"):
        decode_chunk_into(stored, bad, [o.data for o in outs], "here")
    with pytest.raises(asyncckpt.IntegrityError, match="here: the zstd frame holds"):
        decode_chunk_into(stored, info, [outs[0].data], "here")
