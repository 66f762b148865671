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


def test_in_flight_limit_counts_whole_checkpoints(tmp_path: Path) -> None:
    """``asyncckpt_max_in_flight = 1``: one checkpoint's files are all in flight at once (none waits for another
    of the same checkpoint), and no more than one checkpoint's worth ever is."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from asyncckpt.integrations.transformers import FILES_PER_CHECKPOINT, AsyncckptTrainerMixin

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(16, 4)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}

    class OneCheckpointTrainer(AsyncckptTrainerMixin, Trainer):
        asyncckpt_max_in_flight = 1

    seen: list[int] = []

    class Count(TrainerCallback):  # on_save runs right after _save_checkpoint returns
        def on_save(self, args: object, state: object, control: object, **kw: object) -> None:
            saver = trainer.asyncckpt_saver
            assert saver is not None
            seen.append(saver.queue.get_num_unfinalized_calls())

    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(16, generator=g), "labels": torch.randn(4, generator=g)} for _ in range(16)]
    targs = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=1, per_device_train_batch_size=4,
                              report_to="none", use_cpu=True, remove_unused_columns=False, logging_strategy="no",
                              disable_tqdm=True, dataloader_num_workers=0, save_strategy="steps")
    trainer = OneCheckpointTrainer(model=Tiny(), args=targs, train_dataset=data, callbacks=[Count()])
    trainer.train()
    assert trainer.asyncckpt_saver is not None and trainer.asyncckpt_saver.max_in_flight == FILES_PER_CHECKPOINT
    # Never more than one checkpoint's worth in flight. How many of its 5 files (weights, optimizer, scheduler,
    # RNG state, the commit marker) are still unfinalized when on_save runs depends on the worker's speed:
    # a file already written may have been finalized by the save's own collect.
    assert len(seen) == 4 and 1 <= min(seen) and max(seen) <= FILES_PER_CHECKPOINT, seen
    assert visible(tmp_path / "run") == [f"checkpoint-{i}" for i in range(1, 5)]
