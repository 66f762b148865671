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
