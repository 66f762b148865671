"""Session hook of the torture suite: write the case counts when ``TORTURE_STATS`` names a file."""

from __future__ import annotations

import json
import os

import pytest

from ._fuzz import COUNTS, EXAMPLES, SEED


@pytest.fixture(scope="session", autouse=True)
def _write_counts():
    yield
    path = os.environ.get("TORTURE_STATS")
    if path:
        with open(path, "w") as f:
            json.dump({"counts": dict(sorted(COUNTS.items())), "examples_per_property": EXAMPLES, "seed": SEED},
                      f, indent=2)
