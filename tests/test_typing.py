"""The package type-checks: mypy (configured in pyproject.toml) finds no error in asyncckpt/.

mypy runs in the background while the other tests run (tests/_mypy.py, started by tests/conftest.py),
and this test runs last; on its own (no background run for this session) it starts mypy itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from . import _mypy


def test_mypy_finds_no_error_in_the_package(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy comes with the [dev] extra")
    out_dir = request.config.stash.get(_mypy.OUT_DIR, None)
    if out_dir is None:
        out_dir = tmp_path / "mypy"
        run = _mypy.start(out_dir)
        assert run is not None
        run.finish(stop=False)
    rc, out = _mypy.result(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    assert rc == 0, out[-8000:]
    assert "Success: no issues found" in out
