"""CPU the worker process spends per save, and the trainer per saving ``maybe_save`` (issue 13): on a
machine whose cores the trainer uses, every millisecond of the worker's is taken from training in the
steps after a save.

    python bench/worker_cpu.py [--tensors 1000 10000 50000] [--saves 8]
    python bench/worker_cpu.py --model [--saves 100] [--every 50]

For each N: a ``CheckpointManager(every_steps=1, keep_last=2)`` saves a state of N tensors of 16
float32 (3 saves to warm up, then ``--saves`` saves, each waited for); the worker's user + system
CPU time over those saves (``/proc/PID/stat``, Linux only) divided by the saves. CPU time, unlike
wall-clock time, hardly depends on what else runs on the machine; the load average is printed anyway.

``--model``: the examples/train.py model (MLP + AdamW + cosine schedule, ~1 MiB, 27 tensors) trained
by a loop with a ``CheckpointManager(every_steps=--every, keep_last=2)`` on local disk. Per save: the
trainer thread's CPU time inside the ``maybe_save`` call that saves (``time.thread_time``; the loop
first waits until no save is in flight, so no wait for a slot is counted), and the worker's CPU time
from that call to the next save (every thread's ``/proc/PID/task/TID/schedstat``, nanoseconds), less
the CPU the idle worker uses over the same time (measured before the saves). Medians over the saves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import asyncckpt


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads_cpu_s(pid: int) -> float:
    """CPU seconds of the live threads of ``pid`` (nanosecond resolution)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # the thread ended meanwhile
            pass
    return total / 1e9


def per_save(n: int, saves: int) -> tuple[float, float]:
    """(worker CPU seconds per save, median seconds ``maybe_save`` blocked) for a state of ``n`` tensors."""
    state = {f"layer{i}.weight": torch.randn(16) for i in range(n)}
    blocked = []
    with tempfile.TemporaryDirectory() as root, \
            asyncckpt.CheckpointManager(root, every_steps=1, keep_last=2, signals=()) as mgr:
        for step in range(1, 4):
            mgr.maybe_save(step, state)
            mgr.wait()
        pid = mgr.ckpt.queue.worker_pid
        c0 = _cpu_s(pid)
        for step in range(4, 4 + saves):
            t0 = time.perf_counter()
            mgr.maybe_save(step, state)
            blocked.append(time.perf_counter() - t0)
            mgr.wait()
        used = _cpu_s(pid) - c0
    blocked.sort()
    return used / saves, blocked[len(blocked) // 2]


def model_loop(saves: int, every: int) -> tuple[list[float], list[float], float]:
    """(trainer CPU s per saving maybe_save, worker CPU s per save cycle, idle worker CPU s per s)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    x, y = torch.randn(128, 64), torch.randn(128, 1)

    def train_step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    trainer: list[float] = []
    worker: list[float] = []
    state = {"model": model, "optim": opt, "sched": sched}
    with tempfile.TemporaryDirectory() as root, \
            asyncckpt.CheckpointManager(root, every_steps=every, keep_last=2, signals=()) as mgr:
        step = 0
        pid = 0
        w0 = t_mark = 0.0
        idle = 0.0
        for k in range(saves + 4):
            for _ in range(every - 1):
                train_step()
                step += 1
                mgr.maybe_save(step, state)
            mgr.wait()  # the previous cycle is over: no wait for a slot below
            if k == 3:
                pid = mgr.ckpt.queue.worker_pid or 0
                time.sleep(0.2)
                a, t = _threads_cpu_s(pid), time.perf_counter()
                time.sleep(1.0)
                idle = (_threads_cpu_s(pid) - a) / (time.perf_counter() - t)
            elif k > 3:
                worker.append(_threads_cpu_s(pid) - w0 - idle * (time.perf_counter() - t_mark))
            train_step()
            step += 1
            w0, t_mark = (_threads_cpu_s(pid), time.perf_counter()) if pid else (0.0, 0.0)
            c0 = time.thread_time()
            handle = mgr.maybe_save(step, state)
            c1 = time.thread_time()
            assert handle is not None
            if k >= 4:
                trainer.append(c1 - c0)
    return trainer[:saves], worker, idle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--saves", type=int, default=None, help="saves measured (default 8; 100 with --model)")
    p.add_argument("--model", action="store_true", help="the examples/train.py model in a training loop")
    p.add_argument("--every", type=int, default=50, help="with --model: a save every this many steps")
    args = p.parse_args()
    print(f"load average at start {os.getloadavg()}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    if args.model:
        torch.set_num_threads(1)
        trainer, worker, idle = model_loop(args.saves or 100, args.every)
        q = statistics.quantiles
        print(f"examples/train.py model, a save every {args.every} steps, {len(trainer)} saves:")
        print(f"  trainer CPU per saving maybe_save: median {statistics.median(trainer) * 1e3:.3f} ms "
              f"(quartiles {', '.join(f'{v * 1e3:.3f}' for v in q(trainer, n=4))})")
        print(f"  worker CPU per save cycle:         median {statistics.median(worker) * 1e3:.2f} ms "
              f"(quartiles {', '.join(f'{v * 1e3:.2f}' for v in q(worker, n=4))}; idle worker "
              f"{idle * 1e3:.2f} ms per s, subtracted)")
    else:
        for n in args.tensors:
            cpu, blocked = per_save(n, args.saves or 8)
            print(f"{n:>7,} tensors: worker CPU per save {cpu * 1e3:8.1f} ms; maybe_save blocked (median) "
                  f"{blocked * 1e3:7.1f} ms", flush=True)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
