"""Storage backends behind one small async protocol, chosen by URI scheme (fsspec style).

``open_storage("/data/ckpt")``, ``open_storage("s3://bucket/run")``, ``open_storage("gs://bucket/run")``,
``open_storage("az://container/run")``; see `asyncckpt.storage.registry` for plug-ins.
"""

from __future__ import annotations

from .base import (
    AbortsIncompleteUploads,
    Capabilities,
    CleansTempFiles,
    DeletesMany,
    ListsByName,
    ObjectWriter,
    ReadsScattered,
    Storage,
    blocking_calls_here,
    blocking_calls_welcome,
)
from .keys import TEMP_MARK, check_key, join_key
from .local import LocalStorage
from .registry import (
    ENTRY_POINT_GROUP,
    check_scheme,
    known_schemes,
    open_storage,
    path_text,
    register_backend,
    scheme_of,
    split_uri,
    supports_uri,
    unregister_backend,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "TEMP_MARK",
    "AbortsIncompleteUploads",
    "Capabilities",
    "CleansTempFiles",
    "DeletesMany",
    "ListsByName",
    "LocalStorage",
    "ObjectWriter",
    "ReadsScattered",
    "Storage",
    "blocking_calls_here",
    "blocking_calls_welcome",
    "check_key",
    "check_scheme",
    "join_key",
    "known_schemes",
    "open_storage",
    "path_text",
    "register_backend",
    "scheme_of",
    "split_uri",
    "supports_uri",
    "unregister_backend",
]
