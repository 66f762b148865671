"""Structured logging for asyncckpt: quiet by default, one call or one variable turns it on.

Every record of the ``asyncckpt`` logger about checkpoint work carries ``rank``, ``step``,
``op`` (save, write, commit, finalize, delete, restore, preempt, pause, skip, load),
``bytes`` and ``seconds`` as attributes (``logging`` ``extra=``). :func:`enable_logging`
prints them as text or as JSON lines; ``ASYNCCKPT_LOG=info|debug|json|json-debug`` in the
environment does the same when asyncckpt is imported (the worker process inherits it).

Without either, nothing below WARNING is printed (warnings reach stderr through Python's
last-resort handler, as for any library without configured logging).
"""

from __future__ import annotations

import json as _json
import logging
import os
import sys
import time
from typing import IO, Any

__all__ = ["FIELDS", "JsonFormatter", "TextFormatter", "enable_logging", "log_event"]

#: Attributes every structured record carries (None when not applicable).
FIELDS = ("rank", "step", "op", "bytes", "seconds")
LOGGER_NAME = "asyncckpt"
ENV_VAR = "ASYNCCKPT_LOG"

_logger = logging.getLogger(LOGGER_NAME)
_installed: logging.Handler | None = None


def log_event(msg: str, *, op: str, rank: int | None = 0, step: int | None = None, nbytes: int | None = None,
              seconds: float | None = None, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured record on the ``asyncckpt`` logger (extra keys become JSON fields too)."""
    if not _logger.isEnabledFor(level):
        return
    extra = {"rank": rank, "step": step, "op": op, "bytes": nbytes, "seconds": seconds, **fields}
    _logger.log(level, msg, extra=extra)


_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(record, name, None) for name in FIELDS}
    for k, v in record.__dict__.items():
        if k not in _STD_ATTRS and k not in out:
            out[k] = v
    return out


class TextFormatter(logging.Formatter):
    """``2024-01-01 12:00:00 INFO asyncckpt op=commit rank=0 step=100 bytes=1.2MB seconds=0.031 committed``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [self.formatTime(record, "%Y-%m-%d %H:%M:%S"), record.levelname, record.name]
        for k, v in _fields(record).items():
            if v is None:
                continue
            if k == "seconds" and isinstance(v, float):
                v = f"{v:.3f}"
            parts.append(f"{k}={v}")
        parts.append(record.getMessage())
        line = " ".join(str(p) for p in parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, pid, rank, step, op, bytes, seconds (+ extras)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        obj.update(_fields(record))
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return _json.dumps(obj, default=str)


def enable_logging(level: int | str = "INFO", json: bool = False, stream: IO[str] | None = None) -> logging.Handler:
    """Print the ``asyncckpt`` logger's records at ``level`` and above to ``stream`` (stderr).

    ``json=True`` writes one JSON object per line (for log collectors). Calling it again
    replaces the handler installed before; returns the handler.
    """
    global _installed
    if isinstance(level, str):
        num = logging.getLevelName(level.upper())
        if not isinstance(num, int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = num
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    if _installed is not None:
        _logger.removeHandler(_installed)
    _logger.addHandler(handler)
    _logger.setLevel(level)
    _installed = handler
    return handler


def disable_logging() -> None:
    """Remove the handler :func:`enable_logging` installed and go back to quiet."""
    global _installed
    if _installed is not None:
        _logger.removeHandler(_installed)
        _installed = None
    _logger.setLevel(logging.NOTSET)


def configure_from_env(value: str | None = None) -> logging.Handler | None:
    """Apply ``ASYNCCKPT_LOG`` (``info``, ``debug``, ``json``, ``json-debug``); unset or empty does nothing."""
    value = (os.environ.get(ENV_VAR, "") if value is None else value).strip().lower()
    if not value or value in ("0", "off", "none", "false"):
        return None
    as_json = value.startswith("json")
    level = "DEBUG" if "debug" in value else ("INFO" if as_json or value in ("1", "on", "true") else value.upper())
    try:
        return enable_logging(level, json=as_json)
    except ValueError:
        print(f"asyncckpt: ignoring {ENV_VAR}={value!r} (use info, debug, json or json-debug)", file=sys.stderr)
        return None


configure_from_env()
