"""Corruption fuzzing (hypothesis, bounded): a damaged checkpoint is named in a clean error.

Every damaged data file, manifest or swapped file makes ``load`` raise IntegrityError (or its
FormatError) naming the file — and, for data, the affected keys — never another exception,
never wrong data, and never an allocation larger than the files on disk.

Two kinds of manifest edits are tried. *Raw* edits leave the commit record as it was: the
manifest no longer matches the checksum the commit record holds, so they are always caught.
*Fixed-up* edits also rewrite the commit record's checksum (a forged but self-consistent
checkpoint), which exercises the manifest validation itself: an inconsistent manifest is a
FormatError naming file and key; a consistent forgery may load, and then must return exactly
the bytes it describes (checked by an independent reader below).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import asyncckpt
from asyncckpt.errors import BadInputError, CheckpointError, IntegrityError
from asyncckpt.format import MANIFEST_VERSION, SHARED_STORAGE, checksum, decode_commit, encode_commit

from ._fuzz import count, fuzz
from .common import CHUNK, ckpt_name, diff_states, expected_state

SMALL = 1 << 12  # 16 KiB + 8 KiB of tensors: one chunk
BIG = 1_500_000  # 6 MiB + 3 MiB: two 5 MiB chunks
DATA, MANIFEST, COMMIT, LATEST = "rank-00000.data", "rank-00000.manifest", "COMMIT", "latest"
_load_mod = sys.modules["asyncckpt.load"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small/{latest, step-000001, step-000002} and big/{latest, step-000003}."""
    base = tmp_path_factory.mktemp("pristine")
    with asyncckpt.AsyncCheckpointer(chunk_size=CHUNK) as ck:
        for sub, step, numel in (("small", 1, SMALL), ("small", 2, SMALL), ("big", 3, BIG)):
            ck.save(expected_state(step, 0, numel), str(base / sub / ckpt_name(step)), step=step)
            ck.finalize(blocking=True)
    return base


class Case:
    """A fresh copy of one pristine root (on /dev/shm when there is one), removed on exit."""

    def __init__(self, pristine: Path, sub: str = "small") -> None:
        self.pristine = pristine / sub
        self.numel = BIG if sub == "big" else SMALL
        parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.tmp = tempfile.mkdtemp(prefix="torture-corrupt-", dir=parent)
        self.root = Path(self.tmp) / sub
        shutil.copytree(self.pristine, self.root)
        self.step = 3 if sub == "big" else 2
        self.ckpt = self.root / ckpt_name(self.step)

    def __enter__(self) -> Case:
        return self

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def file(self, name: str) -> Path:
        return self.root / name if name == LATEST else self.ckpt / name

    def load_path(self, name: str) -> Path:
        return self.root if name == LATEST else self.ckpt  # `latest` is followed when loading the root

    def fix_commit(self) -> None:
        """Rewrite COMMIT's reference to the (edited) manifest: a forged, self-consistent checkpoint."""
        blob = self.file(MANIFEST).read_bytes()
        rec = decode_commit(self.file(COMMIT).read_bytes(), "COMMIT")
        ref = msgspec.structs.replace(rec.manifests[0], nbytes=len(blob), checksum=checksum(blob))
        self.file(COMMIT).write_bytes(encode_commit(msgspec.structs.replace(rec, manifests=[ref])))


