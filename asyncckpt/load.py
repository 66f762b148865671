"""Loading: verify every checksum, rebuild the state, optionally in place and onto a device."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import time
from typing import Any

import numpy as np
import torch

from ._loop import gather_or_cancel, run_sync
from .catalog import read_commit, read_latest, read_manifest, resolve_name
from .dtypes import numpy_dtype, torch_dtype
from .errors import BadInputError, CheckpointError, CheckpointNotFoundError, FormatError, IntegrityError, StorageError
from .format import BigIntNode, BytesNode, DictNode, ListNode, Node, RankManifest, RefNode, ValueNode, checksum
from .storage import Storage, open_storage, split_uri
from .tiers import TieredPath, Tiers

_log = logging.getLogger("asyncckpt")

__all__ = ["load", "load_async", "read_rank", "verify_rank"]

_READ_CONCURRENCY = 4


def _current_rank() -> int | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


async def _check_data_size(storage: Storage, m: RankManifest) -> None:
    """The data file exists and has the manifest's size (checked before any size from disk drives an allocation)."""
    where = f"{storage.uri}/{m.data_file}"
    try:
        size = await storage.size(m.data_file)
    except CheckpointNotFoundError as exc:
        raise IntegrityError(f"{where}: data file of rank {m.rank} is missing") from exc
    if size != m.data_nbytes:
        what = "truncated" if size < m.data_nbytes else "extended"
        raise IntegrityError(f"{where}: data file is {what}: {size} bytes, manifest says {m.data_nbytes}")


async def _read_verified(
    storage: Storage, m: RankManifest, on_chunk: Any, concurrency: int = _READ_CONCURRENCY
) -> None:
    """Read the data file chunk by chunk, verify each CRC32C, hand verified chunks to ``on_chunk``."""
    where = f"{storage.uri}/{m.data_file}"
    await _check_data_size(storage, m)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        start = i * m.chunk_size
        n = min(m.chunk_size, m.data_nbytes - start)
        async with sem:
            buf = np.empty(n, dtype=np.uint8)
            await storage.read_into(m.data_file, start, memoryview(buf))
            crc = await asyncio.to_thread(checksum, memoryview(buf))
            if crc != m.chunk_checksums[i]:
                keys = [e.key for e in m.entries if e.offset < start + n and e.offset + e.nbytes > start] or ["<padding>"]
                raise IntegrityError(
                    f"{where}: checksum mismatch in bytes [{start}, {start + n}) (crc32c {crc:#010x}, "
                    f"expected {m.chunk_checksums[i]:#010x}); affected keys: {', '.join(keys[:8])}"
                    f"{' ...' if len(keys) > 8 else ''}. The checkpoint is corrupt: load an older one."
                )
            await asyncio.to_thread(on_chunk, start, buf)

    await gather_or_cancel(one(i) for i in range(len(m.chunk_checksums)))


async def verify_rank(storage: Storage, m: RankManifest, progress: Any = None) -> int:
    """Read and verify every chunk of one rank's data file; returns the bytes checked."""

    def on_chunk(start: int, buf: np.ndarray) -> None:
        if progress is not None:
            progress(len(buf))

    await _read_verified(storage, m, on_chunk)
    return m.data_nbytes


async def read_rank(storage: Storage, m: RankManifest, *, allow_pickle: bool = False) -> Any:
    """Rebuild one rank's state from its manifest and verified data."""
    where = f"{storage.uri}/{m.data_file}"
    for e in m.entries:
        if e.kind == "pickle" and not allow_pickle:
            raise BadInputError(
                f"{where}: key {e.key!r} holds a pickled object; loading it could run code. "
                "Pass allow_pickle=True only if you trust this checkpoint."
            )
    await _check_data_size(storage, m)  # entries lie inside data_nbytes: now bounded by the real file
    buffers: list[np.ndarray] = [np.empty(e.nbytes, dtype=np.uint8) for e in m.entries]
    order = sorted(range(len(m.entries)), key=lambda i: m.entries[i].offset)

    def on_chunk(start: int, buf: np.ndarray) -> None:
        end = start + len(buf)
        for i in order:
            e = m.entries[i]
            lo, hi = max(start, e.offset), min(end, e.offset + e.nbytes)
            if lo < hi:
                buffers[i][lo - e.offset : hi - e.offset] = buf[lo - start : hi - start]

    await _read_verified(storage, m, on_chunk)
    values: list[Any] = []
    for e, raw in zip(m.entries, buffers):
        ew = f"{where}: key {e.key!r}"
        if e.kind == "tensor":
            dt = torch_dtype(e.dtype, ew)
            t = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)
            values.append(t.view(dt).reshape(e.shape))
        elif e.kind == "ndarray":
            values.append(raw.view(numpy_dtype(e.dtype, ew)).reshape(e.shape))
        else:
            try:
                values.append(pickle.loads(raw.tobytes()))
            except Exception as exc:
                raise IntegrityError(f"{ew}: pickled object cannot be loaded ({exc})") from exc
    used: set[int] = set()
    return _build(m.tree, values, used, where, 0)


