"""Lightning through AsyncckptCheckpointIO: the user's Trainer/Fabric with one plug-in, killed and resumed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, assert_same, run_script

pytest.importorskip("lightning", reason="lightning is not installed (pip install 'asyncckpt[lightning]')")

from asyncckpt.integrations.lightning import AsyncckptCheckpointIO


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The uninterrupted run with Lightning's own synchronous CheckpointIO."""
    out = tmp_path_factory.mktemp("ref")
    run_script("lightning_train.py", str(out), "--io", "default")
    return torch.load(out / "final.pt", weights_only=False)


def test_sigkill_then_resume_is_bit_exact(tmp_path: Path, reference: dict[str, object]) -> None:
    """save_last="link" (a symlink to the newest file): killed mid-epoch, resumed with ckpt_path="last"."""
    save_last = "link"
    opts = ["--save-last", save_last]
    run_script("lightning_train.py", str(tmp_path), "--kill-at", "3", *opts, expect_kill=True)
    ckdir = tmp_path / "ckpts" / "nested"
    assert (ckdir / "last.ckpt").exists()  # a complete file under the name (or a link to one)
    assert (ckdir / "last.ckpt").is_symlink() == (save_last == "link")
    assert not (tmp_path / "final.pt").exists()
    proc = run_script("lightning_train.py", str(tmp_path), "--resume", *opts)
    assert "Restored all states" in proc.stderr + proc.stdout
    assert_same(torch.load(tmp_path / "final.pt", weights_only=False), reference, "final")


@pytest.mark.multiproc
def test_ddp_two_gloo_ranks_rank0_saves_without_hanging(tmp_path: Path) -> None:
    """Lightning saves from rank 0 only; nothing in the plug-in waits for the other rank."""
    run_script("lightning_train.py", str(tmp_path), "--devices", "2", "--epochs", "2", "--save-last", "true", timeout=180)
    ckdir = tmp_path / "ckpts" / "nested"
    last = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # 64 samples, batch 16, two ranks: 2 steps an epoch
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert_same(last["state_dict"], final["model"], "state_dict")


def test_pytorch_lightning_namespace_takes_the_plugin() -> None:
    pl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is not installed")
    from asyncckpt.integrations.pytorch_lightning import AsyncckptCheckpointIO as PLCheckpointIO

    trainer = pl.Trainer(plugins=[PLCheckpointIO()], accelerator="cpu", logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, PLCheckpointIO)


def test_pytorch_lightning_namespace_takes_the_sharded_strategy() -> None:
    pl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is not installed")
    from asyncckpt.integrations.pytorch_lightning import AsyncckptModelParallelStrategy

    strategy = AsyncckptModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert trainer.strategy is strategy and isinstance(strategy, pl.strategies.ModelParallelStrategy)
    assert strategy.asyncckpt_sharded  # save_distributed_checkpoint's default
    assert not AsyncckptModelParallelStrategy(save_distributed_checkpoint=False).asyncckpt_sharded


def test_fabric_save_is_written_without_teardown(tmp_path: Path) -> None:
    """A Fabric script that never calls teardown(): the save still lands (finished at exit)."""
    script = textwrap.dedent(f"""
        import torch
        from lightning.fabric import Fabric
        from asyncckpt.integrations.lightning import AsyncckptCheckpointIO
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[AsyncckptCheckpointIO()])
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        opt = torch.optim.Adam(model.parameters())
        model, opt = fabric.setup(model, opt)
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        fabric.save({str(tmp_path / "run" / "state.ckpt")!r}, {{"model": model, "optim": opt, "step": 1}})
        torch.save({{"model": model.state_dict(), "optim": opt.state_dict()}}, {str(tmp_path / "expected.pt")!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "run" / "state.ckpt", weights_only=True)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert got["step"] == 1
    assert_same(got["model"], expected["model"], "model")
    assert_same(got["optim"], expected["optim"], "optim")


def test_plugin_contract_and_rng_from_the_strategy_side(tmp_path: Path) -> None:
    """What Lightning's strategies call: save into a missing directory, load with weights_only, overwrite, remove."""
    io = AsyncckptCheckpointIO(rng=False)
    try:
        path = tmp_path / "a" / "b" / "last.ckpt"
        state = {"state_dict": {"w": torch.arange(300_000, dtype=torch.float32)}, "epoch": 1}
        io.save_checkpoint(state, path)
        got = io.load_checkpoint(path, weights_only=True)  # waits for the pending save of that path
        assert_same(got, state, "ckpt")
        state2 = {"state_dict": {"w": torch.ones(300_000)}, "epoch": 2}
        io.save_checkpoint(state2, path)  # fixed name: replaced, never half-written
        io.save_checkpoint(state, tmp_path / "a" / "other.ckpt")
        io.remove_checkpoint(tmp_path / "a" / "other.ckpt")  # pending: waits, then removes
        assert not (tmp_path / "a" / "other.ckpt").exists()
        assert_same(io.load_checkpoint(path, map_location="cpu"), state2, "ckpt2")
        with pytest.raises(FileNotFoundError, match="not found"):
            io.load_checkpoint(tmp_path / "missing.ckpt")
        os.symlink("never-written.ckpt", tmp_path / "a" / "dangling.ckpt")
        with pytest.raises(FileNotFoundError, match="never written"):
            io.load_checkpoint(tmp_path / "a" / "dangling.ckpt")
        os.remove(tmp_path / "a" / "dangling.ckpt")
        with pytest.raises(TypeError, match="storage_options"):
            io.save_checkpoint(state, path, storage_options={"x": 1})
    finally:
        io.teardown()
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["last.ckpt"]  # no temporary files left
    # RNG state travels with the checkpoint (the same plug-in, started again after teardown).
    io = AsyncckptCheckpointIO()
    try:
        torch.manual_seed(123)
        io.save_checkpoint({"x": 1}, tmp_path / "c.ckpt")
        expected = torch.rand(5)
        torch.manual_seed(999)
        assert io.load_checkpoint(tmp_path / "c.ckpt") == {"x": 1}  # the RNG entry is consumed
        assert torch.equal(torch.rand(5), expected)
    finally:
        io.teardown()


def test_sharded_strategy_refuses_a_torn_directory_and_remote_paths_by_name(tmp_path: Path) -> None:
    """What ``trainer.fit(ckpt_path=...)`` and ModelCheckpoint call, with no process group (Lightning's single-rank case)."""
    from asyncckpt.errors import BadInputError, CheckpointNotFoundError
    from asyncckpt.integrations.lightning import AsyncckptModelParallelStrategy

    strategy = AsyncckptModelParallelStrategy()
    torn = tmp_path / "last.ckpt"
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"\0" * 64)  # a save killed before its commit: no .metadata
    with pytest.raises(CheckpointNotFoundError, match=r"no committed DCP checkpoint.*never finished"):
        strategy.load_checkpoint(torn)
    with pytest.raises(BadInputError, match="local paths only"):
        strategy.save_checkpoint({"state_dict": {}}, "s3://bucket/last.ckpt")
    with pytest.raises(TypeError, match="storage_options"):
        strategy.save_checkpoint({"state_dict": {}}, tmp_path / "x.ckpt", storage_options={"a": 1})
    assert strategy.asyncckpt_queue is None  # refused before any worker was started
