"""Storage backends behind one small async protocol, chosen by URI (fsspec style)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..errors import BadInputError
from .base import ObjectWriter, Storage
from .keys import check_key, join_key
from .local import LocalStorage

__all__ = [
    "LocalStorage",
    "ObjectWriter",
    "Storage",
    "check_key",
    "join_key",
    "open_storage",
    "register_backend",
    "split_uri",
]

_BACKENDS: dict[str, Callable[..., Storage]] = {}


def register_backend(scheme: str, factory: Callable[..., Storage]) -> None:
    """Register ``factory(uri, **options)`` for URIs starting with ``scheme://``."""
    _BACKENDS[scheme] = factory


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def open_storage(uri: str | os.PathLike[str] | Storage, **options: Any) -> Storage:
    """Open the backend for ``uri``: a plain path or ``file://`` (local), ``s3://bucket/prefix`` (S3)."""
    if not isinstance(uri, (str, os.PathLike)):
        return uri
    uri = os.fspath(uri)
    if not uri:
        raise BadInputError("empty storage URI: give a directory, file://path or s3://bucket/prefix")
    scheme = _scheme(uri)
    if scheme in ("", "file"):
        path = uri[len("file://") :] if scheme == "file" else uri
        return LocalStorage(path, **{k: v for k, v in options.items() if k == "threads"})
    if scheme == "s3" and "s3" not in _BACKENDS:
        try:
            from . import s3 as _s3  # noqa: F401  (registers itself)
        except ImportError as exc:
            raise BadInputError(f"{uri}: the S3 backend needs `pip install asyncckpt[s3]` ({exc})") from exc
    factory = _BACKENDS.get(scheme)
    if factory is None:
        raise BadInputError(f"{uri}: unknown storage scheme {scheme!r} (known: file, s3{''.join(', ' + s for s in _BACKENDS if s != 's3')})")
    return factory(uri, **options)


def split_uri(uri: str | os.PathLike[str]) -> tuple[str, str]:
    """Split a checkpoint URI into (root URI, checkpoint name): ``s3://b/run/step-1`` -> (``s3://b/run``, ``step-1``)."""
    uri = os.fspath(uri)
    scheme = _scheme(uri)
    body = uri.split("://", 1)[1] if scheme else uri
    body = body.rstrip("/")
    if scheme == "s3" and "/" not in body:
        raise BadInputError(f"{uri}: an S3 checkpoint path needs a name after the bucket (s3://bucket/name)")
    head, _, name = body.rpartition("/")
    if not name or name in (".", ".."):
        raise BadInputError(f"{uri}: the checkpoint path must end in a name, not {name!r}")
    if scheme == "file":
        return f"file://{head or '/'}", name
    if scheme:
        return f"{scheme}://{head}", name
    return (head or ("/" if body.startswith("/") else ".")), name
