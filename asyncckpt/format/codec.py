"""The entry codec: an entry's verified bytes to its value (tensor, NumPy array, opt-in pickle) and
the dtype names other formats use for it (safetensors)."""

from __future__ import annotations

import pickle
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch

from ..dtypes import numpy_dtype, torch_dtype
from ..errors import IntegrityError
from .records import Entry, RankManifest

__all__ = ["SAME_SIZE_INT", "entry_values", "safetensors_dtype", "stored_entries", "view_of_storage"]

#: The integer dtype of each item size: bit patterns are copied through it (bool, NaN payloads, bits*).
SAME_SIZE_INT: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_SAFETENSORS: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32",
    "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
}
_NUMPY_AS_TORCH: dict[str, str] = {
    "f8": "float64", "f4": "float32", "f2": "float16", "i8": "int64", "i4": "int32", "i2": "int16", "i1": "int8",
    "u1": "uint8", "b1": "bool", "u2": "uint16", "u4": "uint32", "u8": "uint64", "c8": "complex64",
}


def safetensors_dtype(e: Entry) -> str | None:
    """The safetensors dtype code of a tensor or ndarray entry, or None when safetensors has none."""
    name: str | None = e.dtype if e.kind == "tensor" else None
    if e.kind == "ndarray":
        dt = numpy_dtype(e.dtype)
        name = _NUMPY_AS_TORCH.get(f"{dt.kind}{dt.itemsize}")
    return _SAFETENSORS.get(name) if name is not None else None


def view_of_storage(storage: torch.UntypedStorage, dtype: torch.dtype, offset: int, shape: Any, stride: Any) -> torch.Tensor:
    """A tensor of ``dtype`` over ``storage`` with the given geometry (in elements of ``dtype``).

    Built as the integer dtype of the same item size, then viewed as ``dtype``: a tensor created
    with a quantized dtype directly would carry an unusable quantizer.
    """
    base = SAME_SIZE_INT.get(dtype.itemsize, dtype)
    t = torch.empty(0, dtype=base).set_(storage, offset, shape, stride)
    return t.view(dtype) if base != dtype else t


def stored_entries(m: RankManifest, indices: Collection[int]) -> list[int]:
    """The entries owning the bytes that the entries ``indices`` need (a view needs its storage), sorted."""
    out = set()
    for i in indices:
        v = m.entries[i].view_of
        out.add(v if v >= 0 else i)
    return sorted(out)


def entry_values(m: RankManifest, buffers: Mapping[int, np.ndarray], indices: Collection[int], where: str) -> list[Any]:
    """The values of the entries ``indices`` (``None`` elsewhere), from the verified bytes of their
    :func:`stored_entries` in ``buffers``. Views of one stored storage share one torch storage."""
    values: list[Any] = [None] * len(m.entries)
    for i, raw in buffers.items():
        e = m.entries[i]
        ew = f"{where}: key {e.key!r}"
        if e.kind == "tensor":
            dt = torch_dtype(e.dtype, ew)
            t = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)
            values[i] = t.view(dt).reshape(e.shape)
        elif e.kind == "ndarray":
            values[i] = raw.view(numpy_dtype(e.dtype, ew)).reshape(e.shape)
        else:
            try:
                values[i] = pickle.loads(raw.tobytes())
            except Exception as exc:
                raise IntegrityError(f"{ew}: pickled object cannot be loaded ({exc})") from exc
    for i in indices:
        e = m.entries[i]
        if e.view_of >= 0:
            storage = values[e.view_of].untyped_storage()
            dt = torch_dtype(e.dtype, f"{where}: key {e.key!r}")
            values[i] = view_of_storage(storage, dt, e.storage_offset, e.shape, e.stride)
    return values
