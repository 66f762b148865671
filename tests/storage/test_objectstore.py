"""The shared object-store helpers (retry policy, per-call timeout, resumable ranged reads, per-loop clients)
and the storage error tree, without a server."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt.errors import (
    BadInputError,
    CheckpointNotFoundError,
    IntegrityError,
    PermanentStorageError,
    StorageChecksumError,
    StorageError,
    StorageNotFoundError,
    StorageOpTimeoutError,
    StoragePermissionError,
    StoragePreconditionError,
    StorageTimeoutError,
    TransientStorageError,
)
from asyncckpt.storage.objectstore import PerLoop, Progress, RetryPolicy, read_ranges, resumable_fetch, retrying, timed

FAST = RetryPolicy(max_attempts=4, base_delay=0)


def test_error_tree_says_whether_a_retry_helps() -> None:
    assert TransientStorageError.retryable is True and PermanentStorageError.retryable is False
    assert StorageError.retryable is None
    for cls in (StorageTimeoutError, StorageOpTimeoutError):
        assert issubclass(cls, TransientStorageError) and issubclass(cls, TimeoutError)
    for cls in (StorageNotFoundError, StoragePermissionError, StoragePreconditionError, StorageChecksumError):
        assert issubclass(cls, PermanentStorageError)
    assert issubclass(StoragePermissionError, PermissionError)
    # Deprecated for one release: a missing key is still a CheckpointNotFoundError (and a FileNotFoundError).
    err = StorageNotFoundError("s3://b/k does not exist")
    assert isinstance(err, CheckpointNotFoundError) and isinstance(err, FileNotFoundError)
    for name in ("TransientStorageError", "PermanentStorageError", "StorageNotFoundError", "StorageOpTimeoutError"):
        assert name in asyncckpt.__all__ and getattr(asyncckpt, name).__module__ == "asyncckpt.errors"


def test_retry_policy_validates_and_caps_its_delay() -> None:
    with pytest.raises(BadInputError):
        RetryPolicy(max_attempts=0)
    policy = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=1.0)
    assert all(0.05 <= policy.delay(1) <= 0.1 for _ in range(20))
    assert all(policy.delay(30) <= 1.0 for _ in range(20))


async def test_retrying_retries_only_transient_errors() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TransientStorageError(f"503 number {calls}")
        return "done"

    assert await retrying(flaky, FAST) == "done" and calls == 3

    for exc in (PermanentStorageError("403"), StorageOpTimeoutError("budget spent"), IntegrityError("short")):
        calls = 0

        async def failing(e: Exception = exc) -> None:
            nonlocal calls
            calls += 1
            raise e

        with pytest.raises(type(exc)):
            await retrying(failing, FAST)
        assert calls == 1, exc

    calls = 0

    async def always() -> None:
        nonlocal calls
        calls += 1
        raise TransientStorageError("still 503")

    with pytest.raises(TransientStorageError, match="still 503"):
        await retrying(always, FAST)
    assert calls == FAST.max_attempts


async def test_timed_tells_its_expiry_from_the_inner_timeouts() -> None:
    cancelled = asyncio.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(StorageOpTimeoutError, match=r"read gs://b/k timed out: .*op_timeout=0.05s"):
        await timed(hang(), 0.05, "read gs://b/k")
    assert cancelled.is_set()  # the hung call does not linger

    async def socket_timeout() -> None:
        raise StorageTimeoutError("read timed out at the socket")

    with pytest.raises(StorageTimeoutError) as info:
        await timed(socket_timeout(), 5)
    assert not isinstance(info.value, StorageOpTimeoutError)  # passes through: a caller may resume after it
    assert await timed(asyncio.sleep(0, "x"), None) == "x"


class CuttingStore:
    """A fake object store whose GETs deliver ``cuts[i]`` bytes on the i-th request, then break."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.data, self.cuts = data, list(cuts)
        self.starts: list[int] = []

    async def get(self, pos: int, view: memoryview, progress: Progress) -> None:
        self.starts.append(pos)
        if progress.version is None:
            progress.version = "v1"
        n = len(view)
        cut = self.cuts.pop(0) if self.cuts else None
        send = n if cut is None else min(cut, n)
        avail = max(0, min(send, len(self.data) - pos))
        for i in range(0, avail, 7):  # in small chunks, as a body arrives
            k = min(7, avail - i)
            view[i : i + k] = self.data[pos + i : pos + i + k]
            progress.got += k
        if cut is not None and cut < n:
            raise TransientStorageError(f"body cut after {cut} bytes")


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=2000),
    start=st.integers(min_value=0, max_value=100),
    cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=3),
)
def test_resumable_fetch_resumes_at_the_first_missing_byte(size: int, start: int, cuts: list[int]) -> None:
    data = bytes(range(256)) * 10
    size = min(size, len(data) - start)
    store = CuttingStore(data, cuts)
    view = memoryview(bytearray(size))
    asyncio.run(resumable_fetch(store.get, start, view, where="mem://k", policy=FAST))
    assert view.tobytes() == data[start : start + size]
    expect = [start]  # each resume starts exactly where the received bytes stopped
    done = 0
    for c in cuts:
        if c >= size - done:
            break
        done += c
        expect.append(start + done)
    assert store.starts == expect


