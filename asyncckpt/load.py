"""Loading: verify every checksum, rebuild the state, optionally in place and onto a device."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

import msgspec
import numpy as np
import torch

from ._loop import gather_or_cancel, run_sync
from .catalog import read_latest, read_references
from .errors import BadInputError, CheckpointError, CheckpointNotFoundError, IntegrityError, StorageError
from .format import (
    SAME_SIZE_INT,
    RankManifest,
    build_tree,
    check_data_file,
    entry_values,
    read_entries_into,
    refs,
    select_keys,
    stored_entries,
)
from .format.chunks import read_buffer
from .kinds.base import kind_of, kind_of_file
from .locate import Located, local_path, locate
from .storage import Storage
from .tiers import TieredPath, Tiers

_log = logging.getLogger("asyncckpt")

__all__ = ["build_tree", "entry_values", "load", "load_async", "read_rank", "select_keys", "stored_entries"]


async def read_rank(storage: Storage, m: RankManifest, *, allow_pickle: bool = False,
                    keys: Collection[str | int] | None = None) -> Any:
    """Rebuild one rank's state (or the top-level ``keys`` of it) from its manifest and verified data.

    With ``keys``, only the chunks holding the selected values are read. Entries stored by reference
    (incremental saves) are read, verified, from the sibling checkpoint that holds them.
    """
    where = f"{storage.uri}/{m.data_file}"
    tree = select_keys(m.tree, keys, where)
    wanted = refs(tree, len(m.entries), where)
    for i in wanted:
        e = m.entries[i]
        if e.kind == "pickle" and not allow_pickle:
            raise BadInputError(
                f"{where}: key {e.key!r} holds a pickled object; loading it could run code. "
                "Pass allow_pickle=True only if you trust this checkpoint"
                + (" (or leave it out with keys=[...])." if keys is None else ".")
            )
    await check_data_file(storage, m)  # entries lie inside data_nbytes: now bounded by the real file
    # Each value's memory is allocated once, filled by the reads, checked where it landed, and
    # becomes the loaded tensor/array without a copy; nothing is returned unless all of it verified.
    # Large ones are placed for direct reads (``read_buffer``): the disk writes them in place.
    raw = m.chunks is msgspec.UNSET or all(c.codec == "none" for c in m.chunks)  # stored offset = image offset
    buffers: dict[int, np.ndarray] = {i: read_buffer(m.entries[i].nbytes, m.entries[i].offset if raw else 0)
                                      for i in stored_entries(m, wanted)}
    own = {i: b for i, b in buffers.items() if m.entries[i].ref < 0}

    def on_bytes(i: int, off: int, data: np.ndarray) -> None:
        buffers[i][off : off + len(data)] = data

    await gather_or_cancel([
        read_entries_into(storage, m, own, every_chunk=keys is None, check_size=False),
        read_references(storage, m, [i for i in buffers if m.entries[i].ref >= 0], on_bytes),
    ])
    return build_tree(tree, entry_values(m, buffers, wanted, where), where)


def _to_device(obj: Any, device: torch.device, moved: dict[int, torch.UntypedStorage] | None = None) -> Any:
    """``obj`` with its tensors on ``device``; tensors that share a storage still share one there."""
    moved = {} if moved is None else moved
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        if obj.device == device or st.nbytes() == 0:
            return obj.to(device)
        dst = moved.get(st.data_ptr())
        if dst is None:  # each storage is moved once, whole
            dst = torch.empty(0, dtype=torch.uint8, device=obj.device).set_(st).to(device).untyped_storage()
            moved[st.data_ptr()] = dst
        return torch.empty(0, dtype=obj.dtype, device=device).set_(dst, obj.storage_offset(), obj.shape, obj.stride())
    if isinstance(obj, dict):
        out = type(obj)()
        for k, v in obj.items():
            out[k] = _to_device(v, device, moved)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_to_device(v, device, moved) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj


_PARTIAL_HINT = (
    "To load only part of the checkpoint pass keys=[...] (the top-level keys to read) or strict=False "
    "(skip keys missing on either side); to restore a module, optimizer or LR scheduler pass the object "
    "itself (into={'optim': opt}), not its state_dict()"
)


def _device(map_location: str | torch.device) -> torch.device:
    """``map_location`` as a device this process has (BadInputError before anything is read otherwise)."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise BadInputError(f"map_location={map_location!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"map_location={map_location!r}: CUDA is not available in this process; "
                            "use map_location='cpu'")
    return device


