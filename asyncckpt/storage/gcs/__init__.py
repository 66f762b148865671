"""GCS backend (aiohttp on the JSON API, gcloud-aio-auth for credentials): composite parallel uploads with
CRC32C checked by the store, parallel ranged reads that resume.

Modules: `config` (URI, options, emulator endpoint), `client` (one session and token per event
loop; every call translated and retried by the shared policy), `upload` (the composite upload
state machine), `errors` (HTTP errors translated into the storage error tree), `storage`.
"""

from __future__ import annotations

from typing import Any

from ..registry import register_backend
from .storage import GCSStorage
from .upload import GCSWriter

__all__ = ["GCSStorage", "GCSWriter"]


def _factory(uri: str, **options: Any) -> GCSStorage:
    return GCSStorage(uri, **options)


register_backend("gs", _factory)
register_backend("gcs", _factory)
