"""Invariant 1 from the user's side: loops that change the state in place where no hook sees it.

Every committed checkpoint must equal the state at its ``save()`` call, bit for bit. ``"auto"``
and ``"blocking"`` guarantee it; ``"lazy"`` either saves exactly or fails the save with
TornSnapshotError — a torn checkpoint is never committed.
"""

from __future__ import annotations

import random

import pytest
import torch

import asyncckpt

N_SAVES = 50
BIG = 1 << 20  # 4 MiB float32: shared with the worker, copied by it (not inline at save())


def _spin(rng: random.Random) -> None:
    """A random delay before the mutation: from nothing to a few hundred microseconds of work."""
    n = rng.choice((0, 0, 10, 1_000, 20_000))
    x = 0
    for i in range(n):
        x += i


def _check_saved(tmp_path, expected: dict[str, dict[str, torch.Tensor]], committed: set[str]) -> None:
    for name in committed:
        out = asyncckpt.load(tmp_path / name)
        for k, v in expected[name].items():
            assert torch.equal(out[k], v), f"{name}/{k} differs from the state at save()"


def _loop(ck: asyncckpt.AsyncCheckpointer, tmp_path, mutate, tensors: dict[str, torch.Tensor], seed: int,
          saves: int = N_SAVES) -> tuple[dict[str, dict[str, torch.Tensor]], set[str], int]:
    """``saves`` saves, each followed (after a random delay) by ``mutate()``; returns what was expected,
    what committed, and how many saves failed as torn."""
    rng = random.Random(seed)
    expected: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    torn = 0
    for i in range(saves):
        name = f"s{i:03d}"
        expected[name] = {k: v.clone() for k, v in tensors.items()}
        handles.append(ck.save(dict(tensors), tmp_path / name, step=i))
        _spin(rng)
        mutate(i)
        try:
            ck.finalize()
        except asyncckpt.TornSnapshotError:
            torn += 1
    while True:
        try:
            ck.finalize(blocking=True)
            break
        except asyncckpt.TornSnapshotError:
            torn += 1
    committed = {h.name for h in handles if h is not None and h.committed}
    for h in handles:
        assert h.committed != (h.error is not None), h
        if h.error is not None:
            assert isinstance(h.error, asyncckpt.TornSnapshotError)
            assert not (tmp_path / h.name / "COMMIT").exists()
    return expected, committed, torn


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "blocking"])
def test_no_optimizer_attached_in_place_updates_are_never_torn(tmp_path, mode):
    w = torch.randn(BIG)
    b = torch.randn(BIG // 2)

    def mutate(i: int) -> None:
        w.add_(1.0)
        b.mul_(-1.0)

    with asyncckpt.AsyncCheckpointer(snapshot=mode) as ck:
        expected, committed, torn = _loop(ck, tmp_path, mutate, {"w": w, "b": b}, seed=1)
    assert torn == 0 and len(committed) == N_SAVES
    _check_saved(tmp_path, expected, committed)


@pytest.mark.slow
def test_ema_updated_after_the_step_with_only_the_optimizer_attached(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)
    ema = torch.nn.Linear(512, 512)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 512)

    def mutate(i: int) -> None:
        model(x).pow(2).mean().backward()
        opt.step()  # waits for the snapshot (hook)
        opt.zero_grad()
        with torch.no_grad():  # the EMA is updated where no hook sees it
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(0.9).add_(pm, alpha=0.1)

    with asyncckpt.AsyncCheckpointer(optimizers=opt) as ck:
        tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                   **{f"ema.{k}": v for k, v in ema.state_dict().items()}}
        expected, committed, torn = _loop(ck, tmp_path, mutate, tensors, seed=2)
        assert ck.torn == 0
    # "auto" saw that the EMA is not covered by the attached optimizer: it blocked for those saves.
    assert torn == 0 and len(committed) == N_SAVES
    _check_saved(tmp_path, expected, committed)


@pytest.mark.slow
def test_buffer_updated_by_hand_in_auto_mode(tmp_path):
    p = torch.nn.Parameter(torch.zeros(BIG))
    running = torch.zeros(BIG)  # a statistic updated by hand
    opt = torch.optim.SGD([p], lr=1.0)

    def mutate(i: int) -> None:
        running.mul_(0.5).add_(float(i))
        p.grad = torch.ones_like(p)
        opt.step()

    with asyncckpt.AsyncCheckpointer(optimizers=opt) as ck:
        expected, committed, torn = _loop(ck, tmp_path, mutate, {"p": p, "running": running}, seed=3)
    assert torn == 0 and len(committed) == N_SAVES
    _check_saved(tmp_path, expected, committed)


@pytest.mark.slow
def test_lazy_saves_are_exact_or_fail_as_torn_never_committed_torn(tmp_path):
    w = torch.randn(4 * BIG)

    def mutate(i: int) -> None:
        w.add_(1.0)

    with asyncckpt.AsyncCheckpointer(snapshot="lazy") as ck:
        expected, committed, torn = _loop(ck, tmp_path, mutate, {"w": w}, seed=4)
        assert ck.torn == torn
    assert torn + len(committed) == N_SAVES
    assert torn > 0, "16 MiB changed at once after save(): some snapshots must have been outrun"
    _check_saved(tmp_path, expected, committed)


