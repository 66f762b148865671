"""How long does a DCP save block the training loop? asyncckpt's async plan vs ``dcp.async_save``.

Spawns ``--world-size`` gloo ranks (127.0.0.1). Each rank holds ``--size-mib`` MiB of its own
DTensor shards (float32, ``--tensor-mib`` per tensor), so every rank writes its own data. For
each method, one warm-up save (worker / process start, one-time sharing) and then
``--reps`` timed saves; before each, the state is mutated in place (an optimizer step).

Blocked time = the save call + the wait before the state may be mutated again:

- ``asyncckpt``: ``asyncckpt.dcp.async_save(...)`` + ``handle.wait_snapshot()`` (DCP planning
  in the call; the worker copies the tensors into its staging memory)
- ``dcp-thread``: ``dcp.async_save(..., async_checkpointer_type=THREAD)`` (its default stager
  copies the state dict to CPU memory inside the call)
- ``dcp-process``: the same with ``AsyncCheckpointerType.PROCESS``

Between timed saves the previous one is completed (untimed), so saves do not overlap. The
table reports, per method, the median over reps of the slowest rank's blocked time, and the
median time until the checkpoint is complete.

    python bench/dcp_blocking.py --size-mib 1024 --json /tmp/dcp_blocking.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

METHODS = ("asyncckpt", "dcp-thread", "dcp-process")


def _state(world: int, size_mib: int, tensor_mib: int, seed: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    cols = 1024
    sd: dict[str, Any] = {}
    left = size_mib << 20
    i = 0
    while left > 0:
        nbytes = min(tensor_mib << 20, left)
        rows = max(1, nbytes // (4 * cols))
        local = torch.empty(rows, cols).uniform_(-1, 1, generator=g)
        sd[f"layer{i:03d}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        left -= rows * cols * 4
        i += 1
    sd["step"] = 0
    return sd


def _mutate(sd: dict[str, Any], step: int) -> None:
    for v in sd.values():
        if isinstance(v, torch.Tensor):
            v.to_local().add_(1.0)
    sd["step"] = step


def _save_once(method: str, sd: dict[str, Any], path: str) -> tuple[float, float, dict[str, float]]:
    """One save: (blocked seconds, seconds until complete, extra timings)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

    from asyncckpt.dcp import async_save

    extra: dict[str, float] = {}
    t0 = time.perf_counter()
    if method == "asyncckpt":
        h = async_save(sd, checkpoint_id=path)
        t_call = time.perf_counter()
        h.wait_snapshot()
        t1 = time.perf_counter()
        h.result()
        extra = {"call_s": t_call - t0, "snapshot_wait_s": t1 - t_call}
    else:
        kind = AsyncCheckpointerType.PROCESS if method == "dcp-process" else AsyncCheckpointerType.THREAD
        fut = dcp.async_save(sd, checkpoint_id=path, async_checkpointer_type=kind)
        if isinstance(fut, AsyncSaveResponse):  # a stager that stages in the background
            fut.staging_completion.result()
            fut = fut.upload_completion
        t1 = time.perf_counter()
        fut.result()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0, extra


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from asyncckpt.dcp import close_async_saves

    results: dict[str, Any] = {}
    try:
        for method in args.methods:
            sd = _state(world, args.size_mib, args.tensor_mib, seed=len(results))
            runs = []
            for rep in range(args.reps + 1):
                path = os.path.join(args.dir, f"{method}-{rep}")
                _mutate(sd, rep)
                dist.barrier()
                blocked, total, extra = _save_once(method, sd, path)
                dist.barrier()
                runs.append({"rep": rep, "warmup": rep == 0, "blocked_s": blocked, "complete_s": total, **extra})
                if rank == 0:
                    shutil.rmtree(path, ignore_errors=True)
                    print(f"  {method} rep {rep}{' (warm-up)' if rep == 0 else ''}: blocked {blocked:.3f} s, "
                          f"complete {total:.2f} s", flush=True)
            results[method] = runs
            if method == "asyncckpt":
                close_async_saves()
            del sd
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        close_async_saves(abort=True)
        dist.destroy_process_group()


def _summary(per_rank: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in methods:
        reps = [i for i, r in enumerate(per_rank[0][m]) if not r["warmup"]]
        slowest = [max(pr[m][i]["blocked_s"] for pr in per_rank) for i in reps]
        complete = [max(pr[m][i]["complete_s"] for pr in per_rank) for i in reps]
        warm = max(pr[m][0]["blocked_s"] for pr in per_rank)
        out[m] = {
            "blocked_median_s": statistics.median(slowest),
            "blocked_s": slowest,
            "complete_median_s": statistics.median(complete),
            "warmup_blocked_s": warm,
        }
        if m == "asyncckpt":
            out[m]["call_median_s"] = statistics.median(max(pr[m][i]["call_s"] for pr in per_rank) for i in reps)
            out[m]["snapshot_wait_median_s"] = statistics.median(
                max(pr[m][i]["snapshot_wait_s"] for pr in per_rank) for i in reps
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="state per rank, MiB (default 1024)")
    ap.add_argument("--tensor-mib", type=int, default=64, help="size of each tensor, MiB")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed saves per method (after one warm-up)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
    own_dir = args.dir is None
    args.dir = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="dcp-blocking-"))
    os.makedirs(args.dir, exist_ok=True)
    out_dir = tempfile.mkdtemp(prefix="dcp-blocking-results-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"{args.world_size} gloo ranks, {args.size_mib} MiB per rank ({args.tensor_mib} MiB tensors), "
          f"{args.reps} reps + 1 warm-up, checkpoints under {args.dir}", flush=True)
    t0 = time.perf_counter()
    try:
        mp.spawn(_rank, args=(args.world_size, port, args, out_dir), nprocs=args.world_size)
        per_rank = []
        for r in range(args.world_size):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        if own_dir:
            shutil.rmtree(args.dir, ignore_errors=True)
    summary = _summary(per_rank, args.methods)
    print(f"\nblocked per save (slowest rank; median of {args.reps}), {args.size_mib} MiB/rank x {args.world_size} ranks:")
    print(f"{'method':<14}{'blocked median':>16}{'each rep':>26}{'complete median':>17}{'warm-up blocked':>17}")
    for m, s in summary.items():
        reps = " ".join(f"{x:.3f}" for x in s["blocked_s"])
        print(f"{m:<14}{s['blocked_median_s']:>14.3f} s{reps:>26}{s['complete_median_s']:>15.2f} s{s['warmup_blocked_s']:>15.3f} s")
    if "asyncckpt" in summary:
        s = summary["asyncckpt"]
        print(f"asyncckpt split: call (plan + share + schedule) {s['call_median_s']:.3f} s, "
              f"snapshot wait {s['snapshot_wait_median_s']:.3f} s")
    result = {
        "size_mib_per_rank": args.size_mib, "tensor_mib": args.tensor_mib, "world_size": args.world_size,
        "reps": args.reps, "torch": torch.__version__, "python": sys.version.split()[0],
        "cpus": os.cpu_count(), "wall_s": time.perf_counter() - t0, "summary": summary, "per_rank": per_rank,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
