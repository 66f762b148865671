"""Whole-tree and whole-bucket snapshots: what a delete removed must be exactly what it was allowed to."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def snapshot_dir(root: Path) -> dict[str, str]:
    """Every file (content hash), symlink (target) and directory ("dir") under ``root``."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            p = Path(dirpath) / d
            out[str(p.relative_to(root))] = f"link:{os.readlink(p)}" if p.is_symlink() else "dir"
        for f in files:
            p = Path(dirpath) / f
            rel = str(p.relative_to(root))
            out[rel] = f"link:{os.readlink(p)}" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def snapshot_bucket(client: Any, bucket: str) -> dict[str, str]:
    """Every object of ``bucket`` with the hash of its bytes."""
    out: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []) or []:
            body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            out[o["Key"]] = hashlib.sha256(body).hexdigest()
    return out


def removed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """Entries gone; asserts that nothing that remains changed and nothing new appeared."""
    changed = {k for k in after if k in before and before[k] != after[k]}
    added = set(after) - set(before)
    assert not changed and not added, f"changed: {sorted(changed)}, added: {sorted(added)}"
    return set(before) - set(after)
