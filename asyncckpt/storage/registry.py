"""The backend registry: a URI's scheme picks the backend (fsspec style).

Three sources, in this order:

1. factories registered at run time with `register_backend` (tests, embedding code);
2. the built-in backends, imported lazily on first use (``s3``, ``gs``/``gcs``, ``az``), each
   behind an optional extra: a missing extra is a `BadInputError` naming it
   (``pip install asyncckpt[gcs]``);
3. third-party backends, found by entry point in the group ``asyncckpt.storage``: an entry point
   named after the scheme whose object is ``factory(uri, **options) -> Storage`` (a class works).

Plain paths and ``file://`` URIs are the local backend.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import BadInputError
from .base import Storage
from .local import LocalStorage

__all__ = [
    "ENTRY_POINT_GROUP",
    "BuiltinBackend",
    "builtin_backends",
    "check_scheme",
    "known_schemes",
    "open_storage",
    "path_text",
    "register_backend",
    "scheme_of",
    "split_uri",
    "supports_uri",
    "unregister_backend",
]

ENTRY_POINT_GROUP = "asyncckpt.storage"

Factory = Callable[..., Storage]


@dataclass(frozen=True)
class BuiltinBackend:
    """A backend shipped with asyncckpt: the module that registers it, and the extra it needs."""

    module: str
    extra: str
    example: str


_BUILTIN: dict[str, BuiltinBackend] = {
    "s3": BuiltinBackend("asyncckpt.storage.s3", "s3", "s3://bucket/prefix"),
    "gs": BuiltinBackend("asyncckpt.storage.gcs", "gcs", "gs://bucket/prefix"),
    "gcs": BuiltinBackend("asyncckpt.storage.gcs", "gcs", "gs://bucket/prefix"),
    "az": BuiltinBackend("asyncckpt.storage.azure", "azure", "az://container/prefix"),
}

_BACKENDS: dict[str, Factory] = {}
_LOCK = threading.Lock()


def register_backend(scheme: str, factory: Factory) -> None:
    """Register ``factory(uri, **options)`` for URIs starting with ``scheme://`` (replaces an earlier one)."""
    if not isinstance(scheme, str) or not scheme.isascii() or not scheme.replace("+", "").replace("-", "").isalnum():
        raise BadInputError(f"storage scheme {scheme!r} must be letters, digits, '+' or '-'")
    with _LOCK:
        _BACKENDS[scheme.lower()] = factory


def unregister_backend(scheme: str) -> None:
    """Forget a registered factory (a plug-in or built-in is looked up again on next use)."""
    with _LOCK:
        _BACKENDS.pop(scheme.lower(), None)


def builtin_backends() -> dict[str, BuiltinBackend]:
    """The built-in schemes and the extra each needs."""
    return dict(_BUILTIN)


