"""What a checkpoint costs the training loop (issue 13): per save, per step, per tensor, first save.

    python bench/loop_cost.py [--quick] [--backends local moto seaweed] [--json OUT]

Four figures, each a ratio or a time measured in this one run (the machine is noisy: read the
load average printed with them):

1. **loop time per save** for the examples/train.py model (MLP + AdamW + cosine schedule, ~1 MiB
   state), local and ``s3://`` (moto in its own process, SeaweedFS): the time the training thread
   spends inside asyncckpt from one save to the next (the saving call, the other ``maybe_save``
   calls with their finalize work, the snapshot wait in ``optimizer.step``), median and p99 over
   saves (target <= 1 ms, <= 5 ms). Also the ``maybe_save`` call on save steps alone, and the extra
   loop time of a saving segment over a plain one (noisy here: +-10 % of a step between segments).
   Next to it: ``torch.save`` and ``dcp.async_save`` of the same state (the time the loop is
   blocked per save), local disk.
2. **step-time inflation** of that loop with a save every 50 steps (target: <= 5 %): per repetition
   a fresh manager warmed up before the loop (as examples/train.py does), segments with and without
   saves interleaved.
3. **save() of N small tensors** (1,000 .. 100,000 tensors of 64 bytes): the time ``save`` blocks
   (median of 3 saves of the same structure after a first one), and per tensor (O(N) check).
4. **first save vs later saves** of the same state right after construction: a bare
   ``AsyncCheckpointer``, one after ``warm_up(state)``, and a ``CheckpointManager`` (which warms
   up at its first ``maybe_save`` that does not save).
5. **the worker's start in the loop**: the longest ``maybe_save`` call of the first five saves of a
   manager that starts training right after its construction, without and with
   ``mgr.warm_up(state)`` before the loop (a save asked for while the worker still starts waits
   for a slot).

Every figure is a median over repetitions inside this one run; a summary table closes the output.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.s3_servers for moto / SeaweedFS

import asyncckpt


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    return model, opt, sched


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, n: int, hook: Any = None) -> list[float]:
    x, y = torch.randn(128, 64), torch.randn(128, 1)
    times = []
    for step in range(1, n + 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if hook is not None:
            hook(step)
        times.append(time.perf_counter() - t0)
    return times


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def loop_per_save(root: str, options: dict[str, Any], steps: int, every: int, repeats: int) -> dict[str, Any]:
    """Loop time per save: what the training thread spends inside asyncckpt, and the extra loop time.

    One model and one manager; ``repeats`` rounds of a segment without saves then a segment of the
    same length with a save at the first step of every ``every`` (so each save's background work
    lies inside its segment), then a wait for the last commit that is not timed.

    *Inside asyncckpt per save* is timed directly: from one save step to the next, every
    ``maybe_save`` call (the save itself, the finalize calls that commit it, the checks of the steps
    that do not save) plus the snapshot wait in ``optimizer.step`` (two pre-hooks of the bench, one
    registered before asyncckpt's and one after, time it). That is the issue's "loop time per save"
    (save + snapshot wait + finalize calls), median and p99 over saves.

    *Extra loop time per save* = (timed segment - plain segment) / saves: it also holds what the
    worker's CPU time costs the loop on a machine with few cores, and the noise of two different
    segments (on a shared 2-core VM, +-10 % of a step between segments: read it over many rounds).
    """
    extra: list[float] = []
    calls: list[float] = []
    waited: list[bool] = []
    base_means: list[float] = []
    by_offset: list[list[float]] = [[] for _ in range(every)]
    intervals: list[dict[str, float]] = []  # per save: time inside asyncckpt until the next save
    model, opt, sched = _model()
    _steps(model, opt, sched, 20)
    hook_t0 = [0.0]
    in_hooks = [0.0]
    opt.register_step_pre_hook(lambda *_: hook_t0.__setitem__(0, time.perf_counter()))  # runs before asyncckpt's
    with asyncckpt.CheckpointManager(root, every_steps=every, keep_last=2, signals=(), storage_options=options) as mgr:
        state = {"model": model, "optim": opt, "sched": sched}
        mgr.warm_up(state)
        mgr.maybe_save(every, state)  # first save not timed
        mgr.wait()

        def after_ours(*_: Any) -> None:
            in_hooks[0] += time.perf_counter() - hook_t0[0]

        opt.register_step_pre_hook(after_ours)  # after asyncckpt's: the pair brackets its snapshot wait
        counter = [every]
        current: dict[str, float] = {}

        def hook(step: int) -> None:
            full = mgr.in_flight >= mgr.ckpt.max_in_flight  # this call will wait for a slot
            counter[0] += 1
            t0 = time.perf_counter()
            h = mgr.maybe_save(counter[0], state)
            dt = time.perf_counter() - t0
            if h is not None:
                calls.append(dt)
                waited.append(full)
                if current:
                    intervals.append(dict(current))
                current.clear()
                current.update(save=dt, other_calls=0.0, hooks=0.0)
                in_hooks[0] = 0.0
            elif current:
                current["other_calls"] += dt
                current["hooks"] = in_hooks[0]

        for _ in range(repeats):
            base = _steps(model, opt, sched, steps)
            counter[0] += -(counter[0] + 1) % every  # the segment's first step saves
            timed = _steps(model, opt, sched, steps, hook)
            if current:
                intervals.append(dict(current))
                current.clear()
            mgr.wait()
            mean = statistics.mean(base)
            extra.append((sum(timed) - sum(base)) / -(-steps // every))
            base_means.append(mean)
            for i, t in enumerate(timed):
                by_offset[i % every].append(t - mean)
    rest = [x for xs in by_offset[4:] for x in xs]
    inside = [sum(iv.values()) for iv in intervals]
    return {
        "inside_s_per_save_median": statistics.median(inside),
        "inside_s_per_save_p99": _pct(inside, 0.99),
        "inside_parts_s_median": {k: statistics.median(iv[k] for iv in intervals) for k in ("save", "other_calls", "hooks")},
        "saves_timed": len(intervals),
        "loop_s_per_save_median": statistics.median(extra),
        "loop_s_per_save_runs": extra,
        "maybe_save_call_median_s": statistics.median(calls),
        "maybe_save_call_p99_s": _pct(calls, 0.99),
        "maybe_save_calls": len(calls),
        # saves asked for while max_in_flight saves were still writing: maybe_save waits (when_full="wait")
        "maybe_save_calls_waiting_for_a_slot": sum(waited),
        "step_s_median": statistics.median(base_means),
        # mean extra step time at offsets 0 (the save step), 1, 2, 3 after a save, and the mean of the rest
        "extra_s_by_offset": [statistics.mean(xs) for xs in by_offset[:4]] + [statistics.mean(rest) if rest else 0.0],
    }


def others_per_save(root: str, n: int) -> dict[str, float]:
    """torch.save and dcp.async_save of the same state: time the loop is blocked per save."""
    import torch.distributed.checkpoint as dcp

    os.makedirs(root, exist_ok=True)
    model, opt, sched = _model()
    _steps(model, opt, sched, 5)
    out: dict[str, float] = {}
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()},
                   os.path.join(root, f"ts{i % 2}.pt"))
        ts.append(time.perf_counter() - t0)
    out["torch.save_s_median"] = statistics.median(ts)
    ts = []
    fut = None
    for i in range(n):
        t0 = time.perf_counter()
        if fut is not None:
            fut.result()
        fut = dcp.async_save({"model": model.state_dict(), "optim": opt.state_dict()},
                             checkpoint_id=os.path.join(root, f"dcp{i % 2}"))
        ts.append(time.perf_counter() - t0)
    fut.result()  # type: ignore[union-attr]
    out["dcp.async_save_s_median"] = statistics.median(ts)
    return out


def _inflation_once(root: str, steps: int, every: int, pairs: int) -> float:
    model, opt, sched = _model()
    _steps(model, opt, sched, 20)
    base_s = timed_s = 0.0
    with asyncckpt.CheckpointManager(root, every_steps=every, keep_last=2, signals=()) as mgr:
        state = {"model": model, "optim": opt, "sched": sched}
        mgr.warm_up(state)
        step = [0]

        def hook(_: int) -> None:
            step[0] += 1
            mgr.maybe_save(step[0], state)

        for _ in range(pairs):
            base_s += sum(_steps(model, opt, sched, steps))
            step[0] += -(step[0] + 1) % every  # the segment's first step saves
            timed_s += sum(_steps(model, opt, sched, steps, hook))
            mgr.wait()
    return timed_s / base_s - 1


def inflation(root: str, steps: int, every: int, repeats: int, pairs: int = 3) -> dict[str, Any]:
    """Step-time inflation of a run as examples/train.py makes it: a fresh model, root and manager,
    ``warm_up(state)`` before the loop, then ``pairs`` segments of ``steps`` steps without saves
    interleaved with segments of ``steps`` steps saving every ``every`` (drifting machine load hits
    both alike; the wait for the last commit between segments is not timed). One ratio per repeat:
    all timed steps over all plain steps, minus 1."""
    ratios = [_inflation_once(os.path.join(root, f"run{r}"), steps, every, pairs) for r in range(repeats)]
    return {"inflation_median": statistics.median(ratios), "inflation_runs": ratios}


def many_tensors(root: str, counts: list[int], first: dict[str, float]) -> dict[str, Any]:
    """save() of ``n`` small tensors: median of 5 saves after a first one (whose time goes to ``first``)."""
    out = {}
    for n in counts:
        state = {f"layer{i}.weight": torch.randn(16) for i in range(n)}
        with asyncckpt.AsyncCheckpointer(snapshot="lazy") as ck:
            t0 = time.perf_counter()
            ck.save(state, os.path.join(root, f"n{n}-warm"))
            first[str(n)] = time.perf_counter() - t0
            ck.finalize(blocking=True)
            ts = []
            for i in range(5):
                t0 = time.perf_counter()
                ck.save(state, os.path.join(root, f"n{n}-{i}"))
                ts.append(time.perf_counter() - t0)
                ck.finalize(blocking=True)
        out[str(n)] = statistics.median(ts)
    return out


def _first_and_later(root: str, warm: bool) -> tuple[float, float]:
    model, opt, sched = _model()
    _steps(model, opt, sched, 3)
    with asyncckpt.AsyncCheckpointer(optimizers=opt) as ck:
        if warm:
            ck.warm_up({"model": model.state_dict(), "optim": opt.state_dict()})
        t0 = time.perf_counter()
        ck.save({"model": model.state_dict(), "optim": opt.state_dict()}, os.path.join(root, f"first-{warm}"))
        first = time.perf_counter() - t0
        ck.finalize(blocking=True)
        later = []
        for i in range(5):
            t0 = time.perf_counter()
            ck.save({"model": model.state_dict(), "optim": opt.state_dict()}, os.path.join(root, f"later-{warm}-{i}"))
            later.append(time.perf_counter() - t0)
            ck.finalize(blocking=True)
    return first, statistics.median(later)


def _manager_save_calls(root: str, every: int, saves: int, *, warm: bool = False,
                        wait_each: bool = False) -> list[float]:
    """The ``maybe_save`` calls that saved in ``every * saves`` steps of a fresh manager (seconds);
    ``warm``: ``mgr.warm_up(state)`` first; ``wait_each``: wait (untimed) for each save's commit."""
    model, opt, sched = _model()
    calls: list[float] = []
    with asyncckpt.CheckpointManager(root, every_steps=every, keep_last=2, signals=()) as mgr:
        state = {"model": model, "optim": opt, "sched": sched}
        if warm:
            mgr.warm_up(state)

        def hook(step: int) -> None:
            t0 = time.perf_counter()
            if mgr.maybe_save(step, state) is not None:
                calls.append(time.perf_counter() - t0)
                if wait_each:
                    mgr.wait()

        _steps(model, opt, sched, every * saves, hook)
    return calls


def _manager_first_and_later(root: str, every: int) -> tuple[float, float]:
    # each save starts from an idle worker, as the first one does
    calls = _manager_save_calls(root, every, 6, wait_each=True)
    return calls[0], statistics.median(calls[1:])


def first_vs_later(root: str, repeats: int) -> dict[str, Any]:
    """The first save of a fresh checkpointer against later ones (each a median over ``repeats`` fresh runs)."""
    out: dict[str, Any] = {}
    for label, fn in (("bare", lambda i: _first_and_later(os.path.join(root, f"b{i}"), False)),
                      ("warm_up", lambda i: _first_and_later(os.path.join(root, f"w{i}"), True)),
                      ("manager", lambda i: _manager_first_and_later(os.path.join(root, f"m{i}"), 10))):
        firsts, laters = zip(*(fn(i) for i in range(repeats)))
        f, later = statistics.median(firsts), statistics.median(laters)
        out[label] = {"first_s": f, "later_s": later, "ratio": f / later}
    return out


def _startup_once(root: str, every: int, warm: bool) -> float:
    return max(_manager_save_calls(root, every, 5, warm=warm))


def startup_stall(root: str, every: int, repeats: int) -> dict[str, Any]:
    """The longest maybe_save call of the first five saves right after construction, without and
    with ``warm_up`` before the loop; each run in a fresh process (a process starts its first
    worker from scratch: later ones are forked from a warm template), median over ``repeats``."""
    out: dict[str, Any] = {}
    here = os.path.dirname(os.path.abspath(__file__))
    for label, warm in (("no warm_up", False), ("warm_up", True)):
        longest = []
        for i in range(repeats):
            code = (f"import sys; sys.path.insert(0, {here!r}); import torch; torch.set_num_threads(1); import loop_cost; "
                    f"print(loop_cost._startup_once({os.path.join(root, f'{int(warm)}-{i}')!r}, {every}, {warm}))")
            done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            longest.append(float(done.stdout.split()[-1]))
        out[label] = {"longest_call_s": statistics.median(longest), "runs": longest}
    return out


def _ms(x: float) -> str:
    return f"{1e3 * x:8.2f} ms"


def summary(res: dict[str, Any]) -> None:
    """The closing table: every figure of this run with its target."""
    print("\n== summary (medians over repetitions in this run) ==")
    print(f"load average at start {res['load_average_start']}, at end {res['load_average_end']}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    others = res.get("others", {})
    ts, dcp = others.get("torch.save_s_median"), others.get("dcp.async_save_s_median")
    print(f"loop time per save, examples/train.py model (~1 MiB, MLP + AdamW + cosine), save every {res.get('every', 50)} steps:")
    for key, val in res.items():
        if not key.startswith("per_save["):
            continue
        if "error" in val:
            print(f"  {key[9:-1]:8s} unavailable: {val['error']}")
            continue
        parts = val["inside_parts_s_median"]
        print(f"  {key[9:-1]:8s} inside asyncckpt per save median {_ms(val['inside_s_per_save_median'])}  "
              f"p99 {_ms(val['inside_s_per_save_p99'])}  [target <= 1 ms median, <= 5 ms p99]  "
              f"({val['saves_timed']} saves; parts, medians: the saving call {_ms(parts['save']).strip()}, "
              f"the other {res.get('every', 50) - 1} maybe_save calls {_ms(parts['other_calls']).strip()}, "
              f"snapshot waits in optimizer.step {_ms(parts['hooks']).strip()})")
        print(f"           maybe_save call on save steps median {_ms(val['maybe_save_call_median_s'])}  "
              f"p99 {_ms(val['maybe_save_call_p99_s'])}  ({val['maybe_save_calls']} saves, "
              f"{val['maybe_save_calls_waiting_for_a_slot']} waited for a slot); "
              f"extra loop time per save {_ms(val['loop_s_per_save_median'])} (segment difference, noisy)")
        off = val.get("extra_s_by_offset")
        if off:
            print("           extra step time after a save: " + ", ".join(
                f"step +{i} {1e3 * x:.2f} ms" for i, x in enumerate(off[:-1])) + f", later steps {1e3 * off[-1]:.3f} ms each")
    if ts is not None:
        print(f"  torch.save (local, blocking)      {_ms(ts)}")
        print(f"  dcp.async_save (local, call+wait) {_ms(dcp)}")
        mine = res.get("per_save[local]", {}).get("inside_s_per_save_median")
        if mine:
            print(f"  ratio asyncckpt (inside per save, local)/torch.save {mine / ts:.2f}, /dcp.async_save {mine / dcp:.2f}")
    inf = res.get("inflation[every 50]")
    if inf:
        print(f"step-time inflation, save every 50 steps: {100 * inf['inflation_median']:+.1f} % "
              f"(runs {', '.join(f'{100 * r:+.1f}' for r in inf['inflation_runs'])}) [target <= 5 %]")
    many = res.get("save_s_by_tensor_count", {})
    if many:
        print("save() of N small tensors (16 float32 each): " + ", ".join(
            f"{int(n):,}: {_ms(t).strip()} ({1e6 * t / int(n):.2f} us/tensor)" for n, t in many.items())
            + " [target: 50,000 <= 50 ms, O(N)]")
        print("  the first save of each (plans the layout): " + ", ".join(
            f"{int(n):,}: {_ms(t).strip()}" for n, t in res.get("save_s_by_tensor_count_first", {}).items()))
    for label, v in res.get("first_vs_later", {}).items():
        print(f"first save vs later ({label:7s}): first {_ms(v['first_s'])}, later {_ms(v['later_s'])}, "
              f"ratio {v['ratio']:.2f} [target <= 2]")
    for label, v in res.get("startup_stall", {}).items():
        print(f"longest maybe_save of the first 5 saves after construction ({label}): {_ms(v['longest_call_s'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and repetitions (a smoke run)")
    ap.add_argument("--backends", nargs="*", default=["local", "moto", "seaweed"])
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    steps, every, reps = (100, 10, 1) if args.quick else (600, 50, 5)
    torch.set_num_threads(1)
    res: dict[str, Any] = {"load_average_start": os.getloadavg(), "every": every}
    servers: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            root, options = os.path.join(tmp, backend), {}
            try:
                if backend == "moto":
                    from tests.s3_servers import MotoProcessServer

                    srv: Any = MotoProcessServer()  # its own process: a threaded one would take the loop's GIL
                    srv.start()
                    servers.append(srv)
                    root, options = f"s3://{srv.create_bucket()}/run", srv.options()
                elif backend == "seaweed":
                    from tests.s3_servers import SeaweedServer

                    srv = SeaweedServer(Path(tmp) / "weed")
                    srv.start()
                    servers.append(srv)
                    root, options = f"s3://{srv.create_bucket()}/run", srv.options()
            except Exception as exc:  # noqa: BLE001 - a server that cannot start here is reported, not fatal
                res[f"per_save[{backend}]"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(backend, "unavailable:", res[f"per_save[{backend}]"]["error"], flush=True)
                continue
            res[f"per_save[{backend}]"] = loop_per_save(root, options, steps, every, reps)
            print(backend, json.dumps(res[f"per_save[{backend}]"]), flush=True)
        res["others"] = others_per_save(os.path.join(tmp, "others"), 5 if args.quick else 20)
        print("others", json.dumps(res["others"]), flush=True)
        res["inflation[every 50]"] = inflation(os.path.join(tmp, "infl"), steps, 50, reps)
        print("inflation", json.dumps(res["inflation[every 50]"]), flush=True)
        res["save_s_by_tensor_count_first"] = {}
        res["save_s_by_tensor_count"] = many_tensors(os.path.join(tmp, "many"),
                                                     [1000, 10000] if args.quick else [1000, 10000, 50000, 100000],
                                                     res["save_s_by_tensor_count_first"])
        print("tensors", json.dumps(res["save_s_by_tensor_count"]), flush=True)
        res["first_vs_later"] = first_vs_later(os.path.join(tmp, "first"), 3 if args.quick else 5)
        print("first", json.dumps(res["first_vs_later"]), flush=True)
        res["startup_stall"] = startup_stall(os.path.join(tmp, "startup"), every, 2 if args.quick else 3)
        print("startup", json.dumps(res["startup_stall"]), flush=True)
        for srv in servers:
            srv.stop() if hasattr(srv, "stop") else srv.kill()
    res["load_average_end"] = os.getloadavg()
    summary(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
