"""`load(path, into=...)`: objects get their state back through load_state_dict, bit-exactly; partial loads are explicit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt


def _job(seed: int, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(4, 8, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _same(a: Any, b: Any) -> bool:
    """Deep, bit-exact equality of state dicts (tensors by their bytes, everything else by ==)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) and type(a) is type(b)


@pytest.fixture(scope="module")
def saved(shared_ckpt: asyncckpt.AsyncCheckpointer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model, opt, sched = _job(0, lr=0.5)
    _train(model, opt, sched, 3, seed=1)
    path = tmp_path_factory.mktemp("into") / "run" / "step-3"
    shared_ckpt.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                      "step": 3}, path, step=3)
    shared_ckpt.finalize(blocking=True)
    return {"path": path, "model": model, "opt": opt, "sched": sched,
            "states": copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))}


def test_fresh_model_optimizer_and_scheduler_come_back_bit_exactly(saved: dict[str, Any]) -> None:
    model, opt, sched = _job(7, lr=0.001)  # other weights, other lr, no optimizer state at all
    weight = model[0].weight
    ptr = weight.data_ptr()
    into = {"model": model, "optim": opt, "sched": sched, "step": 0}
    assert asyncckpt.load(saved["path"], into=into) is into
    assert into["step"] == 3 and into["model"] is model
    m_sd, o_sd, s_sd = saved["states"]
    assert _same(model.state_dict(), m_sd) and weight.data_ptr() == ptr  # in place
    assert _same(opt.state_dict(), o_sd)  # state tensors and every hyperparameter
    assert opt.param_groups[0]["lr"] == saved["opt"].param_groups[0]["lr"] == 0.25  # 0.5 halved once by step 3
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["weight_decay"] == 0.05
    assert _same(sched.state_dict(), s_sd)
    # Both continue identically: the whole training state came back.
    _train(saved["model"], saved["opt"], saved["sched"], 2, seed=5)
    _train(model, opt, sched, 2, seed=5)
    assert _same(model.state_dict(), saved["model"].state_dict())
    assert _same(opt.state_dict(), saved["opt"].state_dict())


def test_strict_error_names_the_options_and_changes_nothing(saved: dict[str, Any]) -> None:
    model, opt, _ = _job(7, lr=0.001)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(asyncckpt.BadInputError) as ei:
        asyncckpt.load(saved["path"], into={"model": model})
    msg = str(ei.value)
    assert "'optim'" in msg and "'sched'" in msg and "keys=[" in msg and "strict=False" in msg
    assert _same(model.state_dict(), before)
    with pytest.raises(asyncckpt.BadInputError, match="pass the object itself"):  # a state_dict() is a copy
        asyncckpt.load(saved["path"], into={"optim": opt.state_dict()}, keys=["optim"])
    assert opt.state_dict()["state"] == {}


def test_partial_loads_by_keys_and_by_strict_false(saved: dict[str, Any]) -> None:
    m_sd, o_sd, _ = saved["states"]
    model, opt, _sched = _job(7, lr=0.001)
    asyncckpt.load(saved["path"], into={"model": model}, keys=["model"])
    assert _same(model.state_dict(), m_sd) and opt.state_dict()["state"] == {}
    got = asyncckpt.load(saved["path"], keys=["step", "model"])
    assert list(got) == ["step", "model"] and got["step"] == 3 and _same(got["model"], m_sd)
    with pytest.raises(asyncckpt.BadInputError, match=r"\['nope'\] not in the checkpoint.*'model', 'optim'"):
        asyncckpt.load(saved["path"], keys=["nope"])
    with pytest.raises(asyncckpt.BadInputError, match="which `into` does not have"):
        asyncckpt.load(saved["path"], into={"model": model}, keys=["optim"])
    into: dict[str, Any] = {"optim": opt, "mine": 42}
    asyncckpt.load(saved["path"], into=into, strict=False)  # 'mine' is not in the checkpoint; model/sched skipped
    assert into["mine"] == 42 and _same(opt.state_dict(), o_sd)
    wrong = torch.nn.Sequential(torch.nn.Linear(8, 3))
    with pytest.raises(asyncckpt.BadInputError, match="shape"):  # never skipped, strict or not
        asyncckpt.load(saved["path"], into={"model": wrong}, keys=["model"], strict=False)


def test_plain_state_dicts_and_single_objects(saved: dict[str, Any]) -> None:
    m_sd, _, _ = saved["states"]
    model, _, _ = _job(7, lr=0.001)
    target = {"model": model.state_dict()}
    asyncckpt.load(saved["path"], into=target, keys=["model"])  # the plain form keeps working, in place
    assert _same(model.state_dict(), m_sd)
    other, _, _ = _job(9, lr=0.001)
    got = asyncckpt.load(saved["path"], keys=["model"])["model"]
    assert asyncckpt.load(saved["path"], into={"model": other}, keys=["model"])["model"] is other
    assert _same(other.state_dict(), got)


def test_keys_reads_only_what_it_selects(tmp_path: Path) -> None:
    """A pickled value left out by keys= needs no allow_pickle; the chunks of other keys are not read."""
    with asyncckpt.AsyncCheckpointer(allow_pickle=True, chunk_size=5 << 20) as ck:
        ck.save({"model": {"w": torch.arange(10.0)}, "big": torch.zeros(3 << 20), "obj": {1, 2}}, tmp_path / "c")
    data = tmp_path / "c" / "rank-00000.data"
    b = bytearray(data.read_bytes())
    b[8 << 20] ^= 1  # damage the second chunk: only "big" lives there
    data.write_bytes(bytes(b))
    got = asyncckpt.load(tmp_path / "c", keys=["model"])
    assert torch.equal(got["model"]["w"], torch.arange(10.0))
    with pytest.raises(asyncckpt.BadInputError, match="allow_pickle"):
        asyncckpt.load(tmp_path / "c", keys=["obj"])
    with pytest.raises(asyncckpt.IntegrityError, match="checksum mismatch"):
        asyncckpt.load(tmp_path / "c", keys=["big"])


@pytest.mark.parametrize("into", [5, "x", [1, 2], (torch.zeros(2),)])
def test_an_into_that_cannot_be_restored_in_place_is_refused(tmp_path: Path, into: Any) -> None:
    # Before, load returned such an `into` unchanged, as if it had been loaded.
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"w": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(asyncckpt.BadInputError, match=r"<root>: `into` is a \w+, which cannot take the checkpoint's dict"):
        asyncckpt.load(tmp_path / "c", into=into)
    target = {"w": torch.zeros(2)}
    assert asyncckpt.load(tmp_path / "c", into=target) is target and torch.equal(target["w"], torch.ones(2))


@pytest.mark.parametrize("where, match", [
    ("gpu9", "map_location='gpu9' is not a device"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_a_map_location_this_process_cannot_use_is_named(tmp_path: Path, where: str, match: str) -> None:
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"w": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(asyncckpt.BadInputError, match=match):
        asyncckpt.load(tmp_path / "c", map_location=where)
    assert torch.equal(asyncckpt.load(tmp_path / "c", map_location="cpu")["w"], torch.ones(2))
