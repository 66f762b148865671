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


@pytest.mark.multiproc
def test_two_gloo_ranks_commit_collectively_and_restore_each_ranks_rng(tmp_path: Path) -> None:
    from tests._dist import run_ranks

    from . import torchtitan_ranks

    results = run_ranks(2, torchtitan_ranks.train_save_reload, tmp_path, str(tmp_path / "run"))
    assert [r["steps"] for r in results] == [[2, 4, 6]] * 2
