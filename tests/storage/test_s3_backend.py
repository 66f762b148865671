"""S3Storage specifics on moto: URIs, prefixes, errors, loops, fallbacks, crash leftovers."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from asyncckpt._loop import run_sync
from asyncckpt.errors import BadInputError, CheckpointNotFoundError, IntegrityError, StorageError
from asyncckpt.storage import open_storage
from asyncckpt.storage.s3 import S3Storage
from tests.s3_servers import MotoServer

from .conftest import Backend, MiB, payload

pytestmark = pytest.mark.timeout(120)

Options = Callable[..., tuple[str, dict[str, Any]]]


def test_open_storage_registers_the_backend(moto_server: MotoServer) -> None:
    st = open_storage("s3://some-bucket/run/a/", **moto_server.options(part_concurrency=3))
    assert isinstance(st, S3Storage)
    assert (st.bucket, st.prefix, st.uri) == ("some-bucket", "run/a", "s3://some-bucket/run/a")
    assert S3Storage("s3://some-bucket").uri == "s3://some-bucket"
    assert S3Storage("s3://some-bucket/").prefix == ""


@pytest.mark.parametrize(
    "uri", ["s3://ab", "s3://", "s3://bad/../x", "s3://bad/a//b", "s3://b_-/a/./b", "file:///x", "s3://bucket!/x"]
)
def test_bad_uris(uri: str) -> None:
    with pytest.raises(BadInputError):
        S3Storage(uri)


@pytest.mark.parametrize(
    "opts",
    [{"max_attempts": 0}, {"part_concurrency": 0}, {"conditional_writes": "maybe"}, {"op_timeout": 0}],
)
def test_bad_options(opts: dict[str, Any]) -> None:
    with pytest.raises(BadInputError):
        S3Storage("s3://bucket/x", **opts)


async def test_prefixes_are_isolated(moto_server: MotoServer, s3_bucket: str) -> None:
    a = S3Storage(f"s3://{s3_bucket}/run", **moto_server.options())
    ab = S3Storage(f"s3://{s3_bucket}/run2", **moto_server.options())
    top = S3Storage(f"s3://{s3_bucket}", **moto_server.options())
    try:
        await a.put_record("k", b"a")
        await ab.put_record("k", b"ab")
        assert await a.list() == ["k"] and await ab.list() == ["k"]
        assert await a.read("k") == b"a"
        assert await top.list() == ["run/k", "run2/k"]
        assert moto_server.keys(s3_bucket) == ["run/k", "run2/k"]
    finally:
        for st in (a, ab, top):
            await st.close()


async def test_missing_bucket_says_so(moto_server: MotoServer) -> None:
    st = S3Storage("s3://no-such-bucket-here/x", **moto_server.options(max_attempts=1))
    try:
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist") as info:
            await st.list()
        assert not isinstance(info.value, CheckpointNotFoundError)
        with pytest.raises(StorageError, match="does not exist"):
            await st.put_record("k", b"x")
        w = await st.open_writer("big")
        with pytest.raises(StorageError, match="s3://no-such-bucket-here/x/big"):
            await w.write_part(0, 0, memoryview(b"x" * 10))
    finally:
        await st.close()


async def test_unreachable_endpoint_is_a_storage_error() -> None:
    st = S3Storage(
        "s3://bucket/x",
        endpoint_url="http://127.0.0.1:9",  # discard port: nothing listens
        aws_access_key_id="a",
        aws_secret_access_key="b",
        region_name="us-east-1",
        max_attempts=1,
        connect_timeout=1,
    )
    try:
        with pytest.raises(StorageError, match=r"cannot connect.*endpoint_url"):
            await st.exists("k")
    finally:
        await st.close()


@pytest.fixture
def no_aws_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials, profiles or metadata service reachable from the environment."""
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.usefixtures("no_aws_settings")
async def test_missing_credentials_and_profile_are_explained(moto_server: MotoServer) -> None:
    st = S3Storage("s3://bucket/x", endpoint_url=moto_server.endpoint_url, region_name="us-east-1", max_attempts=1)
    try:
        with pytest.raises(StorageError, match=r"head s3://bucket/x/k failed: no usable AWS credentials.*AWS_PROFILE"):
            await st.exists("k")
    finally:
        await st.close()
    st = S3Storage("s3://bucket/x", endpoint_url=moto_server.endpoint_url, profile="no-such-profile")
    try:
        with pytest.raises(BadInputError, match="profile 'no-such-profile' not found"):
            await st.exists("k")
    finally:
        await st.close()


