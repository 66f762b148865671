"""A tiny Lightning run driven by the tests: train, save through ModelCheckpoint, maybe die, resume.

    python lightning_train.py OUT_DIR --io asyncckpt|default --epochs N [--kill-at EPOCH] [--resume]
        [--save-last link|true] [--devices N] [--namespace lightning|pytorch_lightning]

At the end it writes OUT_DIR/final.pt: model, optimizer, scheduler state and the RNG state.
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

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--io", default="asyncckpt")
p.add_argument("--epochs", type=int, default=4)
p.add_argument("--kill-at", type=int, default=-1, help="SIGKILL this process in the second batch of this epoch")
p.add_argument("--resume", action="store_true")
p.add_argument("--save-last", default="true")
p.add_argument("--devices", type=int, default=1)
p.add_argument("--namespace", default="lightning")
args = p.parse_args()

if args.namespace == "lightning":
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from asyncckpt.integrations.lightning import AsyncckptCheckpointIO
else:
    import pytorch_lightning as L
    from pytorch_lightning.callbacks import ModelCheckpoint

    from asyncckpt.integrations.pytorch_lightning import AsyncckptCheckpointIO

torch.set_num_threads(1)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.current_epoch == args.kill_at and batch_idx == 1:
            # Die once a checkpoint is on disk (the newest save may still be in flight).
            last = os.path.join(self.trainer.checkpoint_callback.dirpath, "last.ckpt")
            deadline = time.monotonic() + 60
            while not os.path.exists(last) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch
        noise = torch.randn_like(x) * 0.01 + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        return torch.nn.functional.mse_loss(self.net(x + noise), y)

    def configure_optimizers(self) -> object:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    model = Tiny()
    ckdir = os.path.join(args.out, "ckpts", "nested")  # does not exist yet: the plug-in makes it
    save_last: object = "link" if args.save_last == "link" else True
    cb = ModelCheckpoint(dirpath=ckdir, every_n_epochs=1, save_top_k=2, monitor="step", mode="max", save_last=save_last)
    plugins = [AsyncckptCheckpointIO()] if args.io == "asyncckpt" else []
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", plugins=plugins, callbacks=[cb],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, deterministic=True)
    trainer.fit(model, loader, ckpt_path="last" if args.resume else None)
    if trainer.is_global_zero:
        opt = trainer.optimizers[0]
        sched = trainer.lr_scheduler_configs[0].scheduler
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                    "torch_rng": torch.get_rng_state(), "py_rng": random.random(), "np_rng": float(np.random.rand()),
                    "global_step": trainer.global_step},
                   os.path.join(args.out, "final.pt"))


if __name__ == "__main__":
    main()
    sys.exit(0)
