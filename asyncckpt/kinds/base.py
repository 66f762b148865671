"""The seam between checkpoint kinds and the code that reads, checks, lists and deletes them.

A checkpoint's kind is the ``kind`` of its COMMIT record (``"asyncckpt"``, ``"dcp"``) or, for a
single local file written by ``torch.save``, what the file's first bytes say. Load, the CLI,
the catalog and deletion look the handler up here and ask it; none of them tests a kind string.

Call order, for a kind that writes a COMMIT record (the catalog has read and checked it):

1. :func:`kind_of` (``record.kind`` -> handler; an unknown kind is a :class:`FormatError`);
2. ``asyncckpt ls`` / ``list_checkpoints(check=True)``: :meth:`CheckpointKind.checks`
   (records and data sizes, no data read);
3. ``asyncckpt.load``: :meth:`CheckpointKind.load`; ``asyncckpt verify``:
   :meth:`CheckpointKind.verify`; ``asyncckpt inspect``/``export``:
   :meth:`CheckpointKind.rank_manifest`;
4. an overwrite's commit and deletion: :meth:`CheckpointKind.generation_files` (the keys one
   committed generation's records name) and :meth:`CheckpointKind.data_layout`.

For a file kind (a :class:`FileKind`: one local file, no COMMIT): :func:`kind_of_file`
(:meth:`FileKind.detect_file`), then :meth:`FileKind.load_file` (``asyncckpt.load``,
``asyncckpt inspect``) / :meth:`FileKind.verify_file` (``asyncckpt verify``).

A new kind subclasses :class:`CheckpointKind` and calls :func:`register_kind` with an instance.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import BadInputError, CheckpointNotFoundError, FormatError
from ..format import CommitRecord

if TYPE_CHECKING:
    from ..format import RankManifest
    from ..storage import Storage

__all__ = [
    "CheckpointKind",
    "FileKind",
    "GenerationFiles",
    "RecordProbe",
    "VerifyReport",
    "kind_named",
    "kind_of",
    "kind_of_file",
    "kinds",
    "register_kind",
    "unregister_kind",
]

Progress = Callable[[int], Any]


@dataclass
class VerifyReport:
    """What :meth:`CheckpointKind.verify` read and found."""

    files: int = 0  #: files read (records and data)
    checked: int = 0  #: bytes read and checked against their checksums
    problems: list[str] = field(default_factory=list)  #: what failed, each naming the file
    summary: str = ""  #: for file kinds: what was checked, in words (the CLI prints it after "OK path:")


@dataclass
class GenerationFiles:
    """The root-relative keys one committed generation's records name (records and data)."""

    keys: list[str] = field(default_factory=list)
    shared: bool = False  #: other checkpoints may reference some of them (incremental saves)
    problems: list[str] = field(default_factory=list)  #: records that could not be read (their files not listed)


class RecordProbe:
    """The cheap checks' access to storage: reads and sizes, at most ``sem`` at once."""

    def __init__(self, storage: Storage, sem: asyncio.Semaphore) -> None:
        self.storage, self.sem = storage, sem

    async def read(self, key: str) -> bytes:
        async with self.sem:
            return await self.storage.read(key)

    async def size(self, key: str) -> int | None:
        """The size of ``key``; None when it is missing."""
        async with self.sem:
            try:
                return await self.storage.size(key)
            except CheckpointNotFoundError:
                return None

    async def check_size(self, key: str, want: int, what: str) -> str:
        """"" when ``key`` has ``want`` bytes, else what is wrong (``what`` says who recorded the size)."""
        size = await self.size(key)
        if size is None:
            return f"{self.storage.uri}/{key} is missing"
        if size == want:
            return ""
        return (f"{self.storage.uri}/{key} is {size} bytes, {what} says {want} "
                f"({'truncated' if size < want else 'extended'})")


