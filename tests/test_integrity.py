"""Invariant 3: every byte is covered by a checksum checked on load."""

from __future__ import annotations

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
    with pytest.raises(asyncckpt.FormatError, match="COMMIT: commit record is malformed"):
        asyncckpt.load(path)
    commit.unlink()
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="not a complete checkpoint"):
        asyncckpt.load(path)


def test_missing_data_file(saved):
    path, _ = saved
    (path / "rank-00000.data").unlink()
    with pytest.raises(asyncckpt.IntegrityError, match="missing"):
        asyncckpt.load(path)
