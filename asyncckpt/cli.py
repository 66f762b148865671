"""The ``asyncckpt`` command line: ls, inspect, verify, rm, prune, export, pause.

Works on local roots and ``s3://bucket/prefix`` roots (``--endpoint-url`` or the usual AWS
settings such as ``AWS_ENDPOINT_URL``). Exit status, the same for every command, local and S3:
0 success; 1 a checkpoint failed verification, a delete was refused for safety, or storage
failed; 2 usage error or nothing there (no such path, directory, bucket or checkpoint; not a
checkpoint); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from ._loop import run_sync
from .catalog import (
    CheckpointInfo,
    read_latest,
    read_references,
    referenced_nbytes,
)
from .deletion import DeleteReport, delete_async
from .errors import (
    BadInputError,
    CheckpointError,
    CheckpointNotFoundError,
    NotACheckpointError,
    StorageError,
)
from .format import (
    LATEST_FILE,
    BigIntNode,
    BytesNode,
    ChunkGeometry,
    CommitRecord,
    DictNode,
    ListNode,
    Node,
    RankManifest,
    RefNode,
    ValueNode,
    build_tree,
    entry_values,
    leaves,
    read_entries,
    refs,
    safetensors_dtype,
    stored_entries,
)
from .keypath import format_key, format_path, parse_path
from .kinds import CheckpointKind, FileKind, kind_of, kind_of_file
from .listing import list_checkpoints_async
from .locate import describe_local, is_missing_bucket, local_path, locate
from .logs import enable_logging
from .manager import RESERVED_KEY
from .preemption import request_pause
from .retention import prune_async
from .storage import Storage, open_storage

__all__ = ["main"]

_VALUE_WIDTH = 60


# -- small helpers ----------------------------------------------------------------------------
def _size(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"  # pragma: no cover


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age; use e.g. 90s, 30m, 12h, 7d, 2w")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200
    return Console(file=stream, width=width, soft_wrap=False, highlight=False)


def _text(s: str) -> Any:
    """A table cell shown as is (a key like ``[bold]`` is not rich markup)."""
    from rich.text import Text

    return Text(s)


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if getattr(args, "endpoint_url", None):
        opts["endpoint_url"] = args.endpoint_url
    if getattr(args, "region", None):
        opts["region_name"] = args.region
    if getattr(args, "profile", None):
        opts["profile"] = args.profile
    return opts


def _opts_for(uri: str, args: argparse.Namespace) -> dict[str, Any]:
    return _storage_options(args) if local_path(uri) is None else {}


def _open(uri: str, args: argparse.Namespace) -> Storage:
    return open_storage(uri, **_opts_for(uri, args))


def _open_root(uri: str, args: argparse.Namespace) -> Storage:
    """A root that must exist: a missing directory or bucket is 'nothing there' (exit 2), a file is not a root."""
    lp = local_path(uri)
    if lp is not None and not lp.is_dir():
        if lp.exists():
            raise NotACheckpointError(f"{uri} is not a root of checkpoints: it is {describe_local(lp)}")
        raise CheckpointNotFoundError(f"{uri}: no such directory")
    return _open(uri, args)


def _progress(args: argparse.Namespace, total: int | None, desc: str) -> tqdm:
    disable = None if args.progress is None else not args.progress  # None: only on a terminal
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=disable,
                file=sys.stderr, dynamic_ncols=True, leave=True)


class _Ckpt:
    """A resolved checkpoint: its storage (root), name and commit record."""

    def __init__(self, storage: Storage, name: str, rec: CommitRecord) -> None:
        self.storage, self.name, self.rec = storage, name, rec

    @property
    def path(self) -> str:
        return f"{self.storage.uri.rstrip('/')}/{self.name}"


def _resolve(path: str, args: argparse.Namespace) -> _Ckpt:
    """``ROOT/NAME`` -> that checkpoint; a root holding ``latest`` -> the checkpoint it points to."""
    found = run_sync(locate(path, storage_options=_opts_for(path, args)))
    return _Ckpt(found.storage, found.name, found.record)


def _kind(ck: _Ckpt) -> CheckpointKind:
    """The handler of ``ck``'s kind (FormatError naming the kind when this version has none)."""
    return kind_of(ck.rec, ck.path)


