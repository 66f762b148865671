"""What every object-store backend's settings share: the ``scheme://bucket/prefix`` URI and the
limits of parts, reads, listings, retries and timeouts, each checked in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import BadInputError, IntegrityError
from ..keys import check_key
from .retry import RetryPolicy

__all__ = ["MiB", "ObjectStoreConfig", "parse_bucket_uri"]

MiB = 1024 * 1024


def parse_bucket_uri(uri: str, schemes: tuple[str, ...], service: str, bucket_re: re.Pattern[str],
                     bucket_rule: str, bucket_word: str = "bucket") -> tuple[str, str]:
    """``scheme://bucket/prefix`` -> (bucket, prefix without slashes at either end).

    ``schemes``: the accepted schemes (``("gs", "gcs")``), the first one shown in messages;
    ``bucket_re`` / ``bucket_rule``: the service's bucket (container) names and their rule in words.
    """
    example = f"{schemes[0]}://{bucket_word}/prefix"
    if not isinstance(uri, str) or not uri.lower().startswith(tuple(f"{s}://" for s in schemes)):
        raise BadInputError(f"{uri!r} is not {service} URI (expected {example})")
    bucket, _, prefix = uri.split("://", 1)[1].partition("/")
    if not bucket_re.match(bucket):
        raise BadInputError(f"{uri}: {bucket!r} is not a valid {bucket_word} name ({bucket_rule})")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except IntegrityError as exc:
            raise BadInputError(f"{uri}: invalid prefix: {exc}") from exc
    return bucket, prefix


@dataclass
class ObjectStoreConfig:
    """The options every object-store backend takes (see each storage's docstring for their meaning);
    a backend's config adds its own and calls :meth:`check_limits` from ``__post_init__``."""

    uri: str
    max_attempts: int = 5
    part_concurrency: int = 8
    single_put_threshold: int = 8 * MiB
    read_range_size: int = 16 * MiB
    connect_timeout: float = 10
    read_timeout: float = 60
    op_timeout: float | None = None
    list_page_size: int = 1000

    def check_limits(self, uri: str, **at_least_one: int) -> None:
        """Refuse a limit out of range, naming it (``at_least_one``: the backend's own sizes that must be >= 1)."""
        sizes = {"max_attempts": self.max_attempts, "part_concurrency": self.part_concurrency,
                 "read_range_size": self.read_range_size, "list_page_size": self.list_page_size, **at_least_one}
        bad = [f"{k}={v!r}" for k, v in sizes.items() if v < 1]
        if self.single_put_threshold < 0:
            bad.append(f"single_put_threshold={self.single_put_threshold!r}")
        if bad:
            raise BadInputError(
                f"{uri}: {', '.join(bad)} out of range: {', '.join(sizes)} must be >= 1, single_put_threshold >= 0"
            )
        if self.op_timeout is not None and self.op_timeout <= 0:
            raise BadInputError(f"{uri}: op_timeout must be > 0 seconds or None, not {self.op_timeout!r}")

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts)
