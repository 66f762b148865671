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
