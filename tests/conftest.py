from __future__ import annotations

import os
import socket

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