async def test_resumable_fetch_gives_up_and_reports_a_short_object() -> None:
    store = CuttingStore(b"x" * 1000, [10] * 10)
    with pytest.raises(TransientStorageError, match=r"read mem://k failed: .*cut 4 time\(s\)"):
        await resumable_fetch(store.get, 0, memoryview(bytearray(1000)), where="mem://k", policy=FAST)
    with pytest.raises(IntegrityError, match=r"mem://k is truncated: wanted 100 bytes at offset 950"):
        await resumable_fetch(CuttingStore(b"x" * 1000, []).get, 950, memoryview(bytearray(100)), where="mem://k", policy=FAST)


async def test_read_ranges_fills_the_buffer_from_concurrent_ranges() -> None:
    data = bytes(range(256)) * 40
    store = CuttingStore(data, [])
    view = memoryview(bytearray(len(data) - 3))
    await read_ranges(store.get, 3, view, range_size=1000, where="mem://k", policy=FAST)
    assert view.tobytes() == data[3:]
    assert sorted(store.starts) == list(range(3, len(data), 1000))


def test_per_loop_items_are_per_loop_and_closed_per_loop() -> None:
    per: PerLoop[list[int]] = PerLoop("mem://k")
    made: list[list[int]] = []
    closed: list[list[int]] = []

    async def create() -> list[int]:
        made.append([len(made)])
        return made[-1]

    async def closer(item: list[int]) -> None:
        closed.append(item)

    async def use() -> list[int]:
        a = await per.get(create)
        assert await per.get(create) is a
        await per.close(closer)
        with pytest.raises(PermanentStorageError, match="used after close"):
            await per.get(create)
        return a

    first, second = asyncio.run(use()), asyncio.run(use())
    assert first is not second and closed == [first, second] and len(per) == 0


def _configs() -> list[tuple[str, type]]:
    from asyncckpt.storage.azure.config import AzureConfig
    from asyncckpt.storage.gcs.config import GCSConfig
    from asyncckpt.storage.s3.config import S3Config

    return [("s3://b-1/p", S3Config), ("gs://b-1/p", GCSConfig), ("az://c-1/p", AzureConfig)]


@pytest.mark.parametrize("option,value", [("part_concurrency", 0), ("max_attempts", 0), ("read_range_size", 0),
                                          ("list_page_size", 0), ("single_put_threshold", -1)])
def test_every_object_store_config_names_the_limit_out_of_range(option: str, value: int) -> None:
    for uri, cls in _configs():
        with pytest.raises(asyncckpt.BadInputError, match=rf"{uri}: .*{option}={value}"):
            cls(uri, **{option: value})
        assert getattr(cls(uri), option) > 0 or option == "single_put_threshold"


def test_every_object_store_config_checks_op_timeout_and_its_uri() -> None:
    for uri, cls in _configs():
        with pytest.raises(asyncckpt.BadInputError, match="op_timeout must be > 0"):
            cls(uri, op_timeout=0)
        scheme = uri.partition("://")[0]
        with pytest.raises(asyncckpt.BadInputError, match="is not a valid"):
            cls(f"{scheme}://A/p")
        with pytest.raises(asyncckpt.BadInputError, match=f"expected {scheme}://"):
            cls("file:///tmp/x")
        cfg = cls(uri + "//")
        assert cfg.uri == uri and cfg.prefix == "p" and cfg.policy.max_attempts == cfg.max_attempts
