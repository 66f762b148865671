from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import asyncckpt

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
