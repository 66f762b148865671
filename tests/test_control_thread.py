"""The worker's control thread: control steps on local files run there, inline; others stay on the loop."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.runtime.context import WorkerConfig, WorkerContext
from asyncckpt.storage import Capabilities, LocalStorage, Storage, blocking_calls_welcome


@dataclass
class _Probe:
    """A control step that records where it ran and writes one record through its storage."""

    storage: Any
    milestone: str | None = None

    def sessions(self, ctx: WorkerContext) -> list[Storage]:
        return [self.storage]

    async def run(self, ctx: WorkerContext, prior: Any) -> Any:
        await self.storage.put_record("x/REC", b"payload")
        return (threading.current_thread().name, blocking_calls_welcome(), prior)


class _LoopBound(LocalStorage):
    """A local directory that claims to be bound to its loop (as an S3 session is)."""

    capabilities = Capabilities(conditional_put=True, min_part_size=1)


def _ctx() -> WorkerContext:
    return WorkerContext(WorkerConfig(parent_pid=0, authkey=b"k", sys_path=[]))


def test_a_step_on_local_files_runs_on_the_control_thread_without_io_threads(tmp_path: Path) -> None:
    ctx = _ctx()
    st = LocalStorage(tmp_path)
    used_pool: list[bool] = []
    real_submit = st._pool.submit

    def submit(*a: Any, **k: Any) -> Any:
        used_pool.append(True)
        return real_submit(*a, **k)

    st._pool.submit = submit  # type: ignore[method-assign]

    async def main() -> Any:
        try:
            return await ctx.run_control(_Probe(st), prior=7)
        finally:
            await ctx.close()

    name, inline, prior = asyncio.run(main())
    assert name == "asyncckpt-control" and inline and prior == 7
    assert not used_pool, "the control thread handed a small call to an I/O thread"
    assert (tmp_path / "x" / "REC").read_bytes() == b"payload"
    assert not blocking_calls_welcome()  # the switch does not leak into the caller


def test_a_step_on_a_loop_bound_storage_stays_on_the_loop(tmp_path: Path) -> None:
    ctx = _ctx()

    async def main() -> Any:
        try:
            return await ctx.run_control(_Probe(_LoopBound(tmp_path)), prior=None)
        finally:
            await ctx.close()

    name, inline, _ = asyncio.run(main())
    assert name == threading.current_thread().name and not inline
    assert (tmp_path / "x" / "REC").read_bytes() == b"payload"


def test_a_failing_step_raises_in_the_caller_and_the_thread_serves_the_next(tmp_path: Path) -> None:
    ctx = _ctx()

    @dataclass
    class _Fails(_Probe):
        async def run(self, ctx: WorkerContext, prior: Any) -> Any:
            raise FileExistsError("boom")

    async def main() -> Any:
        try:
            with pytest.raises(FileExistsError, match="boom"):
                await ctx.run_control(_Fails(LocalStorage(tmp_path)), None)
            return await ctx.run_control(_Probe(LocalStorage(tmp_path)), prior=1)
        finally:
            await ctx.close()

    assert asyncio.run(main())[2] == 1

