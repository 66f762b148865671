"""bench/loop_cost.py's startup figure: each run in a fresh process, so the worker starts from scratch."""

from __future__ import annotations

from pathlib import Path

from bench import loop_cost


def test_startup_stall_reports_both_ways_from_fresh_processes(tmp_path: Path) -> None:
    res = loop_cost.startup_stall(str(tmp_path), 5, 1)
    assert set(res) == {"no warm_up", "warm_up"}
    for v in res.values():
        assert len(v["runs"]) == 1 and v["longest_call_s"] == v["runs"][0] > 0
    assert (tmp_path / "1-0").is_dir() and (tmp_path / "0-0").is_dir()  # the child processes saved there


def test_inflation_saves_each_repeat_into_its_own_root_after_warm_up(tmp_path: Path, monkeypatch) -> None:
    """Each repeat is a fresh run (its own root: no repeat replaces another's checkpoints) whose
    manager is warmed up before the loop, as examples/train.py does."""
    import asyncckpt

    warmed: list[str] = []
    real = asyncckpt.CheckpointManager.warm_up

    def spy(self, state):  # type: ignore[no-untyped-def]
        warmed.append(str(self.root))
        return real(self, state)

    monkeypatch.setattr(asyncckpt.CheckpointManager, "warm_up", spy)
    res = loop_cost.inflation(str(tmp_path), 20, 10, 2, pairs=2)
    assert len(res["inflation_runs"]) == 2 and res["inflation_median"] > -1
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == ["run0", "run1"] and sorted(Path(w).name for w in warmed) == runs
    for r in runs:  # two timed segments of 20 steps, a save every 10 (steps 10, 20, 30, 40), keep_last=2
        assert sorted(i.step for i in asyncckpt.list_checkpoints(tmp_path / r) if i.complete) == [30, 40]


def test_loop_per_save_times_every_call_and_the_snapshot_wait_of_each_save_interval(tmp_path: Path) -> None:
    """Inside asyncckpt per save = the saving call + the other maybe_save calls until the next save +
    the snapshot waits in optimizer.step, one interval per save of the timed segments."""
    res = loop_cost.loop_per_save(str(tmp_path), {}, 20, 5, 2)
    assert res["saves_timed"] == res["maybe_save_calls"] == 8  # 2 segments of 20 steps, a save every 5
    parts = res["inside_parts_s_median"]
    assert set(parts) == {"save", "other_calls", "hooks"} and all(v >= 0 for v in parts.values())
    assert parts["save"] == res["maybe_save_call_median_s"] > 0 and parts["other_calls"] > 0
    assert res["inside_s_per_save_p99"] >= res["inside_s_per_save_median"] >= parts["save"]


def test_the_loop_bench_talks_to_moto_in_a_process_of_its_own() -> None:
    """The moto the loop bench uses answers from another process (not a thread taking the bench's GIL)
    and is gone after stop()."""
    import os

    from tests.s3_servers import MotoProcessServer

    srv = MotoProcessServer()
    srv.start()
    try:
        proc = srv._proc
        assert proc is not None and proc.pid != os.getpid()
        bucket = srv.create_bucket()
        res = loop_cost.loop_per_save(f"s3://{bucket}/run", srv.options(), 10, 5, 1)
        assert res["saves_timed"] == 2
        keys = [o["Key"] for o in srv.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        # the untimed first save at step 5, then 10 and 15 in the timed segment; keep_last=2
        assert "run/latest" in keys
        assert {k.split("/")[1] for k in keys if k.startswith("run/step-")} == {"step-00000010", "step-00000015"}
    finally:
        srv.stop()
    assert proc.poll() is not None