def _file_kind(path: str) -> tuple[Path, FileKind, str] | None:
    """(path, handler, variant) when ``path`` is a local file of a file kind (a torch.save file)."""
    lp = local_path(path)
    found = kind_of_file(lp) if lp is not None else None
    return (lp, *found) if lp is not None and found is not None else None


class _Failed(CheckpointError):
    """A file or checkpoint failed a check (exit status 1)."""


# -- ls -----------------------------------------------------------------------------------------
def _info_json(i: CheckpointInfo) -> dict[str, Any]:
    return {
        "name": i.name, "path": i.path, "step": i.step, "created": i.created, "nbytes": i.nbytes,
        "world_size": i.world_size, "kind": i.kind, "tiers": list(i.tiers), "is_latest": i.is_latest,
        "complete": i.complete, "problem": i.problem or None, "logical_nbytes": i.logical_nbytes,
    }


_LS_CHECKS = "records and data sizes checked, no data read; `asyncckpt verify` reads every byte"


def cmd_ls(args: argparse.Namespace) -> int:
    storage = _open_root(args.root, args)
    try:
        infos = run_sync(list_checkpoints_async(storage, include_incomplete=True, check=True))
    finally:
        run_sync(storage.close())
    complete = [i for i in infos if i.complete]
    broken = [i for i in infos if not i.complete]
    if args.json:
        json.dump({"root": storage.uri, "checked": _LS_CHECKS, "checkpoints": [_info_json(i) for i in complete],
                   "incomplete": [_info_json(i) for i in broken]}, sys.stdout, indent=2)
        print()
        return 0
    from rich import box
    from rich.table import Table

    con = _console()
    table = Table(title=f"{storage.uri}: {len(complete)} complete checkpoint(s), newest first",
                  caption=f"({_LS_CHECKS})", box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left")
    # incremental checkpoints store less than they hold: then "size" is what is stored, "logical" what loads
    logical = any(i.logical_nbytes != i.nbytes for i in complete)
    for col, just in (("step", "right"), ("name", "left"), ("created", "left"), ("size", "right"),
                      *([("logical", "right")] if logical else []),
                      ("ranks", "right"), ("kind", "left"), ("tiers", "left"), ("latest", "left")):
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for i in complete:
        table.add_row("-" if i.step is None else str(i.step), _text(i.name), _when(i.created), _size(i.nbytes),
                      *([_size(i.logical_nbytes)] if logical else []),
                      str(i.world_size), i.kind, _text(", ".join(i.tiers)), "<- latest" if i.is_latest else "")
    con.print(table)
    if broken:
        bt = Table(title=f"{len(broken)} incomplete or corrupt (never loaded; `asyncckpt rm` removes them)",
                   box=box.SIMPLE_HEAD, title_justify="left")
        bt.add_column("name", no_wrap=True)
        bt.add_column("problem")
        for i in broken:
            bt.add_row(_text(i.name), _text(i.problem))
        con.print(bt)
    return 0


# -- inspect ------------------------------------------------------------------------------------
def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 3] + "..."


