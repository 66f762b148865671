"""asyncckpt.rng.get_rng_state: every way a user moves the global generators is captured exactly
(Python's state words are converted again only when they changed), and what it returns is the
caller's to keep."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.rng import get_rng_state, set_rng_state


def _reference() -> dict:
    s = np.random.get_state(legacy=False)
    assert isinstance(s, dict)
    return {"key": np.asarray(s["state"]["key"]), "pos": s["state"]["pos"], "has_gauss": s["has_gauss"], "gauss": s["gauss"]}


def _assert_numpy_state_is_current(got: dict) -> None:
    want = _reference()
    n = got["numpy"]
    assert np.array_equal(n["key"], want["key"]) and n["pos"] == want["pos"]
    assert n["has_gauss"] == want["has_gauss"] and n["gauss"] == want["gauss"]
    assert np.array_equal(got["python"]["state"], np.asarray(random.getstate()[1], dtype=np.uint64))


@pytest.fixture(autouse=True)
def _restore_global_generators():  # type: ignore[no-untyped-def]
    saved = np.random.get_state(), random.getstate()
    yield
    np.random.set_state(saved[0])
    random.setstate(saved[1])


_MOVES = {
    "nothing": lambda: None,
    "uniform": lambda: np.random.rand(3),
    "one normal (a Gaussian is cached)": lambda: np.random.randn(),
    "two normals": lambda: np.random.randn(2),
    "integers": lambda: np.random.randint(0, 10, size=700),  # past the 624-word regeneration
    "seed": lambda: np.random.seed(7),
    "seed 0": lambda: np.random.seed(0),
    "set_state": lambda: np.random.set_state(("MT19937", np.arange(624, dtype=np.uint32), 5, 1, 0.25)),
    "python random": lambda: random.random(),
}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(sorted(_MOVES)), min_size=1, max_size=12))
def test_every_capture_equals_get_state_whatever_moved_in_between(moves):  # type: ignore[no-untyped-def]
    for m in moves:
        _MOVES[m]()
        _assert_numpy_state_is_current(get_rng_state(cuda=False))


def test_a_cached_gaussian_used_up_without_a_draw_is_seen():
    np.random.seed(3)
    np.random.randn()  # draws two, returns one, caches the other
    first = get_rng_state(cuda=False)
    assert first["numpy"]["has_gauss"] == 1
    np.random.randn()  # uses the cached one: the key and position do not move
    second = get_rng_state(cuda=False)
    assert second["numpy"]["has_gauss"] == 0 and np.array_equal(second["numpy"]["key"], first["numpy"]["key"])
    _assert_numpy_state_is_current(second)


def test_what_it_returns_is_the_callers_to_keep():
    a = get_rng_state(cuda=False)
    a["numpy"]["pos"] = -1
    a["numpy"]["extra"] = 1
    b = get_rng_state(cuda=False)
    assert b["numpy"]["pos"] != -1 and "extra" not in b["numpy"]
    with pytest.raises(ValueError):
        b["python"]["state"][0] = 1  # shared between captures, so read-only
    _assert_numpy_state_is_current(b)


def test_a_replaced_bit_generator_is_followed():
    if not hasattr(np.random, "set_bit_generator"):
        pytest.skip("NumPy < 1.25 cannot replace the global bit generator")
    old = np.random.get_bit_generator()
    try:
        get_rng_state(cuda=False)
        np.random.set_bit_generator(np.random.MT19937(11))
        _assert_numpy_state_is_current(get_rng_state(cuda=False))
        np.random.rand()
        _assert_numpy_state_is_current(get_rng_state(cuda=False))
    finally:
        np.random.set_bit_generator(old)


def test_set_rng_state_replays_the_same_draws():
    np.random.randn()  # a cached Gaussian is part of the state
    s = get_rng_state(cuda=False)
    want = (np.random.randn(5), np.random.rand(5), random.random())
    np.random.seed(123)
    random.seed(5)
    set_rng_state(s, cuda=False)
    got = (np.random.randn(5), np.random.rand(5), random.random())
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
