"""What asyncckpt adds to a DCP checkpoint directory, and how it reads DCP's pickled metadata safely.

A checkpoint written by :class:`~asyncckpt.dcp.AsyncStorageWriter` is a plain DCP checkpoint::

    NAME/__0_0.distcp       rank 0's items, each serialized exactly as FileSystemWriter does
    NAME/__1_0.distcp       (tensors with torch.save, bytes items raw)
    NAME/.metadata          pickled DCP Metadata (storage_data: MetadataIndex -> _StorageInfo), last

plus records that the stock FileSystemReader never opens::

    NAME/__0.checksums      rank 0's items: file, offset, length, CRC32C (msgpack; by rank 0's worker)
    NAME/.checksums         every item plus the CRC32C of .metadata (msgpack; before .metadata)
    NAME/COMMIT             asyncckpt commit record of kind "dcp" (after .metadata)

Overwritten (``overwrite=True`` over a committed checkpoint of generation G), the new save
writes generation G+1 beside the old one - ``__R_I.gG+1.distcp``, ``__R.gG+1.checksums``,
``.gG+1.checksums`` and ``.gG+1.metadata`` (a copy of its DCP metadata) - then switches
atomically: COMMIT (asyncckpt's readers) first, then ``.metadata`` (the stock reader's commit
point) is replaced; the replaced generation's files go last. A reader therefore sees the complete
old or the complete new checkpoint at every moment, and a crash leaves one of them.

Saved without collectives (``use_collectives=False``) every rank commits its own part instead:
``NAME/__R.metadata`` (DCP's per-rank metadata) and ``NAME/__R.metadata.checksums`` (its index);
there is no ``.metadata`` and no COMMIT record then.

An item written through DCP stream extensions (``_extensions=[ZStandard()]``) records its
transform descriptors (record version 2); its CRC32C covers the bytes as stored.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import re
from typing import Any, Literal

import msgspec

from ..errors import FormatError

__all__ = [
    "CHECKSUMS_FILE",
    "DCP_FORMAT",
    "DCP_FORMAT_VERSION",
    "DCP_KIND",
    "METADATA_FILE",
    "FileRecord",
    "IndexRecord",
    "ItemRecord",
    "RankRecord",
    "data_file_name",
    "decode_index",
    "decode_rank_record",
    "encode_record",
    "file_generation",
    "generation_name",
    "index_file",
    "is_dcp_file",
    "item_transforms",
    "load_metadata",
    "metadata_file",
    "rank_index_file",
    "rank_metadata_file",
    "rank_record_file",
    "record_version",
]

DCP_KIND = "dcp"  # the ``kind`` of the COMMIT records this writer writes (handled by asyncckpt.kinds.dcp)
DCP_FORMAT = "asyncckpt-dcp"
DCP_FORMAT_VERSION = 2  # 2: items may carry stream transform descriptors (written only when they do)
METADATA_FILE = ".metadata"
CHECKSUMS_FILE = ".checksums"
_MAX_ITEMS = 50_000_000


def _gen(generation: int) -> str:
    return f".g{generation}" if generation else ""


def rank_record_file(rank: int, generation: int = 0) -> str:
    """``__R.checksums`` (generation 0) or ``__R.gG.checksums``."""
    return f"__{rank}{_gen(generation)}{CHECKSUMS_FILE}"


def index_file(generation: int = 0) -> str:
    """The checksum index of a collective save: ``.checksums`` or ``.gG.checksums``."""
    return f"{_gen(generation)}{CHECKSUMS_FILE}" if generation else CHECKSUMS_FILE


def metadata_file(generation: int = 0) -> str:
    """DCP metadata asyncckpt's reader opens: ``.metadata`` (generation 0) or its copy ``.gG.metadata``."""
    return f"{_gen(generation)}{METADATA_FILE}" if generation else METADATA_FILE


def generation_name(fname: str, generation: int) -> str:
    """A data file name of generation ``generation``: ``X.distcp`` -> ``X.gG.distcp``."""
    if not generation:
        return fname
    stem, dot, ext = fname.rpartition(".")
    return f"{stem}{_gen(generation)}{dot}{ext}" if dot else f"{fname}{_gen(generation)}"


_GEN_FILE = re.compile(r".*\.g([1-9]\d*)\.(?:distcp|checksums|metadata)")


_DCP_FILE = re.compile(
    r"[^/]*__\d+_\d+(?:\.g[1-9]\d*)?\.distcp|__\d+(?:\.g[1-9]\d*)?\.checksums|(?:\.g[1-9]\d*)?\.checksums"
    r"|\.g[1-9]\d*\.metadata"
)


def is_dcp_file(fname: str) -> bool:
    """A data file or record name asyncckpt's DCP writer gives (any generation), not ``.metadata``."""
    return bool(_DCP_FILE.fullmatch(fname))


def file_generation(fname: str) -> int:
    """The generation a DCP file name carries (0 for names without ``.gG``)."""
    m = _GEN_FILE.fullmatch(fname)
    return int(m.group(1)) if m else 0


def rank_metadata_file(rank: int) -> str:
    """DCP's per-rank metadata file (saves without collectives)."""
    return f"__{rank}{METADATA_FILE}"


def rank_index_file(rank: int) -> str:
    """asyncckpt's index of a per-rank metadata file (saves without collectives)."""
    return f"__{rank}{METADATA_FILE}{CHECKSUMS_FILE}"