def _is_stateful(obj: Any) -> bool:
    """An object restored through its own ``load_state_dict`` (module, optimizer, LR scheduler, ...)."""
    return (not isinstance(obj, (Mapping, list, tuple, torch.Tensor))
            and callable(getattr(obj, "load_state_dict", None)) and callable(getattr(obj, "state_dict", None)))


def _object_problems(dst: Any, src: Any, path: str, strict: bool, problems: list[str]) -> None:
    """What can be checked before ``dst.load_state_dict(src)`` changes anything."""
    name = path or "<root>"
    if not isinstance(src, Mapping):
        problems.append(f"{name}: the checkpoint holds {type(src).__name__}, not a state dict for a {type(dst).__name__}")
        return
    if isinstance(dst, torch.nn.Module):
        target = dst.state_dict()
        missing = [k for k in target if k not in src]
        unexpected = [k for k in src if k not in target]
        if strict and missing:
            problems.append(f"{name}: parameters/buffers missing from the checkpoint: {missing[:10]}")
        if strict and unexpected:
            problems.append(f"{name}: keys in the checkpoint but not in the module: {unexpected[:10]}")
        for k, t in target.items():
            v = src.get(k)
            if isinstance(t, torch.Tensor) and isinstance(v, torch.Tensor) and tuple(t.shape) != tuple(v.shape):
                problems.append(f"{name}/{k}: shape {tuple(v.shape)} in the checkpoint, {tuple(t.shape)} in the module")
    elif isinstance(dst, torch.optim.Optimizer):
        groups = src.get("param_groups")
        if not isinstance(groups, (list, tuple)) or not isinstance(src.get("state"), Mapping):
            problems.append(f"{name}: the checkpoint holds no optimizer state (no 'state' and 'param_groups')")
            return
        have = [len(g["params"]) for g in dst.param_groups]
        saved = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in groups]
        if have != saved:
            problems.append(f"{name}: parameter groups of sizes {saved} in the checkpoint, {have} in the optimizer")


def _fill(current: Any, src: Any) -> Any:
    """``src`` with its tensors copied into ``current``'s tensors at the same place where shape and dtype match."""
    if isinstance(current, torch.Tensor) and isinstance(src, torch.Tensor):
        if current.shape == src.shape and current.dtype == src.dtype and not current.is_inference():
            with torch.no_grad():
                current.copy_(src)
            return current
        return src
    if isinstance(current, Mapping) and isinstance(src, Mapping):
        out = type(src)() if isinstance(src, dict) else dict()
        for k, v in src.items():
            out[k] = _fill(current[k], v) if k in current else v
        return out
    if isinstance(current, (list, tuple)) and isinstance(src, (list, tuple)) and len(current) == len(src):
        items = [_fill(c, v) for c, v in zip(current, src)]
        return tuple(items) if isinstance(src, tuple) else items
    return src


def _restore_object(dst: Any, src: Any, path: str, strict: bool) -> None:
    try:
        if isinstance(dst, torch.nn.Module):
            dst.load_state_dict(src, strict=strict)  # copies into the parameters in place
        else:
            dst.load_state_dict(_fill(dst.state_dict(), src))
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise BadInputError(
            f"{path or '<root>'}: {type(dst).__name__}.load_state_dict failed: {exc}. Objects loaded before it "
            "were restored; the checkpoint is unchanged"
        ) from exc


