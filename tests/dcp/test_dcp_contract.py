"""DCP's contracts in one process: stream extensions, leaf types, FileSystemWriter/Reader
arguments, use_collectives=False / no_dist, a failed commit, no storage work in the loop,
fork and daemonic processes."""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import signal
import time
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import SerializationFormat

from asyncckpt import AsyncCallsQueue
from asyncckpt.dcp import AsyncStorageReader, AsyncStorageWriter, DcpCheckpointException, async_save, close_async_saves
from asyncckpt.errors import BadInputError, CheckpointError, FormatError
from tests.dcp import _ext, _procs


def state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(200, 300, generator=g),
        "b16": torch.randn(70, generator=g).to(torch.bfloat16),
        "blob": io.BytesIO(b"losses:" + bytes(range(40))),
        "size": torch.Size([3, 4]),
        "dtype": torch.float16,
        "meta": {"step": seed, "name": "run", "lrs": [0.1, 0.01]},
    }


def blank() -> dict[str, Any]:
    return {"w": torch.zeros(200, 300), "b16": torch.zeros(70, dtype=torch.bfloat16), "blob": io.BytesIO(),
            "size": None, "dtype": None, "meta": {"step": 0, "name": "", "lrs": [0.0, 0.0]}}


def check(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert torch.equal(got["w"], want["w"]) and torch.equal(got["b16"], want["b16"])
    assert got["blob"].getvalue() == want["blob"].getvalue()
    assert got["size"] == want["size"] and got["dtype"] == want["dtype"] and got["meta"] == want["meta"]


def ours_save(sd: dict[str, Any], writer: AsyncStorageWriter, **kw: Any) -> None:
    try:
        h = async_save(sd, storage_writer=writer, **kw)
        h.wait_snapshot()
        sd["w"].add_(1)  # mutated right after the snapshot: the checkpoint holds the values of the call
        h.result()
    finally:
        close_async_saves()


@pytest.mark.parametrize("ext", ["zstd", "xor"])
def test_stream_extensions_both_ways(tmp_path, ext: str) -> None:
    """Written with an extension by our writer or DCP's: both readers read both; .metadata records the
    transform per item; our reader verifies the stored (transformed) bytes."""
    if ext == "zstd":
        pytest.importorskip("zstandard")  # DCP's ZStandard needs it (a dev dependency)
    extensions = [ZStandard()] if ext == "zstd" else [_ext.XorExtension()]
    registry = _ext.registry()
    want = state(1)
    want["w"] = want["w"].clone()
    ours, stock = str(tmp_path / "ours"), str(tmp_path / "stock")
    sd = state(1)
    ours_save(sd, AsyncStorageWriter(ours, _extensions=extensions))
    dcp.save(state(1), storage_writer=dcp.FileSystemWriter(stock, _extensions=extensions))
    with open(os.path.join(ours, ".metadata"), "rb") as f:
        md = pickle.load(f)
    descs = {tuple(i.transform_descriptors or ()) for i in md.storage_data.values()}
    assert descs == {(extensions[0].get_descriptor(),)}
    for path, verify in ((ours, True), (stock, False)):
        got = blank()
        dcp.load(got, storage_reader=AsyncStorageReader(path, registry, verify=verify))
        check(got, want)
        got = blank()
        dcp.load(got, storage_reader=dcp.FileSystemReader(path, _extension_registry=registry))
        check(got, want)
    if ext == "xor":  # a reader that does not know the extension names it instead of guessing
        with pytest.raises(CheckpointException) as ei:
            dcp.load(blank(), storage_reader=AsyncStorageReader(ours))
        err = next(iter(ei.value.failures.values()))[0]
        assert isinstance(err, FormatError) and "stream.test-xor/1" in str(err) and "_extension_registry" in str(err)


def test_leaf_types_load_under_the_safe_default(tmp_path) -> None:
    """io.BytesIO, torch.Size, dtypes and plain containers (DCP's leaf values) load without
    allow_pickle, from our checkpoints and stock ones; an arbitrary class still needs it."""
    stock = str(tmp_path / "stock")
    dcp.save(state(2), checkpoint_id=stock)
    got = blank()
    dcp.load(got, storage_reader=AsyncStorageReader(stock, verify=False))
    check(got, state(2))
    ours = str(tmp_path / "ours")
    dcp.save(state(2), storage_writer=AsyncStorageWriter(ours))
    got = blank()
    dcp.load(got, storage_reader=AsyncStorageReader(ours))
    check(got, state(2))
    dcp.save({"obj": _procs.Opaque(1)}, storage_writer=AsyncStorageWriter(str(tmp_path / "mod")))
    with pytest.raises(CheckpointException, match="allow_pickle=True"):
        dcp.load({"obj": None}, storage_reader=AsyncStorageReader(str(tmp_path / "mod")))


def test_filesystemwriter_arguments(tmp_path) -> None:
    """FileSystemWriter's arguments, positionally and by name, with its meaning (or a clear error)."""
    p = str(tmp_path / "t3")
    dcp.save(state(3), storage_writer=AsyncStorageWriter(p, True, False, 3, 0, True, True))  # positional, as FSW
    assert sorted(f for f in os.listdir(p) if f.endswith(".distcp")) == ["__0_0.distcp", "__0_1.distcp", "__0_2.distcp"]
    p = str(tmp_path / "per-item")
    w = AsyncStorageWriter(p, single_file_per_rank=False, thread_count=2, sync_files=False, per_thread_copy_ahead=0,
                           cache_staged_state_dict=True, serialization_format=SerializationFormat.TORCH_SAVE)
    ours_save(state(4), w)
    with open(os.path.join(p, ".metadata"), "rb") as f:
        md = pickle.load(f)
    files = [i.relative_path for i in md.storage_data.values()]
    assert len(files) == len(set(files)) == len(md.storage_data)  # one file per item, as FileSystemWriter
    got = blank()
    dcp.load(got, checkpoint_id=p)
    want = state(4)
    check(got, want)
    with pytest.raises(BadInputError, match="safetensors"):
        AsyncStorageWriter(p, serialization_format=SerializationFormat.SAFETENSORS)
    with pytest.raises(BadInputError, match="same knob"):
        AsyncStorageWriter(p, thread_count=2, files_per_rank=3)
    with pytest.raises(BadInputError, match="thread_count"):
        AsyncStorageWriter(p, thread_count=0)
    with pytest.raises(BadInputError, match="StreamTransformExtension"):
        AsyncStorageWriter(p, _extensions=[object()])
    with pytest.raises(BadInputError, match="ExtensionRegistry"):
        AsyncStorageReader(p, object())


@pytest.mark.parametrize("form", ["async", "sync"])
def test_use_collectives_false_and_no_dist(tmp_path, form: str) -> None:
    """Without collectives every rank commits its own __R.metadata (DCP's layout); both readers load it."""
    p = str(tmp_path / "ck")
    sd = state(5)
    want = state(5)
    if form == "async":
        ours_save(sd, AsyncStorageWriter(p), use_collectives=False, no_dist=True)
    else:
        dcp.save(sd, storage_writer=AsyncStorageWriter(p), use_collectives=False)
    names = set(os.listdir(p))
    assert {"__0.metadata", "__0.metadata.checksums", "__0_0.distcp"} <= names and ".metadata" not in names
    for reader in (AsyncStorageReader(p), dcp.FileSystemReader(p)):
        got = blank()
        dcp.load(got, storage_reader=reader)
        check(got, want)


def test_failed_commit_raises_and_commits_nothing(tmp_path) -> None:
    """The commit fails in the worker (ENOSPC on .metadata): result() raises CheckpointException,
    nothing is committed, and the queue's next save commits."""
    q = AsyncCallsQueue(worker_options={"preload": ["tests.dcp._ext"], "torch_threads": 1})
    try:
        h = async_save(state(6), checkpoint_id=str(tmp_path / "fail-commit"), queue=q)
        with pytest.raises(DcpCheckpointException, match="No space left") as ei:
            h.result()
        assert isinstance(ei.value, CheckpointException) and isinstance(ei.value, CheckpointError)
        assert list(ei.value.failures) == [0] and h.exception() is ei.value and not h.committed
        assert not (tmp_path / "fail-commit" / ".metadata").exists()
        h = async_save(state(6), checkpoint_id=str(tmp_path / "next"), queue=q)
        assert h.result() is not None and (tmp_path / "next" / "COMMIT").exists()
    finally:
        q.close()


def test_async_save_does_no_storage_work_in_the_trainer(tmp_path, monkeypatch) -> None:
    """async_save, wait_snapshot and a non-blocking finalize never call a storage backend here:
    the worker prepares the directory, writes and commits (invariant 9)."""
    from asyncckpt.dcp import _commit, finalize_async_saves, writer

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("storage work on the training thread")

    p = str(tmp_path / "ck")
    dcp.save({"w": torch.ones(3)}, storage_writer=AsyncStorageWriter(p))  # an old checkpoint to overwrite
    for mod, name in ((writer, "open_storage"), (writer, "prepare_target"), (writer, "commit_dcp"),
                      (_commit, "prepare_target"), (_commit, "commit_dcp")):
        monkeypatch.setattr(mod, name, refuse)
    sd = state(7)
    try:
        h = async_save(sd, checkpoint_id=p)
        h.wait_snapshot()
        deadline = time.monotonic() + 120
        while not h.done() and time.monotonic() < deadline:
            finalize_async_saves(blocking=False)
            time.sleep(0.05)
        assert h.committed
    finally:
        close_async_saves()
    monkeypatch.undo()
    got = blank()
    dcp.load(got, storage_reader=AsyncStorageReader(p))
    check(got, state(7))


def test_forked_child_saves(tmp_path) -> None:
    """A child forked after this process used asyncckpt (its private loop, its DCP queue, the fd
    sharing of its tensors) saves and loads on its own: nothing inherited blocks it."""
    p = str(tmp_path / "parent")
    dcp.save({"w": torch.ones(3)}, storage_writer=AsyncStorageWriter(p))  # starts the private loop
    dcp.load({"w": torch.zeros(3)}, storage_reader=AsyncStorageReader(p))
    ours_save(state(8), AsyncStorageWriter(str(tmp_path / "parent-async")))
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            signal.alarm(120)
            # torch's own rule after fork: its OpenMP pool is the parent's; one thread in the child.
            torch.set_num_threads(1)
            dcp.save({"w": torch.ones(3)}, storage_writer=AsyncStorageWriter(str(tmp_path / "child-sync")))
            _procs.save_and_load(str(tmp_path / "child-async"))
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 150
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.1)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "child-async" / "COMMIT").exists() and (tmp_path / "child-sync" / ".metadata").exists()


def test_daemonic_process_saves(tmp_path) -> None:
    """A daemonic process (PyTorch's test ranks, many launchers) starts the worker and saves."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_procs.daemonic_child, args=(str(tmp_path / "d"),), daemon=True)
    proc.start()
    proc.join(150)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
        pytest.fail("the daemonic process hung")
    assert proc.exitcode == 0 and (tmp_path / "d" / "COMMIT").exists()
