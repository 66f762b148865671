"""Compare checkpoint engines on one state dict and one disk, in one process run.

    python bench/run.py                      # 1024 MiB, 3 repetitions, training-loop benchmark
    python bench/run.py --quick              # 256 MiB, 2 repetitions (about a minute)
    python bench/run.py --json out.json --plot out.png
    python bench/run.py --uri s3://bucket/prefix --endpoint-url http://127.0.0.1:9000

Repetitions are interleaved (every engine once per round, the order rotated each round) after
one warm-up round that is not reported. See bench/README.md for what every figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import _engines as E
import psutil
import torch

MiB = 1 << 20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

#: The issue's targets, checked against the measured figures in the "targets" section.
TARGET_BLOCKED_VS_MEMCPY = 1.10
TARGET_DURABLE_VS_DISK = 1.15
TARGET_LOAD_VS_TORCH_LOAD = 1.0
TARGET_WORKER_EXTRA_MIB = 256
TARGET_INFLATION_PCT = 5.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"min": None, "median": None, "max": None, "values": []}
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": list(values)}


# -- memory sampling ---------------------------------------------------------------------------------


class RssSampler:
    """Peak RSS of the trainer (this process) and of worker processes, sampled in a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.me = psutil.Process()

    def start(self, worker_pids: list[int]) -> None:
        self.workers = []
        for pid in worker_pids:
            with contextlib.suppress(psutil.Error):
                self.workers.append(psutil.Process(pid))
        self.trainer_start = self.me.memory_info().rss
        self.trainer_peak = self.trainer_start
        self.worker_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        self.trainer_peak = max(self.trainer_peak, self.me.memory_info().rss)
        total = 0
        for w in self.workers:
            with contextlib.suppress(psutil.Error):
                total += w.memory_info().rss
        self.worker_peak = max(self.worker_peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, float | None]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {
            "trainer": self.trainer_peak / MiB,
            "trainer_growth": (self.trainer_peak - self.trainer_start) / MiB,
            "worker": self.worker_peak / MiB if self.workers else None,
        }


def smaps_breakdown(pid: int) -> dict[str, float]:
    """Resident MiB of a process by kind: tensors shared with the trainer, asyncckpt's staging pool on
    CPU (``shared_anon``: shared anonymous memory, or private memory advised for transparent huge
    pages, ``hg`` in its VmFlags, which only the staging slots ask for), and everything else (heap,
    libraries, stacks)."""
    out = {"shared_with_trainer": 0.0, "shared_anon": 0.0, "other": 0.0}
    mappings: list[list[Any]] = []  # [name, resident KiB, VmFlags]
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    parts = line.split(None, 5)
                    mappings.append([parts[5].strip() if len(parts) > 5 else "", 0, ""])
                elif mappings and line.startswith("Rss:"):
                    mappings[-1][1] = int(line.split()[1])
                elif mappings and line.startswith("VmFlags:"):
                    mappings[-1][2] = line
    except OSError:
        pass
    for name, kib, flags in mappings:
        if "torch_" in name and ("/dev/shm" in name or "memfd" in name or "(deleted)" in name):
            kind = "shared_with_trainer"
        elif name.startswith("/dev/zero") or name.startswith("[anon_shmem") or (not name and " hg" in flags):
            kind = "shared_anon"
        else:
            kind = "other"
        out[kind] += kib / 1024
    return out


# -- the state ---------------------------------------------------------------------------------------


