"""TorchAsyncCheckpoint: async torch.save readable by plain torch.load(weights_only=True)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import mmap
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import torch_save
from asyncckpt.format.torchzip import record


def test_async_torch_save_is_read_by_torch_load(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.Linear(1024, 8))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 4}
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        done = []
        idx = tac.async_save(state, tmp_path / "model.pt", finalize_fns=[lambda: done.append(1)])
        tac.wait_snapshot()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        assert tac.finalize_async_save(blocking=True) == [idx]
        assert done == [1]
    out = torch.load(tmp_path / "model.pt", weights_only=True)
    assert out["epoch"] == 4
    for k, v in ref.items():
        assert torch.equal(out["model"][k], v)
    assert out["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    m2 = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.Linear(1024, 8))
    m2.load_state_dict(out["model"])


def test_disk_full_is_a_storage_error_naming_the_path_and_leaves_no_temp_file(small_tmpfs):
    target = small_tmpfs / "model.pt"
    torch.save({"w": torch.ones(1000)}, target)
    before = target.read_bytes()
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save({"w": torch.randn(4 << 20)}, target)  # 16 MiB into 8 MiB
        with pytest.raises(asyncckpt.StorageError) as ei:
            tac.finalize_async_save(blocking=True)
    assert ei.value.errno == errno.ENOSPC
    assert str(target) in str(ei.value) and "disk is full" in str(ei.value)
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["model.pt"]  # no model.pt.tmp-* left
    assert target.read_bytes() == before


def test_values_torch_save_pickles_and_file_objects(tmp_path):
    import argparse
    import io

    state = {"args": argparse.Namespace(lr=0.5, name="run"), "size": torch.Size([2, 3]), "w": torch.arange(100000.0)}
    buf = io.BytesIO()
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save(state, buf, pickle_protocol=4)
        tac.async_save(state, tmp_path / "s.pt")
        state["w"].zero_()
        tac.finalize_async_save(blocking=True)
    for src in (io.BytesIO(buf.getvalue()), tmp_path / "s.pt"):
        out = torch.load(src, weights_only=False)
        assert out["args"] == argparse.Namespace(lr=0.5, name="run") and out["size"] == torch.Size([2, 3])
        assert torch.equal(out["w"], torch.arange(100000.0))
    with pytest.raises(Exception, match=r"(?i)weights_only"):
        torch.load(tmp_path / "s.pt", weights_only=True)  # safety lives on the load side


def test_shared_storages_stay_shared_in_the_file(tmp_path):
    emb = torch.nn.Embedding(1000, 64)
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = emb.weight  # tied
    flat = torch.arange(200000.0)
    state = {"emb": emb.weight, "head": head.weight, "a": flat[:100000], "b": flat[100000:].view(1000, 100)}
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save(state, tmp_path / "t.pt")
    out = torch.load(tmp_path / "t.pt", weights_only=True)
    ref = tmp_path / "ref.pt"
    torch.save(state, ref)
    assert out["emb"].untyped_storage().data_ptr() == out["head"].untyped_storage().data_ptr()
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()
    assert out["b"].storage_offset() == 100000 and out["b"].stride() == (100, 1)
    assert abs((tmp_path / "t.pt").stat().st_size - ref.stat().st_size) < 4096  # each storage written once


def _dtypes_torch_save_round_trips(tmp_path) -> list[torch.dtype]:
    """Ask torch.save which plain (not quantized) dtypes of this torch it writes and reads back."""
    out = []
    for d in sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str):
        if "qint" in str(d) or "quint" in str(d):
            continue  # quantized dtypes need a quantizer: a quantized tensor is tested on its own below
        try:
            size = torch.empty((), dtype=d).element_size()
            t = torch.zeros(8 * size, dtype=torch.uint8).view(d)
            torch.save(t, tmp_path / "probe.pt")
            back = torch.load(tmp_path / "probe.pt", weights_only=True)
        except Exception:  # noqa: BLE001 - torch.save itself cannot round-trip this dtype here
            continue
        if back.dtype == d:
            out.append(d)
    return out


def test_every_dtype_torch_save_round_trips(tmp_path):
    dtypes = _dtypes_torch_save_round_trips(tmp_path)
    named = {"float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"}
    assert named <= {str(d).removeprefix("torch.") for d in dtypes}, "the issue's dtypes must be among them"
    gen = torch.Generator().manual_seed(0)
    state = {}
    for d in dtypes:
        size = torch.empty((), dtype=d).element_size()
        state[str(d)] = torch.randint(0, 256, (70000 * size,), dtype=torch.uint8, generator=gen).view(d)  # > 64 KiB
        state[str(d) + "/small"] = torch.randint(0, 256, (8 * size,), dtype=torch.uint8, generator=gen).view(d)
    q = torch.quantize_per_tensor(torch.randn(1000), 0.1, 3, torch.quint8)
    state["quantized"] = q
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save(state, tmp_path / "all.pt")
    out = torch.load(tmp_path / "all.pt", weights_only=True)
    for k, v in state.items():
        if k == "quantized":
            assert torch.equal(out[k].int_repr(), q.int_repr()) and out[k].q_scale() == q.q_scale()
            continue
        assert out[k].dtype == v.dtype, k
        assert torch.equal(out[k].view(torch.uint8), v.view(torch.uint8)), k


def test_async_torch_save_to_missing_dir_is_refused(tmp_path):
    tac = asyncckpt.TorchAsyncCheckpoint()
    try:
        with pytest.raises(asyncckpt.BadInputError, match="does not exist"):
            tac.async_save({"w": torch.ones(1)}, tmp_path / "nope" / "m.pt")
    finally:
        tac.close()


def _o_direct_works(d: Path) -> bool:
    try:
        fd = os.open(d / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    os.unlink(d / "probe")
    return True


def test_large_file_is_torch_saves_bytes_and_loads_every_way(tmp_path):
    base = torch.randn(3 << 20)
    state = {"a": base, "a.t": base[: 1 << 20].view(1024, 1024).t(), "b": torch.randn(5 << 20).to(torch.bfloat16),
             "c": torch.arange(1 << 21), "e": torch.zeros(0), "p": torch.nn.Parameter(torch.ones(3)), "step": 7}
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save(state, tmp_path / "big.pt")
        tac.async_save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
        buf = io.BytesIO()
        tac.async_save(state, buf)
        tac.finalize_async_save(blocking=True)
    want = io.BytesIO()
    torch.save(state, want)
    assert (tmp_path / "big.pt").read_bytes() == want.getvalue() == buf.getvalue()
    legacy = torch.load(tmp_path / "legacy.pt", weights_only=True)  # the legacy format names storages by address
    assert all(torch.equal(legacy[k], state[k]) for k in ("a", "a.t", "b", "c", "e", "p"))
    for kw in ({"weights_only": True}, {"weights_only": True, "mmap": True}):
        out = torch.load(tmp_path / "big.pt", **kw)
        assert out["a.t"].untyped_storage().data_ptr() == out["a"].untyped_storage().data_ptr()  # still shared
        assert torch.equal(out["a.t"], state["a.t"])
        assert all(torch.equal(out[k], state[k]) for k in ("a", "b", "c", "e", "p"))


def test_worker_writes_tensor_bytes_from_the_slot_with_o_direct(tmp_path, monkeypatch):
    """The .pt path's data path, in process: no copy of tensor bytes in Python, O_DIRECT from the slot."""
    if not _o_direct_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    state = {f"w{i}": torch.randn((1 << 20) + 17 * i) for i in range(5)}  # 20 MiB: a file written with O_DIRECT
    path = str(tmp_path / "m.pt")
    bases = [torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()) for t in state.values()]
    layout, nbytes = torch_save.slot_layout(bases, torch_save.file_offsets(path, bases, state, {}))
    slot = mmap.mmap(-1, nbytes)
    view = memoryview(slot)
    rebuilt = {}
    for (k, t), (off, n) in zip(state.items(), layout):
        view[off : off + n] = t.numpy().tobytes()
        rebuilt[k] = torch.frombuffer(view[off : off + n], dtype=t.dtype)
    zf = record(rebuilt, view)
    assert sum(p.length for p in zf.pieces if p.data is not None) < 64 << 10  # tensor bytes noted, not copied
    direct = 0
    real = os.pwrite

    def spy(fd: int, data: Any, offset: int) -> int:
        nonlocal direct
        n = real(fd, data, offset)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct += n
        return n

    monkeypatch.setattr(os, "pwrite", spy)
    asyncio.run(torch_save._write_archive(zf, view, path))
    want = io.BytesIO()
    torch.save(state, want)
    assert open(path, "rb").read() == want.getvalue()
    assert direct >= nbytes - 5 * 8192  # all but the partial blocks at each record's ends
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_a_name_the_storage_layer_refuses_is_still_saved(tmp_path):
    state = {"w": torch.randn(5 << 20)}  # 20 MiB
    with asyncckpt.TorchAsyncCheckpoint() as tac:
        tac.async_save(state, tmp_path / "a\\b.pt")
        tac.finalize_async_save(blocking=True)
    want = io.BytesIO()
    torch.save(state, want)
    assert (tmp_path / "a\\b.pt").read_bytes() == want.getvalue()


def test_the_file_layout_is_found_once_per_structure(tmp_path, monkeypatch):
    """The trainer's skip_data pass (where each storage sits in the file) runs again only when the
    pickled structure changes, not at every save of the same state."""
    calls = []
    real = torch_save.file_offsets

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch_save, "file_offsets", counted)
    state = {"w": torch.zeros(5 << 20), "step": 1}
    with torch_save.TorchAsyncCheckpoint() as ck:
        for i in range(3):
            state["w"].add_(1)
            ck.async_save(state, str(tmp_path / f"m{i}.pt"))
            ck.finalize_async_save(blocking=True)
        assert len(calls) == 1
        state["step"] = 10**12  # another pickle: the records move
        ck.async_save(state, str(tmp_path / "m3.pt"))
        ck.finalize_async_save(blocking=True)
        assert len(calls) == 2
    for i in range(3):
        assert torch.equal(torch.load(tmp_path / f"m{i}.pt")["w"], torch.full((5 << 20,), float(i + 1)))
    assert torch.load(tmp_path / "m3.pt")["step"] == 10**12
