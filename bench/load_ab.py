"""Load A/B (issue 14): ``asyncckpt.load`` of one code tree against another's, each as a ratio to
``torch.load`` of the same state measured in the same process.

    git archive main asyncckpt | tar -x -C /tmp/old-src       # the code to compare against
    python bench/load_ab.py --old-src /tmp/old-src [--mib 512] [--rounds 5] [--dir DIR] [--json OUT]

The state is ``--tensors`` float32 tensors of ``--mib`` MiB in all plus as many small ones (a few
KiB each, so chunks span many entries). It is saved once with this tree's asyncckpt (blocking
snapshot, finalized) and once with ``torch.save``. Each round runs one fresh process per code
tree (the order alternating between rounds); each process times ``torch.load`` of the file,
``asyncckpt.load`` of the checkpoint (every checksum verified) and ``asyncckpt.load(into=)``
into a dict of preallocated tensors, and ``dcp.load`` with ``AsyncStorageReader`` of the same
state saved by ``AsyncStorageWriter`` into preallocated tensors, with the files in the page cache (a warm-up read first).
Reported: medians over the rounds of each ratio, and the 1-minute load average before and
after. Wall-clock numbers on a shared machine: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
HERE = Path(__file__).resolve().parent.parent


def make_state(mib: int, ntensors: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    numel = mib * MiB // 4 // ntensors
    state: dict[str, Any] = {f"big{i:03d}": torch.randn(numel, generator=g) for i in range(ntensors)}
    state.update({f"small{i:03d}": torch.randn(1000 + i, generator=g) for i in range(ntensors)})
    return state


def measure(ckpt: str, tfile: str, dcp_dir: str) -> dict[str, float]:
    """One process's figures: seconds for torch.load, asyncckpt.load, asyncckpt.load(into=) and
    ``dcp.load`` through ``AsyncStorageReader`` into preallocated tensors."""
    import torch

    import asyncckpt

    torch.load(tfile, weights_only=True)  # warm-up: page cache, allocator, imports
    asyncckpt.load(ckpt)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    sd = torch.load(tfile, weights_only=True)
    out["torch_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = asyncckpt.load(ckpt)
    out["load_s"] = time.perf_counter() - t0
    into = {k: torch.full_like(v, 0) for k, v in sd.items()}  # touched, as live parameters are
    del got
    t0 = time.perf_counter()
    asyncckpt.load(ckpt, into=into)
    out["into_s"] = time.perf_counter() - t0
    assert all(torch.equal(into[k], sd[k]) for k in sd), "load(into=) does not match torch.load"
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader

    into = {k: torch.full_like(v, 0) for k, v in sd.items()}
    t0 = time.perf_counter()
    dcp.load(into, storage_reader=AsyncStorageReader(dcp_dir))
    out["dcp_s"] = time.perf_counter() - t0
    assert all(torch.equal(into[k], sd[k]) for k in sd), "dcp.load does not match torch.load"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-src", required=True, help="directory holding the other tree's asyncckpt package")
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--measure", nargs=3, metavar=("CKPT", "TORCH_FILE", "DCP_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    import torch

    import asyncckpt

    work = Path(args.dir or tempfile.mkdtemp(prefix="load-ab-"))
    ckpt, tfile = str(work / "ck" / "s0"), str(work / "state.pt")
    state = make_state(args.mib, args.tensors)
    ck = asyncckpt.AsyncCheckpointer(snapshot="blocking")
    try:
        ck.save(state, ckpt, step=0)
        ck.finalize(blocking=True)
    finally:
        ck.close()
    torch.save(state, tfile)
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageWriter

    dcp_dir = str(work / "dcp")
    dcp.save(state, storage_writer=AsyncStorageWriter(dcp_dir))
    del state
    trees = {"old": os.path.abspath(args.old_src), "new": str(HERE)}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    load_start = os.getloadavg()
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            env = dict(os.environ, PYTHONPATH=trees[name])
            res = subprocess.run([sys.executable, __file__, "--old-src", ".", "--measure", ckpt, tfile, dcp_dir],
                                 env=env, cwd=trees[name], check=True, capture_output=True, text=True)
            fig = json.loads(res.stdout.strip().splitlines()[-1])
            runs[name].append(fig)
            print(f"round {r} {name}: torch.load {fig['torch_s']:.3f} s  load {fig['load_s']:.3f} s "
                  f"({fig['load_s'] / fig['torch_s']:.2f}x)  into {fig['into_s']:.3f} s "
                  f"({fig['into_s'] / fig['torch_s']:.2f}x)  dcp {fig['dcp_s']:.3f} s "
                  f"({fig['dcp_s'] / fig['torch_s']:.2f}x)", file=sys.stderr)
    load_end = os.getloadavg()
    summary: dict[str, Any] = {"mib": args.mib, "tensors": 2 * args.tensors, "rounds": args.rounds,
                               "loadavg_start": load_start, "loadavg_end": load_end, "runs": runs}
    for name, rs in runs.items():
        summary[name] = {
            "torch_s": statistics.median(x["torch_s"] for x in rs),
            "load_s": statistics.median(x["load_s"] for x in rs),
            "into_s": statistics.median(x["into_s"] for x in rs),
            "load_ratio": statistics.median(x["load_s"] / x["torch_s"] for x in rs),
            "into_ratio": statistics.median(x["into_s"] / x["torch_s"] for x in rs),
            "dcp_s": statistics.median(x["dcp_s"] for x in rs),
            "dcp_ratio": statistics.median(x["dcp_s"] / x["torch_s"] for x in rs),
        }
    print(f"{args.mib} MiB, {2 * args.tensors} tensors, {args.rounds} rounds; load average "
          f"{load_start[0]:.1f} -> {load_end[0]:.1f}")
    for name in trees:
        s = summary[name]
        print(f"{name:4s} torch.load {s['torch_s']:.3f} s  load {s['load_s']:.3f} s ({s['load_ratio']:.2f}x)  "
              f"load(into=) {s['into_s']:.3f} s ({s['into_ratio']:.2f}x)  "
              f"dcp.load {s['dcp_s']:.3f} s ({s['dcp_ratio']:.2f}x)  [medians]")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.dir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
