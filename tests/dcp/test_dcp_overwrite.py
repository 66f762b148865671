"""Overwriting a DCP checkpoint in place (a fixed name such as torchtitan's or Lightning's ``last``).

What a user sees: a load of the path while it is overwritten returns the complete old or the
complete new state, with asyncckpt's reader and (between overwrites) DCP's stock reader; a kill of
the worker at any moment, or a crash between the two commit points, leaves a loadable checkpoint;
the replaced generation's files go once the new one is committed.
"""

from __future__ import annotations

import os
import random
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import asyncckpt
from asyncckpt._loop import run_sync
from asyncckpt.catalog import check_checkpoint
from asyncckpt.dcp import AsyncStorageReader, AsyncStorageWriter, async_save
from asyncckpt.storage import LocalStorage
from tests._kill import kill_mid_run

N = 1 << 16  # 256 KiB of float32: shared with the worker, not inlined


def state(step: int, n: int = N) -> dict[str, Any]:
    return {"w": torch.full((n,), float(step)), "b": torch.arange(16) + step, "step": step}


def blank(n: int = N) -> dict[str, Any]:
    return {"w": torch.zeros(n), "b": torch.zeros(16, dtype=torch.int64), "step": -1}


def load(path: Path, *, stock: bool = False) -> dict[str, Any]:
    got = blank()
    if stock:
        dcp.load(got, storage_reader=dcp.FileSystemReader(str(path)))
    else:
        dcp.load(got, storage_reader=AsyncStorageReader(path))
    return got


def check_whole(got: dict[str, Any]) -> int:
    """The step of a loaded state, asserting every value belongs to that one step (no mix)."""
    step = got["step"]
    assert torch.equal(got["w"], torch.full_like(got["w"], float(step))), f"tensor w mixes steps (step {step})"
    assert torch.equal(got["b"], torch.arange(16) + step), f"tensor b is not step {step}'s"
    return step


def problems(path: Path) -> str:
    """What the catalog's check finds wrong with the committed checkpoint's files ("" = nothing)."""
    return run_sync(check_checkpoint(LocalStorage(str(path.parent)), path.name))


