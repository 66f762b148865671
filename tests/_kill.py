"""Kill a saving script and its worker at a random moment (crash tests that need no torture harness)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading


def kill_mid_run(script: str, args: list[str], rng: random.Random, max_delay: float) -> int:
    """Run ``script`` (it prints its worker's pid, then each step it committed), wait for its first
    commit (the worker is warm), then SIGKILL worker and script within ``max_delay`` seconds.
    Returns the last step the script reported committed before the kill."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        committed = int(proc.stdout.readline())
        threading.Event().wait(rng.uniform(0.0, max_delay))  # then anywhere in the next saves
        os.kill(worker, signal.SIGKILL)
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return committed
