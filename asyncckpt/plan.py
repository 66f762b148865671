"""Planning a save: flatten the state into a value tree plus byte ranges, and validate it.

Runs in the trainer inside ``save()``; its cost is bounded by metadata work, not by bytes
(tensors above the inline threshold are not copied here).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import math
import operator
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch

from .dtypes import torch_dtype_name
from .errors import BadInputError
from .format import ALIGN, SHARED_STORAGE, BigIntNode, BytesNode, DictNode, Entry, ListNode, Node, RefNode, ValueNode
from .format.memo import DecodedCache

__all__ = [
    "INLINE_MAX", "UNPACKED", "Packed", "PackedTree", "Plan", "PlanCache", "decode_packed", "decode_patched_tree", "paused_gc", "plan_state", "tensor_bytes", "validate_key",
]

#: Tensors at most this large are copied into the request at ``save()`` time (cheaper than
#: sharing their memory, and immediately consistent); larger ones are snapshotted by the worker.
INLINE_MAX = 64 * 1024
_I64 = (-(1 << 63), (1 << 63) - 1)
_PLAIN = (torch.Tensor, torch.nn.Parameter, *((torch.nn.Buffer,) if hasattr(torch.nn, "Buffer") else ()))


@dataclass
class Plan:
    tree: Node
    entries: list[Entry] = field(default_factory=list)
    #: entry index -> tensor the worker must snapshot (CPU tensors go to shared memory, CUDA via IPC)
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    #: entry index -> bytes already copied (small tensors, NumPy arrays, opt-in pickles)
    inline: dict[int, bytes] = field(default_factory=dict)
    data_nbytes: int = 0
    #: CPU tensors at most this large are copied into ``inline`` now; 0 lists every tensor in ``tensors``
    inline_max: int = INLINE_MAX
    #: storage entry index -> the state's tensors that are views of it, by key (what the guard watches)
    members: dict[int, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)
    #: format features the manifest must declare
    features: list[str] = field(default_factory=list)
    #: id of each tensor of the state sharing its storage with another one -> that storage
    shared: dict[int, tuple[torch.device, int, int]] = field(default_factory=dict)
    #: shared storage -> index of the entry holding its bytes
    storage_entries: dict[tuple[torch.device, int, int], int] = field(default_factory=dict)
    #: the state's tensors in walk order (what a :class:`PlanCache` compares the next state with)
    leaves: list[torch.Tensor] = field(default_factory=list)
    #: entry index -> position in ``leaves`` of the tensor that owns its bytes (not views, not bases)
    own: dict[int, int] = field(default_factory=dict)
    #: storage entry index -> (key, position in ``leaves``) of the tensors that are views of it
    member_pos: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    #: the same for every plan of one layout (a :class:`PlanCache` hit keeps it); 0: not cached
    layout_id: int = 0
    #: leaf positions whose tensor moved since the layout was made (copied afresh, not through views)
    moved: list[int] = field(default_factory=list)
    #: False when a later state of the same structure cannot reuse this layout (pickled objects,
    #: conjugate/negative views: what they save is not the leaf itself)
    cacheable: bool = True
    #: while planning: every tensor of the state passed :func:`_plan_tensor`'s checks at once
    checked: bool = False

    def add(self, key: str, kind: str, dtype: str, shape: list[int], nbytes: int) -> int:
        offset = -(-self.data_nbytes // ALIGN) * ALIGN
        self.entries.append(Entry(key, kind, dtype, shape, offset, nbytes))  # type: ignore[arg-type]
        self.data_nbytes = offset + nbytes
        return len(self.entries) - 1

    def watched(self, indices: Iterable[int]) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) of the state's tensors behind the entries ``indices`` (for the snapshot guard)."""
        for i in indices:
            if i in self.members:
                yield from self.members[i]
            else:
                yield self.entries[i].key, self.tensors[i]


def validate_key(key: Any, path: str) -> str | int:
    """The one rule for state-dict keys (docs/format.md, "Keys"), the same for every key.

    A key is a name, never a path: no file or object name is ever made from one, so no
    string is refused for what it says ('..', '/abs', '../../etc/passwd' are ordinary names).
    Refused are only keys the format cannot store exactly: types other than str and int (bool
    included), ints outside the signed 64-bit range, and strings that are not valid Unicode
    text (lone surrogates, which UTF-8 cannot encode).
    """
    if type(key) is str and key.isascii():  # the usual key: nothing to check
        return key
    where = path or "<root>"
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise BadInputError(
            f"{where}: dict key {key!r} of type {type(key).__name__} is not supported; use str (or int) keys"
        )
    if isinstance(key, int):
        if not _I64[0] <= key <= _I64[1]:
            raise BadInputError(f"{where}: int dict key {key} does not fit in 64 bits; use a str key")
        return int(key)
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInputError(
            f"{where}: dict key {key!r} is not valid Unicode text ({exc.reason} at position {exc.start}); "
            "decode it properly or use another key"
        ) from None
    return key


