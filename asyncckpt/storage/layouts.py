"""Key layouts for a checkpoint's data files, to spread load over S3 key-space partitions.

S3 scales request rates per key prefix; many ranks writing ``NAME/rank-*.data`` at once all hit
one prefix. A layout moves only the *data* files under a spread-out prefix (as s3dlio does):

- ``flat``:       ``NAME``                 (the default; what a local directory uses)
- ``hashed``:     ``HH/NAME``              (HH: hex digits of a stable hash of NAME, modulo n)
- ``roundrobin``: ``pNN/NAME``             (NN: step % n, so consecutive checkpoints alternate)

Manifests and the COMMIT record always stay at ``NAME/`` so a checkpoint is found by its name;
the manifest records the layout (and n) so a load finds the data again.
"""

from __future__ import annotations

import hashlib

from ..errors import BadInputError, IntegrityError
from .keys import check_key

__all__ = ["DEFAULT_SPREAD", "LAYOUTS", "data_prefix"]

LAYOUTS: tuple[str, ...] = ("flat", "hashed", "roundrobin")
DEFAULT_SPREAD = 16
_MAX_SPREAD = 65536


def _name_hash(name: str) -> int:
    """A hash of ``name`` that is the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def data_prefix(layout: str, name: str, step: int | None = None, root_name_hash_n: int = DEFAULT_SPREAD) -> str:
    """The key prefix (no trailing ``/``) under which checkpoint ``name`` stores its data files.

    ``root_name_hash_n`` is how many distinct spread prefixes ``hashed`` and ``roundrobin`` use.
    ``roundrobin`` without a step falls back to the name's hash.
    """
    if layout not in LAYOUTS:
        raise BadInputError(f"unknown key layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not isinstance(name, str) or not name or "/" in name:
        raise BadInputError(f"checkpoint name {name!r} must be one non-empty key component (no '/')")
    try:
        check_key(name)
    except IntegrityError as exc:
        raise BadInputError(f"checkpoint name {name!r} is not a valid storage key: {exc}") from exc
    if isinstance(root_name_hash_n, bool) or not isinstance(root_name_hash_n, int):
        raise BadInputError(f"root_name_hash_n must be an int, not {root_name_hash_n!r}")
    if not 1 <= root_name_hash_n <= _MAX_SPREAD:
        raise BadInputError(f"root_name_hash_n must be between 1 and {_MAX_SPREAD}, not {root_name_hash_n}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 1 << 63):
        # the records store it as a signed 64-bit integer
        raise BadInputError(f"step must be a non-negative int below 2**63 or None, not {step!r}")
    n = root_name_hash_n
    if layout == "flat":
        return name
    if layout == "hashed":
        width = max(2, len(f"{n - 1:x}"))
        return f"{_name_hash(name) % n:0{width}x}/{name}"
    slot = (step if step is not None else _name_hash(name)) % n
    width = max(2, len(str(n - 1)))
    return f"p{slot:0{width}d}/{name}"
