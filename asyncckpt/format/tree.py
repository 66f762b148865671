"""The one walker of a manifest's value tree: leaves, stored-entry references, key selection, rebuilding."""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterator
from typing import Any, Union

from ..errors import BadInputError, FormatError
from .records import BigIntNode, BytesNode, DictNode, ListNode, Node, RefNode, ValueNode

__all__ = ["MAX_DEPTH", "build_tree", "leaves", "refs", "select_keys"]

#: Deepest nesting a tree may have (a hostile manifest cannot drive the recursion further).
MAX_DEPTH = 512
Key = Union[str, int]


def leaves(tree: Node, where: str) -> Iterator[tuple[list[Key], Node]]:
    """``(path, node)`` for every leaf of ``tree`` in order: values, references and empty containers."""
    stack: list[tuple[list[Key], Node]] = [([], tree)]
    while stack:
        path, node = stack.pop()
        if len(path) > MAX_DEPTH:
            raise FormatError(f"{where}: value tree nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, DictNode) and node.keys:
            if len(node.keys) != len(node.values):
                raise FormatError(f"{where}: dict node with {len(node.keys)} keys and {len(node.values)} values")
            stack.extend(([*path, k], v) for k, v in reversed(list(zip(node.keys, node.values))))
        elif isinstance(node, ListNode) and node.items:
            stack.extend(([*path, i], v) for i, v in reversed(list(enumerate(node.items))))
        else:
            yield path, node


def refs(tree: Node, nentries: int, where: str) -> list[int]:
    """The entry indices ``tree`` references, sorted and unique; an index outside the entries is refused."""
    out = set()
    for _, node in leaves(tree, where):
        if isinstance(node, RefNode):
            if not 0 <= node.index < nentries:
                raise FormatError(f"{where}: value tree references entry {node.index}, the manifest has {nentries}")
            out.add(node.index)
    return sorted(out)


def select_keys(tree: Node, keys: Collection[Key] | None, where: str) -> Node:
    """The part of a manifest's tree that ``keys`` (top-level keys of the saved state) selects."""
    if keys is None:
        return tree
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Collection):
        raise BadInputError(f"keys must be a list of top-level keys, e.g. keys=['model'], not {keys!r}")
    if not isinstance(tree, DictNode):
        raise BadInputError(f"{where}: the saved state is not a mapping, so keys= cannot select from it")
    have = dict(zip(tree.keys, tree.values))
    missing = [k for k in keys if k not in have]
    if missing:
        raise BadInputError(
            f"{where}: keys={list(keys)!r}: {missing!r} not in the checkpoint (its top-level keys: "
            f"{list(have)[:20]!r})"
        )
    chosen = list(dict.fromkeys(keys))
    return DictNode(keys=chosen, values=[have[k] for k in chosen], ordered=tree.ordered)


def build_tree(tree: Node, values: list[Any], where: str) -> Any:
    """The Python value a manifest's ``tree`` describes, ``values[i]`` standing for entry ``i``."""
    return _build(tree, values, set(), where, 0)


def _build(node: Node, values: list[Any], used: set[int], where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise FormatError(f"{where}: value tree nested deeper than {MAX_DEPTH} levels")
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
