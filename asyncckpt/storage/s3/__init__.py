"""S3 backend (aiobotocore): streaming multipart uploads, parallel ranged reads that resume.

Modules: `config` (URI and options), `client` (one aiobotocore client per event loop and the
shared request helpers), `upload` (the multipart upload state machine), `errors` (botocore and
aiohttp errors translated into the storage error tree), `storage` (`S3Storage`).
"""

from __future__ import annotations

from typing import Any

from ..registry import register_backend
from .config import MIN_PART_SIZE
from .storage import S3Storage
from .upload import S3Writer

__all__ = ["MIN_PART_SIZE", "S3Storage", "S3Writer"]

# The writer's name before the split into modules; the torture harness (tests/torture/_inject.py)
# patches it. Deprecated: use S3Writer.
_S3Writer = S3Writer


def _factory(uri: str, **options: Any) -> S3Storage:
    return S3Storage(uri, **options)


register_backend("s3", _factory)
