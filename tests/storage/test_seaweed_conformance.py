"""The conformance suite, faults included, on S3 served by SeaweedFS (signatures and checksums checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conformance import FaultTests, ProtocolTests
from .conftest import Backend, make_backend


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("seaweed", request, tmp_path)


class TestSeaweed(ProtocolTests):
    pass


class TestSeaweedFaults(FaultTests):
    pass
