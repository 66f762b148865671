"""asyncckpt.format.torchzip: a recorded torch.save archive, patched, is byte for byte torch.save's."""

from __future__ import annotations

import io
import threading
import zipfile
import zlib
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncckpt.errors import CheckpointError
from asyncckpt.format import torchzip
from asyncckpt.format.torchzip import TorchZip, crc32_combine, data_offsets, plain_save, record

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int64,
          torch.bool, torch.complex64, torch.int16]


def _plain(obj: Any, **kw: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _finish(zf: TorchZip, span: int = torchzip.CRC_SPAN) -> bytes:
    zf.patch([zlib.crc32(v) for _, v in zf.crc_spans(span)], span)
    return zf.getvalue()


@st.composite
def states_in_a_source(draw: st.DrawFn) -> tuple[dict[str, Any], torch.Tensor]:
    """A state whose tensors are views of storages that live inside one source buffer."""
    source = torch.zeros(1 << 20, dtype=torch.uint8)
    src = memoryview(source.numpy()).cast("B")
    state: dict[str, Any] = {}
    off = 0
    for s in range(draw(st.integers(1, 5))):
        dtype = draw(st.sampled_from(DTYPES))
        esize = torch.empty(0, dtype=dtype).element_size()
        numel = draw(st.integers(0, 3000))
        off += draw(st.integers(0, 5000)) * 8
        if off + numel * esize > source.numel():
            break
        raw = source[off : off + numel * esize]
        raw.copy_(torch.randint(0, 2 if dtype == torch.bool else 256, (numel * esize,), dtype=torch.uint8))
        # a storage of its own inside the source, as the worker rebuilds them over the slot
        base = torch.frombuffer(src[off : off + numel * esize], dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        off = -(-(off + numel * esize) // 8) * 8
        state[f"s{s}"] = base
        if numel >= 12 and draw(st.booleans()):
            state[f"s{s}.strided"] = base[2:12:3]  # shares the storage, non-contiguous
        if numel >= 12 and draw(st.booleans()):
            state[f"s{s}.t"] = base[:12].view(3, 4).t()
    if draw(st.booleans()):
        state["outside"] = torch.arange(7)  # a storage the recorder copies
    state["meta"] = {"step": draw(st.integers(0, 10**6)), "name": "x"}
    return state, source


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states_in_a_source(), st.sampled_from([{}, {"pickle_protocol": 4}, {"_disable_byteorder_record": True}]),
       st.sampled_from([64, 4096, torchzip.CRC_SPAN]))
def test_recorded_and_patched_archive_is_torch_saves_bytes(case: tuple[dict[str, Any], torch.Tensor],
                                                           kw: dict[str, Any], span: int) -> None:
    state, source = case
    src = memoryview(source.numpy()).cast("B")
    zf = record(state, src, min_ref=1, **kw)
    assert _finish(zf, span) == _plain(state, **kw)
    assert torch.serialization.get_crc32_options()  # switched back on


def test_tensor_bytes_stay_in_the_source_and_torch_computes_no_crc(monkeypatch: pytest.MonkeyPatch) -> None:
    source = torch.randn(1 << 18)  # 1 MiB
    state = {"a": source[: 1 << 17], "b": source[1 << 17 :]}
    made: list[bool] = []
    real = torch._C.PyTorchFileWriter

    def spy(f: Any, compute_crc32: bool = True, *a: Any) -> Any:
        made.append(compute_crc32)
        return real(f, compute_crc32, *a)

    monkeypatch.setattr(torch._C, "PyTorchFileWriter", spy)
    zf = record(state, memoryview(source.numpy()).cast("B"))
    assert made == [False]
    kept = sum(p.length for p in zf.pieces if p.data is not None)
    assert kept < 64 << 10  # the 1 MiB of tensor bytes were noted, not copied
    assert _finish(zf) == _plain(state)


def test_archive_is_unreadable_before_patch() -> None:
    zf = record({"a": torch.ones(3)})
    with pytest.raises(CheckpointError, match="before patch"):
        zf.getvalue()


def test_zero_crc_never_reaches_another_save() -> None:
    """A plain_save started while record() has torch's CRC-32 off waits, and gets real CRC-32s."""
    out = io.BytesIO()
    started = threading.Event()
    th = threading.Thread(target=lambda: (started.set(), plain_save({"w": torch.arange(100)}, out)))

    class StartsASave:
        def __reduce__(self) -> Any:
            th.start()
            started.wait(5)
            th.join(0.2)
            assert th.is_alive()  # blocked on the save lock while the switch is off
            return (int, (1,))

    record({"x": StartsASave(), "t": torch.ones(4)})
    th.join(10)
    assert not th.is_alive()
    assert zipfile.ZipFile(io.BytesIO(out.getvalue())).testzip() is None  # every CRC-32 checks
    assert out.getvalue() == _plain({"w": torch.arange(100)})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=3000))
def test_crc32_combine(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_data_offsets_are_where_torch_save_puts_the_records() -> None:
    state = {f"t{i}": torch.randn(1000 + i) for i in range(5)} | {"e": torch.zeros(0), "v": torch.ones(3)}
    zf = record(state)
    want = [(r.data_offset, r.size) for r in zf.records if "/data/" in r.name and r.size]
    assert data_offsets(state) == want


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states_in_a_source(), st.sampled_from([64, 4096]), st.integers(1, 256))
def test_layout_covers_the_archive_once_with_aligned_direct_ranges(case: tuple[dict[str, Any], torch.Tensor],
                                                                   align: int, blocks: int) -> None:
    state, source = case
    limit = blocks * align
    src = memoryview(source.numpy()).cast("B")
    zf = record(state, src, min_ref=1)
    data = _finish(zf)
    direct, gathered = zf.layout(1, align, limit)
    ranges = sorted([(f, n) for f, _, n in direct] + gathered)
    pos = 0
    for f, n in ranges:
        assert f == pos and 0 < n <= limit
        pos += n
    assert pos == len(data)
    for f, s, n in direct:
        assert bytes(src[s : s + n]) == data[f : f + n]
        if (f - s) % align == 0:
            assert f % align == 0 and n % align == 0
    for f, n in gathered:
        assert zf.read(f, n) == data[f : f + n]


def test_tensor_bytes_that_start_like_a_data_descriptor_count_as_torch_counts_them() -> None:
    """torch folds any write starting with the descriptor signature into the serialization id."""
    source = torch.zeros(4096, dtype=torch.uint8)
    source[:12] = torch.tensor(list(b"PK\x07\x08\x12\x34\x56\x78abcd"), dtype=torch.uint8)
    src = memoryview(source.numpy()).cast("B")
    state = {"t": torch.frombuffer(src[:64], dtype=torch.uint8), "u": torch.frombuffer(src[64:200], dtype=torch.uint8)}
    assert _finish(record(state, src, min_ref=1)) == _plain(state)
