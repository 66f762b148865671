"""A tiny training loop driven like torchtitan's ``Trainer.train`` / ``train_step`` on CPU.

    python torchtitan_train.py OUT_DIR [--manager asyncckpt|stock] [--kill-at STEP] [--steps N] [--no-verify]
        [--keep-latest-k K]

torchtitan's own components build everything: the optimizer (``OptimizersContainer.Config``),
the LR scheduler (``LRSchedulersContainer.Config``, warmup + decay) and the checkpoint manager
(``config.checkpoint.build(...)`` with the arguments its Trainer passes). The step order is the
Trainer's: ``checkpointer.load`` once, then per step forward/backward, ``maybe_wait_for_staging``,
``optimizers.step``, ``lr_schedulers.step``, ``checkpointer.save(step, last_step=...)``.
``--kill-at S`` SIGKILLs the process right after the save scheduled at step S. Writes
OUT_DIR/final.pt: model, optimizer, scheduler, data position and RNG state.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig

from asyncckpt.integrations.checkpoint_io import capture_rng
from asyncckpt.integrations.torchtitan import AsyncckptCheckpointManager

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--manager", choices=["asyncckpt", "stock"], default="asyncckpt")
p.add_argument("--kill-at", type=int, default=-1)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--no-verify", action="store_true")
p.add_argument("--keep-latest-k", type=int, default=3)
args = p.parse_args()
os.makedirs(args.out, exist_ok=True)
torch.set_num_threads(1)
torch.manual_seed(0)
random.seed(0)
np.random.seed(0)
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
dist.init_process_group("gloo", init_method=f"file://{os.path.join(args.out, 'pg')}", rank=0, world_size=1)


class TrainState:
    """What torchtitan's Trainer saves as ``train_state``."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])


class Batches:
    """A stateful data source (torchtitan's dataloader is checkpointed the same way)."""

    def __init__(self) -> None:
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + self.pos)
        self.pos += 1
        return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.pos = int(sd["pos"])


model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 4))
optimizers = OptimizersContainer.Config(
    param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})],
    implementation="for-loop",
).build(model_parts=[model])
lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=args.steps)
train_state = TrainState()
data = Batches()

common = {"enable": True, "folder": "ckpt", "interval": 2, "keep_latest_k": args.keep_latest_k, "last_save_model_only": False,
          "initial_load_model_only": False}
# The one line that selects asyncckpt (the Trainer reads it from config.checkpoint):
checkpoint_config = (AsyncckptCheckpointManager.Config(**common, verify=not args.no_verify)
                     if args.manager == "asyncckpt" else CheckpointManager.Config(**common))
checkpointer = checkpoint_config.build(dataloader=data, model_parts=[model], optimizers=optimizers,
                                       lr_schedulers=lr_schedulers, states={"train_state": train_state},
                                       sd_adapter=None, base_folder=args.out)
if args.manager == "stock":  # the synchronous reference keeps the RNG state the same way
    from asyncckpt.integrations.torchtitan import RNG_STATE_KEY, RngState

    checkpointer.states[RNG_STATE_KEY] = RngState()

checkpointer.load(step=-1)
print(f"resumed at step {train_state.step}", flush=True)
while train_state.step < args.steps:
    train_state.step += 1
    x, y = data.next()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    checkpointer.maybe_wait_for_staging()
    optimizers.step()
    lr_schedulers.step()
    optimizers.zero_grad()
    checkpointer.save(train_state.step, last_step=train_state.step == args.steps)
    if train_state.step == args.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-run: this step's save is still in flight
checkpointer.close()
torch.save({"model": model.state_dict(), "optim": optimizers.state_dict(), "sched": lr_schedulers.state_dict(),
            "data": data.state_dict(), "step": train_state.step, "rng": capture_rng()},
           os.path.join(args.out, "final.pt"))
dist.destroy_process_group()
sys.exit(0)
