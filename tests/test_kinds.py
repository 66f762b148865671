"""A handler per checkpoint kind (asyncckpt.kinds): load, the CLI, the catalog and deletion dispatch
through it, for checkpoints written by the public API (native, DCP, torch.save), for a kind this
version does not know (one clear error everywhere), and for a kind a test registers."""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest
import torch

import asyncckpt
from asyncckpt import cli
from asyncckpt._loop import run_sync
from asyncckpt.catalog import check_checkpoint, read_commit
from asyncckpt.errors import BadInputError, DeleteRefusedError, FormatError, IntegrityError
from asyncckpt.format import (
    CHECKSUM_ALGO,
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    CommitRecord,
    ManifestRef,
    checksum,
    encode_commit,
)
from asyncckpt.kinds import (
    CheckpointKind,
    GenerationFiles,
    RecordProbe,
    VerifyReport,
    kind_of,
    kind_of_file,
    kinds,
    register_kind,
    unregister_kind,
)
from asyncckpt.storage import LocalStorage, Storage, join_key
from tests._trees import removed, snapshot_dir

STATE = {"w": torch.arange(50_000, dtype=torch.float32), "b": torch.ones(3, 4, dtype=torch.bfloat16), "step": 7}


def run(capsys: Any, *argv: object) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _same(a: Any, b: Any) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def source(shared_ckpt: asyncckpt.AsyncCheckpointer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with one checkpoint of each kind, each written by the public API."""
    from asyncckpt.dcp import async_save, close_async_saves

    base = tmp_path_factory.mktemp("kinds")
    shared_ckpt.save(STATE, base / "run" / "native", step=7)
    shared_ckpt.finalize(blocking=True)
    try:
        h = async_save({k: v for k, v in STATE.items() if k != "step"}, checkpoint_id=str(base / "run" / "dcp"))
        h.result()
    finally:
        close_async_saves()
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save(STATE, base / "model.pt")
        tac.finalize_async_save(blocking=True)
    return base


@pytest.fixture
def base(source: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "w"
    shutil.copytree(source, dst, symlinks=True)
    return dst


def _record(path: Path) -> CommitRecord:
    storage = LocalStorage(str(path.parent))
    try:
        return run_sync(read_commit(storage, path.name))
    finally:
        run_sync(storage.close())


# -- each kind is found and dispatched ------------------------------------------------------------
def test_each_kind_is_found_from_what_the_public_api_wrote(base: Path) -> None:
    assert kind_of(_record(base / "run" / "native"), "x").name == "asyncckpt"
    assert kind_of(_record(base / "run" / "dcp"), "x").name == "dcp"
    found = kind_of_file(base / "model.pt")
    assert found is not None and found[0].name == "torch.save" and found[1] == "zip"
    assert kind_of_file(base / "run" / "native" / COMMIT_FILE) is None  # a file, but no kind's
    infos = {i.name: i for i in asyncckpt.list_checkpoints(base / "run", check=True)}
    assert {n: (i.kind, i.complete) for n, i in infos.items()} == {"native": ("asyncckpt", True),
                                                                   "dcp": ("dcp", True)}


def test_load_dispatches_by_kind(base: Path) -> None:
    _same(asyncckpt.load(base / "run" / "native"), STATE)
    _same(asyncckpt.load(base / "model.pt"), STATE)  # torch.load(weights_only=True) through its handler
    assert asyncckpt.load(base / "model.pt", keys=["step"]) == {"step": 7}
    with pytest.raises(BadInputError, match=r"'dcp' checkpoint.*torch\.distributed\.checkpoint\.load"):
        asyncckpt.load(base / "run" / "dcp")
    with pytest.raises(BadInputError, match="rank=1 does not apply"):
        asyncckpt.load(base / "model.pt", rank=1)


def test_cli_verify_dispatches_by_kind(base: Path, capsys: Any) -> None:
    rc, out, _ = run(capsys, "verify", "--no-progress", base / "run" / "native", base / "run" / "dcp",
                     base / "model.pt")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 3 and all(line.startswith("OK ") for line in lines), out
    assert "step 7" in lines[0] and "verified (crc32c)" in lines[0]
    # DCP: its metadata, index, rank record and data file, every item's bytes against its CRC32C
    assert f"OK {base}/run/dcp: step None, 4 files" in lines[1]
    assert "a torch.save file (zip" in lines[2] and "every CRC-32 matches" in lines[2]
    data = next((base / "run" / "dcp").glob("__0_0*.distcp"))
    _flip(data, data.stat().st_size // 2)
    rc, out, _ = run(capsys, "verify", "--no-progress", base / "run" / "dcp")
    assert rc == 1 and f"FAILED {base}/run/dcp: 1 problem(s)" in out and "fails its checksum" in out, out
    assert data.name in out


def test_cli_inspect_and_export_dispatch_by_kind(base: Path, capsys: Any) -> None:
    rc, out, _ = run(capsys, "inspect", base / "run" / "native")
    assert rc == 0 and "kind asyncckpt" in out
    rc, out, _ = run(capsys, "inspect", base / "model.pt")
    assert rc == 0 and "a torch.save file (zip format" in out
    for verb in (["inspect"], ["export", "--to", base / "x.pt"]):
        rc, _, err = run(capsys, verb[0], base / "run" / "dcp", *verb[1:])
        assert rc == 2 and f"is a 'dcp' checkpoint; `asyncckpt {verb[0]}` reads asyncckpt-format" in err, err
        assert "torch.distributed.checkpoint.load" in err
    assert not (base / "x.pt").exists()


def test_dcp_generation_files_are_its_files_on_disk(base: Path) -> None:
    """What the DCP handler says a committed generation owns is exactly its files (but the two commit points)."""
    path = base / "run" / "dcp"
    rec = _record(path)
    storage = LocalStorage(str(base / "run"))
    try:
        got = run_sync(kind_of(rec, str(path)).generation_files(storage, "dcp", rec))
    finally:
        run_sync(storage.close())
    assert not got.problems and not got.shared
    on_disk = {f"dcp/{p.name}" for p in path.iterdir()} - {"dcp/COMMIT", "dcp/.metadata"}
    assert set(got.keys) == on_disk and any(k.endswith(".distcp") for k in got.keys)


def test_catalog_check_names_a_truncated_dcp_data_file(base: Path) -> None:
    data = next((base / "run" / "dcp").glob("__0_0*.distcp"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 1)
    storage = LocalStorage(str(base / "run"))
    try:
        problem = run_sync(check_checkpoint(storage, "dcp"))
    finally:
        run_sync(storage.close())
    assert data.name in problem and "truncated" in problem and "checksum record of rank 0" in problem


# -- a kind this version does not know ------------------------------------------------------------
def _rekind(path: Path, kind: str) -> None:
    rec = _record(path)
    (path / COMMIT_FILE).write_bytes(encode_commit(msgspec.structs.replace(rec, kind=kind)))


def test_an_unknown_kind_is_one_clear_error_everywhere(base: Path, capsys: Any) -> None:
    path = base / "run" / "native"
    _rekind(path, "future-kind")
    want = r"checkpoint kind 'future-kind' is unknown to asyncckpt .* upgrade asyncckpt"
    with pytest.raises(FormatError, match=want):
        asyncckpt.load(path)
    rc, _, err = run(capsys, "verify", "--no-progress", path)
    assert rc == 1 and "checkpoint kind 'future-kind' is unknown" in err and "upgrade asyncckpt" in err
    rc, _, err = run(capsys, "inspect", path)
    assert rc == 1 and "'future-kind' is unknown" in err
    # listed, never as loadable, with the reason
    assert [i.name for i in asyncckpt.list_checkpoints(base / "run")] == ["dcp"]
    info = {i.name: i for i in asyncckpt.list_checkpoints(base / "run", include_incomplete=True)}["native"]
    assert not info.complete and info.kind == "future-kind" and "upgrade asyncckpt" in info.problem
    storage = LocalStorage(str(base / "run"))
    try:
        assert "'future-kind' is unknown" in run_sync(check_checkpoint(storage, "native"))
    finally:
        run_sync(storage.close())
    # nothing says which files it owns: deletion refuses and removes nothing
    before = snapshot_dir(base)
    with pytest.raises(DeleteRefusedError, match="cannot tell which files a 'future-kind' checkpoint owns"):
        asyncckpt.delete(path)
    assert snapshot_dir(base) == before


# -- a kind registered by its user: the seam is real ----------------------------------------------
class BlobKind(CheckpointKind):
    """Test-only kind: each rank is one raw file, its size and CRC32C recorded in COMMIT's ``manifests``."""

    name: ClassVar[str] = "blob"
    reader: ClassVar[str] = "read the files yourself"

    def checks(self, storage: Storage, name: str, rec: CommitRecord, probe: RecordProbe) -> list[Awaitable[str]]:
        return [probe.check_size(join_key(name, ref.file), ref.nbytes, f"{COMMIT_FILE}") for ref in rec.manifests]

    async def generation_files(self, storage: Storage, name: str, rec: CommitRecord) -> GenerationFiles:
        return GenerationFiles(keys=[join_key(name, ref.file) for ref in rec.manifests])

    async def load(self, storage: Storage, name: str, rec: CommitRecord, *, rank: int | None, allow_pickle: bool,
                   keys: Collection[str | int] | None) -> Any:
        ref = rec.manifests[rank or 0]
        blob = await storage.read(join_key(name, ref.file))
        if checksum(blob) != ref.checksum:
            raise IntegrityError(f"{storage.uri}/{name}/{ref.file} fails its checksum")
        return blob

    async def verify(self, storage: Storage, name: str, rec: CommitRecord, progress: Callable[[int], Any],
                     total: Callable[[int], Any]) -> VerifyReport:
        total(sum(ref.nbytes for ref in rec.manifests))
        report = VerifyReport()
        for ref in rec.manifests:
            blob = await storage.read(join_key(name, ref.file))
            progress(len(blob))
            report.files += 1
            report.checked += len(blob)
            if checksum(blob) != ref.checksum:
                report.problems.append(f"{storage.uri}/{name}/{ref.file}: crc32c mismatch")
        return report


def _write_blob_checkpoint(path: Path, payload: bytes) -> None:
    path.mkdir(parents=True)
    (path / "part-0.bin").write_bytes(payload)
    ref = ManifestRef(rank=0, file="part-0.bin", nbytes=len(payload), checksum=checksum(payload),
                      data_nbytes=len(payload))
    rec = CommitRecord(format=FORMAT_NAME, version=FORMAT_VERSION, name=path.name, step=3, world_size=1,
                       created=time.time(), total_nbytes=len(payload), checksum_algo=CHECKSUM_ALGO, manifests=[ref],
                       kind="blob")
    (path / COMMIT_FILE).write_bytes(encode_commit(rec))


@pytest.fixture
def blob_kind() -> Iterator[CheckpointKind]:
    kind = register_kind(BlobKind())
    try:
        yield kind
    finally:
        unregister_kind("blob")
    assert all(k.name != "blob" for k in kinds())


def test_a_kind_unknown_until_registered(tmp_path: Path, capsys: Any) -> None:
    _write_blob_checkpoint(tmp_path / "root" / "b", b"x" * 1000)
    rc, _, err = run(capsys, "verify", "--no-progress", tmp_path / "root" / "b")
    assert rc == 1 and "checkpoint kind 'blob' is unknown" in err


def test_a_registered_kind_is_used_by_cli_catalog_load_and_delete(blob_kind: CheckpointKind, tmp_path: Path,
                                                                  capsys: Any) -> None:
    root = tmp_path / "root"
    payload = bytes(range(256)) * 40
    _write_blob_checkpoint(root / "b", payload)
    _write_blob_checkpoint(root / "keep", payload)
    (root / "b" / "notes.txt").write_text("not the checkpoint's")
    assert asyncckpt.load(root / "b") == payload
    rc, out, _ = run(capsys, "verify", "--no-progress", root / "b")
    assert rc == 0 and f"OK {root}/b: step 3, 1 files, 10.0 KiB verified" in out, out
    infos = {i.name: i for i in asyncckpt.list_checkpoints(root, check=True)}
    assert infos["b"].kind == "blob" and infos["b"].complete
    rc, _, err = run(capsys, "inspect", root / "b")
    assert rc == 2 and "is a 'blob' checkpoint; `asyncckpt inspect` reads asyncckpt-format" in err
    _flip(root / "b" / "part-0.bin", 7)
    rc, out, _ = run(capsys, "verify", "--no-progress", root / "b")
    assert rc == 1 and "part-0.bin: crc32c mismatch" in out
    with open(root / "keep" / "part-0.bin", "ab") as f:
        f.write(b"!")
    bad = {i.name: i for i in asyncckpt.list_checkpoints(root, check=True, include_incomplete=True)}["keep"]
    assert not bad.complete and "part-0.bin is 10241 bytes, COMMIT says 10240 (extended)" in bad.problem
    # deletion removes what the handler says the checkpoint owns (part-0.bin is no name the formats reserve)
    before = snapshot_dir(root)
    report = asyncckpt.delete(root / "b")
    assert report.kind == "blob" and report.complete and report.kept == ["b/notes.txt"]
    assert removed(before, snapshot_dir(root)) == {"b/COMMIT", "b/part-0.bin"}
