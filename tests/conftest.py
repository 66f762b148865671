from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import asyncckpt

from . import _mypy

pytest_plugins = ["tests.s3_servers"]

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ckpt():
    """A fresh AsyncCheckpointer (its own worker), closed after the test."""
    c = asyncckpt.AsyncCheckpointer()
    yield c
    c.close(abort=True)


@pytest.fixture(scope="module")
def shared_ckpt():
    """One AsyncCheckpointer per test module (saves time: one worker start)."""
    c = asyncckpt.AsyncCheckpointer()
    yield c
    c.close(abort=True)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted at a fresh directory (root only; CI runs as root); always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the disk-full tests run as root in CI)")
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip() or p.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


_MYPY_RUN = pytest.StashKey["_mypy.Run | None"]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The mypy test runs last: mypy itself runs in the background meanwhile (tests/_mypy.py)."""
    items.sort(key=lambda item: item.nodeid == _mypy.NODEID)  # stable: the rest keeps its order


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start mypy for tests/test_typing.py in the background, once per run (xdist workers share the run id)."""
    if session.config.option.collectonly or not any(item.nodeid == _mypy.NODEID for item in session.items):
        return
    if importlib.util.find_spec("mypy") is None:
        return  # the test skips
    workerinput = getattr(session.config, "workerinput", None)
    run_id = workerinput["testrunuid"] if workerinput else uuid.uuid4().hex
    out_dir = Path(tempfile.gettempdir()) / f"asyncckpt-mypy-{run_id}"
    session.config.stash[_MYPY_RUN] = _mypy.start(out_dir)
    session.config.stash[_mypy.OUT_DIR] = out_dir  # where the test reads the result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run = session.config.stash.get(_MYPY_RUN, None)
    if run is not None:
        run.finish(stop=bool(session.shouldstop or session.shouldfail or exitstatus == pytest.ExitCode.INTERRUPTED))
