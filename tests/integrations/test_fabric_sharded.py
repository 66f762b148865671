"""Lightning Fabric's sharded checkpoints (ModelParallelStrategy, FSDP2) through AsyncckptFabricModelParallelStrategy.

``fabric_sharded_train.py`` on 2 CPU gloo ranks (Fabric's own launcher) calls ``fabric.save`` every
2 steps and nothing else of asyncckpt. Compared with an uninterrupted run of stock Fabric
(synchronous ``dcp.save``): a run whose last save is committed only at its normal exit (the ranks
exiting seconds apart), a run SIGKILLed with a save in flight and resumed with ``fabric.load``
(bit-exact: weights, optimizer, scheduler, step and every rank's RNG state), stock Fabric resuming
from asyncckpt's checkpoint (same weights and optimizer, other draws: it keeps no RNG state), and
asyncckpt loading stock Fabric's checkpoint.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from .conftest import assert_same, finish, start_script, stopped_on_error

pytest.importorskip("lightning", reason="lightning is not installed (pip install 'asyncckpt[lightning]')")

from asyncckpt.errors import BadInputError, CheckpointNotFoundError
from asyncckpt.integrations.sharded import META_FILE, META_KEY, rng_key

pytestmark = pytest.mark.multiproc

SCRIPT = "fabric_sharded_train.py"


def embedded_meta(ckpt: Path) -> dict[str, object]:
    """The metadata stored inside the committed DCP generation, read with stock ``dcp.load``."""
    size = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata[META_KEY].size
    got = {META_KEY: torch.empty(size, dtype=torch.uint8)}
    dcp.load(got, checkpoint_id=str(ckpt), no_dist=True)
    meta: dict[str, object] = torch.load(io.BytesIO(got[META_KEY].numpy().tobytes()), weights_only=True)
    return meta


def without_rng(state: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in state.items() if k != "rng"}


def test_fabric_sharded_sigkill_then_resume_is_bit_exact(tmp_path: Path) -> None:
    ref, full, killed, failed = tmp_path / "ref", tmp_path / "full", tmp_path / "killed", tmp_path / "failed"
    # Independent runs side by side (each is mostly interpreter, import and launch time). "full" uses the
    # lightning_fabric namespace, never calls anything but fabric.save, and its ranks exit 2 s apart; in "failed"
    # rank 0 ends with an exception after its last save while rank 1 exits normally.
    ref_proc = start_script(SCRIPT, str(ref), "--strategy", "stock")
    with stopped_on_error(ref_proc):
        full_proc = start_script(SCRIPT, str(full), "--namespace", "lightning_fabric", "--exit-skew", "2")
        with stopped_on_error(full_proc):
            failed_proc = start_script(SCRIPT, str(failed), "--raise-at-end")
            with stopped_on_error(failed_proc):
                finish(start_script(SCRIPT, str(killed), "--kill-at", "8"), expect_kill=True)
            out = finish(failed_proc, expect_rc=1)
        finish(full_proc)
    finish(ref_proc)

    # The failed run: rank 0 dropped its pending save (step 12); rank 1, left waiting for it at exit, was not
    # stuck there (gloo reports the closed peer) and exited; step 10's generation stays the committed one.
    assert "dropped at exit" in out
    deadline = time.monotonic() + 120  # bounds a hang; rank 1 is not this test's child, so it is polled
    while not (failed / "rank1-exited").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (failed / "rank1-exited").exists(), "rank 1 never finished its exit"
    assert embedded_meta(failed / "ckpts" / "last")["step"] == 10
    expected = torch.load(ref / "final.pt", weights_only=False)
    assert expected["step"] == 12

    # The last save (step 12) of a script that calls nothing extra is committed at its normal exit, and what
    # was committed is the trained state: stock dcp.load of the DCP files gives the gathered final weights.
    assert_same(torch.load(full / "final.pt", weights_only=False), expected, "async saves leave training alone")
    last = full / "ckpts" / "last"
    assert embedded_meta(last)["step"] == 12 and torch.load(last / META_FILE, weights_only=True)["step"] == 12
    weights = {"model": {k: torch.empty_like(v) for k, v in expected["model"].items()}}
    dcp.load(weights, checkpoint_id=str(last), no_dist=True)
    assert_same(weights["model"], expected["model"], "committed at exit")

    # Killed with the save of step 8 in flight: the committed generation is step 6's, with both ranks' RNG.
    last = killed / "ckpts" / "last"
    assert (last / ".metadata").is_file() and not (killed / "final.pt").exists()
    assert embedded_meta(last)["step"] == 6 and torch.load(last / META_FILE, weights_only=True)["step"] == 6
    keys = {k for k in dcp.FileSystemReader(str(last)).read_metadata().state_dict_metadata if k.startswith("asyncckpt")}
    assert keys == {META_KEY, rng_key(0), rng_key(1)}

    # Side by side: asyncckpt resumes the killed run; stock Fabric resumes a copy of it; asyncckpt loads a copy
    # of stock Fabric's checkpoint (step 12, so it trains no further).
    stock, from_stock = tmp_path / "stock", tmp_path / "from_stock"
    shutil.copytree(killed, stock)
    shutil.copytree(ref, from_stock)
    (from_stock / "final.pt").unlink()
    stock_proc = start_script(SCRIPT, str(stock), "--strategy", "stock", "--resume")
    with stopped_on_error(stock_proc):
        from_stock_proc = start_script(SCRIPT, str(from_stock), "--resume")
        with stopped_on_error(from_stock_proc):
            finish(start_script(SCRIPT, str(killed), "--resume"))
        finish(from_stock_proc)
    finish(stock_proc)

    assert_same(torch.load(killed / "final.pt", weights_only=False), expected, "asyncckpt resume")
    restored = torch.load(killed / "restored.pt", weights_only=False)
    assert restored["step"] == 6 and restored["rng"][0]["python"] != restored["rng"][1]["python"]
    stock_restored = torch.load(stock / "restored.pt", weights_only=False)
    assert_same(without_rng(stock_restored), without_rng(restored), "restored by stock vs asyncckpt")
    for rank in (0, 1):  # stock Fabric keeps no RNG state ...
        assert stock_restored["rng"][rank]["python"] != restored["rng"][rank]["python"]
        assert not torch.equal(stock_restored["rng"][rank]["torch"], restored["rng"][rank]["torch"])
    assert not torch.equal(torch.load(stock / "final.pt", weights_only=False)["model"]["0.weight"],
                           expected["model"]["0.weight"])  # ... so its resumed run ends elsewhere
    assert_same(without_rng(torch.load(from_stock / "restored.pt", weights_only=False)), without_rng(expected),
                "stock Fabric's checkpoint loaded by asyncckpt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs CUDA (torch refuses it on CPU)")
def test_fabric_fsdp1_sigkill_then_resume_is_bit_exact(tmp_path: Path) -> None:
    """The same with AsyncckptFabricFSDPStrategy (sharded) against stock FSDPStrategy, on up to 2 GPUs."""
    ref, killed, stock = tmp_path / "ref", tmp_path / "killed", tmp_path / "stock"
    finish(start_script(SCRIPT, str(ref), "--strategy", "stock", "--fsdp1"))
    expected = torch.load(ref / "final.pt", weights_only=False)
    finish(start_script(SCRIPT, str(killed), "--fsdp1", "--kill-at", "8"), expect_kill=True)
    last = killed / "ckpts" / "last"
    assert embedded_meta(last)["step"] == 6 and torch.load(last / META_FILE, weights_only=True)["step"] == 6
    shutil.copytree(killed, stock)
    finish(start_script(SCRIPT, str(stock), "--strategy", "stock", "--fsdp1", "--resume"))
    finish(start_script(SCRIPT, str(killed), "--fsdp1", "--resume"))
    assert_same(torch.load(killed / "final.pt", weights_only=False), expected, "asyncckpt FSDP1 resume")
    restored, stock_restored = (torch.load(d / "restored.pt", weights_only=False) for d in (killed, stock))
    assert_same(without_rng(stock_restored), without_rng(restored), "restored by stock vs asyncckpt FSDP1")


def test_fabric_strategy_refuses_what_stock_fabric_refuses(tmp_path: Path) -> None:
    """No process group (one rank): filtered and remote saves, storage options and a torn directory fail by name."""
    from lightning.fabric.strategies import ModelParallelStrategy

    from asyncckpt.integrations.lightning import AsyncckptFabricModelParallelStrategy

    strategy = AsyncckptFabricModelParallelStrategy(lambda m, mesh: m)
    assert isinstance(strategy, ModelParallelStrategy) and strategy.asyncckpt_sharded and strategy.asyncckpt_rng
    with pytest.raises(NotImplementedError, match="filtered"):
        strategy.save_checkpoint(tmp_path / "x", {"step": 1}, filter={"step": lambda k, v: True})
    with pytest.raises(TypeError, match="storage_options"):
        strategy.save_checkpoint(tmp_path / "x", {"step": 1}, storage_options={"a": 1})
    with pytest.raises(ValueError, match="Could not find a distributed model"):
        strategy.save_checkpoint(tmp_path / "x", {"model": torch.nn.Linear(2, 2)})
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"\0" * 64)  # a save killed before its commit: no .metadata
    with pytest.raises(CheckpointNotFoundError, match="no committed DCP checkpoint"):
        strategy.load_checkpoint(torn, {"model": torch.nn.Linear(2, 2)})
    assert strategy.asyncckpt_queue is None  # refused before any worker was started
    off = AsyncckptFabricModelParallelStrategy(lambda m, mesh: m, save_distributed_checkpoint=False, rng=False)
    assert not off.asyncckpt_sharded and not off.asyncckpt_rng
    with pytest.raises(BadInputError, match="local paths only"):
        AsyncckptFabricModelParallelStrategy(lambda m, mesh: m).asyncckpt_target("s3://bucket/last")
    fabric_pkg = pytest.importorskip("lightning_fabric.strategies", reason="lightning_fabric is not installed")
    from asyncckpt.integrations.pytorch_lightning import AsyncckptFabricModelParallelStrategy as Standalone

    assert isinstance(Standalone(lambda m, mesh: m), fabric_pkg.ModelParallelStrategy)
    from asyncckpt.integrations.lightning import AsyncckptFabricFSDPStrategy

    assert AsyncckptFabricFSDPStrategy().asyncckpt_sharded  # state_dict_type's default
    assert not AsyncckptFabricFSDPStrategy(state_dict_type="full", rng=False).asyncckpt_sharded
