"""Global completion over gloo: finalize callbacks run only once every rank is done."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import asyncckpt
from asyncckpt import AsyncCallsQueue, AsyncRequest

from . import _worker_fns as fns
from ._dist import run_ranks

pytestmark = pytest.mark.multiproc


def _slow_rank_body(rank: int, world: int, marker_dir: str) -> dict:
    calls = []
    real = dist.all_reduce

    def counting(t, *a, **k):
        calls.append(t.numel())
        return real(t, *a, **k)

    dist.all_reduce = counting
    q = AsyncCallsQueue()
    q.start_worker()
    dist.barrier()
    delay = 1.5 if rank == world - 1 else 0.0  # fast ranks poll every 0.05 s meanwhile (> 3 needed)
    finalized_at: list[float] = []
    q.schedule_async_request(
        AsyncRequest(fns.append_line, (f"{marker_dir}/done{rank}", str(rank), delay),
                     finalize_fns=[lambda: finalized_at.append(time.time())])
    )
    checks = 0
    early = []
    while q.get_num_unfinalized_calls():
        before = len(calls)
        done = q.maybe_finalize_async_calls(blocking=False, no_dist=False)
        checks += 1
        assert len(calls) - before == 1, "one all-reduce per finalize check"
        early.append(done)
        time.sleep(0.05)
    import os

    slow_done_at = os.path.getmtime(f"{marker_dir}/done{world - 1}")
    q.close()
    dist.all_reduce = real
    return {"finalized_at": finalized_at[0], "slow_done_at": slow_done_at, "checks": checks,
            "numels": sorted(set(calls)), "first_results": early[:3]}


@pytest.mark.parametrize("world", [2, 4])
def test_finalize_waits_for_the_slowest_rank(tmp_path, world):
    res = run_ranks(world, _slow_rank_body, tmp_path, str(tmp_path))
    for r in res:
        assert r["numels"] == [1]  # a single-int all-reduce
        assert r["finalized_at"] >= r["slow_done_at"] - 0.05  # never before the slow rank finished
        assert r["checks"] > 3  # the fast ranks really did poll while the slow one worked
        assert r["first_results"][0] == []
    assert len({r["checks"] for r in res}) == 1  # every rank took the same decisions


def _checkpointer_body(rank: int, world: int, root: str) -> dict:
    torch.manual_seed(rank)
    state = {"shard": torch.randn(300_000) + rank, "rank": rank}
    expected = state["shard"].clone()
    with asyncckpt.AsyncCheckpointer() as ck:
        h = ck.save(state, f"{root}/step-5", step=5)
        ck.wait_snapshot()
        state["shard"].zero_()  # training continues
        if rank == 1:
            time.sleep(1.0)
        ck.finalize(blocking=True)
        assert h.committed
    dist.barrier()
    out = asyncckpt.load(f"{root}/step-5")  # rank defaults to this process's rank
    return {"equal": bool(torch.equal(out["shard"], expected)), "rank": out["rank"]}


@pytest.mark.parametrize("world", [2])
def test_multi_rank_checkpoint_commits_once_all_ranks_wrote(tmp_path, world):
    res = run_ranks(world, _checkpointer_body, tmp_path, str(tmp_path))
    assert [r["rank"] for r in res] == list(range(world))
    assert all(r["equal"] for r in res)
    import json

    commit = json.loads((tmp_path / "step-5" / "COMMIT").read_text())
    assert commit["world_size"] == world and [m["rank"] for m in commit["manifests"]] == list(range(world))
    with pytest.raises(asyncckpt.BadInputError, match="pass rank="):
        asyncckpt.load(tmp_path / "step-5")
    assert asyncckpt.load(tmp_path / "step-5", rank=1)["rank"] == 1


def _failing_rank_body(rank: int, world: int, marker_dir: str) -> dict:
    q = AsyncCallsQueue()
    ran = []
    if rank == 0:
        req = AsyncRequest(fns.fail, ("disk on fire",), finalize_fns=[lambda: ran.append(1)])
    else:
        req = AsyncRequest(fns.echo, (1,), finalize_fns=[lambda: ran.append(1)])
    q.schedule_async_request(req)
    try:
        q.maybe_finalize_async_calls(blocking=True, no_dist=False)
        err = ""
    except asyncckpt.CheckpointError as exc:
        err = type(exc).__name__
    q.close()
    return {"err": err, "ran": ran}


def test_a_failure_on_one_rank_fails_the_request_everywhere(tmp_path):
    res = run_ranks(2, _failing_rank_body, tmp_path, str(tmp_path))
    assert res[0]["err"] == "WorkerError" and res[1]["err"] == "RemoteRankError"
    assert res[0]["ran"] == [] and res[1]["ran"] == []
