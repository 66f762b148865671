"""DCP writer/reader in one process (no torch.distributed): interop, integrity, safety, errors."""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any

import msgspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from asyncckpt import AsyncCallsQueue, AsyncRequest
from asyncckpt._loop import run_sync
from asyncckpt.catalog import list_all, read_commit
from asyncckpt.dcp import (
    AsyncStorageReader,
    AsyncStorageWriter,
    async_save,
    close_async_saves,
    save_state_dict_async_finalize,
    save_state_dict_async_plan,
)
from asyncckpt.dcp._format import decode_index, encode_record
from asyncckpt.errors import BadInputError, CheckpointError, CheckpointExistsError, IntegrityError, StorageError
from asyncckpt.storage import LocalStorage


class Custom:
    """A value DCP stores as a pickled bytes item (not loadable by torch's weights-only unpickler)."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.x == self.x


def make_state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 200, generator=g),  # 240 KB: shared with the worker, not inlined
        "big": torch.randn(70_000, generator=g).to(torch.float64),
        "t": torch.randn(4, 6, generator=g).t(),  # non-contiguous view
        "b16": torch.randn(64, generator=g).to(torch.bfloat16),
        "i": torch.arange(10),
        "empty": torch.zeros(0, 3),
        "nested": {"s": torch.tensor(3.5), "step": 12, "name": "abc"},
    }


def blank(sd: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif isinstance(v, dict):
            out[k] = blank(v)
        elif isinstance(v, str):
            out[k] = ""
        elif isinstance(v, int):
            out[k] = 0
        else:
            out[k] = None
    return out


def assert_equal_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        if isinstance(w, dict):
            assert_equal_state(got[k], w)
        elif isinstance(w, torch.Tensor):
            assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
            assert torch.equal(got[k], w), k
        else:
            assert got[k] == w, k


def clone_state(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: clone_state(v) if isinstance(v, dict) else (v.clone() if isinstance(v, torch.Tensor) else v)
            for k, v in sd.items()}


def mutate(sd: dict[str, Any]) -> None:
    for v in sd.values():
        if isinstance(v, dict):
            mutate(v)
        elif isinstance(v, torch.Tensor) and v.numel():
            v.add_(7)


def unwrap(exc: BaseException) -> BaseException:
    """The first rank's error inside DCP's CheckpointException."""
    assert isinstance(exc, CheckpointException)
    return next(iter(exc.failures.values()))[0]


def async_plan_save(sd: dict[str, Any], path: str, queue: AsyncCallsQueue | None, **kw: Any) -> None:
    """Plan, schedule (on ``queue`` or a throwaway queue), mutate after the snapshot, finalize."""
    own = queue is None
    q = queue or AsyncCallsQueue()
    try:
        writer = AsyncStorageWriter(path, **kw)
        plan = save_state_dict_async_plan(sd, writer)
        fn, pre, args = writer.get_save_function_and_args(None if own else q)
        q.schedule_async_request(AsyncRequest(fn, args, preload_fn=pre,
                                              finalize_fns=[functools.partial(save_state_dict_async_finalize, plan)]))
        q.wait_snapshot()
        mutate(sd)
        q.maybe_finalize_async_calls(blocking=True)
    finally:
        if own:
            q.close()


@pytest.fixture(scope="module")
def queue():
    q = AsyncCallsQueue(worker_options={"torch_threads": 1})
    yield q
    q.close()


def test_async_plan_roundtrip_stock_and_ours(tmp_path, queue) -> None:
    """Saved with the async plan (mutated right after the snapshot); stock FileSystemReader and our
    reader (with piecewise, coalesced and uncoalesced ranged reads) get the values at the call."""
    sd = make_state()
    want = clone_state(sd)
    path = str(tmp_path / "ck")
    async_plan_save(sd, path, queue, files_per_rank=3)
    assert sorted(f for f in os.listdir(path) if f.endswith(".distcp")) == ["__0_0.distcp", "__0_1.distcp", "__0_2.distcp"]
    got = blank(want)
    dcp.load(got, checkpoint_id=path)
    assert_equal_state(got, want)
    for kw in ({}, {"chunk_size": 4096, "coalesce_gap": 0, "read_concurrency": 3}, {"max_inflight_bytes": 1}):
        got = blank(want)
        dcp.load(got, storage_reader=AsyncStorageReader(path, **kw))
        assert_equal_state(got, want)


def test_second_save_reuses_shared_storages(tmp_path, queue) -> None:
    """Two saves of the same (mutated) state through one queue: each holds its own call's values."""
    sd = make_state(1)
    want1 = clone_state(sd)
    async_plan_save(sd, str(tmp_path / "a"), queue)
    want2 = clone_state(sd)
    async_plan_save(sd, str(tmp_path / "b"), queue)
    for name, want in (("a", want1), ("b", want2)):
        got = blank(want)
        dcp.load(got, storage_reader=AsyncStorageReader(str(tmp_path / name)))
        assert_equal_state(got, want)
    assert not torch.equal(want1["w"], want2["w"])