def _plain_json(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _row(path: list[Any], kind: str, dtype: str = "", shape: list[int] | None = None, nbytes: int | None = None,
         value: Any = None, shown: str = "", offset: int | None = None) -> dict[str, Any]:
    return {"key": format_path(path), "path": [k if isinstance(k, (str, int)) else repr(k) for k in path],
            "kind": kind, "dtype": dtype, "shape": shape, "nbytes": nbytes, "offset": offset,
            "value": value, "shown": shown}


def _tree_rows(node: Node, path: list[Any], m: RankManifest, out: list[dict[str, Any]]) -> None:
    """One row per value of a manifest's tree: stored entries, plain values, empty containers."""
    for sub, leaf in leaves(node, m.data_file):
        p = [*path, *sub]
        if isinstance(leaf, DictNode):
            out.append(_row(p, "dict", value={}, shown="{}"))
        elif isinstance(leaf, ListNode):
            out.append(_row(p, "tuple" if leaf.tuple else "list", value=[], shown="()" if leaf.tuple else "[]"))
        elif isinstance(leaf, RefNode):
            if not 0 <= leaf.index < len(m.entries):
                raise _Failed(f"{m.data_file}: value tree references entry {leaf.index}, the manifest has {len(m.entries)}")
            e = m.entries[leaf.index]
            shown = f"view of the storage shared with {m.entries[e.view_of].key}" if e.view_of >= 0 else ""
            out.append(_row(p, e.kind, e.dtype, list(e.shape), e.nbytes, offset=e.offset, shown=shown))
        elif isinstance(leaf, ValueNode):
            v = leaf.value
            out.append(_row(p, "None" if v is None else type(v).__name__, value=_plain_json(v), shown=_short(v)))
        elif isinstance(leaf, BigIntNode):
            out.append(_row(p, "int", value=leaf.value, shown=_short(int(leaf.value)) if leaf.value.lstrip("-").isdigit()
                            else leaf.value))
        elif isinstance(leaf, BytesNode):
            out.append(_row(p, "bytes", nbytes=len(leaf.value), value=leaf.value.hex(), shown=_short(leaf.value)))


def _object_rows(obj: Any, path: list[Any], out: list[dict[str, Any]], depth: int = 0) -> None:
    """The same rows for a Python object (what torch.load returned)."""
    if depth > 512:
        raise _Failed("the object is nested deeper than 512 levels")
    if isinstance(obj, dict):
        if not obj:
            out.append(_row(path, "dict", value={}, shown="{}"))
        for k, v in obj.items():
            _object_rows(v, [*path, k], out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        if not obj:
            out.append(_row(path, type(obj).__name__, value=[], shown="()" if isinstance(obj, tuple) else "[]"))
        for i, v in enumerate(obj):
            _object_rows(v, [*path, i], out, depth + 1)
    elif isinstance(obj, torch.Tensor):
        out.append(_row(path, "tensor", str(obj.dtype).removeprefix("torch."), list(obj.shape),
                        obj.numel() * obj.element_size()))
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        out.append(_row(path, "None" if obj is None else type(obj).__name__, value=_plain_json(obj), shown=_short(obj)))
    else:
        out.append(_row(path, type(obj).__name__, value=_short(obj), shown=_short(obj)))


def _shape(shape: list[int] | None) -> str:
    if shape is None:
        return ""
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _key_table(title: str, rows: list[dict[str, Any]]) -> Any:
    from rich import box
    from rich.table import Table

    kt = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for col, just in (("key", "left"), ("kind", "left"), ("dtype", "left"), ("shape", "left"), ("bytes", "right"),
                      ("value", "left")):
        kt.add_column(col, justify=just, no_wrap=col not in ("key", "value"))  # type: ignore[arg-type]
    for r in rows:
        kt.add_row(_text(r["key"] or "<root>"), r["kind"], r["dtype"], _shape(r["shape"]),
                   "" if r["nbytes"] is None else str(r["nbytes"]), _text(r["shown"]))
    return kt


def _json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "shown"} for r in rows]


