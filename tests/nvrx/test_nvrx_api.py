"""asyncckpt.nvrx against nvidia-resiliency-ext 0.7's public API, and its NVRx contracts.

``nvrx_api.json`` records NVRx 0.7's signatures (names, parameters, defaults), read from its
source: facts, not NVRx code. Every one must exist in ``asyncckpt.nvrx`` with a compatible
signature: the same parameters in the same places with the same defaults; asyncckpt may add
parameters only with defaults.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import io
import json
import os
import pathlib
import time
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from asyncckpt.errors import CheckpointError
from tests.nvrx import _fns

API = json.loads((pathlib.Path(__file__).parent / "nvrx_api.json").read_text())["modules"]
KINDS = {"positional": (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD),
         "keyword_only": (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD),
         "var_positional": (inspect.Parameter.VAR_POSITIONAL,), "var_keyword": (inspect.Parameter.VAR_KEYWORD,)}


def _cases() -> list[tuple[str, str, str | None, dict[str, Any]]]:
    out = []
    for mod, names in API.items():
        for name, entry in names.items():
            if entry["kind"] == "function":
                out.append((mod, name, None, entry))
            else:
                out.append((mod, name, "<class>", entry))
                out += [(mod, name, m, me) for m, me in entry["methods"].items()]
    return out


def _compatible(ours: inspect.Signature, theirs: list[list[Any]], where: str) -> None:
    params = [p for p in ours.parameters.values() if p.name not in ("self", "cls")]
    names = {p.name: p for p in params}
    theirs = [t for t in theirs if t[0] not in ("self", "cls")]
    positional = [t for t in theirs if t[1] == "positional"]
    ours_positional = [p for p in params if p.kind in KINDS["positional"]]
    for name, kind, default in theirs:
        if kind in ("var_positional", "var_keyword"):
            assert any(p.kind in KINDS[kind] for p in params), f"{where}: needs *{name}" if kind == "var_positional" else f"{where}: needs **{name}"
            continue
        p = names.get(name)
        assert p is not None, f"{where}: parameter {name!r} is missing"
        assert p.kind in KINDS[kind], f"{where}: {name!r} is {p.kind.name}, NVRx's is {kind}"
        if kind == "positional":
            j = positional.index([name, kind, default])
            assert ours_positional[j].name == name, f"{where}: {name!r} is not positional #{j}"
        if default is not None:
            assert p.default is not inspect.Parameter.empty, f"{where}: {name!r} needs the default {default}"
            assert p.default == ast.literal_eval(default), f"{where}: {name!r} defaults to {p.default!r}, NVRx to {default}"
    known = {t[0] for t in theirs}
    for p in params:
        if p.name in known or p.name in ("self", "cls") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        assert p.default is not inspect.Parameter.empty, f"{where}: extra parameter {p.name!r} has no default"


@pytest.mark.parametrize("mod,name,member,entry", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_nvrx_signature(mod: str, name: str, member: str | None, entry: dict[str, Any]) -> None:
    module = importlib.import_module(f"asyncckpt.nvrx.{mod}")
    obj = getattr(module, name, None)
    assert obj is not None, f"asyncckpt.nvrx.{mod} has no {name}"
    where = f"asyncckpt.nvrx.{mod}.{name}" + (f".{member}" if member and member != "<class>" else "")
    if member is None:
        _compatible(inspect.signature(obj), entry["params"], where)
    elif member == "<class>":
        assert inspect.isclass(obj), f"{where} is not a class"
        if "fields" in entry:  # AsyncRequest: the NamedTuple's fields and defaults
            assert list(obj._fields[: len(entry["fields"])]) == [f for f, _ in entry["fields"]]
            for f, d in entry["fields"]:
                if d is not None:
                    assert obj._field_defaults[f] == ast.literal_eval(d), f"{where}.{f}"
    else:
        static = inspect.getattr_static(obj, member)
        kind = entry["kind"]
        if kind == "staticmethod":
            assert isinstance(static, staticmethod), f"{where} must be a staticmethod"
        elif kind == "classmethod":
            assert isinstance(static, classmethod), f"{where} must be a classmethod"
        _compatible(inspect.signature(getattr(obj, member)), entry["params"], where)


def test_nvrx_names_are_the_drop_in_classes() -> None:
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    import asyncckpt
    from asyncckpt import nvrx
    from asyncckpt.nvrx import cached_metadata_filesystem_reader, core, filesystem_async, torch_ckpt

    assert core.AsyncRequest is asyncckpt.AsyncRequest
    assert issubclass(core.AsyncCallsQueue, asyncckpt.AsyncCallsQueue)
    assert issubclass(torch_ckpt.TorchAsyncCheckpoint, asyncckpt.TorchAsyncCheckpoint)
    assert issubclass(filesystem_async.FileSystemWriterAsync, FileSystemWriter)
    assert issubclass(cached_metadata_filesystem_reader.CachedMetadataFileSystemReader, FileSystemReader)
    assert nvrx.TorchAsyncCheckpoint is torch_ckpt.TorchAsyncCheckpoint


def test_failure_raises_checkpoint_exception_and_queue_goes_on(tmp_path) -> None:
    """A failed request raises CheckpointException (also a CheckpointError) at finalize; its
    finalize functions never run; the next request works."""
    from asyncckpt.nvrx.core import AsyncCallsQueue, AsyncRequest

    ran: list[int] = []
    q = AsyncCallsQueue()
    try:
        q.schedule_async_request(AsyncRequest(_fns.fail, ("disk on fire",), [lambda: ran.append(1)]))
        with pytest.raises(CheckpointException, match="disk on fire") as ei:
            q.maybe_finalize_async_calls(blocking=True)
        assert isinstance(ei.value, CheckpointError) and list(ei.value.failures) == [0] and ran == []
        sd = {"w": torch.arange(20_000, dtype=torch.float32)}
        q.schedule_async_request(_fns.preload_request(str(tmp_path / "x.pt"), sd))
        sd["w"].add_(1)  # schedule returned after preload_fn ran: the worker holds its clone already
        assert q.maybe_finalize_async_calls(blocking=True) == [1]
        assert torch.equal(torch.load(tmp_path / "x.pt")["w"], torch.arange(20_000, dtype=torch.float32))
    finally:
        q.close()


def test_warmup_abort_and_priority() -> None:
    """warmup_persistent_caller pre-starts the worker the next queue gets; cpu_priority=10 (NVRx's
    default) is the worker's nice value; abort_nvrx_checkpoint stops every queue."""
    from asyncckpt.nvrx.core import AsyncCallsQueue, AsyncRequest, abort_nvrx_checkpoint

    AsyncCallsQueue.warmup_persistent_caller(rank=0)
    warm = AsyncCallsQueue._warmup_persistent_caller
    assert warm is not None and warm.worker_pid is not None
    pid = warm.worker_pid
    q = AsyncCallsQueue()
    try:
        assert q is warm and q.worker_pid == pid and AsyncCallsQueue._warmup_persistent_caller is None
        deadline = time.monotonic() + 60  # the worker lowers its priority once it read its configuration
        while os.getpriority(os.PRIO_PROCESS, pid) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, pid) >= 10
        q.schedule_async_request(AsyncRequest(_fns.fail, ("never finalized",), []))
        abort_nvrx_checkpoint()
        assert q.get_num_unfinalized_calls() == 0 and q.closed
    finally:
        q.close(abort=True)


