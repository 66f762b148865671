"""A repeated save of the same structure reuses the previous layout (asyncckpt.plan.PlanCache):
every change that matters must still reach the checkpoint exactly, and bad input must still fail."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt.errors import BadInputError
from asyncckpt.plan import PlanCache, plan_state


def _saved(ck: asyncckpt.AsyncCheckpointer, state: dict, path) -> dict:
    ck.save(state, path)
    ck.finalize(blocking=True)
    return asyncckpt.load(path)


def test_values_changed_in_place_between_saves_are_saved(tmp_path):
    state = {f"w{i}": torch.full((i % 7 + 1,), float(i)) for i in range(300)}
    state["grid"] = torch.arange(64.0).reshape(8, 8).t()  # not contiguous: copied afresh each save
    with asyncckpt.AsyncCheckpointer() as ck:
        for round_ in range(3):
            for t in state.values():
                t.add_(1.0)
            out = _saved(ck, state, tmp_path / f"r{round_}")
            for k, t in state.items():
                assert torch.equal(out[k], t), (round_, k)
    cache = PlanCache()
    for _ in range(3):
        cache.plan(state)
    assert cache.hits == 2


def test_plain_values_change_the_tree_not_the_layout(tmp_path):
    w = torch.zeros(4)
    with asyncckpt.AsyncCheckpointer() as ck:
        for i, (lr, flag, name, big) in enumerate([(0.1, True, "a", 1), (0.2, False, "b", 1 << 70), (-0.0, True, "c", 3)]):
            state = {"w": w, "lr": lr, "flag": flag, "name": name, "big": big, "np": np.float32(lr)}
            out = _saved(ck, state, tmp_path / f"s{i}")
            assert out["lr"] == lr and math.copysign(1, out["lr"]) == math.copysign(1, lr)
            assert out["flag"] is flag and out["name"] == name and out["big"] == big
            assert out["np"] == np.float32(lr).item()
    cache = PlanCache()
    cache.plan({"w": w, "lr": 0.1})
    plan = cache.plan({"w": w, "lr": 0.2})
    assert cache.hits == 1 and plan.tree.values[1].value == 0.2  # type: ignore[attr-defined]


_TENSORS = [torch.zeros(3), torch.ones(2, 2), torch.arange(4)]
# Two values of one type per slot: the layout is reused only when every leaf keeps its type.
_scalar_pair = st.one_of(*(st.tuples(s, s) for s in (
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False), st.text(max_size=3),
    st.binary(max_size=3))))
_shape = st.recursive(
    st.one_of(st.just("S"), st.sampled_from(range(len(_TENSORS)))),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text("abc", max_size=2), inner, max_size=4),
                            st.lists(inner, max_size=3).map(tuple)),
    max_leaves=12)


def _fill(shape, values):  # type: ignore[no-untyped-def]
    """The state of ``shape`` with its scalar slots ("S") taken from ``values`` in walk order."""
    if shape == "S":
        return next(values)
    if isinstance(shape, int):
        return _TENSORS[shape]
    if isinstance(shape, dict):
        return {k: _fill(v, values) for k, v in shape.items()}
    return type(shape)(_fill(v, values) for v in shape)


@settings(max_examples=60, deadline=None)
@given(shape=st.dictionaries(st.text("xyz", min_size=1, max_size=2), _shape, min_size=1, max_size=4),
       pairs=st.lists(_scalar_pair, min_size=40, max_size=40))
def test_a_reused_layout_rebuilds_the_tree_a_full_plan_would(shape, pairs):  # type: ignore[no-untyped-def]
    """New plain values on the same structure: the tree of the reused layout, which rebuilds only the
    subtrees holding values, equals the tree of a plan made from scratch; the first one is unchanged."""
    cache = PlanCache()
    a, b = _fill(shape, (p[0] for p in pairs)), _fill(shape, (p[1] for p in pairs))
    before = cache.plan(a).tree
    for state in (b, a, b):
        assert cache.plan(state).tree == plan_state(state, inline_max=0).tree
    assert before == plan_state(a, inline_max=0).tree
    assert cache.hits == 3  # the layout was reused every time


def test_zero_and_negative_zero_are_told_apart():
    cache = PlanCache()
    w = torch.zeros(2)
    cache.plan({"w": w, "x": 0.0})
    plan = cache.plan({"w": w, "x": -0.0})
    assert math.copysign(1, plan.tree.values[1].value) == -1  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None)
@given(shape=st.dictionaries(st.text("xyz", min_size=1, max_size=2), _shape, min_size=1, max_size=4),
       pairs=st.lists(_scalar_pair, min_size=40, max_size=40), keep=st.lists(st.booleans(), min_size=40, max_size=40))
def test_a_few_changed_values_rebuild_the_same_tree(shape, pairs, keep):  # type: ignore[no-untyped-def]
    """Some plain values change, the others stay: still the tree a full plan makes, each value's bits
    included (0.0 against -0.0 is a change), whatever was saved before."""
    cache = PlanCache()
    a = _fill(shape, (p[0] for p in pairs))
    b = _fill(shape, (p[0] if k else p[1] for p, k in zip(pairs, keep)))
    cache.plan(a)
    for state in (b, a, b, b):
        tree, want = cache.plan(state).tree, plan_state(state, inline_max=0).tree
        assert tree == want
        assert _signs(tree) == _signs(want)
    assert cache.hits == 4


def _signs(node):  # type: ignore[no-untyped-def]
    """The sign of every float leaf, in walk order (== on trees takes 0.0 and -0.0 for equal)."""
    if isinstance(getattr(node, "value", None), float):
        return [math.copysign(1, node.value)]
    kids = getattr(node, "values", None) or getattr(node, "items", None) or []
    return [s for k in kids for s in _signs(k)]


def test_a_replaced_tensor_or_new_shape_is_planned_again(tmp_path):
    a = torch.arange(10.0)
    with asyncckpt.AsyncCheckpointer() as ck:
        _saved(ck, {"a": a, "b": torch.ones(3)}, tmp_path / "s0")
        out = _saved(ck, {"a": a.clone() * 2, "b": torch.ones(3)}, tmp_path / "s1")  # new storages
        assert torch.equal(out["a"], a * 2)
        out = _saved(ck, {"a": a[:4], "b": torch.ones(3)}, tmp_path / "s2")  # same address, other shape
        assert torch.equal(out["a"], a[:4])
        out = _saved(ck, {"a": a.view(torch.int32), "b": torch.ones(3)}, tmp_path / "s3")  # other dtype
        assert torch.equal(out["a"], a.view(torch.int32))
        out = _saved(ck, {"a": a, "c": torch.ones(3)}, tmp_path / "s4")  # other keys
        assert set(out) == {"a", "c"}
        sq = torch.arange(16.0).reshape(4, 4)
        _saved(ck, {"a": a[:4], "b": sq}, tmp_path / "s5")
        out = _saved(ck, {"a": a[:4], "b": sq.t()}, tmp_path / "s6")  # same address and shape, other strides
        assert torch.equal(out["b"], sq.t())
        out = _saved(ck, {"a": a[2:6], "b": sq}, tmp_path / "s7")  # the same shape, further into its storage
        assert torch.equal(out["a"], a[2:6])


def test_tied_tensors_stay_tied_on_a_reused_layout(tmp_path):
    base = torch.arange(32.0)
    with asyncckpt.AsyncCheckpointer() as ck:
        for i in range(2):
            base.add_(1)
            out = _saved(ck, {"x": base[:16], "y": base[8:], "z": torch.ones(2)}, tmp_path / f"s{i}")
            assert torch.equal(out["x"], base[:16]) and torch.equal(out["y"], base[8:])
            out["x"][8] = -1
            assert out["y"][0] == -1  # still views of one storage


def test_a_tensor_moved_into_another_tensors_storage_is_saved_tied(tmp_path):
    base = torch.arange(8.0)
    with asyncckpt.AsyncCheckpointer() as ck:
        _saved(ck, {"x": base[:4], "y": torch.zeros(4)}, tmp_path / "s0")
        out = _saved(ck, {"x": base[:4], "y": base[4:]}, tmp_path / "s1")  # y now lives in x's storage
        assert torch.equal(out["y"], base[4:])
        assert out["x"].untyped_storage().data_ptr() == out["y"].untyped_storage().data_ptr()


def test_a_tied_view_with_other_strides_at_the_same_address_is_saved_as_it_is(tmp_path):
    base = torch.arange(16.0)
    with asyncckpt.AsyncCheckpointer() as ck:
        _saved(ck, {"x": base.view(4, 4).t(), "all": base}, tmp_path / "s0")
        x = base.as_strided((4, 4), (2, 1))  # the same address, shape and dtype; neither is contiguous
        out = _saved(ck, {"x": x, "all": base}, tmp_path / "s1")
        assert torch.equal(out["x"], x)


def test_bad_input_after_a_good_save_still_fails(tmp_path):
    w = torch.ones(2)
    with asyncckpt.AsyncCheckpointer() as ck:
        _saved(ck, {1: w}, tmp_path / "s0")
        with pytest.raises(BadInputError):
            ck.save({True: w}, tmp_path / "s1")  # equal to 1, but a bool key
        cyc: dict = {"w": w}
        cyc["self"] = cyc
        with pytest.raises(BadInputError, match="cycle"):
            ck.save(cyc, tmp_path / "s2")
        with pytest.raises(BadInputError):
            ck.save({1: w.to_sparse()}, tmp_path / "s3")


def test_ordered_dicts_lists_tuples_and_arrays_round_trip_on_a_reused_layout(tmp_path):
    arr = np.arange(6, dtype=np.int64)
    with asyncckpt.AsyncCheckpointer() as ck:
        for i in range(2):
            arr += 1
            state = {"od": collections.OrderedDict(b=torch.full((2,), float(i)), a=[1, (2, torch.ones(1) * i)]),
                     "arr": arr}
            out = _saved(ck, state, tmp_path / f"s{i}")
            assert isinstance(out["od"], collections.OrderedDict) and list(out["od"]) == ["b", "a"]
            assert torch.equal(out["od"]["b"], state["od"]["b"])
            assert isinstance(out["od"]["a"][1], tuple) and torch.equal(out["od"]["a"][1][1], torch.ones(1) * i)
            assert np.array_equal(out["arr"], arr)


def test_warm_up_then_saves_of_the_warmed_structure_are_exact(tmp_path):
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    with asyncckpt.AsyncCheckpointer(optimizers=opt) as ck:
        ck.warm_up({"model": model.state_dict(), "optim": opt.state_dict()})
        for i in range(2):
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            state = {"model": model.state_dict(), "optim": opt.state_dict(), "rng": torch.get_rng_state()}
            out = _saved(ck, state, tmp_path / f"s{i}")
            assert torch.equal(out["model"]["weight"], model.weight)
            assert torch.equal(out["optim"]["state"][0]["exp_avg"], opt.state[model.weight]["exp_avg"])
            assert torch.equal(out["rng"], state["rng"])  # a tensor made afresh each save


def test_a_request_larger_than_the_socket_takes_is_sent_right_after_construction(tmp_path):
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(20000)}  # ~1 MiB of entries
    with asyncckpt.AsyncCheckpointer() as ck:  # the worker is still starting
        ck.save(state, tmp_path / "a")
        state["t7"].fill_(-1)  # copied at save(): later changes are not in the checkpoint
        ck.save(state, tmp_path / "b")
        ck.finalize(blocking=True)
    a, b = asyncckpt.load(tmp_path / "a"), asyncckpt.load(tmp_path / "b")
    assert torch.equal(a["t7"], torch.full((3,), 7.0)) and torch.equal(b["t7"], torch.full((3,), -1.0))
    assert torch.equal(b["t19999"], torch.full((3,), 19999.0))


def test_save_leaves_the_trainers_thread_count_alone(tmp_path):
    """The small-tensor copy runs on one thread; the trainer's intra-op thread count is what it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        state = {"w": [torch.randn(100) for _ in range(50)], "big": torch.randn(300, 300)}
        with asyncckpt.AsyncCheckpointer(snapshot="blocking") as ck:
            for step in range(3):
                ck.save(state, tmp_path / f"s{step}")
                assert torch.get_num_threads() == 2
            ck.finalize(blocking=True)
        got = asyncckpt.load(tmp_path / "s2")
        assert all(torch.equal(a, b) for a, b in zip(got["w"], state["w"])) and torch.equal(got["big"], state["big"])
    finally:
        torch.set_num_threads(before)
