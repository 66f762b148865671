"""The read side and deletion on S3 (moto on 127.0.0.1), the same rules as on a local root.

`load`/`list_checkpoints` of an `s3://` root and of Tiers; `rm`/`delete`/`prune` that touch only a
checkpoint's own objects (the bucket is snapshotted before and after).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import cli
from tests._trees import removed, snapshot_bucket

OURS = ("COMMIT", "rank-00000.data", "rank-00000.manifest")


def run(capsys: Any, *argv: object) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def template(moto_server: Any) -> Iterator[str]:
    """A bucket holding run/step-{1,2,3} (latest step-3), written once by the real checkpointer."""
    bucket = moto_server.create_bucket()
    with asyncckpt.AsyncCheckpointer(storage_options=moto_server.options()) as ck:
        for step in (1, 2, 3):
            ck.save({"w": torch.full((100,), float(step)), "step": step}, f"s3://{bucket}/run/step-{step}", step=step)
    yield bucket
    moto_server.delete_bucket(bucket)


@pytest.fixture
def s3(moto_server: Any, s3_bucket: str, template: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh copy of the template, with a user's objects beside and inside the checkpoints."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", moto_server.region)
    c = moto_server.client()
    for key in moto_server.keys(template):
        c.copy_object(Bucket=s3_bucket, Key=key, CopySource={"Bucket": template, "Key": key})
    for key in ("datasets/a.csv", "datasets/b/c.csv", "run/notes.txt", "run/step-1/notes.txt", "run-2/x"):
        c.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    return {"root": f"s3://{s3_bucket}/run", "opts": moto_server.options(), "client": c, "bucket": s3_bucket,
            "ep": ("--endpoint-url", moto_server.endpoint_url)}


def test_load_and_list_an_s3_root(s3: dict[str, Any], tmp_path: Path) -> None:
    assert asyncckpt.load(s3["root"], storage_options=s3["opts"])["step"] == 3  # a root means its latest
    assert asyncckpt.load(f"{s3['root']}/", storage_options=s3["opts"])["step"] == 3
    assert asyncckpt.load(f"{s3['root']}/step-1", storage_options=s3["opts"])["step"] == 1
    listed = asyncckpt.list_checkpoints(s3["root"], storage_options=s3["opts"], check=True)
    assert [i.name for i in listed] == ["step-3", "step-2", "step-1"] and listed[0].is_latest
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="a prefix holding 2 object"):
        asyncckpt.load(f"s3://{s3['bucket']}/datasets", storage_options=s3["opts"])
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="nothing there"):
        asyncckpt.load(f"s3://{s3['bucket']}/nope", storage_options=s3["opts"])
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="does not exist"):
        asyncckpt.load("s3://no-such-bucket-here/run", storage_options=s3["opts"])


def test_load_and_list_tiers_roots(s3: dict[str, Any], tmp_path: Path) -> None:
    """Tier 0 (local) never got these checkpoints: latest comes from the S3 tier and loads from there."""
    tiers = asyncckpt.Tiers(tmp_path / "fast", s3["root"], storage_options=[{}, s3["opts"]])
    assert asyncckpt.load(tiers)["step"] == 3
    assert asyncckpt.load(tiers / "step-2")["step"] == 2
    got = {"w": torch.zeros(100), "step": 0}
    asyncckpt.load(tiers, into=got)
    assert got["step"] == 3 and torch.equal(got["w"], torch.full((100,), 3.0))
    listed = asyncckpt.list_checkpoints(tiers)
    assert [i.name for i in listed] == ["step-3", "step-2", "step-1"] and listed[0].tiers == [s3["root"]]


def test_rm_on_s3_touches_only_checkpoint_objects(capsys: Any, s3: dict[str, Any]) -> None:
    c, bucket, ep, root = s3["client"], s3["bucket"], s3["ep"], s3["root"]
    before = snapshot_bucket(c, bucket)
    for target, code, words in (
        (f"s3://{bucket}/datasets", 2, "a prefix holding 2 object(s) (a.csv, b/c.csv)"),
        (f"s3://{bucket}/datasets/a.csv", 2, "an object of 14 bytes"),
        (f"s3://{bucket}/nothing", 2, "no checkpoint there"),
        (root, 1, "points to, step-3"),
        (f"{root}/step-3", 1, "points to"),
        ("s3://no-such-bucket-here/run/step-1", 2, "does not exist"),
    ):
        rc, _, err = run(capsys, "rm", target, *ep)
        assert rc == code and words in err, (target, err)
    assert snapshot_bucket(c, bucket) == before
    rc, out, err = run(capsys, "rm", f"{root}/step-1", *ep)
    assert rc == 0 and "left in place" in out and "notes.txt" in out, err
    assert removed(before, snapshot_bucket(c, bucket)) == {f"run/step-1/{f}" for f in OURS}


def test_rm_force_of_an_s3_root_and_prune(capsys: Any, s3: dict[str, Any]) -> None:
    c, bucket, ep, root = s3["client"], s3["bucket"], s3["ep"], s3["root"]
    before = snapshot_bucket(c, bucket)
    rc, out, err = run(capsys, "rm", "--force", root, *ep)
    assert rc == 0 and "now points to step-2" in out, err
    after = snapshot_bucket(c, bucket)
    before.pop("run/latest")
    after.pop("run/latest")
    assert removed(before, after) == {f"run/step-3/{f}" for f in OURS}
    gone = asyncckpt.prune(root, keep_last=1, storage_options=s3["opts"])
    assert [i.name for i in gone] == ["step-1"]
    now = snapshot_bucket(c, bucket)
    assert now.pop("run/latest")  # still there, unchanged by prune
    assert removed(after, now) == {f"run/step-1/{f}" for f in OURS}
    assert "run/step-1/notes.txt" in now
    now = snapshot_bucket(c, bucket)
    rc, out, err = run(capsys, "prune", f"s3://{bucket}/datasets", "--keep-last", "1", *ep)  # no checkpoints there
    assert rc == 0 and "deleted 0" in out, err
    assert snapshot_bucket(c, bucket) == now
    rc, _, err = run(capsys, "prune", "s3://no-such-bucket-here/run", "--keep-last", "1", *ep)
    assert rc == 2 and "does not exist" in err


def test_delete_of_an_incomplete_s3_save_aborts_its_uploads(s3: dict[str, Any], moto_server: Any) -> None:
    c, bucket = s3["client"], s3["bucket"]
    c.delete_object(Bucket=bucket, Key="run/step-2/COMMIT")  # as if the save never committed
    c.create_multipart_upload(Bucket=bucket, Key="run/step-2/rank-00000.data")  # a torn upload of ours
    c.create_multipart_upload(Bucket=bucket, Key="run/step-2/notes.txt")  # someone else's
    before = snapshot_bucket(c, bucket)
    report = asyncckpt.delete(f"{s3['root']}/step-2", storage_options=s3["opts"])
    assert not report.complete
    assert removed(before, snapshot_bucket(c, bucket)) == {"run/step-2/rank-00000.data", "run/step-2/rank-00000.manifest"}
    assert moto_server.incomplete_uploads(bucket) == ["run/step-2/notes.txt"]
