"""Validation of storage keys: relative, ``/``-separated, never leaving the root."""

from __future__ import annotations

from ..errors import IntegrityError

__all__ = ["TEMP_MARK", "check_key", "is_temp_key", "join_key"]

# Names holding this mark are a backend's temporary objects/files (torn writes, upload parts):
# never listed, removed by cleanup. A key a user saves must not contain it.
TEMP_MARK = ".tmp-"


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise IntegrityError naming it."""
    if not isinstance(key, str):
        raise IntegrityError(f"storage key {key!r} is not a string")
    if "\x00" in key or "\\" in key:
        raise IntegrityError(f"storage key {key!r} contains a NUL byte or a backslash")
    if key.startswith("/"):
        raise IntegrityError(f"storage key {key!r} is absolute; keys must stay inside the checkpoint root")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise IntegrityError(f"storage key {key!r} has an empty, '.' or '..' component")
    return key


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, skipping empty ones, and validate the result."""
    return check_key("/".join(p.strip("/") for p in parts if p and p.strip("/")))


def is_temp_key(key: str) -> bool:
    """Whether ``key`` names a backend's temporary object or file (see `TEMP_MARK`)."""
    return TEMP_MARK in key
