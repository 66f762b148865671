"""Cold-cache load A/B (issue 14): ``asyncckpt.load``, ``load(into=)`` and ``dcp.load`` through
``AsyncStorageReader`` against ``torch.load`` and the disk's read limit, every file's page cache
dropped (``posix_fadvise(DONTNEED)``) before each read.

    git archive main asyncckpt | tar -x -C /tmp/old-src       # the code to compare against
    python bench/load_cold.py [--old-src /tmp/old-src] [--mib 1024] [--rounds 5] [--dir DIR] [--json OUT]

The state is ``--tensors`` float32 tensors of ``--mib`` MiB in all plus as many small ones. It is
saved once with this tree (native checkpoint, ``torch.save`` file, DCP through
``AsyncStorageWriter(files_per_rank=4)``, as ``bench/run.py`` does), every file fsynced. Each
round runs one fresh process per code tree (the order alternating); each process times, in
turn, the read limit (the fastest of a few ways to read the ``torch.save`` file's bytes:
buffered sequential reads, O_DIRECT reads with several in flight), ``torch.load``,
``asyncckpt.load``, ``load(into=)`` into touched tensors, ``dcp.load`` into touched tensors
(``dcp``) and into ``empty_like`` ones made inside the timing (``dcp_fresh``, as
``bench/run.py`` does). Reported: medians
over the rounds of each ratio to ``torch.load`` and to the read limit of the same process, and
the 1-minute load average before and after. On a shared machine compare the rows of one run.
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
from typing import Any

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
}


def make_state(mib: int, ntensors: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    numel = mib * MiB // 4 // ntensors
    state: dict[str, Any] = {f"big{i:03d}": torch.randn(numel, generator=g) for i in range(ntensors)}
    state.update({f"small{i:03d}": torch.randn(1000 + i, generator=g) for i in range(ntensors)})
    return state


_CPU: dict[str, float] = {}


def timed(path: str, fn: Callable[[], Any], name: str = "") -> tuple[float, Any]:
    """(wall seconds, result) of ``fn`` after ``path``'s cache was dropped; its CPU seconds (every
    thread of this process) go to ``_CPU[name]``: on a busy machine they vary far less than the wall time."""
    drop_cache(path)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    _CPU[name] = time.process_time() - c0
    return wall, out


def measure(ckpt: str, tfile: str, dcp_dir: str) -> dict[str, float]:
    """One process's figures (seconds), every read from a cold cache."""
    import torch
    import torch.distributed.checkpoint as dcp

    import asyncckpt
    from asyncckpt.dcp import AsyncStorageReader

    small = {"small000": torch.zeros(1000)}  # warm-up: the imports and first-call set-up of every path
    asyncckpt.load(ckpt, keys=["small000"])
    dcp.load(small, storage_reader=AsyncStorageReader(dcp_dir))
    out: dict[str, float] = {}
    for name, method in READ_METHODS.items():
        out[f"read:{name}"] = timed(tfile, lambda m=method: m(tfile))[0]  # type: ignore[misc]
    out["limit_s"] = min(v for k, v in out.items() if k.startswith("read:"))
    out["torch_s"], sd = timed(tfile, lambda: torch.load(tfile, weights_only=True), "torch")
    out["load_s"], got = timed(ckpt, lambda: asyncckpt.load(ckpt), "load")
    assert all(torch.equal(got[k], sd[k]) for k in sd), "asyncckpt.load does not match torch.load"
    del got
    into = {k: torch.full_like(v, 0) for k, v in sd.items()}  # touched, as live parameters are
    out["into_s"], _ = timed(ckpt, lambda: asyncckpt.load(ckpt, into=into), "into")
    assert all(torch.equal(into[k], sd[k]) for k in sd), "load(into=) does not match torch.load"
    into = {k: torch.full_like(v, 0) for k, v in sd.items()}
    out["dcp_s"], _ = timed(dcp_dir, lambda: dcp.load(into, storage_reader=AsyncStorageReader(dcp_dir)), "dcp")
    assert all(torch.equal(into[k], sd[k]) for k in sd), "dcp.load does not match torch.load"
    into.clear()

    def dcp_fresh() -> dict[str, Any]:  # as bench/run.py: targets made by empty_like inside the timing
        fresh = {k: torch.empty_like(v) for k, v in sd.items()}
        dcp.load(fresh, storage_reader=AsyncStorageReader(dcp_dir))
        return fresh

    out["dcp_fresh_s"], fresh = timed(dcp_dir, dcp_fresh, "dcp_fresh")
    assert all(torch.equal(fresh[k], sd[k]) for k in sd), "dcp.load does not match torch.load"
    out.update({f"cpu:{k}": v for k, v in _CPU.items() if k})
    return out


