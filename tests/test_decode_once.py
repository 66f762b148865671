"""The worker decodes a layout, and a manifest it wrote, once (issue 13): a state of many tensors
sends the same layout bytes with every save, and its commit, retention and deletion read the same
few manifests back. Caching by exact bytes must never let other bytes through unchecked."""

from __future__ import annotations

import collections
import pickle

import msgspec
import pytest
import torch

import asyncckpt
from asyncckpt.errors import FormatError
from asyncckpt.format import records
from asyncckpt.format.memo import DecodedCache
from asyncckpt.plan import Packed, PackedTree, PlanCache, decode_packed, plan_state


def _manifest(n: int) -> records.RankManifest:
    entries = [records.Entry(key=f"t{i}", kind="tensor", dtype="float32", shape=[4], offset=16 * i, nbytes=16)
               for i in range(n)]
    tree = records.DictNode(keys=[e.key for e in entries], values=[records.RefNode(i) for i in range(n)])
    return records.RankManifest(format=records.FORMAT_NAME, version=1, name="step-1", rank=0, world_size=1, step=1,
                                data_file="step-1/rank-00000.data", data_nbytes=16 * n, chunk_size=1 << 20,
                                checksum_algo=records.CHECKSUM_ALGO, chunk_checksums=[0], entries=entries, tree=tree)


def test_same_bytes_decode_to_the_same_manifest_and_other_bytes_are_checked() -> None:
    m = _manifest(100)
    blob = records.encode_manifest(m)
    assert records.decode_manifest(bytes(blob), "a") is records.decode_manifest(bytes(blob), "b")
    own = msgspec.structs.replace(m, step=2)
    own_blob = records.encode_manifest(own)
    records.remember_manifest(own_blob, own)  # what a writer declares as its own comes back as it is
    assert records.decode_manifest(bytes(own_blob), "c") is own
    # One entry past the data file's end: bytes never seen before are decoded and checked again.
    bad = msgspec.structs.replace(_manifest(100), data_nbytes=16 * 99)
    bad_blob = msgspec.msgpack.encode(bad)
    with pytest.raises(FormatError, match="outside the data file"):
        records.decode_manifest(bad_blob, "damaged")
    with pytest.raises(FormatError, match="outside the data file"):
        records.decode_manifest(bad_blob, "damaged")  # a failure is never remembered
    with pytest.raises(FormatError, match="malformed"):
        records.decode_manifest(blob[:-3], "truncated")


def test_the_cache_is_bounded_by_the_bytes_of_its_keys() -> None:
    cache: DecodedCache[int] = DecodedCache(1000)
    for i in range(10):
        cache.put(bytes([i]) * 200, i, 200)
    assert cache.nbytes == 1000 and len(cache) == 5  # the oldest went first
    assert cache.get(bytes([9]) * 200) == 9 and cache.get(bytes([4]) * 200) is None
    cache.get(bytes([5]) * 200)  # used: now the newest
    cache.put(b"x" * 200, -1, 200)
    assert bytes([5]) * 200 in cache and bytes([6]) * 200 not in cache
    cache.put(b"y" * 251, -2, 251)  # over a quarter of the limit: never kept
    assert b"y" * 251 not in cache and cache.nbytes == 1000


def test_packed_layouts_decode_once_per_bytes() -> None:
    entries = _manifest(50).entries
    first = decode_packed("entries", Packed(entries, "entries").blob)
    assert first == entries and decode_packed("entries", Packed(entries, "entries").blob) is first
    other = decode_packed("entries", Packed(entries[:10], "entries").blob)
    assert other == entries[:10] and other is not first


def test_a_tree_with_a_few_changed_children_travels_as_a_patch() -> None:
    state = {f"w{i}": torch.zeros(2) for i in range(100)}
    state["meta"] = {"step": 1, "lr": 0.5}
    cache = PlanCache()
    first = cache.plan(state).tree
    base = Packed(first, "tree")
    state["meta"] = {"step": 2, "lr": 0.25}
    tree = cache.plan(state).tree
    sent = PackedTree.of(tree, first, base)
    assert isinstance(sent, PackedTree) and [i for i, _ in sent.patches] == [100]
    assert pickle.loads(pickle.dumps(sent)) == tree == plan_state(state, inline_max=0).tree
    assert pickle.loads(pickle.dumps(base)) == first  # the base itself is untouched
    # Most children changed, or another container: the whole tree is sent.
    many = {f"v{i}": float(i) for i in range(10)}
    plain = PlanCache()
    t0 = plain.plan(many).tree
    t1 = plain.plan({k: v + 1 for k, v in many.items()}).tree
    assert isinstance(PackedTree.of(t1, t0, Packed(t0, "tree")), Packed)


@pytest.mark.multiproc
def test_the_worker_decodes_each_layout_and_its_own_manifests_once(tmp_path, monkeypatch) -> None:
    """Ten saves of one structure with retention (keep 2): the entries and the tree's unchanged part are
    decoded once, and no
    manifest is decoded: every one read back (commit, retention, deletion) is one this worker wrote."""
    log = tmp_path / "decodes.txt"
    monkeypatch.setenv("ASYNCCKPT_TEST_DECODES", str(log))
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    state = {f"layer{i}.weight": torch.randn(16) for i in range(2000)}
    opts = {"worker_options": {"preload": ["tests._count_decodes"]}}
    with asyncckpt.CheckpointManager(tmp_path / "ckpts", every_steps=1, keep_last=2, signals=(),
                                     checkpointer_options=opts) as mgr:
        for step in range(1, 11):
            state["layer0.weight"].add_(1.0)
            assert mgr.maybe_save(step, state) is not None
            mgr.wait()
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path / "ckpts")] == [10, 9]
    counts = collections.Counter(log.read_text().split()) if log.exists() else collections.Counter()
    # The tree holds the manager's own values (step, RNG state), so it changes with every save: only its
    # small changed part is sent and decoded again; the 2,000-leaf rest was decoded once.
    assert counts["packed:entries:large"] == 1 and counts["packed:tree:large"] == 1, counts
    assert counts["manifest"] == 0 and counts["packed:tree:small"] >= 9, counts
    got = asyncckpt.load(tmp_path / "ckpts")  # another reader (this process) checks them as before
    assert torch.equal(got["layer0.weight"], state["layer0.weight"])
