"""GCSStorage on fake-gcs-server: the conformance suite (faults included) and what is GCS's own."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.errors import BadInputError, CheckpointNotFoundError, PermanentStorageError, StorageError
from asyncckpt.format import checksum
from asyncckpt.storage import open_storage
from asyncckpt.storage.gcs import GCSStorage
from tests.faultproxy import FaultProxy
from tests.object_servers import FakeGcsServer

from .conformance import FaultTests, ProtocolTests, split
from .conftest import Backend, make_backend, payload


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("gcs", request, tmp_path)


class TestGcs(ProtocolTests):
    pass


class TestGcsFaults(FaultTests):
    pass


@pytest.mark.parametrize("uri", ["gs://", "gs://ab", "gs://Upper/x", "gs://good/../x", "gs://good/a//b", "az://good/x"])
def test_bad_uris(uri: str) -> None:
    with pytest.raises(BadInputError):
        GCSStorage(uri, endpoint_url="http://127.0.0.1:9")


@pytest.mark.parametrize("opts", [{"max_attempts": 0}, {"part_concurrency": 0}, {"op_timeout": -1}, {"bogus": 1}])
def test_bad_options(opts: dict[str, Any]) -> None:
    with pytest.raises(BadInputError):
        GCSStorage("gs://bucket/x", endpoint_url="http://127.0.0.1:9", **opts)


async def test_emulator_from_the_environment(
    gcs_server: FakeGcsServer, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORAGE_EMULATOR_HOST alone points gs:// at the emulator (with or without http://), credentials not needed."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    for host in (gcs_server.endpoint_url, gcs_server.endpoint_url.removeprefix("http://")):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
        st = open_storage(f"gcs://{gcs_bucket}/env")
        try:
            await st.put_record("k", host.encode())
            assert await st.read("k") == host.encode()
        finally:
            await st.close()
    assert gcs_server.keys(gcs_bucket) == ["env/k"]


async def test_missing_bucket_says_so(gcs_server: FakeGcsServer) -> None:
    st = GCSStorage("gs://no-such-bucket-here/x", **gcs_server.options(max_attempts=1))
    try:
        with pytest.raises(PermanentStorageError, match="bucket 'no-such-bucket-here' does not exist") as info:
            await st.put_record("k", b"x")
        assert not isinstance(info.value, CheckpointNotFoundError)  # never "no checkpoint here yet"
        with pytest.raises(PermanentStorageError, match="does not exist"):
            await st.list()
    finally:
        await st.close()


async def test_parts_beyond_one_compose_are_composed_in_a_tree(gcs_server: FakeGcsServer, gcs_bucket: str) -> None:
    """70 parts: more than one compose request takes (32 sources), so intermediates are composed first."""
    st = GCSStorage(f"gs://{gcs_bucket}/r", **gcs_server.options())
    data = payload(70 * 1000 + 7, seed=11)
    try:
        w = await st.open_writer("many-parts")
        await asyncio.gather(*(w.write_part(i, off, v) for i, off, v in split(data, 1000)))
        assert await st.list() == []
        await w.commit()
        assert await st.read("many-parts") == data
        assert gcs_server.all_keys(gcs_bucket) == ["r/many-parts"]  # every temporary object is gone
    finally:
        await st.close()


async def test_parts_carry_the_callers_crc32c(
    gcs_server: FakeGcsServer, gcs_bucket: str, fault_proxy_factory: Any
) -> None:
    """The CRC32C the engine computed goes up with each part (GCS verifies it; the emulator only stores it)."""
    proxy: FaultProxy = fault_proxy_factory(gcs_server.endpoint_url)
    st = GCSStorage(f"gs://{gcs_bucket}/r", **gcs_server.options(proxy.endpoint_url))
    data = payload(5 * 1024 * 1024 + 3, seed=3)
    sent: list[str] = []
    real = st.gcs.upload

    async def spy(lc: Any, name: str, view: memoryview, **kw: Any) -> Any:
        reply = await real(lc, name, view, **kw)
        sent.append(reply.get("crc32c", ""))
        return reply

    st.gcs.upload = spy  # type: ignore[method-assign]
    try:
        w = await st.open_writer("k")
        for i, off, v in split(data):
            await w.write_part(i, off, v, crc32c=checksum(v))
        await w.commit()
        expect = [base64.b64encode(checksum(v).to_bytes(4, "big")).decode() for _, _, v in split(data)]
        assert sent == expect
        meta = json.loads(json.dumps(await st._meta("k")))
        assert meta["size"] == str(len(data))
    finally:
        await st.close()


async def test_a_part_deleted_before_commit_fails_the_commit_cleanly(gcs_server: FakeGcsServer, gcs_bucket: str) -> None:
    st = GCSStorage(f"gs://{gcs_bucket}/r", **gcs_server.options(max_attempts=2))
    data = payload(3000, seed=4)
    try:
        w = await st.open_writer("k")
        await asyncio.gather(*(w.write_part(i, off, v) for i, off, v in split(data, 1000)))
        part = next(k for k in gcs_server.all_keys(gcs_bucket) if k.endswith("part-000001"))
        gcs_server._json("DELETE", f"/storage/v1/b/{gcs_bucket}/o/{part.replace('/', '%2F')}")  # someone else
        # GCS answers 404 ("a part of the upload is gone"); fake-gcs-server answers 500 (retried, then given up).
        with pytest.raises(StorageError, match=r"commit gs://.*/r/k failed"):
            await w.commit()
        assert gcs_server.all_keys(gcs_bucket) == []  # nothing visible, no temporaries left
    finally:
        await st.close()
