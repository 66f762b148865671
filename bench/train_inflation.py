"""Step-time inflation of an examples/train.py-like loop: CheckpointManager saving every N steps vs none.

    python bench/train_inflation.py [--steps 300] [--every 50] [--repeats 5] [--width 256 1024]

For each model width, runs alternate between "none" (no checkpointing) and "manager"
(CheckpointManager(every_steps=N), saves to a local temp dir, keep_last=2). Each run times
every training step (forward, backward, optimizer step, scheduler step and — in "manager" —
maybe_save) after ``mgr.warm_up(state)`` (as examples/train.py: the worker is up before the loop) and
a warm-up of one save interval (the first save moves the tensors into shared memory once). A save's cost lands on the step that asks for it, on the next optimizer step
(which waits for the snapshot) and on the step that commits it, so the figure that matters is
the mean step time. Reported per configuration (medians over runs): mean, median and worst
step; "excess" = time above the run's own median step (checkpoint work plus noise; the "none"
runs measure the noise); time spent inside maybe_save. Inflation = mean(manager)/mean(none) - 1
(median over interleaved run pairs), and a noise-robust estimate: (excess(manager) -
excess(none)) / median step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import asyncckpt


def make(width: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(4096, 64)
    y = (x[:, :8].sum(dim=1, keepdim=True) ** 2) * 0.1
    data = torch.utils.data.TensorDataset(x, y)
    sampler = asyncckpt.ResumableSampler(data, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=128, sampler=sampler, generator=torch.Generator())
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
    return {"model": model, "optim": opt, "sched": sched, "sampler": sampler, "loader": loader}


def run(width: int, steps: int, every: int, with_manager: bool) -> dict:
    parts = make(width)
    state = {k: parts[k] for k in ("model", "optim", "sched", "sampler")}
    times: list[float] = []
    in_mgr = 0.0
    with tempfile.TemporaryDirectory(prefix="asyncckpt-bench-") as root:
        mgr = asyncckpt.CheckpointManager(root, every_steps=every, keep_last=2, signals=()) if with_manager else None
        if mgr is not None:
            mgr.warm_up(state)  # as examples/train.py: the worker's start is not paid inside the loop
        try:
            step = 0
            warm = every  # not timed: the first save moves the state into shared memory once
            while step < warm + steps:
                for x, y in parts["loader"]:
                    t0 = time.perf_counter()
                    loss = torch.nn.functional.mse_loss(parts["model"](x), y)
                    parts["optim"].zero_grad()
                    loss.backward()
                    parts["optim"].step()
                    parts["sched"].step()
                    step += 1
                    if mgr is not None:
                        t1 = time.perf_counter()
                        mgr.maybe_save(step, state)
                        if step > warm:
                            in_mgr += time.perf_counter() - t1
                    dt = time.perf_counter() - t0
                    if step > warm:
                        times.append(dt)
                    if step >= warm + steps:
                        break
            t_close = time.perf_counter()
            saves = 0
            if mgr is not None:
                mgr.close()
                saves = mgr.saves_committed
            close_s = time.perf_counter() - t_close
        finally:
            if mgr is not None:
                mgr.close()
    nbytes = sum(t.numel() * t.element_size() for t in parts["model"].state_dict().values())
    med = statistics.median(times)
    return {
        "mean_ms": 1e3 * statistics.fmean(times),
        # time above the run's own median step: checkpoint work plus noise (the "none" runs give the noise)
        "excess_ms_per_100": 1e5 * sum(max(0.0, t - med) for t in times) / len(times),
        "in_maybe_save_ms_per_100": 1e5 * in_mgr / len(times),
        "median_ms": 1e3 * statistics.median(times),
        "max_ms": 1e3 * max(times),
        "saves": saves,
        "close_s": close_s,
        "model_mib": nbytes / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--width", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine has 2 cores)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {args.steps} timed steps per run, save every {args.every} (manager), {args.repeats} runs per config, "
          f"torch threads {args.threads}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, torch {torch.__version__}")
    results = []
    for width in args.width:
        runs: dict[str, list[dict]] = {"none": [], "manager": []}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            runs["none"].append(run(width, args.steps, args.every, False))
            runs["manager"].append(run(width, args.steps, args.every, True))
        keys = ("mean_ms", "median_ms", "max_ms", "close_s", "excess_ms_per_100", "in_maybe_save_ms_per_100")
        med = {k: {m: statistics.median(r[m] for r in v) for m in keys} for k, v in runs.items()}
        per_run = [m["mean_ms"] / n["mean_ms"] - 1 for m, n in zip(runs["manager"], runs["none"])]
        inflation = statistics.median(per_run)
        # Robust estimate: checkpointing's extra time per step over the noise floor, relative to a typical step.
        extra = (med["manager"]["excess_ms_per_100"] - med["none"]["excess_ms_per_100"]) / 100
        robust = extra / med["none"]["median_ms"]
        mib = runs["none"][0]["model_mib"]
        state_mib = 3 * mib  # parameters + AdamW's two moments
        print(f"\nwidth {width}: model {mib:.2f} MiB, saved state ~{state_mib:.1f} MiB, "
              f"{runs['manager'][0]['saves']} saves per manager run")
        print(f"  {'config':8} {'mean ms':>8} {'median ms':>10} {'max ms':>8} {'excess ms/100 steps':>20} "
              f"{'in maybe_save ms/100 steps':>27}")
        for k in ("none", "manager"):
            m = med[k]
            print(f"  {k:8} {m['mean_ms']:8.3f} {m['median_ms']:10.3f} {m['max_ms']:8.2f} "
                  f"{m['excess_ms_per_100']:20.1f} {m['in_maybe_save_ms_per_100']:27.1f}")
        print(f"  inflation of the mean step time (median of run pairs): {100 * inflation:+.1f}% "
              f"(pairs: {', '.join(f'{100 * p:+.1f}%' for p in per_run)})")
        print(f"  excess over each run's median step, manager minus none: {extra:.3f} ms per step "
              f"= {100 * robust:+.1f}% of a median step")
        print(f"  manager close (final blocking finalize + worker stop): {med['manager']['close_s']:.2f} s")
        results.append({"width": width, "model_mib": mib, "runs": runs, "median": med, "inflation": inflation,
                        "excess_inflation": robust})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
