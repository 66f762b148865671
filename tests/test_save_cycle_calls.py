"""The worker's save cycle asks storage only what it does not know (issue 13: the save cycle).

Each cut is shown by counting storage calls (never by timing): the commit takes the generation
its save found, retention does not read back what this process committed, a deletion's
manifests come from memory when COMMIT certifies them, a deletion's listing is taken once on
object stores, and deletions are batched (local: one directory fsync per directory after
COMMIT's; S3: one DeleteObjects request). Read-side calls outside the worker's control steps
always ask storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.catalog import (
    commit_checkpoint,
    known_manifest,
    list_all,
    next_generation,
    note_manifest_written,
    read_commit,
    remembered_records,
)
from asyncckpt.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    DictNode,
    ManifestRef,
    RankManifest,
    checksum,
    encode_manifest,
    manifest_file,
)
from asyncckpt.retention import RetentionPolicy, apply_retention
from asyncckpt.storage import LocalStorage, Storage, blocking_calls_here, open_storage
from asyncckpt.storage.s3 import S3Storage

_METHODS = ("read", "size", "exists", "list", "delete", "delete_many", "put_record", "open_writer")


class Calls:
    """Every storage call of one storage object, as (method, key)."""

    def __init__(self, st: Storage) -> None:
        self.log: list[tuple[str, str]] = []
        for name in _METHODS:
            setattr(st, name, self._wrap(name, getattr(st, name)))

    def _wrap(self, name: str, real: Any) -> Any:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.log.append((name, args[0] if args and isinstance(args[0], str) else repr(args[0]) if args else ""))
            return await real(*args, **kwargs)

        return counted

    def take(self) -> list[tuple[str, str]]:
        out, self.log = self.log, []
        return out


async def _save(st: Storage, name: str, step: int) -> bytes:
    """What a rank's save does on storage: decide the generation, write data, then the manifest."""
    generation, _ = await next_generation(st, name, overwrite=False)
    data = os.urandom(1000)
    w = await st.open_writer(f"{name}/rank-00000.data", size_hint=len(data))
    await w.write_part(0, 0, memoryview(data))
    await w.commit()
    m = RankManifest(
        format=FORMAT_NAME, version=FORMAT_VERSION, name=name, rank=0, world_size=1, step=step,
        data_file=f"{name}/rank-00000.data", data_nbytes=len(data), chunk_size=1000, checksum_algo="crc32c",
        chunk_checksums=[checksum(data)], entries=[], tree=DictNode(keys=[], values=[]),
    )  # fmt: skip
    blob = encode_manifest(m)
    await st.put_record(f"{name}/{manifest_file(0, generation)}", blob)
    return blob


async def _cycle(st: Storage, step: int, policy: RetentionPolicy) -> None:
    """One save cycle as the worker runs it: the save, then commit and retention on the control lane."""
    await _save(st, f"step-{step}", step)
    with remembered_records():
        await commit_checkpoint(st, f"step-{step}", world_size=1, step=step)
        await apply_retention(st, policy, upto_step=step)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        st: Storage = LocalStorage(tmp_path / "root")
    else:
        srv = request.getfixturevalue("moto_server")
        st = open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/run", **srv.options())
    yield st  # each test closes it on its own event loop


def _named(calls: list[tuple[str, str]], method: str, key: str | None = None) -> list[str]:
    return [k for m, k in calls if m == method and (key is None or k == key)]


def test_a_save_cycle_asks_only_what_it_does_not_know(storage: Storage) -> None:
    async def run() -> None:
        policy = RetentionPolicy(keep_last=2)
        for step in (1, 2, 3):
            await _cycle(storage, step, policy)
        calls = Calls(storage)
        await _save(storage, "step-4", 4)
        save = calls.take()
        local = isinstance(storage, LocalStorage)
        # the save's own check of the name: both records read at once, or (local) one look at NAME/,
        # which shows neither is there
        assert sorted(_named(save, "read")) == ([] if local else ["step-4/COMMIT", "step-4/RETIRED"])
        assert _named(save, "list") == (["step-4"] if local else [])
        # as the worker's control thread runs them: a local root's calls inline (blocking calls welcome)
        with remembered_records(), blocking_calls_here() if local else contextlib.nullcontext():
            await commit_checkpoint(storage, "step-4", world_size=1, step=4)
            commit = calls.take()
            await apply_retention(storage, policy, upto_step=4)
            retention = calls.take()
        # commit: no second reading of COMMIT/RETIRED (the save's generation), the manifest read once,
        # no listing of the fresh name (nothing replaced), no reading back of COMMIT or `latest`
        assert _named(commit, "read") == ["step-4/rank-00000.manifest"]
        assert _named(commit, "size") == ["step-4/rank-00000.data"]
        assert _named(commit, "list") == []
        assert [k for m, k in commit if m == "put_record"] == ["step-4/COMMIT", "latest"]
        # retention: one listing of the root; COMMIT read only for the proof of the one it deletes;
        # `latest` read once (the deletion's own check); no manifest read (this process committed it)
        # the object store lists the root and NAME/ once each; a local root is not listed: its
        # directories are looked at (list_all), and NAME/ once (its files, temp files, what a
        # listing would show)
        assert _named(retention, "list") == ([] if local else ["", "step-2"])
        assert sorted(_named(retention, "read")) == ["latest", "step-2/COMMIT"]
        assert len(_named(retention, "delete_many")) == 1  # one batch: COMMIT first, then the rest
        assert sorted(await storage.list()) == sorted(
            ["latest"] + [f"step-{s}/{f}" for s in (3, 4) for f in ("COMMIT", "rank-00000.data", "rank-00000.manifest")])
        await storage.close()

    asyncio.run(run())