def data_file_name(prefix: str, index: int, generation: int = 0) -> str:
    return f"{prefix}{index}{_gen(generation)}.distcp"


class ItemRecord(msgspec.Struct, array_like=True, frozen=True):
    """One DCP write item: where its serialized bytes are and their CRC32C."""

    fqn: str
    chunk_offset: list[int] | None  # MetadataIndex.offset (None for bytes items)
    index: int | None  # MetadataIndex.index hint
    file: str
    offset: int
    length: int
    crc32c: int
    kind: Literal["tensor", "bytes"]


class FileRecord(msgspec.Struct, array_like=True, frozen=True):
    name: str
    nbytes: int


class RankRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    format: str
    version: int
    save_id: str
    rank: int
    checksum_algo: str
    files: list[FileRecord]
    items: list[ItemRecord]
    created: float = 0.0
    transforms: list[list[str] | None] | None = None  # per item: DCP stream transform descriptors (version 2)


class IndexRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    format: str
    version: int
    save_id: str
    world_size: int
    checksum_algo: str
    metadata_nbytes: int
    metadata_crc32c: int
    files: list[FileRecord]
    items: list[ItemRecord]
    created: float = 0.0
    transforms: list[list[str] | None] | None = None  # per item, as in RankRecord


def record_version(transforms: list[list[str] | None] | None) -> int:
    """The lowest record version that holds these per-item transforms (1 when none has any)."""
    return 2 if transforms and any(transforms) else 1


def item_transforms(rec: RankRecord | IndexRecord) -> list[list[str] | None]:
    """The stream transform descriptors of each of ``rec.items`` (None: stored as is)."""
    return list(rec.transforms) if rec.transforms is not None else [None] * len(rec.items)


_enc = msgspec.msgpack.Encoder()
_rank_dec = msgspec.msgpack.Decoder(RankRecord)
_index_dec = msgspec.msgpack.Decoder(IndexRecord)


def encode_record(rec: RankRecord | IndexRecord) -> bytes:
    return _enc.encode(rec)


def _check(fmt: str, version: int, algo: str, files: list[FileRecord], items: list[ItemRecord], where: str,
           transforms: list[list[str] | None] | None = None) -> None:
    if fmt != DCP_FORMAT:
        raise FormatError(f"{where}: not an asyncckpt DCP checksum record (format {fmt!r})")
    if not 1 <= version <= DCP_FORMAT_VERSION:
        raise FormatError(
            f"{where}: record version {version} is not supported (reads 1..{DCP_FORMAT_VERSION}); upgrade asyncckpt"
        )
    if algo != "crc32c":
        raise FormatError(f"{where}: unknown checksum algorithm {algo!r}")
    if len(items) > _MAX_ITEMS:
        raise FormatError(f"{where}: {len(items)} items is more than this reader accepts")
    if transforms is not None and len(transforms) != len(items):
        raise FormatError(f"{where}: {len(transforms)} transform entries for {len(items)} items")
    sizes = {f.name: f.nbytes for f in files}
    for it in items:
        size = sizes.get(it.file)
        if size is None:
            raise FormatError(f"{where}: item {it.fqn!r} names file {it.file!r}, which the record does not list")
        if it.offset < 0 or it.length < 0 or it.offset + it.length > size:
            raise FormatError(
                f"{where}: item {it.fqn!r} claims bytes [{it.offset}, {it.offset + it.length}) of {it.file} "
                f"({size} bytes)"
            )


def decode_rank_record(data: bytes, where: str) -> RankRecord:
    try:
        rec = _rank_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FormatError(f"{where}: checksum record is malformed ({exc})") from exc
    _check(rec.format, rec.version, rec.checksum_algo, rec.files, rec.items, where, rec.transforms)
    return rec


def decode_index(data: bytes, where: str) -> IndexRecord:
    try:
        rec = _index_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FormatError(f"{where}: checksum index is malformed ({exc})") from exc
    _check(rec.format, rec.version, rec.checksum_algo, rec.files, rec.items, where, rec.transforms)
    return rec


# -- safe unpickling of DCP's .metadata ----------------------------------------------------------

_ALLOWED_MODULES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "device"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP Metadata, refusing any class outside the small set DCP metadata uses."""

    where = ""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED_MODULES.get(module, ()):
            if module == "collections":
                return collections.OrderedDict
            if module == "pathlib":
                return getattr(pathlib, name)
            return super().find_class(module, name)
        if module == "torch":
            import torch

            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise FormatError(
            f"{self.where}: the metadata references {module}.{name}, which is not part of DCP's metadata; "
            "refusing to unpickle it. If you trust this checkpoint (e.g. a custom planner stored its own "
            "classes), pass allow_pickle=True to AsyncStorageReader."
        )


def load_metadata(data: bytes, where: str, *, allow_pickle: bool = False) -> Any:
    """Unpickle DCP Metadata; without ``allow_pickle`` only DCP's own metadata classes may appear."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        if allow_pickle:
            md = pickle.loads(data)
        else:
            u = _MetadataUnpickler(io.BytesIO(data))
            u.where = where
            md = u.load()
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(f"{where}: DCP metadata cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(md, Metadata):
        raise FormatError(f"{where}: holds a {type(md).__name__}, not DCP Metadata")
    return md
