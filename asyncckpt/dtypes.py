"""Names of the dtypes the format stores, and their sizes."""

from __future__ import annotations

import numpy as np
import torch

from .errors import BadInputError, FormatError

__all__ = ["itemsize", "numpy_dtype", "torch_dtype", "torch_dtype_name"]

_TORCH: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
# Dtypes of newer torch releases, stored by their name when the installed torch has them. Several
# have no arithmetic (bits*, float4_e2m1fn_x2): asyncckpt only ever moves their raw bytes.
for _name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
              "float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _TORCH[_name] = getattr(torch, _name)
_TORCH_NAMES = {v: k for k, v in _TORCH.items()}
_NUMPY_OK = {"b", "i", "u", "f", "c"}


def torch_dtype_name(dtype: torch.dtype, key: str) -> str:
    try:
        return _TORCH_NAMES[dtype]
    except KeyError:
        raise BadInputError(
            f"key {key!r}: tensor dtype {dtype} is not supported by asyncckpt (nothing was written); "
            f"supported are {', '.join(sorted(_TORCH))}. Convert the tensor (e.g. .view(torch.uint8) or .to(...)) "
            "before saving"
        ) from None


def torch_dtype(name: str, where: str = "") -> torch.dtype:
    try:
        return _TORCH[name]
    except KeyError:
        raise FormatError(f"{where}: unknown tensor dtype {name!r}") from None


def numpy_dtype(name: str, where: str = "") -> np.dtype:
    try:
        dt = np.dtype(name)
    except Exception:  # noqa: BLE001 - np.dtype parses strings: TypeError, ValueError, SyntaxError, ...
        raise FormatError(f"{where}: unknown NumPy dtype {name!r}") from None
    if dt.kind not in _NUMPY_OK or dt.hasobject:
        raise FormatError(f"{where}: NumPy dtype {name!r} cannot be stored without pickle")
    return dt


def itemsize(name: str, kind: str, where: str = "") -> int:
    if kind == "tensor":
        return torch_dtype(name, where).itemsize
    return numpy_dtype(name, where).itemsize