def _join(path: str, key: str | int) -> str:
    return f"{path}/{key}" if path else str(key)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of ``t`` (C order, native byte order): a copy taken now."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _storage_key(t: torch.Tensor) -> tuple[torch.device, int, int] | None:
    """What identifies ``t``'s storage among the state's tensors (None: it has none to share).

    Kept lean (it runs for every tensor at ``save()``): tensors that cannot be views are sorted
    out later, by :func:`_plan_tensor`.
    """
    if t.layout is not torch.strided:
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor kinds without a plain storage
        return None
    n = st.nbytes()
    return (t.device, st.data_ptr(), n) if n else None


def _shared_storages(root: Any, tensors: Sequence[torch.Tensor] | None = None) -> dict[int, tuple[torch.device, int, int]]:
    """id of each tensor of the state whose storage another tensor of the state uses too -> that storage.

    ``tensors``: every tensor of the state (in any order), when known; their storages are then
    compared in a few C-level passes instead of one Python call per tensor.
    """
    if tensors is not None:
        try:
            return _shared_among(tensors)
        except (RuntimeError, NotImplementedError):  # tensor kinds without a plain storage: one by one
            pass
    found: list[tuple[torch.Tensor, tuple[torch.device, int, int] | None]] = []
    active: set[int] = set()  # containers on the current path (a cycle is reported by _walk)

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            found.append((obj, _storage_key(obj)))
        elif type(obj) in (dict, collections.OrderedDict, list, tuple) and id(obj) not in active:
            active.add(id(obj))
            for v in obj.values() if isinstance(obj, dict) else obj:
                visit(v)
            active.discard(id(obj))

    visit(root)
    return _used_twice(found)


def _used_twice(found: Iterable[tuple[torch.Tensor, tuple[torch.device, int, int] | None]],
                ) -> dict[int, tuple[torch.device, int, int]]:
    """id -> storage key of the tensors in ``found`` (tensor, its key or None) whose key occurs more than once."""
    keys: dict[int, tuple[torch.device, int, int]] = {}
    count: dict[tuple[torch.device, int, int], int] = {}
    for t, key in found:
        if key is not None:
            count[key] = count.get(key, 0) + 1
            keys[id(t)] = key
    return {i: k for i, k in keys.items() if count[k] > 1}


def _shared_among(tensors: Sequence[torch.Tensor]) -> dict[int, tuple[torch.device, int, int]]:
    """:func:`_shared_storages` of a state whose tensors are ``tensors``, compared by storage address first."""
    if not tensors:
        return {}
    if set(map(_layout, tensors)) != {torch.strided}:
        raise NotImplementedError  # sparse and other layouts have no storage: the caller goes one by one
    storages = list(map(torch.Tensor.untyped_storage, tensors))
    seen: set[int] = set()
    again: set[int] = set()  # addresses met twice (or more): only these can be shared
    for ptr in map(torch.UntypedStorage.data_ptr, storages):
        if ptr in seen:
            again.add(ptr)
        else:
            seen.add(ptr)
    if not again:
        return {}
    return _used_twice((t, (t.device, st.data_ptr(), st.nbytes()) if st.data_ptr() in again and st.nbytes() else None)
                       for t, st in zip(tensors, storages))


#: names of the dtypes met so far (every one of them is supported: see :func:`_plain_tensors`)
_DTYPE_NAMES: dict[torch.dtype, str] = {}
_layout = operator.attrgetter("layout")
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_is_nested = operator.attrgetter("is_nested")
_is_quantized = operator.attrgetter("is_quantized")


