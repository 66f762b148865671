"""Run a function on N gloo ranks in spawned processes (used by multi-rank tests)."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as tmp


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"ok": True, "result": result}, f)
    except BaseException as exc:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"ok": False, "error": repr(exc), "tb": traceback.format_exc()}, f)
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn: Callable[..., Any], tmp_path: Any, *args: Any, timeout: float = 120) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return each rank's JSON result."""
    out_dir = str(tmp_path / "rank_results")
    os.makedirs(out_dir, exist_ok=True)
    init_file = str(tmp_path / "rendezvous")
    ctx = tmp.start_processes(_entry, args=(world, init_file, out_dir, fn, args), nprocs=world, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{world} ranks did not finish in {timeout} s")
    results = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            rec = json.load(f)
        assert rec["ok"], f"rank {r} failed: {rec.get('tb')}"
        results.append(rec["result"])
    return results