def _inspect_file(p: Path, kind: FileKind, fmt: str, args: argparse.Namespace) -> int:
    obj = kind.load_file(p, fmt)  # never unpickles arbitrary classes
    rows: list[dict[str, Any]] = []
    _object_rows(obj, [], rows)
    size = p.stat().st_size
    if args.json:
        json.dump({"path": str(p), "format": f"{kind.name} ({fmt})", "nbytes": size, "keys": _json_rows(rows)},
                  sys.stdout, indent=2)
        print()
        return 0
    con = _console()
    con.print(_text(f"{p}: a {kind.name} file ({fmt} format, {_size(size)}), read with torch.load(weights_only=True)"))
    con.print(_key_table(f"values ({len(rows)})", rows))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    pt = _file_kind(args.ckpt)
    if pt is not None:
        return _inspect_file(*pt, args)
    ck = _resolve(args.ckpt, args)
    try:
        kind = _kind(ck)
        first = run_sync(kind.rank_manifest(ck.storage, ck.name, ck.rec, args.rank, "inspect"))
        manifests = [first if r == args.rank else run_sync(kind.rank_manifest(ck.storage, ck.name, ck.rec, r, "inspect"))
                     for r in range(ck.rec.world_size)]
        latest = run_sync(read_latest(ck.storage))
    finally:
        run_sync(ck.storage.close())
    rec = ck.rec
    ranks = range(len(manifests)) if args.all_ranks else [args.rank]
    rows: dict[int, list[dict[str, Any]]] = {}
    for r in ranks:
        rows[r] = []
        _tree_rows(manifests[r].tree, [], manifests[r], rows[r])
    if args.json:
        out = {
            "path": ck.path, "name": ck.name, "step": rec.step, "created": rec.created, "format": rec.format,
            "version": rec.version, "kind": rec.kind, "layout": rec.layout, "checksum_algo": rec.checksum_algo,
            "world_size": rec.world_size, "total_nbytes": rec.total_nbytes, "metadata": rec.metadata,
            "logical_nbytes": rec.total_nbytes + sum(referenced_nbytes(m) for m in manifests),
            "is_latest": latest is not None and latest.name == ck.name,
            "ranks": [
                {"rank": m.rank, "data_file": m.data_file, "data_nbytes": m.data_nbytes, "chunk_size": m.chunk_size,
                 "stored_nbytes": ChunkGeometry.of(m).stored_nbytes, "chunks": len(m.chunk_checksums),
                 "manifest_nbytes": ref.nbytes, "entries": len(m.entries), "features": list(m.features),
                 "referenced_nbytes": referenced_nbytes(m), "references": [t.file for t in m.refs]}
                for m, ref in zip(manifests, rec.manifests)
            ],
            "keys": {str(r): _json_rows(rows[r]) for r in ranks},
        }
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    from rich import box
    from rich.table import Table

    con = _console()
    referenced = sum(referenced_nbytes(m) for m in manifests)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    for k, v in (
        ("checkpoint", ck.path + ("  (latest)" if latest is not None and latest.name == ck.name else "")),
        ("step", "-" if rec.step is None else str(rec.step)),
        ("created", _when(rec.created)),
        ("format", f"{rec.format} version {rec.version}, kind {rec.kind}, layout {rec.layout}"),
        ("checksum", f"{rec.checksum_algo} per chunk; manifests checked against the commit record"),
        ("world size", str(rec.world_size)),
        ("total", f"{_size(rec.total_nbytes)} ({rec.total_nbytes} bytes)"),
        *([("logical", f"{_size(rec.total_nbytes + referenced)} ({referenced} bytes stored by reference in "
                       f"{', '.join(sorted({t.name for m in manifests for t in m.refs}))})")] if referenced else []),
        ("metadata", ", ".join(f"{k}={v}" for k, v in rec.metadata.items()) or "-"),
    ):
        summary.add_row(k, _text(v))
    con.print(summary)
    rt = Table(title="per rank", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("rank", "data file", "data", "stored", "chunks", "chunk size", "manifest", "keys"):
        rt.add_column(col, justify="left" if col == "data file" else "right", no_wrap=True)
    for m, ref in zip(manifests, rec.manifests):
        rt.add_row(str(m.rank), _text(m.data_file), _size(m.data_nbytes), _size(ChunkGeometry.of(m).stored_nbytes),
                   str(len(m.chunk_checksums)),
                   _size(m.chunk_size), _size(ref.nbytes), str(len(m.entries)))
    con.print(rt)
    for r in ranks:
        stored = sum(1 for e in manifests[r].entries if e.view_of < 0 and e.ref < 0)
        by_ref = sum(1 for e in manifests[r].entries if e.ref >= 0)
        con.print(_key_table(f"values of rank {r} ({len(rows[r])}; {stored} stored in the data file"
                             + (f", {by_ref} by reference to sibling checkpoints" if by_ref else "") + ")", rows[r]))
    return 0


# -- verify -------------------------------------------------------------------------------------
def _verify_file(p: Path, kind: FileKind, fmt: str) -> int:
    t0 = time.perf_counter()
    report = kind.verify_file(p, fmt)
    if report.problems:
        print(f"FAILED {'; '.join(report.problems)}")
        return 1
    print(f"OK {p}: {report.summary} ({time.perf_counter() - t0:.2f} s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    rc = 0
    for path in args.ckpt:
        rc = max(rc, _each(args, path, _verify_one))
    return rc


def _each(args: argparse.Namespace, path: str, fn: Any) -> int:
    """Run ``fn(path, args)`` for one of several paths: an error is reported, with its exit status, and the next runs."""
    try:
        return int(fn(path, args))
    except CheckpointError as exc:
        print(f"asyncckpt {args.verb}: error: {exc}", file=sys.stderr)
        return _exit_status(exc)


def _verify_one(path: str, args: argparse.Namespace) -> int:
    pt = _file_kind(path)
    if pt is not None:
        return _verify_file(*pt)
    ck = _resolve(path, args)
    t0 = time.perf_counter()
    try:
        kind = _kind(ck)
        with _progress(args, None, f"verify {ck.name}") as bar:
            def total(n: int) -> None:
                bar.total = n
                bar.refresh()

            report = run_sync(kind.verify(ck.storage, ck.name, ck.rec, bar.update, total))
    finally:
        run_sync(ck.storage.close())
    problems, checked, files = report.problems, report.checked, report.files
    dt = time.perf_counter() - t0
    rate = f"{_size(int(checked / dt)) if dt > 0 else '-'}/s"
    if problems:
        print(f"FAILED {ck.path}: {len(problems)} problem(s)", file=sys.stdout)
        for p in problems:
            print(f"  - {p}", file=sys.stdout)
        return 1
    print(f"OK {ck.path}: step {ck.rec.step}, {files} files, {_size(checked)} verified ({ck.rec.checksum_algo}) "
          f"in {dt:.2f} s ({rate})")
    return 0


# -- rm / prune -----------------------------------------------------------------------------------
def _rm_message(r: DeleteReport) -> str:
    msg = f"deleted {r.path} ({r.kind}{'' if r.complete else ', incomplete'}; {len(r.deleted)} file(s))"
    if r.latest == "":
        msg += f"; no complete checkpoint left, '{LATEST_FILE}' removed"
    elif r.latest is not None:
        msg += f"; '{LATEST_FILE}' now points to {r.latest}"
    if r.kept:
        msg += f"; left in place (not the checkpoint's own): {', '.join(r.kept[:5])}{' ...' if len(r.kept) > 5 else ''}"
    for note in r.notes:
        msg += f"\n  note: {note}"
    return msg


def _rm_one(path: str, args: argparse.Namespace) -> int:
    report = run_sync(delete_async(path, force=args.force, storage_options=_opts_for(path, args)))
    print(_rm_message(report))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    rc = 0
    for path in args.ckpt:
        rc = max(rc, _each(args, path, _rm_one))
    return rc


def cmd_prune(args: argparse.Namespace) -> int:
    if args.keep_last is None and args.keep_every is None and args.max_age is None:
        raise BadInputError("prune needs at least one of --keep-last, --keep-every, --max-age")
    storage = _open_root(args.root, args)
    try:
        gone = run_sync(prune_async(storage, keep_last=args.keep_last, keep_every=args.keep_every,
                                    max_age_s=args.max_age, dry_run=args.dry_run))
    finally:
        run_sync(storage.close())
    verb = "would delete" if args.dry_run else "deleted"
    for i in gone:
        print(f"{verb} {i.path} (step {i.step}, {_size(i.nbytes)})")
    print(f"{verb} {len(gone)} checkpoint(s), {_size(sum(i.nbytes for i in gone))}")
    return 0


# -- export ---------------------------------------------------------------------------------------
def _select(tree: Node, key: str | None, include_internal: bool) -> Node:
    if key is None:
        if isinstance(tree, DictNode) and not include_internal and RESERVED_KEY in tree.keys:
            pairs = [(k, v) for k, v in zip(tree.keys, tree.values) if k != RESERVED_KEY]
            return DictNode(keys=[k for k, _ in pairs], values=[v for _, v in pairs], ordered=tree.ordered)
        return tree
    node = tree
    try:
        parts = parse_path(key)
    except UnicodeDecodeError as exc:
        raise BadInputError(f"--key {key!r}: a %XX escape is not valid UTF-8 ({exc.reason})") from None
    for part in parts:
        if isinstance(node, DictNode):
            hits = [v for k, v in zip(node.keys, node.values) if k == part and type(k) is type(part)]
            if not hits and isinstance(part, int):  # bare digits also name the str key of those digits
                hits = [v for k, v in zip(node.keys, node.values) if k == str(part)]
            if not hits:
                raise BadInputError(f"--key {key!r}: no {format_key(part)} here (has: "
                                    f"{', '.join(format_key(k) for k in node.keys[:20])}); keys are written as "
                                    "`asyncckpt inspect` shows them")
            node = hits[0]
        elif isinstance(node, ListNode) and isinstance(part, int) and 0 <= part < len(node.items):
            node = node.items[part]
        else:
            raise BadInputError(f"--key {key!r}: {format_key(part)} does not name anything inside a {type(node).__name__}")
    return node


class _CountingFile:
    """A binary file that reports every write to a progress bar."""

    def __init__(self, f: Any, bar: tqdm) -> None:
        self._f, self._bar = f, bar

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._bar.update(n)
        return n

    def flush(self) -> None:
        self._f.flush()


def _stream_entries(storage: Storage, m: RankManifest, wanted: list[int], bar: tqdm, on_bytes: Any) -> None:
    """Read and verify every chunk (and those holding the entries stored by reference); hand the ``wanted``
    entries' ``(entry index, offset in entry, bytes)`` on."""
    run_sync(read_entries(storage, m, [i for i in wanted if m.entries[i].ref < 0], on_bytes, progress=bar.update))

    def counted(i: int, off: int, data: np.ndarray) -> None:
        on_bytes(i, off, data)
        bar.update(len(data))

    run_sync(read_references(storage, m, [i for i in wanted if m.entries[i].ref >= 0], counted))


def _export_safetensors(ck: _Ckpt, m: RankManifest, node: Node, tmp: Path, args: argparse.Namespace) -> tuple[int, list[str]]:
    chosen: list[tuple[str, int, str]] = []
    skipped: list[str] = []
    for path, leaf in leaves(node, m.data_file):
        name = format_path(path)
        if isinstance(leaf, RefNode):
            st_dtype = safetensors_dtype(m.entries[leaf.index])
            if st_dtype is not None:
                chosen.append((name or "tensor", leaf.index, st_dtype))
                continue
        skipped.append(name or "<root>")
    names = [c[0] for c in chosen]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise BadInputError(f"these tensor names collide once flattened with '/': {dup[:5]}; export a --key below them")
    chosen.sort(key=lambda c: m.entries[c[1]].offset)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "asyncckpt.source": ck.path,
                                               "asyncckpt.step": str(ck.rec.step)}}
    out_off: dict[int, int] = {}
    pos = 0
    for name, idx, st_dtype in chosen:
        e = m.entries[idx]
        header[name] = {"dtype": st_dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        out_off[idx] = pos
        pos += e.nbytes
    # safetensors cannot share storage: a view of a shared storage is written as its own copy,
    # from its storage's bytes held in memory (read and verified like every other byte).
    views = [c[1] for c in chosen if m.entries[c[1]].view_of >= 0]
    held: dict[int, np.ndarray] = {i: np.empty(m.entries[i].nbytes, dtype=np.uint8) for i in stored_entries(m, views)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    base = 8 + len(blob)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    # Chunks arrive on reader threads, which an interrupt (Ctrl-C) does not stop at once: no write
    # may reach ``fd`` after it is closed (its number could be another file's by then).
    lock, open_ = threading.Lock(), [True]

    def write_at(view: memoryview, at: int) -> None:
        with lock:
            while view and open_[0]:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n

    try:
        os.write(fd, len(blob).to_bytes(8, "little") + blob)
        os.ftruncate(fd, base + pos)

        def put(idx: int, off: int, data: np.ndarray) -> None:
            if idx in held:
                held[idx][off : off + len(data)] = data
            if idx in out_off:
                write_at(data.data, base + out_off[idx] + off)

        direct = [c[1] for c in chosen if m.entries[c[1]].view_of < 0]
        with _progress(args, m.data_nbytes + referenced_nbytes(m), f"export {ck.name}") as bar:
            _stream_entries(ck.storage, m, sorted(set(direct) | set(held)), bar, put)
        values = entry_values(m, held, views, f"{ck.path}/{m.data_file}")
        for idx in views:
            data = values[idx].contiguous().reshape(-1).view(torch.uint8).numpy()
            write_at(memoryview(data), base + out_off[idx])
        os.fsync(fd)
    finally:
        with lock:
            open_[0] = False
            os.close(fd)
    if views:
        print(f"note: {len(views)} tensor(s) shared a storage with others in the checkpoint; safetensors cannot "
              "share storage, so each was written as its own copy (tied weights are separate tensors in the file)",
              file=sys.stderr)
    return len(chosen), skipped


def _export_pt(ck: _Ckpt, m: RankManifest, node: Node, tmp: Path, args: argparse.Namespace) -> tuple[int, list[str]]:
    wanted = refs(node, len(m.entries), m.data_file)
    for i in wanted:
        if m.entries[i].kind == "pickle" and not args.allow_pickle:
            raise BadInputError(f"key {m.entries[i].key!r} holds a pickled object; loading it could run code. "
                                "Pass --allow-pickle only if you trust this checkpoint (or export a --key without it)")
    bufs: dict[int, np.ndarray] = {i: np.empty(m.entries[i].nbytes, dtype=np.uint8) for i in stored_entries(m, wanted)}

    def put(idx: int, off: int, data: np.ndarray) -> None:
        bufs[idx][off : off + len(data)] = data

    with _progress(args, m.data_nbytes + referenced_nbytes(m), f"read {ck.name}") as bar:
        _stream_entries(ck.storage, m, list(bufs), bar, put)
    where = f"{ck.path}/{m.data_file}"
    values = entry_values(m, bufs, wanted, where)
    for i in wanted:  # torch.save writes tensors, not NumPy arrays
        if m.entries[i].kind == "ndarray":
            values[i] = torch.from_numpy(values[i].copy())
    # torch.save refuses views of one storage with different dtypes: those are written as copies.
    dtypes: dict[int, set[str]] = {}
    for i in wanted:
        if m.entries[i].view_of >= 0:
            dtypes.setdefault(m.entries[i].view_of, set()).add(m.entries[i].dtype)
    copied = [i for i in wanted if len(dtypes.get(m.entries[i].view_of, ())) > 1]
    for i in copied:
        values[i] = values[i].clone()
    if copied:
        print(f"note: {len(copied)} tensor(s) viewed one storage as different dtypes, which torch.save cannot "
              f"store; each was written as its own copy: {', '.join(m.entries[i].key for i in copied[:8])}"
              f"{' ...' if len(copied) > 8 else ''}", file=sys.stderr)
    obj = build_tree(node, values, where)
    with open(tmp, "xb") as f, _progress(args, None, f"write {args.to}") as bar:
        torch.save(obj, cast(IO[bytes], _CountingFile(f, bar)))  # write/flush is all torch.save uses
        f.flush()
        os.fsync(f.fileno())
    return len(wanted), []


def cmd_export(args: argparse.Namespace) -> int:
    dest = Path(args.to)
    fmt = args.format or ("safetensors" if dest.suffix == ".safetensors" else "pt" if dest.suffix in (".pt", ".pth", ".bin") else None)
    if fmt is None:
        raise BadInputError(f"--to {dest}: cannot tell the format from the suffix; name it *.pt or *.safetensors, or pass --format")
    if "://" in args.to:
        raise BadInputError(f"--to {args.to}: export writes a local file")
    if dest.is_dir():
        raise BadInputError(f"--to {dest} is a directory; name the file to write (model.pt, model.safetensors)")
    if dest.exists() and not args.force:
        raise BadInputError(f"{dest} exists; pass --force to replace it")
    if not dest.parent.is_dir():
        raise BadInputError(f"{dest.parent} is not a directory")
    ck = _resolve(args.ckpt, args)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        kind = _kind(ck)
        rank = args.rank
        if rank is None:
            if ck.rec.world_size != 1 and kind.has_rank_manifests:
                raise BadInputError(f"{ck.path} was saved by {ck.rec.world_size} ranks; pass --rank")
            rank = 0
        m = run_sync(kind.rank_manifest(ck.storage, ck.name, ck.rec, rank, "export"))
        node = _select(m.tree, args.key, args.all)
        t0 = time.perf_counter()
        if fmt == "safetensors":
            n, skipped = _export_safetensors(ck, m, node, tmp, args)
        else:
            n, skipped = _export_pt(ck, m, node, tmp, args)
        os.replace(tmp, dest)
        with contextlib.suppress(OSError):
            dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        run_sync(ck.storage.close())
    if skipped:
        print(f"note: {len(skipped)} non-tensor value(s) not exported (safetensors holds tensors only): "
              f"{', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}", file=sys.stderr)
    print(f"exported {n} tensor(s) of {ck.path} (rank {rank}) to {dest} ({fmt}, {_size(dest.stat().st_size)}) "
          f"in {time.perf_counter() - t0:.2f} s")
    return 0


# -- pause ----------------------------------------------------------------------------------------
def cmd_pause(args: argparse.Namespace) -> int:
    storage = _open_root(args.root, args)
    try:
        request_pause(storage, reason=args.reason)
    finally:
        run_sync(storage.close())
    print(f"pause requested at {storage.uri}: the job saves at its next step boundary and stops; "
          "run it again to resume")
    return 0


# -- main -----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("storage")
    g.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL / AWS settings)")
    g.add_argument("--region", help="S3 region")
    g.add_argument("--profile", help="AWS profile")
    common.add_argument("--log", metavar="LEVEL", help="print asyncckpt's log records (info, debug)")
    prog = argparse.ArgumentParser(parents=[common], add_help=False)
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="always show the progress bar (default: only on a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")

    p = argparse.ArgumentParser(prog="asyncckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"asyncckpt {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    s = sub.add_parser("ls", parents=[common], help="list checkpoints under a root, newest first")
    s.add_argument("root", metavar="ROOT")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("inspect", parents=[common], help="every value of a checkpoint (or torch.save file)")
    s.add_argument("ckpt", metavar="CKPT", help="ROOT/NAME, a ROOT (its latest checkpoint), or a torch.save file")
    s.add_argument("--rank", type=int, default=0, help="whose keys to list (default 0)")
    s.add_argument("--all-ranks", action="store_true", help="list the keys of every rank")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("verify", parents=[prog], help="read everything and check every checksum")
    s.add_argument("ckpt", metavar="CKPT", nargs="+", help="ROOT/NAME, a ROOT (its latest), or a torch.save file")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("rm", parents=[common], help="delete checkpoints, and nothing that is not one",
                       description="Delete checkpoints: only a path whose own records (COMMIT, manifests, DCP "
                       ".metadata) prove it is one, and only the files they name (COMMIT first). A ROOT means the "
                       "checkpoint its 'latest' points to, never the root itself.")
    s.add_argument("ckpt", metavar="CKPT", nargs="+", help="ROOT/NAME, or a ROOT (its latest: needs --force)")
    s.add_argument("--force", action="store_true",
                   help="also delete the one 'latest' points to, moving 'latest' to the newest remaining one")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("prune", parents=[common], help="delete what a retention policy lets go")
    s.add_argument("root", metavar="ROOT")
    s.add_argument("--keep-last", type=_positive_int, metavar="N", help="keep the newest N")
    s.add_argument("--keep-every", type=_positive_int, metavar="K", help="keep steps that are multiples of K")
    s.add_argument("--max-age", type=_parse_age, metavar="AGE", help="keep those younger than AGE (90s, 30m, 12h, 7d)")
    s.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("export", parents=[prog], help="write a checkpoint as model.pt or model.safetensors")
    s.add_argument("ckpt", metavar="CKPT")
    s.add_argument("--to", required=True, metavar="FILE", help="*.pt (torch.load) or *.safetensors")
    s.add_argument("--format", choices=["pt", "safetensors"], help="default: from the suffix of --to")
    s.add_argument("--key", help="export only this part of the state, e.g. 'model'")
    s.add_argument("--all", action="store_true", help=f"include the manager's own {RESERVED_KEY!r} record (RNG state)")
    s.add_argument("--rank", type=int, help="which rank's state (needed when several saved)")
    s.add_argument("--force", action="store_true", help="replace FILE if it exists")
    s.add_argument("--allow-pickle", action="store_true", help="unpickle pickled values (trusted checkpoints only)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("pause", parents=[common], help="ask the job training into ROOT to save and stop")
    s.add_argument("root", metavar="ROOT")
    s.add_argument("--reason", default="", help="recorded with the request")
    s.set_defaults(func=cmd_pause)
    return p


def _exit_status(exc: BaseException) -> int:
    """The one exit-status contract (docs/cli.md): 2 usage error or nothing there, 1 a failed check or refusal."""
    if isinstance(exc, (BadInputError, CheckpointNotFoundError)):
        return 2
    if isinstance(exc, StorageError) and is_missing_bucket(exc):
        return 2
    return 1  # a checkpoint failed verification (IntegrityError, FormatError), DeleteRefusedError, storage failures


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``asyncckpt`` console script and ``python -m asyncckpt``."""
    args = _parser().parse_args(argv)
    if getattr(args, "log", None):
        enable_logging(args.log)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("asyncckpt: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except CheckpointError as exc:
        print(f"asyncckpt {args.verb}: error: {exc}", file=sys.stderr)
        return _exit_status(exc)
    except BrokenPipeError:  # `asyncckpt ls ROOT | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0
    except OSError as exc:  # e.g. the export destination is not writable
        print(f"asyncckpt {args.verb}: error: {exc}", file=sys.stderr)
        return 1