def _plain_tensors(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every tensor passes :func:`_plan_tensor`'s checks, decided in a few C-level passes
    (then planning skips them per tensor); False sends each tensor through the checks (which name
    the first bad one). ``tensors`` are of the plain tensor types (:func:`_flatten` admits no other).
    """
    if not tensors:
        return True
    if set(map(_layout, tensors)) != {torch.strided}:
        return False
    try:
        if any(map(_is_nested, tensors)) or any(map(_is_quantized, tensors)):
            return False
    except AttributeError:  # a torch without nested tensors: the checks one by one cope
        return False
    if any(d.type not in ("cpu", "cuda") for d in set(map(_device, tensors))):
        return False
    if any(map(torch.Tensor.is_conj, tensors)) or any(map(torch.Tensor.is_neg, tensors)):
        return False  # planned one by one: they are resolved (and make the plan uncacheable)
    for dtype in set(map(_dtype, tensors)):
        if dtype not in _DTYPE_NAMES:
            try:
                _DTYPE_NAMES[dtype] = torch_dtype_name(dtype, "")
            except BadInputError:
                return False
    return True


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The garbage collector off for a block (back on after it if it was on).

    Planning allocates a few small objects per tensor (entries, nodes, sizes) and no cycle: with
    the collector on, a large state triggers full collections in the middle (a 50,000-tensor
    state: several times slower)."""
    collect = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collect:
            gc.enable()


def _plan_view(plan: Plan, t: torch.Tensor, key: tuple[torch.device, int, int], path: str) -> Node:
    """``t`` as a view of its storage, which is stored once (at its first tensor)."""
    sidx = plan.storage_entries.get(key, -1)
    if sidx < 0:
        storage = t.untyped_storage()
        sidx = plan.add(path, "tensor", "uint8", [storage.nbytes()], storage.nbytes())
        base = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
        if t.device.type == "cpu" and storage.nbytes() <= plan.inline_max:
            plan.inline[sidx] = tensor_bytes(base)
        else:
            plan.tensors[sidx] = base
        plan.storage_entries[key] = sidx
        plan.members[sidx] = []
        if SHARED_STORAGE not in plan.features:
            plan.features.append(SHARED_STORAGE)
    plan.members[sidx].append((path, t))
    plan.member_pos.setdefault(sidx, []).append((path, len(plan.leaves) - 1))
    offset = plan.entries[sidx].offset
    plan.entries.append(Entry(key=path, kind="tensor", dtype=torch_dtype_name(t.dtype, path), shape=list(t.shape),
                              offset=offset, nbytes=t.numel() * t.element_size(), view_of=sidx,
                              stride=list(t.stride()), storage_offset=int(t.storage_offset())))
    return RefNode(index=len(plan.entries) - 1)


def _plan_tensor(plan: Plan, t: torch.Tensor, path: str) -> Node:
    if plan.checked:
        key = plan.shared.get(id(t)) if plan.shared else None
        if key is None:  # the usual tensor: its own storage, checked already (plan.add, inlined)
            plan.leaves.append(t)
            nbytes = t.nbytes
            offset = -(-plan.data_nbytes // ALIGN) * ALIGN
            idx = len(plan.entries)
            plan.entries.append(Entry(path, "tensor", _DTYPE_NAMES[t.dtype], list(t.shape), offset, nbytes))
            plan.data_nbytes = offset + nbytes
            if nbytes <= plan.inline_max and t.device.type == "cpu":
                plan.inline[idx] = tensor_bytes(t)
            else:
                plan.tensors[idx] = t
                plan.own[idx] = len(plan.leaves) - 1
            return RefNode(idx)
        plan.leaves.append(t)
        return _plan_view(plan, t.detach(), key, path)
    if t.is_sparse or t.layout != torch.strided:
        raise BadInputError(f"{path}: sparse tensors (layout {t.layout}) are not supported; call .to_dense() first")
    if getattr(t, "is_nested", False):
        raise BadInputError(f"{path}: nested tensors are not supported; save their components as separate tensors")
    if t.is_quantized:
        raise BadInputError(f"{path}: quantized tensors (dtype {t.dtype}) are not supported; "
                            "save int_repr() and the scale/zero point")
    if type(t) not in _PLAIN:
        raise BadInputError(
            f"{path}: tensor subclass {type(t).__name__} is not supported by the plain save path; "
            "for DTensor/sharded state use asyncckpt.dcp"
        )
    if t.device.type == "meta":
        raise BadInputError(f"{path}: meta tensors hold no data; materialize the module before saving")
    if t.device.type not in ("cpu", "cuda"):
        raise BadInputError(f"{path}: tensors on device {t.device} are not supported (cpu and cuda are)")
    key = plan.shared.get(id(t)) if plan.shared else None
    plan.leaves.append(t)
    t = t.detach()
    if key is not None and not (t.is_conj() or t.is_neg()):
        torch_dtype_name(t.dtype, path)  # refuse an unsupported dtype before the storage is planned
        return _plan_view(plan, t, key, path)
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
        plan.cacheable = False
    dtype = torch_dtype_name(t.dtype, path)
    nbytes = t.numel() * t.element_size()
    idx = plan.add(path, "tensor", dtype, list(t.shape), nbytes)
    if t.device.type == "cpu" and nbytes <= plan.inline_max:
        plan.inline[idx] = tensor_bytes(t)
    else:
        plan.tensors[idx] = t
        plan.own[idx] = len(plan.leaves) - 1
    return RefNode(index=idx)


def _plan_ndarray(plan: Plan, a: np.ndarray, path: str) -> Node:
    if a.dtype.hasobject or a.dtype.kind not in "biufc":
        raise BadInputError(f"{path}: NumPy array of dtype {a.dtype} cannot be stored without pickle (allow_pickle=True)")
    a = np.ascontiguousarray(a)
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    a = a.astype(dt, copy=False)
    idx = plan.add(path, "ndarray", dt.str if dt.itemsize > 1 else dt.name, list(a.shape), a.nbytes)
    plan.inline[idx] = a.tobytes()
    return RefNode(index=idx)


def _walk(plan: Plan, obj: Any, path: str, allow_pickle: bool, seen: set[int]) -> Node:
    if obj is None or isinstance(obj, (bool, float, str)):
        return ValueNode(value=obj)
    if isinstance(obj, int):
        if _I64[0] <= obj <= _I64[1]:
            return ValueNode(value=int(obj))
        return BigIntNode(value=str(obj))
    if isinstance(obj, torch.Tensor):
        return _plan_tensor(plan, obj, path)
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject and allow_pickle:
            return _plan_pickle(plan, obj, path)
        return _plan_ndarray(plan, obj, path)
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return ValueNode(value=obj.item())
    if isinstance(obj, np.generic):
        plan.cacheable = False
    if isinstance(obj, (bytes, bytearray)):
        if type(obj) is not bytes:
            plan.cacheable = False
        return BytesNode(value=bytes(obj))
    if isinstance(obj, (dict, collections.OrderedDict)) and type(obj) in (dict, collections.OrderedDict):
        if id(obj) in seen:
            raise BadInputError(f"{path or '<root>'}: the state contains a reference cycle")
        seen.add(id(obj))
        keys = [validate_key(k, path) for k in obj]
        values = [_plan_tensor(plan, v, f"{path}/{k}" if path else str(k)) if type(v) in _TENSORS
                  else _walk(plan, v, _join(path, k), allow_pickle, seen) for k, v in zip(keys, obj.values())]
        seen.discard(id(obj))
        return DictNode(keys=keys, values=values, ordered=type(obj) is collections.OrderedDict)
    if type(obj) in (list, tuple):
        if id(obj) in seen:
            raise BadInputError(f"{path or '<root>'}: the state contains a reference cycle")
        seen.add(id(obj))
        items = [_plan_tensor(plan, v, f"{path}/{i}" if path else str(i)) if type(v) in _TENSORS
                 else _walk(plan, v, _join(path, i), allow_pickle, seen) for i, v in enumerate(obj)]
        seen.discard(id(obj))
        return ListNode(items=items, tuple=type(obj) is tuple)
    if allow_pickle:
        return _plan_pickle(plan, obj, path)
    raise BadInputError(
        f"{path or '<root>'}: value of type {type(obj).__module__}.{type(obj).__qualname__} is not supported "
        "without pickle; convert it to tensors/numbers/strings/lists/dicts or pass allow_pickle=True"
    )


def _plan_pickle(plan: Plan, obj: Any, path: str) -> Node:
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise BadInputError(f"{path}: cannot pickle {type(obj).__qualname__}: {exc}") from exc
    plan.cacheable = False
    idx = plan.add(path, "pickle", "bytes", [len(data)], len(data))
    plan.inline[idx] = data
    return RefNode(index=idx)


def plan_state(state: Any, *, allow_pickle: bool = False, inline_max: int = INLINE_MAX) -> Plan:
    """Flatten ``state`` (nested dicts/lists of tensors, arrays and plain values) into a Plan.

    CPU tensors of at most ``inline_max`` bytes are copied into ``plan.inline`` now; the others are
    listed in ``plan.tensors`` (``inline_max=0``: every tensor is listed, nothing is copied).
    Tensors that share one storage become views of one entry holding that whole storage (written
    once); ``plan.members`` lists them for the snapshot guard.
    """
    if not isinstance(state, Mapping):
        raise BadInputError(f"a state dict must be a mapping, got {type(state).__name__}")
    plan = Plan(tree=ValueNode(value=None), inline_max=inline_max)
    root = dict(state) if type(state) not in (dict, collections.OrderedDict) else state
    with paused_gc():
        _plan_into(plan, root, allow_pickle)
    return plan


def _plan_into(plan: Plan, root: Any, allow_pickle: bool) -> None:
    tensors: list[torch.Tensor] = []
    flat = _flatten(root, [], tensors, [], [], 0)
    plan.shared = _shared_storages(root, tensors if flat else None)
    plan.checked = flat and _plain_tensors(tensors)
    try:
        plan.tree = _walk(plan, root, "", allow_pickle, set())
    finally:
        plan.checked = False


# -- reusing a layout ------------------------------------------------------------------------------

_TENSORS = frozenset(_PLAIN)
_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_MAX_DEPTH = 100  # deeper (or cyclic) states are planned in full, which reports a cycle by name
_layout_ids = itertools.count(1)
_Meta = tuple[list[int], list[Any], list[Any], list[Any]]


def _scalar_node(v: Any) -> Node:
    if isinstance(v, np.generic):
        return ValueNode(value=v.item())
    if type(v) is int and not _I64[0] <= v <= _I64[1]:
        return BigIntNode(value=str(v))
    if type(v) is bytes:
        return BytesNode(value=v)
    return ValueNode(value=v)


def _flatten(obj: Any, sig: list[Any], tensors: list[Any], scalars: list[Any], arrays: list[np.ndarray],
             depth: int) -> bool:
    """Collect the leaves of ``obj`` in :func:`_walk`'s order; False for what only a full plan handles."""
    if depth > _MAX_DEPTH:
        return False
    t = type(obj)
    if t is dict or t is collections.OrderedDict:
        sig.append(t)
        sig.append(tuple(obj))
        sig.append(frozenset(map(type, obj)))  # with equal keys: every key keeps its type (1 vs True)
        vals: Any = obj.values()
    elif t is list or t is tuple:
        sig.append(t)
        sig.append(len(obj))
        vals = obj
    else:  # the root is always a container
        return False
    types = list(map(type, vals))
    sig.extend(types)
    kinds = set(types)
    if kinds <= _TENSORS:
        tensors.extend(vals)
        return True
    if kinds <= _SCALARS:
        scalars.extend(vals)
        return True
    for v, tv in zip(vals, types):
        if tv in _TENSORS:
            tensors.append(v)
        elif tv in _SCALARS:
            scalars.append(v)
        elif tv is dict or tv is collections.OrderedDict or tv is list or tv is tuple:
            if not _flatten(v, sig, tensors, scalars, arrays, depth + 1):
                return False
        elif tv is np.ndarray:
            if v.dtype.hasobject or v.dtype.byteorder == ">":
                return False
            arrays.append(v)
        elif isinstance(v, np.generic) and v.dtype.kind in "biuf":
            scalars.append(v)
        else:
            return False
    return True


def _changed(new: list[Any], old: list[Any]) -> list[int]:
    """Positions where ``new`` holds a value stored differently from ``old``'s (``0.0 == -0.0``, but
    their bits differ; NaN is never equal, so it counts as changed and is stored anew)."""
    out = []
    for k, (a, b) in enumerate(zip(new, old)):
        if a is b:
            continue
        if type(a) is not type(b) or a != b or (
                a == 0 and isinstance(a, (float, np.floating)) and math.copysign(1.0, a) != math.copysign(1.0, b)):
            out.append(k)
    return out


_NO_SCALARS: tuple[()] = ()


def _skeleton(node: Node) -> Any:
    """Where ``node``'s scalar leaves are: None for a scalar leaf, ``_NO_SCALARS`` for a subtree without
    one, else the list of ``(child index, scalars under it, child skeleton)`` of the children that hold
    one, in order."""
    if isinstance(node, RefNode):
        return _NO_SCALARS
    if not isinstance(node, (DictNode, ListNode)):
        return None
    out = []
    for i, c in enumerate(_children(node)):
        sub = _skeleton(c)
        if sub is not _NO_SCALARS:
            out.append((i, 1 if sub is None else sum(n for _, n, _ in sub), sub))
    return out or _NO_SCALARS


def _retree_at(node: Node, skeleton: list[tuple[int, int, Any]], values: list[Any], changed: list[int],
               cur: list[int], pos: int) -> Node:
    """``node`` (its first scalar leaf at walk position ``pos``) with the scalar leaves at the positions
    ``changed[cur[0]:]`` (sorted) replaced by ``values`` at those positions; only the subtrees that hold
    one are rebuilt, the others are shared with ``node``. Advances ``cur[0]`` past what it replaced."""
    assert isinstance(node, (DictNode, ListNode))
    children = list(_children(node))
    for i, n, sub in skeleton:
        k = cur[0]
        if k < len(changed) and changed[k] < pos + n:
            if sub is None:
                children[i] = _scalar_node(values[pos])
                cur[0] = k + 1
            else:
                children[i] = _retree_at(children[i], sub, values, changed, cur, pos)
        pos += n
    return _with_children(node, children)


class PlanCache:
    """Plans a state, reusing the layout of the previous state when the structure is the same.

    A training loop saves the same structure again and again (the same keys, the same tensors
    with new values). The next state reuses the previous layout, entries and tree when its keys,
    containers and leaf types are the same and each tensor has the same data pointer, shape,
    strides and dtype (plain values may differ: only the tree is rebuilt then). Checking that
    costs a few C-level passes over the tensors, not a plan. The cache keeps the previous
    state's tensors referenced (so an address seen again is the same storage) until a state of
    another layout is planned or :meth:`clear` is called.
    """

    def __init__(self) -> None:
        self._plan: Plan | None = None
        self._sig: list[Any] = []
        self._meta: _Meta | None = None
        self._scalars: list[Any] = []
        self._arrays: list[tuple[np.dtype[Any], tuple[int, ...]]] = []
        self._array_entries: list[int] = []
        self._storages: set[int] = set()  # storage addresses of the cached plan's tensors
        self._members: dict[int, tuple[int, ...]] = {}  # leaf position -> strides, of the views of a shared storage
        self._skeleton: Any = None  # where the cached tree's scalars are (computed at its first change)
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._plan, self._meta, self._sig, self._scalars, self._skeleton = None, None, [], [], None

    def plan(self, state: Any, *, allow_pickle: bool = False,
             full: Callable[..., Plan] | None = None) -> Plan:
        """A plan of ``state`` (``inline_max=0``: every tensor is listed); ``full`` plans a miss."""
        if not isinstance(state, Mapping):
            raise BadInputError(f"a state dict must be a mapping, got {type(state).__name__}")
        root = dict(state) if type(state) not in (dict, collections.OrderedDict) else state
        # The temporaries of a plan (per-tensor sizes, strides, lists) are freed inside _plan_of, before
        # the collector is back on: it would otherwise walk all of them once at once.
        with paused_gc():
            return self._plan_of(root, allow_pickle, full)

    def _plan_of(self, root: Any, allow_pickle: bool, full: Callable[..., Plan] | None) -> Plan:
        sig: list[Any] = []
        tensors: list[Any] = []
        scalars: list[Any] = []
        arrays: list[np.ndarray] = []
        ok = _flatten(root, sig, tensors, scalars, arrays, 0)
        cached = self._plan
        meta = self._metadata(tensors) if ok and cached is not None and sig == self._sig else None
        if meta is not None and cached is not None:
            moved = self._moved(meta, tensors)
            if moved is not None and [(a.dtype, a.shape) for a in arrays] == self._arrays:
                self.hits += 1
                plan = self._reuse(cached, tensors, scalars, arrays)
                plan.moved = moved
                return plan
        self.misses += 1
        plan = (full or plan_state)(root, allow_pickle=allow_pickle, inline_max=0)
        self._plan = None
        if ok and plan.cacheable and len(plan.leaves) == len(tensors):
            meta = self._metadata(tensors)
            if meta is not None:
                plan.layout_id = next(_layout_ids)
                self._plan, self._sig, self._meta, self._scalars = plan, sig, meta, scalars
                self._skeleton = None
                self._storages = set(map(torch.UntypedStorage.data_ptr, map(torch.Tensor.untyped_storage, tensors)))
                self._members = {p: tensors[p].stride() for ms in plan.member_pos.values() for _, p in ms}
                self._arrays = [(a.dtype, a.shape) for a in arrays]
                self._array_entries = [i for i, e in enumerate(plan.entries) if e.kind == "ndarray"]
        return plan

    @staticmethod
    def _metadata(tensors: list[torch.Tensor]) -> _Meta | None:
        """(data pointers, shapes, contiguity, dtypes) of ``tensors``: four C-level passes.

        A data pointer inside a storage the cache still references belongs to that storage, so
        with the same dtype an equal pointer is the same storage at the same offset. Contiguity
        stands for the strides: a contiguous tensor's bytes are read through the layout's view,
        one that is not is copied afresh each save; the strides that are recorded (views of a
        shared storage) are compared by :meth:`_moved`.
        """
        try:
            return (list(map(torch.Tensor.data_ptr, tensors)), list(map(_shape, tensors)),
                    list(map(torch.Tensor.is_contiguous, tensors)), list(map(_dtype, tensors)))
        except (RuntimeError, NotImplementedError):  # sparse and other tensors without a plain layout
            return None

    def _moved(self, meta: _Meta, tensors: list[torch.Tensor]) -> list[int] | None:
        """Leaf positions whose tensor lives elsewhere now (same shape, contiguity, dtype),
        or None when the layout cannot be reused: another shape, or a moved tensor that shares a storage.

        A tensor made afresh each save (``torch.get_rng_state()``) keeps the layout when its new
        storage is its own: not one of the cached state's (still referenced, so no other tensor
        can have been given its address) nor another moved tensor's.
        """
        old = self._meta
        assert old is not None
        if meta[1:] != old[1:] or any(tensors[p].stride() != st for p, st in self._members.items()):
            return None
        if meta[0] == old[0]:
            return []
        moved = list(itertools.compress(range(len(meta[0])), map(operator.ne, meta[0], old[0])))
        seen: set[int] = set()
        for i in moved:
            if i in self._members:
                return None
            key = _storage_key(tensors[i])
            if key is None:
                continue
            if key[1] in self._storages or key[1] in seen:
                return None
            seen.add(key[1])
        return moved

    def _reuse(self, cached: Plan, tensors: list[torch.Tensor], scalars: list[Any], arrays: list[np.ndarray]) -> Plan:
        changed = _changed(scalars, self._scalars)  # against the layout's first tree: usually a few
        if not changed:
            tree = cached.tree
        else:
            if self._skeleton is None:
                self._skeleton = _skeleton(cached.tree)
            tree = _retree_at(cached.tree, self._skeleton, scalars, changed, [0], 0)
        plan = Plan(tree=tree, entries=cached.entries, data_nbytes=cached.data_nbytes, inline_max=0,
                    features=cached.features, leaves=tensors, own=cached.own, member_pos=cached.member_pos,
                    layout_id=cached.layout_id, storage_entries=cached.storage_entries)
        plan.tensors = _LazyTensors(plan, cached)  # type: ignore[assignment]
        plan.members = {s: [(k, tensors[p].detach()) for k, p in ms] for s, ms in cached.member_pos.items()}
        for i, a in zip(self._array_entries, arrays):
            plan.inline[i] = np.ascontiguousarray(a).tobytes()
        return plan


class _LazyTensors(dict):  # type: ignore[type-arg]
    """``Plan.tensors`` of a reused layout: one entry costs one lookup; the whole dict is built only
    when iterated (a save that needs a few entries never pays for 50,000)."""

    def __init__(self, plan: Plan, cached: Plan) -> None:
        super().__init__()
        self._leaves: list[torch.Tensor] | None = plan.leaves
        self._cached = cached

    def _one(self, k: int) -> torch.Tensor:
        p = self._cached.own.get(k)
        if p is None:
            return self._cached.tensors[k]  # a shared storage's base (the same storage: same address)
        assert self._leaves is not None
        return self._leaves[p].detach()

    def fill(self) -> _LazyTensors:
        if self._leaves is not None:
            for k in self._cached.tensors:
                super().__setitem__(k, self._one(k))
            self._leaves = None
        return self

    def __getitem__(self, k: int) -> torch.Tensor:
        return self._one(k) if self._leaves is not None else dict.__getitem__(self, k)

    def __iter__(self) -> Iterator[int]:
        return dict.__iter__(self.fill())

    def __len__(self) -> int:
        return len(self._cached.tensors)

    def __contains__(self, k: object) -> bool:
        return k in self._cached.tensors

    def items(self) -> Any:
        return dict.items(self.fill())

    def values(self) -> Any:
        return dict.values(self.fill())

    def keys(self) -> Any:
        return dict.keys(self.fill())

    def get(self, k: int, default: Any = None) -> Any:
        return self[k] if k in self._cached.tensors else default


_encoder = msgspec.msgpack.Encoder()
_DECODERS: dict[str, Any] = {}


#: What the worker decoded lately, by kind and bytes: a layout is sent with every save, the same bytes
#: each time, and decoding 50,000 entries costs far more than comparing their bytes. The values are
#: only read (entries and nodes are frozen). At most 32 MiB of encoded bytes.
UNPACKED: DecodedCache[Any] = DecodedCache(32 << 20)


def decode_packed(kind: str, blob: bytes) -> Any:
    """Unpickling side of :class:`Packed` (runs in the worker)."""
    hit = UNPACKED.get((kind, blob))
    if hit is not None:
        return hit
    value = _unpack(kind, blob)
    UNPACKED.put((kind, blob), value, len(blob))
    return value


def _unpack(kind: str, blob: bytes) -> Any:
    dec = _DECODERS.get(kind)
    if dec is None:
        dec = _DECODERS[kind] = msgspec.msgpack.Decoder(list[Entry] if kind == "entries" else Node)
    return dec.decode(blob)


class Packed:
    """Entries or a tree that pickle as their msgpack bytes, encoded once per layout.

    Pickling 50,000 msgspec Structs one by one costs the loop tens of milliseconds; these bytes
    cost a memcpy, and the worker unpickles them as the plain list / Node.
    """

    __slots__ = ("blob", "kind")

    def __init__(self, value: Any, kind: str) -> None:
        self.kind = kind
        self.blob = _encoder.encode(value)

    def __reduce__(self) -> tuple[Any, tuple[str, bytes]]:
        return (decode_packed, (self.kind, self.blob))


class PackedTree:
    """A tree sent as its layout's first tree (packed once) plus the root's children that differ from it.

    A manager's tree changes at every save (its step and RNG record) while the rest, possibly
    50,000 nodes, stays: the worker decodes the unchanged base once (:data:`UNPACKED`) and only the
    changed children each save, then replaces those children of the base's root.
    """

    __slots__ = ("base", "patches")

    def __init__(self, base: Packed, patches: list[tuple[int, Packed]]) -> None:
        self.base = base
        self.patches = patches

    @classmethod
    def of(cls, tree: Node, base_tree: Node, base: Packed) -> Packed | PackedTree:
        """``tree`` as a patch of ``base_tree`` (packed as ``base``) when only some of the root's children
        differ (by identity: :meth:`PlanCache.plan` shares the unchanged ones), else packed whole."""
        if not isinstance(tree, (DictNode, ListNode)) or not isinstance(base_tree, (DictNode, ListNode)):
            return Packed(tree, "tree")
        new, old = _children(tree), _children(base_tree)
        changed = (list(itertools.compress(range(len(new)), map(operator.is_not, new, old)))
                   if len(new) == len(old) else None)
        if changed is None or len(changed) * 2 > len(new) or not _same_container(tree, base_tree):
            return Packed(tree, "tree")
        return cls(base, [(i, Packed(new[i], "tree")) for i in changed])

    def __reduce__(self) -> tuple[Any, tuple[str, bytes, list[tuple[int, bytes]]]]:
        return (decode_patched_tree, (self.base.kind, self.base.blob, [(i, p.blob) for i, p in self.patches]))


def _children(node: DictNode | ListNode) -> list[Node]:
    return node.values if isinstance(node, DictNode) else node.items


def _same_container(a: DictNode | ListNode, b: DictNode | ListNode) -> bool:
    if isinstance(a, DictNode) and isinstance(b, DictNode):
        return a.ordered == b.ordered and (a.keys is b.keys or a.keys == b.keys)
    return isinstance(a, ListNode) and isinstance(b, ListNode) and a.tuple == b.tuple


def _with_children(node: DictNode | ListNode, children: list[Node]) -> Node:
    if isinstance(node, DictNode):
        return DictNode(keys=node.keys, values=children, ordered=node.ordered)
    return ListNode(items=children, tuple=node.tuple)


def decode_patched_tree(kind: str, base: bytes, patches: list[tuple[int, bytes]]) -> Node:
    """Unpickling side of :class:`PackedTree` (runs in the worker)."""
    root = decode_packed(kind, base)
    if not isinstance(root, (DictNode, ListNode)):
        raise TypeError(f"a patched tree's base must be a dict or list node, got {type(root).__name__}")
    children = list(_children(root))
    for i, blob in patches:
        children[i] = decode_packed(kind, blob)
    return _with_children(root, children)
