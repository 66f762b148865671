"""Lightning's sharded checkpoints (ModelParallelStrategy, FSDP2) through AsyncckptModelParallelStrategy.

A real Trainer on 2 CPU gloo ranks (Lightning's own launcher), killed with a save in flight and
resumed with ``trainer.fit(ckpt_path="last")``; the result must equal, bit for bit, an
uninterrupted run with Lightning's stock ModelParallelStrategy (synchronous ``dcp.save``): weights,
optimizer, scheduler, step and every rank's RNG state. The run draws from every RNG on every rank
(dropout, noise; per-rank seeds), so a resume without each rank's own RNG state ends elsewhere.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from .conftest import assert_same, finish, run_script, start_script, stopped_on_error

pytest.importorskip("lightning", reason="lightning is not installed (pip install 'asyncckpt[lightning]')")

from asyncckpt.integrations.sharded import META_FILE, META_KEY, rng_key

pytestmark = pytest.mark.multiproc


def test_sharded_sigkill_then_resume_is_bit_exact(tmp_path: Path) -> None:
    # The uninterrupted run with Lightning's stock ModelParallelStrategy (the reference) and the run that
    # is killed are independent: they run side by side (each is mostly interpreter and import time).
    reference = tmp_path / "ref"
    killed = tmp_path / "killed"
    ref_proc = start_script("lightning_fsdp_train.py", str(reference), "--strategy", "stock")
    with stopped_on_error(ref_proc):
        finish(start_script("lightning_fsdp_train.py", str(killed), "--kill-at", "3"), expect_kill=True)
    finish(ref_proc)
    expected = torch.load(reference / "final.pt", weights_only=False)
    last = killed / "ckpts" / "last.ckpt"
    assert (last / ".metadata").is_file() and (last / META_FILE).is_file()
    assert not (killed / "final.pt").exists()

    # The committed generation holds Lightning's metadata too; stock dcp.load reads it with the tensors.
    size = dcp.FileSystemReader(str(last)).read_metadata().state_dict_metadata[META_KEY].size
    got = {META_KEY: torch.empty(size, dtype=torch.uint8)}
    dcp.load(got, checkpoint_id=str(last), no_dist=True)
    embedded = torch.load(io.BytesIO(got[META_KEY].numpy().tobytes()), weights_only=True)
    beside = torch.load(last / META_FILE, weights_only=True)
    # Epoch 1 or 2 (the last may be in flight). meta.pt is written after the commit, so a kill between the two
    # leaves the previous generation's meta.pt beside the committed one: it may lag, never lead.
    assert embedded["global_step"] in (8, 12) and beside["global_step"] in (8, 12)
    assert beside["global_step"] <= embedded["global_step"]
    rng_keys = {k for k in dcp.FileSystemReader(str(last)).read_metadata().state_dict_metadata if k.startswith("asyncckpt")}
    assert rng_keys == {META_KEY, rng_key(0), rng_key(1)}  # one RNG state per rank, in the same generation

    # Stock Lightning resumes from the same directory (meta.pt and DCP files as it writes them), from a copy
    # made before the meta.pt below is replaced; both resumes run side by side. It restores the same weights,
    # optimizer and scheduler, but it keeps no RNG state, so it ends elsewhere.
    stock = tmp_path / "stock"
    shutil.copytree(killed, stock, symlinks=True)
    if beside["global_step"] != embedded["global_step"]:
        # Killed between the commit and meta.pt's replacement: the stock loader would pair the committed
        # weights with the older meta.pt (the documented limit). Finish the write the worker was doing.
        (stock / "ckpts" / "last.ckpt" / META_FILE).write_bytes(got[META_KEY].numpy().tobytes())
    stock_proc = start_script("lightning_fsdp_train.py", str(stock), "--strategy", "stock", "--resume")
    with stopped_on_error(stock_proc):
        # A crash between the commit and meta.pt's replacement leaves an older meta.pt beside newer weights:
        # asyncckpt's load takes the metadata of the committed generation, never meta.pt.
        shutil.copyfile(reference / "ckpts" / "last.ckpt" / META_FILE, last / META_FILE)  # step 16: "training done"
        output = finish(start_script("lightning_fsdp_train.py", str(killed), "--resume"))
    finish(stock_proc)
    stock_restored = torch.load(stock / "restored.pt", weights_only=False)
    assert not torch.equal(torch.load(stock / "final.pt", weights_only=False)["model"]["net.0.weight"],
                           expected["model"]["net.0.weight"])
    assert "Restored all states" in output
    assert_same(torch.load(killed / "final.pt", weights_only=False), expected, "asyncckpt resume")
    restored = torch.load(killed / "restored.pt", weights_only=False)
    assert_same({k: v for k, v in restored.items() if k != "rng"},
                {k: v for k, v in stock_restored.items() if k != "rng"}, "restored by stock vs asyncckpt")
    assert restored["rng"][0]["python"] != restored["rng"][1]["python"]  # each rank got its own back
    # ModelCheckpoint's top-k pruning went through asyncckpt.delete (whole directories, meta.pt included).
    names = {p.name for p in (killed / "ckpts").iterdir()}
    assert {"epoch=3-step=16.ckpt", "last.ckpt"} <= names and not names & {"epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs CUDA (torch refuses it on CPU)")
def test_fsdp1_sharded_sigkill_then_resume_is_bit_exact(tmp_path: Path) -> None:
    """The same with AsyncckptFSDPStrategy(state_dict_type="sharded") against stock FSDPStrategy, on up to 2 GPUs."""
    ref = tmp_path / "ref"
    run_script("lightning_fsdp_train.py", str(ref), "--strategy", "stock", "--fsdp1", timeout=300)
    expected = torch.load(ref / "final.pt", weights_only=False)
    killed = tmp_path / "killed"
    run_script("lightning_fsdp_train.py", str(killed), "--fsdp1", "--kill-at", "3", expect_kill=True, timeout=300)
    last = killed / "ckpts" / "last.ckpt"
    assert (last / ".metadata").is_file() and (last / META_FILE).is_file()
    keys = dcp.FileSystemReader(str(last)).read_metadata().state_dict_metadata
    assert META_KEY in keys and any(k.startswith("model.") for k in keys)  # the stock strategy's key names
    stock = tmp_path / "stock"
    shutil.copytree(killed, stock, symlinks=True)
    run_script("lightning_fsdp_train.py", str(stock), "--strategy", "stock", "--fsdp1", "--resume", timeout=300)
    run_script("lightning_fsdp_train.py", str(killed), "--fsdp1", "--resume", timeout=300)
    assert_same(torch.load(killed / "final.pt", weights_only=False), expected, "asyncckpt FSDP1 resume")
    # stock FSDPStrategy reads the same weights, optimizer and scheduler (it keeps no RNG state)
    restored, stock_restored = (torch.load(d / "restored.pt", weights_only=False) for d in (killed, stock))
    assert_same({k: v for k, v in restored.items() if k != "rng"},
                {k: v for k, v in stock_restored.items() if k != "rng"}, "restored by stock vs asyncckpt FSDP1")


def test_rng_flag_reaches_both_namespaces_strategies() -> None:
    """``rng=`` is asyncckpt's own argument: the strategy's own arguments still bind, defaults applied."""
    from asyncckpt.integrations import lightning as lt

    assert lt.AsyncckptModelParallelStrategy().asyncckpt_rng
    off = lt.AsyncckptModelParallelStrategy(data_parallel_size=1, rng=False)
    assert not off.asyncckpt_rng and off.asyncckpt_sharded
    assert not lt.AsyncckptFSDPStrategy(state_dict_type="sharded", rng=False).asyncckpt_rng
    pl = pytest.importorskip("pytorch_lightning.strategies", reason="pytorch_lightning is not installed")
    from asyncckpt.integrations.pytorch_lightning import AsyncckptModelParallelStrategy

    strategy = AsyncckptModelParallelStrategy(rng=False, save_distributed_checkpoint=False)
    assert isinstance(strategy, pl.ModelParallelStrategy) and not strategy.asyncckpt_rng and not strategy.asyncckpt_sharded
