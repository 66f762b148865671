"""Loop time per save at Lightning's ``CheckpointIO`` hook: asyncckpt vs Lightning's own options.

    python bench/integrations.py [--mib 128 1024] [--saves 3] [--dir DIR]

For each state size and each plug-in (interleaved, one unreported warm-up save each), a Lightning-
shaped checkpoint (``state_dict`` + Adam-like ``optimizer_states``, float32) is saved ``--saves``
times; between saves every tensor is changed in place, as a training step would. "blocked" is the
``save_checkpoint`` call (what the loop loses at the hook), "durable" is until the file is on disk
(``teardown``). Plug-ins: ``torch_io`` (Lightning's default ``TorchCheckpointIO``, synchronous),
``lightning_async`` (Lightning's ``AsyncCheckpointIO``: clones on the caller's thread, writes from
a thread), ``asyncckpt`` (``AsyncckptCheckpointIO``, snapshot="blocking").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch


def make_state(mib: int) -> dict[str, Any]:
    n = (mib << 20) // 4 // 3  # params, exp_avg, exp_avg_sq
    rows = max(1, n // 4096)
    w = torch.randn(rows, 4096)
    return {"state_dict": {"w": w}, "optimizer_states": [{"state": {0: {"exp_avg": torch.randn_like(w),
            "exp_avg_sq": torch.rand_like(w), "step": torch.tensor(1.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}],
            "epoch": 0, "global_step": 0}


def mutate(state: dict[str, Any]) -> None:
    state["state_dict"]["w"].add_(1e-3)
    for t in state["optimizer_states"][0]["state"][0].values():
        t.add_(1e-3)


def plugins() -> dict[str, Callable[[], Any]]:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

    from asyncckpt.integrations.lightning import AsyncckptCheckpointIO

    return {"torch_io": TorchCheckpointIO, "lightning_async": lambda: AsyncCheckpointIO(TorchCheckpointIO()),
            "asyncckpt": lambda: AsyncckptCheckpointIO(rng=False)}


def run_one(make: Callable[[], Any], state: dict[str, Any], root: str, saves: int) -> tuple[list[float], float]:
    io = make()
    io.save_checkpoint(state, os.path.join(root, "warmup.ckpt"))  # worker start / thread pool: not reported
    io.teardown() if not hasattr(io, "pending") else io.collect(blocking=True)
    blocked = []
    t_all = time.perf_counter()
    for i in range(saves):
        mutate(state)
        t0 = time.perf_counter()
        io.save_checkpoint(state, os.path.join(root, "last.ckpt" if i % 2 else f"step-{i}.ckpt"))
        blocked.append(time.perf_counter() - t0)
    if hasattr(io, "collect"):
        io.collect(blocking=True)  # every file written (asyncckpt); not counting the worker's shutdown below
        total = time.perf_counter() - t_all
        io.teardown()
    else:
        io.teardown()  # Lightning's: joins the writer thread (AsyncCheckpointIO) or nothing (TorchCheckpointIO)
        total = time.perf_counter() - t_all
    return blocked, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    makers = plugins()
    print("| state | plug-in | blocked per save, ms (median, min-max) | durable, s (all saves) |")
    print("| --- | --- | --- | --- |")
    for mib in args.mib:
        state = make_state(mib)
        for name, make in makers.items():
            root = tempfile.mkdtemp(prefix=f"bench-integ-{name}-", dir=args.dir)
            try:
                blocked, total = run_one(make, state, root, args.saves)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            ms = [b * 1000 for b in blocked]
            print(f"| {mib} MiB | {name} | {statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f}) | {total:.2f} |", flush=True)


if __name__ == "__main__":
    main()
