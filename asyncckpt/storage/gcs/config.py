"""GCS settings: the ``gs://bucket/prefix`` URI, the options, and the endpoint (cloud or emulator)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ...errors import BadInputError, IntegrityError
from ..keys import check_key
from ..objectstore import RetryPolicy

__all__ = ["CLOUD_ENDPOINT", "MAX_COMPOSE", "GCSConfig", "MiB", "parse_gs_uri"]

MiB = 1024 * 1024
CLOUD_ENDPOINT = "https://storage.googleapis.com"
MAX_COMPOSE = 32  # sources per compose request (GCS's limit)

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/prefix`` (or ``gcs://``) -> (bucket, prefix without slashes at either end)."""
    if not isinstance(uri, str) or not uri.lower().startswith(("gs://", "gcs://")):
        raise BadInputError(f"{uri!r} is not a GCS URI (expected gs://bucket/prefix)")
    bucket, _, prefix = uri.split("://", 1)[1].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise BadInputError(f"{uri}: {bucket!r} is not a valid bucket name (3-222 lower-case letters, digits, '.', '-', '_')")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except IntegrityError as exc:
            raise BadInputError(f"{uri}: invalid prefix: {exc}") from exc
    return bucket, prefix


@dataclass
class GCSConfig:
    """Validated options of one `GCSStorage` (see its docstring for their meaning)."""

    uri: str
    endpoint_url: str | None = None
    service_file: str | None = None
    token: str | None = None
    anonymous: bool | None = None
    max_attempts: int = 5
    part_concurrency: int = 8
    single_put_threshold: int = 8 * MiB
    read_range_size: int = 16 * MiB
    connect_timeout: float = 10
    read_timeout: float = 60
    op_timeout: float | None = None
    checksum: bool = True
    list_page_size: int = 1000
    bucket: str = field(init=False)
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        uri = self.uri
        self.bucket, self.prefix = parse_gs_uri(uri)
        self.uri = f"gs://{self.bucket}/{self.prefix}" if self.prefix else f"gs://{self.bucket}"
        if (
            self.max_attempts < 1
            or self.part_concurrency < 1
            or self.read_range_size < 1
            or self.single_put_threshold < 0
            or self.list_page_size < 1
        ):
            raise BadInputError(
                f"{uri}: max_attempts, part_concurrency and read_range_size must be >= 1, single_put_threshold >= 0"
            )
        if self.op_timeout is not None and self.op_timeout <= 0:
            raise BadInputError(f"{uri}: op_timeout must be > 0 seconds or None, not {self.op_timeout!r}")
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator and not emulator.startswith(("http://", "https://")):
            emulator = f"http://{emulator}"
        endpoint = self.endpoint_url or emulator or CLOUD_ENDPOINT
        self.endpoint_url = endpoint.rstrip("/")
        if self.anonymous is None:
            # An emulator takes no credentials (as google-cloud-storage does with STORAGE_EMULATOR_HOST).
            self.anonymous = self.token is None and self.service_file is None and self.endpoint_url != CLOUD_ENDPOINT

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts)
