"""S3Storage through the fault proxy (in front of SeaweedFS): throttling, 5xx, resets, cut bodies, stalls."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from asyncckpt.errors import StorageError, StorageTimeoutError
from asyncckpt.storage.s3 import S3Storage
from tests.faultproxy import FaultProxy
from tests.s3_servers import SeaweedServer

from .conftest import MiB, payload

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

PART = 5 * MiB
PARTS = r"^PUT .*partNumber="
COMPLETE = r"^POST .*uploadId="
GET = r"^GET /[^?]+/"  # object GETs (not bucket listings)

MakeStore = Callable[..., S3Storage]


@pytest.fixture
async def make_store(
    seaweed_server: SeaweedServer, seaweed_bucket: str, seaweed_proxy: FaultProxy
) -> AsyncIterator[MakeStore]:
    """S3Storage handles that reach SeaweedFS through the proxy; closed after the test."""
    made: list[S3Storage] = []

    def make(**opts: Any) -> S3Storage:
        options = seaweed_server.options(endpoint_url=seaweed_proxy.endpoint_url, read_range_size=4 * MiB)
        st = S3Storage(f"s3://{seaweed_bucket}/run", **{**options, **opts})
        made.append(st)
        return st

    yield make
    for st in made:
        await st.close()


async def upload(st: S3Storage, key: str, data: bytes) -> None:
    w = await st.open_writer(key)
    view = memoryview(data)
    try:
        await asyncio.gather(
            *(w.write_part(i, off, view[off : off + PART]) for i, off in enumerate(range(0, len(data), PART)))
        )
        await w.commit()
    except BaseException:
        await w.abort()
        raise


def direct_read(server: SeaweedServer, bucket: str, key: str) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=f"run/{key}")["Body"].read()


def range_starts(proxy: FaultProxy) -> list[int]:
    starts = []
    for line, headers in proxy.seen:
        m = re.match(r"bytes=(\d+)-", headers.get("range", ""))
        if line.startswith("GET ") and m:
            starts.append(int(m.group(1)))
    return starts


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
async def test_error_burst_on_upload_is_retried(
    make_store: MakeStore,
    seaweed_proxy: FaultProxy,
    seaweed_server: SeaweedServer,
    seaweed_bucket: str,
    status: int,
    code: str,
) -> None:
    st = make_store()
    data = payload(3 * PART + 5, seed=1)
    seaweed_proxy.error(3, status=status, code=code)  # hits create, parts, complete: whatever comes first
    t0 = time.monotonic()
    await upload(st, "ck/rank-0.data", data)
    assert time.monotonic() - t0 < 25  # botocore's backoff: at most 1 + 2 + 4 s for three errors in a row
    assert seaweed_proxy.injected["error"] == 3
    assert direct_read(seaweed_server, seaweed_bucket, "ck/rank-0.data") == data
    assert seaweed_server.incomplete_uploads(seaweed_bucket) == []


async def test_error_burst_on_reads_is_retried(make_store: MakeStore, seaweed_proxy: FaultProxy) -> None:
    st = make_store()
    data = payload(2 * PART + 11, seed=2)
    await upload(st, "k", data)
    seaweed_proxy.error(3, status=503, code="SlowDown", match=GET)
    buf = bytearray(len(data))
    await st.read_into("k", 0, memoryview(buf))
    assert buf == data and seaweed_proxy.injected["error"] == 3
    seaweed_proxy.error(2, status=500, code="InternalError", match=r"^(GET|HEAD) ")
    assert await st.size("k") == len(data)
    assert await st.read("k") == data


async def test_throttling_that_never_stops_fails_cleanly(
    make_store: MakeStore, seaweed_proxy: FaultProxy, seaweed_server: SeaweedServer, seaweed_bucket: str
) -> None:
    st = make_store(max_attempts=2)
    seaweed_proxy.error(100, status=503, code="SlowDown", match=PARTS)
    with pytest.raises(StorageError, match=r"upload part \d of s3://.*/run/k failed after 2 attempt.*SlowDown"):
        await upload(st, "k", payload(2 * PART))
    seaweed_proxy.clear()
    assert seaweed_server.keys(seaweed_bucket) == []
    assert seaweed_server.incomplete_uploads(seaweed_bucket) == []


async def test_reset_mid_upload_is_retried(
    make_store: MakeStore, seaweed_proxy: FaultProxy, seaweed_server: SeaweedServer, seaweed_bucket: str
) -> None:
    st = make_store()
    data = payload(3 * PART, seed=3)
    seaweed_proxy.reset_request(after=1 * MiB, count=2, match=PARTS)
    await upload(st, "k", data)
    assert seaweed_proxy.injected["reset_request"] == 2
    assert direct_read(seaweed_server, seaweed_bucket, "k") == data
    assert seaweed_server.incomplete_uploads(seaweed_bucket) == []


async def test_reset_mid_upload_every_time_fails_cleanly(
    make_store: MakeStore, seaweed_proxy: FaultProxy, seaweed_server: SeaweedServer, seaweed_bucket: str
) -> None:
    st = make_store(max_attempts=2)
    seaweed_proxy.reset_request(after=1 * MiB, count=100, match=PARTS)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"s3://.*/run/k .*connection"):
        await upload(st, "k", payload(2 * PART))
    assert time.monotonic() - t0 < 20
    seaweed_proxy.clear()
    assert seaweed_server.keys(seaweed_bucket) == []  # no partial object
    assert seaweed_server.incomplete_uploads(seaweed_bucket) == []  # and no incomplete upload


async def test_reset_on_single_put_is_retried(make_store: MakeStore, seaweed_proxy: FaultProxy) -> None:
    st = make_store()
    seaweed_proxy.reset_request(after=1000, count=1, match=r"^PUT /[^?]+$")
    data = payload(100_000, seed=4)
    w = await st.open_writer("small", size_hint=len(data))
    await w.write_part(0, 0, memoryview(data))
    await w.commit()
    assert seaweed_proxy.injected["reset_request"] == 1
    assert await st.read("small") == data


async def test_complete_whose_reply_is_lost_is_verified(
    make_store: MakeStore, seaweed_proxy: FaultProxy, seaweed_server: SeaweedServer, seaweed_bucket: str
) -> None:
    """CompleteMultipartUpload succeeds on the server but every reply is lost: HEAD/ListParts settle it."""
    st = make_store(max_attempts=2)
    data = payload(2 * PART + 1, seed=5)
    seaweed_proxy.reset_response(after=0, count=100, match=COMPLETE)
    await upload(st, "k", data)
    assert seaweed_proxy.injected["reset_response"] >= 2
    seaweed_proxy.clear()
    assert direct_read(seaweed_server, seaweed_bucket, "k") == data
    assert seaweed_server.incomplete_uploads(seaweed_bucket) == []


@pytest.mark.parametrize("fault", ["reset_response", "cut_response"])
async def test_body_broken_mid_get_resumes_with_range(
    make_store: MakeStore, seaweed_proxy: FaultProxy, fault: str
) -> None:
    st = make_store()
    data = payload(3 * PART + 3, seed=6)
    await upload(st, "k", data)
    seaweed_proxy.seen.clear()
    getattr(seaweed_proxy, fault)(after=1 * MiB + 17, count=3, match=GET)
    buf = bytearray(len(data))
    await st.read_into("k", 0, memoryview(buf))
    assert buf == data
    assert seaweed_proxy.injected[fault] == 3
    # Resumed requests start where the received body stopped, not at a range boundary. A cut
    # body delivers exactly the bytes sent; a reset (RST) may discard some the kernel had
    # buffered, so the resume point is then somewhere inside the range, at most the cut.
    starts = [s % (4 * MiB) for s in range_starts(seaweed_proxy)]
    if fault == "cut_response":
        assert 1 * MiB + 17 in starts
    else:
        assert any(0 < s <= 1 * MiB + 17 for s in starts), starts


async def test_whole_object_read_resumes(make_store: MakeStore, seaweed_proxy: FaultProxy) -> None:
    st = make_store()
    data = payload(3 * MiB, seed=7)
    await st.put_record("rec", data)
    seaweed_proxy.seen.clear()
    seaweed_proxy.cut_response(after=100_000, count=2, match=GET)
    assert await st.read("rec") == data
    assert 100_000 in range_starts(seaweed_proxy)


async def test_body_cut_every_time_gives_up(make_store: MakeStore, seaweed_proxy: FaultProxy) -> None:
    st = make_store(max_attempts=3)
    await upload(st, "k", payload(PART))
    seaweed_proxy.cut_response(after=1000, count=100, match=GET)
    with pytest.raises(StorageError, match=r"read s3://.*/run/k .*cut 3 time"):
        await st.read_into("k", 0, memoryview(bytearray(PART)))


async def test_stalled_read_times_out(make_store: MakeStore, seaweed_proxy: FaultProxy) -> None:
    st = make_store(op_timeout=1.5)
    await upload(st, "k", payload(PART))
    seaweed_proxy.stall(30, count=100, match=GET)
    t0 = time.monotonic()
    with pytest.raises(StorageTimeoutError, match=r"read s3://.*/run/k timed out.*op_timeout=1.5s"):
        await st.read_into("k", 0, memoryview(bytearray(PART)))
    assert 1.4 < time.monotonic() - t0 < 6


async def test_stalled_upload_times_out_and_cleans_up(
    make_store: MakeStore, seaweed_proxy: FaultProxy, seaweed_server: SeaweedServer, seaweed_bucket: str
) -> None:
    st = make_store(op_timeout=1.5)
    seaweed_proxy.stall(30, count=100, match=PARTS)
    t0 = time.monotonic()
    with pytest.raises(StorageTimeoutError, match=r"upload part \d of s3://.*/run/k timed out"):
        await upload(st, "k", payload(2 * PART))
    assert time.monotonic() - t0 < 8
    seaweed_proxy.clear()
    assert seaweed_server.keys(seaweed_bucket) == []
    assert seaweed_server.incomplete_uploads(seaweed_bucket) == []


async def test_stalled_metadata_call_times_out(make_store: MakeStore, seaweed_proxy: FaultProxy) -> None:
    st = make_store(op_timeout=1.0)
    seaweed_proxy.stall(30, count=100, match=r"^HEAD ")
    with pytest.raises(StorageTimeoutError, match="op_timeout=1s"):
        await st.exists("k")


async def test_single_put_path_makes_no_multipart_upload(make_store: MakeStore, seaweed_proxy: FaultProxy) -> None:
    st = make_store(single_put_threshold=1 * MiB)
    w = await st.open_writer("small", size_hint=1000)
    await w.write_part(0, 0, memoryview(payload(1000)))
    await w.commit()
    assert not any("uploads" in r or "uploadId" in r for r in seaweed_proxy.requests)
    assert any(r.startswith("PUT ") for r in seaweed_proxy.requests)
