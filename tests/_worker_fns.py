"""Module-level functions the worker can import by reference (tests of AsyncCallsQueue)."""

from __future__ import annotations

import asyncio
import os
import time


def append_line(path: str, text: str, delay: float = 0.0) -> str:
    time.sleep(delay)
    with open(path, "a") as f:
        f.write(text + "\n")
    return text


async def async_append(path: str, text: str, delay: float = 0.0) -> str:
    await asyncio.sleep(delay)
    with open(path, "a") as f:
        f.write(text + "\n")
    return text


def fail(msg: str) -> None:
    raise RuntimeError(msg)


def preload_double(x: int) -> int:
    return 2 * x


def echo(x):
    return x


def worker_pid() -> int:
    return os.getpid()


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def die() -> None:
    os._exit(17)


def clone(t):
    """An NVRx-style preload_fn (bound with functools.partial): the staged copy."""
    return t.clone()


def save_second(path: str, staged) -> str:
    """An NVRx-style async_fn: its second argument is what the preload_fn returned."""
    import torch

    torch.save(staged, path)
    return path


def process_facts(env_name: str) -> dict:
    """Where a request runs: the worker's pid, parent, cwd, umask and one environment variable."""
    mask = os.umask(0)
    os.umask(mask)
    return {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "umask": mask,
            "env": os.environ.get(env_name)}
