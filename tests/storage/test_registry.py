"""The backend registry: schemes, lazy built-ins, the missing-extra message, third-party plug-ins by entry point."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncckpt.errors import BadInputError
from asyncckpt.storage import (
    ENTRY_POINT_GROUP,
    LocalStorage,
    Storage,
    known_schemes,
    open_storage,
    register_backend,
    scheme_of,
    split_uri,
    supports_uri,
    unregister_backend,
)


@pytest.fixture(autouse=True)
def forget_mem_plugin() -> Iterator[None]:
    """Each test finds the ``mem`` plug-in afresh (entry points are cached in the registry once loaded)."""
    yield
    unregister_backend("mem")
    sys.modules.pop("memplug", None)


def test_builtin_schemes_are_known_without_importing_them() -> None:
    assert {"file", "s3", "gs", "gcs", "az"} <= set(known_schemes())
    for uri in ("/tmp/x", "rel/x", "file:///x", "s3://b/x", "gs://b/x", "GCS://b/x", "az://c/x"):
        assert supports_uri(uri), uri
    assert not supports_uri("nosuch://b/x")
    assert scheme_of("S3://b") == "s3" and scheme_of("/a/b") == ""


def test_open_storage_picks_the_backend_by_scheme(tmp_path: Path) -> None:
    from asyncckpt.storage.azure import AzureBlobStorage
    from asyncckpt.storage.gcs import GCSStorage
    from asyncckpt.storage.s3 import S3Storage

    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage("s3://bucket/x"), S3Storage)
    gs = open_storage("gs://bucket/run/", endpoint_url="http://127.0.0.1:9")
    assert isinstance(gs, GCSStorage) and gs.uri == "gs://bucket/run"
    az = open_storage("az://container/run", connection_string="AccountName=a;AccountKey=Zm9v;")
    assert isinstance(az, AzureBlobStorage) and az.uri == "az://container/run"
    st = open_storage(tmp_path)
    assert open_storage(st) is st  # a Storage passes through


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(BadInputError, match=r"unknown storage scheme 'nosuch' \(known: .*az.*gs.*s3"):
        open_storage("nosuch://bucket/x")
    with pytest.raises(BadInputError, match="empty storage URI"):
        open_storage("")
    with pytest.raises(BadInputError, match="must be letters"):
        register_backend("bad scheme", lambda uri: LocalStorage(uri))


@pytest.mark.parametrize(
    ("uri", "root", "name"),
    [
        ("s3://b/run/step-1", "s3://b/run", "step-1"),
        ("gs://b/run/step-1/", "gs://b/run", "step-1"),
        ("az://c/step-1", "az://c", "step-1"),
        ("file:///data/step-1", "file:///data", "step-1"),
        ("/data/run/step-1", "/data/run", "step-1"),
    ],
)
def test_split_uri(uri: str, root: str, name: str) -> None:
    assert split_uri(uri) == (root, name)


@pytest.mark.parametrize("uri", ["gs://bucket", "az://container/", "s3://b", "gs://b/run/.."])
def test_split_uri_needs_a_name_after_the_bucket(uri: str) -> None:
    with pytest.raises(BadInputError):
        split_uri(uri)


def test_missing_extra_names_it() -> None:
    """Without the client library, the error names the extra to install (checked in a clean interpreter)."""
    code = textwrap.dedent(
        """
        import sys
        for mod in ("gcloud.aio.auth", "azure.storage.blob.aio"):
            sys.modules[mod] = None  # as if the extra were not installed
        from asyncckpt.storage import open_storage
        from asyncckpt.errors import BadInputError
        for uri, extra in (("gs://bucket/x", "gcs"), ("az://cont/x", "azure")):
            try:
                open_storage(uri)
            except BadInputError as exc:
                assert f"pip install asyncckpt[{extra}]" in str(exc), exc
                print("ok", extra)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "gcs", "ok", "azure"]


def _plugin(tmp_path: Path, body: str, target: str = "memplug:factory") -> Path:
    site = tmp_path / "site"
    (site / "memplug-1.0.dist-info").mkdir(parents=True)
    (site / "memplug-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: memplug\nVersion: 1.0\n")
    (site / "memplug-1.0.dist-info" / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nmem = {target}\n")
    (site / "memplug.py").write_text(textwrap.dedent(body))
    return site


def test_third_party_backend_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _plugin(
        tmp_path,
        f"""
        from asyncckpt.storage import LocalStorage

        def factory(uri, **options):
            st = LocalStorage({str(tmp_path / 'mem')!r} + "/" + uri.split("://", 1)[1])
            st.options = options
            return st
        """,
    )
    monkeypatch.syspath_prepend(str(site))
    assert "mem" in known_schemes() and supports_uri("mem://x")
    st = open_storage("mem://run", threads=2)
    assert isinstance(st, Storage) and st.options == {"threads": 2}  # type: ignore[attr-defined]
    assert str(st.uri).endswith("mem/run")  # type: ignore[attr-defined]


def test_broken_plugin_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _plugin(tmp_path, "raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(BadInputError, match=r"plug-in 'memplug:factory'.*failed to import: RuntimeError: boom"):
        open_storage("mem://run")
