"""The DCP part writer: tensor bytes that lie in the staging slot go out without a copy, and the
parts keep the storage seam's rules (contiguous, all but the last at least the backend's minimum)."""

from __future__ import annotations

import asyncio
import dataclasses
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from asyncckpt.dcp._io import BLOCK, FileSpec, ItemSpec, data_positions, write_file
from asyncckpt.storage import Capabilities, LocalStorage

MiB = 1 << 20
CHUNK = 8 * MiB


class PartSpy(LocalStorage):
    """A LocalStorage that records every part: (index, offset, length, address of its first byte)."""

    def __init__(self, root: Path, min_part: int) -> None:
        super().__init__(root)
        self.capabilities = dataclasses.replace(Capabilities(), min_part_size=min_part)  # type: ignore[misc]
        self.parts: list[tuple[int, int, int, int]] = []

    async def open_writer(self, key: str, size_hint: int | None = None) -> Any:
        writer = await super().open_writer(key, size_hint)
        real = writer.write_part

        async def spy(index: int, offset: int, data: memoryview, *, crc32c: int | None = None) -> None:
            addr = int(np.frombuffer(data, dtype=np.uint8).ctypes.data) if len(data) else 0
            self.parts.append((index, offset, len(data), addr))
            await real(index, offset, data, crc32c=crc32c)

        writer.write_part = spy  # type: ignore[method-assign]
        return writer


def _items() -> tuple[memoryview, list[ItemSpec]]:
    """A slot holding tensors of several sizes (around and above the part sizes) and a bytes item."""
    sizes = [(7 * MiB + 12, torch.float32), (3000, torch.float16), (21 * MiB, torch.float64),
             (5 * MiB, torch.uint8), (17, torch.int32), (9 * MiB - 4096, torch.bfloat16)]
    items: list[ItemSpec] = []
    off = 0
    for i, (n, dt) in enumerate(sizes):
        itemsize = torch.empty((), dtype=dt).element_size()
        n -= n % itemsize
        items.append(ItemSpec(f"t{i}", (0,), None, "tensor", dt, (n // itemsize,), n, off))
        off += n + 64
    items.append(ItemSpec("extra", None, None, "bytes", None, (), 1000, off))
    off += 1000
    slot = memoryview(bytearray(np.random.default_rng(7).integers(0, 256, off, dtype=np.uint8).tobytes()))
    return slot, items


def _data(slot: memoryview, it: ItemSpec) -> Any:
    view = slot[it.slot_offset : it.slot_offset + it.nbytes]
    if it.kind == "bytes":
        return view
    assert it.dtype is not None
    return torch.frombuffer(view, dtype=torch.uint8).view(it.dtype).view(it.shape)


async def _write(root: Path, min_part: int, slot: memoryview, items: list[ItemSpec],
                 source: memoryview | None) -> tuple[bytes, Any, list[tuple[int, int, int, int]]]:
    storage = PartSpy(root, min_part)
    spec = FileSpec("__0_0.distcp", list(range(len(items))))
    loop = asyncio.get_running_loop()
    try:
        rec = await asyncio.to_thread(write_file, loop, storage, "ck", spec, items, lambda i: _data(slot, items[i]),
                                      chunk_size=CHUNK, concurrency=2, source=source)
    finally:
        await storage.close()
    return (root / "ck" / spec.name).read_bytes(), rec, storage.parts


@pytest.mark.parametrize("min_part", [1, 5 * MiB])
async def test_slot_bytes_are_written_without_a_copy_and_parts_keep_the_seams_rules(tmp_path: Path,
                                                                                    min_part: int) -> None:
    slot, items = _items()
    copied, rec_copied, parts_copied = await _write(tmp_path / "a", min_part, slot, items, None)
    direct, rec_direct, parts = await _write(tmp_path / "b", min_part, slot, items, slot)

    assert direct == copied  # the same file, byte for byte, and the same records (offsets, CRC32C)
    assert rec_direct == rec_copied
    base = int(np.frombuffer(slot, dtype=np.uint8).ctypes.data)
    for ps in (parts, parts_copied):
        ps.sort()
        assert [p[0] for p in ps] == list(range(len(ps)))  # indexes 0.. contiguous
        ends = [p[1] + p[2] for p in ps]
        assert [p[1] for p in ps] == [0, *ends[:-1]]  # each part starts where the one before ended
        assert ends[-1] == len(direct)
        assert all(min_part <= p[2] <= CHUNK for p in ps[:-1])
    in_slot = [p for p in parts if p[2] and base <= p[3] < base + len(slot)]
    assert not any(base <= p[3] < base + len(slot) for p in parts_copied)
    # Every tensor of at least the minimum part goes out (mostly) straight from the slot.
    assert sum(p[2] for p in in_slot) >= (7 + 21 + 5 + 9 - 4 * 5) * MiB
    for _, off, n, addr in in_slot:  # and those parts hold exactly the file's bytes at their offsets
        assert bytes(slot[addr - base : addr - base + n]) == direct[off : off + n]


async def test_placed_items_go_out_with_o_direct_alignment(tmp_path: Path) -> None:
    """Tensors placed in the slot at their file offset modulo the block (what the trainer does with
    data_positions) go out as block-aligned parts from the slot; the file is the same bytes."""
    sizes = [(3 * MiB + 36, torch.float32), (700, torch.float16), (12 * MiB + 8, torch.float64),
             (MiB - 4096, torch.uint8), (2 * MiB + 2, torch.bfloat16)]
    items: list[ItemSpec] = [ItemSpec("meta", None, None, "bytes", None, (), 333)]
    for i, (n, dt) in enumerate(sizes):
        itemsize = torch.empty((), dtype=dt).element_size()
        n -= n % itemsize
        items.append(ItemSpec(f"t{i}", (0,), None, "tensor", dt, (n // itemsize,), n))
    spec = FileSpec("__0_0.distcp", list(range(len(items))))
    in_file = data_positions([spec], items)
    assert sorted(in_file) == [1, 3, 5]  # the tensors of at least DIRECT_MIN bytes
    off = 0
    for i, it in enumerate(items):
        f = in_file.get(i)
        off += (f - off) % BLOCK if f is not None else -off % 64
        it.slot_offset = off
        off += it.nbytes
    page = mmap.mmap(-1, off)  # page-aligned, as the staging pool's slots are
    page[:] = np.random.default_rng(3).integers(0, 256, off, dtype=np.uint8).tobytes()
    slot = memoryview(page)

    copied, rec_copied, _ = await _write(tmp_path / "a", 1, slot, items, None)
    direct, rec_direct, parts = await _write(tmp_path / "b", 1, slot, items, slot)
    assert direct == copied and rec_direct == rec_copied
    for i in in_file:  # the predicted positions are where the bytes landed
        it = items[i]
        assert direct[in_file[i] : in_file[i] + it.nbytes] == bytes(slot[it.slot_offset : it.slot_offset + it.nbytes])
    base = int(np.frombuffer(slot, dtype=np.uint8).ctypes.data)
    in_slot = [p for p in parts if p[2] and base <= p[3] < base + len(slot)]
    assert all(off % BLOCK == 0 and n % BLOCK == 0 and addr % BLOCK == 0 for _, off, n, addr in in_slot)
    placed = sum(items[i].nbytes for i in in_file)
    assert sum(p[2] for p in in_slot) >= placed - 2 * BLOCK * len(in_file)  # all but heads and tails
