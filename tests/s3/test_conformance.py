"""The storage protocol, run against LocalStorage, S3 on moto and S3 on SeaweedFS alike."""

from __future__ import annotations

import array
import asyncio

import pytest

from asyncckpt.errors import CheckpointNotFoundError, IntegrityError, StorageError
from asyncckpt.storage import ObjectWriter, Storage

from .conftest import Backend, MiB, payload

pytestmark = pytest.mark.timeout(120)

PART = 5 * MiB


def split(data: bytes, part: int = PART) -> list[tuple[int, int, memoryview]]:
    view = memoryview(data)
    return [(i, off, view[off : off + part]) for i, off in enumerate(range(0, len(data), part))]


async def test_protocol_types(store: Storage) -> None:
    assert isinstance(store, Storage)
    w = await store.open_writer("k")
    assert isinstance(w, ObjectWriter)
    await w.abort()


async def test_parts_out_of_order_and_concurrent(store: Storage, backend: Backend) -> None:
    data = payload(3 * PART + 12345, seed=1)
    w = await store.open_writer("ck/rank-0.data", size_hint=len(data))
    parts = split(data)
    await asyncio.gather(*(w.write_part(i, off, v) for i, off, v in reversed(parts)))
    assert not await store.exists("ck/rank-0.data")  # nothing visible before commit
    assert await store.list() == []
    await w.commit()
    assert await store.size("ck/rank-0.data") == len(data)
    assert await store.read("ck/rank-0.data") == data
    buf = bytearray(len(data))
    await store.read_into("ck/rank-0.data", 0, memoryview(buf))
    assert buf == data
    assert backend.incomplete_uploads() == []


async def test_writer_copies_data_before_returning(store: Storage) -> None:
    data = payload(2 * PART + 10, seed=2)
    scratch = bytearray(PART)
    w = await store.open_writer("reuse")
    for i, off, v in split(data):
        scratch[: len(v)] = v
        await w.write_part(i, off, memoryview(scratch)[: len(v)])
        scratch[:] = b"\xee" * len(scratch)  # the caller reuses its buffer at once
    await w.commit()
    assert await store.read("reuse") == data


async def test_single_put_path(store: Storage, backend: Backend) -> None:
    data = payload(300_000, seed=3)
    w = await store.open_writer("small/record.bin", size_hint=len(data))
    await w.write_part(1, 100_000, memoryview(data)[100_000:])
    await w.write_part(0, 0, memoryview(data)[:100_000])
    assert not await store.exists("small/record.bin")
    await w.commit()
    with pytest.raises(StorageError):
        await w.commit()  # a writer commits once
    assert await store.read("small/record.bin") == data
    assert backend.incomplete_uploads() == []


async def test_empty_object(store: Storage) -> None:
    w = await store.open_writer("empty")
    await w.commit()
    assert await store.size("empty") == 0
    assert await store.read("empty") == b""
    await store.read_into("empty", 0, memoryview(bytearray()))


async def test_abort_leaves_nothing(store: Storage, backend: Backend) -> None:
    data = payload(PART + 100, seed=4)
    w = await store.open_writer("ck/aborted.data")
    for i, off, v in split(data):
        await w.write_part(i, off, v)
    await w.abort()
    await w.abort()  # idempotent
    assert not await store.exists("ck/aborted.data")
    assert await store.list() == []
    assert backend.incomplete_uploads() == []
    with pytest.raises(StorageError):
        await w.commit()
    small = await store.open_writer("ck/small", size_hint=10)
    await small.write_part(0, 0, memoryview(b"0123456789"))
    await small.abort()
    assert await store.list() == []


async def test_abort_after_commit_keeps_the_object(store: Storage) -> None:
    w = await store.open_writer("kept", size_hint=3)
    await w.write_part(0, 0, memoryview(b"abc"))
    await w.commit()
    await w.abort()
    assert await store.read("kept") == b"abc"


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (0, 4 * MiB),
        (1, 4 * MiB),
        (4 * MiB - 3, 7),
        (3 * MiB, 9 * MiB + 5),
        (0, 13 * MiB + 777),
        (13 * MiB, 777),
    ],
)
async def test_read_into_ranges(store: Storage, offset: int, length: int) -> None:
    data = payload(13 * MiB + 777, seed=5)
    w = await store.open_writer("big")
    for i, off, v in split(data):
        await w.write_part(i, off, v)
    await w.commit()
    buf = bytearray(length)
    await store.read_into("big", offset, memoryview(buf))
    assert buf == data[offset : offset + length]


