"""Incremental saves (feature "refs"): references to a sibling's bytes, loads, deletion and retention that
follow them, corruption and crashes."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import cli
from asyncckpt._loop import run_sync
from asyncckpt.catalog import RETIRED_FILE, read_commit
from asyncckpt.errors import FormatError, IntegrityError
from asyncckpt.format import (
    REFS,
    RefTarget,
    decode_manifest,
    encode_commit,
    encode_manifest,
)
from asyncckpt.format.crc import checksum
from asyncckpt.storage import LocalStorage, open_storage
from tests._dist import run_ranks


def flat(state: Any, prefix: str = "") -> dict[str, Any]:
    """key path -> leaf, for bit-exact comparison."""
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for k, v in state.items():
            out.update(flat(v, f"{prefix}/{k}"))
        return out
    if isinstance(state, (list, tuple)):
        out = {}
        for i, v in enumerate(state):
            out.update(flat(v, f"{prefix}/{i}"))
        return out
    return {prefix: state}


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (bit patterns: NaN payloads and -0.0 count)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_exact(got: Any, want: Any) -> None:
    g, w = flat(got), flat(want)
    assert g.keys() == w.keys()
    for k, v in w.items():
        if isinstance(v, torch.Tensor):
            assert g[k].dtype == v.dtype and g[k].shape == v.shape, k
            assert torch.equal(raw(g[k]), raw(v)), k
        else:
            assert g[k] == v, k


def snapshot(state: Any) -> Any:
    return copy.deepcopy(state)


def changed_bytes(prev: Any, cur: Any) -> int:
    p, c = flat(prev), flat(cur)
    n = 0
    for k, v in c.items():
        if isinstance(v, torch.Tensor):
            old = p.get(k)
            if not (isinstance(old, torch.Tensor) and old.shape == v.shape and old.dtype == v.dtype
                    and torch.equal(raw(old), raw(v))):
                n += v.numel() * v.element_size()
    return n


def data_bytes(ckpt_dir: Path) -> int:
    return sum(f.stat().st_size for f in ckpt_dir.glob("rank-*.data"))


def frozen_backbone(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(4)])
    for p in backbone.parameters():
        p.requires_grad_(False)
    adapter = torch.nn.Sequential(torch.nn.Linear(128, 16), torch.nn.Linear(16, 128))
    model = torch.nn.ModuleDict({"backbone": backbone, "adapter": adapter})
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 128)
    loss = model["adapter"](model["backbone"](x)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def save_loop(root: str, n: int, **opts: Any) -> list[Any]:
    """Save ``n`` checkpoints step-00..step-(n-1) of a frozen-backbone loop incrementally; returns each state."""
    model, opt = frozen_backbone()
    states = []
    with asyncckpt.AsyncCheckpointer(incremental=True, snapshot="blocking", chunk_size=5 << 20, **opts) as ck:
        for step in range(n):
            train_step(model, opt)
            state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
            states.append(snapshot(state))
            ck.save(state, f"{root}/step-{step:02d}", step=step)
            ck.finalize(blocking=True)
    return states


def test_frozen_backbone_twenty_saves_store_only_what_changed(tmp_path: Path) -> None:
    states = save_loop(str(tmp_path), 20)
    for step, want in enumerate(states):
        assert_bit_exact(asyncckpt.load(tmp_path / f"step-{step:02d}"), want)
    full = data_bytes(tmp_path / "step-00")
    assert full >= sum(v.numel() * v.element_size() for v in flat(states[0]).values() if isinstance(v, torch.Tensor))
    for step in range(1, 20):
        changed = changed_bytes(states[step - 1], states[step])
        stored = data_bytes(tmp_path / f"step-{step:02d}")
        assert 0 < changed < full / 5
        assert changed <= stored <= 1.1 * changed, (step, stored, changed)
    m = decode_manifest((tmp_path / "step-19" / "rank-00000.manifest").read_bytes(), "m")
    assert REFS in m.features and [t.name for t in m.refs] == ["step-00"]  # one hop, to the bytes' holder
    # partial load and load(into=) follow references too
    part = asyncckpt.load(tmp_path / "step-07", keys=["model"])
    assert_bit_exact(part, {"model": states[7]["model"]})
    model, opt = frozen_backbone(seed=1)
    asyncckpt.load(tmp_path / "step-05", into={"model": model, "optim": opt, "step": 0})
    assert_bit_exact(model.state_dict(), states[5]["model"])
    # verify and inspect follow references; ls/inspect show logical and stored sizes
    assert cli.main(["verify", str(tmp_path / "step-11")]) == 0


def test_not_incremental_by_default_and_first_save_is_full(tmp_path: Path) -> None:
    state = {"w": torch.arange(1000.0)}
    with asyncckpt.AsyncCheckpointer(snapshot="blocking") as ck:
        ck.save(state, f"{tmp_path}/a")
        ck.finalize(blocking=True)
        ck.save(state, f"{tmp_path}/b")
        ck.finalize(blocking=True)
    m = decode_manifest((tmp_path / "b" / "rank-00000.manifest").read_bytes(), "m")
    assert REFS not in m.features and not m.refs and all(not e.digest for e in m.entries)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    """Eight incremental checkpoints: one tensor never changes, one changes every other save, one every save."""
    root = tmp_path_factory.mktemp("tmpl") / "root"
    states = []
    const = torch.randn(300, 300)
    every_other = torch.randn(200, 100)
    with asyncckpt.AsyncCheckpointer(incremental=True, snapshot="blocking") as ck:
        for step in range(8):
            if step % 2 == 0:
                every_other = every_other + 1
            state = {"const": const, "slow": every_other, "fast": torch.full((64, 64), float(step)),
                     "shared": [const[:10], const[5:20]], "step": step}
            states.append(snapshot(state))
            ck.save(state, f"{root}/s{step}", step=step)
            ck.finalize(blocking=True)
    return root, states


def check_remaining(root: Path, states: list[Any], gone: set[int]) -> None:
    for step in range(len(states)):
        if step in gone:
            assert not (root / f"s{step}" / "COMMIT").exists()
            with pytest.raises(asyncckpt.CheckpointError):
                asyncckpt.load(root / f"s{step}")
        else:
            assert_bit_exact(asyncckpt.load(root / f"s{step}"), states[step])
    if len(gone) == len(states):  # nothing references anything: every byte is gone
        assert not list(root.glob("*/rank-*")), list(root.glob("*/*"))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doomed=st.lists(st.integers(0, 7), unique=True, max_size=8), via_cli=st.booleans())
def test_deleting_any_subset_keeps_the_others_loading(template: tuple[Path, list[Any]], tmp_path: Path,
                                                      doomed: list[int], via_cli: bool) -> None:
    src, states = template
    root = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
    shutil.copytree(src, root, symlinks=True)
    for step in doomed:
        if via_cli:
            assert cli.main(["rm", "--force", str(root / f"s{step}")]) == 0
        else:
            asyncckpt.delete(root / f"s{step}", force=True)
    check_remaining(root, states, set(doomed))


def test_ls_and_inspect_show_logical_and_stored_sizes(template: tuple[Path, list[Any]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    src, _ = template
    assert cli.main(["ls", "--json", str(src)]) == 0
    listed = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert listed["s0"]["logical_nbytes"] == listed["s0"]["nbytes"]
    for name in ("s1", "s5"):
        assert listed[name]["nbytes"] < listed[name]["logical_nbytes"] / 5
        assert abs(listed[name]["logical_nbytes"] - listed["s0"]["logical_nbytes"]) < 1024
    assert cli.main(["inspect", "--json", str(src / "s5")]) == 0
    shown = json.loads(capsys.readouterr().out)
    rank = shown["ranks"][0]
    assert rank["references"] == ["s0/rank-00000.manifest", "s4/rank-00000.manifest"]
    assert rank["referenced_nbytes"] == 300 * 300 * 4 + 200 * 100 * 4
    assert shown["logical_nbytes"] == listed["s5"]["logical_nbytes"]
    assert cli.main(["inspect", str(src / "s5")]) == 0
    assert "by reference" in capsys.readouterr().out


def test_delete_keeps_referenced_files_until_nothing_references_them(template: tuple[Path, list[Any]],
                                                                     tmp_path: Path) -> None:
    src, states = template
    root = tmp_path / "root"
    shutil.copytree(src, root)
    report = asyncckpt.delete(root / "s0")
    assert (root / "s0" / RETIRED_FILE).exists() and (root / "s0" / "rank-00000.data").exists()
    assert any("referenced by" in n for n in report.notes)
    assert [i.name for i in asyncckpt.list_checkpoints(root) if i.complete] == [f"s{s}" for s in range(7, 0, -1)]
    for step in range(1, 7):
        asyncckpt.delete(root / f"s{step}")
    check_remaining(root, states, set(range(7)))
    asyncckpt.delete(root / "s7", force=True)
    assert not (root / "s0").exists() or not any((root / "s0").iterdir())


def test_retention_keep_last_three(tmp_path: Path) -> None:
    model, opt = frozen_backbone()
    states = {}
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, keep_last=3, incremental=True, snapshot="blocking",
                                     rng=False, signals=()) as mgr:
        for step in range(1, 9):
            train_step(model, opt)
            state = {"model": model.state_dict(), "optim": opt.state_dict()}
            states[step] = snapshot(state)
            mgr.save(step, state, block=True)
    names = sorted(i.name for i in asyncckpt.list_checkpoints(tmp_path) if i.complete)
    assert len(names) == 3
    for name in names:
        step = int(name.split("-")[1])
        got = asyncckpt.load(tmp_path / name)
        assert_bit_exact({k: got[k] for k in ("model", "optim")}, states[step])


def corrupt(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_referenced_chunk_fails_every_user_naming_file_and_keys(template: tuple[Path, list[Any]],
                                                                          tmp_path: Path) -> None:
    src, states = template
    root = tmp_path / "root"
    shutil.copytree(src, root)
    m = decode_manifest((root / "s0" / "rank-00000.manifest").read_bytes(), "m")
    const = next(e for e in m.entries if e.key == "const")
    corrupt(root / "s0" / "rank-00000.data", const.offset + 100)
    for step in range(8):
        with pytest.raises(IntegrityError) as info:
            asyncckpt.load(root / f"s{step}")
        msg = str(info.value)
        assert "s0/rank-00000.data" in msg and "const" in msg, msg
    # a partial load that needs no referenced bytes of s0 still works
    assert_bit_exact(asyncckpt.load(root / "s3", keys=["fast"]), {"fast": states[3]["fast"]})
    assert cli.main(["verify", str(root / "s5")]) != 0


def rewrite_manifest(ckpt: Path, change: Any) -> None:
    """Replace rank 0's manifest with ``change(manifest)`` and re-seal COMMIT to match (a hostile writer)."""
    mpath = ckpt / "rank-00000.manifest"
    m = decode_manifest(mpath.read_bytes(), "m")
    blob = encode_manifest(change(m))
    mpath.write_bytes(blob)
    rec = run_sync(read_commit(LocalStorage(ckpt.parent), ckpt.name))
    ref = msgspec.structs.replace(rec.manifests[0], nbytes=len(blob), checksum=checksum(blob))
    (ckpt / "COMMIT").write_bytes(encode_commit(msgspec.structs.replace(rec, manifests=[ref])))