def test_torch_async_checkpoint_writes_what_torch_save_writes(tmp_path) -> None:
    """NVRx's TorchAsyncCheckpoint contract: anything torch.save takes (values it pickles, file
    objects, pickle_protocol), snapshot at the call; finalize(blocking, no_dist, terminate)."""
    from asyncckpt.nvrx.torch_ckpt import TorchAsyncCheckpoint

    ckpt = TorchAsyncCheckpoint(persistent_queue=True)
    assert ckpt.save is torch.save
    state = {"w": torch.arange(50_000, dtype=torch.float32), "args": argparse.Namespace(lr=0.1), "size": torch.Size([2])}
    buf = io.BytesIO()
    ckpt.async_save(state, tmp_path / "a.pt")
    ckpt.async_save(state, buf, pickle_protocol=4)
    state["w"].add_(5)
    ckpt.finalize_async_save(blocking=True, no_dist=True, terminate=True)
    for src in (tmp_path / "a.pt", io.BytesIO(buf.getvalue())):
        got = torch.load(src, weights_only=False)
        assert torch.equal(got["w"], torch.arange(50_000, dtype=torch.float32)) and got["args"].lr == 0.1
    with pytest.raises(Exception, match=r"weights_only|Unsupported global"):
        torch.load(tmp_path / "a.pt", weights_only=True)  # safety lives on the load side


