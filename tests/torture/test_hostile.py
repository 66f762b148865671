"""Hostile checkpoints (invariant 7): nothing outside the root is read or written, no code runs.

Each test keeps an ``outside`` directory next to the root holding a *valid* copy of what the
hostile checkpoint points at, so an engine that followed the pointer would load successfully:
the test can only pass if the pointer is refused. ``outside`` is compared byte for byte before
and after (nothing written or deleted there).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import asyncckpt
from asyncckpt._loop import run_sync
from asyncckpt.catalog import delete_checkpoint, list_all
from asyncckpt.errors import BadInputError, CheckpointError
from asyncckpt.format import LatestRecord, checksum, decode_commit, encode_commit, encode_latest
from asyncckpt.storage import LocalStorage

from ._fuzz import count, fuzz
from .common import CHUNK, ckpt_name, diff_states, expected_state

NUMEL = 1 << 12
DATA, MANIFEST, COMMIT = "rank-00000.data", "rank-00000.manifest", "COMMIT"


def snapshot_tree(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def ck():
    c = asyncckpt.AsyncCheckpointer(chunk_size=CHUNK, allow_pickle=True)
    yield c
    c.close(abort=True)


@pytest.fixture
def world(tmp_path: Path, ck: asyncckpt.AsyncCheckpointer) -> dict[str, Path]:
    """root/{step-000001, step-000002, latest}; outside/ holds a valid copy of root (a decoy)."""
    root = tmp_path / "root"
    for step in (1, 2):
        ck.save(expected_state(step, 0, NUMEL), str(root / ckpt_name(step)), step=step)
        ck.finalize(blocking=True)
    outside = tmp_path / "outside"
    shutil.copytree(root, outside)
    (outside / "sentinel").write_text("do not touch")
    return {"root": root, "outside": outside, "ckpt": root / ckpt_name(2), "before": snapshot_tree(outside)}


def assert_outside_untouched(world: dict[str, Any]) -> None:
    assert snapshot_tree(world["outside"]) == world["before"], "something outside the root was written or deleted"


def refused(fn: Any, *names: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as ei:
        fn()
    msg = str(ei.value)
    assert any(n in msg for n in names), f"the error does not say what was refused ({names}): {msg}"
    return ei.value


def fix_commit(ckpt: Path) -> None:
    blob = (ckpt / MANIFEST).read_bytes()
    rec = decode_commit((ckpt / COMMIT).read_bytes(), "COMMIT")
    ref = msgspec.structs.replace(rec.manifests[0], nbytes=len(blob), checksum=checksum(blob))
    (ckpt / COMMIT).write_bytes(encode_commit(msgspec.structs.replace(rec, manifests=[ref])))


# -- saving: keys and names --------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["a\udc80", "\ud800", 1 << 63, True, 1.5, ("a",)])
def test_hostile_state_keys_refused_before_anything_is_written(tmp_path: Path, ck, key: Any) -> None:
    """Only keys the format cannot store exactly are refused (docs/format.md, "Keys")."""
    count("hostile: state key refused at save")
    with pytest.raises(BadInputError, match="key"):
        ck.save({"ok": torch.ones(3), "nested": {key: torch.ones(2)}}, str(tmp_path / "r" / "c"))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("key", ["../../escape", "a/../../b", "..\\x", "C:\\x", "x/./y", "~", "$HOME", "..", ".", "/abs",
                                 "/", "", "a\x00b", "\x00", "../../etc/passwd"])
def test_path_like_state_keys_are_only_names(tmp_path: Path, ck, key: str) -> None:
    """Keys never become file names (one data file per rank), so these round-trip and write nothing else."""
    count("hostile: path-like state key")
    root = tmp_path / "deep" / "root"
    ck.save({key: torch.arange(4), "k": {key: 1}}, str(root / "c"))
    ck.finalize(blocking=True)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["deep/root/c/COMMIT", "deep/root/c/rank-00000.data", "deep/root/c/rank-00000.manifest",
                     "deep/root/latest"]
    got = asyncckpt.load(root / "c")
    assert torch.equal(got[key], torch.arange(4)) and got["k"] == {key: 1}


@pytest.mark.parametrize("name", ["..", ".", "a\x00b"])
def test_hostile_checkpoint_names_refused(tmp_path: Path, ck, name: str) -> None:
    count("hostile: checkpoint name refused at save")
    refused(lambda: ck.save({"x": torch.ones(2)}, f"{tmp_path}/root/{name}"), repr(name)[1:-1], "name", "NUL")
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())
    refused(lambda: asyncckpt.load(f"{tmp_path}/root/{name}"), "name", "NUL", "not a complete checkpoint", "..")


# -- loading: pointers that lead outside the root ------------------------------------------------------
@pytest.mark.parametrize("target", ["../outside/step-000002", "/ABS/step-000002", "step-000002/../../outside/step-000002",
                                    "step-000002\x00", ".", ""])
def test_latest_pointing_outside_is_refused(world: dict[str, Any], target: str) -> None:
    count("hostile: latest pointer")
    target = target.replace("/ABS", str(world["outside"]))
    (world["root"] / "latest").write_bytes(encode_latest(LatestRecord(name=target, step=2, created=0.0)))
    refused(lambda: asyncckpt.load(world["root"]), "storage key", "absolute", "name", "not a complete checkpoint")
    assert_outside_untouched(world)


@pytest.mark.parametrize("data_file", ["../outside/step-000002/rank-00000.data", "ABS", "step-000002/../../outside/x"])
def test_manifest_referencing_a_file_outside_the_root_is_refused(world: dict[str, Any], data_file: str) -> None:
    count("hostile: manifest data_file outside the root")
    ckpt = world["ckpt"]
    m = msgspec.msgpack.decode((ckpt / MANIFEST).read_bytes())
    m["data_file"] = str(world["outside"] / ckpt_name(2) / DATA) if data_file == "ABS" else data_file
    (ckpt / MANIFEST).write_bytes(msgspec.msgpack.encode(m))
    fix_commit(ckpt)
    refused(lambda: asyncckpt.load(ckpt), "data file", "storage key")
    assert_outside_untouched(world)


@pytest.mark.parametrize("what", [DATA, MANIFEST, COMMIT, "latest", "checkpoint dir", "root's parent via .."])
def test_symlinks_leading_outside_are_refused_on_load(world: dict[str, Any], what: str) -> None:
    count("hostile: symlink leading outside (load)")
    root, outside, ckpt = world["root"], world["outside"], world["ckpt"]
    if what == "checkpoint dir":
        shutil.rmtree(ckpt)
        ckpt.symlink_to(outside / ckpt_name(2), target_is_directory=True)
    elif what == "latest":
        (root / "latest").unlink()
        (root / "latest").symlink_to(outside / "latest")
        ckpt = root
    elif what == "root's parent via ..":
        shutil.rmtree(ckpt)
        ckpt.symlink_to(Path("..") / "outside" / ckpt_name(2), target_is_directory=True)
    else:
        (ckpt / what).unlink()
        (ckpt / what).symlink_to(outside / ckpt_name(2) / what)
    refused(lambda: asyncckpt.load(ckpt), "outside the checkpoint root")
    assert_outside_untouched(world)


def test_symlink_inside_the_root_is_followed(world: dict[str, Any]) -> None:
    """The check is on where a path leads, not on symlinks as such: one staying inside is fine."""
    ckpt = world["ckpt"]
    spare = world["root"] / "spare.data"
    shutil.move(ckpt / DATA, spare)
    (ckpt / DATA).symlink_to(spare)
    assert not diff_states(asyncckpt.load(ckpt), expected_state(2, 0, NUMEL))


# -- writing and deleting through symlinks ----------------------------------------------------------
def test_save_into_a_symlinked_checkpoint_dir_writes_nothing_outside(world: dict[str, Any], ck) -> None:
    count("hostile: symlink leading outside (save)")
    root, outside = world["root"], world["outside"]
    (outside / "victim").mkdir()
    world["before"] = snapshot_tree(outside)
    (root / ckpt_name(9)).symlink_to(outside / "victim", target_is_directory=True)
    try:
        ck.save(expected_state(9, 0, NUMEL), str(root / ckpt_name(9)), step=9)
    except CheckpointError as exc:
        assert "outside" in str(exc)
    else:
        refused(lambda: ck.finalize(blocking=True), "outside the checkpoint root")
    assert_outside_untouched(world)
    assert not diff_states(asyncckpt.load(root), expected_state(2, 0, NUMEL))  # latest did not move


def test_delete_of_a_symlinked_checkpoint_deletes_nothing_outside(world: dict[str, Any]) -> None:
    count("hostile: symlink leading outside (delete, prune)")
    root, outside = world["root"], world["outside"]
    (root / "evil").symlink_to(outside / ckpt_name(1), target_is_directory=True)
    storage = LocalStorage(root)
    try:
        refused(lambda: run_sync(delete_checkpoint(storage, "evil")), "outside the checkpoint root")
        names = [i.name for i in run_sync(list_all(storage))]
        assert "evil" not in names
    finally:
        run_sync(storage.close())
    asyncckpt.prune(root, keep_last=1)
    assert_outside_untouched(world)
    assert [i.name for i in asyncckpt.list_checkpoints(root)] == [ckpt_name(2)]


def test_latest_symlink_is_replaced_not_written_through(world: dict[str, Any], ck) -> None:
    count("hostile: symlink leading outside (latest update)")
    root, outside = world["root"], world["outside"]
    (root / "latest").unlink()
    (root / "latest").symlink_to(outside / "latest")
    ck.save(expected_state(3, 0, NUMEL), str(root / ckpt_name(3)), step=3)
    ck.finalize(blocking=True)
    assert not (root / "latest").is_symlink()
    assert not diff_states(asyncckpt.load(root), expected_state(3, 0, NUMEL))
    assert_outside_untouched(world)


# -- pickle: no code runs without the opt-in ---------------------------------------------------------
class _Payload:
    """Unpickling this creates the file at ``path``: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_pickle_payload_never_runs_without_opt_in(tmp_path: Path, ck) -> None:
    count("hostile: pickle payload")
    proof = tmp_path / "code-ran"
    ck.save({"x": torch.ones(2), "obj": _Payload(str(proof))}, str(tmp_path / "root" / "c"))
    ck.finalize(blocking=True)
    assert not proof.exists()
    refused(lambda: asyncckpt.load(tmp_path / "root" / "c"), "allow_pickle")
    assert not proof.exists(), "loading without allow_pickle ran code"
    asyncckpt.load(tmp_path / "root" / "c", allow_pickle=True)
    assert proof.exists()  # the opt-in is the only gate, and it works


