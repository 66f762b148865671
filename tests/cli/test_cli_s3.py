"""The command line and the manager on an S3 root (moto on 127.0.0.1): every CLI verb, restore, pause."""

from __future__ import annotations

import json
import time

import pytest
import safetensors.torch
import torch

import asyncckpt
from asyncckpt import cli
from tests.cli._build import build_root


@pytest.fixture
def s3root(moto_server, s3_bucket, monkeypatch):  # type: ignore[no-untyped-def]
    """An S3 root holding steps 10, 20, 30; the CLI finds credentials in the environment, like a user's shell."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", moto_server.region)
    uri = f"s3://{s3_bucket}/run"
    expect = build_root(uri, storage_options=moto_server.options())
    return uri, moto_server, s3_bucket, expect


def run(capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_on_s3(capsys, s3root, tmp_path):
    uri, server, bucket, expect = s3root
    ep = ("--endpoint-url", server.endpoint_url)

    rc, out, err = run(capsys, "ls", uri, *ep, "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert [c["step"] for c in data["checkpoints"]] == [30, 20, 10] and data["checkpoints"][0]["is_latest"]
    assert data["checkpoints"][0]["path"] == f"{uri}/step-00000030"
    rc, out, _ = run(capsys, "ls", uri, *ep)
    assert rc == 0 and "<- latest" in out

    rc, out, err = run(capsys, "inspect", f"{uri}/step-00000020", *ep, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["step"] == 20 and info["checksum_algo"] == "crc32c"
    assert {k["key"] for k in info["keys"]["0"]} >= {"model/0.weight", "optim/state/0/exp_avg"}

    rc, out, err = run(capsys, "verify", uri, *ep)  # a root: its latest
    assert rc == 0 and out.startswith(f"OK {uri}/step-00000030"), out + err

    dest = tmp_path / "m.pt"
    rc, out, err = run(capsys, "export", uri, "--to", dest, "--key", "model", *ep)
    assert rc == 0, err
    got = torch.load(dest, weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in expect["model"].items())
    st = tmp_path / "m.safetensors"
    rc, out, err = run(capsys, "export", uri, "--to", st, "--key", "model", *ep)
    assert rc == 0, err
    got = safetensors.torch.load_file(st)
    assert all(torch.equal(got[k], v) for k, v in expect["model"].items())

    rc, out, err = run(capsys, "rm", f"{uri}/step-00000030", *ep)
    assert rc == 1 and "points to" in err
    rc, out, err = run(capsys, "prune", uri, "--keep-last", "1", *ep)
    assert rc == 0 and "deleted 2" in out, err
    assert [k for k in server.keys(bucket) if "step-00000010" in k or "step-00000020" in k] == []

    rc, out, err = run(capsys, "pause", uri, *ep)
    assert rc == 0, err
    assert "run/PAUSE" in server.keys(bucket)

    rc, out, err = run(capsys, "rm", "--force", f"{uri}/step-00000030", *ep)
    assert rc == 0 and "'latest' removed" in out
    rc, out, err = run(capsys, "ls", uri, *ep, "--json")
    assert json.loads(out)["checkpoints"] == []


def test_verify_on_s3_finds_a_flipped_byte(capsys, s3root):
    uri, server, bucket, _ = s3root
    c = server.client()
    key = "run/step-00000030/rank-00000.data"
    body = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[100] ^= 0x10
    c.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    rc, out, _ = run(capsys, "verify", f"{uri}/step-00000030", "--endpoint-url", server.endpoint_url)
    assert rc == 1 and f"{uri}/step-00000030/rank-00000.data" in out and "model/0.weight" in out


def test_unknown_s3_path(capsys, s3root):
    uri, server, _, _ = s3root
    rc, _, err = run(capsys, "inspect", f"{uri}/step-00000099", "--endpoint-url", server.endpoint_url)
    assert rc == 2 and "nothing there" in err


def test_manager_on_s3_restores_skips_corrupt_and_sees_a_pause(s3root):
    uri, server, bucket, _expect = s3root
    c = server.client()
    key = "run/step-00000030/rank-00000.data"
    body = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[10] ^= 0x01
    c.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    from tests.cli._build import model

    m = model()
    state = {"model": m, "optim": torch.optim.AdamW(m.parameters(), lr=1e-3), "extra": {}}
    with asyncckpt.CheckpointManager(uri, storage_options=server.options(), signals=(), pause_check_s=0.05) as mgr:
        assert mgr.restore(state) == 20  # 30 is corrupt: skipped
        asyncckpt.request_pause(uri, storage_options=server.options())
        deadline = time.monotonic() + 60
        step = 20
        while not mgr.preempted and time.monotonic() < deadline:  # the poller thread sees it
            step += 1
            mgr.maybe_save(step, state)
            time.sleep(0.02)
        assert mgr.preempted and mgr.preempt_reason == "pause"
    listed = asyncckpt.list_checkpoints(uri, storage_options=server.options())
    assert [c.step for c in listed if c.is_latest] == [step]
    assert {c.step for c in listed} >= {20, 30, step}  # 30 (corrupt) is left for a person to look at
    assert "run/PAUSE" not in server.keys(bucket)