FIGURES = ("load_s", "into_s", "dcp_s", "dcp_fresh_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-src", default=None, help="directory holding the other tree's asyncckpt package")
    ap.add_argument("--mib", type=int, default=1024)
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
    for p in (ckpt, tfile, dcp_dir):
        drop_cache(p)
    trees = {"new": str(HERE)}
    if args.old_src:
        trees = {"old": os.path.abspath(args.old_src), **trees}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    load_start = os.getloadavg()
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(reversed(trees))):
            env = dict(os.environ, PYTHONPATH=trees[name])
            res = subprocess.run([sys.executable, __file__, "--measure", ckpt, tfile, dcp_dir],
                                 env=env, cwd=trees[name], check=True, capture_output=True, text=True)
            fig = json.loads(res.stdout.strip().splitlines()[-1])
            runs[name].append(fig)
            print(f"round {r} {name}: limit {fig['limit_s']:.3f} s  torch.load {fig['torch_s']:.3f} s  "
                  + "  ".join(f"{k[:-2]} {fig[k]:.3f} s ({fig[k] / fig['torch_s']:.2f}x)" for k in FIGURES)
                  + "  cpu " + " ".join(f"{k[4:]} {v:.2f}" for k, v in fig.items() if k.startswith("cpu:"))
                  + f"  load avg {os.getloadavg()[0]:.1f}", file=sys.stderr)
    load_end = os.getloadavg()
    summary: dict[str, Any] = {"mib": args.mib, "tensors": 2 * args.tensors, "rounds": args.rounds,
                               "loadavg_start": load_start, "loadavg_end": load_end, "runs": runs}
    print(f"{args.mib} MiB, {2 * args.tensors} tensors, {args.rounds} rounds, cold cache; load average (1 min) "
          f"{load_start[0]:.1f} -> {load_end[0]:.1f}")
    for name, rs in runs.items():
        s: dict[str, float] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        for k in FIGURES:
            s[f"{k[:-2]}_vs_torch"] = statistics.median(x[k] / x["torch_s"] for x in rs)
            s[f"{k[:-2]}_vs_limit"] = statistics.median(x[k] / x["limit_s"] for x in rs)
        s["torch_vs_limit"] = statistics.median(x["torch_s"] / x["limit_s"] for x in rs)
        summary[name] = s
        reads = "  ".join(f"{k[5:]} {v:.3f} s" for k, v in s.items() if k.startswith("read:"))
        print(f"{name:4s} read limit {s['limit_s']:.3f} s [{reads}]")
        print(f"     torch.load {s['torch_s']:.3f} s ({s['torch_vs_limit']:.2f}x limit)  "
              + "  ".join(f"{k[:-2]} {s[k]:.3f} s ({s[k[:-2] + '_vs_torch']:.2f}x torch.load, "
                          f"{s[k[:-2] + '_vs_limit']:.2f}x limit)" for k in FIGURES) + "  [medians]")
        print("     CPU seconds: " + "  ".join(f"{k[4:]} {v:.2f}" for k, v in s.items() if k.startswith("cpu:")))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.dir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
