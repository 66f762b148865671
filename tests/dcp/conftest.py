"""Fixtures of the DCP tests: a moto S3 server on 127.0.0.1 (tests.s3_servers.MotoServer)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3_servers import MotoServer


@pytest.fixture(scope="module")
def dcp_moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dcp_bucket(dcp_moto: MotoServer) -> Iterator[str]:
    name = dcp_moto.create_bucket()
    try:
        yield name
    finally:
        dcp_moto.delete_bucket(name)
