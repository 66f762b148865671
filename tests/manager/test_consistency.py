"""What maybe_save saves is the state at the call, although training mutates it right after."""

from __future__ import annotations

import torch

import asyncckpt


class BigStats(torch.nn.Module):
    """A module whose forward updates a large buffer in place (like BatchNorm statistics, but big)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("seen", torch.zeros(200_000))  # 800 KB: too big to be copied at save()
        self.bn = torch.nn.BatchNorm1d(8)  # small buffers: copied at save()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return self.bn(self.lin(x))


def test_forward_and_optimizer_step_right_after_a_save_do_not_leak_into_it(tmp_path):
    torch.manual_seed(0)
    model = BigStats()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state = {"model": model, "optim": opt}
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, signals=()) as mgr:
        for step in range(1, 6):
            loss = model(torch.randn(16, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            expect = {k: v.clone() for k, v in model.state_dict().items()}
            mgr.maybe_save(step, state)
            model(torch.randn(16, 8))  # mutates `seen` and the BatchNorm statistics at once
            with torch.no_grad():
                loss = model(torch.randn(16, 8)).pow(2).mean()
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()  # mutates the parameters at once
            mgr.wait()
            saved = asyncckpt.load(tmp_path / f"step-{step:08d}")["model"]
            for k, v in expect.items():
                assert torch.equal(saved[k], v), (step, k)
            assert not torch.equal(model.state_dict()["seen"], expect["seen"])  # it did change afterwards