def _merge_into(dst: Any, src: Any, path: str, problems: list[str], apply: bool = True, strict: bool = True) -> Any:
    """Restore ``src`` into ``dst`` in place where possible; return the value to store at ``path``.

    With ``apply=False`` only collect ``problems`` (nothing changes).
    """
    if _is_stateful(dst):
        if apply:
            _restore_object(dst, src, path, strict)
        else:
            _object_problems(dst, src, path, strict, problems)
        return dst
    if isinstance(dst, torch.Generator):
        if not isinstance(src, torch.Tensor) or src.dtype != torch.uint8:
            problems.append(f"{path}: the checkpoint holds no generator state ({type(src).__name__})")
        elif apply:
            dst.set_state(src.clone())
        return dst
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
                bits = SAME_SIZE_INT.get(dst.element_size())
                if bits is not None and dst.dtype != bits:  # copy the bit patterns (bool, NaN payloads, bits*)
                    dst.view(bits).copy_(src.view(bits))
                else:
                    dst.copy_(src)
        return dst
    if isinstance(dst, MutableMapping) and isinstance(src, Mapping):
        missing = [k for k in dst if k not in src]
        unexpected = [k for k in src if k not in dst]
        if strict and missing:
            problems.append(f"{path or '<root>'}: keys missing from the checkpoint: {missing[:10]}")
        if strict and unexpected:
            problems.append(f"{path or '<root>'}: keys in the checkpoint but not in the target: {unexpected[:10]}")
        for k in list(dst):
            if k in src:
                v = _merge_into(dst[k], src[k], f"{path}/{k}" if path else str(k), problems, apply, strict)
                if apply:
                    dst[k] = v
        return dst
    if isinstance(dst, list) and isinstance(src, (list, tuple)):
        if len(dst) != len(src):
            problems.append(f"{path}: list of {len(src)} in checkpoint, {len(dst)} in target")
            return dst
        for i in range(len(dst)):
            v = _merge_into(dst[i], src[i], f"{path}/{i}", problems, apply, strict)
            if apply:
                dst[i] = v
        return dst
    if not path:  # a value inside a container is replaced; `into` itself cannot be
        problems.append(f"<root>: `into` is a {type(dst).__name__}, which cannot take the checkpoint's "
                        f"{type(src).__name__} in place; pass the mapping, list, module or optimizer to "
                        "restore, or load without into=")
        return dst
    return src


async def _load_tiered(path: Tiers | TieredPath, rank: int | None, allow_pickle: bool,
                       keys: Collection[str | int] | None) -> Any:
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
                                    storage_options=tiers.storage_options[i], keys=keys)
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
    keys: Collection[str | int] | None = None,
) -> Any:
    """Async core of :func:`load` (no ``into``/``map_location``)."""
    if isinstance(path, (Tiers, TieredPath)):
        return await _load_tiered(path, rank, allow_pickle, keys)
    is_file, state = _load_file(path, rank, allow_pickle, keys)
    if is_file:
        return state
    for attempt in range(_SWITCH_RETRIES + 1):
        found = await locate(path, storage_options=storage_options)
        try:
            return await _read_located(found, rank, allow_pickle, keys)
        except (IntegrityError, CheckpointNotFoundError) as exc:
            # An overwrite may have replaced the checkpoint (and removed the files this read
            # used) since its COMMIT was read: read the new one. Otherwise the error stands.
            if attempt == _SWITCH_RETRIES or not await _replaced(path, storage_options, found):
                raise
            _log.debug("%s was replaced while it was read (%s); reading the new one", found.path, exc)
        finally:
            await found.storage.close()
    raise AssertionError("unreachable")  # pragma: no cover


_SWITCH_RETRIES = 5


async def _replaced(path: str | os.PathLike[str], storage_options: dict[str, Any] | None, found: Located) -> bool:
    """Whether ``path`` now resolves to another commit than ``found`` (an overwrite switched it)."""
    try:
        now = await locate(path, storage_options=storage_options)
    except CheckpointError:
        return False
    await now.storage.close()
    return (now.name, now.record) != (found.name, found.record)


async def _read_located(found: Located, rank: int | None, allow_pickle: bool,
                        keys: Collection[str | int] | None) -> Any:
    kind = kind_of(found.record, found.path)  # the handler of the record's kind loads it
    return await kind.load(found.storage, found.name, found.record, rank=rank, allow_pickle=allow_pickle, keys=keys)


