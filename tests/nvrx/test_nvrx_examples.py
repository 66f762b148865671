"""NVRx's documented examples, with only the import line changed, on CPU with 1 and 2 gloo ranks."""

from __future__ import annotations

import os

import pytest

from tests._dist import run_ranks
from tests.nvrx import _fns

pytestmark = [pytest.mark.multiproc]


@pytest.mark.parametrize("world", [1, 2])
def test_nvrx_examples_on_gloo(tmp_path, world: int) -> None:
    """The usage guide's TorchAsyncCheckpoint loop and the DCP example (FileSystemWriterAsync,
    save_state_dict_async_plan, AsyncRequest, save_state_dict_async_finalize(*ret)): the state is
    mutated right after each call, and torch.load / dcp.load return the values from before."""
    root = str(tmp_path / "ckpt")
    os.makedirs(os.path.join(root, "torch"))
    results = run_ranks(world, _fns.both_examples, str(tmp_path), root)
    assert results == [{"files": 3, "checkpoints": 3}] * world
    for d in ("iter_0000000", "iter_0000002", "iter_0000004"):
        assert {".metadata", "COMMIT"} <= set(os.listdir(os.path.join(root, "dcp", d)))
