"""Invariant 3: every byte is covered by a checksum checked on load."""

from __future__ import annotations

import re

import pytest
import torch

import asyncckpt


@pytest.fixture
def saved(shared_ckpt, tmp_path):
    state = {"a": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(100), "meta": {"step": 3}}
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    return tmp_path / "c", state


def test_flipped_byte_in_data_file_names_file_and_key(saved):
    path, _ = saved
    data = path / "rank-00000.data"
    raw = bytearray(data.read_bytes())
    raw[4 * 1000] ^= 0x40  # inside tensor "a"
    data.write_bytes(bytes(raw))
    with pytest.raises(asyncckpt.IntegrityError, match=r"rank-00000\.data.*checksum mismatch.*affected keys: a"):
        asyncckpt.load(path)


def test_truncated_and_extended_data_file(saved):
    path, _ = saved
    data = path / "rank-00000.data"
    raw = data.read_bytes()
    data.write_bytes(raw[:-10])
    with pytest.raises(asyncckpt.IntegrityError, match="truncated"):
        asyncckpt.load(path)
    data.write_bytes(raw + b"x")
    with pytest.raises(asyncckpt.IntegrityError, match="extended"):
        asyncckpt.load(path)


def test_edited_manifest_does_not_match_commit_record(saved):
    path, _ = saved
    m = path / "rank-00000.manifest"
    raw = bytearray(m.read_bytes())
    raw[-1] ^= 1
    m.write_bytes(bytes(raw))
    with pytest.raises(asyncckpt.IntegrityError, match="does not match its commit record"):
        asyncckpt.load(path)


def test_missing_or_garbled_commit_record(saved):
    path, _ = saved
    commit = path / "COMMIT"
    commit.write_text("{not json")
    with pytest.raises(asyncckpt.FormatError, match="COMMIT: commit record is damaged"):
        asyncckpt.load(path)
    commit.unlink()
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="not a complete checkpoint"):
        asyncckpt.load(path)


def test_missing_data_file(saved):
    path, _ = saved
    (path / "rank-00000.data").unlink()
    with pytest.raises(asyncckpt.IntegrityError, match="missing"):
        asyncckpt.load(path)


def test_commit_record_edited_in_place_is_refused(saved):
    """A digit of ``created`` flipped keeps COMMIT valid JSON; its own checksum still catches it."""
    path, _ = saved
    commit = path / "COMMIT"
    raw = commit.read_bytes()
    m = re.search(rb'"created":(\d)', raw)
    assert m is not None
    digit = b"1" if m.group(1) != b"1" else b"2"
    commit.write_bytes(raw[: m.start(1)] + digit + raw[m.end(1) :])
    with pytest.raises(asyncckpt.IntegrityError, match="COMMIT: commit record checksum mismatch"):
        asyncckpt.load(path)


def test_commit_record_without_its_checksum_is_refused(saved):
    path, _ = saved
    commit = path / "COMMIT"
    raw = commit.read_bytes()
    commit.write_bytes(re.sub(rb',"record_crc32c":\d+\}$', b"}", raw))  # still valid JSON
    with pytest.raises(asyncckpt.FormatError, match="does not end with its record checksum"):
        asyncckpt.load(path)


def test_latest_flipped_to_another_checkpoint_is_refused_and_restore_falls_back(tmp_path):
    """``latest`` naming step-00000001 instead of step-00000002 (same length) is caught, not followed."""
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, signals=()) as mgr:
        for step in (1, 2):
            mgr.maybe_save(step, {"w": torch.full((10,), float(step))})
            mgr.wait()
    latest = tmp_path / "latest"
    raw = latest.read_bytes()
    assert b"step-00000002" in raw
    latest.write_bytes(raw.replace(b"step-00000002", b"step-00000001"))
    with pytest.raises(asyncckpt.IntegrityError, match="latest pointer checksum mismatch"):
        asyncckpt.load(tmp_path)
    state = {"w": torch.zeros(10)}
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        assert mgr.restore(state) == 2  # the newest complete checkpoint, not the forged pointer's
    assert torch.equal(state["w"], torch.full((10,), 2.0))
