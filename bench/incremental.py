"""Incremental saves (issue 15): bytes written and durable time per save, incremental vs full, in one run.

    python bench/incremental.py [--mib 256] [--tensors 100] [--saves 3] [--dir DIR] [--json OUT]

The state is ``--tensors`` float32 tensors of ``--mib`` MiB in all. For each fraction of the
tensors that changes between saves (1 %, 10 %, 100 %), a base checkpoint is saved, then
``--saves`` more, each after changing that fraction of the tensors (``add_(1)``), with an
``AsyncCheckpointer(incremental=True)`` and with a plain one, alternately, each under a root of
its own on the local disk. Reported per save after the base: bytes written (data file +
manifest, from the files on disk) and durable time (``save`` to ``finalize(blocking=True)``
returning: data and manifest fsync'ed, COMMIT written) as min / median / max. Wall-clock numbers
on a shared machine: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import asyncckpt

MiB = 1 << 20
FRACTIONS = (0.01, 0.10, 1.0)


def written(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.glob("rank-*") if p.suffix in (".data", ".manifest"))


def run(mib: int, ntensors: int, saves: int, workdir: Path) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    numel = mib * MiB // 4 // ntensors
    rows: list[dict[str, Any]] = []
    cks = {mode: asyncckpt.AsyncCheckpointer(incremental=mode == "incremental", snapshot="blocking")
           for mode in ("full", "incremental")}
    try:
        for frac in FRACTIONS:
            changed = max(1, round(frac * ntensors))
            state = {f"t{i:04d}": torch.randn(numel, generator=g) for i in range(ntensors)}
            results: dict[str, dict[str, list[float]]] = {m: {"bytes": [], "s": []} for m in cks}
            for step in range(saves + 1):
                if step:
                    for i in range(changed):
                        state[f"t{i:04d}"].add_(1)
                for mode, ck in cks.items():  # same state, both modes, alternately
                    root = workdir / f"{mode}-{frac:g}"
                    t0 = time.perf_counter()
                    ck.save(state, f"{root}/s{step}", step=step)
                    ck.finalize(blocking=True)
                    dt = time.perf_counter() - t0
                    if step:
                        results[mode]["bytes"].append(written(root / f"s{step}"))
                        results[mode]["s"].append(dt)
                    print(f"  {frac:>5.0%} {mode:<11} save {step}: {written(root / f's{step}') / MiB:8.1f} MiB "
                          f"{dt:6.3f} s", file=sys.stderr)
            for mode in cks:  # disk space: one fraction's checkpoints at a time
                shutil.rmtree(workdir / f"{mode}-{frac:g}", ignore_errors=True)
            for mode, r in results.items():
                rows.append({
                    "changed_fraction": frac, "changed_tensors": changed, "mode": mode,
                    "changed_bytes": changed * numel * 4, "state_bytes": ntensors * numel * 4,
                    "bytes_written": {"min": min(r["bytes"]), "median": statistics.median(r["bytes"]),
                                      "max": max(r["bytes"]), "values": r["bytes"]},
                    "durable_s": {"min": min(r["s"]), "median": statistics.median(r["s"]), "max": max(r["s"]),
                                  "values": r["s"]},
                })
    finally:
        for ck in cks.values():
            ck.close()
    return rows


def table(rows: list[dict[str, Any]], mib: int, ntensors: int, saves: int) -> str:
    out = [f"state {mib} MiB in {ntensors} float32 tensors; {saves} saves after the base per row; "
           "durable = save() .. finalize(blocking=True)",
           f"{'changed':>8} {'mode':<12} {'changed MiB':>11} {'written MiB/save':>17} {'durable s (min/med/max)':>25}"]
    for r in rows:
        b, s = r["bytes_written"], r["durable_s"]
        out.append(f"{r['changed_fraction']:>8.0%} {r['mode']:<12} {r['changed_bytes'] / MiB:>11.1f} "
                   f"{b['median'] / MiB:>17.2f} {s['min']:>7.3f} /{s['median']:>7.3f} /{s['max']:>7.3f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="state size in MiB (default 256; the issue's figure: 1024)")
    ap.add_argument("--tensors", type=int, default=100, help="how many tensors hold the state (default 100)")
    ap.add_argument("--saves", type=int, default=3, help="saves after the base, per row (default 3)")
    ap.add_argument("--dir", type=Path, default=None, help="where to save (default: a temporary directory)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.mib < 1 or args.tensors < 1 or args.saves < 1:
        ap.error("--mib, --tensors and --saves must be >= 1")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        rows = run(args.mib, args.tensors, args.saves, Path(d))
    print(table(rows, args.mib, args.tensors, args.saves))
    if args.json is not None:
        args.json.write_text(json.dumps({"mib": args.mib, "tensors": args.tensors, "saves": args.saves,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
