"""A/B of ``AsyncCheckpointer.save`` between two source trees: blocked / memcpy and durable / disk.

Each round runs one process per tree (the order alternates between rounds); a process makes a
warm-up save, then ``--reps`` times: the memcpy floor and the raw-disk limit of ``bench/_engines.py``
(the tree's own), then one save into a fresh name (blocked = ``save`` + ``wait_snapshot``, durable =
until ``finalize(blocking=True)`` returns). Ratios are taken per repetition against the limits
measured just before it; a process reports their medians, and the summary gives the median and
the min-max over the rounds.

    python bench/durable_ab.py --old /tmp/old --new . --mib 1024 --rounds 5 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

FIGURES = ("blocked", "durable", "memcpy", "disk", "durable_per_disk", "blocked_per_memcpy", "first_durable")


def one_process(mib: int, reps: int, root: str) -> dict[str, Any]:
    """Run in a child whose PYTHONPATH is the tree under test; the per-repetition figures."""
    import torch

    sys.path.insert(0, os.path.join(os.getcwd(), "bench"))  # the tree under test's own limits
    import _engines as E

    from asyncckpt import AsyncCheckpointer

    n = mib * (1 << 20) // 4 // 64
    sd = {f"t{i}": torch.randn(n) for i in range(64)}
    floor = E.MemcpyFloor(sd)
    ck = AsyncCheckpointer()
    os.makedirs(root, exist_ok=True)
    out: dict[str, Any] = {"blocked": [], "durable": [], "memcpy": [], "disk": [], "first_durable": None}
    try:
        for r in range(reps + 1):
            if r:
                out["memcpy"].append(floor.run()["floor"])
                out["disk"].append(E.raw_disk_write(floor.buf, os.path.join(root, "raw.bin"))[0])
            dest = os.path.join(root, f"ck-{r}")
            t0 = time.perf_counter()
            ck.save(sd, dest, step=r, overwrite=True, update_latest=False)
            ck.wait_snapshot()
            t1 = time.perf_counter()
            ck.finalize(blocking=True)
            t2 = time.perf_counter()
            if r:
                out["blocked"].append(t1 - t0)
                out["durable"].append(t2 - t0)
            else:
                out["first_durable"] = t2 - t0
            shutil.rmtree(dest)
    finally:
        ck.close()
    return out


def summarize(d: dict[str, Any]) -> dict[str, float]:
    """Medians of one process's repetitions."""
    med = {m: statistics.median(d[m]) for m in ("blocked", "durable", "memcpy", "disk")}
    med["durable_per_disk"] = statistics.median([a / b for a, b in zip(d["durable"], d["disk"])])
    med["blocked_per_memcpy"] = statistics.median([a / b for a, b in zip(d["blocked"], d["memcpy"])])
    med["first_durable"] = d["first_durable"]
    return med


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="source tree A (e.g. a `git worktree add /tmp/old main`)")
    ap.add_argument("--new", required=True, help="source tree B")
    ap.add_argument("--mib", type=int, default=1024, help="state size (64 float32 tensors)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2, help="saves per process after the warm-up")
    ap.add_argument("--root", default=None, help="directory to save into (default: a temp dir)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_process(args.mib, args.reps, args.root)))
        return
    root = args.root or tempfile.mkdtemp(prefix="durable-ab-")
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    print(f"load average at start: {load_average()}", flush=True)
    for r in range(args.rounds):
        for k in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
            env = dict(os.environ, PYTHONPATH=trees[k])
            cmd = [sys.executable, os.path.abspath(__file__), "--old", trees["old"], "--new", trees["new"], "--child",
                   "--mib", str(args.mib), "--reps", str(args.reps), "--root", os.path.join(root, k)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=trees[k], check=False)
            if p.returncode:
                sys.exit(f"{k} failed:\n{p.stderr[-3000:]}")
            med = summarize(json.loads(p.stdout.strip().splitlines()[-1]))
            rows[k].append(med)
            print(f"round {r + 1} {k}: " + ", ".join(f"{m} {v:.3f}" for m, v in med.items())
                  + f" (load {load_average()})", flush=True)
    print(f"load average at end: {load_average()}")
    for k, rs in rows.items():
        for m in FIGURES:
            xs = [row[m] for row in rs]
            print(f"{k} {m}: median {statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
