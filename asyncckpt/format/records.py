"""Records of the on-storage format: per-rank manifests, the commit record, ``latest`` (msgspec Structs).

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
from collections.abc import Mapping
from typing import Annotated, Literal, Union

import msgspec

from ..errors import BadInputError, FormatError, IntegrityError
from ..storage.keys import check_key
from .crc import CHECKSUM_ALGO, checksum
from .memo import DecodedCache

__all__ = [
    "ALIGN",
    "CHUNK_CODECS",
    "COMMIT_FILE",
    "DECODED_MANIFESTS",
    "DIGEST_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KNOWN_FEATURES",
    "LATEST_FILE",
    "MANIFEST_VERSION",
    "MAX_ENTRIES",
    "MAX_NDIM",
    "REFS",
    "SHARED_STORAGE",
    "ZSTD",
    "BigIntNode",
    "BytesNode",
    "ChunkInfo",
    "CommitRecord",
    "DictNode",
    "Entry",
    "LatestRecord",
    "ListNode",
    "ManifestRef",
    "Node",
    "RankManifest",
    "RefNode",
    "RefTarget",
    "ValueNode",
    "check_metadata",
    "check_ref_target",
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
    "manifest_version",
    "new_save_id",
    "remember_manifest",
]

FORMAT_NAME = "asyncckpt"
FORMAT_VERSION = 1  # commit records (and manifests that use no feature)
#: Newest manifest version this code reads. Version 2 adds the ``features`` list: a reader refuses a
#: manifest naming a feature it does not know. Writers write 2 only when a feature is used.
MANIFEST_VERSION = 2
#: Feature: tensors that shared one storage are views (``Entry.view_of``) of one stored storage.
SHARED_STORAGE = "shared-storage"
#: Feature: chunks may be stored zstd-compressed; ``RankManifest.chunks`` says how each one is stored.
ZSTD = "zstd"
#: Feature: entries may be references (``Entry.ref``) to bytes stored by a sibling checkpoint of the
#: same root (incremental saves); every stored entry records ``Entry.digest`` of its raw bytes.
REFS = "refs"
KNOWN_FEATURES = frozenset({SHARED_STORAGE, ZSTD, REFS})
#: How a chunk can be stored: as is, or as one zstd frame.
CHUNK_CODECS = ("none", ZSTD)
ALIGN = 64
COMMIT_FILE = "COMMIT"
LATEST_FILE = "latest"
# Hard caps that keep a hostile manifest from driving allocations.
MAX_NDIM = 64
MAX_ENTRIES = 10_000_000


class Entry(msgspec.Struct, frozen=True, omit_defaults=True):
    """One byte range of the data file: a tensor, a NumPy array or (opt-in) a pickled object.

    With the ``shared-storage`` feature a tensor entry may instead be a *view* (``view_of >= 0``):
    it owns no bytes; it is ``shape``/``stride``/``storage_offset`` (in elements of ``dtype``) over
    the bytes of entry ``view_of``, a 1-D ``uint8`` tensor entry holding one whole storage.
    """

    key: str  # path in the state dict, for messages and inspect ("optim/state/0/exp_avg")
    kind: Literal["tensor", "ndarray", "pickle"]
    dtype: str  # "float32", "bfloat16", ... ; "bytes" for pickle
    shape: list[int]
    offset: int  # a view: its storage entry's offset
    nbytes: int  # a view: numel * itemsize (its logical size; it owns no bytes)
    view_of: int = -1  # index of the storage entry this tensor is a view of; -1: owns its bytes
    stride: list[int] = []  # a view's strides, in elements
    storage_offset: int = 0  # a view's offset into its storage, in elements
    # feature "refs": XXH3-128 of the entry's raw bytes (every stored entry of an incremental save)
    digest: bytes = b""
    # feature "refs": index into RankManifest.refs; the bytes are entry ``offset`` of that manifest's image
    ref: int = -1


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


_U32 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]


class ChunkInfo(msgspec.Struct, frozen=True, array_like=True):
    """How one chunk is stored (feature ``zstd``): msgpack ``[codec, stored_nbytes, raw_crc32c]``."""

    codec: str  # one of CHUNK_CODECS (checked after the features, so a newer codec is refused by its feature)
    stored_nbytes: Annotated[int, msgspec.Meta(ge=0)]  # its length in the data file
    raw_crc32c: _U32  # CRC32C of its raw (image) bytes; chunk_checksums[i] covers the stored ones


class RefTarget(msgspec.Struct, frozen=True, array_like=True):
    """A manifest that references point into (feature ``refs``): ``NAME/rank-R[.gG].manifest`` of a sibling
    checkpoint under the same root, bound by its size, CRC32C and save id."""

    file: str  # key relative to the root
    nbytes: int
    checksum: _U32
    save_id: str

    @property
    def name(self) -> str:
        """The checkpoint holding the bytes."""
        return self.file.partition("/")[0]

    @property
    def manifest(self) -> str:
        """The manifest's file name inside that checkpoint."""
        return self.file.partition("/")[2]


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
    features: list[str] = []  # version 2: format features this manifest uses (see KNOWN_FEATURES)
    save_id: str = ""  # random per rank and save; COMMIT records it (binds the two without the name)
    # feature "zstd": how each chunk is stored; absent (not written at all) when every chunk is the image itself
    chunks: Union[list[ChunkInfo], msgspec.UnsetType] = msgspec.UNSET
    # feature "refs": the manifests this one's reference entries point into (never one with references of its own
    # for those entries: a reference always names the file that holds the bytes)
    refs: list[RefTarget] = []


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
    kind: str = "asyncckpt"  # which handler reads it (asyncckpt.kinds): "asyncckpt" (this format) or "dcp"
    metadata: dict[str, str] = {}
    generation: int = 0  # which file names hold this checkpoint's ranks (see manifest_file); bumped by overwrites
    # feature "refs" in a manifest: stored plus referenced bytes (absent when it equals total_nbytes)
    logical_nbytes: Union[int, msgspec.UnsetType] = msgspec.UNSET


