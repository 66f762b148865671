"""The S3 tests here use the moto server and bucket fixtures of the tests.s3_servers plugin."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Normally registered by tests/conftest.py (pytest_plugins); register it here if not, once.
    if not config.pluginmanager.has_plugin("tests.s3_servers"):
        config.pluginmanager.import_plugin("tests.s3_servers")
