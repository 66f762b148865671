"""DCP tensor items written from the staging slot go through asyncckpt.format.torchzip: torch's
own CRC-32 stays off, and every item is still exactly the torch.save archive of its tensor."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt.dcp import AsyncStorageWriter, async_save, close_async_saves
from asyncckpt.dcp._io import BLOCK, DIRECT_MIN, FileSpec, data_positions, write_file
from asyncckpt.dcp.saver import save_state_dict_async_plan
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


def test_a_save_places_large_tensors_where_their_file_offset_lets_o_direct_write_them(tmp_path: Path) -> None:
    """The trainer puts each large tensor in the slot at its offset in the ``.distcp`` file modulo
    the block; the file written there holds the tensor's bytes at exactly that offset."""
    g = torch.Generator().manual_seed(5)
    state = {"big": torch.randn(600_001, generator=g), "small": torch.randn(10, generator=g),
             "wide": torch.randn(300, 1001, generator=g, dtype=torch.float64), "step": 3}
    writer = AsyncStorageWriter(str(tmp_path / "plan"), thread_count=1)
    save_state_dict_async_plan(state, writer, no_dist=True)
    job, _ = writer.prepare_job()
    in_file = data_positions(job.files, job.items)
    large = {i for i, it in enumerate(job.items) if it.kind == "tensor" and it.nbytes >= DIRECT_MIN}
    assert set(in_file) == large and len(large) == 2
    assert all(job.items[i].slot_offset % BLOCK == in_file[i] % BLOCK for i in large)

    h = async_save(state, checkpoint_id=str(tmp_path / "ck"), storage_writer=AsyncStorageWriter(str(tmp_path / "ck"),
                                                                                                  thread_count=1))
    h.result()
    close_async_saves()
    (data_file,) = [p for p in (tmp_path / "ck").iterdir() if p.suffix == ".distcp"]
    raw = data_file.read_bytes()
    for i in large:
        it = job.items[i]
        assert raw[in_file[i] : in_file[i] + it.nbytes] == state[it.fqn].numpy().tobytes()
