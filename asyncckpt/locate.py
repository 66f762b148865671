"""From a path as a user types it to what it is: a checkpoint, a root (meaning its ``latest``), or something else.

One resolver for :func:`asyncckpt.load`, :func:`asyncckpt.delete` and every CLI verb, so that
``ROOT`` means the checkpoint ``latest`` points to everywhere (a local directory and
``s3://bucket/prefix`` alike), and a path that holds no checkpoint is described, never misread.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import read_commit, read_latest
from .errors import BadInputError, CheckpointNotFoundError, NotACheckpointError, StorageError
from .format import COMMIT_FILE, LATEST_FILE, CommitRecord
from .storage import Storage, open_storage, path_text, split_uri

__all__ = ["Located", "describe_local", "is_missing_bucket", "local_path", "locate", "torch_save_format"]

# torch.save's legacy (pre-1.6, non-zip) files start with pickle protocol 2 and this magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_SHOW = 4  # names listed when describing what a path holds
_WALK_MAX = 1000  # files counted before a description stops walking


@dataclass
class Located:
    """A complete checkpoint found from a user's path; the caller closes ``storage`` (its root)."""

    storage: Storage
    name: str
    record: CommitRecord
    via_latest: bool  # the path was a root; ``name`` is what its ``latest`` points to

    @property
    def path(self) -> str:
        return f"{self.storage.uri.rstrip('/')}/{self.name}"


def local_path(path: str | os.PathLike[str]) -> Path | None:
    """The local path of a plain path or ``file://`` URI; None for other schemes."""
    p = path_text(path)
    if p.startswith("file://"):
        return Path(p[len("file://") :])
    return None if "://" in p else Path(p)


def is_missing_bucket(exc: BaseException) -> bool:
    """True for an S3 error saying the bucket does not exist (as the backend reports it)."""
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    return isinstance(exc, StorageError) and isinstance(response, dict) and (
        (response.get("Error") or {}).get("Code") == "NoSuchBucket"
    )


def torch_save_format(path: Path) -> str | None:
    """``"zip"`` or ``"legacy"`` when ``path`` is a file written by ``torch.save``, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError:
        return None
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
        return "zip" if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names) else None
    return None


def _names(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")


def describe_local(p: Path) -> str:
    """What a local path holds, in a few words (for refusals)."""
    if p.is_symlink() and not p.exists():
        return "a dangling symbolic link"
    if p.is_file():
        what = f"a file ({p.stat().st_size} bytes)"
        fmt = torch_save_format(p)
        if fmt is not None:
            what += (f", written by torch.save ({'zip' if fmt == 'zip' else 'legacy'} format): torch.load(path, "
                     "weights_only=True) reads it, and asyncckpt.load, `asyncckpt inspect`/`verify` accept it")
        return what
    if p.is_dir():
        files: list[str] = []
        for dirpath, dirs, fnames in os.walk(p):  # bounded: the path may be anyone's home directory
            dirs.sort()
            files += sorted(os.path.relpath(os.path.join(dirpath, f), p) for f in fnames)
            if len(files) > _WALK_MAX:
                return f"a directory holding more than {_WALK_MAX} files ({', '.join(files[:_SHOW])}, ...)"
        return f"a directory holding {len(files)} file(s)" + (f" ({_names(files)})" if files else "")
    return "neither a file nor a directory"


async def _describe_s3(parent: Storage | None, name: str, root: Storage) -> str:
    objects = await root.list("")
    if objects:
        return f"a prefix holding {len(objects)} object(s) ({_names(objects)})"
    if parent is not None and await parent.exists(name):
        return f"an object of {await parent.size(name)} bytes, not a prefix"
    return ""


async def locate(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> Located:
    """Resolve ``path`` (``ROOT/NAME``, or a ``ROOT`` meaning its ``latest``) to a complete checkpoint.

    Raises CheckpointNotFoundError when nothing is there (a missing directory, bucket or
    prefix) or nothing complete, NotACheckpointError for a file, and the record's own error
    (FormatError, IntegrityError) when a COMMIT or ``latest`` is damaged.
    """
    p = os.fspath(path)
    if not p:
        raise BadInputError("empty path: give ROOT/NAME or a ROOT (a directory, file://path or s3://bucket/prefix)")
    opts = dict(storage_options or {})
    lp = local_path(p)
    if lp is not None:
        if lp.is_file():
            raise NotACheckpointError(f"{p} is not a checkpoint: it is {describe_local(lp)}")
        if not lp.exists():
            raise CheckpointNotFoundError(f"{p}: no such file or directory")
    try:
        root, name = split_uri(p)
    except BadInputError:
        root, name = "", ""  # s3://bucket: a root only
    parent: Storage | None = None
    try:
        if root:
            parent = open_storage(root, **opts)
            try:
                rec = await read_commit(parent, name)
            except CheckpointNotFoundError:
                pass
            else:
                found, parent = parent, None
                return Located(found, name, rec, False)
        storage = open_storage(p, **opts)
        try:
            latest = await read_latest(storage)
            if latest is not None:
                try:
                    rec = await read_commit(storage, latest.name)
                except CheckpointNotFoundError as exc:
                    raise CheckpointNotFoundError(
                        f"{p}: '{LATEST_FILE}' points to {latest.name!r}, which is not a complete checkpoint ({exc}); "
                        "`asyncckpt ls ROOT` lists what is there"
                    ) from exc
                if parent is not None:
                    await parent.close()
                    parent = None
                return Located(storage, latest.name, rec, True)
            holds = describe_local(lp) if lp is not None else await _describe_s3(parent, name, storage)
        except BaseException:
            await storage.close()
            raise
        await storage.close()
    except StorageError as exc:
        if is_missing_bucket(exc):
            raise CheckpointNotFoundError(f"{p}: {exc}") from exc
        raise
    finally:
        if parent is not None:
            await parent.close()
    if lp is None and not holds:
        raise CheckpointNotFoundError(f"{p}: nothing there (no object and no prefix with objects)")
    raise CheckpointNotFoundError(
        f"{p} is not a complete checkpoint (no {COMMIT_FILE} record) nor a root with a '{LATEST_FILE}' pointer; "
        f"it is {holds}. `asyncckpt ls ROOT` lists what is there"
    )
