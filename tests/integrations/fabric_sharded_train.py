"""A tiny FSDP2 Fabric run on 2 CPU gloo ranks (Fabric's ModelParallelStrategy): train, save sharded, maybe die, resume.
(``--fsdp1``: Fabric's FSDPStrategy with sharded state dicts on up to 2 GPUs instead.)

    python fabric_sharded_train.py OUT_DIR [--strategy asyncckpt|stock] [--steps N] [--every K] [--kill-at STEP]
        [--resume] [--exit-skew S] [--namespace lightning|lightning_fabric] [--fsdp1]

Fabric launches rank 1 from this script. Every K steps both ranks call ``fabric.save(OUT_DIR/ckpts/last, state)``
(model, optimizer, the LR scheduler as a stateful object, the step) and nothing else: no finalize,
no teardown. ``--kill-at STEP``: at that step (a save step) the previous save is committed first,
then the save of STEP is started and every rank SIGKILLs itself with it in flight. ``--resume``
loads OUT_DIR/ckpts/last with ``fabric.load`` (after checking that a strict load of a key the
checkpoint lacks raises) and goes on from its step. ``--exit-skew S``: rank 1
sleeps S seconds before it exits, so the ranks reach exit at different times. ``--raise-at-end``: rank 0
ends with an uncaught exception after its last save, and rank 1 (normal exit) writes OUT_DIR/rank1-exited
from an exit hook that runs after the strategy's.

At the end rank 0 writes OUT_DIR/final.pt: the full (gathered) model and optimizer state, the
scheduler state, the step and every rank's next draws from torch, Python ``random`` and NumPy. A
resumed run also writes OUT_DIR/restored.pt, the same taken right after ``fabric.load``.

Training draws from every RNG on every rank (dropout, input noise), each rank from streams of its
own (seeded by rank), so a resume that does not put back each rank's RNG state ends elsewhere.
The batches come from a generator seeded by step and rank, so they do not depend on the RNG state.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--strategy", default="asyncckpt")
p.add_argument("--steps", type=int, default=12)
p.add_argument("--every", type=int, default=2)
p.add_argument("--kill-at", type=int, default=-1)
p.add_argument("--resume", action="store_true")
p.add_argument("--exit-skew", type=float, default=0.0)
p.add_argument("--namespace", default="lightning")
p.add_argument("--raise-at-end", action="store_true",
               help="rank 0 ends with an uncaught exception; rank 1 exits normally and writes OUT_DIR/rank1-exited")
p.add_argument("--fsdp1", action="store_true", help="FSDPStrategy (FSDP1, sharded state dicts) on up to 2 GPUs instead")
args = p.parse_args()

if args.namespace == "lightning":
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy

    from asyncckpt.integrations.lightning import AsyncckptFabricFSDPStrategy, AsyncckptFabricModelParallelStrategy
else:
    from lightning_fabric import Fabric  # type: ignore[no-redef]
    from lightning_fabric.strategies import FSDPStrategy, ModelParallelStrategy  # type: ignore[assignment]

    from asyncckpt.integrations.pytorch_lightning import (  # type: ignore[assignment]
        AsyncckptFabricFSDPStrategy,
        AsyncckptFabricModelParallelStrategy,
    )

torch.set_num_threads(1)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def parallelize(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    dp = mesh["data_parallel"]
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=dp)
    fully_shard(model, mesh=dp)
    return model


def snapshot(fabric: Any, model: Any, opt: Any, sched: Any, step: int, path: str) -> None:
    """Rank 0 writes the gathered training state and every rank's RNG state to ``path`` (collective)."""
    full = {"model": get_model_state_dict(model, options=FULL), "optim": get_optimizer_state_dict(model, opt, options=FULL)}
    rngs: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, {"torch": torch.get_rng_state(), "python": random.getstate(),
                                  "numpy": np.random.get_state()[1].tolist()})
    if fabric.global_rank == 0:
        torch.save({**full, "sched": sched.state_dict(), "step": step, "rng": rngs}, path)


def main() -> None:
    strategy: Any
    if args.fsdp1:
        strategy = (AsyncckptFabricFSDPStrategy if args.strategy == "asyncckpt" else FSDPStrategy)(state_dict_type="sharded")
        fabric = Fabric(accelerator="cuda", devices=min(2, torch.cuda.device_count()), strategy=strategy)
    else:
        cls = AsyncckptFabricModelParallelStrategy if args.strategy == "asyncckpt" else ModelParallelStrategy
        strategy = cls(parallelize, data_parallel_size=2, tensor_parallel_size=1)
        fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 4))
    model = fabric.setup_module(model)
    opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=3, gamma=0.5)
    rank = fabric.global_rank
    if args.raise_at_end and rank == 1:  # runs after the strategy's exit hook (atexit: last in, first out)
        atexit.register(lambda: open(os.path.join(args.out, "rank1-exited"), "w").close())
    torch.manual_seed(100 + rank)  # every rank its own streams (a resume restores them)
    random.seed(200 + rank)
    np.random.seed(300 + rank)
    ckpt = os.path.join(args.out, "ckpts", "last")
    start = 0
    if args.resume:
        untouched = torch.get_rng_state()
        try:  # strict (the default): a requested key the checkpoint lacks is refused, the RNG state left alone
            fabric.load(ckpt, {"model": model, "optimizer": opt, "absent": None})
        except KeyError as exc:
            assert "'absent'" in str(exc), exc
        else:
            raise AssertionError("a strict fabric.load of a key the checkpoint lacks did not raise")
        assert torch.equal(torch.get_rng_state(), untouched)
        state: dict[str, Any] = {"model": model, "optimizer": opt, "scheduler": None, "step": 0}
        rest = fabric.load(ckpt, state)
        assert rest == {"note": "kept"}, rest  # what state did not ask for comes back
        sched.load_state_dict(state["scheduler"])  # Fabric returns a stateful's state dict under its key
        start = state["step"]
        snapshot(fabric, model, opt, sched, start, os.path.join(args.out, "restored.pt"))
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 16, generator=g).to(fabric.device), torch.randn(8, 4, generator=g).to(fabric.device)
        noise = torch.randn_like(x) * 0.01 + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        loss = torch.nn.functional.mse_loss(model(x + noise), y)
        fabric.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        done = step + 1
        if done % args.every:
            continue
        if done == args.kill_at:
            strategy.asyncckpt_collect(blocking=True)  # the previous save committed (collective), then one in flight
        fabric.save(ckpt, {"model": model, "optimizer": opt, "scheduler": sched, "step": done, "note": "kept"})
        if done == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    snapshot(fabric, model, opt, sched, args.steps, os.path.join(args.out, "final.pt"))
    if rank == 1 and args.exit_skew:
        time.sleep(args.exit_skew)
    if args.raise_at_end and rank == 0:
        raise RuntimeError("rank 0 fails after its last save")


if __name__ == "__main__":
    main()
    sys.exit(0)
