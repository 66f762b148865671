"""The engine on S3: save/load through s3:// URIs, listing, tiers local -> S3 with fallback."""

from __future__ import annotations

import pytest
import torch

import asyncckpt
from asyncckpt import Tiers
from asyncckpt._loop import run_sync
from asyncckpt.catalog import list_all
from asyncckpt.storage import open_storage


@pytest.fixture
def s3opts(moto_server):
    return moto_server.options()


def test_save_and_load_through_s3_uri(moto_server, s3_bucket, s3opts):
    state = {"w": torch.randn(3 << 20), "b": torch.ones(10), "step": 4}  # 12 MiB: multipart
    with asyncckpt.AsyncCheckpointer(storage_options=s3opts, chunk_size=5 << 20) as ck:
        h = ck.save(state, f"s3://{s3_bucket}/run/step-4", step=4)
        ck.wait_snapshot()
        state["w"].zero_()
        ck.finalize(blocking=True)
        assert h.committed
        with pytest.raises(asyncckpt.CheckpointExistsError):
            ck.save(state, f"s3://{s3_bucket}/run/step-4", step=4)
    out = asyncckpt.load(f"s3://{s3_bucket}/run/step-4", storage_options=s3opts)
    assert out["step"] == 4 and torch.equal(out["b"], torch.ones(10)) and out["w"].abs().sum() > 0
    infos = run_sync(list_all(open_storage(f"s3://{s3_bucket}/run", **s3opts)))
    assert [(i.name, i.complete, i.is_latest) for i in infos] == [("step-4", True, True)]
    assert moto_server.incomplete_uploads(s3_bucket) == []


def test_flipped_byte_on_s3_is_an_integrity_error(moto_server, s3_bucket, s3opts):
    with asyncckpt.AsyncCheckpointer(storage_options=s3opts) as ck:
        ck.save({"w": torch.arange(1000.0)}, f"s3://{s3_bucket}/r/c")
    st = open_storage(f"s3://{s3_bucket}/r", **s3opts)
    raw = bytearray(run_sync(st.read("c/rank-00000.data")))
    raw[100] ^= 1
    run_sync(st.put_record("c/rank-00000.data", bytes(raw)))
    with pytest.raises(asyncckpt.IntegrityError, match="checksum mismatch"):
        asyncckpt.load(f"s3://{s3_bucket}/r/c", storage_options=s3opts)


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_tiered_local_then_s3_falls_back_to_s3_and_verifies(tmp_path, moto_server, s3_bucket, s3opts, damage):
    tiers = Tiers(tmp_path / "nvme", f"s3://{s3_bucket}/run", keep=[1, None], storage_options=[{}, s3opts])
    states = {}
    with asyncckpt.AsyncCheckpointer(chunk_size=5 << 20) as ck:
        for step in (1, 2):
            states[step] = {"w": torch.randn(2 << 20), "step": step}
            h = ck.save(states[step], tiers / f"step-{step}", step=step)
            ck.finalize(blocking=True)
            assert h.durable
    assert sorted(p.name for p in (tmp_path / "nvme").iterdir()) == ["latest", "step-2"]  # keep 1 locally
    data = tmp_path / "nvme" / "step-2" / "rank-00000.data"
    if damage == "delete":
        data.unlink()
    else:
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        data.write_bytes(bytes(raw))
    out = asyncckpt.load(tiers)  # latest from the fast tier, served by S3 after the local copy fails
    assert out["step"] == 2 and torch.equal(out["w"], states[2]["w"])
    assert torch.equal(asyncckpt.load(tiers / "step-1")["w"], states[1]["w"])  # only in S3 now
    assert moto_server.incomplete_uploads(s3_bucket) == []


@pytest.mark.slow
def test_save_and_load_on_seaweedfs_with_signatures_checked(seaweed_server, seaweed_bucket):
    opts = seaweed_server.options()
    state = {"w": torch.randn(3 << 20), "step": 9}
    with asyncckpt.AsyncCheckpointer(storage_options=opts, chunk_size=5 << 20) as ck:
        ck.save(state, f"s3://{seaweed_bucket}/run/step-9", step=9)
    out = asyncckpt.load(f"s3://{seaweed_bucket}/run/step-9", storage_options=opts)
    assert torch.equal(out["w"], state["w"])
    bad = {**opts, "aws_secret_access_key": "wrong"}
    with pytest.raises(asyncckpt.StorageError, match=r"(?i)credential"):
        asyncckpt.load(f"s3://{seaweed_bucket}/run/step-9", storage_options=bad)
