"""The catalog looks at a local root's directories instead of listing or reading them where that costs
less. list_all on a local root takes the files directly under each NAME/ from
LocalStorage.list_names (two levels of directories) instead of listing every file: it must list
exactly what the storage's listing makes it list, whatever the root holds."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import torch

import asyncckpt
from asyncckpt.catalog import RETIRED_FILE, list_all
from asyncckpt.storage import LocalStorage, blocking_calls_here


def _both(root: Path) -> tuple[list, list]:
    """list_all from the full listing (the way of every other backend), then from list_names."""

    async def run() -> tuple[list, list]:
        st = LocalStorage(root)
        try:
            looked = await list_all(st)
            with blocking_calls_here():  # inline, as on the worker's control thread
                assert await list_all(st) == looked
            keys = await st.list("")
            names = await st.list_names()
            direct: dict[str, list[str]] = {}
            for k in keys:
                head, _, rest = k.partition("/")
                if rest and "/" not in rest:
                    direct.setdefault(head, []).append(rest)
            assert {n: sorted(fs) for n, fs in names.items()} == direct  # the listing, two levels deep
            assert list(names) == list(direct)  # in the listing's order

            async def from_listing() -> dict[str, list[str]]:
                out: dict[str, list[str]] = {}
                for k in keys:
                    if "/" in k:
                        head, _, rest = k.partition("/")
                        out.setdefault(head, []).append(rest)
                return out

            st.list_names = from_listing  # type: ignore[method-assign]
            listed = await list_all(st)
            return listed, looked
        finally:
            await st.close()

    return asyncio.run(run())


def test_a_root_of_every_kind_of_entry_lists_the_same(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with asyncckpt.AsyncCheckpointer() as ck:
        for name in ("a", "a-b", "ab", "step-3"):
            ck.save({"w": torch.ones(3)}, root / name)
        ck.save({"w": torch.ones(3)}, root / "spread-1", step=1)
        ck.finalize(blocking=True)
        ck.layout = "hashed"
        ck.save({"w": torch.ones(3)}, root / "spread-2", step=2)  # data under HH/spread-2/
        ck.finalize(blocking=True)
    (root / "a" / "notes").mkdir()
    (root / "a" / "notes" / "x.txt").write_text("deep")
    for torn in (root / "torn", root / "t", root / "t-x"):  # saves without COMMIT (listed in the listing's order)
        torn.mkdir()
        for f in ("rank-00000.manifest", "rank-00000.data"):
            (torn / f).write_bytes((root / "a" / f).read_bytes())
    (root / "only-data").mkdir()
    (root / "only-data" / "rank-00000.data").write_bytes(b"x")
    (root / "gone").mkdir()
    (root / "gone" / RETIRED_FILE).write_text("0")
    (root / "temps").mkdir()
    (root / "temps" / "COMMIT.tmp-0123456789ab").write_bytes(b"x")  # hidden by listings
    (root / "temps" / "rank-00000.manifest.tmp-0123456789ab").write_bytes(b"x")
    (root / "empty").mkdir()
    (root / "deep-only" / "sub").mkdir(parents=True)
    (root / "deep-only" / "sub" / "COMMIT").write_bytes(b"not directly under the name")
    (root / "plain.txt").write_text("a file at the top")
    os.symlink(root / "a", root / "alias")  # a link to a checkpoint: listings do not follow it
    os.symlink(root / "missing", root / "dangling")
    os.symlink(root / "a" / "COMMIT", root / "ab" / "link-to-file")
    bad = root / "bad-commit"
    bad.mkdir()
    (bad / "COMMIT").write_bytes(b"garbage")
    listed, looked = _both(root)
    assert looked == listed
    names = [i.name for i in listed]
    assert {"a", "a-b", "ab", "step-3", "torn", "t", "t-x", "only-data", "gone", "bad-commit"} <= set(names)
    assert names.index("t-x") < names.index("t")  # "t-x/..." sorts before "t/..."
    assert not {"alias", "dangling", "empty", "deep-only", "temps", "plain.txt"} & set(names)


def test_an_empty_or_missing_root_lists_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert _both(tmp_path / "empty") == ([], [])
    assert _both(tmp_path / "missing") == ([], [])


def test_the_generation_a_save_writes_from_one_look_at_the_name(tmp_path: Path) -> None:
    """next_generation on a local root looks at NAME/ once: a new name, a committed one (overwrite or
    not), a deleted one whose files others reference (RETIRED) and one with both give what reading the
    records gives."""
    import pytest

    from asyncckpt.catalog import next_generation, read_commit
    from asyncckpt.errors import CheckpointExistsError

    root = tmp_path / "root"
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"w": torch.ones(3)}, root / "done")
        ck.save({"w": torch.ones(3)}, root / "both")
        ck.finalize(blocking=True)
    (root / "gone").mkdir()
    (root / "gone" / RETIRED_FILE).write_text("4")
    (root / "both" / RETIRED_FILE).write_text("7")  # COMMIT wins: RETIRED matters only without one

    async def run() -> None:
        st = LocalStorage(root)
        try:
            done = await read_commit(st, "done")
            assert await next_generation(st, "new", overwrite=False) == (0, None)
            assert await next_generation(st, "done", overwrite=True) == (done.generation + 1, done)
            with pytest.raises(CheckpointExistsError):
                await next_generation(st, "done", overwrite=False)
            assert await next_generation(st, "gone", overwrite=False) == (5, None)
            gen, old = await next_generation(st, "both", overwrite=True)
            assert old is not None and gen == old.generation + 1
        finally:
            await st.close()

    asyncio.run(run())