@pytest.mark.slow
def test_lazy_with_the_optimizer_attached_raises_no_false_alarm(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(16, 256)
    with asyncckpt.AsyncCheckpointer(optimizers=opt, snapshot="lazy", max_in_flight=2) as ck:
        for i in range(200):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ck.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / f"s{i % 4}",
                    step=i, overwrite=True)
            ck.finalize()
        ck.finalize(blocking=True)
        assert ck.torn == 0


def test_auto_switches_to_blocking_after_a_torn_snapshot(tmp_path, caplog):
    p = torch.nn.Parameter(torch.zeros(4 * BIG))
    opt = torch.optim.SGD([p], lr=1.0)
    with asyncckpt.AsyncCheckpointer(optimizers=opt) as ck:  # covered by the hook: lazy
        torn = 0
        for i in range(20):
            ck.save({"p": p}, tmp_path / f"s{i}", step=i)
            with torch.no_grad():
                p.add_(1.0)  # outside the optimizer: the guard sees it
            try:
                ck.finalize(blocking=True)
            except asyncckpt.TornSnapshotError as exc:
                torn += 1
                assert exc.keys == ["p"] and "snapshot='blocking'" in str(exc)
            if torn:
                break
        assert torn == 1, "a 16 MiB tensor changed right after a lazy save() must be caught at least once in 20"
        assert any("From now on save() waits" in r.getMessage() for r in caplog.records)
        before = p.detach().clone()
        ck.save({"p": p}, tmp_path / "after", step=100)  # now blocking: returns with the copy taken
        with torch.no_grad():
            p.add_(1.0)
        ck.finalize(blocking=True)
    assert torch.equal(asyncckpt.load(tmp_path / "after")["p"], before)


@pytest.mark.slow
def test_torch_async_checkpoint_then_zero_everything_keeps_the_values_from_before(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    sd = model.state_dict()
    tac = asyncckpt.TorchAsyncCheckpoint()
    try:
        for i in range(N_SAVES):
            ref = {k: v.clone() for k, v in sd.items()}
            tac.async_save(sd, tmp_path / f"m{i % 5}.pt")
            with torch.no_grad():
                for v in sd.values():
                    v.mul_(0)  # NVRx usage: async_save returned after the copy
            tac.finalize_async_save(blocking=True)
            out = torch.load(tmp_path / f"m{i % 5}.pt", weights_only=True)
            for k, v in ref.items():
                assert torch.equal(out[k], v), (i, k)
            with torch.no_grad():
                for k, v in sd.items():
                    v.copy_(ref[k] + 1)
    finally:
        tac.close()


class _AcceleratedLike(torch.optim.Optimizer):
    """Like Accelerate's AcceleratedOptimizer: an Optimizer subclass that wraps the real one and
    never runs Optimizer.__init__ (so hooks registered on it would never fire)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        return self.optimizer.step(closure)


class _LightningLike:
    def __init__(self, optimizer: object) -> None:
        self._optimizer = optimizer

    def step(self) -> None:
        self._optimizer.step()  # type: ignore[attr-defined]


def test_wrapped_optimizers_are_attached_through_their_wrappers(tmp_path):
    p = torch.nn.Parameter(torch.zeros(4 * BIG))
    inner = torch.optim.SGD([p], lr=1.0)
    wrapped = _LightningLike(_AcceleratedLike(inner))
    with asyncckpt.AsyncCheckpointer(optimizers=wrapped, snapshot="lazy") as ck:
        for i in range(10):
            expected = p.detach().clone()
            ck.save({"p": p}, tmp_path / f"s{i}")
            p.grad = torch.ones_like(p)
            wrapped.step()  # reaches inner.step(), whose pre-hook waits for the snapshot
            ck.finalize(blocking=True)
            assert torch.equal(asyncckpt.load(tmp_path / f"s{i}")["p"], expected)
        assert ck.torn == 0


@pytest.mark.parametrize("nbytes", [1 << 20, 32 << 20], ids=["copied-in-save", "copied-by-worker"])
def test_a_single_writer_commits_with_no_further_call(tmp_path, nbytes):
    """One process saves and then does nothing asyncckpt-related: the checkpoint still commits.

    A small state is copied inside ``save()`` (confirmed at the worker's ack); a large one is
    copied by the worker and, with ``snapshot="blocking"``, confirmed before ``save()`` returns.
    """
    import time

    w = torch.arange(nbytes // 4, dtype=torch.float32)
    ck = asyncckpt.AsyncCheckpointer(snapshot="blocking" if nbytes > 4 << 20 else "auto")
    try:
        ck.save({"w": w}, tmp_path / "a", step=1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not asyncckpt.list_checkpoints(tmp_path):
            time.sleep(0.05)  # only the read side is called: no finalize, no wait, no save
        assert [i.name for i in asyncckpt.list_checkpoints(tmp_path)] == ["a"]
        assert torch.equal(asyncckpt.load(tmp_path / "a")["w"], w)
    finally:
        ck.close()
