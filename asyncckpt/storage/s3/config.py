"""S3 settings: the URI, the options, and the botocore Config built from them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from botocore.config import Config

from ...errors import BadInputError, IntegrityError
from ..keys import check_key
from ..objectstore import RetryPolicy

__all__ = ["MIN_PART_SIZE", "MiB", "S3Config", "parse_s3_uri"]

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at either end)."""
    if not isinstance(uri, str) or not uri.lower().startswith("s3://"):
        raise BadInputError(f"{uri!r} is not an S3 URI (expected s3://bucket/prefix)")
    bucket, _, prefix = uri[5:].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise BadInputError(f"{uri}: {bucket!r} is not a valid bucket name (3-63 letters, digits, '.', '-' or '_')")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except IntegrityError as exc:
            raise BadInputError(f"{uri}: invalid prefix: {exc}") from exc
    return bucket, prefix


@dataclass
class S3Config:
    """Validated options of one `S3Storage` (see its docstring for their meaning)."""

    uri: str
    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    profile: str | None = None
    max_attempts: int = 5
    part_concurrency: int = 8
    single_put_threshold: int = 8 * MiB
    read_range_size: int = 16 * MiB
    connect_timeout: float = 10
    read_timeout: float = 60
    op_timeout: float | None = None
    conditional_writes: bool | str = "auto"
    checksum: bool = True
    addressing_style: str | None = None
    list_page_size: int = 1000
    bucket: str = field(init=False)
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        uri = self.uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
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
        if self.conditional_writes not in (True, False, "auto"):
            raise BadInputError(
                f"{uri}: conditional_writes must be True, False or 'auto', not {self.conditional_writes!r}"
            )
        if self.op_timeout is not None and self.op_timeout <= 0:
            raise BadInputError(f"{uri}: op_timeout must be > 0 seconds or None, not {self.op_timeout!r}")
        if self.addressing_style not in (None, "auto", "path", "virtual"):
            raise BadInputError(
                f"{uri}: addressing_style must be 'auto', 'path' or 'virtual', not {self.addressing_style!r}"
            )

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts)

    def credentials(self) -> dict[str, str]:
        return {
            k: v
            for k, v in (
                ("aws_access_key_id", self.aws_access_key_id),
                ("aws_secret_access_key", self.aws_secret_access_key),
                ("aws_session_token", self.aws_session_token),
            )
            if v is not None
        }

    def botocore_config(self) -> Config:
        style = self.addressing_style
        if style is None:
            custom = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            style = "path" if custom else "auto"
        opts: dict[str, Any] = {
            "region_name": self.region_name,
            "retries": {"total_max_attempts": self.max_attempts, "mode": "standard"},
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_pool_connections": max(10, 2 * self.part_concurrency),
            # We send our own CRC32C where wanted; never let botocore checksum every body itself.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "s3": {"addressing_style": style},
        }
        return Config(**opts)
