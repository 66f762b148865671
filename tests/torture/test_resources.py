"""Resource faults: a full disk, a read-only destination, an exception and a hang inside the worker.

The full-disk and read-only tests mount a small tmpfs (root only; skipped with the reason
otherwise) and fill it so that exactly the data file, the manifest, the commit record or the
``latest`` update is the write that fails. After every fault: the error is a StorageError that
says what happened, the previous checkpoint still loads, and the next save (after space is
freed) succeeds on the same checkpointer — whose ``max_in_flight=1`` means a leaked staging
slot would block that save (caught by ``wait_snapshot(timeout=...)``, never a hang).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import asyncckpt
from asyncckpt.errors import BadInputError, StorageError, StorageTimeoutError, WorkerError

from . import _inject
from ._fuzz import count
from .common import CHUNK, ckpt_name, diff_states, expected_state

NUMEL = 200_000  # 0.8 MiB + 0.4 MiB: the data file is 294 pages of 4 KiB
PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted at a fresh directory; always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the ENOSPC and read-only tests run as root in CI)")
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip() or p.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def ck() -> Iterator[asyncckpt.AsyncCheckpointer]:
    c = asyncckpt.AsyncCheckpointer(chunk_size=CHUNK, max_in_flight=1)
    yield c
    c.close(abort=True)


def _free_pages(path: Path) -> int:
    return os.statvfs(path).f_bavail


def _fill(path: Path, leave_pages: int) -> Path:
    filler = path / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * ((_free_pages(path) - leave_pages) * PAGE))
    assert _free_pages(path) == leave_pages
    return filler


def _save(ck: asyncckpt.AsyncCheckpointer, root: Path, step: int) -> asyncckpt.SaveHandle:
    h = ck.save(expected_state(step, 0, NUMEL), str(root / ckpt_name(step)), step=step)
    ck.wait_snapshot(timeout=60)  # a staging slot leaked by an earlier failure would block here
    ck.finalize(blocking=True)
    return h


def _loads(root: Path, step: int) -> bool:
    return not diff_states(asyncckpt.load(root / ckpt_name(step)), expected_state(step, 0, NUMEL))


# pages free when the second save starts -> the write that fails
ENOSPC_AT = {"data": 290, "manifest": 294, "commit": 295, "latest": 296}


@pytest.mark.parametrize("where", sorted(ENOSPC_AT))
def test_disk_full(tmpfs: Path, ck: asyncckpt.AsyncCheckpointer, where: str) -> None:
    count("resource: disk full")
    root = tmpfs / "root"
    _save(ck, root, 1)
    filler = _fill(tmpfs, ENOSPC_AT[where])
    with pytest.raises(StorageError, match="disk is full") as ei:
        _save(ck, root, 2)
    msg = str(ei.value)
    expect_file = {"data": "rank-00000.data", "manifest": "rank-00000.manifest", "commit": "COMMIT", "latest": "latest"}
    assert expect_file[where] in msg, f"the error does not name the {where} file: {msg}"
    # the previous checkpoint is intact and still what `latest` points to
    assert _loads(root, 1)
    assert not diff_states(asyncckpt.load(root), expected_state(1, 0, NUMEL))
    complete = [i.name for i in asyncckpt.list_checkpoints(root)]
    if where == "latest":  # COMMIT was written: complete, but `latest` did not move
        assert complete == [ckpt_name(2), ckpt_name(1)]
    else:
        assert complete == [ckpt_name(1)]
    # temp files of the failed write are gone (aborted), so freeing the filler is enough
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]
    filler.unlink()
    _save(ck, root, 3)
    assert _loads(root, 3) and not diff_states(asyncckpt.load(root), expected_state(3, 0, NUMEL))


def test_read_only_destination(tmpfs: Path, ck: asyncckpt.AsyncCheckpointer) -> None:
    count("resource: read-only destination")
    root = tmpfs / "root"
    _save(ck, root, 1)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        # a root this checkpointer has not saved under yet is refused up front, before anything is scheduled
        with pytest.raises(BadInputError, match="not writable"):
            ck.save(expected_state(2, 0, NUMEL), str(tmpfs / "other" / ckpt_name(2)), step=2)
        # a root already checked is not probed again (the loop does no storage work): the worker's write
        # fails cleanly instead
        with pytest.raises(StorageError, match="not writable"):
            _save(ck, root, 2)
        assert _loads(root, 1)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    _save(ck, root, 3)
    assert _loads(root, 3)


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[asyncckpt.AsyncCheckpointer]:
    """A checkpointer whose worker runs the instrumented save with ``TORTURE_FAULT`` (set before spawn)."""
    spec, kwargs = request.param
    monkeypatch.setenv("TORTURE_FAULT", spec)
    c = asyncckpt.AsyncCheckpointer(chunk_size=CHUNK, max_in_flight=1, worker_options=_inject.WORKER_OPTIONS, **kwargs)
    c.queue.start_worker()  # spawned now, while TORTURE_FAULT is set
    monkeypatch.delenv("TORTURE_FAULT")
    yield c
    c.queue.kill_worker()  # a hung I/O thread would make a clean stop wait for the stop timeout
    c.close(abort=True)


@pytest.mark.parametrize("faulty", [("raise:streaming:write", {})], indirect=True)
def test_exception_in_worker_reaches_finalize_with_traceback(tmp_path: Path, faulty: asyncckpt.AsyncCheckpointer) -> None:
    count("resource: exception in the worker")
    root = tmp_path / "root"
    with pytest.raises(WorkerError) as ei:
        _save(faulty, root, 1)
    msg = str(ei.value)
    assert "ValueError: injected fault: write in phase streaming" in msg
    tb = getattr(ei.value, "worker_traceback", "")
    assert "in the worker" in msg and "Traceback" not in msg  # one frame in the message, the rest in an attribute
    assert "write_chunks" in tb and "engine.py" in tb
    assert asyncckpt.list_checkpoints(root) == []
    _save(faulty, root, 2)  # the fault fires once: the same worker, its slot released, saves again
    assert _loads(root, 2)


@pytest.mark.parametrize("faulty", [("enospc:manifest:write", {})], indirect=True)
def test_storage_error_in_worker_keeps_its_class(tmp_path: Path, faulty: asyncckpt.AsyncCheckpointer) -> None:
    count("resource: storage error in the worker")
    root = tmp_path / "root"
    with pytest.raises(StorageError, match="disk is full") as ei:
        _save(faulty, root, 1)
    assert "rank-00000.manifest" in str(ei.value) and "put_record" in getattr(ei.value, "worker_traceback", "")
    assert asyncckpt.list_checkpoints(root) == []
    _save(faulty, root, 2)
    assert _loads(root, 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("faulty", [("hang:streaming:write", {"timeout_s": 3.0})], indirect=True)
def test_hung_storage_call_times_out(tmp_path: Path, faulty: asyncckpt.AsyncCheckpointer) -> None:
    """A write that never returns: training is never blocked, and ``timeout_s`` turns it into an error."""
    count("resource: hung storage call")
    root = tmp_path / "root"
    h = faulty.save(expected_state(1, 0, NUMEL), str(root / ckpt_name(1)), step=1)
    faulty.wait_snapshot(timeout=60)  # the snapshot is taken even though the write hangs
    assert faulty.finalize(blocking=False) == [] and not h.committed  # non-blocking: returns at once
    with pytest.raises(StorageTimeoutError, match="did not finish within 3"):
        faulty.finalize(blocking=True)
    assert asyncckpt.list_checkpoints(root) == []
    _save(faulty, root, 2)  # the hung thread is abandoned with its slot; the next save goes through
    assert _loads(root, 2)

