"""First measurement of the core path: how long `save()` blocks and how long the trainer waits
for the snapshot, next to plain `torch.save` of the same state dict (medians of --reps).

    python bench/core_save.py [--size-mib 1024] [--tensors 16] [--reps 3] [--dir /tmp/asyncckpt-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

import asyncckpt


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/asyncckpt-bench")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    n = args.size_mib * (1 << 20) // 4 // args.tensors
    state = {f"layer{i}.weight": torch.randn(n) for i in range(args.tensors)}
    nbytes = n * 4 * args.tensors
    rows: dict[str, list[float]] = {k: [] for k in ("save_call", "snapshot_wait", "blocked", "durable", "torch_save", "torch_save_fsync")}
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save(state, f"{args.dir}/warmup")  # first save moves storages to shared memory
        ck.finalize(blocking=True)
        for r in range(args.reps):
            print(f"rep {r + 1}/{args.reps}", file=sys.stderr)
            t0 = time.perf_counter()
            ck.save(state, f"{args.dir}/a{r}")
            t1 = time.perf_counter()
            ck.wait_snapshot()
            t2 = time.perf_counter()
            ck.finalize(blocking=True)
            t3 = time.perf_counter()
            rows["save_call"].append(t1 - t0)
            rows["snapshot_wait"].append(t2 - t1)
            rows["blocked"].append(t2 - t0)
            rows["durable"].append(t3 - t0)
            p = f"{args.dir}/t{r}.pt"
            t0 = time.perf_counter()
            torch.save(state, p)
            t1 = time.perf_counter()
            fsync_file(p)
            rows["torch_save"].append(t1 - t0)
            rows["torch_save_fsync"].append(time.perf_counter() - t0)
            shutil.rmtree(f"{args.dir}/a{r}")
            os.unlink(p)
    print(f"state: {nbytes / 2**20:.0f} MiB float32 in {args.tensors} tensors, {args.reps} reps (median [min..max])")
    for k, v in rows.items():
        print(f"  {k:18s} {statistics.median(v):8.3f} s  [{min(v):.3f}..{max(v):.3f}]")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
