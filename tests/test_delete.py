"""Deletion only ever removes checkpoints (invariant 10): `asyncckpt rm`/`prune`, `asyncckpt.delete`/`prune`.

Each test snapshots the whole tree before and after and checks that exactly the checkpoint's
own files went, or nothing at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import cli
from tests._trees import removed, snapshot_dir

CKPT_FILES = {"COMMIT", "rank-00000.data", "rank-00000.manifest"}


def run(capsys: Any, *argv: object) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def source(shared_ckpt: asyncckpt.AsyncCheckpointer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("del")
    for step in (1, 2, 3):
        shared_ckpt.save({"w": torch.full((1000,), float(step)), "step": step}, base / "run" / f"step-{step}", step=step)
    shared_ckpt.finalize(blocking=True)
    (base / "papers" / "sub").mkdir(parents=True)
    (base / "papers" / "thesis.txt").write_text("four years of work")
    (base / "papers" / "sub" / "notes.md").write_text("# notes")
    (base / "notes.txt").write_text("a plain file")
    torch.save({"w": torch.ones(3)}, base / "model.pt")
    return base


@pytest.fixture
def base(source: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "w"
    shutil.copytree(source, dst, symlinks=True)
    return dst


def _ours(name: str) -> set[str]:
    return {f"run/{name}/{f}" for f in CKPT_FILES} | {f"run/{name}"}


# -- what is not a checkpoint is refused, by the CLI and the library alike ------------------------
@pytest.mark.parametrize("force", [False, True])
def test_plain_directory_file_and_torch_save_file_are_refused(capsys: Any, base: Path, force: bool) -> None:
    before = snapshot_dir(base)
    extra = ["--force"] if force else []
    rc, _, err = run(capsys, "rm", *extra, base / "papers")
    assert rc == 2 and "is not a checkpoint" in err and "directory holding 2 file(s)" in err
    assert "sub/notes.md" in err and "thesis.txt" in err and "nothing was deleted" in err
    rc, _, err = run(capsys, "rm", *extra, base / "notes.txt")
    assert rc == 2 and "a file (12 bytes)" in err
    rc, _, err = run(capsys, "rm", *extra, base / "model.pt")
    assert rc == 2 and "written by torch.save" in err
    for p in ("papers", "notes.txt", "model.pt", "papers/sub"):
        with pytest.raises(asyncckpt.NotACheckpointError, match="not a checkpoint"):
            asyncckpt.delete(base / p, force=force)
    rc, _, err = run(capsys, "rm", base / "missing")
    assert rc == 2 and "no such file or directory" in err
    with pytest.raises(asyncckpt.CheckpointNotFoundError):
        asyncckpt.delete(base / "missing")
    assert snapshot_dir(base) == before


def test_files_named_like_records_prove_nothing(capsys: Any, base: Path) -> None:
    """A COMMIT or rank-00000.data of someone else's (no record of ours decodes) is not a checkpoint."""
    d = base / "lookalike"
    d.mkdir()
    (d / "COMMIT").write_text('{"format": "mine"}')
    (d / "rank-00000.data").write_bytes(b"\0" * 100)
    (d / "rank-00000.manifest").write_bytes(b"not msgpack")
    (d / ".metadata").write_bytes(b"not a pickle")
    before = snapshot_dir(base)
    rc, _, err = run(capsys, "rm", "--force", d)
    assert rc == 2 and "records are damaged" in err and "delete it by hand" in err
    assert snapshot_dir(base) == before


# -- a root means its latest ------------------------------------------------------------------
def test_a_root_means_its_latest_and_needs_force(capsys: Any, base: Path) -> None:
    before = snapshot_dir(base)
    rc, _, err = run(capsys, "rm", base / "run")
    assert rc == 1 and "points to, step-3" in err and "--force" in err and "never deleted" in err
    with pytest.raises(asyncckpt.DeleteRefusedError):
        asyncckpt.delete(base / "run")
    assert snapshot_dir(base) == before
    rc, out, err = run(capsys, "rm", "--force", base / "run")
    assert rc == 0, err
    assert "now points to step-2" in out
    after = snapshot_dir(base)
    before.pop("run/latest")
    after.pop("run/latest")
    assert removed(before, after) == _ours("step-3")
    assert [c.name for c in asyncckpt.list_checkpoints(base / "run")] == ["step-2", "step-1"]
    assert asyncckpt.load(base / "run")["step"] == 2


def test_rm_latest_by_name_with_force_moves_latest_first(base: Path) -> None:
    report = asyncckpt.delete(base / "run" / "step-3", force=True)
    assert report.latest == "step-2" and report.complete and report.kind == "asyncckpt"
    assert sorted(report.deleted) == sorted(f"step-3/{f}" for f in CKPT_FILES)
    assert report.deleted[0] == "step-3/COMMIT" and report.deleted[-1] == "step-3/rank-00000.manifest"
    for name in ("step-2", "step-1"):
        asyncckpt.delete(base / "run" / name, force=True)
    assert not (base / "run" / "latest").exists() and (base / "run").is_dir()


