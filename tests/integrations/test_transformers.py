"""Hugging Face Trainer with AsyncckptTrainerMixin: killed mid-run, resumed by the Trainer's own resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from .conftest import assert_same, run_script

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'asyncckpt[transformers]')")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")


def visible(run: Path) -> list[str]:
    return sorted(n for n in os.listdir(run) if not n.startswith("."))


def test_sigkill_then_resume_matches_the_uninterrupted_stock_trainer(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    run_script("hf_train.py", str(ref), "--trainer", "default")
    reference = torch.load(ref / "final.pt", weights_only=False)

    out = tmp_path / "async"
    run_script("hf_train.py", str(out), "--kill-at", "8", expect_kill=True)
    run = out / "run"
    # Only the committed checkpoint is visible to discovery and pruning; a save in flight is hidden.
    assert visible(run) == ["checkpoint-6"]
    assert all(n.endswith(".partial") for n in os.listdir(run) if n.startswith("."))
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    for f in ("pytorch_model.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        assert (run / "checkpoint-6" / f).is_file(), f

    run_script("hf_train.py", str(out), "--resume")
    resumed = torch.load(out / "final.pt", weights_only=False)
    assert_same(resumed, reference, "final")  # model, optimizer, scheduler and LR, RNG: bit-exact
    assert os.listdir(run) == visible(run) and visible(run) == ["checkpoint-12", "checkpoint-18"]  # save_total_limit=2
    assert_same(torch.load(run / "checkpoint-18" / "pytorch_model.bin", weights_only=True), reference["model"], "ckpt-18")
