"""Smoke tests of bench/run.py: a tiny run end to end, every documented JSON field, no timing asserts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"
TINY_TRAIN = ["--train-steps", "6", "--train-every", "3", "--train-width", "32", "--train-blocks", "1",
              "--train-batch", "4"]
STATS = ("min", "median", "max", "values")
ENGINES = ("torch_save", "dcp_save", "dcp_async_thread", "dcp_async_process", "nvre_async",
           "asyncckpt_save", "asyncckpt_torch", "asyncckpt_dcp")
ASYNC_WITH_WORKER = ("dcp_async_process", "asyncckpt_save", "asyncckpt_torch", "asyncckpt_dcp")


def _run(args: list[str], tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(RUN), *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)


def _check_stats(s: Any, where: str, n: int) -> None:
    assert isinstance(s, dict) and all(k in s for k in STATS), f"{where}: {s!r}"
    assert len(s["values"]) == n, f"{where}: {len(s['values'])} values, expected {n}"
    assert s["min"] <= s["median"] <= s["max"], where
    assert s["min"] > 0, where


def _check_engine(name: str, r: dict[str, Any], reps: int, nbytes: int) -> None:
    for k in ("label", "description", "mode", "available", "reason", "verifies_checksums_on_load", "bench_adds_fsync"):
        assert k in r, f"{name}: missing {k}"
    assert r["available"] is True, f"{name}: {r['reason']}"
    for k in ("blocked_s", "durable_s", "write_gbps", "load_s"):
        _check_stats(r[k], f"{name}.{k}", reps)
    for b, d, g in zip(r["blocked_s"]["values"], r["durable_s"]["values"], r["write_gbps"]["values"]):
        assert b <= d, f"{name}: blocked {b} > durable {d}"
        assert g == pytest.approx(nbytes / d / 1e9), name
    rss = r["peak_rss_mib"]
    assert set(rss) == {"trainer", "trainer_growth", "worker"}
    assert rss["trainer"] > 0 and rss["trainer_growth"] >= 0
    if name in ASYNC_WITH_WORKER:
        assert rss["worker"] is not None and rss["worker"] > 0, f"{name}: no worker RSS"
        assert set(r["worker_rss_breakdown_mib"]) == {"shared_with_trainer", "shared_anon", "other"}
    assert r["verified"] is True and r["verify_errors"] == [], f"{name}: {r['verify_errors']}"


@pytest.mark.slow
def test_local_run_writes_every_documented_field(tmp_path: Path) -> None:
    out, png, work = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "work"
    p = _run(["--size-mib", "16", "--tensors", "8", "--reps", "1", "--dir", str(work), "--json", str(out),
              "--plot", str(png), *TINY_TRAIN], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    meta = res["meta"]
    for k in ("command", "size_mib", "nbytes", "tensors", "dtype", "reps", "warmup", "quick", "s3", "destination",
              "torch", "python", "cpus", "machine", "mem_gib", "started", "duration_s", "loadavg_start", "loadavg_end"):
        assert k in meta, f"meta.{k} missing"
    assert meta["nbytes"] == 16 << 20 and meta["tensors"] == 8 and meta["reps"] == 1
    lim = res["limits"]
    for k in ("memcpy_s", "memcpy_gbps", "disk_s", "disk_gbps"):
        _check_stats(lim[k], f"limits.{k}", 1)
    assert set(res["engines"]) == set(ENGINES)
    for name, r in res["engines"].items():
        if name == "nvre_async":
            if not r["available"]:
                assert r["reason"], "an engine that did not run must say why"
                continue
        _check_engine(name, r, 1, meta["nbytes"])
    # The training loop: one record per engine that ran, a step time per step, saves where asked.
    tr = res["train"]
    for k in ("model", "params", "state_mib", "batch", "steps", "every", "baseline", "engines"):
        assert k in tr, f"train.{k} missing"
    assert len(tr["baseline"]["step_s"]) == 6 and tr["baseline"]["mean_step_s"] > 0
    ran = {n for n, r in res["engines"].items() if r["available"]}
    assert set(tr["engines"]) == ran
    for name, r in tr["engines"].items():
        assert len(r["step_s"]) == 6, name
        assert r["save_steps"] == [3], name
        assert len(r["blocked_s"]) == 1, name
        for k in ("inflation_pct", "mean_step_s", "mean_nonsave_step_s", "drain_s", "label"):
            assert k in r, f"train.engines.{name}.{k} missing"
    # Targets are evaluated for each asyncckpt path that ran.
    for name in ("asyncckpt_save", "asyncckpt_torch"):
        t = res["targets"][name]
        for k in ("blocked_vs_memcpy", "blocked_lowest", "durable_vs_disk", "worker_rss", "train_inflation_pct"):
            assert isinstance(t[k]["met"], bool), f"targets.{name}.{k}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    # Every checkpoint written under --dir was removed again.
    left = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and p.name != "pg-store")
    assert left == [], left
    assert "blocked s" in p.stdout and "limit: memcpy" in p.stdout
    assert "round 1/2 (warm-up)" in p.stderr  # progress goes to stderr


@pytest.mark.slow
def test_s3_mode_against_moto(tmp_path: Path) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")
        s3.create_bucket(Bucket="bench-smoke")
        out = tmp_path / "s3.json"
        p = _run(["--size-mib", "12", "--tensors", "4", "--reps", "1", "--uri", "s3://bench-smoke/run",
                  "--endpoint-url", url, "--engines", "torch_save,asyncckpt_save", "--json", str(out)], tmp_path,
                 env=creds)
        assert p.returncode == 0, p.stderr[-4000:]
        res = json.loads(out.read_text())
        assert res["meta"]["s3"] is True and "train" not in res
        _check_engine("asyncckpt_save", res["engines"]["asyncckpt_save"], 1, res["meta"]["nbytes"])
        ts = res["engines"]["torch_save"]
        assert ts["available"] is False and "no s3 writer" in ts["reason"]
        _check_stats(res["limits"]["disk_gbps"], "limits.disk_gbps", 1)
        assert "multipart" in res["limits"]["disk_method"]
        # The bench removed what it wrote, the raw upload included.
        listed = s3.list_objects_v2(Bucket="bench-smoke").get("Contents", [])
        assert [o["Key"] for o in listed] == []
        assert s3.list_multipart_uploads(Bucket="bench-smoke").get("Uploads", []) == []
    finally:
        server.stop()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    p = _run(["--uri", "/not/s3"], tmp_path, timeout=120)
    assert p.returncode == 2 and "--uri must be s3://" in p.stderr
    p = _run(["--engines", "torch_save,nope"], tmp_path, timeout=120)
    assert p.returncode == 2 and "unknown engine" in p.stderr
