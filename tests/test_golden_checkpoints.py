"""Checkpoints written without compression stay byte-identical to what earlier releases wrote.

``tests/golden/`` holds two small checkpoints saved by the code before the format package and
compression existed (regenerate with ``python -m tests.test_golden_checkpoints DIR`` only on a deliberate
format change). Saving the same deterministic state now must give the same data files, byte for
byte, and manifests equal but for the per-save fields (save_id, created).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt.format import decode_manifest

GOLDEN = Path(__file__).parent / "golden"
NAMES = ("plain", "tied")


def golden_state(name: str) -> dict[str, Any]:
    """A fixed state built without randomness (the same bytes on every machine and release)."""
    w = (torch.arange(4096, dtype=torch.float32) * 0.001 - 2.0).reshape(64, 64)
    state: dict[str, Any] = {
        "model": {"w": w, "b": torch.linspace(-1, 1, 64), "bf16": w[:8].to(torch.bfloat16),
                  "ids": torch.arange(300, dtype=torch.int64), "mask": torch.arange(50) % 3 == 0},
        "optim": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": w * 0.5}},
                  "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}]},
        "np": np.arange(100, dtype=np.int32).reshape(10, 10),
        "meta": {"epoch": 3, "name": "golden", "big": 1 << 70, "raw": b"\x00\xff", "none": None},
    }
    if name == "tied":
        emb = torch.arange(2048, dtype=torch.float32).reshape(32, 64)
        state["model"]["emb"] = emb
        state["model"]["out"] = emb  # tied: one stored storage, two views
        state["model"]["half"] = emb[16:]
    return state


def save_golden(root: Path, name: str) -> None:
    c = asyncckpt.AsyncCheckpointer()
    try:
        c.save(golden_state(name), root / name)
        c.finalize(blocking=True)
    finally:
        c.close()


_PER_SAVE = {"save_id": "", "created": 0.0}


def _manifest(path: Path) -> Any:
    return msgspec.structs.replace(decode_manifest(path.read_bytes(), str(path)), **_PER_SAVE)


@pytest.mark.parametrize("name", NAMES)
def test_uncompressed_save_is_byte_identical_to_the_golden_checkpoint(name: str, tmp_path: Path) -> None:
    save_golden(tmp_path, name)
    old, new = GOLDEN / name, tmp_path / name
    assert (new / "rank-00000.data").read_bytes() == (old / "rank-00000.data").read_bytes()
    assert _manifest(new / "rank-00000.manifest") == _manifest(old / "rank-00000.manifest")
    out = asyncckpt.load(old)
    assert torch.equal(out["model"]["w"], golden_state(name)["model"]["w"])


if __name__ == "__main__":
    dest = Path(sys.argv[1])
    for n in NAMES:
        save_golden(dest, n)
