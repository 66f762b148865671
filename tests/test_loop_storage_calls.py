"""Invariant 9 from the user's side: the training loop does no storage work.

Every storage call the trainer process makes is counted (the worker is another process) while a
loop runs ``save``/``maybe_save`` and non-blocking ``finalize`` with retention and tiers, local
and S3. During the loop there must be none — except the pause watcher's polls of a remote root,
which run on their own background thread, never on the training thread.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator

import pytest
import torch

import asyncckpt
from asyncckpt.preemption import PAUSE_FILE
from asyncckpt.storage.local import LocalStorage
from asyncckpt.storage.s3 import S3Storage

_METHODS = ("open_writer", "read_into", "read", "size", "exists", "list", "delete", "put_record")


class _Counter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, str]] = []  # (thread, backend, method, key)
        self.on = False

    def wrap(self, cls: type, name: str) -> None:
        real = getattr(cls, name)
        counter = self

        @functools.wraps(real)
        async def counted(self, *args, **kwargs):
            if counter.on:
                key = args[0] if args and isinstance(args[0], str) else ""
                counter.calls.append((threading.current_thread().name, cls.__name__, name, key))
            return await real(self, *args, **kwargs)

        assert inspect.iscoroutinefunction(real), name
        setattr(cls, name, counted)


@pytest.fixture
def counter(monkeypatch) -> Iterator[_Counter]:
    c = _Counter()
    for cls in (LocalStorage, S3Storage):
        for name in _METHODS:
            monkeypatch.setattr(cls, name, getattr(cls, name))  # restored after the test
            c.wrap(cls, name)
    yield c


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _counter_sees_reads(counter: _Counter, root, options=None) -> None:
    """The instrumentation is live: a read-side call in this process is counted."""
    before = len(counter.calls)
    counter.on = True
    asyncckpt.list_checkpoints(root, storage_options=options)
    counter.on = False
    assert len(counter.calls) > before
    del counter.calls[before:]


def _no_loop_storage_work(counter: _Counter) -> None:
    # Only the pause watcher's background polls of a remote root may read storage meanwhile; they
    # read nothing but the PAUSE record (run on the private event loop thread, off the training thread).
    others = [c for c in counter.calls if c[3] != PAUSE_FILE]
    assert others == [], f"the trainer process called storage during the loop: {others[:10]}"


@pytest.mark.slow
def test_manager_loop_with_retention_and_tiers_does_no_storage_work(tmp_path, moto_server, s3_bucket, counter):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(16, 64)
    tiers = asyncckpt.Tiers(tmp_path / "fast", f"s3://{s3_bucket}/run", keep=[2, 3],
                            storage_options=[{}, moto_server.options()])
    with asyncckpt.CheckpointManager(tiers, every_steps=2, keep_last=2, signals=()) as mgr:
        state = {"model": model, "optim": opt}
        mgr.restore(state)  # read side: allowed to touch storage
        counter.on = True
        for step in range(1, 21):
            _train_step(model, opt, x)
            mgr.maybe_save(step, state)
        counter.on = False
    _no_loop_storage_work(counter)
    _counter_sees_reads(counter, f"s3://{s3_bucket}/run", moto_server.options())
    names = [i.name for i in asyncckpt.list_checkpoints(tmp_path / "fast")]
    assert names == ["step-00000020", "step-00000018"]  # retention ran (in the worker)
    out = asyncckpt.load(f"s3://{s3_bucket}/run", storage_options=moto_server.options())
    assert out["__asyncckpt__"]["step"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_raw_save_and_non_blocking_finalize_do_no_storage_work(tmp_path, moto_server, s3_bucket, counter, backend):
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 256)
    if backend == "local":
        root, options = str(tmp_path), {}
    else:
        root, options = f"s3://{s3_bucket}/raw", moto_server.options()
    policy = asyncckpt.retention.RetentionPolicy(keep_last=2)
    with asyncckpt.AsyncCheckpointer(optimizers=opt, storage_options=options) as ck:
        counter.on = True
        for step in range(20):
            _train_step(model, opt, x)
            ck.save({"model": model.state_dict(), "step": step}, f"{root}/s{step:03d}", step=step, retention=policy)
            ck.finalize()
        counter.on = False
    _no_loop_storage_work(counter)
    _counter_sees_reads(counter, root, options)
    listed = [i.name for i in asyncckpt.list_checkpoints(root, storage_options=options)]
    assert listed == ["s019", "s018"]
