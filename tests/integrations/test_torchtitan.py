"""torchtitan: AsyncckptCheckpointManager selected by its config, killed mid-run and resumed by torchtitan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import assert_same, run_script

pytest.importorskip("torchtitan.components.checkpointer",
                    reason="torchtitan is not importable (pip install --no-deps torchtitan; see docs/integrations.md)")


def committed_steps(folder: Path) -> list[int]:
    """Steps torchtitan's resume would consider (a DCP .metadata is there: asyncckpt writes it at commit)."""
    return sorted(int(d.name[5:]) for d in folder.glob("step-*") if (d / ".metadata").is_file())


def final(out: Path) -> Any:
    return torch.load(out / "final.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """torchtitan's own synchronous DCP CheckpointManager, uninterrupted, 10 steps."""
    out = tmp_path_factory.mktemp("ref")
    run_script("torchtitan_train.py", str(out), "--manager", "stock")
    return final(out)


@pytest.mark.parametrize("verify", [True, False], ids=["asyncckpt-reader", "stock-reader"])
def test_sigkill_then_resume_matches_the_synchronous_reference(tmp_path: Path, reference: Any, verify: bool) -> None:
    out = tmp_path / "run"
    extra = [] if verify else ["--no-verify"]
    run_script("torchtitan_train.py", str(out), "--kill-at", "7", *extra, expect_kill=True)
    steps = committed_steps(out / "ckpt")
    assert steps and set(steps) <= {2, 4, 6}, steps  # step 6's save may or may not have committed
    resumed = run_script("torchtitan_train.py", str(out), *extra)
    assert f"resumed at step {max(steps)}" in resumed.stdout
    assert_same(final(out), reference, "final")  # model, optimizer, scheduler, data position, RNG
    assert committed_steps(out / "ckpt")[-3:] == [6, 8, 10]


def test_checkpoints_load_with_stock_dcp_and_the_config_refuses_a_second_async_mode(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader
    from asyncckpt.integrations.torchtitan import AsyncckptCheckpointManager

    out = tmp_path / "run"
    run_script("torchtitan_train.py", str(out), "--steps", "4")
    want = final(out)
    for reader in (dcp.FileSystemReader(str(out / "ckpt" / "step-4")), AsyncStorageReader(out / "ckpt" / "step-4")):
        got = {k: torch.zeros_like(v) for k, v in want["model"].items()}
        dcp.load(got, storage_reader=reader)  # model entries are flattened at the top, as torchtitan saves them
        assert_same(got, want["model"], "model")
    with pytest.raises(ValueError, match="async_mode"):
        AsyncckptCheckpointManager.Config(enable=True, async_mode="async")
    assert AsyncckptCheckpointManager.Config(enable=True)._owner is AsyncckptCheckpointManager  # what build() makes


def test_keep_latest_k_deletes_only_proven_checkpoints_and_never_the_save_in_flight(tmp_path: Path) -> None:
    """torchtitan's purge picks the folders (all ``step-N`` but the newest k); asyncckpt.delete removes them."""
    import torch.distributed.checkpoint as dcp

    from asyncckpt.dcp import AsyncStorageReader

    out = tmp_path / "run"
    (out / "ckpt" / "step-1").mkdir(parents=True)
    (out / "ckpt" / "step-1" / "notes.txt").write_text("not a checkpoint")  # matched by torchtitan's step-N pattern
    for junk in ("step-100", "step-101"):  # sort newest: with k=2 every save of this run is "stale" at once
        (out / "ckpt" / junk).mkdir()
        (out / "ckpt" / junk / "x").write_text("")
    # Saves at steps 2 and 4 (purged after each), 6 (the last step: blocking, no purge).
    run_script("torchtitan_train.py", str(out), "--steps", "6", "--keep-latest-k", "2")
    ckpt = out / "ckpt"
    assert (ckpt / "step-1" / "notes.txt").read_text() == "not a checkpoint"  # refused: nothing proves it a checkpoint
    assert not (ckpt / "step-2").exists()  # committed when step 4's save purged it: deleted, folder and all
    assert committed_steps(ckpt) == [4, 6]  # step 4 was in flight at its own purge: skipped, then committed
    want = final(out)["model"]
    for step in (4, 6):
        got = {k: torch.zeros_like(v) for k, v in want.items()}
        dcp.load(got, storage_reader=AsyncStorageReader(ckpt / f"step-{step}"))  # every item's CRC32C checked
    assert_same(got, want, "step-6 model")


@pytest.mark.multiproc
def test_two_gloo_ranks_commit_collectively_and_restore_each_ranks_rng(tmp_path: Path) -> None:
    from tests._dist import run_ranks

    from . import torchtitan_ranks

    results = run_ranks(2, torchtitan_ranks.train_save_reload, tmp_path, str(tmp_path / "run"))
    assert [r["steps"] for r in results] == [[2, 4, 6]] * 2
