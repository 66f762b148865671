"""Issue 11 item 5 on the native path: every dtype that torch.save round-trips, asyncckpt round-trips
bit for bit; any other dtype is refused by name before anything is written."""

from __future__ import annotations

import io
import re

import pytest
import torch

import asyncckpt

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ALL = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str)


def _raw(dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` elements of ``dtype`` with random bits (many of these dtypes have no arithmetic)."""
    size = dtype.itemsize
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers of the same size (bit patterns, NaNs and all)."""
    if t.element_size() in _INT:
        return t.view(_INT[t.element_size()])
    return t.contiguous().reshape(-1).view(torch.int64)  # complex128: 16 bytes per element


def _torch_save_round_trips(dtype: torch.dtype) -> bool:
    try:
        t = _raw(dtype, 8, torch.Generator().manual_seed(0))
        buf = io.BytesIO()
        torch.save(t, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=True)
    except Exception:  # noqa: BLE001 - torch.save itself cannot round-trip this dtype
        return False
    return back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


_SAVED = [d for d in _ALL if _torch_save_round_trips(d)]
_OTHERS = [d for d in _ALL if d not in _SAVED]


def test_the_issues_dtypes_are_among_those_torch_save_round_trips():
    named = {"float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"}
    assert named <= {str(d).removeprefix("torch.") for d in _SAVED}


def test_every_dtype_torch_save_round_trips_round_trips_bit_exactly(shared_ckpt, tmp_path):
    gen = torch.Generator().manual_seed(0)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for d in _SAVED:
        state[str(d)] = {
            "big": _raw(d, 70_000, gen),  # above 64 KiB
            "small": _raw(d, 5, gen),
            "strided": _raw(d, 3 * 40_000, gen)[::3],  # non-contiguous: gathered by the copy
            "scalar": _raw(d, 1, gen).reshape(()),
            "shared": _raw(d, 64, gen).view(8, 8),
        }
        state[str(d)]["shared_t"] = state[str(d)]["shared"].t()  # same storage: written once
    shared_ckpt.save(state, tmp_path / "all")
    shared_ckpt.finalize(blocking=True)
    out = asyncckpt.load(tmp_path / "all")
    for name, tensors in state.items():
        for k, v in tensors.items():
            o = out[name][k]
            assert o.dtype == v.dtype and o.shape == v.shape, (name, k)
            assert torch.equal(_bits(o), _bits(v)), (name, k)
        assert out[name]["shared"].untyped_storage().data_ptr() == out[name]["shared_t"].untyped_storage().data_ptr()
    # load(into=...) copies every dtype into existing tensors, bit for bit.
    into = {n: {k: torch.empty_like(v) for k, v in t.items() if k != "shared_t"} for n, t in state.items()}
    asyncckpt.load(tmp_path / "all", into=into, strict=False)
    for name, tensors in into.items():
        for k, v in tensors.items():
            assert torch.equal(_bits(v), _bits(state[name][k])), (name, k)


@pytest.mark.parametrize("dtype", _OTHERS, ids=str)
def test_a_dtype_torch_save_cannot_store_is_refused_by_name_before_anything_is_written(shared_ckpt, tmp_path, dtype):
    t = torch.empty(16, dtype=dtype)
    with pytest.raises(asyncckpt.BadInputError, match=rf"w/x\b.*{re.escape(str(dtype))}\b"):
        shared_ckpt.save({"w": {"x": t}, "ok": torch.ones(3)}, tmp_path / "c")
    assert not (tmp_path / "c").exists()