def _build(node: Node, values: list[Any], used: set[int], where: str, depth: int) -> Any:
    if depth > 512:
        raise FormatError(f"{where}: value tree nested deeper than 512 levels")
    if isinstance(node, ValueNode):
        return node.value
    if isinstance(node, RefNode):
        if not 0 <= node.index < len(values) or node.index in used:
            raise FormatError(f"{where}: value tree references entry {node.index} badly")
        used.add(node.index)
        return values[node.index]
    if isinstance(node, DictNode):
        if len(node.keys) != len(node.values):
            raise FormatError(f"{where}: dict node with {len(node.keys)} keys and {len(node.values)} values")
        d = collections.OrderedDict() if node.ordered else {}
        for k, v in zip(node.keys, node.values):
            if k in d:
                raise FormatError(f"{where}: dict node has the key {k!r} twice")
            d[k] = _build(v, values, used, where, depth + 1)
        return d
    if isinstance(node, ListNode):
        items = [_build(v, values, used, where, depth + 1) for v in node.items]
        return tuple(items) if node.tuple else items
    if isinstance(node, BigIntNode):
        try:
            return int(node.value)
        except ValueError as exc:
            raise FormatError(f"{where}: bad integer {node.value!r}") from exc
    if isinstance(node, BytesNode):
        return node.value
    raise FormatError(f"{where}: unknown node {type(node).__name__}")  # pragma: no cover


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        out = type(obj)()
        for k, v in obj.items():
            out[k] = _to_device(v, device)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_to_device(v, device) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj


def _merge_into(dst: Any, src: Any, path: str, problems: list[str], apply: bool = True) -> Any:
    """Copy ``src`` into ``dst`` in place where possible; return the value to store at ``path``."""
    if isinstance(dst, torch.Tensor):
        if not isinstance(src, torch.Tensor):
            problems.append(f"{path}: checkpoint holds {type(src).__name__}, target is a tensor")
            return dst
        if tuple(dst.shape) != tuple(src.shape):
            problems.append(f"{path}: shape {tuple(src.shape)} in checkpoint, {tuple(dst.shape)} in target")
            return dst
        if dst.dtype != src.dtype:
            problems.append(f"{path}: dtype {src.dtype} in checkpoint, {dst.dtype} in target")
            return dst
        if apply:
            with torch.no_grad():
                dst.copy_(src)
        return dst
    if isinstance(dst, dict) and isinstance(src, dict):
        missing = [k for k in dst if k not in src]
        unexpected = [k for k in src if k not in dst]
        if missing:
            problems.append(f"{path or '<root>'}: keys missing from the checkpoint: {missing[:10]}")
        if unexpected:
            problems.append(f"{path or '<root>'}: keys in the checkpoint but not in the target: {unexpected[:10]}")
        for k in dst:
            if k in src:
                v = _merge_into(dst[k], src[k], f"{path}/{k}" if path else str(k), problems, apply)
                if apply:
                    dst[k] = v
        return dst
    if isinstance(dst, list) and isinstance(src, (list, tuple)):
        if len(dst) != len(src):
            problems.append(f"{path}: list of {len(src)} in checkpoint, {len(dst)} in target")
            return dst
        for i in range(len(dst)):
            v = _merge_into(dst[i], src[i], f"{path}/{i}", problems, apply)
            if apply:
                dst[i] = v
        return dst
    return src


