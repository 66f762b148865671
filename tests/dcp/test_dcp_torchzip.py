"""DCP tensor items written from the staging slot go through asyncckpt.format.torchzip: torch's
own CRC-32 stays off, and every item is still exactly the torch.save archive of its tensor."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt.dcp._io import FileSpec, write_file
from asyncckpt.storage import LocalStorage
from tests.dcp.test_partsink import CHUNK, _data, _items


async def _write(root: Path, source: Any) -> tuple[bytes, Any]:
    slot, items = _items()
    storage = LocalStorage(root)
    spec = FileSpec("__0_0.distcp", list(range(len(items))))
    loop = asyncio.get_running_loop()
    try:
        _, recs, _ = await asyncio.to_thread(write_file, loop, storage, "ck", spec, items,
                                             lambda i: _data(slot, items[i]), chunk_size=CHUNK, concurrency=2,
                                             source=slot if source else None)
    finally:
        await storage.close()
    return (root / "ck" / spec.name).read_bytes(), (slot, items, recs)


async def test_items_from_the_slot_skip_torchs_crc_and_keep_torch_saves_bytes(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[bool] = []
    real = torch._C.PyTorchFileWriter

    def spy(f: Any, compute_crc32: bool = True, *a: Any) -> Any:
        made.append(compute_crc32)
        return real(f, compute_crc32, *a)

    monkeypatch.setattr(torch._C, "PyTorchFileWriter", spy)
    direct, (slot, items, recs) = await _write(tmp_path / "a", True)
    assert made and not any(made)  # every tensor item recorded with torch's CRC-32 off
    made.clear()
    copied, _ = await _write(tmp_path / "b", False)
    assert made and all(made)  # without a slot: plain torch.save, CRC-32 on
    assert direct == copied
    for it, rec in zip([it for it in items if it.kind != "bytes"], [r for r in recs if r.kind == "tensor"]):
        want = io.BytesIO()
        torch.save(_data(slot, it), want)
        assert direct[rec.offset : rec.offset + rec.length] == want.getvalue()
