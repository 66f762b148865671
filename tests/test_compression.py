"""compression="zstd": per-chunk compression recorded in the manifest, read back by every reader."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import Tiers, cli
from asyncckpt.engine import write_compressed, write_stream
from asyncckpt.format import (
    ZSTD,
    ChunkInfo,
    DictNode,
    Entry,
    RankManifest,
    RefNode,
    checksum,
    decode_chunk,
    decode_manifest,
    encode_chunk,
    encode_manifest,
    verify_rank,
)
from asyncckpt.format import records as records_mod
from asyncckpt.load import read_rank
from asyncckpt.storage.local import LocalStorage

MiB = 1 << 20


@pytest.fixture(scope="module")
def zck():
    c = asyncckpt.AsyncCheckpointer(compression="zstd", compression_level=1, chunk_size=5 * MiB)
    yield c
    c.close(abort=True)


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1_500_000, generator=g)  # 6 MiB of noise: spans chunks, compresses little
    return {
        "model": {"w": w, "zeros": torch.zeros(2_000_000), "bf16": w[:300_000].to(torch.bfloat16),
                  "tied": w[10:20], "ids": torch.arange(1000)},
        "np": np.arange(5000, dtype=np.int32).reshape(50, 100),
        "meta": {"epoch": 2, "name": "z"},
    }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def _manifest(ckpt: Path) -> RankManifest:
    p = ckpt / "rank-00000.manifest"
    return decode_manifest(p.read_bytes(), str(p))


def test_save_load_verify_export_drain_all_follow_compression(zck, tmp_path: Path, capsys) -> None:
    state = _state()
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    zck.save(state, Tiers(fast, slow) / "c", step=3)
    zck.finalize(blocking=True)
    m = _manifest(fast / "c")
    assert ZSTD in m.features and m.version == 2 and m.chunks is not msgspec.UNSET
    assert len(m.chunks) == len(m.chunk_checksums) > 2
    stored = (fast / "c" / "rank-00000.data").stat().st_size
    assert stored == sum(c.stored_nbytes for c in m.chunks) < m.data_nbytes * 0.8  # the zeros compress
    assert {c.codec for c in m.chunks} == {ZSTD}
    # load: whole, by keys (only the chunks holding them), into existing tensors
    assert _equal(asyncckpt.load(fast / "c"), state)
    assert _equal(asyncckpt.load(fast / "c", keys=["np"]), {"np": state["np"]})
    into = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}, "np": np.zeros_like(state["np"]),
            "meta": {"epoch": 0, "name": ""}}
    asyncckpt.load(fast / "c", into=into)
    assert torch.equal(into["model"]["w"], state["model"]["w"])
    # the drained copy keeps the chunks as stored, and loads alone
    assert (slow / "c" / "rank-00000.data").read_bytes() == (fast / "c" / "rank-00000.data").read_bytes()
    assert _equal(asyncckpt.load(slow / "c"), state)
    # CLI inspect, verify and export
    assert cli.main(["inspect", str(slow / "c"), "--json"]) == 0
    (rank,) = json.loads(capsys.readouterr().out)["ranks"]
    assert (rank["data_nbytes"], rank["stored_nbytes"], rank["features"]) == (m.data_nbytes, stored, ["shared-storage", ZSTD])
    assert cli.main(["verify", str(slow / "c")]) == 0
    assert cli.main(["export", str(slow / "c"), "--to", str(tmp_path / "m.safetensors")]) == 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["model/w"], state["model"]["w"])
    assert cli.main(["export", str(slow / "c"), "--to", str(tmp_path / "m.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["model"]["bf16"], state["model"]["bf16"])


def test_a_corrupt_compressed_chunk_is_named_with_its_keys(zck, tmp_path: Path, capsys) -> None:
    state = _state()
    zck.save(state, tmp_path / "c")
    zck.finalize(blocking=True)
    data = tmp_path / "c" / "rank-00000.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x40  # inside the first stored chunk: model/w
    data.write_bytes(bytes(raw))
    with pytest.raises(asyncckpt.IntegrityError, match=r"rank-00000\.data.*checksum mismatch.*affected keys: model/w"):
        asyncckpt.load(tmp_path / "c")
    assert _equal(asyncckpt.load(tmp_path / "c", keys=["np"]), {"np": state["np"]})  # other chunks still load
    assert cli.main(["verify", str(tmp_path / "c")]) == 1
    assert "model/w" in capsys.readouterr().out


def test_decoded_bytes_are_checked_against_the_raw_checksum() -> None:
    a, b = memoryview(bytes(4096)), memoryview(bytes(4095) + b"\x01")
    stored, info, _ = encode_chunk(a, ZSTD, 3)
    assert info.codec == ZSTD and len(stored) < 4096
    raw = np.frombuffer(stored, dtype=np.uint8)
    assert bytes(decode_chunk(raw, info, 4096, "here")) == bytes(a)
    lie = ChunkInfo(ZSTD, info.stored_nbytes, checksum(b))  # a frame whose content is not what was recorded
    with pytest.raises(asyncckpt.IntegrityError, match="here: decompressed bytes fail their checksum"):
        decode_chunk(raw, lie, 4096, "here")
    with pytest.raises(asyncckpt.IntegrityError, match="frame holds 4096 bytes, the chunk has 5000"):
        decode_chunk(raw, info, 5000, "here")  # never allocates what a frame header claims


def test_incompressible_chunks_are_stored_as_is() -> None:
    noise = memoryview(np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    stored, info, crc = encode_chunk(noise, ZSTD, 1)
    assert info == ChunkInfo("none", len(noise), checksum(noise)) and crc == info.raw_crc32c
    assert bytes(stored) == bytes(noise)


# -- format level: a property over random entries, chunk sizes and subsets ---------------------------------
_DTYPES = ["float32", "bfloat16", "float16", "int64", "uint8", "bool"]


def _tensor(rng: np.random.Generator, dtype: str, n: int, kind: str) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(n, dtype=getattr(torch, dtype))
    if dtype == "bool":
        return torch.from_numpy(rng.integers(0, 2, n).astype(np.bool_))
    if dtype in ("int64", "uint8"):
        return torch.from_numpy(rng.integers(0, 100 if kind == "small" else 255, n).astype(dtype))
    return torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(getattr(torch, dtype))


async def _write_and_read(root: Path, tensors: list[torch.Tensor], chunk_size: int, level: int, subset: list[int]
                          ) -> tuple[dict[Any, Any], dict[Any, Any], list[str], RankManifest]:
    entries, off = [], 0
    image = bytearray()
    for i, t in enumerate(tensors):
        off = -(-off // 64) * 64
        image.extend(bytes(off - len(image)))
        b = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries.append(Entry(key=f"t{i}", kind="tensor", dtype=str(t.dtype).removeprefix("torch."),
                             shape=list(t.shape), offset=off, nbytes=len(b)))
        image.extend(b)
        off += len(b)
    storage = LocalStorage(root)
    try:
        crcs, chunks = await write_compressed(storage, "c/data", memoryview(bytes(image)), chunk_size, 3, ZSTD, level)
        m = RankManifest(format="asyncckpt", version=2, name="c", rank=0, world_size=1, step=None, data_file="c/data",
                         data_nbytes=len(image), chunk_size=chunk_size, checksum_algo="crc32c", chunk_checksums=crcs,
                         entries=entries, tree=DictNode(keys=list(range(len(tensors))),
                                                        values=[RefNode(i) for i in range(len(tensors))]),
                         features=[ZSTD], chunks=chunks)
        m = decode_manifest(encode_manifest(m), "test")  # what a reader gets passes the reader's checks
        whole = await read_rank(storage, m)
        part = await read_rank(storage, m, keys=subset)
        _, problems = await verify_rank(storage, m)
        return whole, part, problems, m
    finally:
        await storage.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(st.tuples(st.sampled_from(_DTYPES), st.integers(0, 3000), st.sampled_from(["noise", "zeros", "small"])),
                   min_size=1, max_size=6),
    chunk_size=st.integers(64, 5000),
    level=st.sampled_from([1, 3, 9]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_compressed_round_trip_property(tmp_path_factory, specs, chunk_size, level, seed, data) -> None:
    rng = np.random.default_rng(seed)
    tensors = [_tensor(rng, dt, n, kind) for dt, n, kind in specs]
    subset = data.draw(st.lists(st.integers(0, len(tensors) - 1), min_size=1, unique=True))
    root = tmp_path_factory.mktemp("z")
    whole, part, problems, m = asyncio.run(_write_and_read(root, tensors, chunk_size, level, subset))
    assert problems == []
    for i, t in enumerate(tensors):
        assert whole[i].dtype == t.dtype and torch.equal(whole[i], t)
    assert sorted(part) == sorted(subset) and all(torch.equal(part[i], tensors[i]) for i in subset)
    assert (root / "c" / "data").stat().st_size == sum(c.stored_nbytes for c in m.chunks)


# -- the stream writer: parts the object stores accept -----------------------------------------------------
class _Recorder:
    def __init__(self, fail_at: int | None = None) -> None:
        self.parts: dict[int, tuple[int, bytes, int | None]] = {}
        self.committed = self.aborted = False
        self.fail_at = fail_at

    async def write_part(self, index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
        await asyncio.sleep(0.001 * (index % 3))
        if index == self.fail_at:
            raise OSError("disk on fire")
        self.parts[index] = (offset, bytes(data), crc32c)

    async def commit(self) -> None:
        self.committed = True

    async def abort(self) -> None:
        self.aborted = True


@given(sizes=st.lists(st.integers(0, 900), max_size=30), part_size=st.integers(1, 1000), concurrency=st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_write_stream_joins_pieces_into_parts_of_at_least_part_size(sizes, part_size, concurrency) -> None:
    pieces = [bytes([i % 251]) * n for i, n in enumerate(sizes)]

    async def produce(i: int) -> tuple[memoryview, int]:
        await asyncio.sleep(0.001 * ((i * 7) % 3))  # finish out of order
        return memoryview(pieces[i]), checksum(pieces[i])

    w = _Recorder()
    asyncio.run(write_stream(w, len(pieces), produce, part_size, concurrency))
    assert w.committed and not w.aborted
    parts = [w.parts[i] for i in range(len(w.parts))]
    assert b"".join(p[1] for p in parts) == b"".join(pieces)
    assert all(off == sum(len(p[1]) for p in parts[:k]) for k, (off, _, _) in enumerate(parts))
    assert all(len(p[1]) >= part_size for p in parts[:-1])
    assert all(crc == checksum(data) for _, data, crc in parts)


def test_write_stream_aborts_on_a_failed_part_or_piece() -> None:
    async def produce(i: int) -> tuple[memoryview, int]:
        if i == 7:
            raise ValueError("bad piece")
        return memoryview(b"x" * 10), checksum(b"x" * 10)

    w = _Recorder(fail_at=2)
    with pytest.raises(OSError, match="disk on fire"):
        asyncio.run(write_stream(w, 5, produce, 10, 2))
    assert w.aborted and not w.committed
    w = _Recorder()
    with pytest.raises(ValueError, match="bad piece"):
        asyncio.run(write_stream(w, 9, produce, 10, 3))
    assert w.aborted and not w.committed


# -- readers that do not know the feature, a missing zstandard, bad arguments -------------------------------
def test_a_reader_that_does_not_know_zstd_refuses_it_by_name(zck, tmp_path: Path, monkeypatch, capsys) -> None:
    zck.save({"w": torch.zeros(1000)}, tmp_path / "c")
    zck.finalize(blocking=True)
    monkeypatch.setattr(records_mod, "KNOWN_FEATURES", frozenset({"shared-storage"}))
    refused = "uses format feature(s) 'zstd' that this asyncckpt does not know"
    with pytest.raises(asyncckpt.FormatError, match=re.escape(refused)):
        asyncckpt.load(tmp_path / "c")
    assert cli.main(["verify", str(tmp_path / "c")]) == 1
    assert refused in capsys.readouterr().out
    assert cli.main(["ls", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["checkpoints"] == [] and refused in listed["incomplete"][0]["problem"]


def test_an_unknown_feature_is_named_even_when_it_changes_a_member() -> None:
    path = Path(__file__).parent / "golden" / "plain" / "rank-00000.manifest"
    good = decode_manifest(path.read_bytes(), "golden")
    raw = msgspec.msgpack.decode(path.read_bytes())
    raw.update(version=2, features=["zstd", "chunk-dicts"], chunks=[{"codec": "lz5", "n": 1}])
    with pytest.raises(asyncckpt.FormatError, match="feature\\(s\\) 'chunk-dicts'"):
        decode_manifest(msgspec.msgpack.encode(raw), "m")
    raw.update(features=["zstd"], chunks=[["lz5", 10, 0]] * len(good.chunk_checksums))
    with pytest.raises(asyncckpt.FormatError, match="chunk 0 is stored as 'lz5'"):
        decode_manifest(msgspec.msgpack.encode(raw), "m")
    raw.update(features=[], chunks=[["none", 10, 0]])
    with pytest.raises(asyncckpt.FormatError, match="without declaring the 'zstd' feature"):
        decode_manifest(msgspec.msgpack.encode(raw), "m")


def test_missing_zstandard_names_the_extra(zck, tmp_path: Path, monkeypatch) -> None:
    zck.save({"w": torch.zeros(1000)}, tmp_path / "c")
    zck.finalize(blocking=True)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(asyncckpt.BadInputError, match=r"asyncckpt\[zstd\]"):
        asyncckpt.AsyncCheckpointer(compression="zstd", start_worker=False)
    with pytest.raises(asyncckpt.BadInputError, match=r"asyncckpt\[zstd\]"):
        asyncckpt.load(tmp_path / "c")


@pytest.mark.parametrize(("kw", "match"), [
    ({"compression": "lz4"}, "compression must be one of 'zstd'"),
    ({"compression": "zstd", "compression_level": 0}, "from 1 to 22"),
    ({"compression": "zstd", "compression_level": 23}, "from 1 to 22"),
    ({"compression_level": 3}, "needs compression='zstd'"),
])
def test_bad_compression_arguments(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(asyncckpt.BadInputError, match=match):
        asyncckpt.AsyncCheckpointer(start_worker=False, **kw)


def test_manager_passes_compression_through(tmp_path: Path) -> None:
    state = {"w": torch.zeros(100_000)}
    with asyncckpt.CheckpointManager(tmp_path, signals=(), compression="zstd", compression_level=1) as mgr:
        mgr.save(1, state)
    (ckpt,) = [p for p in tmp_path.iterdir() if (p / "COMMIT").exists()]
    assert ZSTD in _manifest(ckpt).features
    assert torch.equal(asyncckpt.load(ckpt)["w"], state["w"])


def test_compressed_save_and_tier_drain_on_s3(tmp_path: Path, moto_server, s3_bucket) -> None:
    """Compressed chunks are shorter than S3's 5 MiB minimum part: they are joined into parts that S3 accepts."""
    opts = moto_server.options()
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(4 << 20, generator=g), "z": torch.zeros(3 << 20)}  # 28 MiB: noise and zeros
    tiers = Tiers(tmp_path / "nvme", f"s3://{s3_bucket}/t", storage_options=[{}, opts])
    with asyncckpt.AsyncCheckpointer(storage_options=opts, chunk_size=5 * MiB, compression="zstd",
                                     compression_level=1) as ck:
        ck.save(state, f"s3://{s3_bucket}/run/c", step=1)
        h = ck.save(state, tiers / "c", step=1)
        ck.finalize(blocking=True)
        assert h.durable
    m = _manifest(tmp_path / "nvme" / "c")
    assert any(c.stored_nbytes < 5 * MiB for c in m.chunks[:-1])  # parts had to be joined
    for path in (f"s3://{s3_bucket}/run/c", f"s3://{s3_bucket}/t/c"):
        assert _equal(asyncckpt.load(path, storage_options=opts), state)
    assert moto_server.incomplete_uploads(s3_bucket) == []