async def _load_tiered(path: Tiers | TieredPath, rank: int | None, allow_pickle: bool) -> Any:
    """The fastest tier holding a complete, verified copy wins; the others are fallbacks."""
    tiers = path.tiers if isinstance(path, TieredPath) else path
    name = path.name if isinstance(path, TieredPath) else None
    if name is None:
        for i in range(len(tiers.uris)):
            st = tiers.storage(i)
            try:
                latest = await read_latest(st)
            except CheckpointError:
                latest = None
            finally:
                await st.close()
            if latest is not None:
                name = latest.name
                break
        else:
            raise CheckpointNotFoundError(f"no tier of {tiers!r} has a 'latest' pointer: nothing was committed there")
    failures: list[str] = []
    for i, uri in enumerate(tiers.uris):
        try:
            return await load_async(f"{uri}/{name}", rank=rank, allow_pickle=allow_pickle,
                                    storage_options=tiers.storage_options[i])
        except (CheckpointNotFoundError, IntegrityError, StorageError) as exc:
            failures.append(f"tier {i} ({uri}): {exc}")
            _log.warning("tier %d (%s) cannot serve %s, trying the next: %s", i, uri, name, exc)
    raise CheckpointNotFoundError(f"no tier holds a complete, verified copy of {name!r}:\n  " + "\n  ".join(failures))


async def load_async(
    path: str | os.PathLike[str] | Tiers | TieredPath,
    *,
    rank: int | None = None,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Async core of :func:`load` (no ``into``/``map_location``)."""
    if isinstance(path, (Tiers, TieredPath)):
        return await _load_tiered(path, rank, allow_pickle)
    root, name = _split_or_root(path)
    storage = open_storage(root, **(storage_options or {}))
    try:
        name = await resolve_name(storage, name)
        rec = await read_commit(storage, name)
        if rec.kind != "asyncckpt":
            raise BadInputError(f"{storage.uri}/{name} is a {rec.kind} checkpoint; load it with its own reader")
        if rank is None:
            rank = _current_rank()
            if rank is None:
                if rec.world_size != 1:
                    raise BadInputError(
                        f"{storage.uri}/{name} was saved by {rec.world_size} ranks; pass rank= to choose one"
                    )
                rank = 0
        if not 0 <= rank < rec.world_size:
            raise BadInputError(f"{storage.uri}/{name} has ranks 0..{rec.world_size - 1}, not {rank}")
        m = await read_manifest(storage, name, rank, rec.manifests[rank])
        return await read_rank(storage, m, allow_pickle=allow_pickle)
    finally:
        await storage.close()


def _split_or_root(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """A checkpoint path -> (root, name); a root directory (holding ``latest``) -> (root, None)."""
    p = os.fspath(path)
    if "://" not in p and os.path.isfile(os.path.join(p, "latest")) and not os.path.isfile(os.path.join(p, "COMMIT")):
        return p, None
    return split_uri(p)


def load(
    path: str | os.PathLike[str] | Tiers | TieredPath,
    into: Any = None,
    map_location: str | torch.device | None = None,
    *,
    rank: int | None = None,
    allow_pickle: bool = False,
    strict: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load a checkpoint saved by asyncckpt, verifying every checksum.

    ``path`` is a checkpoint (``dir/step-100``, ``s3://bucket/run/step-100``) or a local root
    holding a ``latest`` pointer. With ``into`` (a state dict of tensors), values are copied into
    it in place and ``into`` is returned; mismatched keys or shapes raise BadInputError naming
    them. ``map_location`` moves tensors to a device. Pickled objects load only with
    ``allow_pickle=True``.
    """
    t0 = time.perf_counter()
    state = run_sync(load_async(path, rank=rank, allow_pickle=allow_pickle, storage_options=storage_options))
    if map_location is not None:
        state = _to_device(state, torch.device(map_location))
    if into is None:
        return state
    problems: list[str] = []
    _merge_into(into, state, "", problems, apply=False)  # check everything before changing anything
    if problems and strict:
        raise BadInputError(f"cannot load {os.fspath(path)} into the given state: " + "; ".join(problems))
    _merge_into(into, state, "", [], apply=True)
    _log.info(
        "loaded", extra={"rank": rank, "step": None, "op": "load", "bytes": 0, "seconds": time.perf_counter() - t0}
    )
    return into