class CheckpointKind(ABC):
    """One kind of checkpoint: how it is checked, loaded, verified and which files it owns.

    Methods taking ``(storage, name, rec)`` get the root's storage, the checkpoint's name under
    it and its COMMIT record (already checked against its own checksum). File kinds (no COMMIT)
    subclass :class:`FileKind` instead.
    """

    #: the ``kind`` its COMMIT records carry (file kinds: a name for messages)
    name: ClassVar[str]
    #: how a user reads it where asyncckpt's own reader does not (named in refusals)
    reader: ClassVar[str]
    #: its ranks' records are asyncckpt RankManifests: it loads with ``asyncckpt.load``, a manager
    #: restores from it and an incremental save can use it as its base
    has_rank_manifests: ClassVar[bool] = False
    #: a single local file (a :class:`FileKind`), never named by a COMMIT record
    file_kind: ClassVar[bool] = False

    def path(self, storage: Storage, name: str) -> str:
        return f"{storage.uri.rstrip('/')}/{name}"

    def refusal(self, where: str, verb: str) -> BadInputError:
        """The error for a CLI verb this kind does not support."""
        return BadInputError(f"{where} is a {self.name!r} checkpoint; `asyncckpt {verb}` reads asyncckpt-format "
                             f"checkpoints ({self.reader})")

    # -- kinds with a COMMIT record --------------------------------------------------------------
    @abstractmethod
    def checks(self, storage: Storage, name: str, rec: CommitRecord, probe: RecordProbe) -> list[Awaitable[str]]:
        """The cheap checks (records present, matching COMMIT and decoding; data sizes), one awaitable
        per record, each returning "" or what failed; they may also raise FormatError/IntegrityError."""

    @abstractmethod
    async def generation_files(self, storage: Storage, name: str, rec: CommitRecord) -> GenerationFiles:
        """The keys ``rec``'s records name: what an overwrite keeps of the new generation and removes of the
        replaced one (besides the rank-file names the format reserves directly under ``NAME/``)."""

    def data_layout(self, rec: CommitRecord) -> tuple[str, int | None, int, int] | None:
        """(key layout, step, world size, generation) where the data files of ranks whose record cannot be
        read lie (deletion looks there); None when the kind keeps every file directly under ``NAME/``."""
        return None

    async def load(self, storage: Storage, name: str, rec: CommitRecord, *, rank: int | None, allow_pickle: bool,
                   keys: Collection[str | int] | None) -> Any:
        """One rank's state, every checksum verified (``asyncckpt.load``)."""
        raise BadInputError(f"{self.path(storage, name)} is a {self.name!r} checkpoint, which asyncckpt.load does "
                            f"not read: {self.reader}")

    @abstractmethod
    async def verify(self, storage: Storage, name: str, rec: CommitRecord, progress: Progress,
                     total: Callable[[int], Any]) -> VerifyReport:
        """Read every byte and check every checksum (``asyncckpt verify``). ``total(n)`` announces the bytes
        it will read, once, before ``progress(n)`` reports them as read."""

    async def rank_manifest(self, storage: Storage, name: str, rec: CommitRecord, rank: int, verb: str
                            ) -> RankManifest:
        """Rank ``rank``'s manifest, checked against COMMIT (``asyncckpt inspect``/``export``, CLI verb ``verb``);
        kinds whose ranks have no manifest refuse (BadInputError naming their reader)."""
        raise self.refusal(self.path(storage, name), verb)

    # -- file kinds (one local file, no COMMIT): see FileKind ------------------------------------
    def detect_file(self, path: Path) -> str | None:
        """The variant of this kind ``path`` is (e.g. ``"zip"``), or None when it is not one."""
        return None


class FileKind(CheckpointKind):
    """A kind that is one local file with no COMMIT record (found by :meth:`detect_file`).

    No COMMIT names it (:func:`kind_of` refuses its name), so the record-side methods refuse too.
    """

    file_kind: ClassVar[bool] = True

    def _no_record(self, storage: Storage, name: str) -> FormatError:
        return FormatError(f"{self.path(storage, name)}: a {self.name} checkpoint is a single file, never named by "
                           "a COMMIT record")

    def checks(self, storage: Storage, name: str, rec: CommitRecord, probe: RecordProbe) -> list[Awaitable[str]]:
        raise self._no_record(storage, name)

    async def generation_files(self, storage: Storage, name: str, rec: CommitRecord) -> GenerationFiles:
        raise self._no_record(storage, name)

    async def verify(self, storage: Storage, name: str, rec: CommitRecord, progress: Progress,
                     total: Callable[[int], Any]) -> VerifyReport:
        raise self._no_record(storage, name)

    @abstractmethod
    def detect_file(self, path: Path) -> str | None:
        """The variant of this kind ``path`` is (e.g. ``"zip"``), or None when it is not one."""

    @abstractmethod
    def load_file(self, path: Path, variant: str, *, allow_pickle: bool = False) -> Any:
        """The file's object; unpickling arbitrary classes only with ``allow_pickle``."""

    @abstractmethod
    def verify_file(self, path: Path, variant: str) -> VerifyReport:
        """Read the whole file and check what checksums it has; ``summary`` says what was checked."""


_KINDS: dict[str, CheckpointKind] = {}
_BUILTINS_LOADED = False


def _builtins() -> None:
    """Register the built-in kinds on first use (their modules import the catalog, which imports this)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from . import native, dcp, torch_file  # noqa: F401, I001  (each registers its kind; native first)


def register_kind(kind: CheckpointKind, *, replace: bool = False) -> CheckpointKind:
    """Make ``kind`` the handler of COMMIT records of kind ``kind.name`` (and of the files it detects)."""
    _builtins()
    if not isinstance(kind, CheckpointKind):
        raise BadInputError(f"register_kind takes a CheckpointKind instance, not {type(kind).__name__}")
    if kind.name in _KINDS and not replace and _KINDS[kind.name] is not kind:
        raise BadInputError(f"checkpoint kind {kind.name!r} is registered already; pass replace=True to replace it")
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    _builtins()
    _KINDS.pop(name, None)


def kinds() -> list[CheckpointKind]:
    """Every registered kind, built-in ones first."""
    _builtins()
    return list(_KINDS.values())


def kind_named(name: str) -> CheckpointKind | None:
    _builtins()
    return _KINDS.get(name)


def kind_of(rec: CommitRecord, where: str) -> CheckpointKind:
    """The handler of ``rec``; FormatError naming the kind when none is registered (``where``: the checkpoint)."""
    kind = kind_named(rec.kind)
    if kind is None or kind.file_kind:
        from .. import __version__

        known = ", ".join(repr(k.name) for k in kinds() if not k.file_kind)
        raise FormatError(
            f"{where}: checkpoint kind {rec.kind!r} is unknown to asyncckpt {__version__} (it reads {known}); it was "
            f"written by a newer asyncckpt or a plug-in: upgrade asyncckpt (or import the plug-in that registers "
            f"{rec.kind!r}) to read it"
        )
    return kind


def kind_of_file(path: Path) -> tuple[FileKind, str] | None:
    """(handler, variant) of the file kind that ``path`` (a local regular file) is, or None."""
    if not path.is_file():
        return None
    for kind in kinds():
        if isinstance(kind, FileKind):
            variant = kind.detect_file(path)
            if variant is not None:
                return kind, variant
    return None
