"""``nvidia_resiliency_ext.checkpointing.async_ckpt.cached_metadata_filesystem_reader``.

:class:`CachedMetadataFileSystemReader` is DCP's ``FileSystemReader`` whose metadata is read once
per checkpoint directory and shared by every reader of that directory (NVRx's behaviour).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from torch.distributed.checkpoint import FileSystemReader, Metadata

__all__ = ["CachedMetadataFileSystemReader"]


class CachedMetadataFileSystemReader(FileSystemReader):
    """A FileSystemReader caching ``.metadata`` per checkpoint path (class-wide).

    ``cache_metadata=False`` reads it from disk on every call.
    """

    _metadata_cache: ClassVar[dict[str, Metadata]] = {}

    def __init__(self, path: str | os.PathLike[str], cache_metadata: bool = True) -> None:
        super().__init__(path=path)
        self._cache_key = os.path.abspath(os.fspath(path)) if cache_metadata else None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata, from the cache when this directory was read before."""
        if self._cache_key is None or kwargs.get("rank") is not None:
            return super().read_metadata(*args, **kwargs)
        cache = CachedMetadataFileSystemReader._metadata_cache
        if self._cache_key not in cache:
            cache[self._cache_key] = super().read_metadata(*args, **kwargs)
        return cache[self._cache_key]

    @classmethod
    def clear_metadata_cache(cls, path: str | os.PathLike[str] | None = None) -> None:
        """Forget the cached metadata of ``path`` (every path when None)."""
        if path is None:
            cls._metadata_cache.clear()
        else:
            cls._metadata_cache.pop(os.path.abspath(os.fspath(path)), None)
