"""The on-storage format (docs/format.md), one owner per concern:

* :mod:`.records`: manifests, COMMIT and ``latest`` (msgspec Structs), file names, features;
* :mod:`.crc`: the checksum (CRC32C);
* :mod:`.chunks`: chunk geometry and the one verified-chunk reader;
* :mod:`.compression`: per-chunk compression (feature ``zstd``);
* :mod:`.refs`: references between checkpoints (feature ``refs``, incremental saves);
* :mod:`.tree`: the value-tree walker;
* :mod:`.codec`: entry bytes to values (tensor, NumPy array, pickle) and foreign dtype names.
* :mod:`.torchzip`: ``torch.save`` archives whose data records are written from memory we hold
  (the ``.pt`` path and DCP tensor items); imported as a module, not re-exported here.

The handler per checkpoint kind (native, DCP, ``torch.save`` file) is :mod:`asyncckpt.kinds`: it
builds on the catalog, which builds on this package.

A checkpoint ``NAME`` under a root holds::

    NAME/rank-00000.data       the rank's chunks, CRC32C each
    NAME/rank-00000.manifest   msgpack RankManifest
    NAME/COMMIT                JSON CommitRecord, written last (all or nothing)

and the root holds ``latest`` (JSON LatestRecord), moved atomically after a commit. An
overwrite of ``NAME`` writes generation G's files (``rank-00000.gG.data``/``.manifest``) beside
the committed ones; the new COMMIT names them (docs/format.md, "Generations").
"""

from .chunks import (
    READ_CONCURRENCY,
    Chunk,
    ChunkGeometry,
    byte_view,
    check_data_file,
    chunk_count,
    keys_in_range,
    read_chunk,
    read_chunks,
    read_entries,
    read_entries_into,
    verify_rank,
)
from .codec import SAME_SIZE_INT, entry_values, safetensors_dtype, stored_entries, view_of_storage
from .compression import COMPRESSIONS, check_compression, decode_chunk, encode_chunk
from .crc import CHECKSUM_ALGO, checksum
from .records import (
    ALIGN,
    CHUNK_CODECS,
    COMMIT_FILE,
    DIGEST_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    KNOWN_FEATURES,
    LATEST_FILE,
    MANIFEST_VERSION,
    MAX_ENTRIES,
    MAX_NDIM,
    REFS,
    SHARED_STORAGE,
    ZSTD,
    BigIntNode,
    BytesNode,
    ChunkInfo,
    CommitRecord,
    DictNode,
    Entry,
    LatestRecord,
    ListNode,
    ManifestRef,
    Node,
    RankManifest,
    RefNode,
    RefTarget,
    ValueNode,
    check_metadata,
    check_ref_target,
    data_file,
    data_file_rank,
    decode_commit,
    decode_latest,
    decode_manifest,
    encode_commit,
    encode_latest,
    encode_manifest,
    manifest_file,
    manifest_file_rank,
    manifest_version,
    new_save_id,
    remember_manifest,
)
from .refs import ReferencePlan, digest, owned_offsets, plan_references, referenced_files, resolve_reference
from .tree import MAX_DEPTH, build_tree, leaves, refs, select_keys

__all__ = [
    "ALIGN",
    "CHECKSUM_ALGO",
    "CHUNK_CODECS",
    "COMMIT_FILE",
    "COMPRESSIONS",
    "DIGEST_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KNOWN_FEATURES",
    "LATEST_FILE",
    "MANIFEST_VERSION",
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "MAX_NDIM",
    "READ_CONCURRENCY",
    "REFS",
    "SAME_SIZE_INT",
    "SHARED_STORAGE",
    "ZSTD",
    "BigIntNode",
    "BytesNode",
    "Chunk",
    "ChunkGeometry",
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
    "ReferencePlan",
    "ValueNode",
    "build_tree",
    "byte_view",
    "check_compression",
    "check_data_file",
    "check_metadata",
    "check_ref_target",
    "checksum",
    "chunk_count",
    "data_file",
    "data_file_rank",
    "decode_chunk",
    "decode_commit",
    "decode_latest",
    "decode_manifest",
    "digest",
    "encode_chunk",
    "encode_commit",
    "encode_latest",
    "encode_manifest",
    "entry_values",
    "keys_in_range",
    "leaves",
    "manifest_file",
    "manifest_file_rank",
    "manifest_version",
    "new_save_id",
    "owned_offsets",
    "plan_references",
    "read_chunk",
    "read_chunks",
    "read_entries",
    "read_entries_into",
    "referenced_files",
    "refs",
    "remember_manifest",
    "resolve_reference",
    "safetensors_dtype",
    "select_keys",
    "stored_entries",
    "verify_rank",
    "view_of_storage",
]
