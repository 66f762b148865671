"""The fixed states the golden files were written from, and the one writer per save path.

``python -m tests.golden.states --write`` regenerates ``tests/golden/v1`` from the current code.
Do that only when the stored format is meant to change (and say so in the commit): the golden
test exists so that speed work changes nothing that is stored.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import shutil
from typing import Any

import numpy as np
import torch

import asyncckpt
from asyncckpt.dcp import AsyncStorageWriter, async_save, close_async_saves

GOLDEN = pathlib.Path(__file__).parent / "v1"


def tensors() -> dict[str, Any]:
    """Every dtype family, a 0-d, an empty, a view sharing storage, and plain Python values."""
    g = torch.Generator().manual_seed(20261202)
    w = torch.randn(64, 32, generator=g)
    return {
        "w": w,
        "w_t": w.t(),  # a view of w's storage: native stores it as a view entry
        "row": w[3],
        "h": torch.randn(33, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, 7, generator=g).to(torch.float16),
        "f64": torch.randn(9, generator=g, dtype=torch.float64),
        "i64": torch.arange(-5, 20),
        "i8": torch.arange(-100, 100, 7, dtype=torch.int8),
        "mask": torch.arange(13) % 3 == 0,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "meta": {"step": 3, "lrs": [0.1, 0.01], "name": "run", "pair": (1, 2), "none": None, "big": 2**70},
    }


def native_state() -> dict[str, Any]:
    s = tensors()
    s["arr"] = np.arange(24, dtype=np.float32).reshape(4, 6)
    return s


def pt_state() -> dict[str, Any]:
    return native_state()


def dcp_state() -> dict[str, Any]:
    s = tensors()
    del s["w_t"], s["row"]  # DCP stores tensors by key and does not keep views
    s["blob"] = io.BytesIO(b"losses:" + bytes(range(40)))
    return s


def write_pt(out: pathlib.Path) -> pathlib.Path:
    path = out / "model.pt"
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save(pt_state(), path)
        tac.finalize_async_save(blocking=True)
    return path


def write_native(out: pathlib.Path) -> pathlib.Path:
    path = out / "native" / "step-3"
    with asyncckpt.AsyncCheckpointer(allow_pickle=False) as ck:
        ck.save(native_state(), str(path), step=3)
        ck.finalize(blocking=True)
    return path


def write_dcp(out: pathlib.Path) -> pathlib.Path:
    path = out / "dcp"
    try:
        async_save(dcp_state(), storage_writer=AsyncStorageWriter(str(path))).result()
    finally:
        close_async_saves()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help=f"replace {GOLDEN} with what the current code writes")
    args = ap.parse_args()
    if not args.write:
        ap.error("nothing to do without --write")
    if GOLDEN.exists():
        shutil.rmtree(GOLDEN)
    GOLDEN.mkdir(parents=True)
    tmp = GOLDEN.parent / "_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shutil.copy(write_pt(tmp), GOLDEN / "model.pt")
        native = write_native(tmp)
        for name in ("rank-00000.data", "rank-00000.manifest"):
            shutil.copy(native / name, GOLDEN / f"native.{name}")
        dcp = write_dcp(tmp)
        for name in ("__0_0.distcp", ".metadata"):
            shutil.copy(dcp / name, GOLDEN / f"dcp.{name.lstrip('.')}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for p in sorted(GOLDEN.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