def _load_file(path: str | os.PathLike[str], rank: int | None, allow_pickle: bool,
               keys: Collection[str | int] | None) -> tuple[bool, Any]:
    """(True, its state) when ``path`` is a local file of a file kind (a torch.save file), else (False, None)."""
    lp = local_path(path)
    found = kind_of_file(lp) if lp is not None else None
    if lp is None or found is None:
        return False, None
    kind, variant = found
    if rank not in (None, 0):
        raise BadInputError(f"{lp} is a {kind.name} file, which holds one state; rank={rank} does not apply")
    state = kind.load_file(lp, variant, allow_pickle=allow_pickle)
    if keys is not None:
        if not isinstance(state, Mapping):
            raise BadInputError(f"{lp}: keys={list(keys)!r} selects top-level keys, but the file holds a "
                                f"{type(state).__name__}")
        missing = [k for k in keys if k not in state]
        if missing:
            raise BadInputError(f"{lp}: keys {missing!r} are not in the file (it has {list(state)[:20]!r})")
        state = {k: state[k] for k in keys}
    return True, state


def load(
    path: str | os.PathLike[str] | Tiers | TieredPath,
    into: Any = None,
    map_location: str | torch.device | None = None,
    *,
    rank: int | None = None,
    allow_pickle: bool = False,
    strict: bool = True,
    keys: Collection[str | int] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load a checkpoint saved by asyncckpt, verifying every checksum.

    ``path`` is a checkpoint (``dir/step-100``, ``s3://bucket/run/step-100``, ``tiers / "step-100"``)
    or a root (a directory, ``s3://bucket/run``, a :class:`~asyncckpt.Tiers`), meaning the
    checkpoint its ``latest`` points to, or a local file written by ``torch.save`` (read with
    ``torch.load(weights_only=True)``). The handler of the checkpoint's kind reads it
    (:mod:`asyncckpt.kinds`); a DCP checkpoint is refused, naming its reader. ``keys=["model"]``
    reads only those top-level keys (and only the chunks holding them). ``map_location`` moves
    tensors to a device. Pickled objects load only with ``allow_pickle=True``.

    ``into`` restores in place and is returned: a mapping (or a single object) whose values may
    be objects with ``load_state_dict`` (modules, optimizers, LR schedulers: a fresh optimizer
    gets its state and every hyperparameter back), tensors (copied into), generators, and plain
    dicts/lists (filled recursively; other values replaced). Everything is checked before
    anything changes: with ``strict=True`` (the default) keys missing on either side are an
    error naming them; ``strict=False`` skips them. Shape and dtype mismatches are always errors.
    """
    t0 = time.perf_counter()
    device = None if map_location is None else _device(map_location)
    state = run_sync(load_async(path, rank=rank, allow_pickle=allow_pickle, storage_options=storage_options,
                                keys=keys))
    if device is not None:
        state = _to_device(state, device)
    if into is None:
        return state
    from .manager import RESERVED_KEY  # the manager's own record (RNG state): restored by the manager, not here

    target = into
    if isinstance(state, dict) and isinstance(into, Mapping) and RESERVED_KEY in state and RESERVED_KEY not in into:
        state = {k: v for k, v in state.items() if k != RESERVED_KEY}
    if keys is not None and isinstance(into, MutableMapping):
        absent = [k for k in state if k not in into]
        if absent:
            raise BadInputError(f"keys={list(keys)!r} selects {absent!r}, which `into` does not have; add them to into")
        target = {k: into[k] for k in state}
    problems: list[str] = []
    _merge_into(target, state, "", problems, apply=False, strict=strict)  # check everything before changing anything
    if problems:
        hint = f". {_PARTIAL_HINT}" if any("missing" in p or "not in the" in p for p in problems) else ""
        raise BadInputError(f"cannot load {os.fspath(path)} into the given state: " + "; ".join(problems) + hint)
    _merge_into(target, state, "", [], apply=True, strict=strict)
    if target is not into:
        into.update(target)
    _log.info(
        "loaded", extra={"rank": rank, "step": None, "op": "load", "bytes": 0, "seconds": time.perf_counter() - t0}
    )
    return into
