"""The whole engine on gs:// (fake-gcs-server) and az:// (Azurite) roots: save/finalize/load, the manager with
retention, Tiers(local, cloud), the DCP writer/reader, and every CLI verb configured through environment variables."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import asyncckpt
from asyncckpt import Tiers, cli
from asyncckpt.dcp import AsyncStorageReader, AsyncStorageWriter
from tests.cli._build import build_root, model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@dataclass
class Cloud:
    """One emulated store: a root URI, options for the library, and env vars for a user's shell (the CLI)."""

    name: str
    root: str
    options: dict[str, Any]
    env: dict[str, str]
    keys: Callable[[], list[str]]
    incomplete: Callable[[], list[str]]


@pytest.fixture(params=["gcs", "azure"])
def cloud(request: pytest.FixtureRequest) -> Cloud:
    if request.param == "gcs":
        server = request.getfixturevalue("gcs_server")
        bucket = request.getfixturevalue("gcs_bucket")
        return Cloud(
            "gcs",
            f"gs://{bucket}/run",
            server.options(),
            {"STORAGE_EMULATOR_HOST": server.endpoint_url},
            lambda: server.keys(bucket),
            lambda: server.incomplete_uploads(bucket),
        )
    server = request.getfixturevalue("azurite_server")
    container = request.getfixturevalue("azurite_container")
    return Cloud(
        "azure",
        f"az://{container}/run",
        server.options(),
        {"AZURE_STORAGE_CONNECTION_STRING": server.connection_string()},
        lambda: server.keys(container),
        lambda: server.incomplete_uploads(container),
    )


def test_checkpointer_save_finalize_load(cloud: Cloud) -> None:
    state = {"w": torch.randn(3 << 20), "b": torch.ones(10), "step": 4}  # 12 MiB: several parts
    want = state["w"].clone()
    with asyncckpt.AsyncCheckpointer(storage_options=cloud.options, chunk_size=5 << 20) as ck:
        h = ck.save(state, f"{cloud.root}/step-4", step=4)
        ck.wait_snapshot()
        state["w"].zero_()  # after the snapshot: must not reach the checkpoint
        ck.finalize(blocking=True)
        assert h.committed
        with pytest.raises(asyncckpt.CheckpointExistsError):
            ck.save(state, f"{cloud.root}/step-4", step=4)
    out = asyncckpt.load(f"{cloud.root}/step-4", storage_options=cloud.options)
    assert out["step"] == 4 and torch.equal(out["w"], want) and torch.equal(out["b"], torch.ones(10))
    listed = asyncckpt.list_checkpoints(cloud.root, storage_options=cloud.options)
    assert [(c.name, c.complete, c.is_latest) for c in listed] == [("step-4", True, True)]
    assert cloud.incomplete() == []
    # A flipped byte in the store is found on load.
    store = asyncckpt.storage.open_storage(cloud.root, **cloud.options)
    from asyncckpt._loop import run_sync

    raw = bytearray(run_sync(store.read("step-4/rank-00000.data")))
    raw[100] ^= 1
    run_sync(store.put_record("step-4/rank-00000.data", bytes(raw)))
    with pytest.raises(asyncckpt.IntegrityError, match="checksum mismatch"):
        asyncckpt.load(f"{cloud.root}/step-4", storage_options=cloud.options)


def test_manager_keeps_the_last_two_and_restores(cloud: Cloud) -> None:
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    state: dict[str, Any] = {"model": m, "optim": opt}
    with asyncckpt.CheckpointManager(cloud.root, keep_last=2, signals=(), storage_options=cloud.options) as mgr:
        for step in (1, 2, 3, 4):
            m(torch.randn(4, 32)).pow(2).mean().backward()
            opt.step()
            mgr.save(step, state)
        saved = {k: v.clone() for k, v in m.state_dict().items()}
    listed = asyncckpt.list_checkpoints(cloud.root, storage_options=cloud.options)
    assert sorted(c.step for c in listed) == [3, 4]
    assert not [k for k in cloud.keys() if "step-00000001" in k or "step-00000002" in k]  # pruned whole
    fresh = model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    target: dict[str, Any] = {"model": fresh, "optim": torch.optim.AdamW(fresh.parameters(), lr=1e-3)}
    with asyncckpt.CheckpointManager(cloud.root, signals=(), storage_options=cloud.options) as mgr:
        assert mgr.restore(target) == 4
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert cloud.incomplete() == []


