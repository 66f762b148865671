"""AzureBlobStorage on Azurite: the conformance suite (faults included) and what is Azure's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncckpt.errors import BadInputError, CheckpointNotFoundError, PermanentStorageError, StoragePermissionError
from asyncckpt.storage import open_storage
from asyncckpt.storage.azure import AzureBlobStorage
from tests.object_servers import AzuriteServer

from .conformance import FaultTests, ProtocolTests, upload
from .conftest import Backend, MiB, make_backend, payload


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("azurite", request, tmp_path)


class TestAzurite(ProtocolTests):
    pass


class TestAzuriteFaults(FaultTests):
    pass


@pytest.fixture
def no_azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in __import__("os").environ if v.startswith("AZURE_")]:
        monkeypatch.delenv(var)


@pytest.mark.parametrize(
    "uri", ["az://", "az://ab", "az://Upper/x", "az://a--b/x", "az://good/../x", "az://good/a//b", "s3://good/x"]
)
def test_bad_uris(uri: str) -> None:
    with pytest.raises(BadInputError):
        AzureBlobStorage(uri, connection_string="AccountName=a;AccountKey=Zm9v;BlobEndpoint=http://127.0.0.1:9/a;")


@pytest.mark.parametrize("opts", [{"max_attempts": 0}, {"part_concurrency": 0}, {"op_timeout": 0}, {"bogus": 1}])
def test_bad_options(opts: dict[str, Any]) -> None:
    with pytest.raises(BadInputError):
        AzureBlobStorage("az://cont/x", connection_string="AccountName=a;AccountKey=Zm9v;", **opts)


@pytest.mark.usefixtures("no_azure_env")
async def test_missing_settings_name_the_env_vars() -> None:
    st = open_storage("az://cont/run")  # opening is lazy (like S3): the first call says what is missing
    try:
        with pytest.raises(BadInputError, match="AZURE_STORAGE_CONNECTION_STRING"):
            await st.exists("k")
    finally:
        await st.close()


@pytest.mark.usefixtures("no_azure_env")
async def test_configured_from_the_environment(
    azurite_server: AzuriteServer, azurite_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connection string, then account name + key with an endpoint: both from the usual variables."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_server.connection_string())
    st = open_storage(f"az://{azurite_container}/env")
    try:
        await st.put_record("k", b"v")
    finally:
        await st.close()
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", azurite_server.account)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", azurite_server.key)
    st = open_storage(f"az://{azurite_container}/env", endpoint_url=azurite_server.endpoint_url)
    try:
        assert await st.read("k") == b"v"
    finally:
        await st.close()
    assert azurite_server.keys(azurite_container) == ["env/k"]


async def test_wrong_key_is_a_permission_error(azurite_server: AzuriteServer, azurite_container: str) -> None:
    bad = azurite_server.connection_string().replace(azurite_server.key, "d3Jvbmc=")
    st = AzureBlobStorage(f"az://{azurite_container}/r", connection_string=bad, max_attempts=1)
    try:
        with pytest.raises(StoragePermissionError, match=r"az://.*/r/k .*AZURE_STORAGE_CONNECTION_STRING"):
            await st.put_record("k", b"x")
    finally:
        await st.close()
    assert azurite_server.keys(azurite_container) == []


async def test_missing_container_says_so(azurite_server: AzuriteServer) -> None:
    st = AzureBlobStorage("az://no-such-container/x", **azurite_server.options(max_attempts=1))
    try:
        with pytest.raises(PermanentStorageError, match="container 'no-such-container' does not exist") as info:
            await st.put_record("k", b"x")
        assert not isinstance(info.value, CheckpointNotFoundError)  # never "no checkpoint here yet"
        with pytest.raises(PermanentStorageError, match="does not exist"):
            await st.list()
    finally:
        await st.close()


async def test_blocks_of_racing_writers_do_not_mix(azurite_server: AzuriteServer, azurite_container: str) -> None:
    """Two writers on one key stage blocks with distinct ids: one commit wins whole, the other fails, never a mixture.

    (Azure drops a blob's uncommitted blocks when a block list is committed, so the later commit is refused.)
    """
    st = AzureBlobStorage(f"az://{azurite_container}/r", **azurite_server.options())
    a, b = payload(5 * MiB + 1, seed=1), payload(5 * MiB + 1, seed=2)
    try:
        wa, wb = await st.open_writer("k"), await st.open_writer("k")
        await wa.write_part(0, 0, memoryview(a)[: 5 * MiB])
        await wb.write_part(0, 0, memoryview(b)[: 5 * MiB])
        await wb.write_part(1, 5 * MiB, memoryview(b)[5 * MiB :])
        await wa.write_part(1, 5 * MiB, memoryview(a)[5 * MiB :])
        await wb.commit()
        with pytest.raises(PermanentStorageError, match=r"commit az://.*/r/k .*InvalidBlockList"):
            await wa.commit()
        assert await st.read("k") == b
        await upload(st, "k2", b)
        assert await st.read("k2") == b
    finally:
        await st.close()
