"""S3 settings: the URI, the options, and the botocore Config built from them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from botocore.config import Config

from ...errors import BadInputError
from ..objectstore.config import MiB, ObjectStoreConfig, parse_bucket_uri

__all__ = ["MIN_PART_SIZE", "MiB", "S3Config", "parse_s3_uri"]

MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at either end)."""
    return parse_bucket_uri(uri, ("s3",), "an S3", _BUCKET_RE, "3-63 letters, digits, '.', '-' or '_'")


@dataclass
class S3Config(ObjectStoreConfig):
    """Validated options of one `S3Storage` (see its docstring for their meaning)."""

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    profile: str | None = None
    conditional_writes: bool | str = "auto"
    checksum: bool = True
    addressing_style: str | None = None
    bucket: str = field(init=False)
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        uri = self.uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.check_limits(uri)
        if self.conditional_writes not in (True, False, "auto"):
            raise BadInputError(
                f"{uri}: conditional_writes must be True, False or 'auto', not {self.conditional_writes!r}"
            )
        if self.addressing_style not in (None, "auto", "path", "virtual"):
            raise BadInputError(
                f"{uri}: addressing_style must be 'auto', 'path' or 'virtual', not {self.addressing_style!r}"
            )

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