def test_read_side_calls_ask_storage(storage: Storage) -> None:
    """Outside the worker's control steps the catalog reads every COMMIT, `latest` and manifest."""
    async def run() -> None:
        for step in (1, 2):
            await _cycle(storage, step, RetentionPolicy(keep_last=5))
        calls = Calls(storage)
        infos = await list_all(storage)
        assert [i.name for i in infos] == ["step-2", "step-1"] and infos[0].is_latest
        assert sorted(_named(calls.take(), "read")) == ["latest", "step-1/COMMIT", "step-2/COMMIT"]
        rec = await read_commit(storage, "step-2")
        assert known_manifest(storage, "step-2", rec.manifests[0]) is None  # not without remembered_records
        with remembered_records():
            assert known_manifest(storage, "step-2", rec.manifests[0]) is not None
        await storage.close()

    asyncio.run(run())


def test_known_manifest_needs_the_commit_reference_to_match(tmp_path: Path) -> None:
    async def run() -> None:
        st = LocalStorage(tmp_path)
        await _save(st, "a", 1)
        with remembered_records():
            rec = await commit_checkpoint(st, "a", world_size=1, step=1)
            ref = rec.manifests[0]
            assert known_manifest(st, "a", ref) is not None
            for bad in (ManifestRef(rank=0, file=ref.file, nbytes=ref.nbytes + 1, checksum=ref.checksum,
                                    data_nbytes=ref.data_nbytes, save_id=ref.save_id),
                        ManifestRef(rank=0, file=ref.file, nbytes=ref.nbytes, checksum=ref.checksum ^ 1,
                                    data_nbytes=ref.data_nbytes, save_id=ref.save_id)):
                assert known_manifest(st, "a", bad) is None
        await st.close()

    asyncio.run(run())


def test_commit_takes_a_manifest_this_process_wrote_from_memory(tmp_path: Path) -> None:
    """With ``note_manifest_written`` (the save's word for its own rank) the commit reads neither the
    manifest nor the data file's size back."""
    async def run() -> None:
        st = LocalStorage(tmp_path)
        blob = await _save(st, "a", 1)
        note_manifest_written(st, "a/rank-00000.manifest", blob, 1000)
        calls = Calls(st)
        with remembered_records():
            await commit_checkpoint(st, "a", world_size=1, step=1)
        got = calls.take()
        assert _named(got, "read") == [] and _named(got, "size") == []
        assert (await read_commit(st, "a")).manifests[0].data_nbytes == 1000
        await st.close()

    asyncio.run(run())


def test_an_overwrite_still_drops_the_replaced_generation(tmp_path: Path) -> None:
    """Only a fresh name skips the listing for replaced files: an overwrite removes generation 0."""
    async def run() -> None:
        st = LocalStorage(tmp_path)
        await _save(st, "a", 1)
        with remembered_records():
            await commit_checkpoint(st, "a", world_size=1, step=1)
        generation, _ = await next_generation(st, "a", overwrite=True)
        assert generation == 1
        data = os.urandom(10)
        w = await st.open_writer("a/rank-00000.g1.data")
        await w.write_part(0, 0, memoryview(data))
        await w.commit()
        m = RankManifest(
            format=FORMAT_NAME, version=FORMAT_VERSION, name="a", rank=0, world_size=1, step=2,
            data_file="a/rank-00000.g1.data", data_nbytes=len(data), chunk_size=1000, checksum_algo="crc32c",
            chunk_checksums=[checksum(data)], entries=[], tree=DictNode(keys=[], values=[]),
        )  # fmt: skip
        await st.put_record("a/rank-00000.g1.manifest", encode_manifest(m))
        with remembered_records():
            await commit_checkpoint(st, "a", world_size=1, step=2, overwrite=True)
        assert await st.list("a") == ["a/COMMIT", "a/rank-00000.g1.data", "a/rank-00000.g1.manifest"]
        await st.close()

    asyncio.run(run())


