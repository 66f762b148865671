"""How a place in a saved state is written as one string (``inspect``, ``export --key``, safetensors names).

A path is the keys from the root joined by ``/`` (``optim/state/0/exp_avg``). Inside a str key,
``%``, ``/``, ``"`` and non-printable characters are written ``%XX`` (their UTF-8 bytes, as in
URLs), so the key ``'a/b'`` shows as ``a%2Fb`` and never as the nested ``a`` -> ``b``. An int
key (optimizer state) or list index is written in decimal; a str key that is empty or looks
like an int is quoted (``"0"``, ``""``) so it differs from the int key ``0``. Reading a path
back (:func:`parse_path`) undoes exactly this. See docs/format.md, "Keys".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

__all__ = ["format_key", "format_path", "parse_path"]

_INTLIKE = re.compile(r"-?[0-9]+")
_SPECIAL = frozenset('%/"')


def _escape(ch: str) -> str:
    if ch not in _SPECIAL and ch.isprintable():
        return ch
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


def format_key(key: object) -> str:
    """One key as it appears in a path."""
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    if not isinstance(key, str):
        return "%3C" + _escape_all(repr(key)) + "%3E"  # a torch.save file may hold other key types: <repr>
    text = _escape_all(key)
    return f'"{text}"' if not key or _INTLIKE.fullmatch(key) else text


def _escape_all(s: str) -> str:
    return "".join(_escape(c) for c in s)


def format_path(keys: Iterable[object]) -> str:
    """The keys from the root joined by ``/``, each written by :func:`format_key`."""
    return "/".join(format_key(k) for k in keys)


def parse_path(text: str) -> list[str | int]:
    """The keys a path names (the inverse of :func:`format_path`).

    A bare decimal component is returned as an int; callers may fall back to the str key of
    the same digits when a mapping has no such int key (``--key 0`` on ``{"0": ...}``).
    """
    out: list[str | int] = []
    for part in text.split("/") if text else []:
        if len(part) >= 2 and part[0] == '"' and part[-1] == '"':
            out.append(unquote(part[1:-1], errors="strict"))
        elif _INTLIKE.fullmatch(part):
            out.append(int(part))
        else:
            out.append(unquote(part, errors="strict"))
    return out
