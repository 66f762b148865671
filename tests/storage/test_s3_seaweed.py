"""SeaweedFS fidelity: signatures, checksums, surviving a kill (atomic conditional writes: the conformance suite)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Callable

import pytest
from botocore.exceptions import ClientError

import asyncckpt.storage.s3.client as s3client
import asyncckpt.storage.s3.upload as s3upload
from asyncckpt.errors import CheckpointNotFoundError, StorageError
from asyncckpt.storage.s3 import S3Storage
from tests.s3_servers import SeaweedServer

from .conftest import MiB, payload

pytestmark = pytest.mark.timeout(120)


async def test_wrong_secret_is_refused(seaweed_server: SeaweedServer, seaweed_bucket: str) -> None:
    opts = seaweed_server.options(aws_secret_access_key="not-the-secret", max_attempts=1)
    st = S3Storage(f"s3://{seaweed_bucket}/r", **opts)
    try:
        with pytest.raises(StorageError, match="credentials") as info:
            await st.put_record("k", b"x")
        assert "SignatureDoesNotMatch" in str(info.value) and f"s3://{seaweed_bucket}/r/k" in str(info.value)
        with pytest.raises(StorageError, match="credentials"):
            await st.list()
    finally:
        await st.close()
    opts = seaweed_server.options(aws_access_key_id="nobody", max_attempts=1)
    st = S3Storage(f"s3://{seaweed_bucket}/r", **opts)
    try:
        with pytest.raises(StorageError, match="credentials"):
            await st.exists("k")  # HEAD: no error body, the 403 status alone must say it
    finally:
        await st.close()
    assert seaweed_server.keys(seaweed_bucket) == []


def test_server_checks_content_md5(seaweed_server: SeaweedServer, seaweed_bucket: str) -> None:
    c = seaweed_server.client()
    body = b"hello world"
    good = base64.b64encode(hashlib.md5(body).digest()).decode()
    c.put_object(Bucket=seaweed_bucket, Key="ok", Body=body, ContentMD5=good)
    bad = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket=seaweed_bucket, Key="bad", Body=body, ContentMD5=bad)
    assert info.value.response["Error"]["Code"] == "BadDigest"
    assert seaweed_server.keys(seaweed_bucket) == ["ok"]


async def test_crc32c_is_sent_and_checked_by_the_store(seaweed_server: SeaweedServer, seaweed_bucket: str) -> None:
    st = S3Storage(f"s3://{seaweed_bucket}/r", **seaweed_server.options())
    data = payload(5 * MiB + 99)
    try:
        w = await st.open_writer("good")
        await w.write_part(1, 5 * MiB, memoryview(data)[5 * MiB :])
        await w.write_part(0, 0, memoryview(data)[: 5 * MiB])
        await w.commit()
        head = seaweed_server.client().head_object(Bucket=seaweed_bucket, Key="r/good", ChecksumMode="ENABLED")
        assert head.get("ChecksumCRC32C", "").endswith("-2")  # the store kept our per-part CRC32Cs
        assert await st.read("good") == data
    finally:
        await st.close()


async def test_corrupted_part_is_rejected(
    seaweed_server: SeaweedServer, seaweed_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part whose bytes do not match the CRC32C we send is refused, and nothing is left behind."""
    def wrong(data: object = None, *, value: object = None) -> str:
        return base64.b64encode(b"\0\0\0\1").decode()

    monkeypatch.setattr(s3client, "b64_crc32c", wrong)
    monkeypatch.setattr(s3upload, "b64_crc32c", wrong)
    st = S3Storage(f"s3://{seaweed_bucket}/r", **seaweed_server.options())
    data = payload(5 * MiB + 1)
    try:
        w = await st.open_writer("bad")
        with pytest.raises(StorageError, match=r"checksum.*corrupted in transit"):
            await w.write_part(0, 0, memoryview(data)[: 5 * MiB])
        with pytest.raises(StorageError):
            await w.commit()
        with pytest.raises(StorageError, match="checksum"):
            await st.put_record("rec", b"abc")
        assert seaweed_server.keys(seaweed_bucket) == []
        assert seaweed_server.incomplete_uploads(seaweed_bucket) == []
    finally:
        await st.close()



@pytest.mark.slow
async def test_killed_mid_upload_then_restarted(seaweed_factory: Callable[[], SeaweedServer]) -> None:
    server = seaweed_factory()
    bucket = server.create_bucket()
    # A killed server resets connections and refuses new ones at once: no read timeout is involved,
    # so generous timeouts keep a loaded machine from failing the parts written before the kill.
    opts = server.options(max_attempts=2, connect_timeout=2, read_timeout=30, op_timeout=30)
    st = S3Storage(f"s3://{bucket}/run", **opts)
    data = payload(4 * 5 * MiB, seed=7)
    parts = [(i, i * 5 * MiB, memoryview(data)[i * 5 * MiB : (i + 1) * 5 * MiB]) for i in range(4)]
    try:
        w = await st.open_writer("step-1/rank-0.data")
        await w.write_part(*parts[0])  # the upload exists and holds a part
        pending = [asyncio.ensure_future(w.write_part(*p)) for p in parts[1:]]
        await asyncio.sleep(0.02)
        server.kill()  # SIGKILL while parts are in flight
        t0 = time.monotonic()
        results = await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.monotonic() - t0
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors and all(isinstance(e, StorageError) for e in errors), results
        assert elapsed < 20, f"a dead server took {elapsed:.1f}s to surface"
        assert any("s3://" in str(e) and "step-1/rank-0.data" in str(e) for e in errors)
        with pytest.raises(StorageError):
            await w.commit()
        await w.abort()  # the server is down: logged, not raised

        server.start()  # same data dir and ports
        with pytest.raises(CheckpointNotFoundError):
            await st.size("step-1/rank-0.data")  # no partial object visible
        # SeaweedFS keeps the upload (and its parts) across the kill; recovery removes it.
        assert server.incomplete_uploads(bucket) == ["run/step-1/rank-0.data"]
        assert await st.abort_incomplete_uploads("step-1") == 1
        assert server.incomplete_uploads(bucket) == []

        w = await st.open_writer("step-1/rank-0.data")
        await asyncio.gather(*(w.write_part(*p) for p in reversed(parts)))
        await w.commit()
        assert await st.read("step-1/rank-0.data") == data
        assert await st.list() == ["step-1/rank-0.data"]
    finally:
        await st.close()
