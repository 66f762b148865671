"""The process the crash driver kills: a training loop that saves a stream of checkpoints.

``python -m tests.torture.trainer --root DIR [options]``; with ``WORLD_SIZE``/``RANK``/
``MASTER_PORT`` in the environment it joins a gloo group. It resumes from the newest complete
checkpoint under DIR (checking it holds exactly the state of its step), then saves
``--saves`` more, mutating the state right after each snapshot as an optimizer step would, and
applies retention (keep the newest ``--keep``, delete incomplete leftovers older than the newest
complete one). Lines on stdout tell the driver what happened::

    PID trainer|worker <pid>      FINALIZED <name>     (finalize returned with it committed)
    READY <start step>            FAILED <name> <err>  (the save's error surfaced at finalize)
    SAVED <name>                  DONE                 PROBLEM <text>
    @@ ...                        phase lines, see tests.torture._inject
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--numel", type=int, default=1 << 20)
    ap.add_argument("--saves", type=int, default=6)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--no-latest", default="", help="comma-separated steps saved with update_latest=False")
    ap.add_argument("--blocking-every", type=int, default=2, help="finalize(blocking=True) every N saves")
    ap.add_argument("--manager", action="store_true", help="save through CheckpointManager (every step, keep_last)")
    args = ap.parse_args(argv)

    from . import _inject

    _inject.install()
    say = _inject.say
    say(f"PID trainer {os.getpid()}")

    import torch
    import torch.distributed as dist

    import asyncckpt
    from asyncckpt._loop import run_sync
    from asyncckpt.catalog import delete_checkpoint, list_all
    from asyncckpt.errors import CheckpointError
    from asyncckpt.storage import open_storage

    from .common import (
        CHUNK,
        ckpt_name,
        diff_states,
        fill_state,
        incremental,
        join,
        make_state,
        mutate_state,
        step_of,
        storage_options,
    )

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank, world_size=world
        )
    opts = storage_options()
    storage = open_storage(args.root, **opts)
    if args.manager:
        return _manager_loop(args, rank, world, say)
    no_latest = {int(s) for s in args.no_latest.split(",") if s}

    # -- resume: the newest complete checkpoint must hold exactly its step's state ---------------------
    infos = run_sync(list_all(storage))
    complete = sorted((i for i in infos if i.complete), key=lambda i: i.step, reverse=True)
    start = complete[0].step + 1 if complete else 0
    if complete:
        got = asyncckpt.load(join(args.root, complete[0].name), rank=rank, storage_options=opts)
        bad = diff_states(got, fill_state(make_state(args.numel), complete[0].step, rank))
        if bad:
            say(f"PROBLEM resume from {complete[0].name}: {bad[:3]}")
            return 7
    if world > 1:
        t = torch.tensor([start], dtype=torch.int64)
        dist.broadcast(t, 0)
        start = int(t.item())
    say(f"READY {start}")

    ck = asyncckpt.AsyncCheckpointer(chunk_size=CHUNK, max_in_flight=2, storage_options=opts,
                                    worker_options=_inject.WORKER_OPTIONS, incremental=incremental())
    worker_pid = ck.queue.worker_pid
    say(f"PID worker {worker_pid}")
    state = make_state(args.numel)

    def report(done: list[asyncckpt.SaveHandle]) -> None:
        for h in done:
            say(f"FINALIZED {h.name}")
            _inject.mark("finalized", h.name)
        if done and rank == 0:
            retention()

    def retention() -> None:
        infos = run_sync(list_all(storage))
        complete = sorted((i for i in infos if i.complete), key=lambda i: i.step, reverse=True)
        if not complete:
            return
        newest = complete[0].step
        doomed = [i.name for i in complete[args.keep:]]
        doomed += [i.name for i in infos if not i.complete and (step_of(i.name) or 0) < newest]
        for name in doomed:
            with _inject.phase("retention", name):
                _inject.mark("deleting", name)
                try:
                    run_sync(delete_checkpoint(storage, name))
                except CheckpointError as exc:  # e.g. `latest` still points to it
                    say(f"KEPT {name} {type(exc).__name__}")
                    continue
                _inject.mark("deleted", name)

    def finalize(blocking: bool) -> None:
        pending = list(ck._handles.values())
        try:
            done = ck.finalize(blocking=blocking)
        except CheckpointError as exc:
            for h in pending:
                if h.error is not None:
                    say(f"FAILED {h.name} {type(exc).__name__}")
            done = []
        report(done)

    for i in range(args.saves):
        step = start + i
        name = ckpt_name(step)
        fill_state(state, step, rank)
        _inject.current_name = name
        ck.save(state, join(args.root, name), step=step, update_latest=step not in no_latest)
        say(f"SAVED {name}")
        if ck.queue.worker_pid != worker_pid:
            worker_pid = ck.queue.worker_pid
            say(f"PID worker {worker_pid}")
        ck.wait_snapshot()
        mutate_state(state)  # the optimizer step: must never reach the checkpoint
        finalize(blocking=(i + 1) % args.blocking_every == 0 or i == args.saves - 1)
    while ck.in_flight:
        finalize(blocking=True)
    ck.close()
    run_sync(storage.close())
    if world > 1:
        dist.destroy_process_group()
    say("DONE")
    return 0


def _manager_loop(args: argparse.Namespace, rank: int, world: int, say: Any) -> int:
    """The same stream of saves through CheckpointManager: restore, maybe_save every step, keep_last."""
    import torch.distributed as dist

    import asyncckpt

    from . import _inject
    from .common import CHUNK, diff_states, fill_state, incremental, make_state, mutate_state, storage_options

    mgr = asyncckpt.CheckpointManager(
        args.root, every_steps=1, keep_last=args.keep, name_format="step-{step:06d}", signals=None, rng=False,
        storage_options=storage_options(), checkpointer_options={"chunk_size": CHUNK, "worker_options": _inject.WORKER_OPTIONS},
        incremental=incremental(),
    )
    state = make_state(args.numel)
    restored = mgr.restore(state)
    if restored:
        bad = diff_states(state, fill_state(make_state(args.numel), restored, rank))
        if bad:
            say(f"PROBLEM resume from step {restored}: {bad[:3]}")
            return 7
    say(f"READY {restored + 1}")
    say(f"PID worker {mgr.ckpt.queue.worker_pid}")
    worker_pid = mgr.ckpt.queue.worker_pid
    reported = restored

    def report(step: int | None) -> None:
        nonlocal reported
        if step is not None and step > reported:
            name = mgr.name_format.format(step=step)
            say(f"FINALIZED {name}")
            _inject.mark("finalized", name)
            reported = step

    for step in range(restored + 1, restored + 1 + args.saves):
        fill_state(state, step, rank)
        _inject.current_name = mgr.name_format.format(step=step)
        try:
            mgr.maybe_save(step, state)
        except asyncckpt.CheckpointError as exc:
            say(f"FAILED ? {type(exc).__name__}")
        if mgr.ckpt.queue.worker_pid != worker_pid:
            worker_pid = mgr.ckpt.queue.worker_pid
            say(f"PID worker {worker_pid}")
        report(mgr.last_committed_step)
        mgr.wait_snapshot()
        mutate_state(state)
    while True:  # with on_error="raise" every failed save raises once: a dead worker can take two
        try:
            mgr.wait()
            break
        except asyncckpt.CheckpointError as exc:
            say(f"FAILED ? {type(exc).__name__}")
    report(mgr.last_committed_step)
    mgr.close()
    if world > 1:
        dist.destroy_process_group()
    say("DONE")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BaseException as exc:  # noqa: BLE001 - report, then leave at once (a peer rank may be gone)
        sys.stdout.write(f"CRASH {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        sys.stdout.flush()
        os._exit(5)
    sys.stdout.flush()
    os._exit(code)
