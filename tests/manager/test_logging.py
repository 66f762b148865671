"""Structured logging: quiet by default; enable_logging / ASYNCCKPT_LOG; JSON lines with rank/step/op/bytes/seconds."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import torch

import asyncckpt
from asyncckpt import logs
from tests.manager._proc import REPO, env

_SCRIPT = """
import torch, asyncckpt, sys
m = torch.nn.Linear(4, 4)
with asyncckpt.CheckpointManager(sys.argv[1], every_steps=1, keep_last=1, signals=()) as mgr:
    mgr.restore({"m": m})
    for s in (1, 2):
        mgr.maybe_save(s, {"m": m})
print("done")
"""


def _run(tmp_path, value: str | None) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    e = env()
    if value is not None:
        e["ASYNCCKPT_LOG"] = value
    return subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "ck")], env=e, cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def test_quiet_by_default_and_json_lines_from_the_environment(tmp_path):
    quiet = _run(tmp_path / "a", None)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.strip() == ""
    loud = _run(tmp_path / "b", "json")
    assert loud.returncode == 0, loud.stderr
    records = [json.loads(line) for line in loud.stderr.splitlines() if line.startswith("{")]
    ops = {r["op"] for r in records}
    assert {"restore", "save", "write", "commit", "finalize", "delete"} <= ops, ops
    for r in records:
        assert {"ts", "level", "logger", "msg", "rank", "step", "op", "bytes", "seconds"} <= set(r)
    fin = [r for r in records if r["op"] == "finalize"]
    assert [r["step"] for r in fin] == [1, 2] and all(r["bytes"] > 0 and r["seconds"] >= 0 for r in fin)
    deleted = [r for r in records if r["op"] == "delete"]
    assert [r["step"] for r in deleted] == [1]
    writes = [r for r in records if r["op"] == "write"]  # logged in the worker process, same format
    assert writes and writes[0]["pid"] != fin[0]["pid"]


def test_enable_logging_text_and_json(tmp_path):
    buf = io.StringIO()
    try:
        asyncckpt.enable_logging("INFO", stream=buf)
        m = torch.nn.Linear(4, 4)
        with asyncckpt.CheckpointManager(tmp_path, every_steps=1, signals=()) as mgr:
            mgr.maybe_save(1, {"m": m})
        text = buf.getvalue()
        assert "op=finalize" in text and "step=1" in text and "rank=0" in text and "seconds=" in text
        buf2 = io.StringIO()
        asyncckpt.enable_logging("DEBUG", json=True, stream=buf2)  # replaces the first handler
        logs.log_event("hello", op="test", step=3, nbytes=10, seconds=0.5)
        assert buf.getvalue() == text
        rec = json.loads(buf2.getvalue().splitlines()[-1])
        assert (rec["msg"], rec["op"], rec["step"], rec["bytes"], rec["seconds"]) == ("hello", "test", 3, 10, 0.5)
    finally:
        logs.disable_logging()
    assert logging.getLogger("asyncckpt").level == logging.NOTSET


def test_env_values():
    try:
        assert logs.configure_from_env("") is None
        assert logs.configure_from_env("off") is None
        h = logs.configure_from_env("debug")
        assert h is not None and logging.getLogger("asyncckpt").level == logging.DEBUG
        h = logs.configure_from_env("json")
        assert isinstance(h.formatter, logs.JsonFormatter) and logging.getLogger("asyncckpt").level == logging.INFO
        assert logs.configure_from_env("bogus") is None
    finally:
        logs.disable_logging()
