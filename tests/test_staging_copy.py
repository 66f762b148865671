"""The worker's snapshot copy (staging._run_memmoves, CopyProgress): the bytes, the order in which
a copy's prefix becomes final, and waking the writers that wait for it."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from asyncckpt import staging
from asyncckpt.staging import CopyProgress


def _moves(sizes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]], list[torch.Tensor]]:
    """Source tensors of ``sizes`` bytes laid out back to back (64-aligned) in a zeroed destination:
    (destination, what it must hold after the copy, the moves in shuffled order, the sources)."""
    gen = torch.Generator().manual_seed(seed)
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in sizes]
    offs, pos = [], 0
    for n in sizes:
        offs.append(pos)
        pos += -(-n // 64) * 64
    dst = torch.zeros(pos, dtype=torch.uint8)
    moves = [(dst.data_ptr() + o, s.data_ptr(), n) for o, s, n in zip(offs, srcs, sizes) if n]
    random.Random(seed).shuffle(moves)
    expect = torch.zeros(pos, dtype=torch.uint8)
    for o, s, n in zip(offs, srcs, sizes):
        expect[o : o + n] = s
    return dst, expect, moves, srcs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_copy_reports_only_prefixes_that_are_final_and_ends_with_every_byte(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "_PIECE", 256 << 10)  # many pieces and batches in a few MiB
    rnd = random.Random(seed)
    sizes = [rnd.choice([0, 1, 63, 4096, 100_000, 300 << 10, 1 << 20, 3 << 20]) for _ in range(40)] + [9 << 20]
    dst, expect, moves, _srcs = _moves(sizes, seed)
    nbytes = dst.numel()
    reported: list[int] = []
    wrong: list[int] = []

    def report(upto: int) -> None:  # in a copy thread: the first ``upto`` bytes must be final now
        reported.append(upto)
        if not torch.equal(dst[:upto], expect[:upto]):
            wrong.append(upto)

    staging._run_memmoves(moves, dst.data_ptr(), nbytes, report)
    assert torch.equal(dst, expect)
    assert wrong == []
    assert reported == sorted(set(reported)) and reported[-1] == nbytes


def test_the_copy_without_a_report_copies_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "_PIECE", 256 << 10)
    dst, expect, moves, _srcs = _moves([5 << 20, 1, 70_000, 6 << 20, 0, 64], 7)
    staging._run_memmoves(moves)
    assert torch.equal(dst, expect)


async def test_reports_from_a_thread_wake_every_waiter_once_its_bytes_are_there() -> None:
    nbytes = 1 << 20
    progress = CopyProgress(nbytes, asyncio.get_running_loop())
    ends = [*sorted(random.Random(3).sample(range(1, nbytes + 1), 200)), nbytes]
    seen: list[tuple[int, int]] = []

    async def waiter(end: int) -> None:
        await progress.wait(end)
        seen.append((end, progress.ready))

    tasks = [asyncio.ensure_future(waiter(e)) for e in ends]
    await asyncio.sleep(0)

    def copy() -> None:  # reports in small steps, as the copy threads do, racing the waiters
        for upto in range(997, nbytes, 997):
            progress.report(upto)
        progress.report(nbytes)

    thread = threading.Thread(target=copy)
    thread.start()
    late = [asyncio.ensure_future(waiter(e)) for e in (1, nbytes // 2, nbytes)]  # registered while it runs
    await asyncio.wait_for(asyncio.gather(*tasks, *late), 30)
    thread.join()
    assert len(seen) == len(ends) + 3
    assert all(ready >= end for end, ready in seen)
    assert progress.finished


async def test_ended_waits_for_the_copy_and_then_for_the_ack() -> None:
    loop = asyncio.get_running_loop()
    acked: asyncio.Future[None] = loop.create_future()
    progress = CopyProgress(100, loop, acked)
    ended = asyncio.ensure_future(progress.ended())
    progress.advance(100)
    await asyncio.sleep(0.01)
    assert progress.finished and not ended.done()  # every byte copied, the ACK not out yet
    acked.set_result(None)
    await asyncio.wait_for(ended, 5)


async def test_ended_raises_when_the_copy_fails() -> None:
    progress = CopyProgress(100, asyncio.get_running_loop())
    ended = asyncio.ensure_future(progress.ended())
    await asyncio.sleep(0)
    progress.fail(KeyError("gone"))
    with pytest.raises(RuntimeError, match="copy failed"):
        await asyncio.wait_for(ended, 5)
