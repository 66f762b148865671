"""Hypothesis settings and case counters of the torture suite.

``TORTURE_EXAMPLES`` sets the hypothesis examples per property (CI default 25),
``TORTURE_SEED`` the hypothesis seed (default: derandomized, the same cases every run), and
``TORTURE_STATS=FILE`` makes the pytest session write its counts (cases tried per kind) as JSON.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, seed, settings

EXAMPLES = int(os.environ.get("TORTURE_EXAMPLES", "25"))
SEED = os.environ.get("TORTURE_SEED")
COUNTS: Counter[str] = Counter()


def fuzz(examples: int | None = None) -> Callable[[Any], Any]:
    """hypothesis settings of the suite: bounded (``TORTURE_EXAMPLES`` overrides every property's count), no deadline, reproducible."""

    def deco(fn: Any) -> Any:
        n = EXAMPLES if "TORTURE_EXAMPLES" in os.environ else (examples or EXAMPLES)
        s = settings(
            max_examples=n,
            deadline=None,
            derandomize=SEED is None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large],
        )
        fn = s(fn)
        return seed(int(SEED))(fn) if SEED is not None else fn

    return deco


def count(kind: str, n: int = 1) -> None:
    COUNTS[kind] += n
