"""Fixed-name checkpoints (``last.ckpt``) overwritten in place, and checkpoints reached by another name.

What a user of a framework sees: ``load`` of a path being overwritten returns the complete old
or the complete new checkpoint, a kill at any moment leaves one of them, a renamed, moved or
symlinked checkpoint loads and verifies, and files from another checkpoint are still refused.
"""

from __future__ import annotations

import random
import shutil
import textwrap
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

import asyncckpt
from asyncckpt import cli
from asyncckpt._loop import run_sync
from asyncckpt.catalog import list_all
from asyncckpt.format import checksum, decode_commit, encode_commit
from asyncckpt.storage import open_storage

from ._dist import run_ranks
from ._kill import kill_mid_run

N = 1 << 18  # 1 MiB of float32 per checkpoint


def state(step: int, n: int = N) -> dict[str, Any]:
    return {"w": torch.full((n,), float(step)), "b": torch.arange(16) + step, "step": step}


def check_whole(got: dict[str, Any]) -> int:
    """The step of a loaded state, asserting every value belongs to that one step (no mix)."""
    step = got["step"]
    assert torch.equal(got["w"], torch.full_like(got["w"], float(step))), f"tensor w mixes steps (step {step})"
    assert torch.equal(got["b"], torch.arange(16) + step), f"tensor b is not step {step}'s"
    return step


def rank_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("rank-"))


def test_overwrite_replaces_the_checkpoint_and_removes_the_old_bytes(tmp_path: Path) -> None:
    path = tmp_path / "ckpts" / "last.ckpt"
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save(state(1), path, step=1)
        ck.finalize(blocking=True)
        with pytest.raises(asyncckpt.CheckpointExistsError):
            ck.save(state(2), path, step=2)
        for step in (2, 3):
            ck.save(state(step), path, step=step, overwrite=True)
            ck.finalize(blocking=True)
            assert check_whole(asyncckpt.load(path)) == step
            assert len(rank_files(path)) == 2, rank_files(path)  # one manifest, one data file: the old ones went
    assert check_whole(asyncckpt.load(tmp_path / "ckpts")) == 3  # through `latest`
    infos = asyncckpt.list_checkpoints(tmp_path / "ckpts")
    assert [(i.name, i.step, i.complete) for i in infos] == [("last.ckpt", 3, True)]
    assert cli.main(["verify", str(path)]) == 0
    asyncckpt.delete(path, force=True)
    assert not path.exists()


def test_loads_during_overwrites_return_the_old_or_the_new_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save(state(0), path, step=0)
        ck.finalize(blocking=True)

        def reader() -> None:
            while not stop.is_set():
                try:
                    seen.append(check_whole(asyncckpt.load(path)))
                except BaseException as exc:  # noqa: BLE001 - every failure is the finding
                    errors.append(exc)
                    return

        t = threading.Thread(target=reader)
        t.start()
        try:
            for step in range(1, 9):
                ck.save(state(step), path, step=step, overwrite=True)
                ck.finalize(blocking=True)
        finally:
            stop.set()
            t.join(60)
    assert not errors, f"a load failed while the checkpoint was overwritten: {errors[0]!r}"
    assert seen and seen == sorted(seen), seen  # whole states, never an older one after a newer one
    assert check_whole(asyncckpt.load(path)) == 8


_OVERWRITER = textwrap.dedent(
    """
    import sys, torch, asyncckpt
    path, n = sys.argv[1], int(sys.argv[2])
    ck = asyncckpt.AsyncCheckpointer()
    print(ck.queue.worker_pid, flush=True)
    step = int(sys.argv[3])
    while True:
        step += 1
        ck.save({"w": torch.full((n,), float(step)), "b": torch.arange(16) + step, "step": step}, path,
                step=step, overwrite=True)
        ck.finalize(blocking=True)
        print(step, flush=True)
    """
)


