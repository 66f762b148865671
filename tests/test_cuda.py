"""CUDA paths: IPC handles to the worker, pinned staging, D2H copies on the worker's own stream,
the NCCL completion all-reduce. Skipped where no GPU is present (this machine and CI)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import asyncckpt
from asyncckpt.staging import StagingPool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_state(step: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(step)
    return {
        "big": torch.randn(4 << 20, device="cuda", generator=g),  # 16 MiB: goes as an IPC handle
        "bias": torch.full((7,), float(step), device="cuda"),  # small: copied at save()
        "bf16": torch.randn(512, 300, device="cuda", generator=g).to(torch.bfloat16),
        "strided": torch.randn(300, 512, device="cuda", generator=g).t(),  # non-contiguous view
        "ids": torch.arange(100_000, device="cuda", dtype=torch.int64) * step,
        "cpu": torch.arange(10.0),
        "step": step,
    }


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        if isinstance(w, torch.Tensor):
            assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
            assert torch.equal(got[k].cpu(), w.cpu()), k
        else:
            assert got[k] == w, k


def test_staging_pool_is_pinned_when_cuda_is_present() -> None:
    assert StagingPool(1).pinned


def test_cuda_round_trip_and_map_location(tmp_path) -> None:
    state = _gpu_state(3)
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save(state, tmp_path / "c", step=3)
        ck.finalize(blocking=True)
    _assert_same(asyncckpt.load(tmp_path / "c"), want)
    on_gpu = asyncckpt.load(tmp_path / "c", map_location="cuda")
    assert on_gpu["big"].is_cuda and on_gpu["bf16"].is_cuda
    _assert_same(on_gpu, want)


def test_kernels_still_running_at_save_are_captured_and_later_ones_are_not(tmp_path) -> None:
    """The state is written by queued kernels right before save() and overwritten right after the
    snapshot: the checkpoint holds exactly the value at the save() call."""
    x = torch.ones(8 << 20, device="cuda")
    m = torch.randn(2048, 2048, device="cuda")
    with asyncckpt.AsyncCheckpointer() as ck:
        for step in range(4):
            for _ in range(20):
                m = m @ m.t()
                m = m / m.norm()  # long queue of kernels before the write below
            x.mul_(0).add_(float(step))
            ck.save({"x": x}, tmp_path / f"s{step}", step=step)
            ck.wait_snapshot()
            x.add_(1000.0)  # the next "training step"
        ck.finalize(blocking=True)
    for step in range(4):
        got = asyncckpt.load(tmp_path / f"s{step}")["x"]
        assert torch.equal(got, torch.full((8 << 20,), float(step))), step


def test_optimizer_hook_protects_cuda_state(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    expected = []
    with asyncckpt.AsyncCheckpointer(optimizers=opt) as ck:
        for step in range(4):
            model(torch.randn(64, 512, device="cuda")).pow(2).mean().backward()
            opt.step()  # waits for the previous snapshot before mutating
            opt.zero_grad()
            expected.append({k: v.clone() for k, v in model.state_dict().items()})
            ck.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / f"s{step}", step=step)
        ck.finalize(blocking=True)
    for step, want in enumerate(expected):
        got = asyncckpt.load(tmp_path / f"s{step}")["model"]
        for k, w in want.items():
            assert torch.equal(got[k], w.cpu()), (step, k)


def test_torch_async_checkpoint_of_cuda_state_is_read_by_torch_load(tmp_path) -> None:
    state = _gpu_state(5)
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save(state, tmp_path / "model.pt")
        tac.wait_snapshot()
        state["big"].zero_()
        tac.finalize_async_save(blocking=True)
    got = torch.load(tmp_path / "model.pt", weights_only=True, map_location="cpu")
    _assert_same(got, want)


@pytest.mark.skipif(not dist.is_nccl_available(), reason="needs NCCL")
def test_nccl_completion_all_reduce_on_one_rank(tmp_path) -> None:
    """finalize(no_dist=False) decides with one NCCL all-reduce on the current device."""
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        state = _gpu_state(1)
        with asyncckpt.AsyncCheckpointer(no_dist=False) as ck:
            h = ck.save(state, tmp_path / "c", step=1)
            ck.finalize(blocking=True)
            assert h is not None and h.committed
        assert asyncckpt.load(tmp_path / "c")["step"] == 1
    finally:
        dist.destroy_process_group()


def test_cuda_tensors_sharing_a_storage_are_saved_once_and_load_shared_with_map_location(tmp_path):
    flat = torch.randn(4 << 20, device="cuda")  # 16 MiB: goes as one IPC handle, copied once
    emb = torch.nn.Embedding(1000, 64).cuda()
    state = {"emb": emb.weight, "head": emb.weight.detach(), "a": flat[: 1 << 20], "b": flat[1 << 20 :].view(-1, 64).t()}
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save(state, tmp_path / "c")
    size = (tmp_path / "c" / "rank-00000.data").stat().st_size
    assert size < (4 << 20) * 4 + 1000 * 64 * 4 + 4096
    out = asyncckpt.load(tmp_path / "c", map_location="cuda")
    for k, v in state.items():
        assert out[k].is_cuda and torch.equal(out[k], v) and out[k].stride() == v.stride(), k
    ptr = {k: v.untyped_storage().data_ptr() for k, v in out.items()}
    assert ptr["emb"] == ptr["head"] and ptr["a"] == ptr["b"] and ptr["a"] != ptr["emb"]
