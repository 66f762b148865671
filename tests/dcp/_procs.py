"""Bodies of the DCP tests that run in a process of their own (a daemonic child, a forked child)."""

from __future__ import annotations

import os
import sys

import torch


def save_and_load(path: str) -> None:
    """async_save, mutate after the snapshot, result(), load with both readers; exit 0 when all held."""
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader, async_save, close_async_saves

    sd = {"w": torch.arange(100_000, dtype=torch.float32), "step": 3}
    want = sd["w"].clone()
    h = async_save(sd, checkpoint_id=path)
    h.wait_snapshot()
    sd["w"].add_(1)
    h.result()
    close_async_saves()
    for reader in (None, AsyncStorageReader(path)):
        got = {"w": torch.zeros(100_000), "step": 0}
        dcp.load(got, checkpoint_id=path if reader is None else None, storage_reader=reader)
        assert torch.equal(got["w"], want) and got["step"] == 3


def daemonic_child(path: str) -> None:
    import multiprocessing

    assert multiprocessing.current_process().daemon
    save_and_load(path)
    sys.stdout.flush()
    os._exit(0)


class Opaque:
    """A value only a full unpickler can rebuild (DCP stores it as a pickled bytes item)."""

    def __init__(self, x: int) -> None:
        self.x = x
