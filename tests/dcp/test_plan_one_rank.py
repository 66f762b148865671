"""Planning on a one-rank process group skips the gloo round trips but keeps DCP's results and errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from asyncckpt.dcp import AsyncStorageWriter, DcpCheckpointException, async_save, close_async_saves
from asyncckpt.dcp.saver import save_state_dict_async_plan
from asyncckpt.errors import BadInputError


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(64, 33, generator=g), "b": {"c": torch.arange(100, dtype=torch.int64)}, "step": 7}


def test_one_rank_plan_equals_the_collective_one_and_saves(tmp_path: Path, one_rank_group: None) -> None:
    alone = save_state_dict_async_plan(_state(), AsyncStorageWriter(str(tmp_path / "x")))
    no_dist = save_state_dict_async_plan(_state(), AsyncStorageWriter(str(tmp_path / "y")), no_dist=True)
    assert alone.use_dist and alone.collective and alone.world_size == 1 and alone.is_coordinator
    assert alone.metadata is not None and no_dist.metadata is not None
    assert alone.metadata.state_dict_metadata == no_dist.metadata.state_dict_metadata
    try:
        h = async_save(_state(), checkpoint_id=str(tmp_path / "ck"))
        h.result()
    finally:
        close_async_saves()
    got = {"a": torch.zeros(64, 33), "b": {"c": torch.zeros(100, dtype=torch.int64)}, "step": 0}
    dcp.load(got, checkpoint_id=str(tmp_path / "ck"))
    want = _state()
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"]["c"], want["b"]["c"])  # type: ignore[index]
    assert got["step"] == 7


def test_one_rank_planning_failure_is_dcps_exception(tmp_path: Path, one_rank_group: None) -> None:
    sd = {"w": torch.eye(4).to_sparse()}
    with pytest.raises(DcpCheckpointException) as ei:
        save_state_dict_async_plan(sd, AsyncStorageWriter(str(tmp_path / "bad")))
    assert list(ei.value.failures) == [0]
    err = ei.value.failures[0][0]
    assert isinstance(err, BadInputError) and "w" in str(err)
