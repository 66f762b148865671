"""DCP's contracts across rank sets: asyncckpt's and DCP's stock writer/reader on each side,
4 -> 1 -> 2 gloo ranks (each set also loads what the earlier ones saved)."""

from __future__ import annotations

import pytest

from tests._dist import run_ranks
from tests.dcp import _matrix

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def test_dcp_contract_matrix(tmp_path) -> None:
    """Round trips (ours/stock x ours/stock, plain and with a stream extension), resharding
    4 -> 1, 4 -> 2, 1 -> 2 (1-D and 2-D meshes, other placements), sharded <-> plain tensors,
    key order and overwrite, and (2 ranks) a coordinator whose commit fails in both call forms:
    every rank raises CheckpointException."""
    root = str(tmp_path / "ckpts")
    done: list[int] = []
    results = {}
    for world in (4, 1, 2):
        results[world] = run_ranks(world, _matrix.matrix, str(tmp_path), root, list(done), timeout=400)
        done.append(world)
    assert all(r["round_trips"] == 8 for rs in results.values() for r in rs)
    assert [r["resharded"] for r in results[4]] == [0] * 4
    assert [r["resharded"] for r in results[1]] == [9]  # 8 checkpoints of 4 ranks + the 2-D grid
    assert [r["resharded"] for r in results[2]] == [17, 17]  # 8 of 4 ranks, 8 of 1 rank, the grid
    assert [r["commit_failures"] for r in results[2]] == [2, 2]
