"""The DCP contract matrix, run inside gloo ranks (tests/dcp/test_dcp_matrix.py).

One function per rank set does every scenario, so each rank set is spawned once: save with
asyncckpt's writer (``async_save``: snapshot, mutate, ``result()``) and with DCP's stock
FileSystemWriter, with and without a stream extension, then load each checkpoint right away (no
barrier) with both readers; load what the earlier rank sets saved (resharding N -> M);
sharded <-> plain tensors; key order and overwrite; mesh and placement changes; a coordinator
whose commit fails (every rank raises CheckpointException), in both call forms.
"""

from __future__ import annotations

import errno
import io
import os
from typing import Any

import torch
import torch.distributed as dist

from tests.dcp import _ext
from tests.dcp._ranks import assert_same, empty_like_state, full_tensor, local_values, mutate

ROWS, COLS = 130, 96  # 130 rows: uneven shards for 4 ranks


def state(world: int, seed: int = 1234) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = full_tensor(ROWS, COLS, seed)
    return {
        "dt": distribute_tensor(full, mesh, [Shard(0)]),
        "rep": torch.arange(700, dtype=torch.float64) + seed,
        "bf16": full[:8, :16].to(torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "blob": io.BytesIO(b"loss-history-" + str(seed).encode()),
        "meta": {"step": seed, "name": f"run-{seed}", "lr": 0.5},
    }


def blank(sd: dict[str, Any]) -> dict[str, Any]:
    out = empty_like_state({k: v for k, v in sd.items() if k != "blob"})
    out["blob"] = io.BytesIO()
    return out


def values(sd: dict[str, Any]) -> dict[str, Any]:
    out = local_values({k: v for k, v in sd.items() if k != "blob"})
    if "blob" in sd:
        out["/blob"] = sd["blob"].getvalue()
    return out


def _writer(kind: str, path: str, ext: bool, overwrite: bool = True) -> Any:
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageWriter

    extensions = [_ext.XorExtension()] if ext else None
    if kind == "ours":
        return AsyncStorageWriter(path, overwrite=overwrite, _extensions=extensions, chunk_size=5 << 20)
    return dcp.FileSystemWriter(path, overwrite=overwrite, _extensions=extensions)


def _reader(kind: str, path: str, written_by: str) -> Any:
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader

    if kind == "ours":
        return AsyncStorageReader(path, _ext.registry(), verify=written_by == "ours", chunk_size=16 << 10)
    return dcp.FileSystemReader(path, _extension_registry=_ext.registry())


def save(kind: str, sd: dict[str, Any], path: str, ext: bool = False, overwrite: bool = True, queue: Any = None) -> Any:
    """Save ``sd``; asyncckpt's way mutates the state right after the snapshot (the saved values
    must be those of the call). Returns the values the checkpoint must hold."""
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import async_save

    want = values(sd)
    if kind == "ours":
        h = async_save(sd, storage_writer=_writer(kind, path, ext, overwrite), queue=queue)
        h.wait_snapshot()
        mutate(sd)
        h.result()
        assert h.committed and os.path.exists(os.path.join(path, ".metadata")), "result() returned before the commit"
    else:
        dcp.save(sd, storage_writer=_writer(kind, path, ext, overwrite))
    return want


def load(kind: str, path: str, world: int, written_by: str, seed: int) -> int:
    import torch.distributed.checkpoint as dcp

    target = blank(state(world, seed=7))
    dcp.load(target, storage_reader=_reader(kind, path, written_by))
    return assert_same(values(target), values(state(world, seed)), f"{kind} reader, {written_by} writer, {path}")


def expect_checkpoint_exception(fn: Any, what: str) -> Any:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        fn()
    except CheckpointException as exc:
        return exc
    raise AssertionError(f"{what}: no CheckpointException on rank {dist.get_rank()}")


def matrix(rank: int, world: int, root: str, earlier: list[int]) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from asyncckpt import AsyncCallsQueue
    from asyncckpt.dcp import AsyncStorageWriter, DcpCheckpointException, close_async_saves

    counts: dict[str, int] = {"round_trips": 0, "resharded": 0}
    here = os.path.join(root, f"w{world}")
    try:
        # 1. Round trips: both writers x both readers, with and without a stream extension,
        #    loaded right after the save returned (no barrier).
        for writer in ("ours", "stock"):
            for ext in (False, True):
                seed = 100 * world + (10 if writer == "ours" else 20) + int(ext)
                path = os.path.join(here, f"{writer}-{'xor' if ext else 'plain'}")
                sd = state(world, seed)
                save(writer, sd, path, ext)
                for reader in ("ours", "stock"):
                    counts["round_trips"] += 1
                    load(reader, path, world, writer, seed)
        # 2. Resharding: what the earlier rank sets saved, loaded into this one.
        for n in earlier:
            for writer in ("ours", "stock"):
                for ext in (False, True):
                    seed = 100 * n + (10 if writer == "ours" else 20) + int(ext)
                    path = os.path.join(root, f"w{n}", f"{writer}-{'xor' if ext else 'plain'}")
                    for reader in ("ours", "stock"):
                        load(reader, path, world, writer, seed)
                        counts["resharded"] += 1
        # 3. Sharded <-> plain tensor, and mesh / placement changes.
        mesh = init_device_mesh("cpu", (world,))
        full = full_tensor(ROWS, COLS, 5)
        for writer in ("ours", "stock"):
            path = os.path.join(here, f"switch-{writer}")
            save(writer, {"plain": full.clone(), "dt": distribute_tensor(full.clone(), mesh, [Shard(1)])}, path)
            tgt = {"plain": distribute_tensor(torch.zeros_like(full), mesh, [Shard(0)]), "dt": torch.zeros_like(full)}
            dcp.load(tgt, storage_reader=_reader("ours" if writer == "ours" else "stock", path, writer))
            assert torch.equal(tgt["plain"].full_tensor(), full) and torch.equal(tgt["dt"], full), "sharded <-> tensor"
            if world == 4:
                mesh2 = init_device_mesh("cpu", (2, 2))
                tgt2 = {"plain": distribute_tensor(torch.zeros_like(full), mesh2, [Shard(1), Replicate()]),
                        "dt": distribute_tensor(torch.zeros_like(full), mesh2, [Shard(0), Shard(1)])}
                dcp.load(tgt2, storage_reader=_reader("stock" if writer == "ours" else "ours", path, writer))
                assert torch.equal(tgt2["plain"].full_tensor(), full) and torch.equal(tgt2["dt"].full_tensor(), full)
        if world == 4:  # a 2-D mesh checkpoint for the later (smaller) rank sets
            mesh2 = init_device_mesh("cpu", (2, 2))
            save("ours", {"grid": distribute_tensor(full.clone(), mesh2, [Shard(0), Shard(1)])}, os.path.join(here, "grid"))
        for n in earlier:
            grid = os.path.join(root, f"w{n}", "grid")
            if os.path.exists(grid):
                tgt = {"grid": distribute_tensor(torch.zeros_like(full), mesh, [Shard(1)])}
                dcp.load(tgt, storage_reader=_reader("ours", grid, "ours"))
                assert torch.equal(tgt["grid"].full_tensor(), full), "2-D mesh -> 1-D mesh, other placement"
                counts["resharded"] += 1
        # 4. Key order and overwrite: the second save replaces the first; overwrite=False refuses.
        for writer in ("ours", "stock"):
            path = os.path.join(here, f"order-{writer}")
            save(writer, {"a": torch.ones(10), "b": torch.zeros(10), "c": 1}, path)
            save(writer, {"c": 2, "b": torch.full((10,), 3.0), "a": torch.full((10,), 4.0)}, path)
            got = {"a": torch.zeros(10), "b": torch.zeros(10), "c": 0}
            dcp.load(got, storage_reader=_reader(writer, path, writer))
            assert got["c"] == 2 and torch.equal(got["a"], torch.full((10,), 4.0)) and torch.equal(got["b"], torch.full((10,), 3.0))
            exc = expect_checkpoint_exception(lambda p=path, w=writer: save(w, {"a": torch.ones(10)}, p, overwrite=False),
                                              f"{writer} overwrite=False")
            assert "Checkpoint already exists" in str(exc), str(exc)
            got = {"a": torch.zeros(10), "b": torch.zeros(10), "c": 0}
            dcp.load(got, storage_reader=_reader(writer, path, writer))  # the refused save left it intact
            assert got["c"] == 2
        # 5. A coordinator whose commit fails: every rank raises, naming rank 0's error.
        if world > 1:
            q = AsyncCallsQueue(worker_options={"preload": ["tests.dcp._ext"], "torch_threads": 1})
            try:
                path = os.path.join(here, "fail-commit")
                exc = expect_checkpoint_exception(lambda: save("ours", state(world, 3), path, queue=q), "failed commit")
                assert isinstance(exc, DcpCheckpointException) and 0 in exc.failures, exc
                assert "No space left" in str(exc.failures[0][0]), str(exc)
                assert not os.path.exists(os.path.join(path, ".metadata"))
                # The queue goes on: the next save commits.
                save("ours", state(world, 4), os.path.join(here, "after-failure"), queue=q)
                load("ours", os.path.join(here, "after-failure"), world, "ours", 4)
            finally:
                q.close()
            exc = expect_checkpoint_exception(lambda: _nvrx_form_commit_failure(rank, os.path.join(here, "nvrx-fail")),
                                              "NVRx-form commit failure")
            assert 0 in exc.failures and "ENOSPC" in str(exc.failures[0][0]), str(exc)
            counts["commit_failures"] = 2
    finally:
        close_async_saves()
    del AsyncStorageWriter
    return counts


def _nvrx_form_commit_failure(rank: int, path: str) -> None:
    """save_state_dict_async_finalize(*ret) as the finalize function; rank 0's commit fails."""
    from asyncckpt import AsyncCallsQueue, AsyncRequest
    from asyncckpt.dcp import AsyncStorageWriter, save_state_dict_async_finalize, save_state_dict_async_plan

    class FullDisk(AsyncStorageWriter):
        def commit(self, metadata: Any, **kw: Any) -> Any:
            raise OSError(errno.ENOSPC, "ENOSPC writing .metadata (injected)")

    q = AsyncCallsQueue(worker_options={"torch_threads": 1})
    try:
        w = FullDisk(path)
        ret = save_state_dict_async_plan({"x": torch.ones(100) * rank}, w)
        fn, pre, args = w.get_save_function_and_args(q)
        q.schedule_async_request(AsyncRequest(fn, args, [lambda: save_state_dict_async_finalize(*ret)], preload_fn=pre))
        q.maybe_finalize_async_calls(blocking=True)
    finally:
        q.close(abort=True)
