"""Cold-cache load A/B (issue 14): ``asyncckpt.load``, ``load(into=)`` and ``dcp.load`` through
``AsyncStorageReader`` against ``torch.load`` and the disk's read limit, every file's page cache
dropped (``posix_fadvise(DONTNEED)``) before each read.

    git archive main asyncckpt | tar -x -C /tmp/old-src       # the code to compare against
    python bench/load_cold.py [--old-src /tmp/old-src] [--mib 1024] [--rounds 5] [--dir DIR] [--json OUT]

The state is ``--tensors`` float32 tensors of ``--mib`` MiB in all plus as many small ones. It is
saved once with this tree (native checkpoint, ``torch.save`` file, DCP through
``AsyncStorageWriter(files_per_rank=4)``, as ``bench/run.py`` does), every file fsynced. Every
figure is one fresh process timing one operation from a cold cache (see :func:`measure`): each
round first measures the read limit (the fastest of a few ways to read the ``torch.save`` file's
bytes: buffered sequential reads with readahead, O_DIRECT reads of several sizes and depths),
then, for each code tree in turn (the order alternating between rounds), ``torch.load``,
``asyncckpt.load``, ``load(into=)`` into touched tensors, ``dcp.load`` into touched tensors
(``dcp``) and into ``empty_like`` ones made inside the timing (``dcp_fresh``, as ``bench/run.py``
does). Reported: wall and CPU seconds, medians over the rounds of each ratio to the same tree's
``torch.load`` of that round and to the round's read limit, and the 1-minute load average before
and after. On a shared machine compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

MiB = 1 << 20
HERE = Path(__file__).resolve().parent.parent


def files_under(path: str) -> list[str]:
    """``path`` itself, or every file below it."""
    if os.path.isfile(path):
        return [path]
    return [os.path.join(dp, f) for dp, _d, fs in os.walk(path) for f in fs]


def drop_cache(path: str) -> None:
    """Make ``path``'s files durable, then evict their pages (only theirs) from the page cache."""
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_buffered(path: str, chunk: int = 16 * MiB) -> None:
    """Sequential buffered reads with the kernel's sequential readahead hint."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = memoryview(bytearray(chunk))
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def read_direct(path: str, chunk: int, inflight: int) -> None:
    """O_DIRECT reads of ``chunk`` bytes, ``inflight`` threads each with its own aligned buffer."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    offsets = iter(range(0, size, chunk))
    lock = threading.Lock()

    def worker() -> None:
        buf = mmap.mmap(-1, chunk)
        view = memoryview(buf)
        while True:
            with lock:
                off = next(offsets, None)
            if off is None:
                break
            os.preadv(fd, [view], off)
        view.release()
        buf.close()

    threads = [threading.Thread(target=worker) for _ in range(inflight)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.close(fd)


READ_METHODS: dict[str, Callable[[str], None]] = {
    "buffered 16 MiB, FADV_SEQUENTIAL": read_buffered,
    "O_DIRECT 16 MiB x 2": lambda p: read_direct(p, 16 * MiB, 2),
    "O_DIRECT 32 MiB x 4": lambda p: read_direct(p, 32 * MiB, 4),
    "O_DIRECT 2 MiB x 16": lambda p: read_direct(p, 2 * MiB, 16),
}


def make_state(mib: int, ntensors: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    numel = mib * MiB // 4 // ntensors
    state: dict[str, Any] = {f"big{i:03d}": torch.randn(numel, generator=g) for i in range(ntensors)}
    state.update({f"small{i:03d}": torch.randn(1000 + i, generator=g) for i in range(ntensors)})
    return state


_CPU: dict[str, float] = {}


def measure(op: str, ckpt: str, tfile: str, dcp_dir: str) -> dict[str, float]:
    """One fresh process, one operation, from a cold cache: {"s": wall seconds, "cpu": CPU seconds}.

    A fresh process gives every operation the same start (the memory it fills is new to it, as
    at a job's start): in one long process, a load that gets memory an earlier one freed skips
    its page faults and looks several times cheaper (0.2 vs 1-2 CPU seconds for 1 GiB here).
    """
    import torch
    import torch.distributed.checkpoint as dcp

    import asyncckpt
    from asyncckpt.dcp import AsyncStorageReader

    like = {k: v for k, v in torch.load(tfile, weights_only=True, mmap=True).items()}  # shapes only
    if op in ("into", "dcp"):
        target = {k: torch.full_like(v, 0) for k, v in like.items()}  # touched, as live parameters are
    asyncckpt.load(ckpt, keys=["small000"])  # warm-up: imports and first-call set-up of every path
    dcp.load({"small000": torch.zeros_like(like["small000"])}, storage_reader=AsyncStorageReader(dcp_dir))
    fns: dict[str, tuple[str, Callable[[], Any]]] = {
        "torch": (tfile, lambda: torch.load(tfile, weights_only=True)),
        "load": (ckpt, lambda: asyncckpt.load(ckpt)),
        "into": (ckpt, lambda: asyncckpt.load(ckpt, into=target)),
        "dcp": (dcp_dir, lambda: dcp.load(target, storage_reader=AsyncStorageReader(dcp_dir)) or target),
        "dcp_fresh": (dcp_dir, lambda: _dcp_fresh(like, dcp_dir)),
    }
    fns.update({f"read:{k}": (tfile, lambda m=m: m(tfile)) for k, m in READ_METHODS.items()})  # type: ignore[misc]
    path, fn = fns[op]
    drop_cache(path)
    c0, t0 = time.process_time(), time.perf_counter()
    got = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not op.startswith("read:"):
        assert all(torch.equal(got[k], like[k]) for k in like), f"{op} does not match the saved state"
    return {"s": wall, "cpu": cpu}


def _dcp_fresh(like: dict[str, Any], dcp_dir: str) -> dict[str, Any]:
    """As bench/run.py: targets made by empty_like inside the timing."""
    import torch
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader

    fresh = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load(fresh, storage_reader=AsyncStorageReader(dcp_dir))
    return fresh


OPS = ("torch", "load", "into", "dcp", "dcp_fresh", *(f"read:{k}" for k in READ_METHODS))


FIGURES = ("load", "into", "dcp", "dcp_fresh")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-src", default=None, help="directory holding the other tree's asyncckpt package")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--measure", nargs=4, metavar=("OP", "CKPT", "TORCH_FILE", "DCP_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    import torch
    import torch.distributed.checkpoint as dcp

    import asyncckpt
    from asyncckpt.dcp import AsyncStorageWriter

    work = Path(args.dir or tempfile.mkdtemp(prefix="load-cold-"))
    ckpt, tfile, dcp_dir = str(work / "ck" / "s0"), str(work / "state.pt"), str(work / "dcp")
    if not (Path(ckpt) / "COMMIT").exists():
        state = make_state(args.mib, args.tensors)
        ck = asyncckpt.AsyncCheckpointer(snapshot="blocking")
        try:
            ck.save(state, ckpt, step=0)
            ck.finalize(blocking=True)
        finally:
            ck.close()
        torch.save(state, tfile)
        dcp.save(state, storage_writer=AsyncStorageWriter(dcp_dir, files_per_rank=4))
        del state
    trees = {"new": str(HERE)}
    if args.old_src:
        trees = {"old": os.path.abspath(args.old_src), **trees}

    def run(tree: str, op: str) -> dict[str, float]:
        env = dict(os.environ, PYTHONPATH=trees[tree])
        res = subprocess.run([sys.executable, __file__, "--measure", op, ckpt, tfile, dcp_dir],
                             env=env, cwd=trees[tree], check=True, capture_output=True, text=True)
        return cast(dict[str, float], json.loads(res.stdout.strip().splitlines()[-1]))

    reads = [op for op in OPS if op.startswith("read:")]
    ops = ["torch", *FIGURES]
    rounds: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    for r in range(args.rounds):
        rnd: dict[str, Any] = {"read": {op[5:]: run("new", op) for op in reads}}
        rnd["limit"] = min(v["s"] for v in rnd["read"].values())
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for op in ops:
            for tree in order:
                rnd.setdefault(tree, {})[op] = run(tree, op)
        rnd["loadavg"] = os.getloadavg()[0]
        rounds.append(rnd)
        print(f"round {r}: limit {rnd['limit']:.3f} s  load avg {rnd['loadavg']:.1f}", file=sys.stderr)
        for tree in trees:
            f = rnd[tree]
            print(f"  {tree}: " + "  ".join(f"{op} {f[op]['s']:.3f} s/{f[op]['cpu']:.2f} cpu" for op in ops),
                  file=sys.stderr)
    load_end = os.getloadavg()
    summary: dict[str, Any] = {"mib": args.mib, "tensors": 2 * args.tensors, "rounds": rounds,
                               "loadavg_start": load_start, "loadavg_end": load_end}
    med = statistics.median
    print(f"{args.mib} MiB, {2 * args.tensors} tensors, {args.rounds} rounds, cold cache, one process per "
          f"figure; load average (1 min) {load_start[0]:.1f} -> {load_end[0]:.1f}")
    limit = med(x["limit"] for x in rounds)
    print(f"read limit {limit:.3f} s [" + "  ".join(
        f"{k} {med(x['read'][k]['s'] for x in rounds):.3f} s" for k in rounds[0]["read"]) + "]  (medians)")
    summary["limit_s"] = limit
    for tree in trees:
        s: dict[str, float] = {}
        for op in ops:
            s[f"{op}_s"] = med(x[tree][op]["s"] for x in rounds)
            s[f"{op}_cpu"] = med(x[tree][op]["cpu"] for x in rounds)
            s[f"{op}_vs_limit"] = med(x[tree][op]["s"] / x["limit"] for x in rounds)
            s[f"{op}_vs_torch"] = med(x[tree][op]["s"] / x[tree]["torch"]["s"] for x in rounds)
        summary[tree] = s
        print(f"{tree:4s} " + "  ".join(
            f"{op} {s[op + '_s']:.3f} s ({s[op + '_vs_torch']:.2f}x torch.load, {s[op + '_vs_limit']:.2f}x limit, "
            f"{s[op + '_cpu']:.2f} cpu s)" for op in ops) + "  [medians]")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.dir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
