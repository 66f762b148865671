"""A small training job driven by CheckpointManager, run as a subprocess by the manager tests.

It trains an MLP with dropout on a shuffled DataLoader (ResumableSampler), with NumPy and
Python randomness in the step too, so an exact resume needs every piece of saved state.
Prints ``START s``, ``STEP s``, ``COMMITTED s``, ``PREEMPTED s REASON`` lines (flushed).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np
import torch

import asyncckpt


def build(seed: int) -> dict:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) ** 2) * 0.1
    ds = torch.utils.data.TensorDataset(x, y)
    sampler = asyncckpt.ResumableSampler(ds, seed=seed)
    # Its own generator: creating an iterator must not draw from the global RNG.
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, generator=torch.Generator())
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    return {"model": model, "opt": opt, "sched": sched, "sampler": sampler, "loader": loader}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--every", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="torch.save final params, optimizer state and losses here")
    ap.add_argument("--announce-commit", type=int, default=None, help="after this step's save commits, print COMMITTED")
    ap.add_argument("--hold-at", type=int, default=None, help="stop training at this step and sleep until killed")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step")
    ap.add_argument("--pause-check", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    b = build(args.seed)
    model, opt, sched, sampler, loader = b["model"], b["opt"], b["sched"], b["sampler"], b["loader"]
    mgr = asyncckpt.CheckpointManager(args.root, every_steps=args.every, keep_last=3, pause_check_s=args.pause_check)
    state = {"model": model, "optim": opt, "sched": sched, "sampler": sampler}
    start = mgr.restore(state)
    print(f"START {start}", flush=True)
    losses: dict[int, float] = {}
    step = start
    while step < args.total and not mgr.preempted:
        for x, y in loader:
            noise = torch.from_numpy(np.random.standard_normal(x.shape).astype(np.float32))
            scale = 1.0 + 0.01 * random.random()
            loss = torch.nn.functional.mse_loss(model(x + 0.01 * noise) * scale, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses[step] = loss.item()
            print(f"STEP {step}", flush=True)
            mgr.maybe_save(step, state)
            if mgr.preempted:
                print(f"PREEMPTED {step} {mgr.preempt_reason}", flush=True)
                break
            if args.announce_commit == step:
                mgr.wait()
                print(f"COMMITTED {step}", flush=True)
            if args.hold_at is not None and step >= args.hold_at:
                print("HOLDING", flush=True)
                while True:
                    time.sleep(1)
            if step >= args.total:
                break
            if args.sleep:
                time.sleep(args.sleep)
    mgr.close()
    if args.out:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "losses": losses, "start": start}, args.out)
    print("EXIT", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