async def test_endpoint_from_the_environment(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", moto_server.region)
    st = open_storage(f"s3://{s3_bucket}/env")
    try:
        await st.put_record("k", b"v")
        assert moto_server.keys(s3_bucket) == ["env/k"]
    finally:
        await st.close()


async def test_commit_failure_leaves_no_object_and_no_upload(moto_server: MotoServer, s3_bucket: str) -> None:
    st = S3Storage(f"s3://{s3_bucket}/r", **moto_server.options())
    try:
        w = await st.open_writer("tiny-parts")
        await w.write_part(0, 0, memoryview(payload(1 * MiB)))  # S3 refuses a non-last part < 5 MiB
        await w.write_part(1, 1 * MiB, memoryview(payload(1 * MiB)))
        with pytest.raises(StorageError, match=r"commit s3://.*/r/tiny-parts"):
            await w.commit()
        assert not await st.exists("tiny-parts")
        assert moto_server.incomplete_uploads(s3_bucket) == []

        w = await st.open_writer("gap")
        await w.write_part(0, 0, memoryview(payload(5 * MiB)))
        await w.write_part(2, 10 * MiB, memoryview(payload(10)))
        with pytest.raises(StorageError, match=r"parts \[2\] were never written"):
            await w.commit()
        assert not await st.exists("gap")
        assert moto_server.incomplete_uploads(s3_bucket) == []
        with pytest.raises(StorageError):
            await w.write_part(1, 5 * MiB, memoryview(payload(10)))
    finally:
        await st.close()


async def test_abort_incomplete_uploads(moto_server: MotoServer, s3_bucket: str) -> None:
    st = S3Storage(f"s3://{s3_bucket}/run", **moto_server.options())
    other = S3Storage(f"s3://{s3_bucket}/run-other", **moto_server.options())
    try:
        for key in ("step-1/rank-0.data", "step-1/rank-1.data", "step-10/rank-0.data"):
            w = await st.open_writer(key)
            await w.write_part(0, 0, memoryview(payload(5 * MiB)))  # then "crash": neither commit nor abort
        w = await other.open_writer("step-1/rank-0.data")
        await w.write_part(0, 0, memoryview(b"x"))
        assert len(moto_server.incomplete_uploads(s3_bucket)) == 4
        assert await st.abort_incomplete_uploads("step-1") == 2  # not step-10
        assert len(moto_server.incomplete_uploads(s3_bucket)) == 2
        assert await st.abort_incomplete_uploads() == 1  # not run-other/
        assert moto_server.incomplete_uploads(s3_bucket) == ["run-other/step-1/rank-0.data"]
        assert await st.abort_incomplete_uploads() == 0
        assert await st.list() == []
    finally:
        await st.close()
        await other.close()


async def test_conditional_writes_off_falls_back_to_head_then_put(moto_options: Options) -> None:
    uri, opts = moto_options(conditional_writes=False)
    st = S3Storage(uri, **opts)
    try:
        assert await st.put_record("c", b"1", if_absent=True) is True
        assert await st.put_record("c", b"2", if_absent=True) is False
        assert await st.read("c") == b"1"
    finally:
        await st.close()


async def test_without_checksums(moto_options: Options) -> None:
    uri, opts = moto_options(checksum=False)
    st = S3Storage(uri, **opts)
    try:
        data = payload(5 * MiB + 3)
        w = await st.open_writer("k")
        await w.write_part(1, 5 * MiB, memoryview(data)[5 * MiB :])
        await w.write_part(0, 0, memoryview(data)[: 5 * MiB])
        await w.commit()
        assert await st.read("k") == data
    finally:
        await st.close()


def test_one_client_per_event_loop(moto_options: Options) -> None:
    """One S3Storage used from asyncio, uvloop and the private loop thread (one at a time and at once)."""
    uri, opts = moto_options()
    st = S3Storage(uri, **opts)
    data = payload(6 * MiB, seed=9)

    async def roundtrip(key: str) -> tuple[bytes, Any]:
        w = await st.open_writer(key)
        await w.write_part(0, 0, memoryview(data)[: 5 * MiB])
        await w.write_part(1, 5 * MiB, memoryview(data)[5 * MiB :])
        await w.commit()
        client = await st.s3.client()
        assert await st.s3.client() is client  # reused within a loop
        got = await st.read(key)
        await st.close()  # closes this loop's client only
        return got, client  # kept alive, so ids below cannot be reused

    async def listing() -> list[str]:
        try:
            return await st.list()
        finally:
            await st.close()

    got1, c1 = asyncio.run(roundtrip("a"))
    results: dict[str, Any] = {}

    def in_uvloop() -> None:
        results["uv"] = uvloop.run(roundtrip("b"))

    t = threading.Thread(target=in_uvloop)
    t.start()
    got3, c3 = run_sync(roundtrip("c"), timeout=60)  # concurrently with the uvloop thread
    t.join(60)
    got2, c2 = results["uv"]
    assert got1 == got2 == got3 == data
    assert len({id(c1), id(c2), id(c3)}) == 3  # a client per loop, never shared across loops
    assert asyncio.run(listing()) == ["a", "b", "c"]
    assert st.s3.clients == 0


async def test_no_use_after_close_on_the_same_loop(moto_options: Options) -> None:
    """A task still running after close() fails instead of quietly opening a client nobody closes."""
    uri, opts = moto_options()
    st = S3Storage(uri, **opts)
    await st.put_record("k", b"v")
    await st.close()
    await st.close()  # idempotent
    with pytest.raises(StorageError, match="after close"):
        await st.read("k")
    assert st.s3.clients == 0


async def test_parallel_ranges_are_bounded(moto_options: Options) -> None:
    uri, opts = moto_options(read_range_size=1 * MiB, part_concurrency=2)
    st = S3Storage(uri, **opts)
    try:
        data = payload(9 * MiB + 1)
        w = await st.open_writer("k")
        await w.write_part(0, 0, memoryview(data)[: 5 * MiB])
        await w.write_part(1, 5 * MiB, memoryview(data)[5 * MiB :])
        await w.commit()
        lc = await st.s3.loop_client()
        peak = 0
        real = lc.client.get_object
        live = 0

        async def counting(**kw: Any) -> Any:
            nonlocal live, peak
            live += 1
            peak = max(peak, live)
            try:
                return await real(**kw)
            finally:
                live -= 1

        lc.client.get_object = counting
        buf = bytearray(len(data))
        await st.read_into("k", 0, memoryview(buf))
        assert buf == data and 1 <= peak <= 2
    finally:
        await st.close()


async def test_resume_refuses_a_replaced_object(s3_backend: Backend) -> None:
    """A resumed GET carries If-Match with the first response's ETag: a replaced object is not stitched in."""
    assert s3_backend.server is not None
    st = s3_backend.make()
    try:
        await st.put_record("k", payload(1000, seed=1))
        etag = s3_backend.server.client().head_object(Bucket=s3_backend.bucket, Key="root/k")["ETag"]
        await st.put_record("k", payload(1000, seed=2))
        with pytest.raises(IntegrityError, match="changed while it was being read"):
            await st.fetch_into("k", 0, memoryview(bytearray(1000)), version=etag)  # type: ignore[attr-defined]
    finally:
        await st.close()
