"""A tiny Accelerate loop checkpointed by asyncckpt.CheckpointManager (what docs/integrations.md shows).

    python accelerate_train.py OUT_DIR [--kill-at STEP] [--no-ckpt]

Writes OUT_DIR/final.pt at the end: model, optimizer, scheduler state and the RNG state.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
from accelerate import Accelerator

import asyncckpt

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--kill-at", type=int, default=-1)
p.add_argument("--no-ckpt", action="store_true")
p.add_argument("--steps", type=int, default=12)
args = p.parse_args()
os.makedirs(args.out, exist_ok=True)
torch.set_num_threads(1)
torch.manual_seed(0)

accelerator = Accelerator(cpu=True)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
state = {"model": model, "optim": optimizer, "sched": scheduler}

mgr = None if args.no_ckpt else asyncckpt.CheckpointManager(os.path.join(args.out, "ckpts"), every_steps=4, keep_last=2)
start = mgr.restore(state) if mgr is not None else 0
g = torch.Generator().manual_seed(1)
xs, ys = torch.randn(args.steps, 8, 16, generator=g), torch.randn(args.steps, 8, 4, generator=g)
for step in range(start, args.steps):
    if step == args.kill_at and mgr is not None:
        # Die once a checkpoint is committed. With one writer the worker commits by itself, without
        # finalize, once the trainer has confirmed the snapshot (the attached optimizer's next step
        # does that; here, not stepping any more, wait_snapshot() stands in for it).
        deadline = time.monotonic() + 60
        while not asyncckpt.list_checkpoints(os.path.join(args.out, "ckpts")) and time.monotonic() < deadline:
            mgr.wait_snapshot()
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    loss = torch.nn.functional.mse_loss(model(xs[step] + torch.randn(8, 16) * 0.01), ys[step])
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    if mgr is not None:
        mgr.maybe_save(step + 1, state)
if mgr is not None:
    mgr.close()
inner = accelerator.unwrap_model(model)
torch.save({"model": inner.state_dict(), "optim": optimizer.state_dict(), "sched": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state()}, os.path.join(args.out, "final.pt"))
sys.exit(0)
