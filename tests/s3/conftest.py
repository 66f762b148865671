"""Fixtures for the storage backend tests: the same tests against local files, moto and SeaweedFS."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.storage import LocalStorage, Storage
from asyncckpt.storage.s3 import S3Storage
from tests.s3_servers import S3Server

MiB = 1024 * 1024


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


@dataclass
class Backend:
    """One storage backend under test; `make` opens a fresh handle on the same root."""

    name: str
    make: Callable[..., Storage]
    server: S3Server | None = None
    bucket: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_s3(self) -> bool:
        return self.server is not None

    def incomplete_uploads(self) -> list[str]:
        if self.server is None or self.bucket is None:
            return []
        return self.server.incomplete_uploads(self.bucket)


def _make_backend(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> Backend:
    if kind == "local":
        root = tmp_path / "root"
        return Backend("local", lambda **_: LocalStorage(root))
    if kind == "moto":
        server = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
    else:
        server = request.getfixturevalue("seaweed_server")
        bucket = request.getfixturevalue("seaweed_bucket")

    def make(**opts: Any) -> Storage:
        return S3Storage(f"s3://{bucket}/root", **server.options(**{"read_range_size": 4 * MiB, **opts}))

    return Backend(kind, make, server, bucket)


@pytest.fixture(params=["local", "moto", "seaweed"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Local directory, S3 on moto, S3 on SeaweedFS: each test runs against all three."""
    return _make_backend(request, request.param, tmp_path)


@pytest.fixture(params=["moto", "seaweed"])
def s3_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """S3 on moto and on SeaweedFS (for S3-only behaviour)."""
    return _make_backend(request, request.param, tmp_path)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Storage]:
    """A storage handle on the backend's root, closed after the test (in the test's loop)."""
    st = backend.make()
    try:
        yield st
    finally:
        await st.close()


@pytest.fixture
def moto_options(moto_server: Any, s3_bucket: str) -> Callable[..., tuple[str, dict[str, Any]]]:
    """``(uri, options)`` for an S3Storage on a fresh moto bucket."""

    def make(prefix: str = "root", **opts: Any) -> tuple[str, dict[str, Any]]:
        return f"s3://{s3_bucket}/{prefix}", moto_server.options(**opts)

    return make
