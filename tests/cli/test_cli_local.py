"""The `asyncckpt` command line on a local root: ls, inspect, verify, rm, prune, export, pause."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

import asyncckpt
from asyncckpt import cli
from asyncckpt.preemption import PAUSE_FILE
from tests.cli._build import build_root
from tests.manager._proc import REPO, env


@pytest.fixture(scope="module")
def source(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cli") / "run"
    expect = build_root(root, big=True)
    return root, expect


@pytest.fixture
def root(source, tmp_path):  # type: ignore[no-untyped-def]
    """A private copy of the module's checkpoints (tests may damage it)."""
    dst = tmp_path / "run"
    shutil.copytree(source[0], dst)
    return dst


def run(capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _flip(path, offset: int = 4096) -> None:  # type: ignore[no-untyped-def]
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


# -- ls -----------------------------------------------------------------------------------------
def test_ls_table_and_json(capsys, root):
    rc, out, _ = run(capsys, "ls", root)
    assert rc == 0
    lines = [ln for ln in out.splitlines() if "step-000000" in ln]
    assert [ln.split()[0] for ln in lines] == ["30", "20", "10"]  # newest first
    assert "<- latest" in lines[0] and "<- latest" not in lines[1]
    assert "MiB" in lines[0]
    rc, out, _ = run(capsys, "ls", root, "--json")
    data = json.loads(out)
    assert [c["step"] for c in data["checkpoints"]] == [30, 20, 10]
    assert data["checkpoints"][0]["is_latest"] and data["checkpoints"][0]["nbytes"] > 12 << 20
    assert data["incomplete"] == []


def test_ls_shows_incomplete_and_corrupt_apart(capsys, root):
    (root / "step-00000020" / "COMMIT").unlink()
    (root / "step-00000010" / "COMMIT").write_text("{not json")
    rc, out, _ = run(capsys, "ls", root, "--json")
    assert rc == 0
    data = json.loads(out)
    assert [c["step"] for c in data["checkpoints"]] == [30]
    bad = {c["name"]: c["problem"] for c in data["incomplete"]}
    assert "no commit record" in bad["step-00000020"] and "commit record is damaged" in bad["step-00000010"]
    assert not any(c["complete"] for c in data["incomplete"])
    _rc, out, _ = run(capsys, "ls", root)
    head, _, tail = out.partition("incomplete or corrupt")
    assert "step-00000030" in head and "step-00000020" not in head and "step-00000020" in tail


# -- inspect ------------------------------------------------------------------------------------
def test_inspect(capsys, root):
    rc, out, _ = run(capsys, "inspect", root / "step-00000020")
    assert rc == 0
    assert "asyncckpt version 1" in out and "layout flat" in out and "crc32c" in out
    row = next(ln for ln in out.splitlines() if ln.strip().startswith("model/0.weight"))
    assert row.split()[1:] == ["tensor", "float32", "(64,", "32)", str(64 * 32 * 4)]
    assert any(ln.strip().startswith("extra/table") and "ndarray" in ln for ln in out.splitlines())
    rc, out, _ = run(capsys, "inspect", root, "--json")  # a root: its latest
    data = json.loads(out)
    assert data["step"] == 30 and data["is_latest"] and data["checksum_algo"] == "crc32c"
    assert data["version"] == 1 and data["layout"] == "flat" and data["world_size"] == 1
    assert data["ranks"][0]["chunks"] >= 3 and data["ranks"][0]["data_nbytes"] > 12 << 20
    keys = {k["key"]: k for k in data["keys"]["0"]}
    assert keys["model/2.bias"]["shape"] == [8] and keys["model/2.bias"]["nbytes"] == 32


# -- verify -------------------------------------------------------------------------------------
def test_verify_ok_with_progress(capsys, root):
    rc, out, err = run(capsys, "verify", root / "step-00000030", "--progress")
    assert rc == 0, out + err
    assert out.startswith("OK ") and "step 30" in out
    assert "B/s" in err and "100%" in err  # tqdm's bar: bytes and rate


def test_verify_flipped_byte_names_the_file_and_key(capsys, root):
    data = root / "step-00000030" / "rank-00000.data"
    _flip(data, 64 << 10)
    rc, out, _ = run(capsys, "verify", root / "step-00000030", root / "step-00000020")
    assert rc == 1
    assert f"FAILED {root}/step-00000030" in out
    bad = [ln for ln in out.splitlines() if ln.startswith("  - ")]
    assert len(bad) == 1 and str(data) in bad[0] and "bytes [0, 5242880)" in bad[0] and "model/0.weight" in bad[0]
    assert f"OK {root}/step-00000020" in out  # the other one still checks out


def test_verify_truncated_and_missing_files(capsys, root):
    data = root / "step-00000030" / "rank-00000.data"
    with open(data, "r+b") as f:
        f.truncate(6 << 20)
    (root / "step-00000020" / "rank-00000.manifest").unlink()
    rc, out, _ = run(capsys, "verify", root / "step-00000030")
    assert rc == 1 and "truncated" in out and "big" in out
    rc, out, _ = run(capsys, "verify", root / "step-00000020")
    assert rc == 1 and "manifest of rank 0 is missing" in out


def test_unknown_paths_are_clear_errors(capsys, root, tmp_path):
    for verb in ("inspect", "verify"):
        rc, _, err = run(capsys, verb, tmp_path / "nope" / "step-1")
        assert rc == 2 and "no such file or directory" in err
    rc, _, err = run(capsys, "inspect", root / "step-00000099")
    assert rc == 2 and "step-00000099: no such file or directory" in err
    (root / "step-00000010" / "COMMIT").unlink()  # exists, but incomplete: never read as a checkpoint
    rc, _, err = run(capsys, "verify", root / "step-00000010")
    assert rc == 2 and "not a complete checkpoint (no COMMIT record)" in err and "asyncckpt ls" in err
    rc, _, err = run(capsys, "ls", tmp_path / "nope")
    assert rc == 2 and "no such directory" in err
    rc, _, err = run(capsys, "export", tmp_path / "nope" / "x", "--to", tmp_path / "m.pt")
    assert rc == 2 and not (tmp_path / "m.pt").exists()
    rc, _, err = run(capsys, "rm", root / "step-00000099")
    assert rc == 2 and "no such file or directory" in err
    with pytest.raises(SystemExit) as ei:
        cli.main(["frobnicate", str(root)])
    assert ei.value.code == 2


# -- rm / prune ---------------------------------------------------------------------------------
def test_rm_refuses_latest_unless_forced(capsys, root):
    rc, out, err = run(capsys, "rm", root / "step-00000030", root / "step-00000010")
    assert rc == 1 and "points to" in err and "deleted" in out
    assert [c.step for c in asyncckpt.list_checkpoints(root)] == [30, 20]
    rc, out, _ = run(capsys, "rm", "--force", root / "step-00000030")
    assert rc == 0 and "now points to step-00000020" in out
    listed = asyncckpt.list_checkpoints(root)
    assert [c.step for c in listed] == [20] and listed[0].is_latest
    assert not (root / "step-00000030").exists()
    rc, out, _ = run(capsys, "rm", "--force", root / "step-00000020")
    assert rc == 0 and not (root / "latest").exists()


def test_rm_removes_an_incomplete_checkpoint(capsys, root):
    (root / "step-00000010" / "COMMIT").unlink()
    rc, _out, _ = run(capsys, "rm", root / "step-00000010")
    assert rc == 0 and not (root / "step-00000010").exists()


def test_prune(capsys, root):
    rc, out, _ = run(capsys, "prune", root, "--keep-last", "1", "--dry-run")
    assert rc == 0 and "would delete 2 checkpoint(s)" in out
    assert len(asyncckpt.list_checkpoints(root)) == 3
    rc, out, _ = run(capsys, "prune", root, "--keep-last", "1", "--keep-every", "20")
    assert rc == 0 and "deleted 1 checkpoint(s)" in out
    assert [c.step for c in asyncckpt.list_checkpoints(root)] == [30, 20]
    rc, out, _ = run(capsys, "prune", root, "--max-age", "1h")
    assert rc == 0 and "deleted 0" in out
    rc, _, err = run(capsys, "prune", root)
    assert rc == 2 and "at least one" in err


# -- export -------------------------------------------------------------------------------------
def test_export_pt_is_read_by_torch_load_weights_only(capsys, root, source, tmp_path):
    expect = source[1]
    dest = tmp_path / "model.pt"
    rc, out, err = run(capsys, "export", root, "--to", dest, "--progress")
    assert rc == 0, err
    got = torch.load(dest, weights_only=True)
    assert set(got) == {"model", "optim", "extra", "big"}  # the manager's own record is left out
    assert all(torch.equal(got["model"][k], v) for k, v in expect["model"].items())
    assert torch.equal(got["big"], expect["big"]) and got["extra"]["note"] == "hi"
    assert torch.equal(got["extra"]["table"], torch.arange(6, dtype=torch.int32))  # arrays become tensors
    assert "B/s" in err
    rc, out, err = run(capsys, "export", root, "--to", dest)
    assert rc == 2 and "exists" in err and out == ""
    rc, out, err = run(capsys, "export", root, "--to", tmp_path, "--format", "pt")
    assert rc == 2 and "is a directory" in err
    rc, _out, err = run(capsys, "export", root / "step-00000010", "--to", dest, "--key", "model", "--force")
    assert rc == 0
    assert set(torch.load(dest, weights_only=True)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_export_safetensors_is_read_by_safetensors(capsys, root, source, tmp_path):
    expect = source[1]
    dest = tmp_path / "model.safetensors"
    rc, out, err = run(capsys, "export", root, "--to", dest, "--key", "model")
    assert rc == 0 and "exported 4 tensor(s)" in out, err
    got = safetensors.torch.load_file(dest)
    assert set(got) == set(expect["model"]) and all(torch.equal(got[k], v) for k, v in expect["model"].items())
    full = tmp_path / "all.safetensors"
    rc, _out, err = run(capsys, "export", root, "--to", full)
    assert rc == 0
    got = safetensors.torch.load_file(full)
    assert torch.equal(got["big"], expect["big"]) and got["extra/table"].dtype == torch.int32
    assert "optim/state/0/exp_avg" in got and "non-tensor value(s) not exported" in err
    from safetensors import safe_open

    with safe_open(str(full), "pt") as f:
        assert f.metadata()["asyncckpt.step"] == "30"


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_export_interrupted_leaves_nothing_half_written(capsys, root, tmp_path, monkeypatch, suffix):
    real = cli.read_entries
    handled = threading.Event()

    def on_sigint(signum, frame):  # type: ignore[no-untyped-def]
        handled.set()
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt in the main thread

    def ctrl_c_after_first_bytes(storage, m, wanted, on_bytes, **k):  # type: ignore[no-untyped-def]
        fired = threading.Event()

        def first(*a):  # type: ignore[no-untyped-def]
            on_bytes(*a)
            if not fired.is_set():
                fired.set()
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C while the readers run
                # Hold this reader until the main thread has taken the interrupt: on a loaded machine the
                # other readers could otherwise finish the export before the handler runs.
                handled.wait(30)

        return real(storage, m, wanted, first, **k)

    previous = signal.signal(signal.SIGINT, on_sigint)
    monkeypatch.setattr(cli, "read_entries", ctrl_c_after_first_bytes)
    try:
        rc, _out, err = run(capsys, "export", root, "--to", tmp_path / f"model.{suffix}")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 130 and "interrupted" in err
    assert list(tmp_path.glob("*model*")) == []  # neither the file nor its temp


def test_export_of_a_corrupt_checkpoint_leaves_no_file(capsys, root, tmp_path):
    _flip(root / "step-00000030" / "rank-00000.data", 11 << 20)
    rc, _out, err = run(capsys, "export", root, "--to", tmp_path / "m.safetensors")
    assert rc == 1 and "fail their checksum" in err and "big" in err
    assert list(tmp_path.glob("*m.safetensors*")) == []


# -- pause and the entry points -------------------------------------------------------------------
def test_pause_writes_a_request(capsys, root):
    rc, out, _ = run(capsys, "pause", root, "--reason", "node drain")
    assert rc == 0 and "pause requested" in out
    assert json.loads((root / PAUSE_FILE).read_text())["reason"] == "node drain"
    assert [c.step for c in asyncckpt.list_checkpoints(root)] == [30, 20, 10]  # not a checkpoint


def test_console_script_and_python_m(root):
    out = subprocess.run([sys.executable, "-m", "asyncckpt", "ls", str(root), "--json"], env=env(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [c["step"] for c in json.loads(out.stdout)["checkpoints"]] == [30, 20, 10]
    exe = str(Path(sys.executable).with_name("asyncckpt"))  # the console script next to this interpreter
    out = subprocess.run([exe, "verify", str(root / "step-00000010")], env=env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("OK "), out.stderr
