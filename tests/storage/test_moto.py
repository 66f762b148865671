"""The conformance suite on S3 served by moto (fast; checks neither signatures nor checksums)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conformance import ProtocolTests
from .conftest import Backend, make_backend


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("moto", request, tmp_path)


class TestMoto(ProtocolTests):
    pass
