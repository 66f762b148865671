"""The storage conformance suite: mixin classes every backend's test module subclasses (fsspec ``tests/abstract`` style).

A module provides a ``backend`` fixture (`tests.storage.conftest.make_backend`) and subclasses:

- `ProtocolTests`: round trip, the streaming writer (commit, abort, out-of-order parts), ranged
  reads, listing, deletion, conditional records, key safety, error classes, declared capabilities;
- `FaultTests`: the same operations through the fault proxy (503/500 bursts, resets mid-upload and
  mid-download, cut bodies, stalls); skipped for backends without a network.
"""

from __future__ import annotations

import array
import asyncio
import re
from typing import cast

import pytest

from asyncckpt.errors import (
    CheckpointNotFoundError,
    IntegrityError,
    StorageError,
    StorageNotFoundError,
    StorageOpTimeoutError,
    TransientStorageError,
)
from asyncckpt.format import checksum
from asyncckpt.storage import (
    AbortsIncompleteUploads,
    Capabilities,
    CleansTempFiles,
    DeletesMany,
    ListsByName,
    ObjectWriter,
    Storage,
)

from .conftest import Backend, Faulty, MiB, payload

PART = 5 * MiB

__all__ = ["FaultTests", "ProtocolTests"]


def split(data: bytes, part: int = PART) -> list[tuple[int, int, memoryview]]:
    view = memoryview(data)
    return [(i, off, view[off : off + part]) for i, off in enumerate(range(0, len(data), part))]


async def upload(st: Storage, key: str, data: bytes, *, with_crc: bool = True) -> None:
    """Write ``data`` in PART-sized parts, all at once, as the engine does; abort on failure."""
    w = await st.open_writer(key)
    try:
        await asyncio.gather(
            *(w.write_part(i, off, v, crc32c=checksum(v) if with_crc else None) for i, off, v in split(data))
        )
        await w.commit()
    except BaseException:
        await w.abort()
        raise


