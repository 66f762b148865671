"""Loop time per save at a framework's hook: asyncckpt vs the framework's own options.

    python bench/integrations.py [--framework lightning torchtitan transformers] [--mib 128 1024] [--saves 3] [--dir DIR]

Each framework's table is preceded and followed by the machine's load average (1, 5, 15 minutes).

**lightning** (``CheckpointIO.save_checkpoint``):

For each state size and each plug-in (interleaved, one unreported warm-up save each), a Lightning-
shaped checkpoint (``state_dict`` + Adam-like ``optimizer_states``, float32) is saved ``--saves``
times; between saves every tensor is changed in place, as a training step would. "blocked" is the
``save_checkpoint`` call (what the loop loses at the hook), "durable" is until the file is on disk
(``teardown``). Plug-ins: ``torch_io`` (Lightning's default ``TorchCheckpointIO``, synchronous),
``lightning_async`` (Lightning's ``AsyncCheckpointIO``: clones on the caller's thread, writes from
a thread), ``asyncckpt`` (``AsyncckptCheckpointIO``, snapshot="blocking").

**torchtitan** (its checkpoint manager, driven as its Trainer drives it): a model of linear
layers with AdamW (torchtitan's ``OptimizersContainer``; parameters + two moments = the state
size), one process (gloo group of 1). Per step: ``--step-s`` seconds stand in for forward and
backward, then ``maybe_wait_for_staging()``, ``optimizers.step()``, ``checkpointer.save(step)``,
as torchtitan's Trainer calls them; a save every ``--interval`` steps. "blocked" is what the loop
loses per save: the time inside ``save()`` and ``maybe_wait_for_staging()`` over the save's
interval (including a save's wait for the previous one); "durable" is the wall time of the timed
steps until ``close()`` returned (every save on disk). Managers: ``sync`` (torchtitan's ``CheckpointManager``,
``async_mode="disabled"``: ``dcp.save``), ``titan_async`` (``async_mode="async"``:
``dcp.async_save`` from a thread), ``asyncckpt`` (``AsyncckptCheckpointManager``, lazy
snapshot). torchtitan's ``async_with_pinned_mem`` needs CUDA and is left out on CPU.

**transformers** (the ``Trainer``'s ``_save_checkpoint`` hook, a real ``Trainer.train()``): a model
of bias-free 2048x2048 linear layers (batch 1) with the Trainer's AdamW (parameters + two moments =
the state size), ``--step-s`` seconds of sleep in ``forward`` standing in for the rest of the
step, a checkpoint every ``--interval`` steps (the first one an unreported warm-up; the Trainer
also saves at its last step, which only closes the last timed interval). "blocked" is what the
loop loses per save: the time inside ``_save_checkpoint`` plus, for asyncckpt, the wait for the
worker's snapshot before the next ``optimizer.step()`` (taken by a callback at
``on_pre_optimizer_step``) and the mixin's per-step non-blocking finalize (which commits: rename,
directory fsync, ``save_total_limit`` pruning), all until the next save. "durable" is the wall
time from the first timed save until ``train()`` returned (steps included; asyncckpt's ``train()``
waits for every pending checkpoint). Trainers: ``stock`` (``Trainer``: synchronous
``model.safetensors``, ``optimizer.pt``, ... without fsync), ``asyncckpt``
(``AsyncckptTrainerMixin``; ``pytorch_model.bin`` etc., fsynced, committed by rename).
Transformers has no asynchronous checkpoint option of its own, so there is no third row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch


def make_state(mib: int) -> dict[str, Any]:
    n = (mib << 20) // 4 // 3  # params, exp_avg, exp_avg_sq
    rows = max(1, n // 4096)
    w = torch.randn(rows, 4096)
    return {"state_dict": {"w": w}, "optimizer_states": [{"state": {0: {"exp_avg": torch.randn_like(w),
            "exp_avg_sq": torch.rand_like(w), "step": torch.tensor(1.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}],
            "epoch": 0, "global_step": 0}


def mutate(state: dict[str, Any]) -> None:
    state["state_dict"]["w"].add_(1e-3)
    for t in state["optimizer_states"][0]["state"][0].values():
        t.add_(1e-3)


def plugins() -> dict[str, Callable[[], Any]]:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

    from asyncckpt.integrations.lightning import AsyncckptCheckpointIO

    return {"torch_io": TorchCheckpointIO, "lightning_async": lambda: AsyncCheckpointIO(TorchCheckpointIO()),
            "asyncckpt": lambda: AsyncckptCheckpointIO(rng=False)}


def run_one(make: Callable[[], Any], state: dict[str, Any], root: str, saves: int) -> tuple[list[float], float]:
    io = make()
    io.save_checkpoint(state, os.path.join(root, "warmup.ckpt"))  # worker start / thread pool: not reported
    io.teardown() if not hasattr(io, "pending") else io.collect(blocking=True)
    blocked = []
    t_all = time.perf_counter()
    for i in range(saves):
        mutate(state)
        t0 = time.perf_counter()
        io.save_checkpoint(state, os.path.join(root, "last.ckpt" if i % 2 else f"step-{i}.ckpt"))
        blocked.append(time.perf_counter() - t0)
    if hasattr(io, "collect"):
        io.collect(blocking=True)  # every file written (asyncckpt); not counting the worker's shutdown below
        total = time.perf_counter() - t_all
        io.teardown()
    else:
        io.teardown()  # Lightning's: joins the writer thread (AsyncCheckpointIO) or nothing (TorchCheckpointIO)
        total = time.perf_counter() - t_all
    return blocked, total


def titan_run(manager: str, mib: int, root: str, saves: int, step_s: float, interval: int) -> tuple[list[float], float]:
    """Train (``saves`` + 1) * ``interval`` steps through torchtitan's manager, saving every
    ``interval`` steps (the first save is an unreported warm-up); per save, the loop time spent in
    the manager's calls over its interval."""
    from torchtitan.components.checkpointer import CheckpointManager
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    from asyncckpt.integrations.torchtitan import AsyncckptCheckpointManager

    layers = max(1, ((mib << 20) // 4 // 3) // (2048 * 2048))
    model = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers)))
    optimizers = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-4})],
        implementation="foreach",
    ).build(model_parts=[model])
    common: dict[str, Any] = {"enable": True, "folder": "ckpt", "interval": interval, "keep_latest_k": 0,
                              "initial_load_model_only": False}
    if manager == "asyncckpt":
        config: Any = AsyncckptCheckpointManager.Config(**common, save_rng=False)
    else:
        config = CheckpointManager.Config(**common, async_mode="async" if manager == "titan_async" else "disabled")
    ckpt = config.build(dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=None,
                        states={}, sd_adapter=None, base_folder=root)
    blocked: list[float] = []
    t_all = 0.0
    lost = 0.0
    for step in range(1, (saves + 1) * interval + 1):
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        time.sleep(step_s)  # forward and backward
        t0 = time.perf_counter()
        ckpt.maybe_wait_for_staging()
        lost += time.perf_counter() - t0
        optimizers.step()
        t0 = time.perf_counter()
        ckpt.save(step)
        lost += time.perf_counter() - t0
        if step % interval:
            continue
        if step == interval:  # the warm-up save (worker start, first sharing of the storages): not timed
            ckpt.maybe_wait_for_staging()
            ckpt.maybe_wait_for_saving()
            t_all = time.perf_counter()
        else:
            blocked.append(lost)
        lost = 0.0
    ckpt.close()
    if manager == "titan_async":
        ckpt.maybe_wait_for_saving()
    total = time.perf_counter() - t_all
    if manager == "asyncckpt":
        from asyncckpt.dcp import close_async_saves

        close_async_saves()
    return blocked, total


