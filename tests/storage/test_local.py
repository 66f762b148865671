"""The conformance suite on LocalStorage (a directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conformance import ProtocolTests
from .conftest import Backend, make_backend


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("local", request, tmp_path)


class TestLocal(ProtocolTests):
    pass
