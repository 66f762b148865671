"""How long does a save block the training loop? The NVRx-compatible calls next to ``dcp.async_save``
and ``torch.save``, in one process and one run.

The state is ``--size-mib`` MiB of float32 CPU tensors (``--tensor-mib`` each). For each method:
one warm-up save (worker start, one-time sharing), then ``--reps`` timed saves; before each the
state is mutated in place (an optimizer step). Blocked time = the call plus any wait before the
state may change again:

- ``nvrx-torch``: ``asyncckpt.nvrx.torch_ckpt.TorchAsyncCheckpoint.async_save(sd, path)``
  (returns once the worker holds its snapshot: NVRx's contract)
- ``nvrx-dcp``: NVRx's DCP form: ``FileSystemWriterAsync`` + ``save_state_dict_async_plan`` +
  ``schedule_async_request(AsyncRequest(..., preload_fn=...))`` on ``asyncckpt.nvrx.core.AsyncCallsQueue``
- ``asyncckpt-dcp``: ``asyncckpt.dcp.async_save(...)`` + ``handle.wait_snapshot()``
- ``dcp-thread``: ``torch.distributed.checkpoint.async_save`` (thread executor; its stager copies
  the state inside the call)
- ``torch-save``: a plain ``torch.save`` (blocks for the whole write)

Each save is completed (untimed) before the next one starts. Prints a table and the load
average; ``--json`` writes every number.

    python bench/nvrx_blocking.py --size-mib 1024 --json /tmp/nvrx_blocking.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

METHODS = ("nvrx-torch", "nvrx-dcp", "asyncckpt-dcp", "dcp-thread", "torch-save")


def make_state(size_mib: int, tensor_mib: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {}
    left, i = size_mib << 20, 0
    while left > 0:
        n = min(tensor_mib << 20, left)
        sd[f"layer{i:03d}.weight"] = torch.empty(n // 4).uniform_(-1, 1, generator=g)
        left -= n
        i += 1
    return sd


def step(sd: dict[str, Any]) -> None:
    with torch.no_grad():
        for v in sd.values():
            v.add_(1.0)


class Runner:
    """Start (timed) and complete (untimed) one save of each method."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.n = 0
        self._ckpt: Any = None
        self._queue: Any = None
        self._handle: Any = None
        self._future: Any = None

    def path(self, method: str) -> str:
        self.n += 1
        return os.path.join(self.root, f"{method}-{self.n}")

    def start(self, method: str, sd: dict[str, Any]) -> Callable[[], None]:
        """Run the blocking part of a save; return the function that completes it."""
        p = self.path(method)
        if method == "nvrx-torch":
            from asyncckpt.nvrx.torch_ckpt import TorchAsyncCheckpoint

            if self._ckpt is None:
                self._ckpt = TorchAsyncCheckpoint()
            self._ckpt.async_save(sd, p)
            return lambda: self._ckpt.finalize_async_save(blocking=True)
        if method == "nvrx-dcp":
            from asyncckpt.nvrx.core import AsyncCallsQueue, AsyncRequest
            from asyncckpt.nvrx.filesystem_async import FileSystemWriterAsync
            from asyncckpt.nvrx.state_dict_saver import save_state_dict_async_finalize, save_state_dict_async_plan

            if self._queue is None:
                self._queue = AsyncCallsQueue()
            writer = FileSystemWriterAsync(p, thread_count=2)
            ret = save_state_dict_async_plan(sd, writer, None, 0)
            fn, pre, args = writer.get_save_function_and_args()
            self._queue.schedule_async_request(AsyncRequest(fn, args, [lambda: save_state_dict_async_finalize(*ret)],
                                                            preload_fn=pre))
            return lambda: self._queue.maybe_finalize_async_calls(blocking=True)
        if method == "asyncckpt-dcp":
            from asyncckpt.dcp import async_save

            h = async_save(sd, checkpoint_id=p)
            h.wait_snapshot()
            return h.result
        if method == "dcp-thread":
            import torch.distributed.checkpoint as dcp

            fut = dcp.async_save(sd, checkpoint_id=p)
            return fut.result
        if method == "torch-save":
            torch.save(sd, p)
            return lambda: None
        raise ValueError(method)

    def close(self) -> None:
        from asyncckpt.dcp import close_async_saves

        if self._ckpt is not None:
            self._ckpt.close()
        if self._queue is not None:
            self._queue.close()
        close_async_saves()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tensor-mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or args.size_mib < 1 or args.reps < 1 or args.tensor_mib < 1:
        ap.error(f"unknown methods {bad}" if bad else "--size-mib, --tensor-mib and --reps must be >= 1")
    warnings.filterwarnings("ignore", category=UserWarning)
    root = tempfile.mkdtemp(prefix="nvrx-blocking-", dir=args.dir)
    sd = make_state(args.size_mib, args.tensor_mib)
    runner = Runner(root)
    out: dict[str, Any] = {"size_mib": args.size_mib, "reps": args.reps, "loadavg_before": os.getloadavg(),
                           "methods": {}}
    try:
        for method in methods:
            blocked, total = [], []
            for rep in range(args.reps + 1):  # rep 0: warm-up
                step(sd)
                t0 = time.perf_counter()
                complete = runner.start(method, sd)
                t1 = time.perf_counter()
                step(sd)  # the state changes right away: the save must not see it
                complete()
                t2 = time.perf_counter()
                if rep:
                    blocked.append(t1 - t0)
                    total.append(t2 - t0)
                else:
                    out["methods"].setdefault(method, {})["first_blocked_s"] = t1 - t0
                for name in os.listdir(root):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True) if os.path.isdir(
                        os.path.join(root, name)) else os.unlink(os.path.join(root, name))
            out["methods"][method].update(blocked_s=blocked, blocked_median_s=statistics.median(blocked),
                                          complete_median_s=statistics.median(total))
    finally:
        runner.close()
        shutil.rmtree(root, ignore_errors=True)
    out["loadavg_after"] = os.getloadavg()
    print(f"{args.size_mib} MiB of float32 CPU tensors, median of {args.reps} saves after one warm-up; "
          f"load average {out['loadavg_before'][0]:.1f} -> {out['loadavg_after'][0]:.1f}")
    print(f"{'method':<16}{'blocked (s)':>14}{'first (s)':>12}{'complete (s)':>15}")
    for m, r in out["methods"].items():
        print(f"{m:<16}{r['blocked_median_s']:>14.3f}{r['first_blocked_s']:>12.3f}{r['complete_median_s']:>15.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