def check_metadata(metadata: object) -> dict[str, str]:
    """A commit's user ``metadata`` as stored: a mapping of str to str (BadInputError otherwise: a
    record that held anything else could not be read back, so the checkpoint would be lost)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise BadInputError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if type(k) is not str or type(v) is not str:
            raise BadInputError(
                f"metadata[{k!r}]: keys and values must be str, got {type(k).__name__} -> {type(v).__name__} "
                "(convert them with str())"
            )
    return dict(metadata)


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


def remember_manifest(blob: bytes, m: RankManifest) -> None:
    """Declare ``blob`` the encoding of ``m``, a manifest this process built and wrote: reading exactly
    these bytes back returns ``m`` without decoding and checking them again (the commit and retention
    of a save read the manifest its worker has just written). Only for a writer's own manifests."""
    if type(blob) is bytes:
        DECODED_MANIFESTS.put(blob, m, len(blob))


def manifest_version(features: list[str]) -> int:
    """The lowest manifest version that holds ``features`` (1 when none is used)."""
    return 2 if features else 1


def _check_version(fmt: str, version: int, where: str, newest: int = FORMAT_VERSION) -> None:
    if fmt != FORMAT_NAME:
        raise FormatError(f"{where}: not an asyncckpt record (format {fmt!r})")
    if version > newest or version < 1:
        raise FormatError(
            f"{where}: format version {version} is not supported by this asyncckpt "
            f"(reads versions 1..{newest}); upgrade asyncckpt to read it"
        )


class _Head(msgspec.Struct):
    """The members every manifest version keeps: enough to refuse a newer one by name."""

    format: str = ""
    version: int = 0
    features: list[str] = []


_head_decoder = msgspec.msgpack.Decoder(_Head)


