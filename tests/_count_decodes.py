"""Worker plug-in (``worker_options={"preload": ["tests._count_decodes"]}``): every manifest the
worker decodes and checks, and every packed layout it decodes, appends a line to the file named by
``ASYNCCKPT_TEST_DECODES`` ("manifest", "packed:entries:large", "packed:tree:small": the kind, and
whether the bytes were over 32 KiB); cache hits add nothing."""

from __future__ import annotations

import os
from typing import Any

from asyncckpt import plan
from asyncckpt.format import records

_PATH = os.environ.get("ASYNCCKPT_TEST_DECODES", "")


def _note(what: str) -> None:
    if _PATH:
        with open(_PATH, "a") as f:
            f.write(what + "\n")


_checked = records._decode_checked
_unpack = plan._unpack


def _decode_checked(data: bytes, where: str) -> Any:
    _note("manifest")
    return _checked(data, where)


def _unpack_counted(kind: str, blob: bytes) -> Any:
    _note(f"packed:{kind}:{'large' if len(blob) > 32 << 10 else 'small'}")
    return _unpack(kind, blob)


records._decode_checked = _decode_checked  # type: ignore[assignment]
plan._unpack = _unpack_counted  # type: ignore[assignment]