def test_local_delete_many_fsyncs_each_directory_once_per_group(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        st = LocalStorage(tmp_path)
        keys = ["n/COMMIT", "n/rank-00000.data", "n/rank-00001.data", "n/sub/x", "n/rank-00000.manifest"]
        for k in keys:
            await st.put_record(k, b"x")
        events: list[str] = []
        real_unlink, real_fsync = os.unlink, os.fsync

        def unlink(path: Any, *a: Any, **k: Any) -> None:
            events.append(f"unlink {Path(path).relative_to(tmp_path)}")
            real_unlink(path, *a, **k)

        def fsync(fd: int) -> None:
            events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).relative_to(tmp_path)}")
            real_fsync(fd)

        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(os, "fsync", fsync)
        await st.delete_many([keys[:1], keys[1:4], keys[4:]])
        monkeypatch.undo()
        assert events == ["unlink n/COMMIT", "fsync n",  # durable before anything else goes
                          "unlink n/rank-00000.data", "unlink n/rank-00001.data", "unlink n/sub/x",
                          "fsync n", "fsync n/sub",  # the data durably gone before the manifest that proves it
                          "unlink n/rank-00000.manifest", "fsync n"]
        assert not (tmp_path / "n").exists()  # emptied directories go
        await st.close()

    asyncio.run(run())


def test_s3_delete_many_is_one_request_per_group(moto_server: Any, s3_bucket: str) -> None:
    async def run() -> None:
        st = open_storage(f"s3://{s3_bucket}/run", **moto_server.options())
        assert isinstance(st, S3Storage)
        keys = ["n/COMMIT", "n/rank-00000.data", "n/rank-00001.data", "n/rank-00000.manifest"]
        for k in keys:
            await st.put_record(k, b"x")
        sent: list[str] = []
        real = st.s3.call

        async def call(method: str, **kwargs: Any) -> Any:
            sent.append(method)
            return await real(method, **kwargs)

        st.s3.call = call  # type: ignore[method-assign]
        await st.delete_many([keys[:1], keys[1:3], keys[3:]])
        assert sent == ["delete_object", "delete_objects", "delete_object"]
        assert await st.list() == []
        await st.close()

    asyncio.run(run())


def test_s3_delete_many_falls_back_to_one_request_per_key(moto_server: Any, s3_bucket: str) -> None:
    """A store that refuses DeleteObjects: key by key, and DeleteObjects is not tried again."""
    from botocore.exceptions import ClientError

    async def run() -> None:
        st = open_storage(f"s3://{s3_bucket}/run", **moto_server.options())
        assert isinstance(st, S3Storage)
        sent: list[str] = []
        real = st.s3.call

        async def call(method: str, **kwargs: Any) -> Any:
            sent.append(method)
            if method == "delete_objects":
                raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no"},
                                   "ResponseMetadata": {"HTTPStatusCode": 501}}, "DeleteObjects")
            return await real(method, **kwargs)

        for _ in range(2):
            for k in ("a", "b", "c"):
                await st.put_record(k, b"x")
            st.s3.call = call  # type: ignore[method-assign]
            await st.delete_many([["a", "b", "c"]])
            st.s3.call = real  # type: ignore[method-assign]
            assert await st.list() == []
        assert sent == ["delete_objects"] + ["delete_object"] * 3 + ["delete_object"] * 3
        await st.close()

    asyncio.run(run())


def test_a_remembered_generation_still_refuses_a_committed_name(tmp_path: Path) -> None:
    """A drain decides its generation with overwrite=True; a commit without overwrite is still refused
    when COMMIT was there, without reading it again, as reading it again would."""
    from asyncckpt.errors import CheckpointExistsError

    async def run() -> None:
        st = LocalStorage(tmp_path)
        await _save(st, "a", 1)
        with remembered_records():
            await commit_checkpoint(st, "a", world_size=1, step=1)
        assert (await next_generation(st, "a", overwrite=True))[0] == 1
        calls = Calls(st)
        with remembered_records(), pytest.raises(CheckpointExistsError):
            await commit_checkpoint(st, "a", world_size=1, step=1)
        assert calls.take() == []
        await st.close()

    asyncio.run(run())