def test_forged_entry_kind_pickle_is_refused_before_reading(world: dict[str, Any], tmp_path: Path) -> None:
    """A forged manifest turns a tensor entry into a pickle whose bytes would create a file."""
    count("hostile: forged pickle entry")
    ckpt = world["ckpt"]
    proof = tmp_path / "forged-ran"
    payload = pickle.dumps(_Payload(str(proof)))
    m = msgspec.msgpack.decode((ckpt / MANIFEST).read_bytes())
    e = max(m["entries"], key=lambda e: e["nbytes"])
    raw = bytearray((ckpt / DATA).read_bytes())
    raw[e["offset"] : e["offset"] + len(payload)] = payload
    e.update(kind="pickle", dtype="bytes", shape=[len(payload)], nbytes=len(payload))
    crc = [checksum(bytes(raw[i : i + m["chunk_size"]])) for i in range(0, len(raw), m["chunk_size"])]
    m["chunk_checksums"] = crc
    (ckpt / DATA).write_bytes(bytes(raw))
    (ckpt / MANIFEST).write_bytes(msgspec.msgpack.encode(m))
    fix_commit(ckpt)
    refused(lambda: asyncckpt.load(ckpt), "allow_pickle")
    assert not proof.exists()


# -- fuzzed pointers: `latest` names and manifest data files built from path fragments ---------------
_FRAGMENTS = st.lists(
    st.sampled_from(["..", ".", "", "outside", "root", ckpt_name(2), ckpt_name(9), DATA, "~", "%2e%2e", "\x00", "a\\b",
                     "//", "latest", COMMIT]),
    min_size=1, max_size=6,
).map(lambda parts: "/".join(parts))