def _check_features(m: RankManifest | _Head, where: str) -> None:
    if m.version < 2 and m.features:
        raise FormatError(f"{where}: a version {m.version} manifest cannot name features ({m.features!r})")
    unknown = [f for f in m.features if f not in KNOWN_FEATURES]
    if unknown:
        raise FormatError(
            f"{where}: the checkpoint uses format feature(s) {', '.join(map(repr, unknown))} that this asyncckpt "
            f"does not know (it knows {', '.join(sorted(KNOWN_FEATURES))}); upgrade asyncckpt to read it"
        )


#: Manifests this process wrote (``remember_manifest``) or decoded and checked, by their exact bytes:
#: a worker reads the same few manifests several times per save (commit, retention, deletion), and
#: at 50,000 tensors one decode and check costs a third of a second. The checks guard against bytes
#: from elsewhere (damaged or foreign files); bytes equal to what this process encoded from its own
#: manifest are neither. At most 32 MiB of encoded bytes; the structs are frozen.
DECODED_MANIFESTS: DecodedCache[RankManifest] = DecodedCache(32 << 20)


def decode_manifest(data: bytes, where: str) -> RankManifest:
    """Decode and sanity-check a manifest; every size is bounded before anything is allocated.

    The same bytes decode to the same (shared, frozen) manifest: a recent one is returned from a
    small cache instead of being decoded and checked again.
    """
    if type(data) is bytes:
        hit = DECODED_MANIFESTS.get(data)
        if hit is not None:
            return hit
    m = _decode_checked(data, where)
    remember_manifest(data, m)  # checked now: kept like a manifest of our own
    return m


def _decode_checked(data: bytes, where: str) -> RankManifest:
    try:
        m = _manifest_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError) as exc:
        # A feature this reader does not know may change what members hold: name it, not the symptom.
        try:
            head = _head_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
            head = None
        if head is not None and head.format == FORMAT_NAME:
            _check_version(head.format, head.version, where, MANIFEST_VERSION)
            _check_features(head, where)
        raise FormatError(f"{where}: manifest is malformed ({exc})") from exc
    _check_version(m.format, m.version, where, MANIFEST_VERSION)
    _check_features(m, where)
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
    _check_chunks(m, where)
    _check_refs(m, where)
    end = 0
    for e in sorted((e for e in m.entries if e.view_of < 0 and e.ref < 0), key=lambda e: e.offset):
        _check_entry(e, m.data_nbytes, where)
        if e.nbytes and e.offset < end:
            raise FormatError(f"{where}: key {e.key!r} overlaps the previous entry (offset {e.offset} < {end})")
        end = max(end, e.offset + e.nbytes)
    views = [e for e in m.entries if e.view_of >= 0]
    if views and SHARED_STORAGE not in m.features:
        raise FormatError(f"{where}: key {views[0].key!r} is a view of a shared storage, but the manifest does not "
                          f"declare the {SHARED_STORAGE!r} feature")
    for e in views:
        _check_view(e, m.entries, where)
    return m


def _check_chunks(m: RankManifest, where: str) -> None:
    """Per-chunk records (feature ``zstd``): one per chunk, declared, each stored length plausible."""
    if m.chunks is msgspec.UNSET:
        if ZSTD in m.features:
            raise FormatError(f"{where}: the manifest declares {ZSTD!r} but records no per-chunk storage")
        return
    if ZSTD not in m.features:
        raise FormatError(f"{where}: the manifest records per-chunk storage without declaring the {ZSTD!r} feature")
    if len(m.chunks) != len(m.chunk_checksums):
        raise FormatError(f"{where}: {len(m.chunks)} chunk records for {len(m.chunk_checksums)} chunks")
    for i, c in enumerate(m.chunks):
        if c.codec not in CHUNK_CODECS:
            raise FormatError(f"{where}: chunk {i} is stored as {c.codec!r}, which the declared features do not define")
        raw = min(m.chunk_size, m.data_nbytes - i * m.chunk_size)
        # a zstd frame is never much larger than its content (and the writer stores a chunk as is then)
        ok = c.stored_nbytes == raw and c.raw_crc32c == m.chunk_checksums[i] if c.codec == "none" \
            else 0 < c.stored_nbytes <= raw + (raw >> 7) + 1024
        if not ok:
            raise FormatError(f"{where}: chunk {i} ({c.codec}, {c.stored_nbytes} bytes stored for {raw}) is "
                              "recorded inconsistently")