def test_tiers_local_then_cloud_fall_back_to_the_cloud(cloud: Cloud, tmp_path: Path) -> None:
    tiers = Tiers(tmp_path / "nvme", cloud.root, keep=[1, None], storage_options=[{}, cloud.options])
    states = {}
    with asyncckpt.AsyncCheckpointer(chunk_size=5 << 20) as ck:
        for step in (1, 2):
            states[step] = {"w": torch.randn(2 <<20), "step": step}
            h = ck.save(states[step], tiers / f"step-{step}", step=step)
            ck.finalize(blocking=True)
            assert h.durable
    (tmp_path / "nvme" / "step-2" / "rank-00000.data").unlink()  # the fast tier lost its copy
    out = asyncckpt.load(tiers)
    assert out["step"] == 2 and torch.equal(out["w"], states[2]["w"])
    assert torch.equal(asyncckpt.load(tiers / "step-1")["w"], states[1]["w"])  # only in the cloud now
    assert cloud.incomplete() == []


def test_dcp_writer_and_reader(cloud: Cloud) -> None:
    sd = {"w": torch.randn(3 << 20), "b16": torch.randn(64).to(torch.bfloat16), "nested": {"i": torch.arange(10)}}
    uri = f"{cloud.root}/dcp-1"
    assert AsyncStorageWriter.validate_checkpoint_id(uri) and AsyncStorageReader.validate_checkpoint_id(uri)
    dcp.save(sd, storage_writer=AsyncStorageWriter(uri, chunk_size=5 << 20, storage_options=cloud.options))
    got = {"w": torch.zeros(3 << 20), "b16": torch.zeros(64, dtype=torch.bfloat16), "nested": {"i": torch.zeros(10, dtype=torch.int64)}}
    dcp.load(got, storage_reader=AsyncStorageReader(uri, storage_options=cloud.options, chunk_size=1 << 20))
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["b16"], sd["b16"])
    assert torch.equal(got["nested"]["i"], sd["nested"]["i"])
    assert cloud.incomplete() == []


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_every_cli_verb_configured_by_environment(
    cloud: Cloud, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    expect = build_root(cloud.root, storage_options=cloud.options)
    for var, value in cloud.env.items():  # the CLI finds the store the way a user's shell does
        monkeypatch.setenv(var, value)
    root = cloud.root

    rc, out, err = run(capsys, "ls", root, "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert [c["step"] for c in data["checkpoints"]] == [30, 20, 10] and data["checkpoints"][0]["is_latest"]
    assert data["checkpoints"][0]["path"] == f"{root}/step-00000030"

    rc, out, err = run(capsys, "inspect", f"{root}/step-00000020", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["step"] == 20 and {k["key"] for k in info["keys"]["0"]} >= {"model/0.weight"}

    rc, out, err = run(capsys, "verify", root)
    assert rc == 0 and out.startswith(f"OK {root}/step-00000030"), out + err

    dest = tmp_path / "m.safetensors"
    rc, out, err = run(capsys, "export", root, "--to", dest, "--key", "model")
    assert rc == 0, err
    got = safetensors.torch.load_file(dest)
    assert all(torch.equal(got[k], v) for k, v in expect["model"].items())

    rc, out, err = run(capsys, "rm", f"{root}/step-00000030")
    assert rc == 1 and "points to" in err
    rc, out, err = run(capsys, "prune", root, "--keep-last", "1")
    assert rc == 0 and "deleted 2" in out, err
    assert not [k for k in cloud.keys() if "step-00000010" in k or "step-00000020" in k]

    rc, out, err = run(capsys, "pause", root)
    assert rc == 0, err
    assert "run/PAUSE" in cloud.keys()

    rc, out, err = run(capsys, "rm", "--force", f"{root}/step-00000030")
    assert rc == 0 and "'latest' removed" in out
    rc, out, err = run(capsys, "ls", root, "--json")
    assert json.loads(out)["checkpoints"] == []
    rc, out, err = run(capsys, "inspect", f"{root}/step-00000099")
    assert rc == 2 and "nothing there" in err
