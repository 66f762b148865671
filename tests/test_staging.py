"""The worker's staging slots (asyncckpt/staging.py)."""

from __future__ import annotations

import mmap
import os

import pytest

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


def test_an_unpinned_slot_is_faulted_in_when_it_is_made() -> None:
    # O_DIRECT writes from pages first touched by the snapshot copy were measurably slower than
    # from pages populated in one pass when the slot is made (docs/benchmarks.md, issue 14), so a
    # new slot must already be resident before anything is copied into it.
    nbytes = 8 << 20
    slot = StagingSlot(nbytes, pinned=False)
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
def test_an_unpinned_slot_is_in_huge_pages_where_the_kernel_allows_them() -> None:
    # O_DIRECT writes from huge pages took a fifth of the CPU and half the time (docs/benchmarks.md,
    # "Writing during the snapshot copy, again")
    nbytes = 64 << 20
    slot = StagingSlot(nbytes, pinned=False)
    try:
        huge = _smaps_field(slot.tensor.data_ptr(), "AnonHugePages")
        assert huge > 0, "a new slot has no huge page"
        assert not slot.tensor[:nbytes].any()  # zeroed, and writable below
        slot.tensor[:nbytes].fill_(7)
        assert int(slot.tensor[nbytes - 1]) == 7
    finally:
        slot.close()
