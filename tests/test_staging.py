"""The worker's staging slots (asyncckpt/staging.py)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt.staging import StagingSlot

pytestmark = pytest.mark.skipif(
    not hasattr(mmap, "MAP_POPULATE") or not os.path.exists("/proc/self/smaps"),
    reason="MAP_POPULATE and /proc/self/smaps are Linux-only",
)


def _resident_bytes(addr: int) -> int:
    """Rss of this process's mapping that starts at ``addr`` (from /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split(" ", 1)[0]
        if "-" not in head:
            continue
        start = head.split("-", 1)[0]
        try:
            if int(start, 16) != addr:
                continue
        except ValueError:
            continue
        for field in lines[i + 1 :]:
            if field.startswith("Rss:"):
                return int(field.split()[1]) * 1024
    raise AssertionError(f"no mapping starts at {addr:#x}")


@pytest.mark.parametrize("huge_pages", [True, False])
def test_an_unpinned_slot_is_faulted_in_when_it_is_made(huge_pages: bool) -> None:
    # O_DIRECT writes from pages first touched by the snapshot copy were measurably slower than
    # from pages populated in one pass when the slot is made (docs/benchmarks.md, issue 14), so a
    # new slot must already be resident before anything is copied into it.
    nbytes = 8 << 20
    slot = StagingSlot(nbytes, pinned=False, huge_pages=huge_pages)
    try:
        resident = _resident_bytes(slot.tensor.data_ptr())
        assert resident >= nbytes, f"only {resident} of {nbytes} bytes of a new slot are resident"
    finally:
        slot.close()


def _smaps_field(addr: int, name: str) -> int:
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split(" ", 1)[0]
        if "-" in head and head.split("-", 1)[0] == f"{addr:x}":
            for entry in lines[i + 1 :]:
                if entry.startswith(name + ":"):
                    return int(entry.split()[1]) * 1024
    raise AssertionError(f"no mapping starts at {addr:#x}")


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(_thp_mode() == "never", reason="transparent huge pages are off on this machine")
def test_an_unpinned_slot_is_in_huge_pages_unless_opted_out_where_the_kernel_allows_them() -> None:
    # O_DIRECT writes from huge pages took a fifth of the CPU (docs/benchmarks.md, "Turn 8")
    nbytes = 64 << 20
    slot = StagingSlot(nbytes, pinned=False)
    plain = StagingSlot(nbytes, pinned=False, huge_pages=False)
    try:
        assert _smaps_field(slot.tensor.data_ptr(), "AnonHugePages") > 0, "a new slot has no huge page"
        assert _smaps_field(plain.tensor.data_ptr(), "AnonHugePages") == 0  # opted out: shared, 4 KiB
        for s in (slot, plain):
            assert not s.tensor[:nbytes].any()  # zeroed, and writable below
            s.tensor[:nbytes].fill_(7)
            assert int(s.tensor[nbytes - 1]) == 7
    finally:
        slot.close()
        plain.close()


@pytest.mark.parametrize("huge_pages", [True, False])
def test_saves_staged_with_or_without_huge_pages_load_back_exactly(tmp_path: Path, huge_pages: bool) -> None:
    g = torch.Generator().manual_seed(11)
    state = {"w": torch.randn(3 << 20, generator=g), "b": torch.randn(17, generator=g), "n": 3}
    with asyncckpt.AsyncCheckpointer(worker_options={"huge_pages": huge_pages}) as ck:
        for i in range(2):  # the second save reuses the slot
            ck.save(state, tmp_path / f"c{i}")
            ck.finalize(blocking=True)
    for i in range(2):
        back = asyncckpt.load(tmp_path / f"c{i}")
        assert torch.equal(back["w"], state["w"]) and torch.equal(back["b"], state["b"]) and back["n"] == 3
