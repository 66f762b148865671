"""Every save path writes, for a fixed state, exactly the bytes the golden files hold.

The golden files in tests/golden/v1 were written by the code before the data-path speed work
(see tests/golden/states.py); speed changes must change nothing that is stored. What differs
per save by design (save ids, creation times, names) is left out of the comparison, and each
golden file is also checked to load back to the state it was written from.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import msgspec
import numpy as np
import torch
import torch.distributed.checkpoint as dcp

import asyncckpt
from asyncckpt.format import RankManifest, decode_manifest
from tests.golden import states

GOLDEN = states.GOLDEN


def _same(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _same(got[k], want[k])
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    elif isinstance(want, io.BytesIO):
        assert got.getvalue() == want.getvalue()
    else:
        assert got == want


def _normal(m: RankManifest) -> dict[str, Any]:
    d = msgspec.to_builtins(m)
    for varying in ("created", "save_id", "name"):
        d.pop(varying, None)
    return d


def test_torch_save_path_writes_the_golden_bytes(tmp_path):
    got = states.write_pt(tmp_path).read_bytes()
    assert got == (GOLDEN / "model.pt").read_bytes()


def test_native_path_writes_the_golden_data_and_manifest(tmp_path):
    path = states.write_native(tmp_path)
    assert (path / "rank-00000.data").read_bytes() == (GOLDEN / "native.rank-00000.data").read_bytes()
    got = decode_manifest((path / "rank-00000.manifest").read_bytes(), "new")
    want = decode_manifest((GOLDEN / "native.rank-00000.manifest").read_bytes(), "golden")
    assert _normal(got) == _normal(want)


def test_dcp_path_writes_the_golden_data_and_metadata(tmp_path):
    path = states.write_dcp(tmp_path)
    assert (path / "__0_0.distcp").read_bytes() == (GOLDEN / "dcp.__0_0.distcp").read_bytes()
    got = pickle.loads((path / ".metadata").read_bytes())
    want = pickle.loads((GOLDEN / "dcp.metadata").read_bytes())
    assert got.state_dict_metadata == want.state_dict_metadata
    assert got.storage_data == want.storage_data


def test_golden_pt_loads_with_torch_load():
    _same(torch.load(GOLDEN / "model.pt", weights_only=False), states.pt_state())


def test_golden_native_data_loads(tmp_path):
    # The fresh manifest equals the golden one but for its ids (checked above), so the golden
    # data file placed under it must load back to the state it was written from.
    path = states.write_native(tmp_path)
    (path / "rank-00000.data").write_bytes((GOLDEN / "native.rank-00000.data").read_bytes())
    _same(asyncckpt.load(str(path)), states.native_state())


def test_golden_dcp_files_load_with_stock_dcp_load(tmp_path):
    path = states.write_dcp(tmp_path)
    (path / "__0_0.distcp").write_bytes((GOLDEN / "dcp.__0_0.distcp").read_bytes())
    (path / ".metadata").write_bytes((GOLDEN / "dcp.metadata").read_bytes())
    want = states.dcp_state()
    got = _blank(want)
    dcp.load(got, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    _same(got, want)


def _blank(v: Any) -> Any:
    """The same structure with every leaf reset, so a load must fill in each value."""
    if isinstance(v, dict):
        return {k: _blank(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_blank(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_blank(x) for x in v)
    if isinstance(v, torch.Tensor):
        return torch.zeros_like(v)
    if isinstance(v, io.BytesIO):
        return io.BytesIO()
    return None if v is None else type(v)()