class _AllocWatch:
    """Wraps ``np`` inside asyncckpt.load: records every ``np.empty`` size requested."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    def empty(self, shape: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        n = int(np.prod(shape)) if not isinstance(shape, int) else shape
        self.sizes.append(n)
        return np.empty(shape, *args, **kwargs)


def load_watched(path: Path, **kwargs: Any) -> tuple[Any, BaseException | None, list[int]]:
    """Load; return (result, CheckpointError or None, allocation sizes). Other exceptions propagate."""
    watch = _AllocWatch()
    _load_mod.np = watch
    try:
        return asyncckpt.load(path, **kwargs), None, watch.sizes
    except CheckpointError as exc:
        return None, exc, watch.sizes
    finally:
        _load_mod.np = np


def _largest_file(root: Path) -> int:
    return max((p.stat().st_size for p in root.rglob("*") if p.is_file()), default=0)


def assert_refused(case: Case, path: Path, *names: str, key: bool = False) -> BaseException:
    """``load(path)`` raises IntegrityError naming one of ``names`` (and a key), allocating nothing unchecked."""
    _, err, sizes = load_watched(path)
    assert err is not None, f"corruption of {names} was not detected: load returned data"
    assert isinstance(err, IntegrityError), f"{type(err).__name__} instead of IntegrityError: {err}"
    msg = str(err)
    assert any(n in msg for n in names), f"error does not name {names}: {msg}"
    if key:
        assert "key" in msg, f"error does not name the key: {msg}"
    assert max(sizes, default=0) <= _largest_file(case.root), f"allocated {max(sizes)} bytes from an unchecked size"
    return err


def assert_record_refused(case: Case, name: str) -> None:
    """COMMIT and ``latest`` carry their own CRC32C: any damage is an IntegrityError naming the record."""
    _, err, sizes = load_watched(case.load_path(name))
    assert err is not None, f"a damaged {name} was accepted: load returned data"
    assert isinstance(err, IntegrityError), f"{type(err).__name__} instead of IntegrityError: {err}"
    assert name in str(err), f"error does not name {name}: {err}"
    assert max(sizes, default=0) <= _largest_file(case.root)


_FILES = st.sampled_from([DATA, DATA, MANIFEST, COMMIT, LATEST])


@fuzz()
@given(data=st.data())
def test_byte_flips(pristine: Path, data: st.DataObject) -> None:
    name = data.draw(_FILES)
    sub = data.draw(st.sampled_from(["small", "big"])) if name == DATA else "small"
    with Case(pristine, sub) as case:
        f = case.file(name)
        raw = bytearray(f.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        assume(bytes(raw) != f.read_bytes())
        f.write_bytes(bytes(raw))
        count(f"byte flips in {name}")
        if name == DATA:
            err = assert_refused(case, case.ckpt, DATA, key=True)
            assert "checksum mismatch" in str(err) and "affected keys" in str(err)
        elif name == MANIFEST:
            assert_refused(case, case.ckpt, MANIFEST)
        else:
            assert_record_refused(case, name)


@fuzz()
@given(data=st.data())
def test_truncation(pristine: Path, data: st.DataObject) -> None:
    name = data.draw(_FILES)
    with Case(pristine) as case:
        f = case.file(name)
        raw = f.read_bytes()
        f.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        count(f"truncation of {name}")
        if name in (DATA, MANIFEST):
            assert_refused(case, case.ckpt, name)
        else:
            assert_record_refused(case, name)


@fuzz()
@given(data=st.data())
def test_extension(pristine: Path, data: st.DataObject) -> None:
    name = data.draw(_FILES)
    with Case(pristine) as case:
        f = case.file(name)
        f.write_bytes(f.read_bytes() + data.draw(st.binary(min_size=1, max_size=4096)))
        count(f"extension of {name}")
        if name in (DATA, MANIFEST):
            err = assert_refused(case, case.ckpt, name)
            if name == DATA:
                assert "extended" in str(err)
        else:
            assert_record_refused(case, name)


@fuzz(examples=20)
@given(data=st.data())
def test_swapped_files(pristine: Path, data: st.DataObject) -> None:
    """Files of step-000001 put into step-000002 (same sizes, other bytes): refused, unless all of them are.

    A checkpoint's name is not bound into its records (a renamed, copied or symlinked checkpoint
    loads), so all three files copied over are a copy of step-000001, which loads as step 1. COMMIT
    and manifest without the data are step-000001's records over step-000002's data: the data
    fails the manifest's chunk checksums, and the error names the data file.
    """
    swap = data.draw(st.sets(st.sampled_from([DATA, MANIFEST, COMMIT]), min_size=1))
    with Case(pristine) as case:
        other = case.root / ckpt_name(1)
        for name in swap:
            shutil.copyfile(other / name, case.ckpt / name)
        count("swapped files")
        if swap == {DATA, MANIFEST, COMMIT}:
            assert not diff_states(asyncckpt.load(case.ckpt), expected_state(1, 0, case.numel))
        elif swap == {MANIFEST, COMMIT}:
            assert_refused(case, case.ckpt, DATA, key=True)
        else:
            assert_refused(case, case.ckpt, *swap)


def test_swapped_data_with_same_size_is_caught_by_checksums(pristine: Path) -> None:
    with Case(pristine) as case:
        a, b = case.file(DATA).stat().st_size, (case.root / ckpt_name(1) / DATA).stat().st_size
        assert a == b
        shutil.copyfile(case.root / ckpt_name(1) / DATA, case.file(DATA))
        assert_refused(case, case.ckpt, DATA, key=True)


# -- manifest edits ----------------------------------------------------------------------------------
def _manifest(case: Case) -> dict[str, Any]:
    return msgspec.msgpack.decode(case.file(MANIFEST).read_bytes())


def _write_manifest(case: Case, m: Any, fix: bool) -> None:
    case.file(MANIFEST).write_bytes(msgspec.msgpack.encode(m))
    if fix:
        case.fix_commit()


_I64 = st.one_of(
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.sampled_from([0, 1, -1, 63, 64, 4096, 10**15, 4 * 10**15, (1 << 63) - 1, (1 << 64) - 1]),
)
_SHAPES = st.lists(st.one_of(st.integers(0, 5000), _I64), max_size=70)
_DTYPES = st.one_of(
    st.sampled_from(["float32", "float64", "bfloat16", "int8", "bool", "complex64", "<f4", "<f8", "|u1", "O",
                     "object", "V8", "<U4", "i4,i4", "(2,)f4", "i4,(", "bytes", "float8_e4m3fn", ""]),
    st.text(max_size=12),
)
_ENTRY_FIELDS = {
    "shape": _SHAPES,
    "dtype": _DTYPES,
    "offset": _I64,
    "nbytes": _I64,
    "kind": st.sampled_from(["tensor", "ndarray", "pickle", "module", ""]),
    "key": st.text(max_size=20),
}
_TOP_FIELDS = {
    "version": st.one_of(st.integers(-5, 5), _I64),
    "format": st.sampled_from(["asyncckpt", "asyncckpx", "", "dcp"]),
    "data_nbytes": _I64,
    "chunk_size": _I64,
    "checksum_algo": st.sampled_from(["crc32c", "crc32", "sha256", ""]),
    "chunk_checksums": st.lists(st.integers(0, (1 << 32) - 1), max_size=4),
    "name": st.sampled_from([ckpt_name(1), ckpt_name(2), "../x", ""]),
    "rank": st.integers(-2, 3),
    "data_file": st.sampled_from([
        f"{ckpt_name(1)}/{DATA}", f"{ckpt_name(2)}/{MANIFEST}", "latest", "../outside", "/etc/passwd",
        f"{ckpt_name(2)}/../../x", "a\x00b", "", ckpt_name(2),
    ]),
}


def reference_read(case: Case, m: dict[str, Any], result: Any) -> list[str]:
    """An independent reader: every value of ``result`` is exactly what the (edited) manifest describes."""
    raw = (case.root / m["data_file"]).read_bytes()
    problems: list[str] = []

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        t = node["type"]
        if t == "ref":
            e = m["entries"][node["index"]]
            want = raw[e["offset"] : e["offset"] + e["nbytes"]]
            if isinstance(value, torch.Tensor):
                got = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
                shape = list(value.shape)
            elif isinstance(value, np.ndarray):
                got, shape = value.tobytes(), list(value.shape)
            else:
                problems.append(f"{path}: {type(value).__name__} for a {e['kind']} entry")
                return
            if got != want or shape != list(e["shape"]):
                problems.append(f"{path}: bytes/shape differ from the manifest's description")
        elif t == "dict":
            for k, v in zip(node["keys"], node["values"]):
                walk(v, value[k], f"{path}/{k}")
        elif t == "list":
            for i, v in enumerate(node["items"]):
                walk(v, value[i], f"{path}/{i}")

    walk(m["tree"], result, "")
    return problems


def _check_edit(case: Case, m: dict[str, Any], fix: bool, what: str) -> None:
    original = _manifest(case)
    assume(m != original)
    _write_manifest(case, m, fix)
    count(f"manifest edit ({'fixed-up commit' if fix else 'raw'})")
    if not fix:
        assert_refused(case, case.ckpt, MANIFEST)
        return
    got, err, sizes = load_watched(case.ckpt)
    assert max(sizes, default=0) <= _largest_file(case.root), f"{what}: allocated {max(sizes)} bytes unchecked"
    if err is None:
        count("manifest edit (fixed-up commit): consistent forgery loaded")
        problems = reference_read(case, m, got)
        assert not problems, f"{what}: load returned data the manifest does not describe: {problems}"
        return
    if isinstance(err, BadInputError):  # the pickle refusal (no opt-in)
        assert any(e.get("kind") == "pickle" for e in m["entries"]) and "allow_pickle" in str(err), repr(err)
        return
    assert isinstance(err, IntegrityError), f"{what}: {type(err).__name__}: {err}"
    named = (MANIFEST, DATA, "storage key", f"{case.root}/{m.get('data_file')}")
    assert any(n in str(err) for n in named), f"{what}: error names no file: {err}"


@fuzz()
@given(data=st.data())
def test_manifest_entry_edits(pristine: Path, data: st.DataObject) -> None:
    fix = data.draw(st.booleans())
    with Case(pristine) as case:
        m = _manifest(case)
        i = data.draw(st.integers(0, len(m["entries"]) - 1))
        fld = data.draw(st.sampled_from(sorted(_ENTRY_FIELDS)))
        m["entries"][i][fld] = data.draw(_ENTRY_FIELDS[fld])
        _check_edit(case, m, fix, f"entries[{i}].{fld}={m['entries'][i][fld]!r}")


@fuzz()
@given(data=st.data())
def test_manifest_top_level_edits(pristine: Path, data: st.DataObject) -> None:
    fix = data.draw(st.booleans())
    with Case(pristine) as case:
        m = _manifest(case)
        fld = data.draw(st.sampled_from(sorted(_TOP_FIELDS)))
        m[fld] = data.draw(_TOP_FIELDS[fld])
        _check_edit(case, m, fix, f"{fld}={m[fld]!r}")


_NODES = st.recursive(
    st.one_of(
        st.builds(lambda v: {"type": "value", "value": v}, st.one_of(st.none(), st.booleans(), st.integers(-9, 9), st.text(max_size=3))),
        st.builds(lambda i: {"type": "ref", "index": i}, st.integers(-2, 8)),
        st.builds(lambda v: {"type": "bigint", "value": v}, st.text(max_size=5)),
        st.just({"type": "nope"}),
    ),
    lambda kids: st.one_of(
        st.builds(lambda xs: {"type": "list", "items": xs}, st.lists(kids, max_size=4)),
        st.builds(lambda ks, vs: {"type": "dict", "keys": ks, "values": vs},
                  st.lists(st.one_of(st.text(max_size=3), st.integers(0, 3)), max_size=4), st.lists(kids, max_size=4)),
    ),
    max_leaves=12,
)


@fuzz()
@given(data=st.data())
def test_manifest_tree_edits(pristine: Path, data: st.DataObject) -> None:
    """A forged value tree: bad references, reused entries, unknown nodes — FormatError or exact data."""
    with Case(pristine) as case:
        m = _manifest(case)
        m["tree"] = data.draw(_NODES)
        _check_edit(case, m, True, f"tree={m['tree']!r}")


@fuzz()
@given(data=st.data())
def test_random_manifest_bytes(pristine: Path, data: st.DataObject) -> None:
    with Case(pristine) as case:
        case.file(MANIFEST).write_bytes(data.draw(st.binary(max_size=2048)))
        case.fix_commit()
        count("random manifest bytes (fixed-up commit)")
        assert_refused(case, case.ckpt, MANIFEST)


# -- targeted cases that must be refused even with the commit record fixed up ------------------------
def _edit_entry(m: dict[str, Any], key: str, **changes: Any) -> None:
    for e in m["entries"]:
        if e["key"] == key:
            e.update(changes)
            return
    raise AssertionError(key)


def _index(m: dict[str, Any], key: str) -> int:
    return next(i for i, e in enumerate(m["entries"]) if e["key"] == key)


HUGE = 10**15
TARGETED = {
    "shape with more elements": lambda m: _edit_entry(m, "model/w", shape=[SMALL + 1]),
    "dtype of another size": lambda m: _edit_entry(m, "model/w", dtype="float64"),
    "unknown dtype": lambda m: _edit_entry(m, "model/w", dtype="float33"),
    "object ndarray dtype": lambda m: _edit_entry(m, "extra", dtype="O"),
    "offset past the end": lambda m: _edit_entry(m, "model/w", offset=m["data_nbytes"]),
    "negative offset": lambda m: _edit_entry(m, "model/w", offset=-64),
    "overlapping entries": lambda m: _edit_entry(m, "model/b", offset=0),
    "nbytes not matching the shape": lambda m: _edit_entry(m, "model/w", nbytes=SMALL * 4 - 4),
    "10^15 elements": lambda m: _edit_entry(m, "model/w", shape=[HUGE]),
    "10^15 elements, nbytes to match": lambda m: _edit_entry(m, "model/w", shape=[HUGE], nbytes=4 * HUGE),
    "10^15 elements, data size to match": lambda m: _huge_last(m, [HUGE]),
    "10^15 elements in a 2-D shape": lambda m: _huge_last(m, [HUGE // 1000, 1000]),
    "2^60 elements": lambda m: _huge_last(m, [1 << 60]),
    "dtype string numpy cannot parse": lambda m: _edit_entry(m, "extra", dtype="i4,("),
    "empty data file name": lambda m: m.update(data_file=""),
    "65 dimensions": lambda m: _edit_entry(m, "model/w", shape=[1] * 65),
    "negative dimension": lambda m: _edit_entry(m, "model/w", shape=[-SMALL], nbytes=4 * SMALL),
    "chunk checksum changed": lambda m: m["chunk_checksums"].__setitem__(0, m["chunk_checksums"][0] ^ 1),
    "chunk checksum missing": lambda m: m.update(chunk_checksums=[]),
    "version newer than known": lambda m: m.update(version=MANIFEST_VERSION + 1),
    "unknown feature": lambda m: m.update(version=MANIFEST_VERSION, features=["zstd-chunks"]),
    "feature in a version 1 manifest": lambda m: m.update(version=1, features=[SHARED_STORAGE]),
    "view without its feature": lambda m: _edit_entry(m, "model/b", view_of=0, stride=[1], storage_offset=0),
    "view of an entry that is no storage": lambda m: (
        m.update(version=MANIFEST_VERSION, features=[SHARED_STORAGE]),
        _edit_entry(m, "model/b", view_of=_index(m, "model/w"), stride=[1], storage_offset=0)),
    "version 0": lambda m: m.update(version=0),
    "other format": lambda m: m.update(format="safetensors"),
    "checksum algorithm": lambda m: m.update(checksum_algo="md5"),
    "chunk size 0": lambda m: m.update(chunk_size=0),
    "data size larger than the file": lambda m: m.update(data_nbytes=m["data_nbytes"] + 64,
                                                         chunk_size=m["data_nbytes"] + 64),
    "other rank": lambda m: m.update(rank=1),
    "other checkpoint's name": lambda m: m.update(name=ckpt_name(1)),
    "data file outside the root": lambda m: m.update(data_file="../../outside.data"),
    "absolute data file": lambda m: m.update(data_file="/etc/passwd"),
    "data file with NUL": lambda m: m.update(data_file=f"{ckpt_name(2)}/x\x00y"),
    "reference out of range": lambda m: m.update(tree={"type": "ref", "index": 99}),
    "reference used twice": lambda m: m.update(tree={"type": "list", "items": [{"type": "ref", "index": 0}] * 2}),
    "deep tree": lambda m: m.update(tree=_deep(3000)),
    "deep tree (100000 levels)": lambda m: m.update(tree=_deep(100_000)),
    "missing field": lambda m: m.pop("entries"),
    "wrong type": lambda m: m.update(entries="nope"),
}


#: inconsistencies inside one entry: the error names its key (the others are about a whole file)
NAMES_KEY = {"shape with more elements", "dtype of another size", "unknown dtype", "object ndarray dtype",
             "offset past the end", "negative offset", "overlapping entries", "nbytes not matching the shape",
             "10^15 elements", "10^15 elements, nbytes to match", "65 dimensions", "negative dimension",
             "dtype string numpy cannot parse"}


def _huge_last(m: dict[str, Any], shape: list[int]) -> None:
    """The entry at the end of the data file claims ``shape``; sizes and the chunk list agree with it.

    Nothing in the manifest is inconsistent but the data file's size on disk: the load must
    check that before it reserves memory for the entry.
    """
    e = max(m["entries"], key=lambda e: e["offset"])
    itemsize = np.dtype(e["dtype"]).itemsize if e["kind"] == "ndarray" else 1
    numel = int(np.prod(shape, dtype=object))
    e.update(shape=shape, nbytes=numel * itemsize)
    m.update(data_nbytes=e["offset"] + e["nbytes"], chunk_size=e["offset"] + e["nbytes"],
             chunk_checksums=m["chunk_checksums"][:1])


_TREE_MARK = "@@tree@@"


def _deep(n: int) -> str:
    """A marker that :func:`_encode` replaces by ``n`` nested list nodes (msgspec cannot encode them)."""
    return _TREE_MARK + str(n)


def _encode(m: dict[str, Any]) -> bytes:
    tree = m["tree"]
    if not (isinstance(tree, str) and tree.startswith(_TREE_MARK)):
        return msgspec.msgpack.encode(m)
    n = int(tree[len(_TREE_MARK):])
    blob = msgspec.msgpack.encode({**m, "tree": _TREE_MARK})
    mark = msgspec.msgpack.encode(_TREE_MARK)
    head = msgspec.msgpack.encode({"type": "list", "items": [None]})[:-1]  # ends with a 1-item array header
    leaf = msgspec.msgpack.encode({"type": "value", "value": 1})
    return blob.replace(mark, head * n + leaf)


@pytest.mark.parametrize("what", sorted(TARGETED))
def test_inconsistent_manifest_is_refused(pristine: Path, what: str) -> None:
    with Case(pristine) as case:
        m = _manifest(case)
        TARGETED[what](m)
        case.file(MANIFEST).write_bytes(_encode(m))
        case.fix_commit()
        count("targeted manifest edits (fixed-up commit)")
        err = assert_refused(case, case.ckpt, MANIFEST, DATA, "storage key")
        if what in NAMES_KEY:
            assert "key" in str(err), f"{what}: the error does not name the key: {err}"

