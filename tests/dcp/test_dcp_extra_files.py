"""``async_save(extra_files=...)``: small files committed with a DCP checkpoint (Lightning's ``meta.pt``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from asyncckpt.dcp import async_save, close_async_saves
from asyncckpt.errors import BadInputError


def test_extra_files_follow_each_commit_of_a_fixed_name(tmp_path: Path) -> None:
    target = tmp_path / "last"
    try:
        for step in range(3):  # generation 0, then two overwrites
            handle = async_save({"w": torch.full((1 << 15,), float(step))}, checkpoint_id=target,
                                extra_files={"meta.pt": f"step {step}".encode()})
            assert handle.result() is not None
            assert (target / "meta.pt").read_bytes() == f"step {step}".encode()
            got = {"w": torch.zeros(1 << 15)}
            dcp.load(got, checkpoint_id=str(target), no_dist=True)
            assert torch.equal(got["w"], torch.full((1 << 15,), float(step)))
        assert not [p.name for p in target.iterdir() if ".tmp-" in p.name]
    finally:
        close_async_saves()


@pytest.mark.parametrize("name", [".metadata", "COMMIT", "__0_0.distcp", ".g2.metadata", "a/b", ""])
def test_reserved_or_nested_extra_file_names_are_refused_before_anything_is_written(tmp_path: Path, name: str) -> None:
    with pytest.raises(BadInputError, match="extra file name"):
        async_save({"w": torch.zeros(4)}, checkpoint_id=tmp_path / "c", extra_files={name: b"x"})
    assert not (tmp_path / "c").exists()
