"""Invariant 1: what is saved equals the state at the save() call, although training goes on."""

from __future__ import annotations

import torch

import asyncckpt


def test_every_tensor_mutated_right_after_save_is_saved_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    big = torch.zeros(2 << 20)  # 8 MiB: goes through shared memory, not inline
    expected = []
    with asyncckpt.AsyncCheckpointer(optimizers=opt) as ck:
        for step in range(6):
            x = torch.randn(32, 256)
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()  # the pre-hook waits for the previous snapshot before mutating
            opt.zero_grad()
            big.fill_(float(step))
            state = {"model": model.state_dict(), "optim": opt.state_dict(), "big": big, "step": step}
            expected.append(
                {
                    "model": {k: v.clone() for k, v in model.state_dict().items()},
                    "exp_avg": [opt.state[p]["exp_avg"].clone() for p in model.parameters()],
                    "big": big.clone(),
                }
            )
            ck.save(state, tmp_path / f"s{step}", step=step)
            # Mutate every tensor right away, the way the next iteration would.
            ck.wait_snapshot()
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-3.0).add_(1.0)
                for s in opt.state.values():
                    s["exp_avg"].add_(100.0)
            big.add_(1000.0)
            ck.finalize()
        ck.finalize(blocking=True)
    for step, exp in enumerate(expected):
        out = asyncckpt.load(tmp_path / f"s{step}")
        assert out["step"] == step
        assert torch.equal(out["big"], exp["big"]), step
        for k, v in exp["model"].items():
            assert torch.equal(out["model"][k], v), (step, k)
        got = [out["optim"]["state"][i]["exp_avg"] for i in range(len(exp["exp_avg"]))]
        assert all(torch.equal(a, b) for a, b in zip(got, exp["exp_avg"])), step


def test_optimizer_hook_waits_for_snapshot(tmp_path):
    p = torch.nn.Parameter(torch.zeros(4 << 20))
    opt = torch.optim.SGD([p], lr=1.0)
    with asyncckpt.AsyncCheckpointer(optimizers=opt) as ck:
        ck.save({"p": p}, tmp_path / "a")
        p.grad = torch.ones_like(p)
        opt.step()  # must not run before the worker copied p
        assert ck.queue.snapshot_done()
        ck.finalize(blocking=True)
    assert torch.equal(asyncckpt.load(tmp_path / "a")["p"], torch.zeros(4 << 20))
    assert torch.equal(p.detach(), -torch.ones(4 << 20))


def test_save_returns_before_the_copy_is_done(tmp_path):
    big = torch.ones(64 << 20, dtype=torch.uint8)
    with asyncckpt.AsyncCheckpointer() as ck:
        ck.wait_snapshot()
        ck.save({"w": big}, tmp_path / "warm")  # first save moves storages to shared memory
        ck.finalize(blocking=True)
        h = ck.save({"w": big}, tmp_path / "b")
        assert h is not None and not h.done
        ck.wait_snapshot()
        big.zero_()
        ck.finalize(blocking=True)
        assert h.committed
    assert int(asyncckpt.load(tmp_path / "b")["w"].sum()) == 64 << 20
