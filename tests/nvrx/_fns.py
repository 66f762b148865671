"""Functions the NVRx-compatibility tests send to the worker (importable by module name), and the
NVRx examples run on gloo ranks."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch


def fail(msg: str) -> None:
    raise RuntimeError(msg)


def copy_first(dst: str, sd: dict[str, torch.Tensor]) -> None:
    """async_fn of an NVRx-style request: ``sd`` is what ``preload_fn()`` returned."""
    torch.save({k: v.clone() for k, v in sd.items()}, dst)


def clone_sd(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sd.items()}


def preload_request(dst: str, sd: dict[str, torch.Tensor]) -> Any:
    from asyncckpt.nvrx.core import AsyncRequest

    return AsyncRequest(copy_first, (dst, None), [], preload_fn=functools.partial(clone_sd, sd))


# -- NVRx's documented examples, with only the import lines changed ----------------------------


def usage_guide_loop(rank: int, world: int, ckpt_dir: str) -> dict[str, Any]:
    """NVRx usage guide: TorchAsyncCheckpoint in a training loop (CPU model; state mutated right
    after each async_save; every file holds the values of its call)."""
    from asyncckpt.nvrx.torch_ckpt import TorchAsyncCheckpoint  # was nvidia_resiliency_ext...torch_ckpt

    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    async_impl = TorchAsyncCheckpoint()
    expected: dict[str, dict[str, torch.Tensor]] = {}
    for step in range(6):
        async_impl.finalize_async_save(blocking=False)
        loss = model(torch.randn(4, 10)).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 1:
            path = os.path.join(ckpt_dir, f"rank{rank}-step{step}.pt")
            expected[path] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            async_impl.async_save(model.state_dict(), path)
            with torch.no_grad():  # mutate right away: the file must not see this
                for p in model.parameters():
                    p.add_(1.0)
    async_impl.finalize_async_save(blocking=True)
    async_impl.close()
    for path, want in expected.items():
        got = torch.load(path, weights_only=True)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), path
    return {"files": len(expected)}


def dcp_example(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """NVRx's DCP example (examples/checkpointing/async_writer.py): FileSystemWriterAsync,
    save_state_dict_async_plan(..., enable_cache=True), AsyncRequest with
    save_state_dict_async_finalize(*ret) in its finalize function; the state is mutated right
    after each schedule; dcp.load (FileSystemReader) returns the values of the call."""
    import torch.distributed as dist
    from torch.distributed import checkpoint
    from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader

    from asyncckpt.nvrx.core import AsyncCallsQueue, AsyncRequest  # was nvidia_resiliency_ext...core
    from asyncckpt.nvrx.filesystem_async import FileSystemWriterAsync  # was ...filesystem_async
    from asyncckpt.nvrx.state_dict_saver import (  # was ...state_dict_saver
        init_checkpoint_metadata_cache,
        save_state_dict_async_finalize,
        save_state_dict_async_plan,
    )

    def get_save_and_finalize_callbacks(writer: Any, save_state_dict_ret: Any) -> AsyncRequest:
        save_fn, preload_fn, save_args = writer.get_save_function_and_args()

        def finalize_fn() -> None:
            save_state_dict_async_finalize(*save_state_dict_ret)
            dist.barrier()

        return AsyncRequest(save_fn, save_args, [finalize_fn], async_fn_kwargs={}, preload_fn=preload_fn)

    def save_checkpoint(checkpoint_dir: str, async_queue: Any, model: Any, thread_count: int) -> None:
        state_dict = model.state_dict()
        planner = DefaultSavePlanner()
        writer = FileSystemWriterAsync(checkpoint_dir, thread_count=thread_count)
        coordinator_rank = 0
        save_state_dict_ret = save_state_dict_async_plan(
            state_dict, writer, None, coordinator_rank, planner=planner, enable_cache=True
        )
        save_request = get_save_and_finalize_callbacks(writer, save_state_dict_ret)
        async_queue.schedule_async_request(save_request)

    torch.manual_seed(0)  # the same model on every rank (replicated: DCP deduplicates it)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    async_queue = AsyncCallsQueue(persistent=True)
    init_checkpoint_metadata_cache()
    expected: dict[str, dict[str, torch.Tensor]] = {}
    for batch_idx in range(6):
        async_queue.maybe_finalize_async_calls(blocking=False, no_dist=False)
        optimizer.zero_grad()
        g = torch.Generator().manual_seed(batch_idx)
        loss = torch.nn.functional.mse_loss(model(torch.randn(16, 64, generator=g)), torch.zeros(16, 8))
        loss.backward()
        optimizer.step()
        if batch_idx % 2 == 0:
            checkpoint_dir = f"{ckpt_root}/iter_{batch_idx:07d}"
            expected[checkpoint_dir] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save_checkpoint(checkpoint_dir, async_queue, model, thread_count=2)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-3.0)  # right after the schedule: must not reach the checkpoint
    async_queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
    async_queue.close()
    dist.barrier()
    for checkpoint_dir, want in expected.items():
        state_dict = {k: torch.zeros_like(v) for k, v in want.items()}
        checkpoint.load(state_dict=state_dict, storage_reader=FileSystemReader(checkpoint_dir),
                        planner=DefaultLoadPlanner())
        assert all(torch.equal(state_dict[k], want[k]) for k in want), checkpoint_dir
    return {"checkpoints": len(expected)}


def both_examples(rank: int, world: int, root: str) -> dict[str, Any]:
    a = usage_guide_loop(rank, world, os.path.join(root, "torch"))
    b = dcp_example(rank, world, os.path.join(root, "dcp"))
    return {**a, **b}