@pytest.fixture(scope="module")
def decoy_world(tmp_path_factory: pytest.TempPathFactory, ck) -> dict[str, Any]:
    """root/{step-000002, latest}; outside/ and root's parent hold step-000009 checkpoints (a decoy)."""
    base = tmp_path_factory.mktemp("decoy")
    root = base / "root"
    ck.save(expected_state(2, 0, NUMEL), str(root / ckpt_name(2)), step=2)
    for d in (base / "outside", base):
        ck.save(expected_state(9, 0, NUMEL), str(d / ckpt_name(9)), step=9, update_latest=False)
    ck.finalize(blocking=True)
    return {"base": base, "root": root}


def _fresh(decoy_world: dict[str, Any]) -> tuple[Path, Path, dict[str, str]]:
    work = Path(tempfile.mkdtemp(dir=decoy_world["base"]))
    shutil.copytree(decoy_world["root"], work / "root")
    shutil.copytree(decoy_world["base"] / "outside", work / "outside")
    shutil.copytree(decoy_world["base"] / ckpt_name(9), work / ckpt_name(9))
    return work, work / "root", snapshot_tree(work)


def _loaded_or_refused(fn: Any, work: Path, before: dict[str, str]) -> None:
    try:
        got = fn()
    except CheckpointError:
        pass
    else:  # only a pointer that really names the checkpoint inside the root may load
        assert got["step"] == 2, "a hostile pointer made load read the decoy outside the root"
        assert not diff_states(got, expected_state(2, 0, NUMEL))
    assert snapshot_tree(work) == before, "something outside the root was written or deleted"


@fuzz(examples=40)
@given(target=_FRAGMENTS)
def test_fuzzed_latest_pointer(decoy_world: dict[str, Any], target: str) -> None:
    count("hostile: fuzzed latest pointer")
    work, root, _ = _fresh(decoy_world)
    try:
        (root / "latest").write_bytes(encode_latest(LatestRecord(name=target, step=2, created=0.0)))
        before = snapshot_tree(work)
        _loaded_or_refused(lambda: asyncckpt.load(root), work, before)
    finally:
        shutil.rmtree(work)


@fuzz(examples=40)
@given(data_file=_FRAGMENTS)
def test_fuzzed_manifest_data_file(decoy_world: dict[str, Any], data_file: str) -> None:
    count("hostile: fuzzed manifest data_file")
    work, root, _ = _fresh(decoy_world)
    try:
        ckpt = root / ckpt_name(2)
        m = msgspec.msgpack.decode((ckpt / MANIFEST).read_bytes())
        m["data_file"] = data_file
        (ckpt / MANIFEST).write_bytes(msgspec.msgpack.encode(m))
        fix_commit(ckpt)
        before = snapshot_tree(work)
        _loaded_or_refused(lambda: asyncckpt.load(ckpt), work, before)
    finally:
        shutil.rmtree(work)
