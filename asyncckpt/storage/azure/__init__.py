"""Azure Blob backend (azure-storage-blob's async client): block-blob uploads, parallel ranged reads that resume.

Modules: `config` (URI, options, credentials from the environment), `client` (one client per event
loop; every call translated and retried by the shared policy), `upload` (the block-blob state
machine), `errors` (azure-core errors translated into the storage error tree), `storage`.
"""

from __future__ import annotations

from typing import Any

from ..registry import register_backend
from .storage import AzureBlobStorage
from .upload import AzureWriter

__all__ = ["AzureBlobStorage", "AzureWriter"]


def _factory(uri: str, **options: Any) -> AzureBlobStorage:
    return AzureBlobStorage(uri, **options)


register_backend("az", _factory)
