"""States of many small tensors (issue 13, part 3): the batched planning and copy paths must save
exactly what the one-by-one paths saved, keep every error, and keep the plan cache's rules.

Timing is measured by bench/loop_cost.py, never asserted here.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt.errors import BadInputError
from asyncckpt.plan import PlanCache, plan_state
from asyncckpt.staging import CopyProgram


@pytest.fixture(params=["join", "concatenate", "cat"])
def copy_path(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Every way a save copies many small tensors: gathered by bytes.join, by np.concatenate
    straight into the slab (a state above JOIN_MAX_BYTES), or by torch.cat."""
    if request.param == "concatenate":
        monkeypatch.setattr(CopyProgram, "JOIN_MAX_BYTES", 0)
    if request.param == "cat":
        monkeypatch.setattr(CopyProgram, "JOIN_MIN", 1 << 60)
    return request.param


def _mixed_state(n: int) -> dict:
    """Many small tensors of every shape the copy path meets: 0-d, N-d, odd sizes, non-contiguous,
    bool/bfloat16/int64/complex, requires_grad, empty, tied, inside nested containers."""
    g = torch.Generator().manual_seed(0)
    state: dict = {}
    for i in range(n):
        kind = i % 9
        if kind == 0:
            t = torch.randn(16, generator=g)
        elif kind == 1:
            t = torch.randn(3, 5, generator=g)  # 60 bytes: padding to the next 64-byte offset
        elif kind == 2:
            t = torch.tensor(float(i))  # 0-d (an optimizer's step)
        elif kind == 3:
            t = torch.randint(0, 2, (7,), generator=g).bool()
        elif kind == 4:
            t = torch.randn(4, 4, generator=g).t()  # not contiguous
        elif kind == 5:
            t = torch.randn(9, generator=g).to(torch.bfloat16)
        elif kind == 6:
            t = torch.arange(i, i + 3, dtype=torch.int64)
        elif kind == 7:
            t = torch.randn(2, 3, generator=g, requires_grad=True)
        else:
            t = torch.randn(3, generator=g, dtype=torch.complex64)
        state[f"layer{i}.w"] = t
    state["empty"] = [torch.zeros(0), torch.zeros(0, 3), torch.zeros(0)]
    base = torch.arange(40.0)
    state["tied"] = {"a": base[:16], "b": base[8:], "c": base}
    state["nested"] = collections.OrderedDict(x=[torch.ones(2), (torch.zeros(3), 7)], y={"z": torch.full((5,), 2.0)})
    state["step"] = 12
    return state


def _leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}/{i}")
    else:
        yield path, obj


def _assert_same(out, state) -> None:
    got = dict(_leaves(out))
    for key, want in _leaves(state):
        if isinstance(want, torch.Tensor):
            t = got[key]
            assert t.dtype == want.dtype and t.shape == want.shape, key
            assert torch.equal(t.view(torch.uint8) if t.dim() and t.numel() else t,
                               want.detach().contiguous().view(torch.uint8) if want.dim() and want.numel()
                               else want.detach()), key
        else:
            assert got[key] == want, key


def test_many_small_tensors_round_trip_bit_exact_from_the_first_save(tmp_path, copy_path):
    state = _mixed_state(2000)
    with asyncckpt.AsyncCheckpointer() as ck:  # no warm_up: the first save plans everything
        ck.save(state, tmp_path / "s0")
        ck.finalize(blocking=True)
        _assert_same(asyncckpt.load(tmp_path / "s0"), state)
        for round_ in range(1, 3):  # later saves reuse the layout and copy the new values
            with torch.no_grad():
                for _, t in _leaves(state):
                    if isinstance(t, torch.Tensor) and t.numel() and t.dtype.is_floating_point:
                        t.add_(1)
            ck.save(state, tmp_path / f"s{round_}")
            ck.finalize(blocking=True)
            _assert_same(asyncckpt.load(tmp_path / f"s{round_}"), state)
    out = asyncckpt.load(tmp_path / "s2")
    out["tied"]["c"][10] = -1
    assert out["tied"]["a"][10] == -1 and out["tied"]["b"][2] == -1  # still views of one storage


