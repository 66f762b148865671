"""Multi-rank scenarios for the DCP tests: run on gloo ranks spawned by ``tests._dist.run_ranks``.

Every function here runs inside a spawned rank (importable by reference); it asserts and
returns a small JSON-able summary. State is small (a few MiB) and deterministic, so a
loading group can rebuild what a saving group had.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import torch
import torch.distributed as dist

# -- state -------------------------------------------------------------------------------------


def full_tensor(rows: int, cols: int, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g)


def sharded_state(world: int, rows: int = 642, cols: int = 512) -> dict[str, Any]:
    """A DTensor sharded over all ranks (uneven for 4 ranks), replicated tensors and plain values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = full_tensor(rows, cols)
    return {
        "dt": distribute_tensor(full, mesh, [Shard(0)]),
        "rep": torch.arange(5000, dtype=torch.float64),
        "bf16": full[:16, :64].to(torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "step": 5,
        "meta": {"name": "run-a", "lr": 0.01},
    }


def empty_like_state(sd: dict[str, Any]) -> dict[str, Any]:
    """Zeroed targets of the same structure (DTensors keep their placement) and blank plain values."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out: dict[str, Any] = {}
    for k, v in sd.items():
        if isinstance(v, DTensor):
            out[k] = distribute_tensor(torch.zeros(v.shape, dtype=v.dtype), v.device_mesh, v.placements)
        elif isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        elif isinstance(v, dict):
            out[k] = empty_like_state(v)
        elif isinstance(v, str):
            out[k] = ""
        else:
            out[k] = type(v)(0)
    return out


def local_values(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten to {path: local tensor clone | value}; DTensors contribute their local shard."""
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(local_values(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(local_values(v, f"{prefix}/{i}"))
    elif isinstance(obj, DTensor):
        out[prefix] = obj.to_local().detach().clone()
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone()
    else:
        out[prefix] = obj
    return out


def assert_same(got: dict[str, Any], want: dict[str, Any], what: str) -> int:
    assert got.keys() == want.keys(), f"{what}: keys differ: {sorted(got.keys() ^ want.keys())[:10]}"
    for k, w in want.items():
        g = got[k]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor) and g.dtype == w.dtype and g.shape == w.shape, f"{what}: {k}"
            assert torch.equal(g, w), f"{what}: values of {k} differ"
        else:
            assert g == w, f"{what}: {k}: {g!r} != {w!r}"
    return len(want)


def mutate(obj: Any) -> None:
    """Change every tensor in place (what an optimizer step does to the live state)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, dict):
        for v in obj.values():
            mutate(v)
    elif isinstance(obj, DTensor):
        t = obj.to_local()
        with torch.no_grad():
            t.copy_(torch.logical_not(t) if t.dtype == torch.bool else t + 1000)
    elif isinstance(obj, torch.Tensor):
        with torch.no_grad():
            obj.copy_(torch.logical_not(obj) if obj.dtype == torch.bool else obj + 1000)


def fsdp_model_and_optim(world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small FSDP2-sharded MLP (CPU, gloo) with Adam after one step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(7 + dist.get_rank()))
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


# -- scenarios ---------------------------------------------------------------------------------


def save_plan_then_load(rank: int, world: int, ckpt_dir: str) -> dict[str, Any]:
    """Async plan on our own queue; the state is mutated right after the snapshot; stock and our load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from asyncckpt import AsyncCallsQueue, AsyncRequest
    from asyncckpt.dcp import (
        AsyncStorageReader,
        AsyncStorageWriter,
        save_state_dict_async_finalize,
        save_state_dict_async_plan,
    )

    sd = sharded_state(world)
    model, opt = fsdp_model_and_optim(world, seed=11)
    msd, osd = get_state_dict(model, opt)
    sd["model"], sd["optim"] = msd, osd
    want = local_values(sd)

    queue = AsyncCallsQueue(worker_options={"torch_threads": 1})
    try:
        # Hold the worker's write stage for a moment: the snapshot is taken meanwhile, the files
        # are written only after the state below has been changed.
        queue.schedule_async_request(AsyncRequest(time.sleep, (1.5,)))
        writer = AsyncStorageWriter(ckpt_dir, chunk_size=5 << 20)
        t0 = time.perf_counter()
        plan = save_state_dict_async_plan(sd, writer)
        save_fn, preload_fn, args = writer.get_save_function_and_args(queue)
        queue.schedule_async_request(
            AsyncRequest(save_fn, args, preload_fn=preload_fn,
                         finalize_fns=[functools.partial(save_state_dict_async_finalize, plan)])
        )
        queue.wait_snapshot()
        blocked = time.perf_counter() - t0
        mutate(sd)  # the live state changes right away...
        x = torch.randn(8, 64)
        model(x).sum().backward()
        opt.step()  # ...the FSDP2 parameters and Adam state too
        assert not os.path.exists(os.path.join(ckpt_dir, ".metadata"))
        queue.maybe_finalize_async_calls(blocking=True)
    finally:
        queue.close()
    assert os.path.exists(os.path.join(ckpt_dir, ".metadata"))

    # Stock DCP load (FileSystemReader) into fresh targets.
    target = empty_like_state({k: v for k, v in sd.items() if k not in ("model", "optim")})
    model2, opt2 = fsdp_model_and_optim(world, seed=99)
    msd2, osd2 = get_state_dict(model2, opt2)
    target["model"], target["optim"] = msd2, osd2
    dcp.load(target, checkpoint_id=ckpt_dir)
    n = assert_same(local_values(target), want, "stock dcp.load")

    # Our reader (verifies every checksum) into fresh targets again.
    target = empty_like_state({k: v for k, v in sd.items() if k not in ("model", "optim")})
    model3, opt3 = fsdp_model_and_optim(world, seed=98)
    msd3, osd3 = get_state_dict(model3, opt3)
    target["model"], target["optim"] = msd3, osd3
    dcp.load(target, storage_reader=AsyncStorageReader(ckpt_dir, chunk_size=64 << 10))
    assert_same(local_values(target), want, "AsyncStorageReader")
    return {"values": n, "blocked_s": blocked}


def save_with_helper(rank: int, world: int, ckpt_dir: str, rows: int, cols: int) -> dict[str, Any]:
    """``async_save`` (default queue), snapshot wait, mutation, ``close_async_saves``."""
    from asyncckpt.dcp import async_save, close_async_saves

    sd = sharded_state(world, rows, cols)
    want = local_values(sd)
    try:
        handle = async_save(sd, checkpoint_id=ckpt_dir)
        handle.wait_snapshot()
        mutate(sd)
        md = handle.result()
        assert handle.done() and handle.committed
        assert (md is not None) == (rank == 0)
    finally:
        close_async_saves()
    return {"values": len(want)}


def load_resharded(rank: int, world: int, ckpt_dir: str, rows: int, cols: int, reader: str) -> dict[str, Any]:
    """Load a checkpoint saved by another number of ranks into this group's sharding."""
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader

    want_sd = sharded_state(world, rows, cols)
    want = local_values(want_sd)
    target = empty_like_state(want_sd)
    if reader == "stock":
        dcp.load(target, checkpoint_id=ckpt_dir)
    else:
        dcp.load(target, storage_reader=AsyncStorageReader(ckpt_dir, chunk_size=32 << 10, coalesce_gap=0))
    n = assert_same(local_values(target), want, f"{reader} load into {world} ranks")
    return {"values": n, "local_rows": int(target["dt"].to_local().shape[0])}


def s3_round_trip(rank: int, world: int, uri: str, options: dict[str, Any]) -> dict[str, Any]:
    """Save to S3 with the async plan (multipart files), load back with our S3 reader."""
    import torch.distributed.checkpoint as dcp

    from asyncckpt import AsyncCallsQueue, AsyncRequest
    from asyncckpt.dcp import (
        AsyncStorageReader,
        AsyncStorageWriter,
        save_state_dict_async_finalize,
        save_state_dict_async_plan,
    )

    sd = sharded_state(world, rows=3072, cols=1024)  # 6 MiB per rank: more than one 5 MiB part
    want = local_values(sd)
    queue = AsyncCallsQueue(worker_options={"torch_threads": 1})
    try:
        writer = AsyncStorageWriter(uri, chunk_size=5 << 20, storage_options=options)
        plan = save_state_dict_async_plan(sd, writer)
        save_fn, preload_fn, args = writer.get_save_function_and_args(queue)
        queue.schedule_async_request(
            AsyncRequest(save_fn, args, preload_fn=preload_fn,
                         finalize_fns=[functools.partial(save_state_dict_async_finalize, plan)])
        )
        queue.wait_snapshot()
        mutate(sd)
        queue.maybe_finalize_async_calls(blocking=True)
    finally:
        queue.close()
    target = empty_like_state(sd)
    dcp.load(target, storage_reader=AsyncStorageReader(uri, storage_options=options, chunk_size=1 << 20))
    n = assert_same(local_values(target), want, "S3 load")
    return {"values": n}


def overwrite_in_place(rank: int, world: int, ckpt_dir: str) -> dict[str, Any]:
    """Save the same path three times (async twice, then plain ``dcp.save``); after each commit every
    rank loads it with the stock and our reader and gets that save's values (the old generation gone)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from asyncckpt.dcp import AsyncStorageReader, AsyncStorageWriter, async_save, close_async_saves

    def version(k: int) -> dict[str, Any]:
        sd = sharded_state(world, 64, 32)
        sd["dt"] = sd["dt"] + k
        sd["rep"].add_(k)
        sd["step"] = k
        return sd

    try:
        for k in (1, 2, 3):
            sd = version(k)
            if k < 3:
                async_save(sd, checkpoint_id=ckpt_dir).result()
            else:
                dcp.save(sd, storage_writer=AsyncStorageWriter(ckpt_dir))
            dist.barrier()
            want = local_values(version(k))
            for reader in ("stock", "ours"):
                target = empty_like_state(sd)
                if reader == "stock":
                    dcp.load(target, storage_reader=dcp.FileSystemReader(ckpt_dir))
                else:
                    dcp.load(target, storage_reader=AsyncStorageReader(ckpt_dir))
                assert_same(local_values(target), want, f"{reader} load of save {k}")
                assert isinstance(target["dt"], DTensor)
            dist.barrier()  # every rank read this generation before the next commit replaces it
    finally:
        close_async_saves()
    return {"files": sorted(os.listdir(ckpt_dir))}
