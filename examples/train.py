"""Train a small model on CPU with a CheckpointManager, stop, then resume from `latest`.

    python examples/train.py [--dir ckpts] [--steps 60] [--every 10]

Phase 1 trains for half the steps; the manager saves every `--every` steps without stalling
the loop (keeping the last 3). Phase 2 starts over with a fresh model, optimizer, scheduler and
data order (as after a restart): `restore` loads the newest complete checkpoint in place, RNG
state included, and training continues from the step after it.
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch

import asyncckpt


def make(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2048, 64, generator=g)
    y = (x[:, :8].sum(dim=1, keepdim=True) ** 2) * 0.1
    data = torch.utils.data.TensorDataset(x, y)
    sampler = asyncckpt.ResumableSampler(data, seed=seed)  # its position is saved too
    loader = torch.utils.data.DataLoader(data, batch_size=128, sampler=sampler, generator=torch.Generator())
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    return {"model": model, "optim": opt, "sched": sched, "sampler": sampler, "loader": loader}


def train(root: str, stop: int, every: int, parts: dict) -> tuple[int, float]:
    state = {k: parts[k] for k in ("model", "optim", "sched", "sampler")}
    loss = torch.tensor(0.0)
    with asyncckpt.CheckpointManager(root, every_steps=every, keep_last=3) as mgr:
        step = start = mgr.restore(state)  # 0 when the root holds no checkpoint
        print(f"  starting at step {start}" + (f" (restored {mgr.path_for(start)})" if start else ""))
        mgr.warm_up(state)  # optional: the worker's start (1-2 s) happens here, not during an early save
        while step < stop:
            for x, y in parts["loader"]:
                loss = torch.nn.functional.mse_loss(parts["model"](x), y)
                parts["optim"].zero_grad()
                loss.backward()
                parts["optim"].step()  # waits for a pending snapshot (usually already taken)
                parts["sched"].step()
                step += 1
                t0 = time.perf_counter()
                if mgr.maybe_save(step, state) is not None:
                    print(f"  step {step:4d}  loss {loss.item():.4f}  save returned in {1e3 * (time.perf_counter() - t0):.1f} ms")
                if mgr.preempted or step >= stop:
                    break
            if mgr.preempted:
                break
    # leaving the `with` block: every save is durable and committed, retention applied
    return start, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="ckpts")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    torch.set_num_threads(min(4, torch.get_num_threads()))

    half = args.steps // 2
    print(f"phase 1: training steps 0..{half}, checkpoint every {args.every} steps into {args.dir}/")
    parts = make()
    train(args.dir, half, args.every, parts)
    reference = {k: v.clone() for k, v in parts["model"].state_dict().items()}
    listed = asyncckpt.list_checkpoints(args.dir)
    print("  on disk: " + ", ".join(c.name + (" (latest)" if c.is_latest else "") for c in listed))
    saved = asyncckpt.load(args.dir)["model"]  # the root's `latest`, every checksum verified
    same = all(torch.equal(saved[k], v) for k, v in reference.items())
    print(f"  {listed[0].name} holds exactly the phase-1 weights: {same}")

    print("phase 2: fresh model, optimizer, scheduler and data order (as after a restart)")
    parts = make(seed=1)  # deliberately different: everything must come from the checkpoint
    start, final = train(args.dir, args.steps, args.every, parts)
    expected = half - half % args.every
    assert start == expected, f"resumed at {start}, expected {expected}"
    print(f"done: trained to step {args.steps}, final loss {final:.4f}; continued from step {start} as expected")


if __name__ == "__main__":
    main()
