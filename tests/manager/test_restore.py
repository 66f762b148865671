"""restore(): latest or a chosen step, in place, skipping a corrupt newest checkpoint; bad input errors."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt.rng import get_rng_state, set_rng_state


def _model(width: int = 8) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def _state(width: int = 8):  # type: ignore[no-untyped-def]
    model = _model(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {
        "model": model,
        "optim": opt,
        "sched": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100),
        "ema": torch.zeros(3),
        "gen": torch.Generator().manual_seed(5),
        "meta": {"epoch": 0, "tag": "x"},
        "best": 1.5,
    }


def _train(state, n: int = 1) -> None:  # type: ignore[no-untyped-def]
    for _ in range(n):
        loss = state["model"](torch.randn(8, 4)).pow(2).mean()
        state["optim"].zero_grad()
        loss.backward()
        state["optim"].step()
        state["sched"].step()


def _save_steps(root, steps, state=None):  # type: ignore[no-untyped-def]
    state = state or _state()
    with asyncckpt.CheckpointManager(root, signals=()) as mgr:
        for s in steps:
            _train(state)
            state["ema"] += 1
            state["meta"]["epoch"] = s
            mgr.save(s, state)
    return state


def test_restore_from_nothing_returns_0(tmp_path):
    with asyncckpt.CheckpointManager(tmp_path / "new", signals=()) as mgr:
        assert mgr.restore(_state()) == 0


def test_restore_latest_in_place_every_kind_of_value(tmp_path):
    src = _state()
    _train(src, 3)
    torch.randint(0, 10, (5,), generator=src["gen"])  # move the generator
    src["ema"] += 7
    src["meta"]["epoch"] = 4
    src["best"] = 0.25
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        mgr.save(4, src)
    dst = _state()
    meta_obj = dst["meta"]
    ema_obj = dst["ema"]
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        assert mgr.restore(dst) == 4
    for k, v in src["model"].state_dict().items():
        assert torch.equal(v, dst["model"].state_dict()[k])
    s_opt, d_opt = src["optim"].state_dict(), dst["optim"].state_dict()
    for pid in s_opt["state"]:
        for k, v in s_opt["state"][pid].items():
            assert torch.equal(v, d_opt["state"][pid][k])
    assert d_opt["param_groups"] == s_opt["param_groups"]
    assert dst["sched"].state_dict() == src["sched"].state_dict()
    assert dst["ema"] is ema_obj and torch.equal(ema_obj, torch.full((3,), 7.0))  # copied in place
    assert dst["meta"] is meta_obj and meta_obj == {"epoch": 4, "tag": "x"}  # updated in place
    assert dst["best"] == 0.25  # plain value replaced in the mapping
    assert torch.equal(torch.randint(0, 10, (5,), generator=src["gen"]), torch.randint(0, 10, (5,), generator=dst["gen"]))


def test_rng_state_roundtrip_and_opt_out(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = _state()
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        mgr.save(1, state)
    expect = (random.random(), float(np.random.random()), float(torch.rand(1)))
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        mgr.restore(_state())
    assert (random.random(), float(np.random.random()), float(torch.rand(1))) == expect
    r3 = random.Random(3).random()
    random.seed(3)
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        mgr.restore(_state(), rng=False)  # opt out per call ...
    assert random.random() == r3
    random.seed(3)
    with asyncckpt.CheckpointManager(tmp_path, rng=False, signals=()) as mgr:
        mgr.restore(_state())  # ... or per manager: the generators are left alone
    assert random.random() == r3


def test_get_set_rng_state_survive_a_save_and_load(tmp_path):
    random.random()
    np.random.standard_normal()  # has_gauss / cached gaussian state
    random.gauss(0, 1)
    st = get_rng_state()
    a = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"rng": st}, tmp_path / "r")
    loaded = asyncckpt.load(tmp_path / "r")["rng"]
    set_rng_state(loaded)
    assert (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == a


def test_restore_a_chosen_step(tmp_path):
    _save_steps(tmp_path, [1, 2, 3])
    dst = _state()
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        assert mgr.restore(dst, step=2) == 2
        assert dst["meta"]["epoch"] == 2
        with pytest.raises(asyncckpt.BadInputError, match="does not come after step 2"):
            mgr.maybe_save(2, dst)
        with pytest.raises(asyncckpt.CheckpointNotFoundError, match="no complete checkpoint of step 7"):
            mgr.restore(dst, step=7)


def _flip_byte(path, offset: int = 100) -> None:  # type: ignore[no-untyped-def]
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_restore_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2, 3])
    _flip_byte(tmp_path / "step-00000003" / "rank-00000.data")
    dst = _state()
    with caplog.at_level(logging.WARNING, logger="asyncckpt"), asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        assert mgr.restore(dst) == 2
    assert dst["meta"]["epoch"] == 2
    warned = [r for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert warned and "step-00000003" in warned[0].getMessage() and "checksum mismatch" in warned[0].getMessage()
    assert warned[0].op == "restore" and warned[0].step == 3
    # never a partial one: remove step 2's COMMIT; step 1 is next
    (tmp_path / "step-00000002" / "COMMIT").unlink()
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        assert mgr.restore(dst) == 1
    # chosen explicitly, a corrupt checkpoint is an error, not a silent fallback
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr, pytest.raises(asyncckpt.IntegrityError):
        mgr.restore(dst, step=3)


def test_restore_fails_when_every_checkpoint_is_corrupt(tmp_path):
    _save_steps(tmp_path, [1])
    _flip_byte(tmp_path / "step-00000001" / "rank-00000.data")
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr, pytest.raises(asyncckpt.IntegrityError, match="every"):
        mgr.restore(_state())


def test_restore_into_a_model_with_other_keys_or_shapes_names_them(tmp_path):
    _save_steps(tmp_path, [1])
    wider = _state(width=16)
    before = {k: v.clone() for k, v in wider["model"].state_dict().items()}
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        with pytest.raises(asyncckpt.BadInputError) as ei:
            mgr.restore(wider)
    msg = str(ei.value)
    assert "model.0.weight: shape (8, 4) in the checkpoint, (16, 4) in the model" in msg
    assert all(torch.equal(v, wider["model"].state_dict()[k]) for k, v in before.items())  # nothing changed

    other = _state()
    other["model"] = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2), torch.nn.Tanh(),
                                         torch.nn.Linear(2, 2))
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr, pytest.raises(asyncckpt.BadInputError) as ei:
        mgr.restore(other)
    assert "missing from the checkpoint: ['4.weight', '4.bias']" in str(ei.value)

    extra = _state()
    extra["scaler"] = torch.zeros(2)
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr, pytest.raises(asyncckpt.BadInputError, match="'scaler'"):
        mgr.restore(extra)
    fewer = _state()
    del fewer["ema"]
    with asyncckpt.CheckpointManager(tmp_path, signals=()) as mgr:
        with pytest.raises(asyncckpt.BadInputError, match="'ema'"):
            mgr.restore(fewer)
        assert mgr.restore(fewer, strict=False) == 1


def test_bad_state_values_and_steps(tmp_path):
    class Opaque:
        pass

    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, signals=()) as mgr:
        state = _state()
        state["thing"] = Opaque()
        with pytest.raises(asyncckpt.BadInputError, match=r"state\['thing'\].*Opaque has no state_dict"):
            mgr.maybe_save(1, state)
        del state["thing"]
        state["meta"]["nested"] = Opaque()
        with pytest.raises(asyncckpt.BadInputError, match="meta/nested"):
            mgr.maybe_save(1, state)
        del state["meta"]["nested"]
        with pytest.raises(asyncckpt.BadInputError, match="reserved"):
            mgr.maybe_save(1, {**state, "__asyncckpt__": 1})
        with pytest.raises(asyncckpt.BadInputError, match="mapping"):
            mgr.maybe_save(1, [1, 2])  # type: ignore[arg-type]
        mgr.maybe_save(5, state)
        for bad in (5, 4):
            with pytest.raises(asyncckpt.BadInputError, match=f"step {bad} does not come after step 5"):
                mgr.maybe_save(bad, state)
        with pytest.raises(asyncckpt.BadInputError, match="integer"):
            mgr.maybe_save(6.0, state)  # type: ignore[arg-type]
        mgr.maybe_save(6, state)
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [6, 5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_steps": 0}, "every_steps"),
        ({"every_seconds": -1}, "every_seconds"),
        ({"keep_last": 0}, "keep_last"),
        ({"name_format": "ckpt"}, "name_format"),
        ({"name_format": "a/{step}"}, "name_format"),
        ({"on_error": "ignore"}, "on_error"),
        ({"max_in_flight": 0}, "max_in_flight"),
    ],
)
def test_bad_manager_options(tmp_path, kwargs, match):
    with pytest.raises(asyncckpt.BadInputError, match=match):
        asyncckpt.CheckpointManager(tmp_path, signals=(), **kwargs)


def test_sampler_resumes_mid_epoch():
    s = asyncckpt.ResumableSampler(10, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(4)]
    saved = s.state_dict()
    rest = list(it) + list(s)  # the end of epoch 0, then all of epoch 1
    t = asyncckpt.ResumableSampler(10, seed=3)
    t.load_state_dict(saved)
    assert list(t) + list(t) == rest
    assert sorted(first + rest[:6]) == list(range(10))
    with pytest.raises(asyncckpt.BadInputError, match="over 10 samples, this sampler has 12"):
        asyncckpt.ResumableSampler(12).load_state_dict(saved)


def test_saving_over_an_earlier_run_without_restore_warns(tmp_path, caplog):
    _save_steps(tmp_path, [5])
    with caplog.at_level(logging.WARNING, logger="asyncckpt"), \
            asyncckpt.CheckpointManager(tmp_path, every_steps=1, signals=()) as mgr:
        mgr.maybe_save(1, _state())
        mgr.maybe_save(2, _state())
    warned = [r.getMessage() for r in caplog.records if "did not call restore()" in r.getMessage()]
    assert len(warned) == 1 and "up to step 5" in warned[0]


def test_a_state_checked_once_is_checked_again_when_an_entry_changes(tmp_path):
    """maybe_save runs every step and skips the checks for the objects it checked last time; a value
    replaced in place, a renamed key or a new key still gets checked."""
    class Opaque:
        pass

    with asyncckpt.CheckpointManager(tmp_path, every_steps=1000, signals=()) as mgr:
        state = _state()
        mgr.maybe_save(1, state)
        mgr.maybe_save(2, dict(state))  # another mapping with the same objects: fine
        key = next(iter(state))
        state[key] = Opaque()  # replaced in place
        with pytest.raises(asyncckpt.BadInputError, match=rf"state\['{key}'\].*Opaque"):
            mgr.maybe_save(3, state)
        state = _state()
        mgr.maybe_save(3, state)
        renamed = {("__asyncckpt__" if k == key else k): v for k, v in state.items()}
        with pytest.raises(asyncckpt.BadInputError, match="reserved"):
            mgr.maybe_save(4, renamed)
        with pytest.raises(asyncckpt.BadInputError, match="must be a str"):
            mgr.maybe_save(4, {**state, 7: torch.ones(1)})