def scheme_of(uri: str | os.PathLike[str]) -> str:
    """The lower-case scheme of ``uri`` (``""`` for a plain path)."""
    text = os.fspath(uri)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def _entry_point(scheme: str) -> Factory | None:
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=scheme)
    except Exception:  # noqa: BLE001 - a broken distribution must not hide the built-ins
        return None
    for ep in eps:
        try:
            factory = ep.load()
        except Exception as exc:
            raise BadInputError(
                f"{scheme}://: the storage plug-in {ep.value!r} (entry point {ep.name!r} in group "
                f"{ENTRY_POINT_GROUP!r}) failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        if not callable(factory):
            raise BadInputError(f"{scheme}://: entry point {ep.value!r} is not callable (want factory(uri, **options))")
        return factory  # type: ignore[no-any-return]
    return None


def _factory(scheme: str, uri: str) -> Factory | None:
    with _LOCK:
        factory = _BACKENDS.get(scheme)
    if factory is not None:
        return factory
    builtin = _BUILTIN.get(scheme)
    if builtin is not None:
        try:
            importlib.import_module(builtin.module)  # registers itself
        except ImportError as exc:
            raise BadInputError(
                f"{uri}: the {scheme}:// backend needs an optional extra: `pip install asyncckpt[{builtin.extra}]` "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        with _LOCK:
            return _BACKENDS.get(scheme)
    factory = _entry_point(scheme)
    if factory is not None:
        register_backend(scheme, factory)
    return factory


def known_schemes() -> list[str]:
    """Every scheme `open_storage` can serve now (without importing anything)."""
    with _LOCK:
        registered = set(_BACKENDS)
    try:
        plugins = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # noqa: BLE001
        plugins = set()
    return sorted({"file", *_BUILTIN, *registered, *plugins})


def supports_uri(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` is a plain path or a URI whose scheme some backend serves (nothing is imported)."""
    scheme = scheme_of(uri)
    return scheme in ("", "file") or scheme in known_schemes()


def check_scheme(uri: str | os.PathLike[str]) -> None:
    """Refuse ``uri`` (BadInputError) when no backend serves its scheme or its extra is missing; opens nothing."""
    text = os.fspath(uri)
    scheme = scheme_of(text)
    if scheme in ("", "file"):
        return
    if _factory(scheme, text) is None:
        raise BadInputError(
            f"{text}: unknown storage scheme {scheme!r} (known: {', '.join(known_schemes())}; a plug-in "
            f"registers more with an entry point in group {ENTRY_POINT_GROUP!r})"
        )


def open_storage(uri: str | os.PathLike[str] | Storage, **options: Any) -> Storage:
    """Open the backend for ``uri``: a path or ``file://`` (local), ``s3://``, ``gs://``, ``az://``, or a plug-in's.

    ``options`` go to the backend's constructor (e.g. ``endpoint_url=``); a `Storage` is returned as is.
    """
    if not isinstance(uri, (str, os.PathLike)):
        return uri
    text = os.fspath(uri)
    if not text:
        raise BadInputError("empty storage URI: give a directory, file://path, s3://bucket/prefix, gs://... or az://...")
    scheme = scheme_of(text)
    if scheme in ("", "file"):
        path = text[len("file://") :] if scheme == "file" else text
        return LocalStorage(path, **{k: v for k, v in options.items() if k in ("threads", "direct_io")})
    factory = _factory(scheme, text)
    if factory is None:
        raise BadInputError(
            f"{text}: unknown storage scheme {scheme!r} (known: {', '.join(known_schemes())}; a plug-in "
            f"registers more with an entry point in group {ENTRY_POINT_GROUP!r})"
        )
    return factory(text, **options)


def path_text(uri: str | os.PathLike[str]) -> str:
    """``os.fspath(uri)``, refusing bytes and anything that is not a path with a BadInputError."""
    try:
        text = os.fspath(uri)
    except TypeError:
        text = None
    if not isinstance(text, str):
        raise BadInputError(f"a checkpoint path must be a str or an os.PathLike of str, not {type(uri).__name__}: {uri!r}")
    return text


def split_uri(uri: str | os.PathLike[str]) -> tuple[str, str]:
    """Split a checkpoint URI into (root URI, checkpoint name): ``s3://b/run/step-1`` -> (``s3://b/run``, ``step-1``)."""
    text = path_text(uri)
    scheme = scheme_of(text)
    body = text.split("://", 1)[1] if scheme else text
    body = body.rstrip("/")
    if scheme not in ("", "file") and "/" not in body:
        raise BadInputError(
            f"{text}: a {scheme}:// checkpoint path needs a name after the bucket or container "
            f"({scheme}://bucket/name)"
        )
    head, _, name = body.rpartition("/")
    if not name or name in (".", ".."):
        raise BadInputError(f"{text}: the checkpoint path must end in a name, not {name!r}")
    if scheme == "file":
        return f"file://{head or '/'}", name
    if scheme:
        return f"{scheme}://{head}", name
    return (head or ("/" if body.startswith("/") else ".")), name
