"""TorchAsyncCheckpoint: async torch.save readable by plain torch.load(weights_only=True)."""

from __future__ import annotations

import pytest
import torch

import asyncckpt


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


def test_async_torch_save_to_missing_dir_is_refused(tmp_path):
    tac = asyncckpt.TorchAsyncCheckpoint()
    try:
        with pytest.raises(asyncckpt.BadInputError, match="not a writable directory"):
            tac.async_save({"w": torch.ones(1)}, tmp_path / "nope" / "m.pt")
    finally:
        tac.close()