async def test_read_into_typed_buffer(store: Storage) -> None:
    values = array.array("f", [float(i) for i in range(4096)])
    raw = values.tobytes()
    await store.put_record("floats", raw)
    out = array.array("f", bytes(len(raw)))
    await store.read_into("floats", 0, memoryview(out))
    assert out == values
    half = array.array("f", bytes(len(raw) // 2))
    await store.read_into("floats", len(raw) // 2, memoryview(half))
    assert half == values[2048:]


async def test_short_object_is_an_integrity_error(store: Storage) -> None:
    await store.put_record("short", b"x" * 1000)
    with pytest.raises(IntegrityError, match="short"):
        await store.read_into("short", 0, memoryview(bytearray(1001)))
    with pytest.raises(IntegrityError, match="short"):
        await store.read_into("short", 990, memoryview(bytearray(20)))
    with pytest.raises(IntegrityError, match="short"):
        await store.read_into("short", 5000, memoryview(bytearray(10)))


async def test_missing_keys(store: Storage) -> None:
    assert not await store.exists("nope/x")
    with pytest.raises(CheckpointNotFoundError, match="nope/x"):
        await store.size("nope/x")
    with pytest.raises(CheckpointNotFoundError, match="nope/x"):
        await store.read("nope/x")
    with pytest.raises(CheckpointNotFoundError, match="nope/x"):
        await store.read_into("nope/x", 0, memoryview(bytearray(10)))
    with pytest.raises(CheckpointNotFoundError, match="nope/x"):
        await store.read_into("nope/x", 0, memoryview(bytearray()))
    await store.delete("nope/x")  # absent keys are ignored
    assert await store.list("nope") == []


async def test_list_and_delete(store: Storage) -> None:
    keys = ["a/b/c", "a/d", "a/b2", "ab/x", "e", "z/y/x/w"]
    for k in reversed(keys):
        await store.put_record(k, k.encode())
    assert await store.list() == sorted(keys)
    assert await store.list("a") == ["a/b/c", "a/b2", "a/d"]
    assert await store.list("a/b") == ["a/b/c"]
    assert await store.list("z/y") == ["z/y/x/w"]
    assert await store.list("a/d") == []  # a key is not a folder
    assert await store.list("missing") == []
    await store.delete("a/b/c")
    await store.delete("a/b/c")
    assert await store.list("a") == ["a/b2", "a/d"]
    assert await store.exists("a/d") and not await store.exists("a/b/c")
    assert await store.size("z/y/x/w") == len(b"z/y/x/w")


@pytest.mark.slow
async def test_list_many_keys_is_paginated(store: Storage, backend: Backend) -> None:
    n = 1100 if backend.is_s3 else 50  # > one ListObjectsV2 page (1000) on S3
    await asyncio.gather(*(store.put_record(f"many/{i:05d}", b"") for i in range(n)))
    got = await store.list("many")
    assert got == [f"many/{i:05d}" for i in range(n)]


async def test_put_record_if_absent(store: Storage) -> None:
    assert await store.put_record("ck/COMMIT", b"first", if_absent=True) is True
    assert await store.put_record("ck/COMMIT", b"second", if_absent=True) is False
    assert await store.read("ck/COMMIT") == b"first"
    assert await store.put_record("ck/COMMIT", b"third") is True  # replace
    assert await store.read("ck/COMMIT") == b"third"
    assert await store.list() == ["ck/COMMIT"]


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a\\b", "a\x00b"])
async def test_unsafe_keys_are_refused(store: Storage, key: str) -> None:
    with pytest.raises(IntegrityError):
        await store.put_record(key, b"x")
    with pytest.raises(IntegrityError):
        await store.read(key)
    with pytest.raises(IntegrityError):
        await store.open_writer(key)


async def test_a_second_handle_sees_committed_data(store: Storage, backend: Backend) -> None:
    await store.put_record("shared", b"hello")
    other = backend.make()
    try:
        assert await other.read("shared") == b"hello"
    finally:
        await other.close()
