"""Shared pieces of the torture suite: the deterministic training state and the invariant checks."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import asyncckpt
from asyncckpt._loop import run_sync
from asyncckpt.catalog import list_all, read_latest
from asyncckpt.errors import CheckpointError
from asyncckpt.manager import RESERVED_KEY
from asyncckpt.storage import open_storage

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
MiB = 1 << 20
CHUNK = 5 * MiB  # the smallest chunk AsyncCheckpointer accepts: several chunks per save stay cheap
_NAME_RE = re.compile(r"^step-(\d+)$")


def incremental() -> bool:
    """TORTURE_INCREMENTAL=1: trainers save with incremental=True and the state holds a frozen tensor (the
    same bytes every step), so saves reference the bytes of earlier checkpoints (read when asked: the
    driver's checks and its trainers agree)."""
    return os.environ.get("TORTURE_INCREMENTAL") == "1"


def ckpt_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(name: str) -> int | None:
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a trainer subprocess: the repo importable, one thread, quiet logs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("ASYNCCKPT_LOG", None)
    env.update(extra)
    return env


def make_state(numel: int) -> dict[str, Any]:
    """A training-like state: large tensors (shared with the worker), small ones (inlined), values."""
    return {
        "model": {
            "w": torch.zeros(numel, dtype=torch.float32),
            "b": torch.zeros(257, dtype=torch.bfloat16),
        },
        "optim": {
            "state": {0: {"exp_avg": torch.zeros(numel // 4, dtype=torch.float64), "step": torch.zeros((), dtype=torch.int64)}},
            "param_groups": [{"lr": 0.0, "params": [0]}],
        },
        "extra": np.zeros(100, dtype=np.int32),
        **({"frozen": torch.arange(numel // 2, dtype=torch.float32)} if incremental() else {}),
        "step": -1,
        "rank": -1,
        "tag": "",
    }


def fill_state(state: dict[str, Any], step: int, rank: int) -> dict[str, Any]:
    """Put the content of ``step`` on ``rank`` into ``state`` in place (tensors keep their storage)."""
    w = state["model"]["w"]
    torch.arange(w.numel(), dtype=torch.float32, out=w)
    w.mul_(1e-3).add_(step + 1000 * rank)
    state["model"]["b"].fill_(float(step % 200))
    ea = state["optim"]["state"][0]["exp_avg"]
    torch.arange(ea.numel(), dtype=torch.float64, out=ea)
    ea.add_(0.5 * step - rank)
    state["optim"]["state"][0]["step"].fill_(step)
    state["optim"]["param_groups"][0]["lr"] = 0.001 * step
    state["extra"][:] = np.arange(100, dtype=np.int32) + step
    state["step"] = step
    state["rank"] = rank
    state["tag"] = f"step {step} rank {rank}"
    return state


def mutate_state(state: dict[str, Any]) -> None:
    """What an optimizer step does right after the snapshot: change every tensor in place."""
    state["model"]["w"].add_(0.25)
    state["model"]["b"].add_(1)
    state["optim"]["state"][0]["exp_avg"].mul_(-1)
    state["optim"]["state"][0]["step"].add_(1)


def expected_state(step: int, rank: int, numel: int) -> dict[str, Any]:
    return fill_state(make_state(numel), step, rank)


def diff_states(got: Any, want: Any, path: str = "") -> list[str]:
    """Every difference between a loaded state and the expected one (exact, dtype and shape included)."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return [f"{path}: {type(got).__name__}, expected a tensor"]
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            return [f"{path}: {got.dtype}{tuple(got.shape)}, expected {want.dtype}{tuple(want.shape)}"]
        if not torch.equal(got, want):
            return [f"{path}: tensor values differ"]
        return []
    if isinstance(want, np.ndarray):
        if not isinstance(got, np.ndarray) or got.dtype != want.dtype or not np.array_equal(got, want):
            return [f"{path}: ndarray differs"]
        return []
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{path}: keys {sorted(map(str, got)) if isinstance(got, dict) else type(got).__name__}, expected {sorted(map(str, want))}"]
        out: list[str] = []
        for k in want:
            out += diff_states(got[k], want[k], f"{path}/{k}")
        return out
    if isinstance(want, (list, tuple)):
        if type(got) is not type(want) or len(got) != len(want):
            return [f"{path}: {type(got).__name__} of {len(got) if hasattr(got, '__len__') else '?'}, expected {type(want).__name__} of {len(want)}"]
        out = []
        for i, (g, w) in enumerate(zip(got, want)):
            out += diff_states(g, w, f"{path}/{i}")
        return out
    if type(got) is not type(want) or got != want:
        return [f"{path}: {got!r}, expected {want!r}"]
    return []


@dataclass
class RootReport:
    """What :func:`check_root` found under one root."""

    complete: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    latest: str | None = None
    loaded: int = 0
    problems: list[str] = field(default_factory=list)
    temp_files: int = 0
    temp_bytes: int = 0


def storage_options() -> dict[str, Any]:
    """Storage options for S3 roots, handed to trainer subprocesses as JSON in ``TORTURE_S3_OPTIONS``."""
    raw = os.environ.get("TORTURE_S3_OPTIONS")
    return json.loads(raw) if raw else {}


def join(root: str | os.PathLike[str], name: str) -> str:
    return f"{os.fspath(root).rstrip('/')}/{name}"


def check_root(root: str | os.PathLike[str], *, numel: int, must_have: list[str] = (), deleting: set[str] = frozenset(),
               world_size: int | None = None, options: dict[str, Any] | None = None) -> RootReport:
    """Check the invariants that must hold under ``root`` at any moment after a crash.

    * every checkpoint listed complete loads on every rank, verifies, and equals the state its
      step was saved with (never another step's bytes, never the state mutated after save);
    * ``latest``, when present, decodes and names a complete checkpoint;
    * every name in ``must_have`` (saves whose finalize had returned) is complete, unless it is
      in ``deleting`` (retention was deleting it);
    * temp files of torn writes are never listed.
    """
    rep = RootReport()
    opts = dict(options or {})
    storage = open_storage(root, **opts)
    try:
        try:
            infos = run_sync(list_all(storage))
        except CheckpointError as exc:
            rep.problems.append(f"listing failed: {type(exc).__name__}: {exc}")
            return rep
        try:
            keys = run_sync(storage.list(""))
        except CheckpointError as exc:
            keys = []
            rep.problems.append(f"storage.list failed: {exc}")
        for k in keys:
            if ".tmp-" in k:
                rep.problems.append(f"a temp file is listed: {k}")
        for info in infos:
            (rep.complete if info.complete else rep.incomplete).append(info.name)
        for info in infos:
            if not info.complete:
                continue
            step = step_of(info.name)
            if step is None or info.step != step:
                rep.problems.append(f"{info.name}: complete with step {info.step}, expected {step}")
                continue
            if world_size is not None and info.world_size != world_size:
                rep.problems.append(f"{info.name}: world size {info.world_size}, expected {world_size}")
            for r in range(info.world_size):
                try:
                    got = asyncckpt.load(join(root, info.name), rank=r, storage_options=opts)
                    if isinstance(got, dict):
                        got.pop(RESERVED_KEY, None)  # the manager's own record (step, RNG)
                except Exception as exc:  # noqa: BLE001 - any failure to load a complete checkpoint is the finding
                    rep.problems.append(f"{info.name} rank {r}: listed complete but load failed: {type(exc).__name__}: {exc}")
                    continue
                d = diff_states(got, expected_state(step, r, numel))
                if d:
                    rep.problems.append(f"{info.name} rank {r}: WRONG DATA: {'; '.join(d[:4])}")
                else:
                    rep.loaded += 1
        try:
            latest = run_sync(read_latest(storage))
        except CheckpointError as exc:
            rep.problems.append(f"latest is unreadable: {exc}")
            latest = None
        if latest is not None:
            rep.latest = latest.name
            if latest.name not in rep.complete:
                rep.problems.append(f"latest points to {latest.name!r}, which is not complete (complete: {rep.complete})")
        for name in must_have:
            if name not in rep.complete and name not in deleting:
                rep.problems.append(f"{name}: its finalize had returned, but it is not complete (DATA LOST)")
        for dirpath, _dirs, files in os.walk(root) if "://" not in os.fspath(root) else ():
            for f in files:
                if ".tmp-" in f:
                    rep.temp_files += 1
                    rep.temp_bytes += os.lstat(os.path.join(dirpath, f)).st_size
    finally:
        run_sync(storage.close())
    return rep