def check_ref_target(t: RefTarget, name: str, where: str) -> None:
    """``t`` names a manifest of a sibling checkpoint under the same root, else FormatError naming it."""
    parts = t.file.split("/")
    ok = (len(parts) == 2 and parts[0] not in ("", ".", "..") and parts[0] != name and "\\" not in t.file
          and manifest_file_rank(parts[1]) is not None)
    if ok:
        try:
            ok = check_key(t.file) == t.file
        except IntegrityError:
            ok = False
    if not ok:
        raise FormatError(f"{where}: a reference names {t.file!r}, which is not a manifest of a sibling checkpoint "
                          "under the same root; references outside the checkpoint's root are refused")


def _check_refs(m: RankManifest, where: str) -> None:
    """Feature ``refs``: declared when used; every reference names a sibling's manifest; reference entries own bytes."""
    uses = bool(m.refs) or any(e.ref >= 0 or e.digest for e in m.entries)
    if not uses:
        return
    if REFS not in m.features:
        raise FormatError(f"{where}: the manifest holds references or digests without declaring the {REFS!r} feature")
    for t in m.refs:
        check_ref_target(t, m.name, where)
    for e in m.entries:
        if e.ref < 0:
            continue
        if e.ref >= len(m.refs) or e.view_of >= 0 or len(e.digest) != DIGEST_SIZE:
            raise FormatError(f"{where}: key {e.key!r} is a malformed reference (ref {e.ref} of {len(m.refs)}, "
                              f"view_of {e.view_of}, digest of {len(e.digest)} bytes)")
        _check_entry(e, 1 << 62, where)


#: Bytes of ``Entry.digest`` (XXH3-128).
DIGEST_SIZE = 16


def _check_entry(e: Entry, data_nbytes: int, where: str) -> None:
    from ..dtypes import itemsize  # local import: dtypes imports torch

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


def _check_view(e: Entry, entries: list[Entry], where: str) -> None:
    """A view lies inside its storage entry, which is a plain 1-D uint8 entry owning its bytes."""
    from ..dtypes import itemsize  # local import: dtypes imports torch

    w = f"{where}: key {e.key!r}"
    if not 0 <= e.view_of < len(entries):
        raise FormatError(f"{w} is a view of entry {e.view_of}, the manifest has {len(entries)}")
    s = entries[e.view_of]
    if s.view_of >= 0 or s.kind != "tensor" or s.dtype != "uint8" or len(s.shape) != 1:
        raise FormatError(f"{w} is a view of entry {e.view_of} ({s.key!r}), which is not a stored storage")
    if e.kind != "tensor":
        raise FormatError(f"{w}: only tensors can be views of a shared storage, not {e.kind}")
    if len(e.shape) > MAX_NDIM or any(d < 0 for d in e.shape) or len(e.stride) != len(e.shape) \
            or any(st < 0 for st in e.stride) or e.storage_offset < 0:
        raise FormatError(f"{w}: invalid view geometry (shape {e.shape}, stride {e.stride}, "
                          f"storage offset {e.storage_offset})")
    size = itemsize(e.dtype, e.kind, where=w)
    numel = 1
    for d in e.shape:
        numel *= d
    if numel * size != e.nbytes or e.nbytes >= 1 << 63:
        raise FormatError(f"{w}: shape {e.shape} of {e.dtype} needs {numel * size} bytes, manifest says {e.nbytes}")
    last = e.storage_offset + (sum((d - 1) * st for d, st in zip(e.shape, e.stride)) + 1 if numel else 0)
    if last * size > s.nbytes:
        raise FormatError(f"{w}: the view reaches byte {last * size} of its storage {s.key!r}, "
                          f"which holds {s.nbytes} bytes")


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
        if c.kind == FORMAT_NAME:  # other kinds' records count ranks their own way (asyncckpt.kinds)
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
