"""Save policy (steps, time with an injected clock), back-pressure with flat memory, retention."""

from __future__ import annotations

import time

import psutil
import pytest
import torch

import asyncckpt
from asyncckpt.catalog import CheckpointInfo
from asyncckpt.retention import RetentionPolicy, select_deletions


def _state(n: int = 64):  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(n, n)
    return {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.1), "epoch": 0}


def _train(state) -> None:  # type: ignore[no-untyped-def]
    loss = state["model"](torch.randn(4, state["model"].in_features)).pow(2).mean()
    state["optim"].zero_grad()
    loss.backward()
    state["optim"].step()


def _steps(root) -> list[int]:  # type: ignore[no-untyped-def]
    return [c.step for c in asyncckpt.list_checkpoints(root)]


def test_every_steps_saves_on_multiples_and_names_sort_numerically(tmp_path):
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=4, signals=()) as mgr:
        started = [s for s in range(1, 14) if (_train(state), mgr.maybe_save(s, state))[1] is not None]
    assert started == [4, 8, 12]
    assert _steps(tmp_path) == [12, 8, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-00000004", "step-00000008", "step-00000012"]
    assert asyncckpt.list_checkpoints(tmp_path)[0].is_latest


def test_every_seconds_counts_from_the_last_save_with_an_injected_clock(tmp_path):
    now = [100.0]
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_seconds=60, clock=lambda: now[0], signals=(),
                                     pause_check_s=0) as mgr:
        assert mgr.maybe_save(1, state) is None  # 0 s since start
        now[0] += 59.9
        assert mgr.maybe_save(2, state) is None
        now[0] += 0.1  # 60 s since the manager started
        h = mgr.maybe_save(3, state)
        assert h is not None
        mgr.wait()
        now[0] += 30
        assert mgr.maybe_save(4, state) is None  # 30 s after the last committed save
        now[0] += 30
        assert mgr.maybe_save(5, state) is not None
        now[0] += 10
        assert mgr.maybe_save(6, state) is None
        mgr.wait()
    assert _steps(tmp_path) == [5, 3]


def test_every_seconds_after_restore_counts_from_the_restore(tmp_path):
    now = [0.0]
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=2, signals=()) as mgr:
        mgr.maybe_save(2, state)
    with asyncckpt.CheckpointManager(tmp_path, every_seconds=5, clock=lambda: now[0], signals=()) as mgr:
        now[0] = 100.0
        assert mgr.restore(state) == 2
        assert mgr.maybe_save(3, state) is None  # the restore is the reference, not the manager's birth
        now[0] = 105.0
        assert mgr.maybe_save(4, state) is not None
    assert _steps(tmp_path) == [4, 2]


def test_both_policies_together(tmp_path):
    now = [0.0]
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=10, every_seconds=30, clock=lambda: now[0],
                                     signals=()) as mgr:
        for s in range(1, 21):
            now[0] += 4  # step 8 is at 32 s; step 10 by steps; step 18 is 32 s after step 10
            mgr.maybe_save(s, state)
            mgr.wait()
    assert _steps(tmp_path) == [20, 18, 10, 8]


@pytest.mark.slow
def test_a_save_every_step_keeps_trainer_and_worker_memory_flat(tmp_path):
    """Hundreds of saves asked for back to back: bounded in flight, RSS flat (invariants 4 and 5)."""
    state = _state(512)  # ~2 MiB of parameters + optimizer state
    me = psutil.Process()
    samples: list[tuple[int, int]] = []
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, keep_last=2, max_in_flight=2, signals=()) as mgr:
        worker = psutil.Process(mgr.ckpt.queue.worker_pid)
        for s in range(1, 301):
            _train(state)
            mgr.maybe_save(s, state)
            assert mgr.in_flight <= 2
            if s in (60, 300):
                samples.append((me.memory_info().rss, worker.memory_info().rss))
    assert mgr.saves_committed == 300 and mgr.saves_skipped == 0  # on_full="wait": none skipped
    (t0, w0), (t1, w1) = samples
    growth_t, growth_w = t1 - t0, w1 - w0
    print(f"trainer RSS {t0 >> 20} -> {t1 >> 20} MiB, worker RSS {w0 >> 20} -> {w1 >> 20} MiB")
    # 240 more saves of ~2 MiB each went through: anything proportional to them would be ~500 MiB.
    assert growth_t < 32 << 20, growth_t
    assert growth_w < 32 << 20, growth_w
    assert len(_steps(tmp_path)) == 2