@pytest.mark.fault
def test_sigkill_during_overwrites_leaves_the_old_or_the_new_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save(state(0), path, step=0)
    rng = random.Random(18)
    last = 0
    for trial in range(4):
        committed = kill_mid_run(_OVERWRITER, [str(path), str(4 * N), str(last * 100)], rng, 0.4)
        got = check_whole(asyncckpt.load(path))
        assert got >= committed, f"trial {trial}: step {got} loaded, but step {committed} had been committed"
        assert cli.main(["verify", str(path)]) == 0
        last = got // 100 + 1
    # A later overwrite commits and clears what killed ones left.
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save(state(10_000), path, step=10_000, overwrite=True)
    assert check_whole(asyncckpt.load(path)) == 10_000
    assert len(rank_files(path)) == 2 and not [p for p in path.iterdir() if ".tmp-" in p.name]


def _overwrite_on_ranks(rank: int, world: int, path: str) -> list[int]:
    import torch.distributed as dist

    got = []
    with asyncckpt.AsyncCheckpointer() as ck:
        for step in (1, 2, 3):
            ck.save({**state(step + 10 * rank, 1 << 12), "rank": rank}, path, step=step, overwrite=True)
            ck.finalize(blocking=True)
            dist.barrier()
            got.append(check_whole(asyncckpt.load(path, rank=rank)))
            dist.barrier()  # every rank read this generation before the next commit replaces it
    return got


