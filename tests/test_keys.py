"""One rule for state-dict keys (docs/format.md, "Keys"), and how `inspect`/`export --key` write them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import cli
from asyncckpt.format import DictNode, Node
from asyncckpt.keypath import format_path, parse_path
from asyncckpt.load import build_tree
from asyncckpt.plan import plan_state

# Every str Python can encode as UTF-8 (no lone surrogates), ints of the signed 64-bit range.
keys = st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
                 st.integers(-(1 << 63), (1 << 63) - 1))


def _roundtrip(state: dict[Any, Any]) -> Any:
    """plan -> the manifest's msgpack -> the tree a load rebuilds (no tensors in these states)."""
    plan = plan_state(state)
    tree = msgspec.msgpack.decode(msgspec.msgpack.encode(plan.tree), type=Node)  # type: ignore[arg-type]
    return build_tree(tree, [], "test")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, st.integers(), max_size=6), keys)
def test_every_storable_key_is_accepted_and_comes_back_exactly(d: dict[Any, int], k: Any) -> None:
    state = {"top": d, "nested": {k: {k: 1}}}
    assert _roundtrip(state) == state


@pytest.mark.parametrize("key", ["a\udc80", "\ud800x", 1 << 63, -(1 << 63) - 1, True, 1.5, None, ("a",), b"k"])
def test_keys_the_format_cannot_store_are_refused_by_name(key: Any) -> None:
    with pytest.raises(asyncckpt.BadInputError, match=r"nested/inner: .*key"):
        plan_state({"nested": {"inner": {key: 1}}})


@settings(max_examples=300, deadline=None)
@given(st.lists(keys, max_size=5))
def test_a_written_path_reads_back_as_the_same_keys(path: list[Any]) -> None:
    text = format_path(path)
    assert parse_path(text) == path and [type(k) for k in parse_path(text)] == [type(k) for k in path]


def test_paths_that_looked_alike_differ() -> None:
    assert format_path(["a/b"]) == "a%2Fb" != format_path(["a", "b"]) == "a/b"
    assert format_path([0]) == "0" != format_path(["0"]) == '"0"'
    assert format_path([""]) == '""' and format_path(["%2F"]) == "%252F" and format_path(['"0"']) == "%220%22"
    assert format_path(["a\nb", "tab\tx"]) == "a%0Ab/tab%09x"
    assert format_path(["..", "../../etc/passwd"]) == "../..%2F..%2Fetc%2Fpasswd"


def test_inspect_shows_every_value_and_no_two_rows_alike(capsys: Any, shared_ckpt: asyncckpt.AsyncCheckpointer,
                                                          tmp_path: Path) -> None:
    state = {"a/b": {"t": torch.ones(2)}, "a": {"b": {"t": torch.zeros(3)}}, "opt": {0: 1.5, "0": "zero"},
             "..": None, "empty": {}, "seq": (1, [], "x"), "big": 1 << 70, "raw": b"\x00\x01", "..%2F": True}
    shared_ckpt.save(state, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    assert cli.main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["keys"]["0"]
    shown = {r["key"]: r for r in rows}
    assert len(shown) == len(rows) == 12
    assert shown["a%2Fb/t"]["shape"] == [2] and shown["a/b/t"]["shape"] == [3]
    assert shown["opt/0"]["value"] == 1.5 and shown['opt/"0"']["value"] == "zero"
    assert shown[".."]["kind"] == "None" and shown["empty"]["kind"] == "dict" and shown["seq/1"]["kind"] == "list"
    assert shown["big"]["value"] == str(1 << 70) and shown["raw"]["nbytes"] == 2 and shown["..%252F"]["value"] is True
    assert all(parse_path(r["key"]) == r["path"] for r in rows)
    assert cli.main(["inspect", str(tmp_path / "c")]) == 0
    table = capsys.readouterr().out
    lines = [ln.split()[0] for ln in table.splitlines() if ln.startswith("  ") and ln.split()]
    assert "a%2Fb/t" in lines and "a/b/t" in lines and 'opt/"0"' in lines and "opt/0" in lines
    # What inspect shows is what --key takes.
    for key, want in (("a%2Fb", torch.ones(2)), ("a/b", torch.zeros(3))):
        dest = tmp_path / f"{len(key)}.safetensors"
        assert cli.main(["export", str(tmp_path / "c"), "--to", str(dest), "--key", key]) == 0
        assert torch.equal(safetensors.torch.load_file(dest)["t"], want)
    dest = tmp_path / "all.safetensors"
    assert cli.main(["export", str(tmp_path / "c"), "--to", str(dest)]) == 0
    assert set(safetensors.torch.load_file(dest)) == {"a%2Fb/t", "a/b/t"}  # once a collision, now two names
    capsys.readouterr()


def test_top_level_tree_is_a_dict_node() -> None:
    assert isinstance(plan_state({"x": 1}).tree, DictNode)