def table_row(mib: int, name: str, where: str | None, run: Callable[[str], tuple[list[float], float]]) -> None:
    """Run ``run(root)`` in a fresh directory under ``where`` (removed afterwards) and print its table row."""
    root = tempfile.mkdtemp(prefix=f"bench-integ-{name}-", dir=where)
    try:
        blocked, total = run(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ms = [b * 1000 for b in blocked]
    print(f"| {mib} MiB | {name} | {statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f}) | {total:.2f} |", flush=True)


def titan(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    print("| state | torchtitan manager | loop time lost per save, ms (median, min-max) | durable, s (all saves) |")
    print("| --- | --- | --- | --- |")
    try:
        for mib in args.mib:
            for name in ("sync", "titan_async", "asyncckpt"):
                table_row(mib, name, args.dir,
                          lambda root, n=name, m=mib: titan_run(n, m, root, args.saves, args.step_s, args.interval))
    finally:
        dist.destroy_process_group()


def hf_run(kind: str, mib: int, root: str, saves: int, step_s: float, interval: int) -> tuple[list[float], float]:
    """``Trainer.train()`` for (``saves`` + 2) * ``interval`` steps, a checkpoint every ``interval``
    (the first a warm-up, the last the end-of-training save); per timed save, the loop time lost
    from the save's start until the next save's start."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from asyncckpt.integrations.transformers import AsyncckptTrainerMixin

    layers = max(1, ((mib << 20) // 4 // 3) // (2048 * 2048))

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers)))

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            time.sleep(step_s)  # the rest of a real step
            return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}

    marks: list[float] = []  # perf_counter at the start of each save
    lost: list[float] = []  # loop time lost in each save's interval (the warm-up's included)

    class Timed:
        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            t0 = time.perf_counter()
            marks.append(t0)
            lost.append(0.0)
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
            lost[-1] += time.perf_counter() - t0

    class StockTrainer(Timed, Trainer):
        pass

    class AsyncTrainer(Timed, AsyncckptTrainerMixin, Trainer):
        def asyncckpt_finish(self, blocking: bool = True) -> None:
            t0 = time.perf_counter()
            super().asyncckpt_finish(blocking)
            if not blocking and lost:  # the per-step commit check; the blocking one at train()'s end is "durable"
                lost[-1] += time.perf_counter() - t0

    class SnapshotWait(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            saver = getattr(trainer, "asyncckpt_saver", None)
            if saver is not None and lost:
                t0 = time.perf_counter()
                saver.wait_snapshot()  # what the hooked optimizer.step() would wait for
                lost[-1] += time.perf_counter() - t0

    n = (saves + 2) * interval
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(2048, generator=g), "labels": torch.randn(2048, generator=g)} for _ in range(8)] * n
    targs = TrainingArguments(output_dir=os.path.join(root, "run"), max_steps=n, save_steps=interval,
                              save_strategy="steps", per_device_train_batch_size=1, learning_rate=1e-4,
                              report_to="none", use_cpu=True, seed=0, remove_unused_columns=False,
                              logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, save_total_limit=2)
    cls = AsyncTrainer if kind == "asyncckpt" else StockTrainer
    trainer = cls(model=Stack(), args=targs, train_dataset=data, callbacks=[SnapshotWait()])
    trainer.train()
    end = time.perf_counter()
    if len(marks) != saves + 2:
        raise RuntimeError(f"expected {saves + 2} checkpoints, the Trainer made {len(marks)}")
    return lost[1:-1], end - marks[1]


def hf(args: argparse.Namespace) -> None:
    import transformers

    print(f"transformers {transformers.__version__}; it has no asynchronous checkpoint option, so no third row")
    print("| state | Trainer | loop time lost per save, ms (median, min-max) | durable, s (timed saves + the last) |")
    print("| --- | --- | --- | --- |")
    for mib in args.mib:
        for name in ("stock", "asyncckpt"):
            table_row(mib, name, args.dir,
                      lambda root, n=name, m=mib: hf_run(n, m, root, args.saves, args.step_s, args.interval))


def lightning(args: argparse.Namespace) -> None:
    makers = plugins()
    print("| state | plug-in | blocked per save, ms (median, min-max) | durable, s (all saves) |")
    print("| --- | --- | --- | --- |")
    for mib in args.mib:
        state = make_state(mib)
        for name, make in makers.items():
            table_row(mib, name, args.dir, lambda root, mk=make, st=state: run_one(mk, st, root, args.saves))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", nargs="+", choices=["lightning", "torchtitan", "transformers"],
                    default=["lightning", "torchtitan", "transformers"])
    ap.add_argument("--mib", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--step-s", type=float, default=0.5,
                    help="torchtitan, transformers: seconds standing in for forward/backward")
    ap.add_argument("--interval", type=int, default=4, help="torchtitan, transformers: steps between saves")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)  # tempfile.mkdtemp(dir=...) needs it to exist
    torch.set_num_threads(1)
    for fw in args.framework:
        print(f"## {fw}: load average before {load_average()}", flush=True)
        {"lightning": lightning, "torchtitan": titan, "transformers": hf}[fw](args)
        print(f"load average after {load_average()}", flush=True)


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
