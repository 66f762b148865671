"""A tiny FSDP2 Lightning run on 2 CPU gloo ranks (ModelParallelStrategy): train, save sharded, maybe die, resume.
(``--fsdp1``: FSDPStrategy with sharded state dicts on up to 2 GPUs instead.)

    python lightning_fsdp_train.py OUT_DIR --strategy asyncckpt|stock [--epochs N] [--kill-at EPOCH] [--resume]
        [--namespace lightning|pytorch_lightning]

Lightning's launcher starts rank 1 from this script. At the end rank 0 writes OUT_DIR/final.pt: the
full (gathered) model and optimizer state, the scheduler state, the global step and every rank's next
draws from torch, Python ``random`` and NumPy. A resumed run also writes OUT_DIR/restored.pt, the same
taken at its first training batch (what the strategy restored, before training changes it).

Training draws from every RNG on every rank (dropout, input noise), each rank from streams of its own
(seeded by rank at the first batch), so a resume that does not put back each rank's RNG state
ends with other weights than the uninterrupted run.
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
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--strategy", default="asyncckpt")
p.add_argument("--epochs", type=int, default=4)
p.add_argument("--kill-at", type=int, default=-1, help="every rank SIGKILLs itself in the second batch of this epoch")
p.add_argument("--resume", action="store_true")
p.add_argument("--namespace", default="lightning")
p.add_argument("--fsdp1", action="store_true", help="FSDPStrategy (FSDP1, sharded state dicts) on CUDA instead")
args = p.parse_args()

if args.namespace == "lightning":
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from asyncckpt.integrations.lightning import AsyncckptFSDPStrategy, AsyncckptModelParallelStrategy
else:
    import pytorch_lightning as L
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy

    from asyncckpt.integrations.pytorch_lightning import AsyncckptFSDPStrategy, AsyncckptModelParallelStrategy

torch.set_num_threads(1)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(64, 4))
        self.dumped = False

    def configure_model(self) -> None:
        if args.fsdp1:
            return  # FSDPStrategy wraps the module itself
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.current_epoch == args.kill_at and batch_idx == 1:
            # Die once a sharded checkpoint is committed (the newest save may still be in flight).
            meta = os.path.join(self.trainer.checkpoint_callback.dirpath, "last.ckpt", "meta.pt")
            deadline = time.monotonic() + 60
            while not os.path.exists(meta) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.global_step == 0 and batch_idx == 0:  # a fresh run: every rank its own streams
            torch.manual_seed(100 + self.global_rank)
            random.seed(200 + self.global_rank)
            np.random.seed(300 + self.global_rank)
        if args.resume and not self.dumped:
            self.dumped = True
            snapshot(self, self.trainer, os.path.join(args.out, "restored.pt"))
        x, y = batch
        noise = torch.randn_like(x) * 0.01 + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        return torch.nn.functional.mse_loss(self.net(x + noise), y)

    def configure_optimizers(self) -> object:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def snapshot(model: Tiny, trainer: L.Trainer, path: str) -> None:
    """Rank 0 writes the gathered training state and every rank's RNG state to ``path`` (collective)."""
    opt = trainer.optimizers[0]
    full = {"model": get_model_state_dict(model, options=FULL), "optim": get_optimizer_state_dict(model, opt, options=FULL)}
    rngs: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, {"torch": torch.get_rng_state(), "python": random.getstate(),
                                  "numpy": np.random.get_state()[1].tolist()})
    if trainer.is_global_zero:
        sched = trainer.lr_scheduler_configs[0].scheduler
        torch.save({**full, "sched": sched.state_dict(), "global_step": trainer.global_step, "rng": rngs}, path)


def main() -> None:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(128, 16, generator=g), torch.randn(128, 4, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)  # Lightning adds a DistributedSampler
    model = Tiny()
    ckdir = os.path.join(args.out, "ckpts")
    cb = ModelCheckpoint(dirpath=ckdir, every_n_epochs=1, save_top_k=2, monitor="step", mode="max", save_last=True)
    strategy: object
    if args.fsdp1:
        devices = min(2, torch.cuda.device_count())
        cls1 = AsyncckptFSDPStrategy if args.strategy == "asyncckpt" else FSDPStrategy
        strategy, accelerator = cls1(state_dict_type="sharded"), "cuda"
    else:
        devices = 2
        cls = AsyncckptModelParallelStrategy if args.strategy == "asyncckpt" else ModelParallelStrategy
        strategy, accelerator = cls(data_parallel_size=2, tensor_parallel_size=1), "cpu"
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=accelerator, devices=devices, strategy=strategy, callbacks=[cb],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, deterministic=True)
    trainer.fit(model, loader, ckpt_path="last" if args.resume else None)
    snapshot(model, trainer, os.path.join(args.out, "final.pt"))


if __name__ == "__main__":
    main()
    sys.exit(0)