@pytest.mark.multiproc
def test_overwrite_with_two_ranks(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    got = run_ranks(2, _overwrite_on_ranks, tmp_path, str(path))
    assert got == [[1, 2, 3], [11, 12, 13]]
    assert rank_files(path) == ["rank-00000.g2.data", "rank-00000.g2.manifest",
                                "rank-00001.g2.data", "rank-00001.g2.manifest"]
    assert [check_whole(asyncckpt.load(path, rank=r)) for r in (0, 1)] == [3, 13]


@pytest.fixture
def two(tmp_path: Path) -> Path:
    root = tmp_path / "ckpts"
    with asyncckpt.AsyncCheckpointer() as ck:
        for step in (10, 20):
            ck.save(state(step), root / f"step-{step}", step=step)
            ck.finalize(blocking=True)
    return root


def test_symlinked_checkpoint_loads_and_verifies(two: Path) -> None:
    (two / "last.ckpt").symlink_to("step-20", target_is_directory=True)  # as Lightning's save_last="link"
    assert check_whole(asyncckpt.load(two / "last.ckpt")) == 20
    assert cli.main(["verify", str(two / "last.ckpt")]) == 0


def test_renamed_and_moved_checkpoints_load_and_verify(two: Path, tmp_path: Path) -> None:
    (two / "step-10").rename(two / "renamed")
    assert check_whole(asyncckpt.load(two / "renamed")) == 10
    (tmp_path / "elsewhere").mkdir()
    shutil.move(str(two / "step-20"), str(tmp_path / "elsewhere" / "best"))
    assert check_whole(asyncckpt.load(tmp_path / "elsewhere" / "best")) == 20
    assert cli.main(["verify", str(tmp_path / "elsewhere" / "best")]) == 0
    shutil.copytree(tmp_path / "elsewhere" / "best", two / "copy")
    assert check_whole(asyncckpt.load(two / "copy")) == 20


@pytest.mark.parametrize("files", [("COMMIT",), ("COMMIT", "rank-00000.manifest")])
def test_files_of_another_checkpoint_are_still_refused(two: Path, files: tuple[str, ...]) -> None:
    for f in files:
        shutil.copyfile(two / "step-10" / f, two / "step-20" / f)
    with pytest.raises(asyncckpt.IntegrityError) as ei:
        asyncckpt.load(two / "step-20")
    assert "step-20" in str(ei.value)
    assert cli.main(["verify", str(two / "step-20")]) != 0


def test_commit_with_another_save_id_is_refused(two: Path) -> None:
    """Even a COMMIT forged to match the manifest's size and CRC32C: the save ids differ."""
    ckpt = two / "step-20"
    rec = decode_commit((ckpt / "COMMIT").read_bytes(), "COMMIT")
    other = decode_commit((two / "step-10" / "COMMIT").read_bytes(), "COMMIT")
    ref = msgspec.structs.replace(rec.manifests[0], save_id=other.manifests[0].save_id)
    (ckpt / "COMMIT").write_bytes(encode_commit(msgspec.structs.replace(rec, manifests=[ref])))
    with pytest.raises(asyncckpt.IntegrityError, match="belongs to save"):
        asyncckpt.load(ckpt)


def test_checkpoint_without_save_ids_still_loads(two: Path) -> None:
    """Checkpoints written before save ids existed: manifest and COMMIT without them."""
    ckpt = two / "step-20"
    m = msgspec.msgpack.decode((ckpt / "rank-00000.manifest").read_bytes())
    del m["save_id"]
    blob = msgspec.msgpack.encode(m)
    (ckpt / "rank-00000.manifest").write_bytes(blob)
    rec = decode_commit((ckpt / "COMMIT").read_bytes(), "COMMIT")
    ref = msgspec.structs.replace(rec.manifests[0], nbytes=len(blob), checksum=checksum(blob), save_id="")
    (ckpt / "COMMIT").write_bytes(encode_commit(msgspec.structs.replace(rec, manifests=[ref])))
    assert check_whole(asyncckpt.load(ckpt)) == 20


def test_rm_of_a_symlink_removes_only_the_link(two: Path) -> None:
    (two / "last.ckpt").symlink_to("step-20", target_is_directory=True)
    report = asyncckpt.delete(two / "last.ckpt")
    assert report.deleted == ["last.ckpt"] and "link" in report.notes[0]
    assert not (two / "last.ckpt").exists() and not (two / "last.ckpt").is_symlink()
    assert check_whole(asyncckpt.load(two / "step-20")) == 20
    assert cli.main(["verify", str(two / "step-20")]) == 0


def test_overwrite_on_s3_switches_atomically(moto_server: Any, s3_bucket: str) -> None:
    opts = moto_server.options()
    path = f"s3://{s3_bucket}/run/last.ckpt"
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    with asyncckpt.AsyncCheckpointer(storage_options=opts) as ck:
        ck.save(state(0, 1 << 12), path, step=0)
        ck.finalize(blocking=True)

        def reader() -> None:
            while not stop.is_set():
                try:
                    seen.append(check_whole(asyncckpt.load(path, storage_options=opts)))
                except BaseException as exc:  # noqa: BLE001 - every failure is the finding
                    errors.append(exc)
                    return

        t = threading.Thread(target=reader)
        t.start()
        try:
            for step in range(1, 5):
                ck.save(state(step, 1 << 12), path, step=step, overwrite=True)
                ck.finalize(blocking=True)
        finally:
            stop.set()
            t.join(60)
    assert not errors, f"a load failed while the checkpoint was overwritten: {errors[0]!r}"
    assert seen and check_whole(asyncckpt.load(path, storage_options=opts)) == 4
    st = open_storage(f"s3://{s3_bucket}/run", **opts)
    try:
        keys = run_sync(st.list("last.ckpt"))
        infos = run_sync(list_all(st, check=True))
    finally:
        run_sync(st.close())
    assert keys == ["last.ckpt/COMMIT", "last.ckpt/rank-00000.g4.data", "last.ckpt/rank-00000.g4.manifest"]
    assert [(i.name, i.step, i.complete) for i in infos] == [("last.ckpt", 4, True)]


def test_torch_async_checkpoint_overwrite_is_whole_at_every_moment(tmp_path: Path) -> None:
    """``async_save(sd, "last.ckpt")`` writes a temporary file and renames it over the old one."""
    path = tmp_path / "last.ckpt"
    torch.save(state(0), path)
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(check_whole(torch.load(path, weights_only=True)))
            except BaseException as exc:  # noqa: BLE001 - every failure is the finding
                errors.append(exc)
                return

    with asyncckpt.TorchAsyncCheckpoint() as ck:
        t = threading.Thread(target=reader)
        t.start()
        try:
            for step in range(1, 9):
                ck.async_save(state(step), path)
                ck.finalize_async_save(blocking=True)
        finally:
            stop.set()
            t.join(60)
    assert not errors, f"torch.load failed while the file was overwritten: {errors[0]!r}"
    assert seen and seen == sorted(seen)
    assert check_whole(torch.load(path, weights_only=True)) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
