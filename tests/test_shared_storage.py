"""Issue 11 item 4 on the native path: tensors that share one storage are written once and load back
sharing one storage, with their offsets and strides (load, load(into=...), the manager, export)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import cli
from asyncckpt.format import (
    COMMIT_FILE,
    FORMAT_VERSION,
    checksum,
    decode_commit,
    decode_manifest,
    encode_commit,
    encode_manifest,
    manifest_file,
)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(500, 64)
        self.head = torch.nn.Linear(64, 500, bias=False)
        self.head.weight = self.emb.weight  # tied: one Parameter under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def _state(big: bool) -> tuple[dict[str, torch.Tensor], int]:
    """A state of tied weights and views of one flat buffer; returns it and its bytes counted once."""
    torch.manual_seed(0)
    model = Tied()
    n = (3 << 20) if big else 4096  # big: 12 MiB, copied by the worker; small: copied by save() itself
    flat = torch.randn(n)
    raw = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    col = torch.arange(64.0)
    state = {
        **model.state_dict(),  # emb.weight and head.weight: two tensors, one storage
        "a": flat[: n // 2],
        "b": flat[n // 2 :].view(-1, 64),  # storage offset n/2
        "t": flat[64 : 64 + 64 * 32].view(32, 64).t(),  # transposed: strides (1, 64)
        "step3": flat[7::3],  # strided, odd offset
        "f16": raw[:1024].view(torch.float16),  # two dtypes over one byte storage
        "i32": raw[1024:].view(torch.int32).view(-1, 4),
        "bcast": col.expand(8, 64),  # stride 0 ...
        "col": col,  # ... over the storage of this one
        "alone": torch.ones(10),  # shares with nobody
    }
    unique = 500 * 64 * 4 + n * 4 + 4096 + 64 * 4 + 10 * 4
    return state, unique


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(_INT[a.element_size()]), b.view(_INT[b.element_size()]))


def _check_same(out: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    for k, v in state.items():
        o = out[k]
        assert o.shape == v.shape and _same_bits(o, v), k
        assert o.stride() == v.stride() and o.storage_offset() == v.storage_offset(), k
    # Exactly the pairs that shared a storage at save() share one after load.
    for k1, v1 in state.items():
        for k2, v2 in state.items():
            assert (_ptr(out[k1]) == _ptr(out[k2])) == (_ptr(v1) == _ptr(v2)), (k1, k2)


@pytest.mark.parametrize("big", [False, True], ids=["copied-by-save", "copied-by-worker"])
def test_shared_storages_are_written_once_and_load_back_shared(shared_ckpt, tmp_path, big):
    state, unique = _state(big)
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    out = asyncckpt.load(tmp_path / "c")
    _check_same(out, state)
    assert _ptr(out["emb.weight"]) == _ptr(out["head.weight"])
    assert _ptr(out["a"]) == _ptr(out["b"]) == _ptr(out["t"]) == _ptr(out["step3"])
    assert out["b"].storage_offset() == state["a"].numel() and out["t"].stride() == (1, 64)
    size = (tmp_path / "c" / "rank-00000.data").stat().st_size
    assert unique <= size < unique + 64 * len(state), "each storage's bytes are on disk once"
    separately = sum(v.numel() * v.element_size() for v in state.values())
    assert size < separately


def test_map_location_moves_each_storage_once_and_keeps_the_sharing(shared_ckpt, tmp_path):
    state, _ = _state(big=False)
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    out = asyncckpt.load(tmp_path / "c", map_location="meta")  # a device every machine has (CUDA: test_cuda.py)
    for k, v in state.items():
        assert out[k].device.type == "meta" and out[k].shape == v.shape and out[k].stride() == v.stride(), k
        assert out[k].storage_offset() == v.storage_offset(), k
    # meta storages have no address: torch keeps one Python object per storage, so identity tells
    assert out["a"].untyped_storage() is out["b"].untyped_storage()
    assert out["emb.weight"].untyped_storage() is out["head.weight"].untyped_storage()
    assert out["a"].untyped_storage() is not out["alone"].untyped_storage()


def test_only_the_selected_keys_are_read_and_still_share(shared_ckpt, tmp_path):
    state, _ = _state(big=False)
    shared_ckpt.save({"x": state, "y": {"other": torch.zeros(3)}}, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    out = asyncckpt.load(tmp_path / "c", keys=["x"])
    assert set(out) == {"x"}
    _check_same(out["x"], state)


def test_a_state_without_shared_storages_keeps_format_version_1(shared_ckpt, tmp_path):
    shared_ckpt.save({"a": torch.ones(3), "b": torch.zeros(100_000)}, tmp_path / "plain")
    state, _ = _state(big=False)
    shared_ckpt.save(state, tmp_path / "tied")
    shared_ckpt.finalize(blocking=True)
    plain = decode_manifest((tmp_path / "plain" / manifest_file(0)).read_bytes(), "plain")
    tied = decode_manifest((tmp_path / "tied" / manifest_file(0)).read_bytes(), "tied")
    assert (plain.version, plain.features) == (1, [])  # readable by every earlier asyncckpt
    assert (tied.version, tied.features) == (2, ["shared-storage"])  # earlier readers refuse version 2
    assert decode_commit((tmp_path / "tied" / COMMIT_FILE).read_bytes(), "c").version == FORMAT_VERSION


def _rewrite_manifest(ckpt, **changes) -> None:  # type: ignore[no-untyped-def]
    """Change the rank-0 manifest and re-seal the commit record around it (as a newer writer would)."""
    mpath, cpath = ckpt / manifest_file(0), ckpt / COMMIT_FILE
    m = msgspec.structs.replace(decode_manifest(mpath.read_bytes(), "m"), **changes)
    blob = encode_manifest(m)
    mpath.write_bytes(blob)
    rec = decode_commit(cpath.read_bytes(), "c")
    ref = msgspec.structs.replace(rec.manifests[0], nbytes=len(blob), checksum=checksum(blob))
    cpath.write_bytes(encode_commit(msgspec.structs.replace(rec, manifests=[ref])))


def test_a_feature_this_reader_does_not_know_is_refused_by_name(shared_ckpt, tmp_path):
    state, _ = _state(big=False)
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    _rewrite_manifest(tmp_path / "c", features=["shared-storage", "zstd-chunks"])
    with pytest.raises(asyncckpt.FormatError, match=r"'zstd-chunks'.*upgrade asyncckpt"):
        asyncckpt.load(tmp_path / "c")


def test_views_without_the_feature_declared_are_refused_not_misread(shared_ckpt, tmp_path):
    state, _ = _state(big=False)
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    _rewrite_manifest(tmp_path / "c", version=1, features=[])
    with pytest.raises(asyncckpt.FormatError, match="shared-storage"):
        asyncckpt.load(tmp_path / "c")


def test_a_view_reaching_past_its_storage_is_refused(shared_ckpt, tmp_path):
    state, _ = _state(big=False)
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    m = decode_manifest((tmp_path / "c" / manifest_file(0)).read_bytes(), "m")
    i = next(i for i, e in enumerate(m.entries) if e.key == "b")
    entries = list(m.entries)
    entries[i] = msgspec.structs.replace(entries[i], storage_offset=entries[i].storage_offset + 10**6)
    _rewrite_manifest(tmp_path / "c", entries=entries)
    with pytest.raises(asyncckpt.FormatError, match=r"key 'b'.*reaches byte"):
        asyncckpt.load(tmp_path / "c")


def test_load_into_copies_into_the_targets_and_keeps_their_ties(shared_ckpt, tmp_path):
    torch.manual_seed(1)
    src = Tied()
    flat = torch.randn(1 << 20)
    shared_ckpt.save({"model": src.state_dict(), "a": flat[:1000], "b": flat[1000:].view(-1, 8)}, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    dst = Tied()
    buf = torch.zeros(1 << 20)
    target = {"model": dst, "a": buf[:1000], "b": buf[1000:].view(-1, 8)}
    asyncckpt.load(tmp_path / "c", into=target)
    assert dst.head.weight is dst.emb.weight  # still tied: the target's own business, kept
    assert torch.equal(dst.emb.weight, src.emb.weight)
    assert torch.equal(buf, flat)  # copied into the target tensors (views of the target's buffer)


def test_the_manager_saves_tied_weights_once_and_restores_them(tmp_path):
    torch.manual_seed(2)
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, signals=None) as mgr:
        mgr.save(1, {"model": model, "optim": opt})
        mgr.wait()
    out = asyncckpt.load(tmp_path)
    assert _ptr(out["model"]["emb.weight"]) == _ptr(out["model"]["head.weight"])
    size = next(tmp_path.glob("*/rank-00000.data")).stat().st_size
    assert size < 2 * 500 * 64 * 4
    fresh = Tied()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    with asyncckpt.CheckpointManager(tmp_path, signals=None) as mgr:
        assert mgr.restore({"model": fresh, "optim": fresh_opt}) == 1
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, model.emb.weight)


def test_a_change_through_the_shared_buffer_is_caught_by_the_guard(tmp_path):
    flat = torch.zeros(8 << 20)  # 32 MiB, copied by the worker
    state = {"a": flat[: 4 << 20], "b": flat[4 << 20 :].view(-1, 1024)}
    torn = 0
    with asyncckpt.AsyncCheckpointer(snapshot="lazy") as ck:
        ck.save(state, tmp_path / "warm")  # moves the buffer to shared memory
        ck.finalize(blocking=True)
        handles = []
        expected = {}
        for i in range(20):
            name = f"s{i}"
            expected[name] = flat.clone()
            handles.append(ck.save(state, tmp_path / name))
            flat.add_(1.0)  # through the buffer, which neither saved tensor is: a view shares its counter
            try:
                ck.finalize(blocking=True)
            except asyncckpt.TornSnapshotError as exc:
                torn += 1
                assert set(exc.keys) <= {"a", "b"} and exc.keys
                assert not (tmp_path / name / COMMIT_FILE).exists()
            if torn:
                break
    assert torn == 1, "32 MiB changed right after a lazy save(): the guard must catch it at least once in 20"
    for h in handles:
        if h is not None and h.committed:
            out = asyncckpt.load(tmp_path / h.name)
            assert torch.equal(out["a"], expected[h.name][: 4 << 20]) and _ptr(out["a"]) == _ptr(out["b"])


def test_export_to_pt_keeps_ties_and_safetensors_writes_copies(capsys, shared_ckpt, tmp_path):
    state, unique = _state(big=False)
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    assert cli.main(["export", str(tmp_path / "c"), "--to", str(tmp_path / "m.pt")]) == 0
    err = capsys.readouterr().err
    pt = torch.load(tmp_path / "m.pt", weights_only=True)
    mixed = {"f16", "i32"}  # one byte storage seen as two dtypes: torch.save refuses that, so copies
    assert "torch.save cannot" in err and "f16" in err and "i32" in err
    _check_same({k: v for k, v in pt.items() if k not in mixed}, {k: v for k, v in state.items() if k not in mixed})
    assert all(_same_bits(pt[k], state[k]) for k in mixed) and _ptr(pt["f16"]) != _ptr(pt["i32"])
    assert (tmp_path / "m.pt").stat().st_size < unique + 16384  # torch.save writes each storage once too
    assert cli.main(["export", str(tmp_path / "c"), "--to", str(tmp_path / "m.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "safetensors cannot share storage" in err and "own copy" in err
    st = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert all(st[k].shape == v.shape and _same_bits(st[k], v) for k, v in state.items())
    assert _ptr(st["emb.weight"]) != _ptr(st["head.weight"])  # documented: copies, not ties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(view_of=st.integers(0, 6), stride=st.lists(st.integers(-2, 70), max_size=3),
       shape=st.lists(st.integers(0, 70), max_size=3), storage_offset=st.integers(-2, 5000),
       which=st.sampled_from(["a", "b"]))
def test_forged_view_geometry_is_refused_or_read_exactly(shared_ckpt, tmp_path_factory, view_of, stride, shape,
                                                         storage_offset, which):
    """Whatever a (re-sealed) manifest claims about a view, load refuses it by name or returns exactly the
    elements it describes; it never reads outside the stored storage."""
    d = tmp_path_factory.mktemp("forged")
    flat = torch.arange(1024, dtype=torch.float32)
    shared_ckpt.save({"a": flat[:512], "b": flat[512:].view(64, 8), "c": torch.ones(4)}, d / "c")
    shared_ckpt.finalize(blocking=True)
    m = decode_manifest((d / "c" / manifest_file(0)).read_bytes(), "m")
    i = next(i for i, e in enumerate(m.entries) if e.key == which)
    numel = 1
    for n in shape:
        numel *= n
    entries = list(m.entries)
    entries[i] = msgspec.structs.replace(entries[i], view_of=view_of, stride=stride, shape=shape,
                                         storage_offset=storage_offset, nbytes=numel * 4)
    _rewrite_manifest(d / "c", entries=entries)
    try:
        out = asyncckpt.load(d / "c")
    except asyncckpt.FormatError as exc:
        assert repr(which) in str(exc) or "entry" in str(exc), exc
        return
    v = out[which]
    base = np.frombuffer(flat.numpy().tobytes(), dtype=np.float32)  # the stored storage, independently
    want = np.lib.stride_tricks.as_strided(base[storage_offset:], shape=shape, strides=[s * 4 for s in stride])
    assert list(v.shape) == shape and np.array_equal(v.numpy(), want)
