"""Backends under test: one `Backend` descriptor per store, and the fixtures the conformance mixins use.

A test module subclasses the mixins of `tests.storage.conformance` and defines a ``backend``
fixture returning `make_backend("<kind>", request, tmp_path)`; every mixin test then runs on it.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.storage import LocalStorage, Storage, open_storage
from tests.faultproxy import FaultProxy

MiB = 1024 * 1024


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


@dataclass
class Backend:
    """One storage backend under test.

    ``make(**opts)`` opens a fresh handle on the same root; ``make_via(endpoint, **opts)`` one that
    reaches the server through ``endpoint`` (a fault proxy). ``keys()`` / ``incomplete_uploads()``
    look at the store directly, past the backend. ``patterns`` are regexes on ``"METHOD target"``
    picking out part uploads, object reads and small-object puts for the fault proxy.
    """

    name: str
    make: Callable[..., Storage]
    make_via: Callable[..., Storage] | None = None
    endpoint_url: str | None = None
    keys: Callable[[], list[str]] = list
    incomplete_uploads: Callable[[], list[str]] = list
    patterns: dict[str, str] = field(default_factory=dict)
    busy_code: str = "SlowDown"  # what the store calls "slow down" in an injected 503
    server: Any = None  # the server object (S3 kinds: an S3Server with a plain boto3 client)
    bucket: str | None = None  # its bucket or container

    @property
    def is_network(self) -> bool:
        return self.make_via is not None


_S3_PATTERNS = {"part": r"^PUT .*partNumber=", "get": r"^GET /[^?]+/", "put": r"^PUT /[^?]+$", "head": r"^HEAD "}
_AZ_PATTERNS = {
    "part": r"^PUT .*comp=block(&|$)",
    "get": r"^GET /[^/?]+/[^/?]+/",
    "put": r"^PUT /[^?]+$",
    "head": r"^HEAD ",
}
_GCS_PATTERNS = {
    "part": r"^POST /upload/storage/v1/b/",
    "get": r"^GET /storage/v1/b/[^/]+/o/[^?]+\?(.*&)?alt=media",
    "put": r"^POST /upload/storage/v1/b/",
    "head": r"^GET /storage/v1/b/[^/]+/o/[^?]+$",
}


def make_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The `Backend` for ``kind`` (local, moto, seaweed, azurite, gcs), on a fresh bucket/container."""
    if kind == "local":
        root = tmp_path / "root"

        def local_keys() -> list[str]:
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []

        return Backend(
            "local",
            lambda **_: LocalStorage(root),
            keys=lambda: [k for k in local_keys() if ".tmp-" not in k],
            incomplete_uploads=lambda: [k for k in local_keys() if ".tmp-" in k],
        )
    if kind in ("moto", "seaweed"):
        server = request.getfixturevalue("moto_server" if kind == "moto" else "seaweed_server")
        bucket = request.getfixturevalue("s3_bucket" if kind == "moto" else "seaweed_bucket")

        def s3(endpoint: str | None = None, **opts: Any) -> Storage:
            options = server.options(**{"read_range_size": 4 * MiB, **opts})
            if endpoint:
                options["endpoint_url"] = endpoint
            return open_storage(f"s3://{bucket}/root", **options)

        return Backend(
            kind,
            s3,
            s3,
            server.endpoint_url,
            keys=lambda: server.keys(bucket),
            incomplete_uploads=lambda: server.incomplete_uploads(bucket),
            patterns=_S3_PATTERNS,
            server=server,
            bucket=bucket,
        )
    if kind == "azurite":
        server = request.getfixturevalue("azurite_server")
        container = request.getfixturevalue("azurite_container")

        def az(endpoint: str | None = None, **opts: Any) -> Storage:
            proxied = f"{endpoint}/{server.account}" if endpoint else None
            return open_storage(f"az://{container}/root", **server.options(proxied, **{"read_range_size": 4 * MiB, **opts}))

        return Backend(
            kind,
            az,
            az,
            f"http://127.0.0.1:{server.port}",
            keys=lambda: server.keys(container),
            incomplete_uploads=lambda: server.incomplete_uploads(container),
            patterns=_AZ_PATTERNS,
            busy_code="ServerBusy",
        )
    if kind == "gcs":
        server = request.getfixturevalue("gcs_server")
        bucket = request.getfixturevalue("gcs_bucket")

        def gs(endpoint: str | None = None, **opts: Any) -> Storage:
            return open_storage(f"gs://{bucket}/root", **server.options(endpoint, **{"read_range_size": 4 * MiB, **opts}))

        return Backend(
            kind,
            gs,
            gs,
            server.endpoint_url,
            keys=lambda: server.keys(bucket),
            incomplete_uploads=lambda: server.incomplete_uploads(bucket),
            patterns=_GCS_PATTERNS,
            busy_code="backendError",
        )
    raise ValueError(kind)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Storage]:
    """A storage handle on the backend's root, closed after the test (in the test's loop)."""
    st = backend.make()
    try:
        yield st
    finally:
        await st.close()


@dataclass
class Faulty:
    """A backend reached through a fault proxy: ``make(**opts)`` opens handles that go through ``proxy``."""

    backend: Backend
    proxy: FaultProxy
    made: list[Storage] = field(default_factory=list)

    def make(self, **opts: Any) -> Storage:
        assert self.backend.make_via is not None
        st = self.backend.make_via(self.proxy.endpoint_url, **opts)
        self.made.append(st)
        return st

    def pattern(self, what: str) -> str:
        return self.backend.patterns[what]


@pytest.fixture
async def faulty(backend: Backend, fault_proxy_factory: Callable[[str], FaultProxy]) -> AsyncIterator[Faulty]:
    """The backend behind a fault proxy (network backends only); handles are closed after the test."""
    if not backend.is_network:
        pytest.skip(f"{backend.name} has no network to inject faults into")
    assert backend.endpoint_url is not None
    f = Faulty(backend, fault_proxy_factory(backend.endpoint_url))
    try:
        yield f
    finally:
        f.proxy.clear()
        for st in f.made:
            await st.close()


@pytest.fixture(params=["moto", "seaweed"])
def s3_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """S3 on moto and on SeaweedFS (for S3-only behaviour)."""
    return make_backend(request.param, request, tmp_path)


@pytest.fixture
def moto_options(moto_server: Any, s3_bucket: str) -> Callable[..., tuple[str, dict[str, Any]]]:
    """``(uri, options)`` for an S3Storage on a fresh moto bucket."""

    def make(prefix: str = "root", **opts: Any) -> tuple[str, dict[str, Any]]:
        return f"s3://{s3_bucket}/{prefix}", moto_server.options(**opts)

    return make