def test_schedule_without_queue_registry(tmp_path) -> None:
    """get_save_function_and_args() without a queue: storages are sent for that request only."""
    sd = make_state(2)
    want = clone_state(sd)
    async_plan_save(sd, str(tmp_path / "c"), None)
    got = blank(want)
    dcp.load(got, checkpoint_id=str(tmp_path / "c"))
    assert_equal_state(got, want)


def test_sync_dcp_save_and_commit_record(tmp_path) -> None:
    """Plain dcp.save with our writer writes synchronously; the catalog lists it as a 'dcp' checkpoint."""
    sd = make_state(3)
    path = tmp_path / "root" / "step-3"
    dcp.save(sd, storage_writer=AsyncStorageWriter(str(path), update_latest=True))
    got = blank(sd)
    dcp.load(got, checkpoint_id=str(path))
    assert_equal_state(got, sd)
    storage = LocalStorage(tmp_path / "root")
    rec = run_sync(read_commit(storage, "step-3"))
    assert rec.kind == "dcp" and rec.world_size == 1 and rec.manifests[0].file == "__0.checksums"
    infos = run_sync(list_all(storage))
    assert [(i.name, i.kind, i.complete, i.is_latest) for i in infos] == [("step-3", "dcp", True, True)]


def test_async_save_helper_handle(tmp_path) -> None:
    sd = make_state(4)
    want = clone_state(sd)
    try:
        h = async_save(sd, checkpoint_id=str(tmp_path / "h"))
        h.wait_snapshot()
        mutate(sd)
        md = h.result()
        assert h.done() and h.committed and h.exception() is None
        assert md is not None and "w" in md.state_dict_metadata
    finally:
        close_async_saves()
    got = blank(want)
    dcp.load(got, checkpoint_id=str(tmp_path / "h"))
    assert_equal_state(got, want)


def test_handle_of_aborted_save_raises(tmp_path) -> None:
    """A save dropped by close_async_saves(abort=True) is never committed; its handle says so."""
    h = async_save({"w": torch.ones(1000)}, checkpoint_id=str(tmp_path / "dropped"))
    h.wait_snapshot()
    close_async_saves(abort=True)
    with pytest.raises(CheckpointException, match="dropped") as ei:
        h.result()
    assert isinstance(ei.value, CheckpointError)
    assert h.done() and not h.committed and h.exception() is ei.value


def _tensor_item_range(path: str, fqn: str) -> tuple[str, int, int]:
    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = pickle.load(f)
    for idx, info in md.storage_data.items():
        if idx.fqn == fqn:
            return info.relative_path, info.offset, info.length
    raise KeyError(fqn)


