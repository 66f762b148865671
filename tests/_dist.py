"""Run a function on N gloo ranks in spawned processes (used by every multi-rank test).

Each rank writes its result file as soon as ``fn`` returns, then meets the others at a barrier,
destroys its process group and leaves with ``os._exit``: no rank tears its gloo pairs down
while a peer still uses them, and C++ static destructors (where gloo can ``std::terminate``
at interpreter exit) never run. ``run_ranks`` waits for every rank instead of stopping at the
first exit, so a failure reports all ranks' outcomes.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

_TEARDOWN_FAILED = 3


def _write_json(path: str, rec: dict[str, Any]) -> None:
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(rec, f)
    os.replace(tmp_path, path)


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        rec = {"ok": True, "result": fn(rank, world, *args)}
    except BaseException as exc:  # noqa: BLE001 - reported to the test through the result file
        rec = {"ok": False, "error": repr(exc), "tb": traceback.format_exc()}
    _write_json(os.path.join(out_dir, f"rank{rank}.json"), rec)
    code = 0
    try:
        if rec["ok"]:
            dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = _TEARDOWN_FAILED
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(world: int, fn: Callable[..., Any], work_dir: str | Path, *args: Any, timeout: float = 240) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return each rank's JSON-able result.

    Asserts that every rank returned without raising and exited cleanly.
    """
    run_dir = os.path.join(str(work_dir), f"ranks-{fn.__name__}-{time.monotonic_ns()}")
    os.makedirs(run_dir)
    ctx = tmp.start_processes(
        _entry,
        args=(world, os.path.join(run_dir, "rendezvous"), run_dir, fn, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        for p in ctx.processes:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
        for p in ctx.processes:  # only the ranks we started, by their process handle
            if p.is_alive():
                p.kill()
                p.join(5)
    recs: list[dict[str, Any] | None] = []
    for r in range(world):
        path = os.path.join(run_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                recs.append(json.load(f))
        else:
            recs.append(None)
    summary = "; ".join(
        f"rank {r}: exit {p.exitcode}, {'no result' if rec is None else ('ok' if rec['ok'] else rec['error'])}"
        for r, (p, rec) in enumerate(zip(ctx.processes, recs))
    )
    assert not hung, f"{fn.__name__}: ranks {hung} did not finish in {timeout:g} s ({summary})"
    for r, rec in enumerate(recs):
        assert rec is not None, f"{fn.__name__}: rank {r} wrote no result, it crashed ({summary})"
        assert rec["ok"], f"{fn.__name__}: rank {r} failed ({summary}):\n{rec['tb']}"
    bad_exit = [r for r, p in enumerate(ctx.processes) if p.exitcode != 0]
    assert not bad_exit, f"{fn.__name__}: ranks {bad_exit} finished their work but crashed in teardown ({summary})"
    return [rec["result"] for rec in recs if rec is not None]
