"""DCP async saving across gloo ranks spawned by the tests (2 and 4 ranks, CPU)."""

from __future__ import annotations

import os
import pickle

import pytest

from tests._dist import run_ranks
from tests.dcp import _ranks
from tests.s3_servers import MotoServer

pytestmark = pytest.mark.multiproc


def test_two_ranks_async_plan_stock_load_and_snapshot(tmp_path) -> None:
    """2 ranks (DTensor, FSDP2 model + Adam, plain values): saved with the async plan while the
    state is mutated right after the snapshot; stock dcp.load and our reader both get the
    pre-mutation values."""
    ckpt = str(tmp_path / "ckpt")
    results = run_ranks(2, _ranks.save_plan_then_load, str(tmp_path), ckpt)
    assert all(r["values"] > 10 for r in results)
    names = sorted(os.listdir(ckpt))
    assert names == [".checksums", ".metadata", "COMMIT", "__0.checksums", "__0_0.distcp", "__1.checksums", "__1_0.distcp"]


def test_two_ranks_overwrite_in_place(tmp_path) -> None:
    """The same path saved three times by 2 ranks: each save is the next generation, every rank loads
    exactly it (stock reader and ours), and only its files remain."""
    ckpt = str(tmp_path / "last")
    results = run_ranks(2, _ranks.overwrite_in_place, str(tmp_path), ckpt)
    assert results[0]["files"] == [".g2.checksums", ".g2.metadata", ".metadata", "COMMIT", "__0.g2.checksums",
                                   "__0_0.g2.distcp", "__1.g2.checksums", "__1_0.g2.distcp"]


def test_four_ranks_save_two_ranks_load(tmp_path) -> None:
    """Saved by 4 ranks (uneven shards of 642 rows) with async_save, loaded by 2 ranks (stock and ours)."""
    ckpt = str(tmp_path / "ckpt4")
    run_ranks(4, _ranks.save_with_helper, str(tmp_path), ckpt, 642, 512)
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        md = pickle.load(f)
    assert len(md.state_dict_metadata["dt"].chunks) == 4
    stock = run_ranks(2, _ranks.load_resharded, str(tmp_path), ckpt, 642, 512, "stock")
    ours = run_ranks(2, _ranks.load_resharded, str(tmp_path), ckpt, 642, 512, "ours")
    assert [r["local_rows"] for r in stock] == [321, 321] == [r["local_rows"] for r in ours]


def test_two_ranks_s3_round_trip(tmp_path, dcp_moto: MotoServer, dcp_bucket: str) -> None:
    """Save to the test S3 server (moto) with the async plan, load back with AsyncStorageReader."""
    uri = f"s3://{dcp_bucket}/run/step-1"
    run_ranks(2, _ranks.s3_round_trip, str(tmp_path), uri, dcp_moto.options())
    keys = dcp_moto.keys(dcp_bucket)
    assert keys == sorted(
        f"run/step-1/{k}"
        for k in (".checksums", ".metadata", "COMMIT", "__0.checksums", "__0_0.distcp", "__1.checksums", "__1_0.distcp")
    )
    assert dcp_moto.incomplete_uploads(dcp_bucket) == []
