"""On-storage format: per-rank manifests and the commit record (msgspec Structs).

See docs/format.md. A checkpoint ``NAME`` under a root holds::

    NAME/rank-00000.data       tensor bytes, 64-byte aligned, CRC32C per chunk
    NAME/rank-00000.manifest   msgpack RankManifest
    NAME/COMMIT                JSON CommitRecord, written last (all or nothing)

and the root holds ``latest`` (JSON LatestRecord), moved atomically after a commit. An
overwrite of ``NAME`` writes generation G's files (``rank-00000.gG.data``/``.manifest``) beside
the committed ones; the new COMMIT names them (docs/format.md, "Generations").
"""

from __future__ import annotations

import re
import uuid
from typing import Literal, Union

import crc32c as _crc32c
import msgspec

from .errors import FormatError, IntegrityError
from .storage.keys import check_key

__all__ = [
    "ALIGN",
    "CHECKSUM_ALGO",
    "COMMIT_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LATEST_FILE",
    "CommitRecord",
    "DictNode",
    "Entry",
    "LatestRecord",
    "ListNode",
    "ManifestRef",
    "Node",
    "RankManifest",
    "RefNode",
    "ValueNode",
    "checksum",
    "data_file",
    "data_file_rank",
    "decode_commit",
    "decode_latest",
    "decode_manifest",
    "encode_commit",
    "encode_latest",
    "encode_manifest",
    "manifest_file",
    "manifest_file_rank",
    "new_save_id",
]

FORMAT_NAME = "asyncckpt"
FORMAT_VERSION = 1
CHECKSUM_ALGO = "crc32c"
ALIGN = 64
COMMIT_FILE = "COMMIT"
LATEST_FILE = "latest"
# Hard caps that keep a hostile manifest from driving allocations.
MAX_NDIM = 64
MAX_ENTRIES = 10_000_000


