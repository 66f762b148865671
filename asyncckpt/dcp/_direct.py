"""Where a tensor's bytes lie inside a DCP tensor item (a one-tensor ``torch.save`` zip archive),
so the reader can read them straight into the destination tensor.

An item is ``[archive records][data/0: the storage's bytes][more records][central directory]``.
The central directory (at the item's end) gives ``data/0``'s local header, which gives where its
bytes start; ``data.pkl`` (at the item's start) says how the tensor lies in that storage. Only a
contiguous tensor filling its whole storage, stored uncompressed, qualifies; anything else is
read the general way. Nothing here is trusted on its own: the caller checks the item's CRC32C
over ``[0, start)``, ``[start, start + nbytes)`` and ``[start + nbytes, length)`` in order, which
is the whole item whatever ``start`` was computed to be.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HEAD_BYTES", "TAIL_BYTES", "DataRecord", "ItemLayout", "data_record", "tensor_layout"]

#: Bytes read from an item's start (``data.pkl`` and the local headers before ``data/0``).
HEAD_BYTES = 4096
#: Bytes read from an item's end (the central directory of the archive's few records).
TAIL_BYTES = 4096
_FULL = 0xFFFFFFFF
_EOCD = struct.Struct("<4sHHHHIIH")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")


@dataclass(frozen=True)
class DataRecord:
    """``data/0`` and ``data.pkl`` of an item, from its central directory (offsets from the item's start)."""

    data_header: int
    data_nbytes: int
    data_name_len: int
    pkl_offset_header: int
    pkl_nbytes: int
    records: int


@dataclass(frozen=True)
class ItemLayout:
    """The tensor's bytes are ``[start, start + nbytes)`` of the item."""

    start: int
    nbytes: int


def data_record(tail: bytes, tail_start: int) -> DataRecord | None:
    """``data/0``'s place from the item's last bytes (``tail`` starts at ``tail_start`` of the item), or
    None when the item is not a plain one-storage archive found in ``tail``."""
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        return None
    _, _, _, _, n, cd_size, cd_off, _ = _EOCD.unpack_from(tail, at)
    if cd_off == _FULL or n == 0xFFFF:
        at64 = tail.rfind(b"PK\x06\x06", 0, at)
        if at64 < 0 or at64 + _EOCD64.size > len(tail):
            return None
        _, _, _, _, _, _, _, n, cd_size, cd_off = _EOCD64.unpack_from(tail, at64)
    pos = cd_off - tail_start
    if pos < 0 or pos + cd_size > len(tail):
        return None
    data = pkl = None
    for _ in range(n):
        if pos + _CENTRAL.size > len(tail):
            return None
        f = _CENTRAL.unpack_from(tail, pos)
        sig, method, csize, usize, nlen, elen, clen, lho = f[0], f[4], f[8], f[9], f[10], f[11], f[12], f[16]
        if sig != b"PK\x01\x02":
            return None
        name = tail[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen].decode("utf-8", "replace")
        if _FULL in (csize, usize, lho):  # zip64 sizes (a record of 4 GiB or more): the general way
            return None
        if name.endswith("/data/0"):
            if method != 0 or csize != usize:
                return None
            data = (lho, usize, nlen)
        elif "/data/" in name and not name.endswith("/serialization_id"):
            return None  # more than one storage
        elif name.endswith("/data.pkl"):
            pkl = (lho, usize)
        pos += _CENTRAL.size + nlen + elen + clen
    if data is None or pkl is None:
        return None
    return DataRecord(data[0], data[1], data[2], pkl[0], pkl[1], n)


class _Storage:
    def __init__(self, pid: Any) -> None:
        self.pid = pid


class _StorageType:
    """Stands for a storage class named in ``data.pkl`` (never instantiated)."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype


def _rebuild_v2(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> tuple[Any, ...]:
    return ("v2", storage, offset, tuple(size), tuple(stride), None)


def _rebuild_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any,
                *rest: Any) -> tuple[Any, ...]:
    return ("v3", storage, offset, tuple(size), tuple(stride), dtype)


class _Describe(pickle.Unpickler):
    """Reads ``data.pkl`` into a description of the tensor; any other global refuses (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_v3
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(None)
        with warnings.catch_warnings():  # torch.FloatStorage & co. warn that TypedStorage is deprecated
            warnings.simplefilter("ignore")
            found = getattr(torch, name, None) if module == "torch" else None
            stype_dtype = getattr(found, "dtype", None) if name.endswith("Storage") else None
        if isinstance(found, torch.dtype):
            return found
        if isinstance(stype_dtype, torch.dtype):
            return _StorageType(stype_dtype)
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return _Storage(pid)


def tensor_layout(head: bytes, rec: DataRecord, dtype: torch.dtype, shape: tuple[int, ...]) -> ItemLayout | None:
    """Where a contiguous ``dtype`` tensor of ``shape`` filling the whole of ``data/0`` lies, from the item's
    first bytes ``head``; None when the item holds anything else (then it is read the general way)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if rec.data_nbytes != nbytes or nbytes == 0:
        return None
    h = rec.data_header
    if h + _LOCAL.size > len(head):
        return None
    sig, _, _, method, _, _, _, _, _, nlen, elen = _LOCAL.unpack_from(head, h)
    if sig != b"PK\x03\x04" or method != 0 or nlen != rec.data_name_len:
        return None
    start = h + _LOCAL.size + nlen + elen
    p = rec.pkl_offset_header
    if p + _LOCAL.size > len(head):
        return None
    psig, _, _, pmethod, _, _, _, _, _, pnlen, pelen = _LOCAL.unpack_from(head, p)
    pstart = p + _LOCAL.size + pnlen + pelen
    if psig != b"PK\x03\x04" or pmethod != 0 or pstart + rec.pkl_nbytes > min(len(head), h):
        return None
    try:
        desc = _Describe(io.BytesIO(head[pstart : pstart + rec.pkl_nbytes])).load()
    except Exception:  # noqa: BLE001 - anything unexpected in data.pkl: not ours to read directly
        return None
    if not (isinstance(desc, tuple) and len(desc) == 6 and isinstance(desc[1], _Storage)):
        return None
    kind, storage, offset, size, stride, v3_dtype = desc
    pid = storage.pid
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[2] == "0"):
        return None
    stype = pid[1]
    stored_dtype = v3_dtype if kind == "v3" else getattr(stype, "dtype", None)
    if stored_dtype != dtype or offset != 0 or size != tuple(shape):
        return None
    want_stride, acc = [], 1
    for n in reversed(shape):
        want_stride.append(acc)
        acc *= n
    if any(n > 1 and s != w for n, s, w in zip(shape, stride, reversed(want_stride))):
        return None
    return ItemLayout(start, nbytes)
