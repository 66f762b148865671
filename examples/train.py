"""Train a small model on CPU with non-blocking checkpoints, stop, then resume from `latest`.

    python examples/train.py [--dir ckpts] [--steps 60] [--every 10]

Phase 1 trains for half the steps, saving every `--every` steps without stalling the loop.
Phase 2 (a fresh model and optimizer, as after a restart) loads the latest checkpoint and
continues from the step after it, and checks it picked up exactly where phase 1 stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

import asyncckpt


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(128, 64, generator=g)
    return x, (x[:, :8].sum(dim=1, keepdim=True) ** 2) * 0.1


def train(root: str, start: int, stop: int, every: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    loss = torch.tensor(0.0)
    with asyncckpt.AsyncCheckpointer(optimizers=opt) as ckpt:  # opt.step() waits for the snapshot
        for step in range(start, stop):
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done = step + 1
            if done % every == 0:
                t0 = time.perf_counter()
                ckpt.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": done},
                          f"{root}/step-{done:06d}", step=done)
                print(f"  step {done:4d}  loss {loss.item():.4f}  save() returned in {1e3 * (time.perf_counter() - t0):.1f} ms")
            for h in ckpt.finalize():  # non-blocking: commits what every rank finished
                print(f"  committed {h.name}")
    # leaving the `with` block: blocking finalize, every save is durable and committed
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="ckpts")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    torch.manual_seed(0)

    half = args.steps // 2
    print(f"phase 1: training steps 0..{half}, checkpoint every {args.every} steps into {args.dir}/")
    model, opt = make_model()
    train(args.dir, 0, half, args.every, model, opt)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    print("phase 2: fresh model and optimizer (as after a restart); restoring from the latest checkpoint")
    model, opt = make_model()
    state = asyncckpt.load(args.dir)  # a root resolves through its `latest` pointer; checksums verified
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    start = state["step"]
    assert start == half - half % args.every, f"resumed at {start}"
    same = all(torch.equal(model.state_dict()[k], v) for k, v in reference.items()) if start == half else True
    with open(os.path.join(args.dir, "latest")) as f:
        latest = json.load(f)["name"]
    print(f"  resumed from step {start} (latest -> {latest}); weights restored exactly: {same}")
    final = train(args.dir, start, args.steps, args.every, model, opt)
    print(f"done: trained to step {args.steps}, final loss {final:.4f}; continued from step {start} as expected")


if __name__ == "__main__":
    main()
