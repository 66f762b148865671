from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt.plan import INLINE_MAX


def save_load(ck, state, path, **load_kw):
    ck.save(state, path)
    ck.finalize(blocking=True)
    return asyncckpt.load(path, **load_kw)


def test_values_of_every_supported_kind_round_trip(shared_ckpt, tmp_path):
    state = {
        "int": 3,
        "neg": -7,
        "big": 1 << 80,
        "float": 1.25,
        "nan": float("nan"),
        "inf": float("-inf"),
        "str": "héllo",
        "none": None,
        "bool": True,
        "bytes": b"\x00\x01",
        "list": [1, "a", [2.5]],
        "tuple": (0.9, 0.999),
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "intkeys": {0: torch.ones(3), 1: {"step": torch.tensor(5.0)}},
        "np": np.arange(12, dtype=np.int16).reshape(3, 4),
        "np_be": np.arange(4, dtype=">f8"),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "large": torch.randn(INLINE_MAX // 4 + 1000),
        "bf16": torch.randn(100, dtype=torch.bfloat16),
        "bool_t": torch.tensor([True, False]),
        "noncontig": torch.arange(20.0).reshape(4, 5).t(),
        "view": torch.arange(100_000.0)[10:50_010:3],
    }
    out = save_load(shared_ckpt, state, tmp_path / "c1")
    assert out["int"] == 3 and out["neg"] == -7 and out["big"] == 1 << 80
    assert out["float"] == 1.25 and np.isnan(out["nan"]) and out["inf"] == float("-inf")
    assert out["str"] == "héllo" and out["none"] is None and out["bool"] is True and out["bytes"] == b"\x00\x01"
    assert out["list"] == [1, "a", [2.5]] and out["tuple"] == (0.9, 0.999)
    assert isinstance(out["ordered"], collections.OrderedDict) and list(out["ordered"]) == ["b", "a"]
    assert torch.equal(out["intkeys"][0], torch.ones(3)) and out["intkeys"][1]["step"].item() == 5.0
    np.testing.assert_array_equal(out["np"], state["np"])
    np.testing.assert_array_equal(out["np_be"], state["np_be"])
    for k in ("scalar", "empty", "large", "bf16", "bool_t", "noncontig", "view"):
        assert out[k].dtype == state[k].dtype, k
        assert torch.equal(out[k], state[k]), k


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3), min_size=1, max_size=6),
    dtypes=st.lists(st.sampled_from(_DTYPES), min_size=6, max_size=6),
    big=st.booleans(),
)
def test_random_tensors_round_trip_bitwise(shared_ckpt, tmp_path_factory, shapes, dtypes, big):
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        if big and i == 0:
            shape = [INLINE_MAX // 2 + 7]  # above the inline threshold: goes through shared memory
        t = torch.randint(0, 255, shape, generator=g, dtype=torch.int64).to(dt) if dt != torch.complex64 else torch.randn(shape, dtype=dt, generator=g)
        state[f"t{i}"] = t
    out = save_load(shared_ckpt, state, tmp_path_factory.mktemp("h") / "c")
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        assert torch.equal(out[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


def test_load_into_copies_in_place_and_checks_first(shared_ckpt, tmp_path):
    model = torch.nn.Linear(300, 200)
    save_load(shared_ckpt, {"model": model.state_dict(), "step": 9}, tmp_path / "a")
    other = torch.nn.Linear(300, 200)
    target = {"model": other.state_dict(), "step": 0}
    weight_ptr = other.weight.data_ptr()
    out = asyncckpt.load(tmp_path / "a", into=target)
    assert out is target and out["step"] == 9
    assert torch.equal(other.weight, model.weight) and other.weight.data_ptr() == weight_ptr
    wrong = torch.nn.Linear(300, 100)
    before = wrong.weight.clone()
    with pytest.raises(asyncckpt.BadInputError, match="model/weight: shape"):
        asyncckpt.load(tmp_path / "a", into={"model": wrong.state_dict(), "step": 0})
    assert torch.equal(wrong.weight, before)  # nothing changed: the check happens before any copy
    with pytest.raises(asyncckpt.BadInputError, match="missing from the checkpoint: \\['extra'\\]"):
        asyncckpt.load(tmp_path / "a", into={"model": torch.nn.Linear(300, 200).state_dict(), "step": 0, "extra": 1})


def test_map_location_and_root_with_latest(shared_ckpt, tmp_path):
    save_load(shared_ckpt, {"w": torch.ones(4)}, tmp_path / "s1")
    save_load(shared_ckpt, {"w": torch.full((4,), 2.0)}, tmp_path / "s2")
    out = asyncckpt.load(tmp_path, map_location="cpu")  # a root resolves through `latest`
    assert torch.equal(out["w"], torch.full((4,), 2.0))
    assert (tmp_path / "latest").read_text().count("s2") == 1


def test_pickle_needs_opt_in_on_both_sides(tmp_path):
    class Thing:
        pass

    with asyncckpt.AsyncCheckpointer() as plain:
        with pytest.raises(asyncckpt.BadInputError, match="allow_pickle"):
            plain.save({"x": Thing()}, tmp_path / "p0")
    with asyncckpt.AsyncCheckpointer(allow_pickle=True) as ck:
        ck.save({"x": {1, 2, 3}}, tmp_path / "p")
    with pytest.raises(asyncckpt.BadInputError, match="pickled object"):
        asyncckpt.load(tmp_path / "p")
    assert asyncckpt.load(tmp_path / "p", allow_pickle=True)["x"] == {1, 2, 3}


def test_layout_on_disk_is_documented(shared_ckpt, tmp_path):
    save_load(shared_ckpt, {"w": torch.ones(4)}, tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "c")) == ["COMMIT", "rank-00000.data", "rank-00000.manifest"]
    assert sorted(os.listdir(tmp_path)) == ["c", "latest"]


@pytest.mark.parametrize("layout", ["hashed", "roundrobin"])
def test_spread_layouts_are_recorded_and_need_no_hint_to_load(tmp_path, layout):
    from asyncckpt._loop import run_sync
    from asyncckpt.catalog import delete_checkpoint, list_all
    from asyncckpt.storage import open_storage

    with asyncckpt.AsyncCheckpointer(layout=layout) as ck:
        ck.save({"w": torch.arange(100_000)}, tmp_path / "step-7", step=7)
        ck.save({"w": torch.arange(5)}, tmp_path / "step-8", step=8)
    data_files = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.data")]
    assert all(not f.startswith("step-") for f in data_files), data_files  # data went under a spread prefix
    assert torch.equal(asyncckpt.load(tmp_path / "step-7")["w"], torch.arange(100_000))
    st = open_storage(str(tmp_path))
    infos = run_sync(list_all(st))
    assert [(i.name, i.complete) for i in infos] == [("step-8", True), ("step-7", True)]
    run_sync(delete_checkpoint(st, "step-7"))
    assert len(list(tmp_path.rglob("*.data"))) == 1


def test_unknown_layout_is_refused():
    with pytest.raises(asyncckpt.BadInputError, match="unknown key layout"):
        asyncckpt.AsyncCheckpointer(layout="zigzag", start_worker=False)
