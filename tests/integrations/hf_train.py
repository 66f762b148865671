"""A tiny Hugging Face Trainer run driven by the tests.

    python hf_train.py OUT_DIR --trainer asyncckpt|default [--kill-at STEP] [--resume]

Trains 18 steps (3 epochs), saving every 6 (at epoch ends) with save_total_limit=2; with --kill-at it SIGKILLs itself at
the start of that step once a committed checkpoint exists. Writes OUT_DIR/final.pt at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from asyncckpt.integrations.transformers import AsyncckptTrainerMixin

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--trainer", default="asyncckpt")
p.add_argument("--kill-at", type=int, default=-1)
p.add_argument("--resume", action="store_true")
p.add_argument("--steps", type=int, default=18)
args = p.parse_args()
torch.set_num_threads(1)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        noise = torch.randn_like(x) * 0.01 + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        return {"loss": torch.nn.functional.mse_loss(self.net(x + noise), labels)}


class AsyncTrainer(AsyncckptTrainerMixin, Trainer):
    pass


class Killer(TrainerCallback):
    def on_step_begin(self, targs: TrainingArguments, state: object, control: object, **kw: object) -> None:
        if getattr(state, "global_step", -1) == args.kill_at:
            deadline = time.monotonic() + 60
            while get_last_checkpoint(targs.output_dir) is None and time.monotonic() < deadline:
                time.sleep(0.05)
                trainer.asyncckpt_finish(blocking=False) if isinstance(trainer, AsyncTrainer) else None
            os.kill(os.getpid(), signal.SIGKILL)


torch.manual_seed(0)  # the model is built before the Trainer seeds
g = torch.Generator().manual_seed(1)
xs, ys = torch.randn(48, 16, generator=g), torch.randn(48, 4, generator=g)
data = [{"x": xs[i], "labels": ys[i]} for i in range(48)]
targs = TrainingArguments(
    output_dir=os.path.join(args.out, "run"), max_steps=args.steps, save_steps=6, save_total_limit=2,
    per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2,
    weight_decay=0.01, report_to="none", use_cpu=True, seed=0, remove_unused_columns=False,
    logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, save_strategy="steps",
)
cls = AsyncTrainer if args.trainer == "asyncckpt" else Trainer
trainer = cls(model=Tiny(), args=targs, train_dataset=data, callbacks=[Killer()])
trainer.train(resume_from_checkpoint=True if args.resume else None)
torch.save({"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict(),
            "sched": trainer.lr_scheduler.state_dict(), "lr": trainer.lr_scheduler.get_last_lr(),
            "torch_rng": torch.get_rng_state(), "py_rng": random.random(), "np_rng": float(np.random.rand()),
            "global_step": trainer.state.global_step}, os.path.join(args.out, "final.pt"))
sys.exit(0)