def test_corrupt_item_is_named(tmp_path, queue) -> None:
    """A flipped byte inside one tensor's data: our reader names the file and the item."""
    sd = make_state(5)
    path = str(tmp_path / "ck")
    async_plan_save(sd, path, queue)
    rel, off, length = _tensor_item_range(path, "w")
    with open(os.path.join(path, rel), "r+b") as f:
        f.seek(off + length // 2)
        b = f.read(1)
        f.seek(off + length // 2)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(CheckpointException) as ei:
        dcp.load(blank(sd), storage_reader=AsyncStorageReader(path))
    err = unwrap(ei.value)
    assert isinstance(err, IntegrityError)
    assert rel in str(err) and "'w'" in str(err) and "checksum mismatch" in str(err)


def test_truncated_file_is_reported(tmp_path, queue) -> None:
    sd = make_state(6)
    path = str(tmp_path / "ck")
    async_plan_save(sd, path, queue)
    data = os.path.join(path, "__0_0.distcp")
    os.truncate(data, os.path.getsize(data) - 100)
    with pytest.raises(CheckpointException) as ei:
        dcp.load(blank(sd), storage_reader=AsyncStorageReader(path))
    err = unwrap(ei.value)
    assert isinstance(err, IntegrityError) and "truncated" in str(err) and "__0_0.distcp" in str(err)


def test_corrupt_metadata_and_missing_checksums(tmp_path, queue) -> None:
    sd = make_state(7)
    want = clone_state(sd)
    path = str(tmp_path / "ck")
    async_plan_save(sd, path, queue)
    meta = os.path.join(path, ".metadata")
    good = open(meta, "rb").read()
    # Same length, one byte changed inside a pickled string: still unpicklable, caught by CRC.
    pos = good.index(b"__0_0.distcp")
    open(meta, "wb").write(good[:pos] + b"X" + good[pos + 1 :])
    with pytest.raises(CheckpointException) as ei:
        dcp.load(blank(sd), storage_reader=AsyncStorageReader(path))
    assert "does not match its checksum" in str(ei.value) and ".metadata" in str(ei.value)
    open(meta, "wb").write(good)
    os.rename(os.path.join(path, ".checksums"), os.path.join(path, "moved"))
    with pytest.raises(CheckpointException) as ei:
        dcp.load(blank(sd), storage_reader=AsyncStorageReader(path))
    assert "verify=False" in str(ei.value)
    got = blank(sd)
    dcp.load(got, storage_reader=AsyncStorageReader(path, verify=False))
    assert_equal_state(got, want)


def test_reads_stock_filesystemwriter_checkpoint(tmp_path) -> None:
    """A checkpoint of torch's own FileSystemWriter: no checksums, so our reader needs verify=False."""
    sd = make_state(8)
    path = str(tmp_path / "stock")
    dcp.save(sd, checkpoint_id=path)
    with pytest.raises(CheckpointException) as ei:
        dcp.load(blank(sd), storage_reader=AsyncStorageReader(path))
    assert "checksums" in str(ei.value)
    got = blank(sd)
    dcp.load(got, storage_reader=AsyncStorageReader(path, verify=False, chunk_size=1000))
    assert_equal_state(got, sd)


def test_pickled_values_need_opt_in(tmp_path, queue) -> None:
    """A bytes item holding an arbitrary class is refused unless allow_pickle=True."""
    sd = {"w": torch.ones(5), "obj": Custom(3)}
    path = str(tmp_path / "ck")
    async_plan_save(sd, path, queue)
    with pytest.raises(CheckpointException) as ei:
        dcp.load({"w": torch.zeros(5), "obj": None}, storage_reader=AsyncStorageReader(path))
    err = unwrap(ei.value)
    assert isinstance(err, BadInputError) and "'obj'" in str(err) and "allow_pickle=True" in str(err)
    got: dict[str, Any] = {"w": torch.zeros(5), "obj": None}
    dcp.load(got, storage_reader=AsyncStorageReader(path, allow_pickle=True))
    assert got["obj"] == Custom(3) and torch.equal(got["w"], torch.ones(5))


def test_metadata_with_foreign_class_is_refused(tmp_path, queue) -> None:
    """.metadata referencing a class outside DCP's metadata is not unpickled without allow_pickle."""
    sd = {"w": torch.ones(5)}
    path = str(tmp_path / "ck")
    async_plan_save(sd, path, queue)
    meta, idx = os.path.join(path, ".metadata"), os.path.join(path, ".checksums")
    md = pickle.load(open(meta, "rb"))
    md.planner_data = {"x": Custom(1)}
    blob = pickle.dumps(md)
    open(meta, "wb").write(blob)
    from asyncckpt.format import checksum

    index = decode_index(open(idx, "rb").read(), idx)
    index = msgspec.structs.replace(index, metadata_nbytes=len(blob), metadata_crc32c=checksum(blob))
    open(idx, "wb").write(encode_record(index))
    with pytest.raises(CheckpointException) as ei:
        dcp.load({"w": torch.zeros(5)}, storage_reader=AsyncStorageReader(path))
    assert "Custom" in str(ei.value) and "refusing to unpickle" in str(ei.value)
    got = {"w": torch.zeros(5)}
    dcp.load(got, storage_reader=AsyncStorageReader(path, allow_pickle=True))
    assert torch.equal(got["w"], torch.ones(5))


def test_overwrite_false_and_bad_inputs(tmp_path, queue) -> None:
    path = str(tmp_path / "ck")
    async_plan_save({"w": torch.ones(5)}, path, queue)
    # DCP's contract: overwrite=False on an existing checkpoint is a CheckpointException with DCP's
    # message, for the async save (at result(), every rank) and the synchronous one alike.
    h = async_save({"w": torch.zeros(5)}, storage_writer=AsyncStorageWriter(path, overwrite=False), queue=queue)
    with pytest.raises(CheckpointException, match=r"Checkpoint already exists and self\.overwrite=False") as ei:
        h.result()
    assert isinstance(unwrap(ei.value), CheckpointExistsError) and "overwrite=True" in str(ei.value)
    with pytest.raises(CheckpointException, match="Checkpoint already exists"):
        dcp.save({"w": torch.zeros(5)}, storage_writer=AsyncStorageWriter(path, overwrite=False))
    got = {"w": torch.zeros(5)}
    dcp.load(got, checkpoint_id=path)
    assert torch.equal(got["w"], torch.ones(5))  # the refused saves left it intact
    # Planning does no storage work: the old checkpoint is untouched until the worker writes.
    w = AsyncStorageWriter(path)
    save_state_dict_async_plan({"w": torch.full((5,), 2.0)}, w)
    assert os.path.exists(os.path.join(path, ".metadata")) and os.path.exists(os.path.join(path, "COMMIT"))
    fn, pre, args = w.get_save_function_and_args(queue)
    with pytest.raises(BadInputError, match="save_state_dict_async_plan"):
        w.get_save_function_and_args(queue)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointException, match="not a directory") as ei:  # DCP's planning contract
        save_state_dict_async_plan({"w": torch.ones(5)}, AsyncStorageWriter(str(tmp_path / "file" / "ck")))
    assert isinstance(ei.value, CheckpointError) and isinstance(unwrap(ei.value), BadInputError)
    with pytest.raises(BadInputError, match="AsyncStorageWriter"):
        save_state_dict_async_plan({"w": torch.ones(5)}, dcp.FileSystemWriter(str(tmp_path / "x")))  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="chunk_size"):
        AsyncStorageWriter(path, chunk_size=1024)
    with pytest.raises(CheckpointException) as ei:
        dcp.load({"w": torch.zeros(5)}, storage_reader=AsyncStorageReader(str(tmp_path / "nothing")))
    assert "not a complete DCP checkpoint" in str(ei.value)
    del fn, pre, args


