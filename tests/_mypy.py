"""mypy for tests/test_typing.py, started in the background once per test run.

mypy takes about a minute of one core (mostly reading torch's annotations); waiting for it would
hold a test worker idle. ``tests/conftest.py`` calls ``start`` as soon as a session has collected the
typing test (every xdist worker does; only the first one of the run starts mypy) and orders that test
last; the test then reads the exit status and the output with ``result``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NODEID = "tests/test_typing.py::test_mypy_finds_no_error_in_the_package"
TIMEOUT_S = 600
OUT_DIR = pytest.StashKey[Path]()  # set on the config by tests/conftest.py when it started (or joined) the run


class Run:
    """The mypy process this process started, and the thread that records its exit status in ``rc``."""

    def __init__(self, out_dir: Path) -> None:
        with open(out_dir / "out", "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mypy"], cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.thread = threading.Thread(target=self._record, args=(out_dir,), daemon=True)
        self.thread.start()

    def _record(self, out_dir: Path) -> None:
        try:
            rc = self.proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        (out_dir / "rc.tmp").write_text(str(rc))
        os.replace(out_dir / "rc.tmp", out_dir / "rc")

    def finish(self, stop: bool) -> None:
        """At the end of this process's session: stop mypy if the run is being cut short, else let it finish
        (another worker may be waiting for its result)."""
        if stop and self.proc.poll() is None:
            self.proc.kill()  # only the process started here, by its handle
        self.thread.join(TIMEOUT_S)


def start(out_dir: Path) -> Run | None:
    """Start mypy writing to ``out_dir`` unless another process of this run already did (exclusive create)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(out_dir / "started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    return Run(out_dir)


def result(out_dir: Path) -> tuple[int, str]:
    """mypy's exit status and output, once it has exited."""
    deadline = time.monotonic() + TIMEOUT_S + 30
    while not (out_dir / "rc").exists():
        assert time.monotonic() < deadline, f"mypy gave no result in {TIMEOUT_S} s"
        time.sleep(0.2)
    return int((out_dir / "rc").read_text()), (out_dir / "out").read_text()
