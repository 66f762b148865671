from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def run_script(script: str, *args: str, timeout: float = 240, expect_kill: bool = False) -> subprocess.CompletedProcess[str]:
    """Run one of this folder's training scripts in a fresh interpreter; fail with its output if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))
    if expect_kill:
        assert proc.returncode == -9, f"{script} {args} was meant to die by SIGKILL, rc={proc.returncode}\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode == 0, f"{script} {args} failed, rc={proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-exact equality of nested states (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def start_script(script: str, *args: str) -> subprocess.Popen[str]:
    """``run_script``'s command and environment, started in the background (finish it with ``finish``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))


def finish(proc: subprocess.Popen[str], timeout: float = 300, expect_kill: bool = False, expect_rc: int = 0) -> str:
    """Wait for a ``start_script`` run; fail with its output as ``run_script`` does (or unless it exits with
    ``expect_rc``). Returns stdout + stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # only the process this test started, by its handle
        proc.communicate()
        raise
    what = " ".join(proc.args[1:] if isinstance(proc.args, list) else [str(proc.args)])
    if expect_kill:
        assert proc.returncode == -9, f"{what} was meant to die by SIGKILL, rc={proc.returncode}\n{err[-3000:]}"
    else:
        assert proc.returncode == expect_rc, f"{what} failed, rc={proc.returncode}\n{err[-3000:]}"
    return out + err


@contextlib.contextmanager
def stopped_on_error(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Kill a ``start_script`` run (by its handle) if the block fails, so the first failure is the one reported."""
    try:
        yield
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
