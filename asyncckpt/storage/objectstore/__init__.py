"""Helpers every network object-store backend shares (S3, GCS, Azure Blob).

- `retry`: one retry policy (bounded attempts, jittered exponential backoff) over the storage
  error tree: only a `TransientStorageError` is retried.
- `timeouts`: a per-call timeout (``op_timeout``) that tells its own expiry apart from the
  client's socket timeouts.
- `loops`: one client per running event loop, created lazily, closed per loop.
- `reads`: parallel ranged reads straight into the caller's buffer, each range resumed after a
  cut body from the first byte not yet received, pinned to the first response's version.
- `writers`: `PartWriter`, the part upload / commit / abort flow every backend's writer shares, and
  its state (open / committed / aborted / failed).
- `config`: `ObjectStoreConfig`, the options every backend takes (parts, reads, listings, retries,
  timeouts) checked once, and `parse_bucket_uri`.
- `prefixed`: `PrefixedStore`, the key mapping and read flow every backend shares above its
  HEAD, LIST and ranged GET.
"""

from __future__ import annotations

from .config import ObjectStoreConfig, parse_bucket_uri
from .loops import PerLoop
from .prefixed import PrefixedStore
from .reads import GetRange, Progress, read_ranges, resumable_fetch
from .retry import RetryPolicy, retrying
from .timeouts import timed
from .writers import PartWriter, WriterState, buffer_part, checked_part

__all__ = ["GetRange", "ObjectStoreConfig", "PartWriter", "PerLoop", "PrefixedStore", "Progress", "RetryPolicy", "WriterState", "buffer_part", "checked_part", "parse_bucket_uri", "read_ranges", "resumable_fetch", "retrying", "timed"]