def test_on_full_skip_never_exceeds_the_slots(tmp_path):
    state = _state(256)
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, max_in_flight=1, on_full="skip", signals=()) as mgr:
        for s in range(1, 41):
            _train(state)
            mgr.maybe_save(s, state)
            assert mgr.in_flight <= 1
        mgr.wait()
        assert mgr.saves_started + mgr.saves_skipped == 40
        assert mgr.saves_committed == mgr.saves_started
    assert len(_steps(tmp_path)) == mgr.saves_started


# -- retention --------------------------------------------------------------------------------------
def _info(step: int, created: float, latest: bool = False) -> CheckpointInfo:
    return CheckpointInfo(f"step-{step:08d}", f"/r/step-{step:08d}", step, created, 10, True, is_latest=latest)


def test_select_deletions_rules():
    infos = [_info(s, 1000.0 + s, latest=(s == 60)) for s in (10, 20, 30, 40, 50, 60)]
    names = lambda xs: [i.step for i in xs]  # noqa: E731
    assert names(select_deletions(infos, RetentionPolicy(keep_last=2))) == [40, 30, 20, 10]
    assert names(select_deletions(infos, RetentionPolicy(keep_last=2, keep_every=20))) == [30, 10]
    assert names(select_deletions(infos, RetentionPolicy(max_age_s=25), now=1060.0)) == [30, 20, 10]
    assert names(select_deletions(infos, RetentionPolicy(keep_last=1, max_age_s=25), now=1060.0)) == [30, 20, 10]
    assert select_deletions(infos, RetentionPolicy()) == []
    # `latest` is never deleted, even when it is not the newest
    moved = [_info(s, 0.0, latest=(s == 10)) for s in (10, 20, 30)]
    assert names(select_deletions(moved, RetentionPolicy(keep_last=1))) == [20]
    # a pass started for step 40 leaves later commits alone; protected names are kept
    assert names(select_deletions(infos, RetentionPolicy(keep_last=1), upto_step=40, latest="step-00000040")) == [30, 20, 10]
    assert names(select_deletions(infos, RetentionPolicy(keep_last=2), protect={"step-00000010"})) == [40, 30, 20]
    with pytest.raises(asyncckpt.BadInputError):
        RetentionPolicy(keep_last=0)


def test_manager_retention_keep_last_and_keep_every(tmp_path):
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=5, keep_last=2, keep_every=20, signals=()) as mgr:
        for s in range(1, 51):
            mgr.maybe_save(s, state)
    assert _steps(tmp_path) == [50, 45, 40, 20]


def test_manager_retention_by_age_with_an_injected_wall_clock(tmp_path):
    state = _state()
    wall = [time.time()]
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, max_age_s=3600, signals=(),
                                     wall_clock=lambda: wall[0]) as mgr:
        for s in (1, 2, 3):
            mgr.maybe_save(s, state)
            mgr.wait()
        assert _steps(tmp_path) == [3, 2, 1]  # all younger than an hour
        wall[0] += 7200  # two hours later
        mgr.maybe_save(4, state)
    assert _steps(tmp_path) == [4]  # the old ones went; the new one is `latest` and young


def test_prune_api_and_never_latest(tmp_path):
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, signals=()) as mgr:
        for s in range(1, 6):
            mgr.maybe_save(s, state)
    from asyncckpt._loop import run_sync
    from asyncckpt.catalog import set_latest
    from asyncckpt.storage import open_storage

    st = open_storage(tmp_path)
    run_sync(set_latest(st, "step-00000002", 2))  # someone rolled `latest` back
    run_sync(st.close())
    dry = asyncckpt.prune(tmp_path, keep_last=1, dry_run=True)
    assert [i.step for i in dry] == [4, 3, 1]
    assert _steps(tmp_path) == [5, 4, 3, 2, 1]
    gone = asyncckpt.prune(tmp_path, keep_last=1)
    assert [i.step for i in gone] == [4, 3, 1]
    assert _steps(tmp_path) == [5, 2]
    gone = asyncckpt.prune(tmp_path, max_age_s=1, now=time.time() + 10)
    assert [i.step for i in gone] == [5]
    assert _steps(tmp_path) == [2]
    with pytest.raises(asyncckpt.BadInputError):
        asyncckpt.prune(tmp_path)


def test_incomplete_checkpoints_are_not_pruned_or_listed(tmp_path):
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, signals=()) as mgr:
        for s in (1, 2):
            mgr.maybe_save(s, state)
    (tmp_path / "step-00000002" / "COMMIT").unlink()  # as if the save never finished
    assert _steps(tmp_path) == [1]
    assert asyncckpt.prune(tmp_path, keep_last=1) == []
    assert (tmp_path / "step-00000002" / "rank-00000.data").exists()
    broken = asyncckpt.listing.list_incomplete(tmp_path)
    assert [b.name for b in broken] == ["step-00000002"] and "no commit record" in broken[0].problem
