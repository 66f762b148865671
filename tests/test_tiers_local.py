"""Tiers on local roots: fast commit, background drain, per-tier retention, load fallback."""

from __future__ import annotations

import json

import pytest
import torch

import asyncckpt
from asyncckpt import Tiers


def _names(root):
    return sorted(p.name for p in root.iterdir() if (p / "COMMIT").exists())


def test_save_commits_fast_tier_then_drains_and_retains_per_tier(tmp_path):
    fast, slow = tmp_path / "fast", tmp_path / "durable"
    tiers = Tiers(fast, slow, keep=[2, None])
    with asyncckpt.AsyncCheckpointer() as ck:
        for step in range(1, 5):
            h = ck.save({"w": torch.full((300_000,), float(step)), "step": step}, tiers / f"step-{step}", step=step)
            ck.finalize(blocking=True)
            assert h.committed and h.durable
    assert _names(fast) == ["step-3", "step-4"]  # keep 2 on the fast tier
    assert _names(slow) == ["step-1", "step-2", "step-3", "step-4"]  # keep all on the durable one
    assert json.loads((slow / "latest").read_text())["name"] == "step-4"
    out = asyncckpt.load(tiers)
    assert out["step"] == 4
    assert asyncckpt.load(tiers / "step-1")["step"] == 1  # only the durable tier has it


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_load_falls_back_to_the_next_tier_and_verifies(tmp_path, damage):
    fast, slow = tmp_path / "fast", tmp_path / "durable"
    tiers = Tiers(fast, slow)
    state = {"w": torch.randn(500_000)}
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save(state, tiers / "c", step=1)
    data = fast / "c" / "rank-00000.data"
    if damage == "delete":
        data.unlink()
    else:
        raw = bytearray(data.read_bytes())
        raw[123] ^= 0xFF
        data.write_bytes(bytes(raw))
    with pytest.raises(asyncckpt.IntegrityError):
        asyncckpt.load(fast / "c")
    assert torch.equal(asyncckpt.load(tiers / "c")["w"], state["w"])
    assert torch.equal(asyncckpt.load(tiers)["w"], state["w"])
    (slow / "c" / "rank-00000.data").unlink()
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="no tier holds a complete, verified copy"):
        asyncckpt.load(tiers / "c")


def test_handle_is_committed_before_drain_finishes(tmp_path):
    tiers = Tiers(tmp_path / "fast", tmp_path / "durable")
    with asyncckpt.AsyncCheckpointer() as ck:
        h = ck.save({"w": torch.randn(4 << 20)}, tiers / "c")
        while not h.committed:
            ck.finalize()
        # The drain is queued by the finalize that committed the fast tier: it cannot be done yet.
        assert not h.durable
        assert not (tmp_path / "durable" / "c" / "COMMIT").exists()
        ck.finalize(blocking=True)
        assert h.durable
    assert (tmp_path / "durable" / "c" / "COMMIT").exists()


def test_bad_tiers():
    with pytest.raises(asyncckpt.BadInputError):
        Tiers()
    with pytest.raises(asyncckpt.BadInputError, match="differ"):
        Tiers("/tmp/a", "/tmp/a")
    with pytest.raises(asyncckpt.BadInputError, match="keep"):
        Tiers("/tmp/a", "/tmp/b", keep=[1])
