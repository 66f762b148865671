"""The examples run as a person runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.manager._proc import REPO, env


@pytest.mark.slow
def test_train_example_resumes_from_the_right_step(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "train.py"), "--dir", str(tmp_path / "ckpts")],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "holds exactly the phase-1 weights: True" in out.stdout
    assert "starting at step 30 (restored" in out.stdout
    assert "continued from step 30 as expected" in out.stdout


@pytest.mark.slow
def test_preemptible_example_demo(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "preemptible.py"), "--demo", "--dir",
                          str(tmp_path / "ck")], env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the job exited with status 0" in out.stdout
    assert "preempted by SIGTERM" in out.stdout and "resumed from exactly step" in out.stdout
