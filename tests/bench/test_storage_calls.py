"""bench/storage_calls.py counts a real save cycle in the worker: the commit reads back neither the
manifest the save just wrote nor its data file's size, and a deletion is three durable steps."""

from __future__ import annotations

from pathlib import Path

from bench import storage_calls


def test_a_local_save_cycle_reads_back_only_what_proves_something(tmp_path: Path) -> None:
    _, last = storage_calls.count(str(tmp_path / "root"), {}, 2, tmp_path / "log")
    reads = [d.split(" ", 1)[1].split("/", 1)[-1] for k, d in last if k == "GET"]
    # the deletion's proof (the victim's COMMIT, and latest); the save's check of a new name is one
    # look at NAME/ that opens nothing
    assert sorted(reads) == ["COMMIT", "latest"]
    assert not [d for k, d in last if k == "HEAD"]  # the data file's size: the save told the commit
    assert [k for k, _ in last].count("DELETE (batch)") == 1
    deleted = [d for k, d in last if k == "fsync"][-3:]
    assert len(set(deleted)) == 1 and "step-" in deleted[0]  # three steps, each made durable in turn