@pytest.mark.parametrize("file", ["../other/s0/rank-00000.manifest", "/etc/rank-00000.manifest",
                                  "a/b/rank-00000.manifest", "s3/COMMIT", "s3/rank-00000.manifest"])
def test_reference_outside_the_root_is_refused(template: tuple[Path, list[Any]], tmp_path: Path, file: str) -> None:
    src, _ = template
    root = tmp_path / "root"
    shutil.copytree(src, root)

    def change(m: Any) -> Any:
        return msgspec.structs.replace(m, refs=[RefTarget(file, t.nbytes, t.checksum, t.save_id) for t in m.refs])

    rewrite_manifest(root / "s3", change)
    with pytest.raises(FormatError) as info:
        asyncckpt.load(root / "s3")
    assert file in str(info.value) and "outside" in str(info.value)


def test_reader_without_the_feature_refuses_it_by_name(template: tuple[Path, list[Any]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncckpt.format import records
    from asyncckpt.format.memo import DecodedCache

    src, _ = template
    blob = (src / "s2" / "rank-00000.manifest").read_bytes()
    # An older reader: it knows fewer features and has decoded nothing yet (decodes are kept by bytes).
    monkeypatch.setattr(records, "KNOWN_FEATURES", frozenset(records.KNOWN_FEATURES - {REFS}))
    monkeypatch.setattr(records, "DECODED_MANIFESTS", DecodedCache(1 << 20))
    with pytest.raises(FormatError, match="'refs'"):
        decode_manifest(blob, "m")


class CrashAfter(Exception):
    pass


class CrashingStorage(LocalStorage):
    """A local root whose process "dies" (raises CrashAfter) at its ``budget``-th delete or record write."""

    def __init__(self, root: Path, budget: int) -> None:
        super().__init__(root)
        self.budget, self.calls = budget, 0

    def tick(self, key: str) -> None:
        if self.calls >= self.budget:
            raise CrashAfter(key)
        self.calls += 1

    async def delete(self, key: str) -> None:
        self.tick(key)
        await super().delete(key)

    async def delete_many(self, groups: Sequence[Sequence[str]]) -> None:
        for key in (k for g in groups for k in g):  # a crash point before every key, as with one delete each
            self.tick(key)
            await super().delete_many([[key]])

    async def put_record(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        self.tick(key)
        return await super().put_record(key, data, if_absent=if_absent)


def test_retention_interrupted_at_every_delete_leaves_committed_checkpoints_loading(
        template: tuple[Path, list[Any]], tmp_path: Path) -> None:
    """A crash after any number of storage deletes (and marker writes) of a keep_last=3 pass."""
    src, states = template
    total = None
    k = 0
    while total is None or k <= total:
        root = tmp_path / f"r{k}"
        shutil.copytree(src, root)
        storage = CrashingStorage(root, k)
        try:
            asyncckpt.prune(storage, keep_last=3)
            total = storage.calls
        except CrashAfter:
            pass
        committed = {int(p.parent.name[1:]) for p in root.glob("*/COMMIT")}
        check_remaining(root, states, set(range(8)) - committed)
        asyncckpt.prune(root, keep_last=3)  # the next pass finishes the job
        check_remaining(root, states, set(range(5)))
        k += 1
    assert total is not None and total > 5


def test_kill_during_retention_leaves_committed_checkpoints_loading(template: tuple[Path, list[Any]],
                                                                    tmp_path: Path) -> None:
    src, states = template
    for delay in (0.05, 0.2, 0.4):
        root = tmp_path / f"k{delay}"
        shutil.copytree(src, root)
        code = textwrap.dedent(f"""
            import asyncckpt, sys
            print("go", flush=True)
            asyncckpt.prune({str(root)!r}, keep_last=1)
        """)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"go\n"
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        committed = {int(q.parent.name[1:]) for q in root.glob("*/COMMIT")}
        check_remaining(root, states, set(range(8)) - committed)


@pytest.fixture
def s3opts(moto_server: Any) -> dict[str, Any]:
    return moto_server.options()  # type: ignore[no-any-return]


def test_incremental_through_s3_save_load_retention(moto_server: Any, s3_bucket: str, s3opts: dict[str, Any]) -> None:
    root = f"s3://{s3_bucket}/run"
    states = save_loop(root, 6, storage_options=s3opts)
    for step, want in enumerate(states):
        assert_bit_exact(asyncckpt.load(f"{root}/step-{step:02d}", storage_options=s3opts), want)
    storage = open_storage(root, **s3opts)
    sizes = {k: run_sync(storage.size(k)) for k in run_sync(storage.list("")) if k.endswith(".data")}
    assert sizes["step-03/rank-00000.data"] < sizes["step-00/rank-00000.data"] / 5
    asyncckpt.prune(root, keep_last=2, storage_options=s3opts)
    left = sorted(i.name for i in asyncckpt.list_checkpoints(root, storage_options=s3opts) if i.complete)
    assert left == ["step-04", "step-05"]
    for step in (4, 5):
        assert_bit_exact(asyncckpt.load(f"{root}/step-{step:02d}", storage_options=s3opts), states[step])
    keys = run_sync(storage.list(""))
    assert "step-00/rank-00000.data" in keys and f"step-00/{RETIRED_FILE}" in keys
    assert not any(k.startswith(("step-01/", "step-02/", "step-03/")) and k.endswith(".data") for k in keys)
    asyncckpt.delete(f"{root}/step-04", storage_options=s3opts)
    asyncckpt.delete(f"{root}/step-05", force=True, storage_options=s3opts)
    assert not [k for k in run_sync(storage.list("")) if k.endswith((".data", ".manifest"))]
    assert moto_server.incomplete_uploads(s3_bucket) == []


def test_tiers_drain_incremental_checkpoints_by_reference(tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast", tmp_path / "durable"
    tiers = asyncckpt.Tiers(fast, slow, keep=[2, 3])
    const = torch.randn(256, 256)
    states = []
    with asyncckpt.AsyncCheckpointer(incremental=True, snapshot="blocking") as ck:
        for step in range(6):
            state = {"const": const, "step_t": torch.full((128,), float(step))}
            states.append(snapshot(state))
            h = ck.save(state, tiers / f"s{step}", step=step)
            ck.finalize(blocking=True)
            assert h is not None and h.durable
    for root, kept in ((fast, (4, 5)), (slow, (3, 4, 5))):
        committed = sorted(int(p.parent.name[1:]) for p in root.glob("*/COMMIT"))
        assert committed == list(kept)
        for step in kept:
            assert_bit_exact(asyncckpt.load(root / f"s{step}"), states[step])
        assert data_bytes(root / "s5") < 256 * 256 * 4 / 10  # stored by reference there too
        assert (root / "s0" / RETIRED_FILE).exists()


def test_keep_last_one_with_saves_in_flight_never_loses_a_base(tmp_path: Path) -> None:
    """keep_last=1 with two saves in flight: a save's base may be the one retention lets go next."""
    const = torch.randn(512, 512)
    states = {}
    with asyncckpt.CheckpointManager(tmp_path, every_steps=1, keep_last=1, incremental=True, max_in_flight=2,
                                     snapshot="blocking", rng=False, signals=()) as mgr:
        for step in range(1, 13):
            state = {"const": const, "x": torch.full((1000,), float(step))}
            states[step] = snapshot(state)
            mgr.save(step, state)
    names = [i.name for i in asyncckpt.list_checkpoints(tmp_path) if i.complete]
    assert names == ["step-00000012"]
    got = asyncckpt.load(tmp_path / names[0])
    assert_bit_exact({k: got[k] for k in ("const", "x")}, states[12])


def test_bench_incremental_smoke(tmp_path: Path) -> None:
    """bench/incremental.py end to end on a tiny state: every row, bytes written (no timing asserts)."""
    import json

    out = tmp_path / "out.json"
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "bench" / "incremental.py"), "--mib", "2", "--tensors", "20",
                        "--saves", "1", "--dir", str(tmp_path), "--json", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["changed_fraction"], r["mode"]) for r in rows] == [
        (f, m) for f in (0.01, 0.1, 1.0) for m in ("full", "incremental")]
    by = {(r["changed_fraction"], r["mode"]): r["bytes_written"]["median"] for r in rows}
    state = rows[0]["state_bytes"]
    assert all(by[(f, "full")] >= state for f in (0.01, 0.1, 1.0))
    assert by[(0.01, "incremental")] < state / 10 and by[(0.1, "incremental")] < state / 5
    assert by[(1.0, "incremental")] >= state
    assert "incremental" in p.stdout


def test_incremental_with_zstd_compression(tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    const = torch.zeros(1 << 20)  # compresses: the base's chunks are zstd frames
    states = []
    with asyncckpt.AsyncCheckpointer(incremental=True, compression="zstd", snapshot="blocking",
                                     chunk_size=5 << 20) as ck:
        for step in range(3):
            state = {"const": const, "moving": torch.randn(50_000), "step": step}
            states.append(snapshot(state))
            ck.save(state, f"{tmp_path}/z{step}", step=step)
            ck.finalize(blocking=True)
    for step in range(3):
        assert_bit_exact(asyncckpt.load(tmp_path / f"z{step}"), states[step])
        assert_bit_exact(asyncckpt.load(tmp_path / f"z{step}", keys=["const"]), {"const": states[step]["const"]})
    m = decode_manifest((tmp_path / "z2" / "rank-00000.manifest").read_bytes(), "m")
    assert {"zstd", REFS} <= set(m.features) and [e.key for e in m.entries if e.ref >= 0] == ["const"]
    assert cli.main(["verify", str(tmp_path / "z2")]) == 0


def _two_rank_body(rank: int, world: int, root: str) -> dict[str, Any]:
    torch.manual_seed(rank)
    frozen = torch.randn(100_000) + rank
    with asyncckpt.AsyncCheckpointer(incremental=True, snapshot="blocking") as ck:
        for step in range(3):
            ck.save({"frozen": frozen, "x": torch.full((1000,), float(step + 10 * rank))}, f"{root}/m{step}", step=step)
            ck.finalize(blocking=True)
    torch.distributed.barrier()
    ok = []
    for step in range(3):
        got = asyncckpt.load(f"{root}/m{step}")
        ok.append(torch.equal(got["frozen"], frozen) and torch.equal(got["x"], torch.full((1000,), float(step + 10 * rank))))
    return {"ok": ok}


@pytest.mark.multiproc
def test_two_ranks_reference_their_own_rank_of_the_base(tmp_path: Path) -> None:
    res = run_ranks(2, _two_rank_body, tmp_path, str(tmp_path))
    assert [r["ok"] for r in res] == [[True] * 3, [True] * 3]
    for rank in range(2):
        m = decode_manifest((tmp_path / "m2" / f"rank-{rank:05d}.manifest").read_bytes(), "m")
        assert [t.file for t in m.refs] == [f"m0/rank-{rank:05d}.manifest"]
        assert data_bytes(tmp_path / "m2") < 100_000


def test_overwrite_of_a_referenced_name_keeps_what_others_reference(tmp_path: Path) -> None:
    const = torch.randn(100_000)
    with asyncckpt.AsyncCheckpointer(incremental=True, snapshot="blocking") as ck:
        for name, x in (("a", 1.0), ("b", 2.0), ("a", 3.0), ("c", 4.0)):
            ck.save({"const": const, "x": torch.full((10,), x)}, f"{tmp_path}/{name}", overwrite=True)
            ck.finalize(blocking=True)
    m = decode_manifest((tmp_path / "a" / "rank-00000.g1.manifest").read_bytes(), "m")
    assert not m.refs  # a's bytes were b's reference target: stored again, never referenced by itself
    for name, x in (("a", 3.0), ("b", 2.0), ("c", 4.0)):
        got = asyncckpt.load(tmp_path / name)
        assert torch.equal(got["const"], const) and torch.equal(got["x"], torch.full((10,), x))
    assert (tmp_path / "a" / "rank-00000.manifest").exists()  # generation 0: b references it
    asyncckpt.delete(tmp_path / "b")
    asyncckpt.delete(tmp_path / "c", force=True)
    for name in ("a",):
        assert torch.equal(asyncckpt.load(tmp_path / name)["const"], const)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_export_follows_references(template: tuple[Path, list[Any]], tmp_path: Path, fmt: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    src, states = template
    dest = tmp_path / f"s5.{fmt}"
    assert cli.main(["export", str(src / "s5"), "--to", str(dest)]) == 0, capsys.readouterr().err
    if fmt == "pt":
        got = torch.load(dest, weights_only=True)
        for k in ("const", "slow", "fast"):
            assert torch.equal(got[k], states[5][k]), k
        assert torch.equal(got["shared"][1], states[5]["shared"][1])
    else:
        safetensors_torch = pytest.importorskip("safetensors.torch")
        got = safetensors_torch.load_file(dest)
        for k in ("const", "slow", "fast"):
            assert torch.equal(got[k], states[5][k]), k


def test_a_deleted_but_referenced_name_saved_again_keeps_its_referrers_loading(tmp_path: Path) -> None:
    """``a`` is deleted while ``b`` references its bytes, then a new ``a`` is saved: the new save writes
    beside the retired files, ``b`` keeps loading, and the retired files go once ``b`` is gone."""
    const = torch.randn(100_000)
    with asyncckpt.AsyncCheckpointer(incremental=True, snapshot="blocking") as ck:
        ck.save({"const": const, "x": torch.full((10,), 1.0)}, f"{tmp_path}/a")
        ck.finalize(blocking=True)
        ck.save({"const": const, "x": torch.full((10,), 2.0)}, f"{tmp_path}/b")
        ck.finalize(blocking=True)
        assert decode_manifest((tmp_path / "b" / "rank-00000.manifest").read_bytes(), "m").refs
        asyncckpt.delete(tmp_path / "a")
        assert (tmp_path / "a" / RETIRED_FILE).exists()
        other = torch.randn(100_000)
        ck.save({"const": other, "x": torch.full((10,), 3.0)}, f"{tmp_path}/a")
        ck.finalize(blocking=True)
    got_b = asyncckpt.load(tmp_path / "b")
    assert torch.equal(got_b["const"], const) and torch.equal(got_b["x"], torch.full((10,), 2.0))
    got_a = asyncckpt.load(tmp_path / "a")
    assert torch.equal(got_a["const"], other) and torch.equal(got_a["x"], torch.full((10,), 3.0))
    # b goes: the retired generation of a is no longer referenced and is swept; the new a stays.
    asyncckpt.delete(tmp_path / "b", force=True)
    left = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert RETIRED_FILE not in left and "rank-00000.manifest" not in left, left
    got_a = asyncckpt.load(tmp_path / "a")
    assert torch.equal(got_a["const"], other)