def checksum(data: bytes | memoryview, value: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``value`` (releases the GIL)."""
    return _crc32c.crc32c(data, value=value)


class Entry(msgspec.Struct, frozen=True):
    """One byte range of the data file: a tensor, a NumPy array or (opt-in) a pickled object."""

    key: str  # path in the state dict, for messages and inspect ("optim/state/0/exp_avg")
    kind: Literal["tensor", "ndarray", "pickle"]
    dtype: str  # "float32", "bfloat16", ... ; "bytes" for pickle
    shape: list[int]
    offset: int
    nbytes: int


class ValueNode(msgspec.Struct, tag="value", frozen=True):
    value: Union[bool, int, float, str, None]


class BigIntNode(msgspec.Struct, tag="bigint", frozen=True):
    value: str


class BytesNode(msgspec.Struct, tag="bytes", frozen=True):
    value: bytes


class RefNode(msgspec.Struct, tag="ref", frozen=True):
    """A value stored in the data file: ``entries[index]``."""

    index: int


class ListNode(msgspec.Struct, tag="list", frozen=True):
    items: list["Node"]
    tuple: bool = False


class DictNode(msgspec.Struct, tag="dict", frozen=True):
    keys: list[Union[str, int]]
    values: list["Node"]
    ordered: bool = False  # True for collections.OrderedDict


Node = Union[ValueNode, BigIntNode, BytesNode, RefNode, ListNode, DictNode]


class RankManifest(msgspec.Struct, frozen=True):
    format: str
    version: int
    name: str
    rank: int
    world_size: int
    step: int | None
    data_file: str
    data_nbytes: int
    chunk_size: int
    checksum_algo: str
    chunk_checksums: list[int]
    entries: list[Entry]
    tree: Node
    layout: str = "flat"
    created: float = 0.0
    save_id: str = ""  # random per rank and save; COMMIT records it (binds the two without the name)


class ManifestRef(msgspec.Struct, frozen=True):
    rank: int
    file: str
    nbytes: int
    checksum: int
    data_nbytes: int
    save_id: str = ""  # the manifest's own save_id ("" in checkpoints written before it existed)


class CommitRecord(msgspec.Struct, frozen=True):
    format: str
    version: int
    name: str
    step: int | None
    world_size: int
    created: float
    total_nbytes: int
    checksum_algo: str
    manifests: list[ManifestRef]
    layout: str = "flat"
    kind: str = "asyncckpt"  # "asyncckpt" or "dcp"
    metadata: dict[str, str] = {}
    generation: int = 0  # which file names hold this checkpoint's ranks (see manifest_file); bumped by overwrites


class LatestRecord(msgspec.Struct, frozen=True):
    name: str
    step: int | None
    created: float


def _gen(generation: int) -> str:
    return f".g{generation}" if generation else ""


def data_file(rank: int, generation: int = 0) -> str:
    """``rank-NNNNN.data`` (generation 0) or ``rank-NNNNN.gG.data`` (the G-th overwrite of a name)."""
    return f"rank-{rank:05d}{_gen(generation)}.data"


def manifest_file(rank: int, generation: int = 0) -> str:
    """``rank-NNNNN.manifest`` (generation 0) or ``rank-NNNNN.gG.manifest``."""
    return f"rank-{rank:05d}{_gen(generation)}.manifest"


_RANK_FILE = re.compile(r"rank-(\d{5,})(?:\.g([1-9]\d*))?\.(manifest|data)")


def _rank_file(fname: str, suffix: str) -> tuple[int, int] | None:
    m = _RANK_FILE.fullmatch(fname)
    if m is None or m.group(3) != suffix:
        return None
    rank, gen = int(m.group(1)), int(m.group(2) or 0)
    return (rank, gen) if fname == (manifest_file if suffix == "manifest" else data_file)(rank, gen) else None


def manifest_file_rank(fname: str) -> tuple[int, int] | None:
    """(rank, generation) when ``fname`` is a name :func:`manifest_file` gives, else None."""
    return _rank_file(fname, "manifest")


def data_file_rank(fname: str) -> tuple[int, int] | None:
    """(rank, generation) when ``fname`` is a name :func:`data_file` gives, else None."""
    return _rank_file(fname, "data")


def new_save_id() -> str:
    """A random id for one rank's part of one save, written in its manifest and recorded in COMMIT."""
    return uuid.uuid4().hex


_manifest_decoder = msgspec.msgpack.Decoder(RankManifest)
_commit_decoder = msgspec.json.Decoder(CommitRecord)
_latest_decoder = msgspec.json.Decoder(LatestRecord)
_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()


def encode_manifest(m: RankManifest) -> bytes:
    return _msgpack_encoder.encode(m)


def _check_version(fmt: str, version: int, where: str) -> None:
    if fmt != FORMAT_NAME:
        raise FormatError(f"{where}: not an asyncckpt record (format {fmt!r})")
    if version > FORMAT_VERSION or version < 1:
        raise FormatError(
            f"{where}: format version {version} is not supported by this asyncckpt "
            f"(reads versions 1..{FORMAT_VERSION}); upgrade asyncckpt to read it"
        )


def decode_manifest(data: bytes, where: str) -> RankManifest:
    """Decode and sanity-check a manifest; every size is bounded before anything is allocated."""
    try:
        m = _manifest_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError) as exc:
        raise FormatError(f"{where}: manifest is malformed ({exc})") from exc
    _check_version(m.format, m.version, where)
    try:
        if not check_key(m.data_file):
            raise IntegrityError("it is empty")
    except IntegrityError as exc:
        raise FormatError(f"{where}: data file {m.data_file!r} is not a valid key inside the checkpoint root ({exc})") from exc
    if m.checksum_algo != CHECKSUM_ALGO:
        raise FormatError(f"{where}: unknown checksum algorithm {m.checksum_algo!r}")
    if m.chunk_size <= 0 or m.data_nbytes < 0 or len(m.entries) > MAX_ENTRIES:
        raise FormatError(f"{where}: chunk_size/data_nbytes/entries out of range")
    expect_chunks = -(-m.data_nbytes // m.chunk_size) if m.data_nbytes else 0
    if len(m.chunk_checksums) != expect_chunks:
        raise FormatError(
            f"{where}: {len(m.chunk_checksums)} chunk checksums for {m.data_nbytes} bytes "
            f"in chunks of {m.chunk_size} (expected {expect_chunks})"
        )
    end = 0
    for e in sorted(m.entries, key=lambda e: e.offset):
        _check_entry(e, m.data_nbytes, where)
        if e.nbytes and e.offset < end:
            raise FormatError(f"{where}: key {e.key!r} overlaps the previous entry (offset {e.offset} < {end})")
        end = max(end, e.offset + e.nbytes)
    return m


def _check_entry(e: Entry, data_nbytes: int, where: str) -> None:
    from .dtypes import itemsize  # local import: dtypes imports torch

    if len(e.shape) > MAX_NDIM or any(d < 0 for d in e.shape):
        raise FormatError(f"{where}: key {e.key!r} has an invalid shape {e.shape}")
    if e.offset < 0 or e.nbytes < 0 or e.offset + e.nbytes > data_nbytes:
        raise FormatError(
            f"{where}: key {e.key!r} claims bytes [{e.offset}, {e.offset + e.nbytes}) "
            f"outside the data file's {data_nbytes} bytes"
        )
    if e.kind == "pickle":
        return
    numel = 1
    for d in e.shape:
        numel *= d
    size = itemsize(e.dtype, e.kind, where=f"{where}: key {e.key!r}")
    if numel * size != e.nbytes:
        raise FormatError(
            f"{where}: key {e.key!r}: shape {e.shape} of {e.dtype} needs {numel * size} bytes, manifest says {e.nbytes}"
        )


# COMMIT and latest end with their own CRC32C: `{...,"record_crc32c":N}` where N covers the
# record with that member removed. Checked on the raw bytes (not a re-encoding), so a reader
# needs no knowledge of the writer's fields to verify a record.
_SEAL = re.compile(rb',"record_crc32c":(0|[1-9][0-9]{0,9})\}\Z')


def _seal(body: bytes) -> bytes:
    return body[:-1] + b',"record_crc32c":%d}' % checksum(body)


def _unseal(data: bytes, where: str, what: str) -> bytes:
    """The record without its checksum member; refuses a record altered after it was written."""
    m = _SEAL.search(data)
    if m is None:
        raise FormatError(
            f"{where}: {what} is damaged: it does not end with its record checksum "
            "(truncated, extended or edited after it was written)"
        )
    body = data[: m.start()] + b"}"
    if checksum(body) != int(m.group(1)):
        raise IntegrityError(
            f"{where}: {what} checksum mismatch: the record was altered after it was written "
            "(bit rot or an edit); do not trust it, load another checkpoint"
        )
    return body


def encode_commit(c: CommitRecord) -> bytes:
    return _seal(_json_encoder.encode(c))


def decode_commit(data: bytes, where: str) -> CommitRecord:
    body = _unseal(data, where, "commit record")
    try:
        c = _commit_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError) as exc:
        raise FormatError(f"{where}: commit record is malformed ({exc})") from exc
    _check_version(c.format, c.version, where)
    if c.generation < 0:
        raise FormatError(f"{where}: commit record has a negative generation ({c.generation})")
    if c.world_size < 1 or len(c.manifests) != c.world_size:
        if c.kind == "asyncckpt":
            raise FormatError(f"{where}: commit record lists {len(c.manifests)} manifests for world size {c.world_size}")
    return c


def encode_latest(r: LatestRecord) -> bytes:
    return _seal(_json_encoder.encode(r))


def decode_latest(data: bytes, where: str) -> LatestRecord:
    body = _unseal(data, where, "latest pointer")
    try:
        return _latest_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError) as exc:
        raise FormatError(f"{where}: latest pointer is malformed ({exc})") from exc