def test_worker_write_failure_surfaces_at_finalize(tmp_path, queue) -> None:
    """A write that fails in the worker raises at finalize; nothing is committed."""
    path = tmp_path / "ck"
    w = AsyncStorageWriter(str(path))
    plan = save_state_dict_async_plan({"w": torch.ones(100_000)}, w)
    fn, pre, args = w.get_save_function_and_args(queue)
    path.mkdir()
    (path / "__0_0.distcp").mkdir()  # the data file's name is taken by a directory: its commit fails
    queue.schedule_async_request(AsyncRequest(fn, args, preload_fn=pre,
                                              finalize_fns=[functools.partial(save_state_dict_async_finalize, plan)]))
    with pytest.raises(StorageError, match=r"__0_0\.distcp"):
        queue.maybe_finalize_async_calls(blocking=True)
    assert not (path / ".metadata").exists() and not (path / "COMMIT").exists()


def test_shared_registry_keys_storage_after_its_move() -> None:
    """Regression: the registry keys a CPU storage by its shared-memory address, not the address it
    had before share_memory_() (freed, reusable by a new tensor that would then hit a stale entry)."""
    from asyncckpt.staging import SharedRegistry

    reg = SharedRegistry()
    a = torch.randn(300, 200)
    _, new1, _ = reg.prepare({0: a})
    assert len(new1) == 1 and a.untyped_storage().is_shared()
    refs2, new2, release2 = reg.prepare({0: a})
    assert new2 == {} and release2 == [] and refs2[0].storage_id == next(iter(new1))


def test_a_failure_that_arrives_before_the_save_is_done_here_names_the_save(tmp_path, queue, monkeypatch) -> None:
    """After a peer died, the all-reduce fails this rank's finalize while its own save still looks
    pending: the error still names the checkpoint (it once said "the DCP save of a DCP save")."""
    from asyncckpt.dcp import finalize_async_saves

    path = tmp_path / "ck"
    h = async_save({"w": torch.ones(10)}, storage_writer=AsyncStorageWriter(str(path)), queue=queue)

    def peer_died(blocking: bool = False, no_dist: bool = False) -> list[int]:
        raise CheckpointError("rank 1 died before the commit")

    monkeypatch.setattr(queue, "maybe_finalize_async_calls", peer_died)
    monkeypatch.setattr(queue, "is_pending", lambda idx: True)
    with pytest.raises(CheckpointException) as ei:
        finalize_async_saves(blocking=True, queue=queue)
    assert str(path) in str(ei.value) and "of a DCP save" not in str(ei.value)
    monkeypatch.undo()
    h.result()