@pytest.mark.timeout(120)
class ProtocolTests:
    """What every `Storage` promises, on the backend of the subclassing module."""

    async def test_protocol_types_and_capabilities(self, store: Storage) -> None:
        assert isinstance(store, Storage)
        caps = store.capabilities
        assert isinstance(caps, Capabilities)
        assert caps.conditional_put  # every built-in backend writes commit records atomically
        assert isinstance(store, AbortsIncompleteUploads) or not caps.abort_incomplete
        assert isinstance(store, CleansTempFiles) or not caps.cleanup_temp
        assert isinstance(store, DeletesMany) or not caps.delete_many
        assert isinstance(store, ListsByName) or not caps.list_by_name
        w = await store.open_writer("k")
        assert isinstance(w, ObjectWriter)
        await w.abort()

    async def test_parts_out_of_order_and_concurrent(self, store: Storage, backend: Backend) -> None:
        data = payload(3 * PART + 12345, seed=1)
        w = await store.open_writer("ck/rank-0.data", size_hint=len(data))
        parts = split(data)
        await asyncio.gather(*(w.write_part(i, off, v, crc32c=checksum(v)) for i, off, v in reversed(parts)))
        assert not await store.exists("ck/rank-0.data")  # nothing visible before commit
        assert await store.list() == []
        await w.commit()
        assert await store.size("ck/rank-0.data") == len(data)
        assert await store.read("ck/rank-0.data") == data
        buf = bytearray(len(data))
        await store.read_into("ck/rank-0.data", 0, memoryview(buf))
        assert buf == data
        assert backend.incomplete_uploads() == []
        assert backend.keys() == (["root/ck/rank-0.data"] if backend.is_network else ["ck/rank-0.data"])

    async def test_writer_copies_data_before_returning(self, store: Storage) -> None:
        data = payload(2 * PART + 10, seed=2)
        scratch = bytearray(PART)
        w = await store.open_writer("reuse")
        for i, off, v in split(data):
            scratch[: len(v)] = v
            await w.write_part(i, off, memoryview(scratch)[: len(v)])
            scratch[:] = b"\xee" * len(scratch)  # the caller reuses its buffer at once
        await w.commit()
        assert await store.read("reuse") == data

    async def test_single_put_path(self, store: Storage, backend: Backend) -> None:
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

    async def test_empty_object(self, store: Storage) -> None:
        w = await store.open_writer("empty")
        await w.commit()
        assert await store.size("empty") == 0
        assert await store.read("empty") == b""
        await store.read_into("empty", 0, memoryview(bytearray()))

    async def test_abort_leaves_nothing(self, store: Storage, backend: Backend) -> None:
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
        with pytest.raises(StorageError):
            await w.write_part(0, 0, memoryview(b"x"))
        small = await store.open_writer("ck/small", size_hint=10)
        await small.write_part(0, 0, memoryview(b"0123456789"))
        await small.abort()
        assert await store.list() == []
        assert backend.keys() == []

    async def test_abort_after_commit_keeps_the_object(self, store: Storage) -> None:
        w = await store.open_writer("kept", size_hint=3)
        await w.write_part(0, 0, memoryview(b"abc"))
        await w.commit()
        await w.abort()
        assert await store.read("kept") == b"abc"

    async def test_overwrite_replaces_whole_object(self, store: Storage) -> None:
        await upload(store, "k", payload(2 * PART + 5, seed=8))
        short = payload(PART + 1, seed=9)
        await upload(store, "k", short)
        assert await store.size("k") == len(short)
        assert await store.read("k") == short

    async def test_crashed_upload_is_cleaned_by_abort_incomplete(self, store: Storage, backend: Backend) -> None:
        if not store.capabilities.abort_incomplete:
            pytest.skip(f"{backend.name} has nothing to abort: a crashed write leaves only temp files")
        assert isinstance(store, AbortsIncompleteUploads)
        for key in ("step-1/rank-0.data", "step-1/rank-1.data", "step-10/rank-0.data"):
            w = await store.open_writer(key)
            await w.write_part(0, 0, memoryview(payload(PART)))  # then "crash": neither commit nor abort
        await store.put_record("step-1/COMMIT", b"c")
        assert len(backend.incomplete_uploads()) >= 3
        assert await store.abort_incomplete_uploads("step-1") >= 2  # not step-10
        assert any("step-10" in k for k in backend.incomplete_uploads())
        await store.abort_incomplete_uploads("step-10/rank-0.data")
        assert backend.incomplete_uploads() == []
        assert await store.list() == ["step-1/COMMIT"]  # a committed object is never touched
        assert await store.abort_incomplete_uploads() == 0

    async def test_read_into_ranges(self, store: Storage) -> None:
        data = payload(13 * MiB + 777, seed=5)
        await upload(store, "big", data)
        for offset, length in [
            (0, 1),
            (0, 4 * MiB),
            (1, 4 * MiB),
            (4 * MiB - 3, 7),
            (3 * MiB, 9 * MiB + 5),
            (0, 13 * MiB + 777),
            (13 * MiB, 777),
        ]:
            buf = bytearray(length)
            await store.read_into("big", offset, memoryview(buf))
            assert buf == data[offset : offset + length], (offset, length)

    async def test_read_into_typed_buffer(self, store: Storage) -> None:
        values = array.array("f", [float(i) for i in range(4096)])
        raw = values.tobytes()
        await store.put_record("floats", raw)
        out = array.array("f", bytes(len(raw)))
        await store.read_into("floats", 0, memoryview(out))
        assert out == values
        half = array.array("f", bytes(len(raw) // 2))
        await store.read_into("floats", len(raw) // 2, memoryview(half))
        assert half == values[2048:]

    async def test_short_object_is_an_integrity_error(self, store: Storage) -> None:
        await store.put_record("short", b"x" * 1000)
        with pytest.raises(IntegrityError, match="short"):
            await store.read_into("short", 0, memoryview(bytearray(1001)))
        with pytest.raises(IntegrityError, match="short"):
            await store.read_into("short", 990, memoryview(bytearray(20)))
        with pytest.raises(IntegrityError, match="short"):
            await store.read_into("short", 5000, memoryview(bytearray(10)))

    async def test_missing_keys(self, store: Storage) -> None:
        assert not await store.exists("nope/x")
        for call in (
            store.size("nope/x"),
            store.read("nope/x"),
            store.read_into("nope/x", 0, memoryview(bytearray(10))),
            store.read_into("nope/x", 0, memoryview(bytearray())),
        ):
            with pytest.raises(StorageNotFoundError, match="nope/x") as info:
                await call
            assert isinstance(info.value, CheckpointNotFoundError)  # deprecated alias, kept for one release
            assert info.value.retryable is False
        await store.delete("nope/x")  # absent keys are ignored
        assert await store.list("nope") == []

    async def test_list_and_delete(self, store: Storage) -> None:
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

    async def test_delete_many(self, store: Storage) -> None:
        """``delete_many`` (where declared) deletes what ``delete`` of each would; absent keys are ignored."""
        if not store.capabilities.delete_many:
            pytest.skip("the backend declares no delete_many")
        assert isinstance(store, DeletesMany)
        keys = ["n/COMMIT", "n/rank-00000.data", "n/sub/x", "n/rank-00000.manifest", "other/y", "n/keep"]
        for k in keys:
            await store.put_record(k, k.encode())
        await store.delete_many([["n/COMMIT"], ["n/rank-00000.data", "n/gone", "n/sub/x"], ["n/rank-00000.manifest"]])
        assert await store.list() == ["n/keep", "other/y"]
        await store.delete_many([["n/keep", "other/y"]])
        await store.delete_many([])
        await store.delete_many([[], ["nope/a", "nope/b"]])  # absent: nothing to do, no error
        assert await store.list() == []

    async def test_list_names_shows_the_files_directly_under_each_name(self, store: Storage) -> None:
        if not store.capabilities.list_by_name:
            pytest.skip("this backend does not declare list_by_name")
        keys = ["a/b/c", "a/d", "a/b2", "ab/x", "e", "z/y/x/w"]
        for k in reversed(keys):
            await store.put_record(k, k.encode())
        names = await cast(ListsByName, store).list_names()
        assert {n: sorted(fs) for n, fs in names.items()} == {"a": ["b2", "d"], "ab": ["x"]}  # z/ holds no file
        expected: dict[str, list[str]] = {}  # the same, from list(): the catalog may take either
        for k in await store.list():
            head, _, rest = k.partition("/")
            if rest and "/" not in rest:
                expected.setdefault(head, []).append(rest)
        assert {n: sorted(fs) for n, fs in names.items()} == {n: sorted(fs) for n, fs in expected.items()}

    async def test_list_many_keys_is_paginated(self, backend: Backend) -> None:
        st = backend.make(list_page_size=16)  # several pages without thousands of keys
        try:
            await asyncio.gather(*(st.put_record(f"many/{i:03d}", b"") for i in range(50)))
            assert await st.list("many") == [f"many/{i:03d}" for i in range(50)]
        finally:
            await st.close()

    async def test_put_record_if_absent(self, store: Storage) -> None:
        assert await store.put_record("ck/COMMIT", b"first", if_absent=True) is True
        assert await store.put_record("ck/COMMIT", b"second", if_absent=True) is False
        assert await store.read("ck/COMMIT") == b"first"
        assert await store.put_record("ck/COMMIT", b"third") is True  # replace
        assert await store.read("ck/COMMIT") == b"third"
        assert await store.list() == ["ck/COMMIT"]

    async def test_racing_conditional_records_have_one_winner(self, store: Storage, backend: Backend) -> None:
        others = [backend.make() for _ in range(3)]
        try:
            handles = [store, *others]
            payloads = [f"writer-{i}".encode() for i in range(6)]
            results = await asyncio.gather(
                *(handles[i % 4].put_record("race/COMMIT", p, if_absent=True) for i, p in enumerate(payloads))
            )
            assert sum(results) == 1, results
            assert await store.read("race/COMMIT") == payloads[results.index(True)]
        finally:
            for h in others:
                await h.close()

    @pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a\\b", "a\x00b"])
    async def test_unsafe_keys_are_refused(self, store: Storage, key: str) -> None:
        with pytest.raises(IntegrityError):
            await store.put_record(key, b"x")
        with pytest.raises(IntegrityError):
            await store.read(key)
        with pytest.raises(IntegrityError):
            await store.open_writer(key)

    async def test_a_second_handle_sees_committed_data(self, store: Storage, backend: Backend) -> None:
        await store.put_record("shared", b"hello")
        other = backend.make()
        try:
            assert await other.read("shared") == b"hello"
        finally:
            await other.close()


def _range_starts(faulty: Faulty) -> list[int]:
    starts = []
    for line, headers in faulty.proxy.seen:
        m = re.match(r"bytes=(\d+)-", headers.get("range", "") or headers.get("x-ms-range", ""))
        if line.startswith("GET ") and m:
            starts.append(int(m.group(1)))
    return starts


@pytest.mark.fault
@pytest.mark.timeout(90)
class FaultTests:
    """The backend through the fault proxy: transient faults are retried or resumed, lasting ones fail cleanly."""

    @pytest.mark.parametrize("status", [503, 500])
    async def test_error_burst_on_upload_is_retried(self, faulty: Faulty, backend: Backend, status: int) -> None:
        st = faulty.make()
        data = payload(3 * PART + 5, seed=1)
        code = backend.busy_code if status == 503 else "InternalError"
        faulty.proxy.error(3, status=status, code=code)  # whatever comes first: create, parts, commit
        await upload(st, "ck/rank-0.data", data)
        assert faulty.proxy.injected["error"] == 3
        assert await backend.make().read("ck/rank-0.data") == data
        assert backend.incomplete_uploads() == []

    async def test_error_burst_on_reads_is_retried(self, faulty: Faulty) -> None:
        st = faulty.make()
        data = payload(2 * PART + 11, seed=2)
        await upload(st, "k", data)
        faulty.proxy.error(3, status=503, code=faulty.backend.busy_code, match=faulty.pattern("get"))
        buf = bytearray(len(data))
        await st.read_into("k", 0, memoryview(buf))
        assert buf == data and faulty.proxy.injected["error"] == 3
        faulty.proxy.error(2, status=500, code="InternalError", match=faulty.pattern("head"))
        assert await st.size("k") == len(data)
        assert await st.read("k") == data

    async def test_throttling_that_never_stops_fails_cleanly(self, faulty: Faulty, backend: Backend) -> None:
        st = faulty.make(max_attempts=2)
        faulty.proxy.error(100, status=503, code=backend.busy_code, match=faulty.pattern("part"))
        with pytest.raises(TransientStorageError, match=r"upload part \d of \w+://.*/root/k failed") as info:
            await upload(st, "k", payload(2 * PART))
        assert info.value.retryable is True
        faulty.proxy.clear()
        assert backend.keys() == []
        assert backend.incomplete_uploads() == []

    async def test_reset_mid_upload_is_retried(self, faulty: Faulty, backend: Backend) -> None:
        st = faulty.make()
        data = payload(3 * PART, seed=3)
        faulty.proxy.reset_request(after=1 * MiB, count=2, match=faulty.pattern("part"))
        await upload(st, "k", data)
        assert faulty.proxy.injected["reset_request"] == 2
        assert await backend.make().read("k") == data
        assert backend.incomplete_uploads() == []

    async def test_reset_mid_upload_every_time_fails_cleanly(self, faulty: Faulty, backend: Backend) -> None:
        st = faulty.make(max_attempts=2)
        faulty.proxy.reset_request(after=1 * MiB, count=100, match=faulty.pattern("part"))
        with pytest.raises(StorageError, match=r"\w+://.*/root/k .*connection"):
            await upload(st, "k", payload(2 * PART))
        faulty.proxy.clear()
        assert backend.keys() == []  # no partial object
        assert backend.incomplete_uploads() == []  # and no incomplete upload

    async def test_reset_on_single_put_is_retried(self, faulty: Faulty) -> None:
        st = faulty.make()
        faulty.proxy.reset_request(after=1000, count=1, match=faulty.pattern("put"))
        data = payload(100_000, seed=4)
        w = await st.open_writer("small", size_hint=len(data))
        await w.write_part(0, 0, memoryview(data))
        await w.commit()
        assert faulty.proxy.injected["reset_request"] == 1
        assert await st.read("small") == data

    @pytest.mark.parametrize("fault", ["reset_response", "cut_response"])
    async def test_body_broken_mid_get_resumes(self, faulty: Faulty, fault: str) -> None:
        st = faulty.make()
        data = payload(3 * PART + 3, seed=6)
        await upload(st, "k", data)
        faulty.proxy.seen.clear()
        getattr(faulty.proxy, fault)(after=1 * MiB + 17, count=3, match=faulty.pattern("get"))
        buf = bytearray(len(data))
        await st.read_into("k", 0, memoryview(buf))
        assert buf == data
        assert faulty.proxy.injected[fault] == 3
        # Resumed requests never start over at a range boundary when bytes of that range had arrived.
        starts = sorted({s % (4 * MiB) for s in _range_starts(faulty)})
        assert any(0 < s <= 1 * MiB + 17 for s in starts) or faulty.backend.name == "azurite", starts

    async def test_whole_object_read_resumes(self, faulty: Faulty) -> None:
        st = faulty.make()
        data = payload(3 * MiB, seed=7)
        await st.put_record("rec", data)
        faulty.proxy.cut_response(after=100_000, count=2, match=faulty.pattern("get"))
        assert await st.read("rec") == data
        assert faulty.proxy.injected["cut_response"] == 2

    async def test_body_cut_every_time_gives_up(self, faulty: Faulty) -> None:
        st = faulty.make(max_attempts=3)
        await upload(st, "k", payload(PART))
        faulty.proxy.cut_response(after=1000, count=1000, match=faulty.pattern("get"))
        with pytest.raises(TransientStorageError, match=r"read \w+://.*/root/k .*(cut 3 time|failed)"):
            await st.read_into("k", 0, memoryview(bytearray(PART)))

    async def test_stalled_read_times_out(self, faulty: Faulty) -> None:
        st = faulty.make(op_timeout=1.5)
        await upload(st, "k", payload(PART))
        faulty.proxy.stall(30, count=100, match=faulty.pattern("get"))
        with pytest.raises(StorageOpTimeoutError, match=r"read \w+://.*/root/k timed out.*op_timeout=1.5s"):
            await st.read_into("k", 0, memoryview(bytearray(PART)))  # not after the stall's 30 s: the test's timeout

    async def test_stalled_upload_times_out_and_cleans_up(self, faulty: Faulty, backend: Backend) -> None:
        st = faulty.make(op_timeout=1.5)
        faulty.proxy.stall(30, count=100, match=faulty.pattern("part"))
        with pytest.raises(StorageOpTimeoutError, match=r"upload part \d of \w+://.*/root/k timed out"):
            await upload(st, "k", payload(2 * PART))
        faulty.proxy.clear()
        assert backend.keys() == []
        assert backend.incomplete_uploads() == []

    async def test_unreachable_endpoint_is_transient(self, backend: Backend) -> None:
        if backend.make_via is None:
            pytest.skip(f"{backend.name} has no endpoint")
        st = backend.make_via("http://127.0.0.1:9", max_attempts=1, connect_timeout=1)  # nothing listens there
        try:
            with pytest.raises(TransientStorageError, match=r"(?i)connect"):
                await st.exists("k")
        finally:
            await st.close()