def files(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def test_overwrite_writes_beside_and_switches(tmp_path: Path) -> None:
    path = tmp_path / "last"
    async_save(state(1), checkpoint_id=str(path)).result()
    assert files(path) == [".checksums", ".metadata", "COMMIT", "__0.checksums", "__0_0.distcp"]
    with pytest.raises(CheckpointException, match="already exists"):
        async_save(state(9), storage_writer=AsyncStorageWriter(path, overwrite=False)).result()
    for step, gen in ((2, 1), (3, 2)):
        async_save(state(step), checkpoint_id=str(path)).result()
        assert files(path) == [f".g{gen}.checksums", f".g{gen}.metadata", ".metadata", "COMMIT",
                               f"__0.g{gen}.checksums", f"__0_0.g{gen}.distcp"]
        assert check_whole(load(path)) == step
        assert check_whole(load(path, stock=True)) == step  # stock FileSystemReader, via .metadata
        got = blank()
        dcp.load(got, checkpoint_id=str(path))  # plain dcp.load picks its own reader
        assert check_whole(got) == step
    assert problems(path) == ""
    # The synchronous path (plain dcp.save through the writer) overwrites the same way.
    dcp.save(state(4), storage_writer=AsyncStorageWriter(path))
    assert check_whole(load(path)) == 4 and check_whole(load(path, stock=True)) == 4
    assert "__0_0.g3.distcp" in files(path) and "__0_0.g2.distcp" not in files(path)
    asyncckpt.delete(path, force=True)
    assert not path.exists()


def test_loads_during_overwrites_see_the_old_or_the_new_state(tmp_path: Path) -> None:
    path = tmp_path / "last"
    n = 16 * N  # 4 MiB: loads long enough to overlap the switches
    async_save(state(0, n), checkpoint_id=str(path)).result()
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                got = blank(n)
                dcp.load(got, storage_reader=AsyncStorageReader(path))
                seen.append(check_whole(got))
            except BaseException as exc:  # noqa: BLE001 - every failure is the finding
                errors.append(exc)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for step in range(1, 13):
            async_save(state(step, n), checkpoint_id=str(path)).result()
    finally:
        stop.set()
        t.join(60)
    assert not errors, f"a load failed while the checkpoint was overwritten: {errors[0]!r}"
    assert len(seen) > 1 and seen == sorted(seen), seen  # whole states, never an older one after a newer one
    got = blank(n)
    dcp.load(got, storage_reader=AsyncStorageReader(path))
    assert check_whole(got) == 12


class _OverwrittenAfterMetadata(AsyncStorageReader):
    """A load whose checkpoint is overwritten between reading the metadata and reading the data
    (the replaced generation's files are gone when the data is read)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        md = super().read_metadata(*args, **kwargs)
        dcp.save(state(int(self.overwrite_with)), storage_writer=AsyncStorageWriter(self.checkpoint_id))
        return md


def test_load_overwritten_mid_read_returns_the_whole_new_state(tmp_path: Path) -> None:
    path = tmp_path / "last"
    async_save(state(1), checkpoint_id=str(path)).result()
    reader = _OverwrittenAfterMetadata(path)
    reader.overwrite_with = 2
    got = blank()
    dcp.load(got, storage_reader=reader)
    assert check_whole(got) == 2  # read again from the new generation, every item
    reader = _OverwrittenAfterMetadata(path)
    reader.overwrite_with = 3
    got = {"w": torch.zeros(N), "step": -1}  # a partial load follows the switch too
    dcp.load(got, storage_reader=reader)
    assert got["step"] == 3 and torch.equal(got["w"], torch.full((N,), 3.0))


class _CrashBeforeStockSwitch(LocalStorage):
    """Dies (raises) when the stock ``.metadata`` is replaced: the moment after COMMIT switched."""

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if key.endswith("/.metadata"):
            raise OSError(5, "simulated crash between COMMIT and .metadata")
        return await super().put_record(key, data, if_absent=if_absent)


def test_crash_between_the_two_commit_points_leaves_both_readers_whole(tmp_path: Path) -> None:
    path = tmp_path / "last"
    dcp.save(state(1), storage_writer=AsyncStorageWriter(path))
    writer = AsyncStorageWriter(path)
    writer._storage = lambda: _CrashBeforeStockSwitch(str(tmp_path))  # type: ignore[method-assign]
    with pytest.raises(CheckpointException, match="simulated crash"):
        dcp.save(state(2), storage_writer=writer)
    assert check_whole(load(path)) == 2  # asyncckpt's reader follows COMMIT: the new one is complete
    assert check_whole(load(path, stock=True)) == 1  # the stock reader still sees the old one, whole
    assert problems(path) == ""
    dcp.save(state(3), storage_writer=AsyncStorageWriter(path))  # the next overwrite clears both
    assert check_whole(load(path)) == 3 and check_whole(load(path, stock=True)) == 3
    assert [f for f in files(path) if f.endswith(".distcp")] == ["__0_0.g2.distcp"]


_OVERWRITER = textwrap.dedent(
    """
    import sys, torch
    from asyncckpt.dcp import async_save, default_queue
    path, n, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    while True:
        step += 1
        sd = {"w": torch.full((n,), float(step)), "b": torch.arange(16) + step, "step": step}
        async_save(sd, checkpoint_id=path).result()
        if step == int(sys.argv[3]) + 1:
            print(default_queue().worker_pid, flush=True)
        print(step, flush=True)
    """
)


@pytest.mark.fault
def test_worker_killed_mid_overwrite_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last"
    async_save(state(0), checkpoint_id=str(path)).result()
    rng = random.Random(18)
    last = 0
    for trial in range(4):
        committed = kill_mid_run(_OVERWRITER, [str(path), str(16 * N), str(last * 100)], rng, 0.3)
        got = blank(16 * N)
        dcp.load(got, storage_reader=AsyncStorageReader(path))
        step = check_whole(got)
        assert step >= committed, f"trial {trial}: step {step} loaded, but step {committed} had been committed"
        stock = blank(16 * N)
        dcp.load(stock, storage_reader=dcp.FileSystemReader(str(path)))
        assert check_whole(stock) in (step, step - 1)  # step - 1: killed between COMMIT and .metadata
        assert problems(path) == ""
        last = step // 100 + 1
    async_save(state(10_000, 16 * N), checkpoint_id=str(path)).result()  # clears what the killed ones left
    got = blank(16 * N)
    dcp.load(got, storage_reader=dcp.FileSystemReader(str(path)))
    assert check_whole(got) == 10_000
    assert len([f for f in files(path) if f.endswith(".distcp")]) == 1
    assert not [f for f in files(path) if ".tmp-" in f]
