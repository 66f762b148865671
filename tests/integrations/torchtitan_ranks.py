"""torchtitan's manager on gloo ranks (run by ``tests._dist.run_ranks``): a replicated model whose
gradients are averaged across ranks, each rank with its own RNG stream."""

from __future__ import annotations

import copy
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def _build(rank: int, folder: str, seed: int) -> tuple[Any, Any, Any, Any]:
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    from asyncckpt.integrations.torchtitan import AsyncckptCheckpointManager

    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Dropout(0.3), torch.nn.Linear(64, 4))
    optimizers = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})],
        implementation="for-loop",
    ).build(model_parts=[model])
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=6)
    torch.manual_seed(seed + rank)  # each rank's own dropout stream from here on
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    ckpt = AsyncckptCheckpointManager.Config(enable=True, folder="ckpt", interval=2, keep_latest_k=0,
                                             last_save_model_only=False, initial_load_model_only=False).build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=lr_schedulers, states={},
        sd_adapter=None, base_folder=folder)
    return model, optimizers, lr_schedulers, ckpt


def _snapshot(model: Any, optimizers: Any, lr_schedulers: Any) -> dict[str, Any]:
    return copy.deepcopy({"model": model.state_dict(), "optim": optimizers.state_dict(),
                          "sched": lr_schedulers.state_dict(), "torch_rng": torch.get_rng_state(),
                          "py_rng": random.getstate()})


def _equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def train_save_reload(rank: int, world: int, folder: str) -> dict[str, Any]:
    model, optimizers, lr_schedulers, ckpt = _build(rank, folder, seed=7)
    at: dict[int, dict[str, Any]] = {}
    for step in range(1, 7):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        ckpt.maybe_wait_for_staging()
        optimizers.step()
        lr_schedulers.step()
        optimizers.zero_grad()
        ckpt.save(step, last_step=step == 6)
        at[step] = _snapshot(model, optimizers, lr_schedulers)
    ckpt.close()
    dist.barrier()
    steps = sorted(int(d[5:]) for d in os.listdir(os.path.join(folder, "ckpt")))
    for step in (4, 6):  # a fresh process state restored by torchtitan's load, per rank
        model, optimizers, lr_schedulers, fresh = _build(rank, folder, seed=99)
        assert fresh.load(step=step)
        _equal(_snapshot(model, optimizers, lr_schedulers), at[step], f"rank {rank} step {step}")
        fresh.close()
    return {"steps": steps}
