"""What snapshot safety costs (issue 11): the guard per save, and how long a blocking save blocks.

    python bench/snapshot_cost.py [--sizes 256 1024] [--repeats 5] [--json OUT]

1. **guard cost**: recording every tensor's in-place version counter at ``save()`` and judging it
   at the next sync point, for 10 and 10,000 tensors (median of many rounds, microseconds).
2. **blocked time of a blocking save**: ``AsyncCheckpointer(snapshot="blocking").save`` and
   ``TorchAsyncCheckpoint.async_save`` (nvidia-resiliency-ext's contract: returns after the copy)
   next to ``torch.distributed.checkpoint.async_save`` (returns after staging the state), same
   state, same run, for each size in MiB; nvidia-resiliency-ext itself when it runs here (it needs
   CUDA: on a CPU-only machine it is reported as not run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import asyncckpt
from asyncckpt.staging import SnapshotGuard


def guard_cost(n: int, rounds: int = 200) -> dict[str, float]:
    tensors = [(f"t{i}", torch.zeros(4)) for i in range(n)]
    make, judge = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        g = SnapshotGuard(tensors)
        t1 = time.perf_counter()
        g.changed()
        t2 = time.perf_counter()
        make.append(t1 - t0)
        judge.append(t2 - t1)
    return {"record_us": 1e6 * statistics.median(make), "judge_us": 1e6 * statistics.median(judge)}


def state_of(mib: int) -> dict[str, torch.Tensor]:
    n = 16
    return {f"w{i}": torch.randn(mib * (1 << 20) // 4 // n) for i in range(n)}


def blocked(root: str, mib: int, repeats: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    sd = state_of(mib)
    out: dict[str, Any] = {}
    with asyncckpt.AsyncCheckpointer(snapshot="blocking") as ck:
        ck.save(sd, f"{root}/warm", overwrite=True)
        ck.finalize(blocking=True)
        ts = []
        for i in range(repeats):
            t0 = time.perf_counter()
            ck.save(sd, f"{root}/ac{i % 2}", overwrite=True)
            ts.append(time.perf_counter() - t0)
            ck.finalize(blocking=True)
    out["AsyncCheckpointer(snapshot='blocking').save"] = ts
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save(sd, f"{root}/warm.pt")
        tac.finalize_async_save(blocking=True)
        ts = []
        for i in range(repeats):
            t0 = time.perf_counter()
            tac.async_save(sd, f"{root}/tac{i % 2}.pt")
            ts.append(time.perf_counter() - t0)
            tac.finalize_async_save(blocking=True)
    out["TorchAsyncCheckpoint.async_save"] = ts
    ts = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=f"{root}/dcp{i % 2}")
        dt = time.perf_counter() - t0
        fut.result()
        if i:
            ts.append(dt)
    out["dcp.async_save"] = ts
    try:
        import nvidia_resiliency_ext  # noqa: F401

        if not torch.cuda.is_available():
            raise RuntimeError("it calls torch.cuda.synchronize() in async_save: needs CUDA")
        from nvidia_resiliency_ext.checkpointing.async_ckpt.torch_ckpt import TorchAsyncCheckpoint as NvTac

        nv = NvTac()
        ts = []
        for i in range(repeats):
            t0 = time.perf_counter()
            nv.async_save(sd, f"{root}/nv{i % 2}.pt")
            ts.append(time.perf_counter() - t0)
            nv.finalize_async_save(blocking=True)
        nv.close()
        out["nvidia-resiliency-ext TorchAsyncCheckpoint.async_save"] = ts
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        out["nvidia-resiliency-ext"] = f"not run: {type(exc).__name__}: {exc}"
    return {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", type=int, default=[256, 1024], help="state sizes in MiB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    res: dict[str, Any] = {"load_average_start": os.getloadavg()}
    res["guard"] = {str(n): guard_cost(n) for n in (10, 10_000)}
    print("guard", json.dumps(res["guard"]), flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for mib in args.sizes:
            res[f"blocked_s[{mib} MiB]"] = blocked(tmp, mib, args.repeats)
            print(mib, json.dumps(res[f"blocked_s[{mib} MiB]"]), flush=True)
    res["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
