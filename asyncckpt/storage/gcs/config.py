"""GCS settings: the ``gs://bucket/prefix`` URI, the options, and the endpoint (cloud or emulator)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..objectstore.config import MiB, ObjectStoreConfig, parse_bucket_uri

__all__ = ["CLOUD_ENDPOINT", "MAX_COMPOSE", "GCSConfig", "MiB", "parse_gs_uri"]

CLOUD_ENDPOINT = "https://storage.googleapis.com"
MAX_COMPOSE = 32  # sources per compose request (GCS's limit)

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/prefix`` (or ``gcs://``) -> (bucket, prefix without slashes at either end)."""
    return parse_bucket_uri(uri, ("gs", "gcs"), "a GCS", _BUCKET_RE, "3-222 lower-case letters, digits, '.', '-', '_'")


@dataclass
class GCSConfig(ObjectStoreConfig):
    """Validated options of one `GCSStorage` (see its docstring for their meaning)."""

    endpoint_url: str | None = None
    service_file: str | None = None
    token: str | None = None
    anonymous: bool | None = None
    checksum: bool = True
    bucket: str = field(init=False)
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        uri = self.uri
        self.bucket, self.prefix = parse_gs_uri(uri)
        self.uri = f"gs://{self.bucket}/{self.prefix}" if self.prefix else f"gs://{self.bucket}"
        self.check_limits(uri)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator and not emulator.startswith(("http://", "https://")):
            emulator = f"http://{emulator}"
        endpoint = self.endpoint_url or emulator or CLOUD_ENDPOINT
        self.endpoint_url = endpoint.rstrip("/")
        if self.anonymous is None:
            # An emulator takes no credentials (as google-cloud-storage does with STORAGE_EMULATOR_HOST).
            self.anonymous = self.token is None and self.service_file is None and self.endpoint_url != CLOUD_ENDPOINT
