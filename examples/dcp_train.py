"""A DCP training loop with non-blocking saves on asyncckpt's worker, blocking finalize at shutdown.

FSDP2 (``fully_shard``) on CPU with gloo. Every ``--save-every`` steps the model and optimizer
state is saved with :func:`asyncckpt.dcp.async_save`: the call plans (DCP's collective
planning) and returns; the persistent worker snapshots the tensors and writes the DCP files.
The optimizer step waits for the snapshot (a step pre-hook), each step finalizes finished
saves without blocking, and shutdown finalizes the rest. At the end the last checkpoint is
loaded back with plain ``torch.distributed.checkpoint.load`` and compared.

    python examples/dcp_train.py --world-size 2 --steps 30 --out /tmp/dcp-run
    torchrun --nproc-per-node 2 examples/dcp_train.py --out /tmp/dcp-run   # same, launched by torchrun
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from asyncckpt.dcp import AsyncSaveHandle, async_save, close_async_saves, finalize_async_saves


def build(world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 16)
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    model, opt = build(world, seed=0)
    pending: list[AsyncSaveHandle] = []
    # The optimizer mutates the state: it must wait until the worker holds its snapshot.
    def wait_snapshots(*_: object) -> None:
        for h in pending:
            h.wait_snapshot()

    opt.register_step_pre_hook(wait_snapshots)
    gen = torch.Generator().manual_seed(100 + rank)
    blocked: list[float] = []
    last = None
    for step in range(1, args.steps + 1):
        x = torch.randn(32, 256, generator=gen)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        finalize_async_saves(blocking=False)  # one int all-reduce; commits finished saves
        pending = [h for h in pending if not h.done()]
        if step % args.save_every == 0:
            t0 = time.perf_counter()
            msd, osd = get_state_dict(model, opt)
            last = os.path.join(args.out, f"step-{step:05d}")
            pending.append(async_save({"model": msd, "optim": osd, "step": step}, checkpoint_id=last))
            blocked.append(time.perf_counter() - t0)
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}, save scheduled in {blocked[-1] * 1e3:.1f} ms", flush=True)
    close_async_saves()  # blocking finalize of every pending save, then the worker stops
    if last is None:
        return
    # Resume check: plain DCP load of the last checkpoint into a fresh model equals the live state.
    model2, opt2 = build(world, seed=1)
    msd2, osd2 = get_state_dict(model2, opt2)
    sd2 = {"model": msd2, "optim": osd2, "step": 0}
    dcp.load(sd2, checkpoint_id=last)
    set_state_dict(model2, opt2, model_state_dict=sd2["model"], optim_state_dict=sd2["optim"])
    for (name, p1), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p1.to_local(), p2.to_local()), name
    if rank == 0:
        print(f"resumed from {last} (step {sd2['step']}): parameters equal; "
              f"save call median {sorted(blocked)[len(blocked) // 2] * 1e3:.1f} ms", flush=True)


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(rank, world, args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the checkpoints (one DCP directory per save)")
    ap.add_argument("--world-size", type=int, default=2, help="ranks to spawn when not launched by torchrun")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=10)
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    torch.set_num_threads(1)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        dist.init_process_group("gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(args.world_size, port, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
