"""S3-only fault cases through the proxy in front of SeaweedFS (the common ones are in the conformance suite)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from asyncckpt.errors import StorageTimeoutError
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