# -- a checkpoint goes, and only its own files -------------------------------------------------------
def test_unknown_files_inside_a_checkpoint_stay(capsys: Any, base: Path) -> None:
    ck = base / "run" / "step-1"
    (ck / "notes.txt").write_text("mine")
    (ck / "sub").mkdir()
    (ck / "sub" / "x.bin").write_bytes(b"1")
    before = snapshot_dir(base)
    rc, out, err = run(capsys, "rm", ck)
    assert rc == 0, err
    assert "left in place" in out and "step-1/notes.txt" in out
    assert removed(before, snapshot_dir(base)) == {f"run/step-1/{f}" for f in CKPT_FILES}
    assert sorted(p.name for p in ck.iterdir()) == ["notes.txt", "sub"]


@pytest.mark.parametrize("subdir", [False, True])
def test_the_report_keeps_what_a_listing_shows_and_torn_temp_files_go(base: Path, subdir: bool) -> None:
    """``kept`` is every key under NAME/ that a listing shows and the checkpoint does not own (a
    directory with or without subdirectories); temp files of its records' names go with it, others stay."""
    ck = base / "run" / "step-1"
    (ck / "notes.txt").write_text("mine")
    (ck / "rank-00000.manifest.tmp-0123456789ab").write_bytes(b"torn")  # a crashed write of ours
    (ck / "mine.tmp-0123456789ab").write_bytes(b"x")  # a temp name, not of a record: not ours, not listed
    if subdir:
        (ck / "sub").mkdir()
        (ck / "sub" / "x.bin").write_bytes(b"1")
    report = asyncckpt.delete(ck)
    kept = ["run/step-1/notes.txt"] + (["run/step-1/sub/x.bin"] if subdir else [])
    assert [k.removeprefix("run/") for k in kept] == report.kept
    assert "step-1/rank-00000.manifest.tmp-0123456789ab" in report.deleted
    left = sorted(p.name for p in ck.iterdir())
    assert left == ["mine.tmp-0123456789ab", "notes.txt"] + (["sub"] if subdir else [])


def test_damaged_commit_with_a_readable_manifest_is_ours(base: Path) -> None:
    ck = base / "run" / "step-1"
    _flip(ck / "COMMIT", 10)
    (ck / "rank-00000.data.tmp-0123456789ab").write_bytes(b"torn")  # what a crashed save leaves
    before = snapshot_dir(base)
    report = asyncckpt.delete(ck)
    assert not report.complete and any("damaged record" in n for n in report.notes)
    assert removed(before, snapshot_dir(base)) == _ours("step-1") | {"run/step-1/rank-00000.data.tmp-0123456789ab"}


def test_damaged_manifest_under_a_valid_commit_goes_by_the_key_layout(base: Path) -> None:
    ck = base / "run" / "step-2"
    (ck / "rank-00000.manifest").write_bytes(b"garbage")
    before = snapshot_dir(base)
    asyncckpt.delete(ck)
    assert removed(before, snapshot_dir(base)) == _ours("step-2")


def test_every_record_damaged_is_refused(capsys: Any, base: Path) -> None:
    ck = base / "run" / "step-1"
    _flip(ck / "COMMIT", 10)
    (ck / "rank-00000.manifest").write_bytes(b"garbage")
    before = snapshot_dir(base)
    rc, _, err = run(capsys, "rm", "--force", ck)
    assert rc == 2 and "records are damaged" in err and "checksum mismatch" in err
    assert snapshot_dir(base) == before


def test_incomplete_saves(capsys: Any, base: Path) -> None:
    (base / "run" / "step-1" / "COMMIT").unlink()  # a save that never committed: its manifest proves it
    torn = base / "run" / "step-9"
    torn.mkdir()
    (torn / "rank-00000.data.tmp-00ff00ff00ff").write_bytes(b"x")  # only a temp file of ours
    bare = base / "run" / "step-8"
    bare.mkdir()
    (bare / "rank-00000.data").write_bytes(b"x")  # no record at all: nothing proves it is ours
    before = snapshot_dir(base)
    rc, out, err = run(capsys, "rm", base / "run" / "step-1", torn, bare)
    assert rc == 2 and "deleted" in out and "incomplete" in out
    assert "step-8 is not a checkpoint" in err
    assert removed(before, snapshot_dir(base)) == (
        {"run/step-1", *(f"run/step-1/{f}" for f in CKPT_FILES - {"COMMIT"})}
        | {"run/step-9", "run/step-9/rank-00000.data.tmp-00ff00ff00ff"}
    )


