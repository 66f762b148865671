"""Power loss on local storage: only what fsync made durable survives (tests.torture.powerloss).

The campaign with seed 0 found three durability bugs in asyncckpt/storage/local.py (fixed):
a new checkpoint directory's entry was never fsynced in its parent (a save committed with
``update_latest=False`` could vanish; ``latest`` could survive while its target did not), and
deletions were not fsynced (COMMIT could come back after its data was gone).
"""

from __future__ import annotations

import os

import pytest

from . import powerloss as pl
from ._fuzz import count

ROOT = (1, 0)
F, D = (10, 1), (11, 1)


def _ops(*extra: tuple) -> list[tuple]:
    return [("mkdir", ROOT, "ck", D), ("create", D, "x.tmp", F), ("write", F, 0, b"hello"), *extra]


def test_model_durable_only_what_was_synced() -> None:
    """The simulator's model, on hand-written journals (so it can fail, not only pass)."""
    unsynced = _ops(("rename", D, "x.tmp", D, "x", F))
    dur = pl.durable_at(unsynced)
    assert all(d > len(unsynced) for d in dur)  # nothing was ever made durable
    assert pl.tree_of(pl.replay(unsynced, [dur[i] <= 4 for i in range(4)], ROOT), ROOT) == {}
    synced = _ops(("fsync", F), ("rename", D, "x.tmp", D, "x", F), ("fsyncdir", D), ("fsyncdir", ROOT))
    dur = pl.durable_at(synced)
    keep = [dur[i] <= len(synced) for i in range(len(synced))]
    assert pl.tree_of(pl.replay(synced, keep, ROOT), ROOT) == {"ck": None, "ck/x": b"hello"}
    # without the root's fsync the directory entry "ck" is not durable: the file is unreachable
    no_root_sync = synced[:-1]
    dur = pl.durable_at(no_root_sync)
    keep = [dur[i] <= len(no_root_sync) for i in range(len(no_root_sync))]
    assert pl.tree_of(pl.replay(no_root_sync, keep, ROOT), ROOT) == {}
    # a write after the last fsync may be lost; a truncate is data too
    late = [*synced, ("write", F, 0, b"HELLO"), ("trunc", F, 2)]
    dur = pl.durable_at(late)
    keep = [dur[i] <= len(late) for i in range(len(late))]
    assert pl.tree_of(pl.replay(late, keep, ROOT), ROOT)["ck/x"] == b"hello"
    assert pl.tree_of(pl.replay(late, [True] * len(late), ROOT), ROOT)["ck/x"] == b"HE"


def test_normalize_tells_reused_inodes_apart() -> None:
    recs = [("create", 1, "a", 5), ("unlink", 1, "a", 5), ("create", 1, "b", 5), ("write", 5, 0, b"x")]
    ops = pl.normalize(recs)
    assert ops[0][3] == (5, 1) and ops[1][3] == (5, 1) and ops[2][3] == (5, 2) and ops[3][1] == (5, 2)


@pytest.mark.slow
@pytest.mark.fault
def test_powerloss_campaign() -> None:
    stats = pl.run(seed=int(os.environ.get("TORTURE_POWERLOSS_SEED", "0")), mixes=2)
    count("power-loss crash states", stats.cases)
    assert not stats.problems, "\n".join(stats.problems[:20])
    assert stats.data_lost == 0
    assert stats.crash_points > 60 and stats.distinct_states > 30 and stats.checkpoints_verified > 50
    assert stats.fsyncs >= 12 and stats.dir_fsyncs >= 12