def test_the_batched_plan_equals_the_one_by_one_plan():
    """A conjugate view anywhere sends every tensor through the per-tensor checks: the entries of
    the other tensors must not depend on which way they were planned."""
    state = _mixed_state(300)
    fast = plan_state(state, inline_max=0)
    slow = plan_state({**state, "zz_conj": torch.randn(2, dtype=torch.complex64).conj()}, inline_max=0)
    assert fast.cacheable and not slow.cacheable
    assert slow.entries[: len(fast.entries)] == fast.entries
    assert slow.tree.values[:-1] == fast.tree.values  # type: ignore[attr-defined]
    assert fast.data_nbytes <= slow.data_nbytes
    assert set(fast.tensors) == set(slow.tensors) - {len(slow.entries) - 1}
    assert fast.own == {i: p for i, p in slow.own.items() if i < len(fast.entries)}
    assert fast.member_pos == slow.member_pos and fast.features == slow.features
    inline = plan_state(state)  # the default copies the small tensors now, either way
    assert inline.entries == fast.entries
    assert set(inline.inline) | set(inline.tensors) == set(fast.inline) | set(fast.tensors)


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.ones(3).to_sparse(), "sparse"),
    (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8), "quantized"),
    (lambda: torch.empty(2, device="meta"), "meta tensors"),
    (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
])
def test_a_bad_tensor_among_many_is_named(bad, match):
    state = {f"w{i}": torch.ones(4) for i in range(500)}
    state["w250"] = bad()
    with pytest.raises(BadInputError, match=match) as info:
        plan_state(state)
    assert "w250" in str(info.value)
    with pytest.raises(BadInputError, match=match):
        PlanCache().plan(state)


def test_many_empty_tensors_are_not_tied():
    state = {f"e{i}": torch.zeros(0) for i in range(50)}
    state["x"] = torch.ones(3)
    plan = plan_state(state, inline_max=0)
    assert not plan.member_pos and all(e.view_of == -1 for e in plan.entries)


def test_a_tensor_moved_within_its_storage_is_planned_again(tmp_path):
    base = torch.arange(64.0)
    state = {f"w{i}": torch.full((4,), float(i)) for i in range(100)}
    with asyncckpt.AsyncCheckpointer() as ck:
        for i, (lo, hi) in enumerate([(0, 8), (8, 16), (8, 16)]):
            state["slice"] = base[lo:hi]  # same shape and storage, another offset
            ck.save(state, tmp_path / f"s{i}")
            ck.finalize(blocking=True)
            out = asyncckpt.load(tmp_path / f"s{i}")
            assert torch.equal(out["slice"], base[lo:hi]) and torch.equal(out["w99"], state["w99"])
    cache = PlanCache()
    for lo in (0, 8, 8):
        cache.plan({"slice": base[lo:lo + 8], "x": torch.ones(1)})
    assert (cache.hits, cache.misses) == (1, 2)


def test_a_tensor_given_new_data_between_saves_is_copied_from_there(tmp_path, copy_path):
    state = {f"w{i}": torch.full((4,), float(i)) for i in range(200)}
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save(state, tmp_path / "s0")
        ck.finalize(blocking=True)
        state["w7"].data = torch.full((4,), -7.0)  # invisible to the version counter: another address
        state["w8"].set_(torch.full((4,), -8.0))
        ck.save(state, tmp_path / "s1")
        ck.finalize(blocking=True)
    out = asyncckpt.load(tmp_path / "s1")
    assert torch.equal(out["w7"], torch.full((4,), -7.0)) and torch.equal(out["w8"], torch.full((4,), -8.0))
    assert torch.equal(out["w9"], torch.full((4,), 9.0))


def test_arrays_and_plain_values_beside_many_tensors(tmp_path):
    state = {f"w{i}": torch.randn(8) for i in range(1000)}
    state.update(arr=np.arange(5, dtype=np.int32), lr=0.5, name="x", big=1 << 80)
    with asyncckpt.AsyncCheckpointer() as ck:
        for i in range(2):
            state["lr"] = 0.5 * (i + 1)
            state["arr"] += 1
            ck.save(state, tmp_path / f"s{i}")
            ck.finalize(blocking=True)
            out = asyncckpt.load(tmp_path / f"s{i}")
            assert out["lr"] == state["lr"] and out["big"] == 1 << 80 and np.array_equal(out["arr"], state["arr"])
            assert all(torch.equal(out[f"w{j}"], state[f"w{j}"]) for j in range(1000))


def test_the_guard_names_exactly_the_tensors_changed_in_place():
    from asyncckpt.staging import SnapshotGuard

    state = {f"w{i}": torch.zeros(3) for i in range(1000)}
    view = state["w5"][1:]
    guard = SnapshotGuard([*state.items(), ("w5.view", view)])
    assert len(guard) == 1001 and guard.changed() == []
    state["w7"].add_(1)
    view.mul_(2)  # a view shares its base's counter
    state["w900"].data.add_(1)  # .data has a counter of its own: invisible (docs/snapshot.md)
    assert guard.changed() == ["w5", "w7", "w5.view"]
    guard.release()
    assert len(guard) == 0 and guard.changed() == []