@pytest.mark.parametrize("layout", ["hashed", "roundrobin"])
def test_spread_layouts_delete_their_data_outside_the_name(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "r"
    with asyncckpt.AsyncCheckpointer(layout=layout) as ck:
        for step in (7, 8, 23):
            ck.save({"w": torch.arange(step)}, root / f"step-{step}", step=step)
    spread = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.data"))
    assert all(not f.startswith("step-") for f in spread), spread
    (root / spread[0].split("/")[0] / "someone-elses.bin").write_bytes(b"keep")
    before = snapshot_dir(tmp_path)
    (root / "step-7" / "rank-00000.manifest").write_bytes(b"garbage")  # step-7: found through COMMIT's layout
    before["r/step-7/rank-00000.manifest"] = snapshot_dir(tmp_path)["r/step-7/rank-00000.manifest"]
    asyncckpt.delete(root / "step-7")
    asyncckpt.delete(root / "step-8")
    gone = removed(before, snapshot_dir(tmp_path))
    data = {f"r/{f}" for f in spread if "/step-7/" in f or "/step-8/" in f}
    assert len(data) == 2 and data <= gone
    assert {g for g in gone if g.endswith(".data") or g.endswith("COMMIT") or g.endswith(".manifest")} == (
        data | {f"r/step-{s}/{f}" for s in (7, 8) for f in ("COMMIT", "rank-00000.manifest")})
    assert torch.equal(asyncckpt.load(root)["w"], torch.arange(23))
    assert (root / spread[0].split("/")[0] / "someone-elses.bin").read_bytes() == b"keep"


# -- DCP checkpoints -----------------------------------------------------------------------------
def test_dcp_checkpoints_ours_and_stock(capsys: Any, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageWriter

    root = tmp_path / "dcp"
    sd = {"w": torch.arange(100.0), "extra": {"n": 3}}
    dcp.save(sd, storage_writer=AsyncStorageWriter(str(root / "ours"), update_latest=False))
    dcp.save(sd, checkpoint_id=str(root / "stock"))
    dcp.save(sd, checkpoint_id=str(root / "broken"))
    for d in ("ours", "stock"):
        (root / d / "README").write_text("keep me")
    (root / "broken" / ".metadata").write_bytes(b"\x80\x04garbage")
    before = snapshot_dir(tmp_path)
    ours = asyncckpt.delete(root / "ours")
    stock = asyncckpt.delete(root / "stock")
    assert ours.kind == "dcp" and ours.complete and stock.kind == "dcp (stock)" and stock.complete
    assert ours.deleted[:2] == ["ours/COMMIT", "ours/.metadata"]
    gone = removed(before, snapshot_dir(tmp_path))
    assert gone == {f"dcp/ours/{f}" for f in ("COMMIT", ".metadata", ".checksums", "__0.checksums", "__0_0.distcp")} | {
        f"dcp/stock/{f}" for f in (".metadata", "__0_0.distcp")}
    before = snapshot_dir(tmp_path)
    rc, _, err = run(capsys, "rm", root / "broken")
    assert rc == 2 and "metadata" in err
    assert snapshot_dir(tmp_path) == before


# -- prune and retention use the same deletion --------------------------------------------------------
def test_prune_deletes_only_checkpoint_files(capsys: Any, base: Path) -> None:
    (base / "run" / "step-1" / "notes.txt").write_text("keep")
    before = snapshot_dir(base)
    rc, out, err = run(capsys, "prune", base / "papers", "--keep-last", "1")
    assert rc == 0 and "deleted 0 checkpoint(s)" in out, err
    rc, _, err = run(capsys, "prune", base / "notes.txt", "--keep-last", "1")
    assert rc == 2 and "not a root" in err
    rc, _, err = run(capsys, "prune", base / "missing", "--keep-last", "1")
    assert rc == 2 and "no such directory" in err
    with pytest.raises(asyncckpt.CheckpointNotFoundError):
        asyncckpt.prune(base / "missing", keep_last=1)
    assert snapshot_dir(base) == before
    gone = asyncckpt.prune(base / "run", keep_last=1)
    assert [i.name for i in gone] == ["step-2", "step-1"]
    assert removed(before, snapshot_dir(base)) == (_ours("step-2") | _ours("step-1")) - {"run/step-1"}
    assert (base / "run" / "step-1" / "notes.txt").read_text() == "keep"


def test_damaged_latest_counts_as_pointing_here(capsys: Any, base: Path) -> None:
    _flip(base / "run" / "latest", 5)
    before = snapshot_dir(base)
    rc, _, err = run(capsys, "rm", base / "run" / "step-1")
    assert rc == 1 and "'latest' is damaged, so it may point to step-1" in err
    assert snapshot_dir(base) == before
    report = asyncckpt.delete(base / "run" / "step-1", force=True)
    assert report.latest == "step-3"  # rewritten to the newest remaining
    assert asyncckpt.load(base / "run")["step"] == 3
    with pytest.raises(asyncckpt.BadInputError, match="one root's path"):
        asyncckpt.delete(asyncckpt.Tiers(base / "run") / "step-2")


def test_ls_says_which_incomplete_ones_rm_removes(base: Path) -> None:
    (base / "run" / "step-1" / "COMMIT").unlink()
    bare = base / "run" / "step-8"
    bare.mkdir()
    (bare / "rank-00000.data").write_bytes(b"x")
    problems = {i.name: i.problem for i in asyncckpt.list_checkpoints(base / "run", include_incomplete=True)
                if not i.complete}
    assert problems["step-1"] == "no commit record (save did not finish)"
    assert "`asyncckpt rm` refuses" in problems["step-8"]