def make_state(size_mib: int, tensors: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = size_mib * MiB // itemsize
    per = max(1, total // tensors)
    cols = 1024 if per >= 1024 * 4 else 1
    gen = torch.Generator().manual_seed(1234)
    sd: dict[str, torch.Tensor] = {}
    left = total
    for i in range(tensors):
        n = per if i < tensors - 1 else max(1, left)
        n -= n % cols
        t = torch.empty(n, dtype=torch.float32).uniform_(-1, 1, generator=gen).to(dtype)
        sd[f"layer{i:04d}.weight"] = t.view(-1, cols) if cols > 1 else t
        left -= n
    return sd


def dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _d, fs in os.walk(path) for f in fs)


# -- the engines benchmark -----------------------------------------------------------------------------


def open_engines(args: argparse.Namespace, root: str, s3: bool,
                 storage_options: dict[str, Any]) -> tuple[list[E.Engine], dict[str, Any]]:
    """Open every engine asked for; those that cannot run here are recorded with the reason."""
    ctx = {"root": root, "storage_options": storage_options}
    engines: list[E.Engine] = []
    results: dict[str, Any] = {}
    wanted = set(args.engines.split(",")) if args.engines else None
    for e in E.all_engines():
        if wanted is not None and e.name not in wanted:
            continue
        rec: dict[str, Any] = {"label": e.label, "description": e.description, "mode": e.mode,
                               "verifies_checksums_on_load": e.verifies_checksums,
                               "bench_adds_fsync": not e.own_fsync}
        results[e.name] = rec
        target = "s3" if s3 else "local"
        if target not in e.targets:
            rec.update(available=False, reason=f"no {target} writer in this engine")
            log(f"{e.label}: skipped ({rec['reason']})")
            continue
        try:
            e.open(ctx)
        except E.EngineUnavailable as exc:
            rec.update(available=False, reason=str(exc))
            log(f"{e.label}: NOT RUN: {exc}")
            continue
        rec.update(available=True, reason=None)
        engines.append(e)
    return engines, results


def run_engines(args: argparse.Namespace, sd: dict[str, torch.Tensor], root: str, s3: bool,
                storage_options: dict[str, Any], engines: list[E.Engine], results: dict[str, Any]) -> dict[str, Any]:
    nbytes = E.state_nbytes(sd)
    for e in engines:
        rec = results[e.name]
        for k in ("blocked_s", "durable_s", "write_gbps", "load_s", "rss_trainer", "rss_trainer_growth",
                  "rss_worker", "file_bytes"):
            rec[k] = []
        rec["verified"] = True
        rec["verify_errors"] = []

    limits: dict[str, list[float]] = {"memcpy_s": [], "memcpy_libc_s": [], "memcpy_torch_s": [], "disk_s": []}
    floor = E.MemcpyFloor(sd)
    sampler = RssSampler()
    rounds = args.warmup + args.reps
    winners: list[str] = []  # the fastest disk method of each measured repetition
    items: list[Any] = ["memcpy", "disk", *engines]
    for rnd in range(rounds):
        warm = rnd < args.warmup
        shift = rnd % len(items)
        order = items[shift:] + items[:shift]
        for it in order:
            gc.collect()
            if it == "memcpy":
                m = floor.run()
                if not warm:
                    limits["memcpy_s"].append(m["floor"])
                    limits["memcpy_libc_s"].append(m["libc"])
                    limits["memcpy_torch_s"].append(m["torch"])
                log(f"round {rnd + 1}/{rounds}{' (warm-up)' if warm else ''}: memcpy floor {m['floor']:.3f} s "
                    f"(libc memcpy {m['libc']:.3f} s, torch copy_ {m['torch']:.3f} s)")
                continue
            if it == "disk":
                if s3:
                    dt = E.raw_s3_upload(floor.buf, args.uri, storage_options)
                    what = "raw aiobotocore multipart upload"
                else:
                    dt, best, each = E.raw_disk_write(floor.buf, os.path.join(root, f"raw-{rnd}.bin"))
                    what = f"raw disk, fastest of {len(each)} ways ({best})"
                    if not warm:
                        winners.append(best)
                        for k, v in each.items():
                            limits.setdefault(f"disk_method_s[{k}]", []).append(v)
                if not warm:
                    limits["disk_s"].append(dt)
                log(f"round {rnd + 1}/{rounds}{' (warm-up)' if warm else ''}: {what} {dt:.3f} s "
                    f"({nbytes / dt / 1e9:.2f} GB/s)")
                continue
            e = it
            rec = results[e.name]
            dest = e.dest(args.uri.rstrip("/") if s3 else root, f"r{rnd}")
            sampler.start(e.worker_pids())
            t0 = time.perf_counter()
            e.begin(sd, dest, rnd)
            e.wait_unblocked()
            t1 = time.perf_counter()
            e.wait_durable()
            t2 = time.perf_counter()
            rss = sampler.stop()
            if not warm:
                rec["blocked_s"].append(t1 - t0)
                rec["durable_s"].append(t2 - t0)
                rec["write_gbps"].append(nbytes / (t2 - t0) / 1e9)
                rec["rss_trainer"].append(rss["trainer"])
                rec["rss_trainer_growth"].append(rss["trainer_growth"])
                if rss["worker"] is not None:
                    rec["rss_worker"].append(rss["worker"])
                    pids = e.worker_pids()
                    if pids:
                        rec["worker_rss_breakdown_mib"] = smaps_breakdown(pids[0])
                if not s3:
                    rec["file_bytes"].append(dir_bytes(dest))
            if not s3:
                E.drop_page_cache(dest)
            t3 = time.perf_counter()
            loaded = e.load(dest, sd)
            load_s = time.perf_counter() - t3
            ok, why = E.same_state(sd, loaded)
            del loaded
            e.remove(dest)
            if not warm:
                rec["load_s"].append(load_s)
            if not ok:
                rec["verified"] = False
                rec["verify_errors"].append(why)
            log(f"round {rnd + 1}/{rounds}{' (warm-up)' if warm else ''}: {e.label:32s} blocked {t1 - t0:7.3f} s  "
                f"durable {t2 - t0:7.3f} s  load {load_s:6.3f} s  {'ok' if ok else 'MISMATCH: ' + why}")
    for e in engines:
        rec = results[e.name]
        rec["blocked_s"] = stats(rec["blocked_s"])
        rec["durable_s"] = stats(rec["durable_s"])
        rec["write_gbps"] = stats(rec["write_gbps"])
        rec["load_s"] = stats(rec["load_s"])
        rec["peak_rss_mib"] = {
            "trainer": max(rec.pop("rss_trainer"), default=None),
            "trainer_growth": max(rec.pop("rss_trainer_growth"), default=None),
            "worker": max(rec.pop("rss_worker"), default=None),
        }
        fb = rec.pop("file_bytes")
        rec["file_bytes"] = fb[-1] if fb else None
    out_limits = {
        "memcpy_s": stats(limits["memcpy_s"]),
        "memcpy_gbps": stats([nbytes / t / 1e9 for t in limits["memcpy_s"]]),
        "memcpy_libc_s": stats(limits["memcpy_libc_s"]),
        "memcpy_torch_s": stats(limits["memcpy_torch_s"]),
        "disk_s": stats(limits["disk_s"]),
        "disk_gbps": stats([nbytes / t / 1e9 for t in limits["disk_s"]]),
        "disk_method": ("aiobotocore multipart upload, 32 MiB parts, 8 in flight" if s3
                        else "the fastest per repetition of: " + "; ".join(m[0] for m in E.RAW_DISK_METHODS)
                        + " (then fsync of the directory)"),
        "disk_methods_s": {k[len("disk_method_s["):-1]: stats(v) for k, v in limits.items()
                           if k.startswith("disk_method_s[")},
        "disk_winners": winners,
        "memcpy_method": ("every tensor copied into one preallocated, already faulted-in buffer; per repetition "
                          "the faster of libc memcpy (one thread) and torch copy_ (intra-op threads)"),
    }
    return {"engines": results, "limits": out_limits}


# -- the training-loop benchmark -------------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def run_training(args: argparse.Namespace, root: str, engines: list[E.Engine]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Block(args.train_width) for _ in range(args.train_blocks)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(args.train_batch, args.train_width)
    y = torch.randn(args.train_batch, args.train_width)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()

    for _ in range(3):  # Adam state exists from here on
        step()
        opt.step()
        opt.zero_grad()

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    state_bytes = E.state_nbytes(state())
    nparams = sum(p.numel() for p in model.parameters())
    log(f"training loop: {nparams / 1e6:.1f} M params, state {state_bytes / MiB:.0f} MiB, "
        f"{args.train_steps} steps, a save every {args.train_every}")
    def loop(e: E.Engine | None) -> dict[str, Any]:
        times: list[float] = []
        saves: list[int] = []
        blocked: list[float] = []
        dests: list[str] = []
        for s in range(args.train_steps):
            t0 = time.perf_counter()
            saving = e is not None and s > 0 and s % args.train_every == 0
            if saving:
                assert e is not None
                e.before_next_save()
                dest = e.dest(root, f"train-{s}")
                dests.append(dest)
                e.begin(state(), dest, s)
                if e.mode == "sync":
                    e.wait_durable()
                saves.append(s)
                tb = time.perf_counter() - t0
            step()
            if saving:
                assert e is not None
                t2 = time.perf_counter()
                e.wait_unblocked()
                blocked.append(tb + time.perf_counter() - t2)
            opt.step()
            opt.zero_grad()
            if e is not None:
                e.poll()
            times.append(time.perf_counter() - t0)
        drain = 0.0
        if e is not None:
            t0 = time.perf_counter()
            e.wait_durable()
            drain = time.perf_counter() - t0
            for d in dests:
                e.remove(d)
        return {"step_s": times, "save_steps": saves, "blocked_s": blocked, "drain_s": drain,
                "mean_step_s": statistics.fmean(times)}

    out: dict[str, Any] = {}
    log("training loop: baseline (no checkpointing)")
    base1 = loop(None)
    for e in engines:
        gc.collect()
        log(f"training loop: {e.label}")
        out[e.name] = loop(e)
        out[e.name]["label"] = e.label
    log("training loop: baseline again")
    base2 = loop(None)
    base_mean = (base1["mean_step_s"] + base2["mean_step_s"]) / 2
    spread = abs(base1["mean_step_s"] - base2["mean_step_s"]) / base_mean * 100
    for r in out.values():
        r["inflation_pct"] = (r["mean_step_s"] / base_mean - 1) * 100
        saves = set(r["save_steps"])
        quiet = [t for i, t in enumerate(r["step_s"]) if i not in saves]
        r["mean_nonsave_step_s"] = statistics.fmean(quiet) if quiet else None
    return {
        "model": f"{args.train_blocks} x (Linear({args.train_width},{4 * args.train_width}) GELU "
                 f"Linear({4 * args.train_width},{args.train_width}), residual), Adam",
        "params": nparams,
        "state_mib": state_bytes / MiB,
        "batch": args.train_batch,
        "steps": args.train_steps,
        "every": args.train_every,
        "baseline": {"mean_step_s": base_mean, "runs_mean_step_s": [base1["mean_step_s"], base2["mean_step_s"]],
                     "spread_pct": spread, "step_s": base1["step_s"], "step_s_after": base2["step_s"]},
        "engines": out,
    }


# -- targets ---------------------------------------------------------------------------------------------


def check_targets(res: dict[str, Any]) -> dict[str, Any]:
    eng = res["engines"]
    lim = res["limits"]
    ours = [n for n in ("asyncckpt_save", "asyncckpt_torch", "asyncckpt_dcp") if eng.get(n, {}).get("available")]
    out: dict[str, Any] = {}
    memcpy = lim["memcpy_s"]["median"]
    disk = lim["disk_s"]["median"]
    others = {n: r["blocked_s"]["median"] for n, r in eng.items() if r.get("available") and n not in ours}
    for n in ours:
        r = eng[n]
        b, d = r["blocked_s"]["median"], r["durable_s"]["median"]
        t: dict[str, Any] = {}
        if memcpy:
            ratio = b / memcpy
            t["blocked_vs_memcpy"] = {"value": ratio, "target": TARGET_BLOCKED_VS_MEMCPY, "met": ratio <= TARGET_BLOCKED_VS_MEMCPY}
        best_other = min(others.items(), key=lambda kv: kv[1]) if others else None
        t["blocked_lowest"] = {
            "value": b, "best_other": best_other[0] if best_other else None,
            "best_other_s": best_other[1] if best_other else None,
            "met": best_other is None or b <= best_other[1],
        }
        if disk:
            ratio = d / disk
            t["durable_vs_disk"] = {"value": ratio, "target": TARGET_DURABLE_VS_DISK, "met": ratio <= TARGET_DURABLE_VS_DISK}
        ref = eng.get("torch_save", {})
        if ref.get("available") and ref["load_s"]["median"]:
            ratio = r["load_s"]["median"] / ref["load_s"]["median"]
            t["load_vs_torch_load"] = {"value": ratio, "target": TARGET_LOAD_VS_TORCH_LOAD, "met": ratio <= TARGET_LOAD_VS_TORCH_LOAD}
        w = r["peak_rss_mib"]["worker"]
        br = r.get("worker_rss_breakdown_mib")
        if w is not None and br is not None:
            pool = br["shared_anon"]
            own = w - br["shared_with_trainer"]
            t["worker_rss"] = {
                "peak_mib": w, "shared_with_trainer_mib": br["shared_with_trainer"], "staging_pool_mib": pool,
                "peak_minus_shared_mib": own, "limit_mib": pool + TARGET_WORKER_EXTRA_MIB,
                "met": own <= pool + TARGET_WORKER_EXTRA_MIB,
            }
        tr = res.get("train", {}).get("engines", {}).get(n)
        if tr is not None:
            t["train_inflation_pct"] = {"value": tr["inflation_pct"], "target": TARGET_INFLATION_PCT,
                                        "every": res["train"]["every"], "met": tr["inflation_pct"] <= TARGET_INFLATION_PCT}
        out[n] = t
    return out


# -- report ----------------------------------------------------------------------------------------------


def _ratio_table(res: dict[str, Any]) -> str:
    """Every engine against the limits: blocked / memcpy floor, durable / disk limit, load / torch.load."""
    lim, eng = res["limits"], res["engines"]
    memcpy, disk = lim["memcpy_s"]["median"], lim["disk_s"]["median"]
    ref = eng.get("torch_save", {})
    tl = ref["load_s"]["median"] if ref.get("available") else None

    def ratio(x: float | None, base: float | None) -> str:
        return f"{x / base:.2f} x" if x and base else "-"

    head = f"{'ratios (medians)':34s} {'blocked/memcpy':>15s} {'durable/disk':>13s} {'load/torch.load':>16s}"
    lines = [head, "-" * len(head)]
    for r in eng.values():
        if r.get("available"):
            lines.append(f"{r['label']:34s} {ratio(r['blocked_s']['median'], memcpy):>15s} "
                         f"{ratio(r['durable_s']['median'], disk):>13s} {ratio(r['load_s']['median'], tl):>16s}")
    return "\n".join(lines)


def summary_table(res: dict[str, Any]) -> str:
    lim = res["limits"]
    size = res["meta"]["nbytes"] / MiB
    lines = [f"state: {size:.0f} MiB in {res['meta']['tensors']} tensors of {res['meta']['dtype']}; "
             f"{res['meta']['reps']} repetitions (median [min-max]); 1-min load average "
             f"{res['meta']['loadavg_start'][0]:.1f} at start, {res['meta'].get('loadavg_end', [0.0])[0]:.1f} at end "
             f"on {res['meta']['cpus']} CPUs", ""]
    hdr = f"{'engine':34s} {'blocked s':>22s} {'durable s':>22s} {'GB/s':>6s} {'load s':>7s} {'RSS tr/wk MiB':>15s}"
    lines += [hdr, "-" * len(hdr)]

    def f3(s: dict[str, Any]) -> str:
        return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"

    for r in res["engines"].values():
        if not r.get("available"):
            lines.append(f"{r['label']:34s} not run: {r['reason']}")
            continue
        rss = r["peak_rss_mib"]
        wk = f"{rss['worker']:.0f}" if rss["worker"] is not None else "-"
        lines.append(f"{r['label']:34s} {f3(r['blocked_s']):>22s} {f3(r['durable_s']):>22s} "
                     f"{r['write_gbps']['median']:6.2f} {r['load_s']['median']:7.3f} {rss['trainer']:7.0f}/{wk:>7s}"
                     f"{'' if r['verified'] else '  LOAD MISMATCH'}")
    lines.append(f"{'limit: memcpy (snapshot floor)':34s} {f3(lim['memcpy_s']):>22s} {'':>22s} "
                 f"{lim['memcpy_gbps']['median']:6.2f}")
    lines.append(f"{'limit: raw write (' + ('S3' if res['meta']['s3'] else 'disk') + ')':34s} {'':>22s} "
                 f"{f3(lim['disk_s']):>22s} {lim['disk_gbps']['median']:6.2f}")
    methods = lim.get("disk_methods_s") or {}
    if methods:
        won = lim.get("disk_winners") or []
        lines.append("  disk limit = the fastest way per repetition; median s of each way"
                     " (times it was the fastest):")
        for m, s in sorted(methods.items(), key=lambda kv: kv[1]["median"]):
            lines.append(f"    {m:50s} {s['median']:7.3f}  ({won.count(m)}/{len(won)})")
    lines += ["", _ratio_table(res)]
    tr = res.get("train")
    if tr:
        lines += ["", f"training loop: {tr['params'] / 1e6:.1f} M params, {tr['state_mib']:.0f} MiB state, "
                      f"save every {tr['every']} of {tr['steps']} steps; baseline {tr['baseline']['mean_step_s'] * 1e3:.1f} ms/step "
                      f"(two baseline runs differ by {tr['baseline']['spread_pct']:.1f} %)"]
        for r in tr["engines"].values():
            bl = statistics.fmean(r["blocked_s"]) if r["blocked_s"] else 0.0
            lines.append(f"  {r['label']:32s} inflation {r['inflation_pct']:6.1f} %   mean blocked per save {bl:.3f} s")
    if res.get("targets"):
        lines += ["", "targets:"]
        for n, t in res["targets"].items():
            for k, v in t.items():
                val = v.get("value")
                shown = f"{val:.3f}" if isinstance(val, float) else str(val)
                if k == "worker_rss":
                    shown = f"{v['peak_minus_shared_mib']:.0f} MiB (limit {v['limit_mib']:.0f})"
                if k == "blocked_lowest":
                    shown = f"{val:.3f} s vs best other {v['best_other']} {v['best_other_s']:.3f} s" if v["best_other"] else shown
                lines.append(f"  {n:18s} {k:22s} {shown:>40s}  {'met' if v['met'] else 'NOT MET'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=None, help="state size in MiB (default 1024; 256 with --quick)")
    p.add_argument("--tensors", type=int, default=64, help="number of tensors in the state (default 64)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--reps", type=int, default=None, help="measured repetitions per engine (default 3; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, not reported (default 1)")
    p.add_argument("--quick", action="store_true", help="256 MiB, 2 repetitions, a small training loop")
    p.add_argument("--dir", default=None, help="directory to write checkpoints in (default: a new dir under /tmp)")
    p.add_argument("--engines", default=None, help=f"comma-separated subset of: {','.join(E.ENGINE_NAMES)}")
    p.add_argument("--json", dest="json_path", default=None, help="write every figure as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG: blocked/durable bars and the training-loop timeline")
    p.add_argument("--uri", default=None, help="S3 mode: s3://bucket/prefix to write to")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (e.g. http://127.0.0.1:9000)")
    p.add_argument("--region", default=None, help="S3 region (default: AWS_DEFAULT_REGION or us-east-1)")
    p.add_argument("--no-train", action="store_true", help="skip the training-loop benchmark")
    p.add_argument("--train-steps", type=int, default=None, help="training steps per engine (default 200; quick 100)")
    p.add_argument("--train-every", type=int, default=None, help="save every N steps (default 50; quick 25)")
    p.add_argument("--train-width", type=int, default=None, help="model width (default 1024; quick 512)")
    p.add_argument("--train-blocks", type=int, default=None, help="MLP blocks (default 3; quick 2)")
    p.add_argument("--train-batch", type=int, default=32, help="batch size (default 32)")
    a = p.parse_args(argv)
    q = a.quick
    a.size_mib = a.size_mib or (256 if q else 1024)
    a.reps = a.reps or (2 if q else 3)
    a.train_steps = a.train_steps or (100 if q else 200)
    a.train_every = a.train_every or (25 if q else 50)
    a.train_width = a.train_width or (512 if q else 1024)
    a.train_blocks = a.train_blocks or (2 if q else 3)
    if a.size_mib < 1 or a.tensors < 1 or a.reps < 1 or a.warmup < 0 or a.train_every < 1:
        p.error("--size-mib, --tensors, --reps and --train-every must be >= 1, --warmup >= 0")
    if a.uri is not None and not a.uri.startswith("s3://"):
        p.error("--uri must be s3://bucket/prefix (local runs use --dir)")
    if a.engines:
        bad = [n for n in a.engines.split(",") if n not in E.ENGINE_NAMES]
        if bad:
            p.error(f"unknown engine(s) {bad}; choose from {E.ENGINE_NAMES}")
    return a


def init_single_rank_group(root: str) -> None:
    """A 1-rank gloo group (FileStore: no listening socket), as DCP's process executor requires."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not dist.is_initialized():
        store = dist.FileStore(os.path.join(root, "pg-store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    s3 = args.uri is not None
    own_root = args.dir is None
    root = tempfile.mkdtemp(prefix="asyncckpt-bench-", dir=None) if own_root else os.path.abspath(args.dir)
    os.makedirs(root, exist_ok=True)
    storage_options: dict[str, Any] = {}
    if s3:
        if args.endpoint_url:
            storage_options["endpoint_url"] = args.endpoint_url
        storage_options["region_name"] = args.region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    init_single_rank_group(root)
    log(f"torch {torch.__version__}, {os.cpu_count()} CPUs, writing under {args.uri if s3 else root}")
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    sd = make_state(args.size_mib, args.tensors, dtype)
    nbytes = E.state_nbytes(sd)
    log(f"state: {nbytes / MiB:.0f} MiB in {len(sd)} tensors ({time.perf_counter() - t0:.1f} s to make)")
    res: dict[str, Any] = {
        "meta": {
            "command": "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "size_mib": args.size_mib, "nbytes": nbytes, "tensors": len(sd), "dtype": args.dtype,
            "reps": args.reps, "warmup": args.warmup, "quick": args.quick, "s3": s3,
            "destination": args.uri if s3 else root, "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "machine": platform.platform(),
            "mem_gib": psutil.virtual_memory().total / (1 << 30),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "gb": "GB/s figures use 1 GB = 1e9 bytes; sizes in MiB",
            "loadavg_start": list(os.getloadavg()),
        },
    }
    engines: list[E.Engine] = []
    try:
        engines, results = open_engines(args, root, s3, storage_options)
        res.update(run_engines(args, sd, root, s3, storage_options, engines, results))
        del sd
        gc.collect()
        if not args.no_train and not s3:
            res["train"] = run_training(args, root, engines)
        res["targets"] = check_targets(res)
        res["meta"]["duration_s"] = time.perf_counter() - t_start
        res["meta"]["loadavg_end"] = list(os.getloadavg())
        table = summary_table(res)
        print(table)
        if args.json_path:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
            with open(args.json_path, "w") as f:
                json.dump(res, f, indent=1)
            log(f"wrote {args.json_path}")
        if args.plot:
            import _plot

            _plot.plot(res, args.plot)
            log(f"wrote {args.plot}")
    finally:
        for e in engines:
            with contextlib.suppress(Exception):
                e.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if own_root:
            E.remove_path(root)
    log(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
