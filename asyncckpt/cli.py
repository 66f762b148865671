"""The ``asyncckpt`` command line: ls, inspect, verify, rm, prune, export, pause.

Works on local roots and ``s3://bucket/prefix`` roots (``--endpoint-url`` or the usual AWS
settings such as ``AWS_ENDPOINT_URL``). Exit status: 0 success, 1 a check failed or an
operation was refused, 2 bad input (unknown path, bad option), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import pickle
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from ._loop import _get_loop, run_sync
from .catalog import (
    CheckpointInfo,
    delete_checkpoint,
    read_commit,
    read_latest,
    read_manifest,
    set_latest,
)
from .dtypes import numpy_dtype, torch_dtype
from .errors import BadInputError, CheckpointError, CheckpointNotFoundError
from .format import LATEST_FILE, CommitRecord, DictNode, Entry, ListNode, Node, RankManifest, RefNode, checksum
from .listing import list_checkpoints_async
from .load import _build
from .logs import enable_logging
from .manager import RESERVED_KEY
from .preemption import request_pause
from .retention import prune_async
from .storage import LocalStorage, Storage, open_storage, split_uri

__all__ = ["main"]

_READ_AHEAD = 3


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


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if getattr(args, "endpoint_url", None):
        opts["endpoint_url"] = args.endpoint_url
    if getattr(args, "region", None):
        opts["region_name"] = args.region
    if getattr(args, "profile", None):
        opts["profile"] = args.profile
    return opts


def _open(uri: str, args: argparse.Namespace) -> Storage:
    return open_storage(uri, **(_storage_options(args) if "://" in uri and not uri.startswith("file://") else {}))


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


async def _resolve_async(path: str, args: argparse.Namespace) -> _Ckpt:
    """``ROOT/NAME`` -> that checkpoint; a root holding ``latest`` -> the checkpoint it points to."""
    first: CheckpointError | None = None
    try:
        root, name = split_uri(path)
    except BadInputError as exc:
        first, root, name = exc, "", ""
    if root:
        storage = _open(root, args)
        try:
            return _Ckpt(storage, name, await read_commit(storage, name))
        except CheckpointNotFoundError as exc:
            first = exc
            await storage.close()
        except BaseException:
            await storage.close()
            raise
    storage = _open(path, args)
    try:
        latest = await read_latest(storage)
        if latest is not None:
            return _Ckpt(storage, latest.name, await read_commit(storage, latest.name))
    except CheckpointNotFoundError:
        pass
    except BaseException:
        await storage.close()
        raise
    await storage.close()
    if isinstance(storage, LocalStorage) and not storage.root.exists() and not Path(path).exists():
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    raise CheckpointNotFoundError(
        f"{path} is neither a complete checkpoint (no COMMIT record) nor a root with a '{LATEST_FILE}' pointer"
        f"{f' ({first})' if first is not None and not isinstance(first, CheckpointNotFoundError) else ''}; "
        "`asyncckpt ls ROOT` lists what is there"
    )


def _resolve(path: str, args: argparse.Namespace) -> _Ckpt:
    return run_sync(_resolve_async(path, args))


def _only_asyncckpt(ck: _Ckpt, verb: str) -> None:
    if ck.rec.kind != "asyncckpt":
        raise BadInputError(
            f"{ck.path} is a {ck.rec.kind!r} checkpoint; `asyncckpt {verb}` reads asyncckpt-format checkpoints "
            f"(load it with torch.distributed.checkpoint / asyncckpt.dcp)"
        )


# -- reading data files chunk by chunk -----------------------------------------------------------
def _chunk_stream(storage: Storage, m: RankManifest, size: int) -> Iterator[tuple[int, int, np.ndarray, int]]:
    """Yield ``(index, start, bytes, crc32c)`` for every chunk within ``size`` bytes, in order.

    A few reads run ahead on the private loop; leaving the generator early (an error, Ctrl-C)
    cancels them. Checksums are computed, not compared: the caller decides.
    """
    loop = _get_loop()
    cs = m.chunk_size
    nchunks = len(m.chunk_checksums)

    async def read(i: int) -> tuple[np.ndarray, int]:
        start = i * cs
        buf = np.empty(min(cs, m.data_nbytes - start), dtype=np.uint8)
        await storage.read_into(m.data_file, start, memoryview(buf))
        return buf, await asyncio.to_thread(checksum, memoryview(buf))

    readable = [i for i in range(nchunks) if min((i + 1) * cs, m.data_nbytes) <= size]
    pending: deque[tuple[int, concurrent.futures.Future[tuple[np.ndarray, int]]]] = deque()
    it = iter(readable)
    try:
        for i in it:
            pending.append((i, asyncio.run_coroutine_threadsafe(read(i), loop)))
            if len(pending) >= _READ_AHEAD:
                break
        while pending:
            i, fut = pending.popleft()
            buf, crc = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, asyncio.run_coroutine_threadsafe(read(nxt), loop)))
            yield i, i * cs, buf, crc
    finally:
        for _, fut in pending:
            fut.cancel()


def _keys_in(m: RankManifest, start: int, end: int) -> list[str]:
    return [e.key for e in m.entries if e.nbytes and e.offset < end and e.offset + e.nbytes > start] or ["<padding>"]


# -- ls -----------------------------------------------------------------------------------------
def _info_json(i: CheckpointInfo) -> dict[str, Any]:
    return {
        "name": i.name, "path": i.path, "step": i.step, "created": i.created, "nbytes": i.nbytes,
        "world_size": i.world_size, "kind": i.kind, "tiers": list(i.tiers), "is_latest": i.is_latest,
        "complete": i.complete, "problem": i.problem or None,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    storage = _open(args.root, args)
    try:
        if isinstance(storage, LocalStorage) and not storage.root.is_dir():
            raise CheckpointNotFoundError(f"{args.root}: no such directory")
        infos = run_sync(list_checkpoints_async(storage, include_incomplete=True))
    finally:
        run_sync(storage.close())
    complete = [i for i in infos if i.complete]
    broken = [i for i in infos if not i.complete]
    if args.json:
        json.dump({"root": storage.uri, "checkpoints": [_info_json(i) for i in complete],
                   "incomplete": [_info_json(i) for i in broken]}, sys.stdout, indent=2)
        print()
        return 0
    from rich import box
    from rich.table import Table

    con = _console()
    table = Table(title=f"{storage.uri}: {len(complete)} complete checkpoint(s), newest first",
                  box=box.SIMPLE_HEAD, title_justify="left")
    for col, just in (("step", "right"), ("name", "left"), ("created", "left"), ("size", "right"),
                      ("ranks", "right"), ("kind", "left"), ("tiers", "left"), ("latest", "left")):
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for i in complete:
        table.add_row("-" if i.step is None else str(i.step), i.name, _when(i.created), _size(i.nbytes),
                      str(i.world_size), i.kind, ", ".join(i.tiers), "<- latest" if i.is_latest else "")
    con.print(table)
    if broken:
        bt = Table(title=f"{len(broken)} incomplete or corrupt (never loaded; `asyncckpt rm` removes them)",
                   box=box.SIMPLE_HEAD, title_justify="left")
        bt.add_column("name", no_wrap=True)
        bt.add_column("problem")
        for i in broken:
            bt.add_row(i.name, i.problem)
        con.print(bt)
    return 0


# -- inspect ------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    ck = _resolve(args.ckpt, args)
    try:
        _only_asyncckpt(ck, "inspect")
        manifests = [run_sync(read_manifest(ck.storage, ck.name, ref.rank, ref)) for ref in ck.rec.manifests]
        latest = run_sync(read_latest(ck.storage))
    finally:
        run_sync(ck.storage.close())
    rec = ck.rec
    ranks = range(len(manifests)) if args.all_ranks else [args.rank]
    if args.rank >= len(manifests):
        raise BadInputError(f"{ck.path} has ranks 0..{len(manifests) - 1}, not {args.rank}")
    if args.json:
        out = {
            "path": ck.path, "name": ck.name, "step": rec.step, "created": rec.created, "format": rec.format,
            "version": rec.version, "kind": rec.kind, "layout": rec.layout, "checksum_algo": rec.checksum_algo,
            "world_size": rec.world_size, "total_nbytes": rec.total_nbytes, "metadata": rec.metadata,
            "is_latest": latest is not None and latest.name == ck.name,
            "ranks": [
                {"rank": m.rank, "data_file": m.data_file, "data_nbytes": m.data_nbytes, "chunk_size": m.chunk_size,
                 "chunks": len(m.chunk_checksums), "manifest_nbytes": ref.nbytes, "entries": len(m.entries)}
                for m, ref in zip(manifests, rec.manifests)
            ],
            "keys": {str(r): [{"key": e.key, "kind": e.kind, "dtype": e.dtype, "shape": e.shape, "nbytes": e.nbytes,
                               "offset": e.offset} for e in manifests[r].entries] for r in ranks},
        }
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    from rich import box
    from rich.table import Table

    con = _console()
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
        ("metadata", ", ".join(f"{k}={v}" for k, v in rec.metadata.items()) or "-"),
    ):
        summary.add_row(k, v)
    con.print(summary)
    rt = Table(title="per rank", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("rank", "data file", "data", "chunks", "chunk size", "manifest", "keys"):
        rt.add_column(col, justify="left" if col == "data file" else "right", no_wrap=True)
    for m, ref in zip(manifests, rec.manifests):
        rt.add_row(str(m.rank), m.data_file, _size(m.data_nbytes), str(len(m.chunk_checksums)), _size(m.chunk_size),
                   _size(ref.nbytes), str(len(m.entries)))
    con.print(rt)
    for r in ranks:
        m = manifests[r]
        kt = Table(title=f"keys of rank {r} ({len(m.entries)})", box=box.SIMPLE_HEAD, title_justify="left")
        for col, just in (("key", "left"), ("kind", "left"), ("dtype", "left"), ("shape", "left"), ("bytes", "right")):
            kt.add_column(col, justify=just, no_wrap=col != "key")  # type: ignore[arg-type]
        for e in m.entries:
            kt.add_row(e.key, e.kind, e.dtype, "(" + ", ".join(map(str, e.shape)) + ("," if len(e.shape) == 1 else "") + ")",
                       str(e.nbytes))
        con.print(kt)
    return 0


# -- verify -------------------------------------------------------------------------------------
def _verify_rank(storage: Storage, m: RankManifest, bar: tqdm) -> tuple[int, list[str]]:
    where = f"{storage.uri}/{m.data_file}"
    problems: list[str] = []
    try:
        size = run_sync(storage.size(m.data_file))
    except CheckpointNotFoundError:
        bar.update(m.data_nbytes)
        keys = [e.key for e in m.entries if e.nbytes]
        return 0, [f"{where}: data file of rank {m.rank} is missing (keys: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''})"]
    if size != m.data_nbytes:
        what = "truncated" if size < m.data_nbytes else "longer than its manifest says"
        lost = _keys_in(m, size, m.data_nbytes) if size < m.data_nbytes else []
        problems.append(f"{where}: data file is {what}: {size} bytes, manifest says {m.data_nbytes}"
                        + (f"; keys past the end: {', '.join(lost[:8])}" if lost else ""))
    checked = 0
    for i, start, buf, crc in _chunk_stream(storage, m, size):
        end = start + len(buf)
        if crc != m.chunk_checksums[i]:
            keys = _keys_in(m, start, end)
            problems.append(
                f"{where}: bytes [{start}, {end}) fail their {m.checksum_algo} (got {crc:#010x}, expected "
                f"{m.chunk_checksums[i]:#010x}); affected keys: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            )
        checked += len(buf)
        bar.update(len(buf))
    bar.update(max(0, m.data_nbytes - checked) if size < m.data_nbytes else 0)
    return checked, problems


def cmd_verify(args: argparse.Namespace) -> int:
    rc = 0
    for path in args.ckpt:
        rc = max(rc, _verify_one(path, args))
    return rc


def _verify_one(path: str, args: argparse.Namespace) -> int:
    ck = _resolve(path, args)
    t0 = time.perf_counter()
    problems: list[str] = []
    checked = files = 0
    try:
        _only_asyncckpt(ck, "verify")
        manifests: list[RankManifest] = []
        for ref in ck.rec.manifests:
            try:
                manifests.append(run_sync(read_manifest(ck.storage, ck.name, ref.rank, ref)))
                files += 1
            except CheckpointError as exc:
                problems.append(str(exc))
        total = sum(m.data_nbytes for m in manifests)
        with _progress(args, total, f"verify {ck.name}") as bar:
            for m in manifests:
                n, probs = _verify_rank(ck.storage, m, bar)
                checked += n
                files += 1
                problems += probs
    finally:
        run_sync(ck.storage.close())
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
async def _rm_one(path: str, args: argparse.Namespace) -> tuple[int, str]:
    root, name = split_uri(path)
    storage = _open(root, args)
    try:
        if not await storage.list(name):
            return 2, f"{path}: no checkpoint there"
        latest = await read_latest(storage)
        is_latest = latest is not None and latest.name == name
        if is_latest and not args.force:
            return 1, (f"{path} is what '{LATEST_FILE}' points to; not deleted (--force deletes it and moves "
                       f"'{LATEST_FILE}' to the newest remaining checkpoint)")
        await delete_checkpoint(storage, name, force=is_latest)
        msg = f"deleted {storage.uri.rstrip('/')}/{name}"
        if is_latest:
            rest = [i for i in await list_checkpoints_async(storage) if i.name != name]
            if rest:
                await set_latest(storage, rest[0].name, rest[0].step)
                msg += f"; '{LATEST_FILE}' now points to {rest[0].name}"
            else:
                await storage.delete(LATEST_FILE)
                msg += f"; no complete checkpoint left, '{LATEST_FILE}' removed"
        return 0, msg
    finally:
        await storage.close()


def cmd_rm(args: argparse.Namespace) -> int:
    rc = 0
    for path in args.ckpt:
        try:
            code, msg = run_sync(_rm_one(path, args))
        except CheckpointError as exc:
            code, msg = 1, f"{path}: {exc}"
        print(msg, file=sys.stdout if code == 0 else sys.stderr)
        rc = max(rc, code)
    return rc


def cmd_prune(args: argparse.Namespace) -> int:
    if args.keep_last is None and args.keep_every is None and args.max_age is None:
        raise BadInputError("prune needs at least one of --keep-last, --keep-every, --max-age")
    storage = _open(args.root, args)
    try:
        if isinstance(storage, LocalStorage) and not storage.root.is_dir():
            raise CheckpointNotFoundError(f"{args.root}: no such directory")
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
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32",
    "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
}
_NP_TO_TORCH = {"f8": "float64", "f4": "float32", "f2": "float16", "i8": "int64", "i4": "int32", "i2": "int16",
                "i1": "int8", "u1": "uint8", "b1": "bool", "u2": "uint16", "u4": "uint32", "u8": "uint64", "c8": "complex64"}


def _entry_torch_dtype(e: Entry) -> str | None:
    if e.kind == "tensor":
        return e.dtype
    if e.kind == "ndarray":
        dt = numpy_dtype(e.dtype)
        return _NP_TO_TORCH.get(f"{dt.kind}{dt.itemsize}")
    return None


def _select(tree: Node, key: str | None, include_internal: bool) -> Node:
    if key is None:
        if isinstance(tree, DictNode) and not include_internal and RESERVED_KEY in tree.keys:
            pairs = [(k, v) for k, v in zip(tree.keys, tree.values) if k != RESERVED_KEY]
            return DictNode(keys=[k for k, _ in pairs], values=[v for _, v in pairs], ordered=tree.ordered)
        return tree
    node = tree
    for part in key.split("/"):
        if isinstance(node, DictNode):
            hits = [v for k, v in zip(node.keys, node.values) if str(k) == part]
            if not hits:
                raise BadInputError(f"--key {key!r}: no {part!r} here (has: {', '.join(str(k) for k in node.keys[:20])})")
            node = hits[0]
        elif isinstance(node, ListNode) and part.isdigit() and int(part) < len(node.items):
            node = node.items[int(part)]
        else:
            raise BadInputError(f"--key {key!r}: {part!r} does not name anything inside a {type(node).__name__}")
    return node


def _leaves(node: Node, prefix: str, out: list[tuple[str, Node]]) -> None:
    if isinstance(node, DictNode):
        for k, v in zip(node.keys, node.values):
            _leaves(v, f"{prefix}/{k}" if prefix else str(k), out)
    elif isinstance(node, ListNode):
        for i, v in enumerate(node.items):
            _leaves(v, f"{prefix}/{i}" if prefix else str(i), out)
    else:
        out.append((prefix, node))


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
    """Read and verify the chunks holding the ``wanted`` entries; hand ``(entry index, offset in entry, bytes)`` on."""
    where = f"{storage.uri}/{m.data_file}"
    size = run_sync(storage.size(m.data_file))
    if size != m.data_nbytes:
        raise CheckpointError(f"{where}: data file is {size} bytes, its manifest says {m.data_nbytes}; run `asyncckpt verify`")
    order = sorted(wanted, key=lambda i: m.entries[i].offset)
    j = 0
    for i, start, buf, crc in _chunk_stream(storage, m, size):
        end = start + len(buf)
        if crc != m.chunk_checksums[i]:
            raise CheckpointError(f"{where}: bytes [{start}, {end}) fail their checksum (keys: "
                                  f"{', '.join(_keys_in(m, start, end)[:8])}); nothing was exported")
        while j < len(order) and m.entries[order[j]].offset + m.entries[order[j]].nbytes <= start:
            j += 1
        k = j
        while k < len(order) and m.entries[order[k]].offset < end:
            e = m.entries[order[k]]
            lo, hi = max(start, e.offset), min(end, e.offset + e.nbytes)
            if lo < hi:
                on_bytes(order[k], lo - e.offset, buf[lo - start : hi - start])
            k += 1
        bar.update(len(buf))


def _export_safetensors(ck: _Ckpt, m: RankManifest, node: Node, tmp: Path, args: argparse.Namespace) -> tuple[int, list[str]]:
    leaves: list[tuple[str, Node]] = []
    _leaves(node, "", leaves)
    chosen: list[tuple[str, int, str]] = []
    skipped: list[str] = []
    for name, leaf in leaves:
        if isinstance(leaf, RefNode):
            e = m.entries[leaf.index]
            dt = _entry_torch_dtype(e)
            if dt in _ST_DTYPES:
                chosen.append((name or "tensor", leaf.index, _ST_DTYPES[dt]))
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
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    base = 8 + len(blob)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, len(blob).to_bytes(8, "little") + blob)
        os.ftruncate(fd, base + pos)

        def put(idx: int, off: int, data: np.ndarray) -> None:
            view = memoryview(data)
            at = base + out_off[idx] + off
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n

        with _progress(args, m.data_nbytes, f"export {ck.name}") as bar:
            _stream_entries(ck.storage, m, [c[1] for c in chosen], bar, put)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(chosen), skipped


def _export_pt(ck: _Ckpt, m: RankManifest, node: Node, tmp: Path, args: argparse.Namespace) -> tuple[int, list[str]]:
    leaves: list[tuple[str, Node]] = []
    _leaves(node, "", leaves)
    wanted = [leaf.index for _, leaf in leaves if isinstance(leaf, RefNode)]
    for i in wanted:
        if m.entries[i].kind == "pickle" and not args.allow_pickle:
            raise BadInputError(f"key {m.entries[i].key!r} holds a pickled object; loading it could run code. "
                                "Pass --allow-pickle only if you trust this checkpoint (or export a --key without it)")
    bufs: dict[int, np.ndarray] = {i: np.empty(m.entries[i].nbytes, dtype=np.uint8) for i in wanted}

    def put(idx: int, off: int, data: np.ndarray) -> None:
        bufs[idx][off : off + len(data)] = data

    with _progress(args, m.data_nbytes, f"read {ck.name}") as bar:
        _stream_entries(ck.storage, m, wanted, bar, put)
    values: list[Any] = [None] * len(m.entries)
    where = f"{ck.path}/{m.data_file}"
    for i, raw in bufs.items():
        e = m.entries[i]
        if e.kind == "tensor":
            t = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)
            values[i] = t.view(torch_dtype(e.dtype, where)).reshape(e.shape)
        elif e.kind == "ndarray":
            values[i] = torch.from_numpy(raw.view(numpy_dtype(e.dtype, where)).reshape(e.shape).copy())
        else:
            values[i] = pickle.loads(raw.tobytes())
    obj = _build(node, values, set(), where, 0)
    with open(tmp, "xb") as f, _progress(args, None, f"write {args.to}") as bar:
        torch.save(obj, _CountingFile(f, bar))
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
        _only_asyncckpt(ck, "export")
        rank = args.rank
        if rank is None:
            if ck.rec.world_size != 1:
                raise BadInputError(f"{ck.path} was saved by {ck.rec.world_size} ranks; pass --rank")
            rank = 0
        if not 0 <= rank < ck.rec.world_size:
            raise BadInputError(f"{ck.path} has ranks 0..{ck.rec.world_size - 1}, not {rank}")
        m = run_sync(read_manifest(ck.storage, ck.name, rank, ck.rec.manifests[rank]))
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
    storage = _open(args.root, args)
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

    s = sub.add_parser("inspect", parents=[common], help="keys, dtypes, shapes and bytes of a checkpoint")
    s.add_argument("ckpt", metavar="CKPT", help="ROOT/NAME, or a ROOT (its latest checkpoint)")
    s.add_argument("--rank", type=int, default=0, help="whose keys to list (default 0)")
    s.add_argument("--all-ranks", action="store_true", help="list the keys of every rank")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("verify", parents=[prog], help="read everything and check every checksum")
    s.add_argument("ckpt", metavar="CKPT", nargs="+")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("rm", parents=[common], help="delete checkpoints (commit record first)")
    s.add_argument("ckpt", metavar="CKPT", nargs="+")
    s.add_argument("--force", action="store_true", help="also delete the one 'latest' points to")
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
    except (BadInputError, CheckpointNotFoundError) as exc:
        print(f"asyncckpt {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"asyncckpt {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `asyncckpt ls ROOT | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0
    except OSError as exc:  # e.g. the export destination is not writable
        print(f"asyncckpt {args.verb}: error: {exc}", file=sys.stderr)
        return 1
