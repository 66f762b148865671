"""A training job that survives preemption: SIGTERM -> save at the step boundary -> exit 0 -> resume.

    python examples/preemptible.py [--dir ckpts-preempt] [--steps 400]     # then: kill -TERM <pid>
    python examples/preemptible.py --demo                                  # does the kill itself

The CheckpointManager's handlers (SIGTERM, SIGUSR1: what Kubernetes and SLURM's `--signal`
send) only set a flag. At the next `maybe_save` the manager saves whatever the policy, waits
until that checkpoint is committed, and sets `mgr.preempted`; the loop then exits with status
0. Running the script again resumes from exactly that step. `asyncckpt pause DIR` does the
same without a signal.

`--demo` runs the job as a child process, sends it SIGTERM at a random step, checks it exited
0 with a committed checkpoint at the step it reached, and starts it again to finish.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time

import torch

import asyncckpt


def job(root: str, steps: int, every: int, step_time: float) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = {"model": model, "optim": opt}
    with asyncckpt.CheckpointManager(root, every_steps=every, keep_last=2) as mgr:
        start = mgr.restore(state)
        print(f"pid {os.getpid()}: {'resuming at' if start else 'starting at'} step {start} of {steps}", flush=True)
        step = start
        while step < steps:
            x = torch.randn(64, 32)
            loss = (model(x) - x[:, :1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            print(f"step {step} loss {loss.item():.4f}", flush=True)
            mgr.maybe_save(step, state)
            if mgr.preempted:
                print(f"preempted by {mgr.preempt_reason}: step {step} is committed; exiting 0", flush=True)
                return 0
            time.sleep(step_time)  # stands for real work
    print(f"finished all {steps} steps", flush=True)
    return 0


def demo(root: str, steps: int, every: int) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--dir", root, "--steps", str(steps), "--every", str(every)]
    target = random.randint(5, 25)
    print(f"demo: starting the job; it gets SIGTERM at step {target}")
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for line in child.stdout:
        print("  | " + line.rstrip())
        if line.startswith(f"step {target} "):
            t0 = time.monotonic()
            child.send_signal(signal.SIGTERM)
    rc = child.wait()
    print(f"demo: the job exited with status {rc} {time.monotonic() - t0:.1f} s after SIGTERM")
    latest = asyncckpt.list_checkpoints(root)[0]
    print(f"demo: latest committed checkpoint: {latest.name} (step {latest.step})")
    if rc != 0 or latest.step < target:
        print("demo: FAILED")
        return 1
    print("demo: starting the job again")
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = again.stdout.splitlines()
    for line in lines[:3] + (["  ..."] if len(lines) > 4 else []) + lines[-1:]:
        print("  | " + line)
    ok = again.returncode == 0 and f"resuming at step {latest.step} " in again.stdout
    print(f"demo: {'resumed from exactly step ' + str(latest.step) if ok else 'FAILED'}")
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="ckpts-preempt")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--step-time", type=float, default=0.05)
    ap.add_argument("--demo", action="store_true", help="send ourselves SIGTERM and show the resume")
    args = ap.parse_args()
    if args.demo:
        import shutil

        shutil.rmtree(args.dir, ignore_errors=True)
        sys.exit(demo(args.dir, min(args.steps, 60), args.every))
    sys.exit(job(args.dir, args.steps, args.every, args.step_time))


if __name__ == "__main__":
    main()
