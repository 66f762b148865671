"""Crash consistency, bounded for CI: SIGKILL trainer/worker/both at random moments (tests.torture.crash).

The full campaign (>= 500 trials) is in docs/reliability.md with its command and counts. Here:
two trials of a chain of each single-rank kind (raw AsyncCheckpointer / CheckpointManager, local
directory / S3 on moto) of the CI seed, and the 2-rank chain of seed 2 that found the
non-coordinator commit bug (trial 9: rank 0 killed while writing COMMIT after rank 1's finalize
had already reported the save committed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._dist import run_ranks

from . import crash
from ._fuzz import count
from ._rank_fns import coordinator_commit_fails

CI_SEED = int(os.environ.get("TORTURE_CRASH_SEED", "7"))
CI_PER_CHAIN = int(os.environ.get("TORTURE_CRASH_PER_CHAIN", "2"))


def _assert_clean(stats: crash.Stats) -> None:
    assert not stats.problems, "\n".join(stats.problems)
    assert stats.data_lost == 0
    assert stats.kills >= stats.trials - stats.missed > 0
    assert stats.checkpoints_verified > 0


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize("chain", [0, 1, 3, 4], ids=lambda c: "{1}-{2}-{0}rank".format(*crash.chain_kind(c)))
def test_crash_chain(tmp_path: Path, chain: int) -> None:
    """The first trials of one chain of each single-rank kind (raw/manager, local/S3) of the CI seed."""
    stats = crash.run((chain + 1) * crash.CHAIN, CI_SEED, str(tmp_path), log=False, logdir=str(tmp_path / "logs"),
                      chains={chain}, per_chain=CI_PER_CHAIN)
    count("crash trials", stats.trials)
    assert stats.trials == CI_PER_CHAIN
    _assert_clean(stats)


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize("chain", [0, 1, 3, 4], ids=lambda c: "{1}-{2}-{0}rank".format(*crash.chain_kind(c)))
def test_crash_chain_incremental(tmp_path: Path, chain: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same trials with incremental=True and a frozen tensor: saves reference earlier checkpoints' bytes,
    retention deletes around the references; 0 lost or torn."""
    monkeypatch.setenv("TORTURE_INCREMENTAL", "1")
    stats = crash.run((chain + 1) * crash.CHAIN, CI_SEED, str(tmp_path), log=False, logdir=str(tmp_path / "logs"),
                      chains={chain}, per_chain=CI_PER_CHAIN)
    count("crash trials (incremental)", stats.trials)
    assert stats.trials == CI_PER_CHAIN
    _assert_clean(stats)


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.multiproc
def test_crash_regression_seed2_two_ranks(tmp_path: Path) -> None:
    """Seed 2, chain 2 (trials 8-9, 2 gloo ranks): trial 9 lost a finalized save before the fix."""
    plan = crash.plan_trials(10, 2)
    assert (plan[9].world, plan[9].phase, plan[9].victim, plan[9].occurrence) == (2, "commit", "trainer", 2)
    stats = crash.run(10, 2, str(tmp_path), log=False, start=8, logdir=str(tmp_path / "logs"))
    count("crash trials", stats.trials)
    assert stats.multi_rank_trials == 2
    _assert_clean(stats)


@pytest.mark.multiproc
def test_failed_coordinator_commit_is_an_error_on_every_rank(tmp_path: Path) -> None:
    """The deterministic form of the seed-2 bug: rank 1 must not report a save committed that rank 0 failed to commit."""
    r0, r1 = run_ranks(2, coordinator_commit_fails, tmp_path, str(tmp_path / "root"))
    assert r0["first"] == "StorageError" and r1["first"] == "RemoteRankError"
    assert not r0["first_committed"] and not r1["first_committed"]
    assert r0["second_committed"] and r1["second_committed"]


def test_plan_is_a_pure_function_of_the_seed() -> None:
    a, b = crash.plan_trials(40, 5), crash.plan_trials(40, 5)
    assert a == b and a != crash.plan_trials(40, 6)
    assert {t.phase for t in crash.plan_trials(400, 1)} == {*crash.PHASES, "random"}
    assert {t.victim for t in a} == {"trainer", "worker", "both"}
    assert any(t.world == 2 for t in a)


def _tear_upload(moto_server, bucket: str, victim: str) -> tuple[str, dict, object]:
    """Start a trainer on S3, SIGKILL ``victim`` once step-000001's data upload is open; return (root, env, proc)."""
    import json
    import subprocess
    import time

    from .common import PYTHON, REPO, subprocess_env

    root = f"s3://{bucket}/run"
    env = subprocess_env(TORTURE_S3_OPTIONS=json.dumps(moto_server.options(single_put_threshold=0)),
                         TORTURE_ANNOUNCE="1", TORTURE_SLOW="streaming", TORTURE_SLOW_S="0.5")
    p = subprocess.Popen([PYTHON, "-m", "tests.torture.trainer", "--root", root, "--saves", "3"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    worker = None
    for line in p.stdout:
        if line.startswith("PID worker"):
            worker = int(line.split()[2])
        if "BEGIN streaming step-000001" in line:
            break
    deadline = time.monotonic() + 60
    while not moto_server.incomplete_uploads(bucket) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert moto_server.incomplete_uploads(bucket) == ["run/step-000001/rank-00000.data"]
    if victim == "worker":
        assert worker is not None
        os.kill(worker, 9)
    else:
        p.kill()
    return root, env, p


@pytest.mark.fault
def test_torn_multipart_upload_is_aborted_by_the_next_save(moto_server, s3_bucket: str) -> None:
    """A trainer killed while its data file streams leaves an incomplete multipart upload; the next save
    of that checkpoint (a fresh process resuming) must abort it (asyncckpt/catalog.py, found by this suite)."""
    root, env, p = _tear_upload(moto_server, s3_bucket, "trainer")
    p.wait()
    count("crash trials")
    rep = crash.check_root(root, numel=crash.NUMEL, options=moto_server.options())
    assert not rep.problems and rep.complete == ["step-000000"]
    res = crash.run_trainers(root, 1, {"TORTURE_S3_OPTIONS": env["TORTURE_S3_OPTIONS"]}, None, crash.NUMEL, 2)
    assert "step-000001" in res.finalized and not res.problems
    assert moto_server.incomplete_uploads(s3_bucket) == []


@pytest.mark.fault
def test_upload_torn_by_a_killed_worker_is_aborted_when_the_save_fails(moto_server, s3_bucket: str) -> None:
    """The trainer survives its worker; the failed save is never re-saved, so its finalize must clean up
    (asyncckpt/checkpointer.py, found by this suite: seed 7, chain 3)."""
    root, _env, p = _tear_upload(moto_server, s3_bucket, "worker")
    out, _ = p.communicate(timeout=120)
    count("crash trials")
    assert p.returncode == 0 and "FAILED step-000001 WorkerDiedError" in out and "DONE" in out, out[-2000:]
    assert moto_server.incomplete_uploads(s3_bucket) == []
    rep = crash.check_root(root, numel=crash.NUMEL, options=moto_server.options())
    assert not rep.problems and "step-000001" not in rep.complete
