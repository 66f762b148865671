"""Storage requests and flushes per save cycle in the worker, by kind (issue 13, the save cycle).

    python bench/storage_calls.py [--saves 20] [--backends local moto seaweed] [--keys] [--json OUT]

A ``CheckpointManager(every_steps=1, keep_last=2)`` saves the examples/train.py model (~1 MiB
state) ``--saves`` times after 3 warm-up saves (so retention deletes one checkpoint per save),
waiting for each save's cycle to end: write data + manifest, commit (COMMIT, ``latest``),
retention, cleanup. This module is also the worker plug-in that counts (loaded with
``worker_options={"preload": ["bench.storage_calls"]}``): in the worker it wraps every
`LocalStorage` method and the flush system calls (``fsync``, ``fdatasync``) and counts every S3
API call (botocore's ``before-call`` event), one line per call in the file named by
``ASYNCCKPT_BENCH_CALLS``. The trainer makes none (tests/test_loop_storage_calls.py).
Progress goes to stderr; the table (calls per save cycle) to stdout; ``--keys`` also prints
every call of one cycle with its key.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

_ENV = "ASYNCCKPT_BENCH_CALLS"
_LOCK = threading.Lock()

#: LocalStorage method -> the kind of request it stands for
_LOCAL_KINDS = {
    "open_writer": "PUT (stream)", "put_record": "PUT", "read": "GET", "read_into": "GET (range)",
    "read_into_scattered": "GET (range)", "size": "HEAD", "exists": "HEAD", "list": "LIST", "delete": "DELETE",
    "cleanup_temp": "LIST (cleanup)", "delete_many": "DELETE (batch)",
}
#: S3 operation -> kind
_S3_KINDS = {
    "ListObjectsV2": "LIST", "ListObjects": "LIST", "HeadObject": "HEAD", "GetObject": "GET", "PutObject": "PUT",
    "DeleteObject": "DELETE", "DeleteObjects": "DELETE (batch)", "CreateMultipartUpload": "multipart",
    "UploadPart": "multipart", "CompleteMultipartUpload": "multipart", "AbortMultipartUpload": "multipart",
    "ListMultipartUploads": "LIST (uploads)",
}


def _note(kind: str, detail: str) -> None:
    path = os.environ.get(_ENV, "")
    if path:
        with _LOCK, open(path, "a") as f:
            f.write(f"{kind}\t{detail}\n")


def _wrap_method(cls: type, name: str) -> None:
    real = getattr(cls, name)

    @functools.wraps(real)
    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = args[0] if args and isinstance(args[0], str) else ""
        _note(_LOCAL_KINDS[name], f"{name} {key}")
        return await real(self, *args, **kwargs)

    setattr(cls, name, counted)


def _wrap_syscall(name: str) -> None:
    real = getattr(os, name)

    @functools.wraps(real)
    def counted(fd: int) -> None:
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = "?"
        _note(name, where)
        real(fd)

    setattr(os, name, counted)


def _on_s3_call(model: Any, params: dict[str, Any], **_: Any) -> None:
    query = params.get("query_string") or {}
    prefix = f" prefix={query['prefix']!r}" if isinstance(query, dict) and "prefix" in query else ""
    _note(_S3_KINDS.get(model.name, model.name), f"{model.name} {params.get('url_path', '')}{prefix}")


def install() -> None:
    """Count in this process (the worker): LocalStorage methods, fsync/fdatasync, S3 API calls."""
    from aiobotocore.session import AioSession

    from asyncckpt.storage.local import LocalStorage

    for name in _LOCAL_KINDS:
        if hasattr(LocalStorage, name):  # an older tree may lack some (delete_many)
            _wrap_method(LocalStorage, name)
    for name in ("fsync", "fdatasync"):
        _wrap_syscall(name)
    real_init = AioSession.__init__

    @functools.wraps(real_init)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self.register("before-call.s3", _on_s3_call)

    AioSession.__init__ = init  # type: ignore[method-assign]


if __name__ != "__main__" and os.environ.get(_ENV):
    install()


# ------------------------------------------------------------------ the run (trainer side)

def _model() -> tuple[Any, Any, Any]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)


def _step(model: Any, opt: Any, sched: Any) -> None:
    import torch

    x, y = torch.randn(128, 64), torch.randn(128, 1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def _lines(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split("\t", 1)) for line in path.read_text().splitlines()]  # type: ignore[misc]


def count(root: str, options: dict[str, Any], saves: int, log: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(every call of the ``saves`` measured cycles, the calls of the last cycle alone)."""
    import asyncckpt

    os.environ[_ENV] = str(log)  # the spawned worker inherits it
    model, opt, sched = _model()
    state = {"model": model, "optim": opt, "sched": sched}
    with asyncckpt.CheckpointManager(root, every_steps=1, keep_last=2, signals=(), storage_options=options,
                                     checkpointer_options={"worker_options": {"preload": ["bench.storage_calls"]}}
                                     ) as mgr:
        step = 0
        for _ in range(3):  # warm-up: from the third save on, retention deletes one checkpoint per save
            step += 1
            _step(model, opt, sched)
            mgr.maybe_save(step, state)
            mgr.wait()
        start = len(_lines(log))
        last = start
        for i in range(saves):
            step += 1
            _step(model, opt, sched)
            mgr.maybe_save(step, state)
            mgr.wait()
            if i == saves - 2:
                last = len(_lines(log))
            print(f"  save {i + 1}/{saves}", file=sys.stderr, flush=True)
    got = _lines(log)
    return got[start:], got[last:]


def _table(results: dict[str, dict[str, float]]) -> None:
    kinds = sorted({k for r in results.values() for k in r})
    backends = list(results)
    print(f"{'per save cycle':18s}" + "".join(f"{b:>10s}" for b in backends))
    for k in kinds:
        print(f"{k:18s}" + "".join(f"{results[b].get(k, 0):10.2f}" for b in backends))
    print(f"{'requests (no flush)':18s}" + "".join(
        f"{sum(v for k, v in results[b].items() if k not in ('fsync', 'fdatasync')):10.2f}" for b in backends))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--saves", type=int, default=20)
    ap.add_argument("--backends", nargs="*", default=["local", "moto"])
    ap.add_argument("--keys", action="store_true", help="print every call of the last save cycle with its key")
    ap.add_argument("--json", help="write the per-cycle counts here")
    args = ap.parse_args()
    repo = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, repo)  # bench.storage_calls (the plug-in) and tests.s3_servers
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH", "")]))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            srv: Any = None
            root, options = os.path.join(tmp, backend), {}
            if backend == "moto":
                from tests.s3_servers import MotoServer

                srv = MotoServer()
                srv.start()
                root, options = f"s3://{srv.create_bucket()}/run", srv.options()
            elif backend == "seaweed":
                from tests.s3_servers import SeaweedServer

                srv = SeaweedServer(Path(tmp) / "weed")
                srv.start()
                root, options = f"s3://{srv.create_bucket()}/run", srv.options()
            print(f"{backend}: {args.saves} save cycles", file=sys.stderr, flush=True)
            try:
                calls, last = count(root, options, args.saves, Path(tmp) / f"{backend}.calls")
            finally:
                if srv is not None:
                    srv.stop() if hasattr(srv, "stop") else srv.kill()
            per = collections.Counter(kind for kind, _ in calls)
            results[backend] = {k: n / args.saves for k, n in sorted(per.items())}
            if args.keys:
                print(f"-- {backend}: the calls of the last save cycle")
                for kind, detail in last:
                    print(f"  {kind:16s} {re.sub(re.escape(tmp), '<tmp>', detail)}")
    _table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
