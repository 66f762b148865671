"""Typed frames between a trainer and its worker.

Every frame is a small msgpack :class:`Header` (what kind, which request) followed by an opaque
payload. The header always decodes, so whatever goes wrong with a payload (a function the worker
cannot import, an argument it cannot unpickle), the worker can still answer "request N failed,
and why" — a request never goes unanswered.
"""

from __future__ import annotations

import enum
import linecache
import pickle
import traceback
from typing import Any

import msgspec

__all__ = [
    "ErrorInfo",
    "Header",
    "Kind",
    "decode_error",
    "decode_header",
    "encode_error",
    "encode_header",
    "error_info",
]


class Kind(enum.IntEnum):
    """What a frame is. Trainer -> worker first, then worker -> trainer."""

    HELLO = 1  # configuration, first frame of a connection (payload: pickled WorkerConfig)
    CALL = 2  # an AsyncRequest: optional preload (snapshot stage), then async_fn (write stage)
    SAVE = 3  # a save through a sink: snapshot into staging, ack, sink writes
    CONTROL = 4  # a control-lane operation (commit, latest, drain, retention, cleanup)
    CANCEL = 5  # abandon request idx (its snapshot was torn): no commit, free its slot
    STOP = 6  # finish what is queued, then exit
    CONFIRM = 7  # the snapshot of request idx passed the trainer's guard: it may be committed
    ACK = 10  # the snapshot of request idx is taken
    DONE = 11  # request idx finished (payload: pickled result)
    FAILED = 12  # request idx failed (payload: msgpack ErrorInfo)
    PROGRESS = 13  # request idx reached a milestone (payload: pickled label), e.g. "committed"
    STOPPED = 14  # the worker is exiting


class Header(msgspec.Struct, array_like=True, frozen=True):
    kind: int
    idx: int


class ErrorInfo(msgspec.Struct, frozen=True):
    """An exception raised in the worker, as it travels back to the trainer."""

    type: str  # qualified name of the exception class
    message: str
    traceback: str  # the worker's full traceback
    frame: str  # one line: where in the worker it was raised ("file.py:42 in fn: code")
    blob: bytes | None = None  # the pickled exception, when it pickles and unpickles


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(Header)
_error_decoder = msgspec.msgpack.Decoder(ErrorInfo)


def encode_header(kind: Kind, idx: int) -> bytes:
    return _encoder.encode(Header(int(kind), idx))


def decode_header(data: bytes) -> Header:
    return _header_decoder.decode(data)


def _frame_line(exc: BaseException) -> str:
    tb = exc.__traceback__
    if tb is None:
        return "<no traceback>"
    last = traceback.extract_tb(tb)[-1]
    code = (last.line or linecache.getline(last.filename, last.lineno or 0)).strip()
    return f"{last.filename}:{last.lineno} in {last.name}: {code}"


def error_info(exc: BaseException) -> ErrorInfo:
    """Describe ``exc`` for the trainer (a pickled copy travels too when it round-trips)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    blob: bytes | None
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - an exception that does not round-trip travels as text
        blob = None
    cls = type(exc)
    return ErrorInfo(f"{cls.__module__}.{cls.__qualname__}", str(exc), tb, _frame_line(exc), blob)


def encode_error(exc: BaseException) -> bytes:
    return _encoder.encode(error_info(exc))


def decode_error(data: bytes) -> ErrorInfo:
    return _error_decoder.decode(data)


def describe(obj: Any) -> str:
    """A short name for a callable or object, for messages."""
    mod = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return f"{mod}.{name}" if mod else str(name)