def test_dcp_nvrx_form_single_process(tmp_path) -> None:
    """NVRx's DCP calls in one process: (None, None, []) when there is nothing to write, the plan
    as a 3-tuple, retrieve_write_results, the metadata cache, CachedMetadataFileSystemReader."""
    import torch.distributed.checkpoint as dcp

    from asyncckpt.nvrx.cached_metadata_filesystem_reader import CachedMetadataFileSystemReader
    from asyncckpt.nvrx.core import AsyncCallsQueue, AsyncRequest
    from asyncckpt.nvrx.filesystem_async import FileSystemWriterAsync
    from asyncckpt.nvrx.state_dict_saver import (
        CheckpointMetadataCache,
        save_state_dict_async_finalize,
        save_state_dict_async_plan,
    )

    cache = CheckpointMetadataCache()
    q = AsyncCallsQueue()
    try:
        empty = FileSystemWriterAsync(str(tmp_path / "empty"))
        ret = save_state_dict_async_plan({}, empty, None, 0, enable_cache=True, metadata_cache=cache)
        assert empty.get_save_function_and_args() == (None, None, [])
        q.schedule_async_request(AsyncRequest(None, (), [lambda: save_state_dict_async_finalize(*ret)]))
        q.maybe_finalize_async_calls(blocking=True)
        assert (tmp_path / "empty" / ".metadata").exists()
        for i in range(2):
            w = FileSystemWriterAsync(str(tmp_path / f"c{i}"), thread_count=2, separation_hint="opt.", use_msc=False,
                                      is_multiproc_io=True, use_cached_data_structure=True)
            sd = {"model.w": torch.full((300, 100), float(i)), "opt.m": torch.ones(300, 100) * i, "step": i}
            ret = save_state_dict_async_plan(sd, w, None, 0, enable_cache=True, metadata_cache=cache)
            writer, md, dw = ret
            assert writer is w and md is not None and dw is not None
            fn, pre, args = w.get_save_function_and_args()
            q.schedule_async_request(AsyncRequest(fn, args, [lambda r=ret: save_state_dict_async_finalize(*r)],
                                                  preload_fn=pre))
            sd["model.w"].add_(10)
            q.maybe_finalize_async_calls(blocking=True)
            assert {r.index.fqn for r in w.retrieve_write_results()} == {"model.w", "opt.m", "step"}
            files = sorted(f for f in os.listdir(tmp_path / f"c{i}") if f.endswith(".distcp"))
            assert files == ["__0_0.distcp", "opt.__0_1.distcp"]  # the hinted keys in a file of their own
        assert cache.get_metadata_caching_status() == (True, False)  # same structure both times
        got = {"model.w": torch.zeros(300, 100), "opt.m": torch.zeros(300, 100), "step": -1}
        reader = CachedMetadataFileSystemReader(str(tmp_path / "c1"))
        dcp.load(got, storage_reader=reader)
        assert torch.equal(got["model.w"], torch.ones(300, 100)) and got["step"] == 1
        assert str(tmp_path / "c1") in CachedMetadataFileSystemReader._metadata_cache
        CachedMetadataFileSystemReader.clear_metadata_cache()
    finally:
        q.close()
