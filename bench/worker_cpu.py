"""CPU the worker process spends per save (issue 13): on a machine whose cores the trainer uses, every
millisecond of it is taken from training in the steps after a save.

    python bench/worker_cpu.py [--tensors 1000 10000 50000] [--saves 8]

For each N: a ``CheckpointManager(every_steps=1, keep_last=2)`` saves a state of N tensors of 16
float32 (3 saves to warm up, then ``--saves`` saves, each waited for); the worker's user + system
CPU time over those saves (``/proc/PID/stat``, Linux only) divided by the saves. CPU time, unlike
wall-clock time, hardly depends on what else runs on the machine; the load average is printed anyway.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import asyncckpt


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--saves", type=int, default=8)
    args = p.parse_args()
    print(f"load average at start {os.getloadavg()}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    for n in args.tensors:
        cpu, blocked = per_save(n, args.saves)
        print(f"{n:>7,} tensors: worker CPU per save {cpu * 1e3:8.1f} ms; maybe_save blocked (median) "
              f"{blocked * 1e3:7.1f} ms", flush=True)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
